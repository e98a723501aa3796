//! A minimal OpenAI Chat Completions client for benchmarking: one streaming request
//! (`stream_options.include_usage`) whose chunks are timed as they arrive, plus `/health`
//! and `/v1/models`.
//!
//! Streamed tool calls are assembled from their deltas by `index` (name and argument
//! fragments concatenated), as the OpenAI API sends them. Thinking arrives in
//! `reasoning_content` (qatflow, older vLLM) or `reasoning` (vLLM ≥ 0.10); both count.

use crate::BenchError;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// A tool call as the server returned it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolCallOut {
    /// The call id.
    pub id: String,
    /// The function name.
    pub name: String,
    /// The arguments, as the JSON text the server sent.
    pub arguments: String,
}

/// One timed response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The content (what a speech engine would read).
    pub content: String,
    /// The reasoning the server separated from the content.
    pub reasoning: String,
    /// Tool calls.
    pub tool_calls: Vec<ToolCallOut>,
    /// `finish_reason` of the choice.
    pub finish_reason: Option<String>,
    /// Prompt tokens from the usage chunk.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens from the usage chunk.
    pub completion_tokens: Option<u64>,
    /// Milliseconds to the first chunk carrying content, reasoning or a tool call.
    pub ttft_ms: Option<f64>,
    /// Milliseconds to the first chunk carrying content or a tool call (what a listener
    /// waits for when the model thinks first).
    pub ttft_output_ms: Option<f64>,
    /// Milliseconds from the first to the last token-carrying chunk.
    pub decode_ms: Option<f64>,
    /// Milliseconds from sending the request to the end of the stream.
    pub total_ms: f64,
}

impl Sample {
    /// Decode speed: the completion tokens after the first, over the time from the first
    /// token to the last; `None` without a usage chunk or with fewer than two tokens.
    pub fn decode_tok_s(&self) -> Option<f64> {
        let tokens = self.completion_tokens?;
        let ms = self.decode_ms?;
        (tokens >= 2 && ms > 0.0).then(|| (tokens - 1) as f64 * 1000.0 / ms)
    }
}

/// An OpenAI-compatible endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    api_key: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client of `base` (`http://host:port` or `http://host:port/v1`), sending
    /// `api_key` as a bearer token when given.
    pub fn new(base: &str, api_key: Option<String>) -> Result<Client, BenchError> {
        let trimmed = base.trim_end_matches('/');
        let base = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(BenchError::Endpoint {
                url: base,
                message: "the endpoint must be an http:// or https:// URL".into(),
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| BenchError::Endpoint {
                url: base.clone(),
                message: format!("cannot build an HTTP client: {e}"),
            })?;
        Ok(Client {
            base,
            api_key,
            http,
        })
    }

    /// The base URL (without `/v1`).
    pub fn base(&self) -> &str {
        &self.base
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.get(format!("{}{path}", self.base));
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    fn endpoint_error(&self, path: &str, message: String) -> BenchError {
        BenchError::Endpoint {
            url: format!("{}{path}", self.base),
            message,
        }
    }

    /// `GET /health` answers 2xx within `timeout`.
    pub async fn health(&self, timeout: Duration) -> Result<(), BenchError> {
        let r = self
            .get("/health")
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.endpoint_error("/health", e.to_string()))?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(self.endpoint_error("/health", format!("answered {}", r.status())))
        }
    }

    /// The model ids `GET /v1/models` lists.
    pub async fn models(&self, timeout: Duration) -> Result<Vec<String>, BenchError> {
        let r = self
            .get("/v1/models")
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.endpoint_error("/v1/models", e.to_string()))?;
        let status = r.status();
        let body: serde_json::Value = r
            .json()
            .await
            .map_err(|e| self.endpoint_error("/v1/models", format!("not JSON: {e}")))?;
        if !status.is_success() {
            return Err(self.endpoint_error("/v1/models", format!("answered {status}: {body}")));
        }
        Ok(body["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Sends `request` (a Chat Completions body; `stream` and `stream_options` are set
    /// here) and times its chunks. `idle` bounds the wait for each chunk, `total` the
    /// whole response.
    pub async fn chat_stream(
        &self,
        request: &serde_json::Value,
        idle: Duration,
        total: Duration,
    ) -> Result<Sample, BenchError> {
        let path = "/v1/chat/completions";
        let mut body = request.clone();
        body["stream"] = true.into();
        body["stream_options"] = serde_json::json!({"include_usage": true});
        let mut r = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(k) = &self.api_key {
            r = r.bearer_auth(k);
        }
        let start = Instant::now();
        let deadline = start + total;
        let mut resp = match within(deadline, idle, r.send()).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => return Err(self.endpoint_error(path, e.to_string())),
            Err(_) => {
                return Err(self.endpoint_error(
                    path,
                    format!("no response headers within {} ms", idle.as_millis()),
                ))
            }
        };
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(self.endpoint_error(path, format!("answered {status}: {text}")));
        }
        let mut parser = StreamParser::new(start);
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let chunk = match within(deadline, idle, resp.chunk()).await {
                Ok(Ok(Some(c))) => c,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => return Err(self.endpoint_error(path, format!("stream broke: {e}"))),
                Err(_) => {
                    return Err(self.endpoint_error(
                        path,
                        format!(
                            "stalled: no data for {} ms ({} ms into the response)",
                            idle.as_millis(),
                            start.elapsed().as_millis()
                        ),
                    ))
                }
            };
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line);
                parser
                    .line(line.trim_end_matches(['\r', '\n']), Instant::now())
                    .map_err(|m| self.endpoint_error(path, m))?;
            }
            if parser.done {
                break;
            }
        }
        if !buf.is_empty() {
            let line = String::from_utf8_lossy(&buf).into_owned();
            parser
                .line(line.trim_end(), Instant::now())
                .map_err(|m| self.endpoint_error(path, m))?;
        }
        Ok(parser.finish(Instant::now()))
    }
}

/// Awaits `fut` for at most `idle`, and not past `deadline`.
async fn within<F: std::future::Future>(
    deadline: Instant,
    idle: Duration,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let left = deadline.saturating_duration_since(Instant::now()).min(idle);
    tokio::time::timeout(left, fut).await
}

/// Server-sent-event lines of a chat completion stream into a [`Sample`].
#[derive(Debug)]
pub struct StreamParser {
    start: Instant,
    sample: Sample,
    first: Option<Instant>,
    last: Option<Instant>,
    /// `data: [DONE]` was seen.
    pub done: bool,
}

fn ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

impl StreamParser {
    /// A parser of a stream whose request was sent at `start`.
    pub fn new(start: Instant) -> StreamParser {
        StreamParser {
            start,
            sample: Sample::default(),
            first: None,
            last: None,
            done: false,
        }
    }

    /// One line of the stream, received at `at`; an error describes a malformed chunk or
    /// an error the server sent in the stream.
    pub fn line(&mut self, line: &str, at: Instant) -> Result<(), String> {
        let Some(data) = line.strip_prefix("data:") else {
            // Blank separators, comments (`: ping`) and `event:` lines carry no data.
            return Ok(());
        };
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let v: serde_json::Value = serde_json::from_str(data)
            .map_err(|e| format!("a stream chunk is not JSON ({e}): {data}"))?;
        if let Some(err) = v.get("error") {
            return Err(format!("the server sent an error in the stream: {err}"));
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.sample.prompt_tokens = u["prompt_tokens"].as_u64();
            self.sample.completion_tokens = u["completion_tokens"].as_u64();
        }
        let Some(choice) = v["choices"].as_array().and_then(|c| c.first()) else {
            return Ok(());
        };
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.sample.finish_reason = Some(reason.to_string());
        }
        let delta = &choice["delta"];
        let mut output = false;
        let mut any = false;
        if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            self.sample.content.push_str(t);
            output = true;
        }
        for key in ["reasoning_content", "reasoning"] {
            if let Some(t) = delta[key].as_str().filter(|t| !t.is_empty()) {
                self.sample.reasoning.push_str(t);
                any = true;
            }
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"]
                .as_u64()
                .unwrap_or(self.sample.tool_calls.len().saturating_sub(1) as u64)
                as usize;
            while self.sample.tool_calls.len() <= index {
                self.sample.tool_calls.push(ToolCallOut::default());
            }
            let slot = &mut self.sample.tool_calls[index];
            if let Some(id) = call["id"].as_str() {
                slot.id.push_str(id);
            }
            if let Some(name) = call["function"]["name"].as_str() {
                slot.name.push_str(name);
            }
            if let Some(args) = call["function"]["arguments"].as_str() {
                slot.arguments.push_str(args);
            }
            output = true;
        }
        if output || any {
            if self.first.is_none() {
                self.first = Some(at);
                self.sample.ttft_ms = Some(ms(self.start, at));
            }
            if output && self.sample.ttft_output_ms.is_none() {
                self.sample.ttft_output_ms = Some(ms(self.start, at));
            }
            self.last = Some(at);
        }
        Ok(())
    }

    /// The sample, with the stream ending at `end`.
    pub fn finish(mut self, end: Instant) -> Sample {
        if let (Some(first), Some(last)) = (self.first, self.last) {
            self.sample.decode_ms = Some(ms(first, last));
        }
        self.sample.total_ms = ms(self.start, end);
        self.sample
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_assembled_and_timed() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut p = StreamParser::new(t0);
        let lines = [
            (
                5,
                r#"data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#,
            ),
            (
                10,
                r#"data: {"choices":[{"index":0,"delta":{"reasoning":"hmm"}}]}"#,
            ),
            (
                20,
                r#"data: {"choices":[{"index":0,"delta":{"content":"It is "}}]}"#,
            ),
            (
                30,
                r#"data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1","type":"function","function":{"name":"get_weather","arguments":"{\"ci"}}]}}]}"#,
            ),
            (
                40,
                r#"data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ty\": \"Pune\"}"}}]},"finish_reason":"tool_calls"}]}"#,
            ),
            (41, ""),
            (
                42,
                r#"data: {"choices":[],"usage":{"prompt_tokens":50,"completion_tokens":5,"total_tokens":55}}"#,
            ),
            (43, "data: [DONE]"),
        ];
        for (t, l) in lines {
            p.line(l, at(t)).unwrap();
        }
        assert!(p.done);
        let s = p.finish(at(50));
        assert_eq!(s.content, "It is ");
        assert_eq!(s.reasoning, "hmm");
        assert_eq!(
            s.tool_calls,
            vec![ToolCallOut {
                id: "c1".into(),
                name: "get_weather".into(),
                arguments: "{\"city\": \"Pune\"}".into()
            }]
        );
        assert_eq!(s.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(s.ttft_ms, Some(10.0));
        assert_eq!(s.ttft_output_ms, Some(20.0));
        assert_eq!(s.decode_ms, Some(30.0));
        assert_eq!(s.total_ms, 50.0);
        assert_eq!(s.completion_tokens, Some(5));
        // 4 tokens after the first in 30 ms.
        assert!((s.decode_tok_s().unwrap() - 4000.0 / 30.0).abs() < 1e-9);
    }

    #[test]
    fn stream_errors_and_garbage_are_reported() {
        let t0 = Instant::now();
        let mut p = StreamParser::new(t0);
        let err = p.line("data: {not json", t0).unwrap_err();
        assert!(err.contains("not JSON"), "{err}");
        let err = p
            .line(r#"data: {"error":{"message":"boom"}}"#, t0)
            .unwrap_err();
        assert!(err.contains("boom"), "{err}");
        p.line(": keep-alive", t0).unwrap();
        let s = p.finish(t0);
        assert_eq!(s.decode_tok_s(), None);
        assert_eq!(s.ttft_ms, None);
    }

    #[test]
    fn endpoints_must_be_http() {
        let err = Client::new("localhost:8000", None).unwrap_err().to_string();
        assert!(err.contains("http://"), "{err}");
        assert_eq!(
            Client::new("http://h:1/v1/", None).unwrap().base(),
            "http://h:1"
        );
    }
}
