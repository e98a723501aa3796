//! HTTP teacher backends: any OpenAI-compatible `/v1/chat/completions` server, and
//! Anthropic's Messages API. API keys come from environment variables; usage tokens are
//! recorded from each response, and priced when prices per million tokens are given.
//! A 429, 503 or 529 answer's `Retry-After` header (seconds or an HTTP date) is passed on
//! in [`BackendError::Http`], and the retry waits at least that long.

use super::{Backend, BackendOutput, BatchRequest, BoxFuture, Usage};
use crate::error::{BackendError, TeacherError};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Settings of the OpenAI-compatible backend.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Base URL up to and including `/v1` (for example `http://127.0.0.1:8000/v1`).
    pub base_url: String,
    /// Model name sent in each request.
    pub model: String,
    /// Environment variable holding the API key; `None` sends no key (local servers).
    pub api_key_env: Option<String>,
    /// Sampling temperature.
    pub temperature: f32,
    /// Completion token limit.
    pub max_tokens: u32,
    /// Price of a million prompt tokens in US dollars, for the cost report.
    pub input_usd_per_mtok: Option<f64>,
    /// Price of a million completion tokens in US dollars.
    pub output_usd_per_mtok: Option<f64>,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "https://api.openai.com/v1".into(),
            model: "gpt-4o".into(),
            api_key_env: Some("OPENAI_API_KEY".into()),
            temperature: 0.9,
            max_tokens: 16_000,
            input_usd_per_mtok: None,
            output_usd_per_mtok: None,
        }
    }
}

/// Settings of the Anthropic Messages API backend.
#[derive(Debug, Clone)]
pub struct AnthropicConfig {
    /// Base URL without `/v1` (for example `https://api.anthropic.com`).
    pub base_url: String,
    /// Model name.
    pub model: String,
    /// Environment variable holding the API key.
    pub api_key_env: String,
    /// Sampling temperature.
    pub temperature: f32,
    /// Completion token limit.
    pub max_tokens: u32,
    /// Price of a million input tokens in US dollars.
    pub input_usd_per_mtok: Option<f64>,
    /// Price of a million output tokens in US dollars.
    pub output_usd_per_mtok: Option<f64>,
}

impl Default for AnthropicConfig {
    fn default() -> Self {
        AnthropicConfig {
            base_url: "https://api.anthropic.com".into(),
            model: "claude-opus-4-1".into(),
            api_key_env: "ANTHROPIC_API_KEY".into(),
            temperature: 1.0,
            max_tokens: 16_000,
            input_usd_per_mtok: None,
            output_usd_per_mtok: None,
        }
    }
}

fn client(timeout: Duration) -> Result<reqwest::Client, TeacherError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| TeacherError::Backend {
            backend: "http".into(),
            message: format!("cannot build the HTTP client: {e}"),
        })
}

fn key_from_env(backend: &str, var: &str) -> Result<String, TeacherError> {
    std::env::var(var).map_err(|_| TeacherError::Backend {
        backend: backend.into(),
        message: format!("environment variable {var} is not set; export the API key in it"),
    })
}

fn price(input: u64, output: u64, pin: Option<f64>, pout: Option<f64>) -> Option<f64> {
    if pin.is_none() && pout.is_none() {
        return None;
    }
    Some(input as f64 / 1e6 * pin.unwrap_or(0.0) + output as f64 / 1e6 * pout.unwrap_or(0.0))
}

fn transport(e: reqwest::Error, timeout: Duration) -> BackendError {
    if e.is_timeout() {
        BackendError::Timeout(timeout)
    } else {
        BackendError::Transport(e.to_string())
    }
}

async fn post_json(
    request: reqwest::RequestBuilder,
    url: &str,
    timeout: Duration,
) -> Result<Value, BackendError> {
    let response = request.send().await.map_err(|e| transport(e, timeout))?;
    let status = response.status();
    let retry_after = if matches!(status.as_u16(), 429 | 503 | 529) {
        response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()))
    } else {
        None
    };
    let body = response.text().await.map_err(|e| transport(e, timeout))?;
    if !status.is_success() {
        let snippet: String = body.chars().take(300).collect();
        let err = BackendError::Http {
            status: status.as_u16(),
            url: url.to_string(),
            body: snippet,
            retry_after,
        };
        if matches!(status.as_u16(), 401 | 403 | 404) {
            return Err(BackendError::Fatal(format!(
                "{err}; check the API key, base URL and model name"
            )));
        }
        return Err(err);
    }
    serde_json::from_str(&body)
        .map_err(|e| BackendError::BadResponse(format!("{url}: body is not JSON: {e}")))
}

/// The wait a `Retry-After` value asks for at `now`: delay-seconds, or an HTTP date
/// (IMF-fixdate, RFC 850 or asctime form; a date in the past means no wait). Anything
/// else is `None`, and the retry falls back to its backoff.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds is still "a very long wait"; the caller caps it.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = UNIX_EPOCH + Duration::from_secs(parse_http_date(value)?);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Seconds since the Unix epoch of an HTTP date (RFC 9110 section 5.6.7).
fn parse_http_date(value: &str) -> Option<u64> {
    let words: Vec<&str> = value
        .split(|c: char| c.is_ascii_whitespace() || c == ',' || c == '-')
        .filter(|w| !w.is_empty())
        .collect();
    let (day, month, year, time) = match words.as_slice() {
        // "Sun, 06 Nov 1994 08:49:37 GMT" and "Sunday, 06-Nov-94 08:49:37 GMT"
        [_, day, month, year, time, "GMT"] => (*day, *month, *year, *time),
        // "Sun Nov  6 08:49:37 1994"
        [_, month, day, time, year] => (*day, *month, *year, *time),
        _ => return None,
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? as u64 + 1;
    let day: u64 = day.parse().ok().filter(|d| (1..=31).contains(d))?;
    let year: u64 = match year.len() {
        4 => year.parse().ok()?,
        // RFC 850's two-digit years: RFC 9110 reads far-future years as the past century.
        2 => year
            .parse::<u64>()
            .ok()
            .map(|y| y + if y < 70 { 2000 } else { 1900 })?,
        _ => return None,
    };
    let hms: Vec<u64> = time
        .split(':')
        .map(|p| p.parse().ok().filter(|_| p.len() == 2))
        .collect::<Option<_>>()?;
    let [h, m, s] = hms.as_slice() else {
        return None;
    };
    if year < 1970 || *h > 23 || *m > 59 || *s > 60 {
        return None;
    }
    // Days from 1970-01-01 to the date (Howard Hinnant's days_from_civil).
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y % 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + h * 3600 + m * 60 + s)
}

/// The OpenAI-compatible backend.
#[derive(Debug)]
pub struct OpenAiBackend {
    config: OpenAiConfig,
    key: Option<String>,
    client: reqwest::Client,
    timeout: Duration,
}

impl OpenAiBackend {
    /// Reads the API key (when configured) and builds the client.
    pub fn new(config: OpenAiConfig, timeout: Duration) -> Result<Self, TeacherError> {
        let key = match &config.api_key_env {
            Some(var) => Some(key_from_env("openai", var)?),
            None => None,
        };
        Ok(OpenAiBackend {
            client: client(timeout)?,
            config,
            key,
            timeout,
        })
    }
}

impl Backend for OpenAiBackend {
    fn name(&self) -> &str {
        "openai"
    }

    fn generate<'a>(
        &'a self,
        request: &'a BatchRequest,
    ) -> BoxFuture<'a, Result<BackendOutput, BackendError>> {
        Box::pin(async move {
            let url = format!(
                "{}/chat/completions",
                self.config.base_url.trim_end_matches('/')
            );
            let body = json!({
                "model": self.config.model,
                "messages": [
                    {"role": "system", "content": request.generator_system_prompt},
                    {"role": "user", "content": request.prompt},
                ],
                "temperature": self.config.temperature,
                "max_tokens": self.config.max_tokens,
            });
            let mut req = self.client.post(&url).json(&body);
            if let Some(key) = &self.key {
                req = req.bearer_auth(key);
            }
            let v = post_json(req, &url, self.timeout).await?;
            let text = v["choices"][0]["message"]["content"]
                .as_str()
                .ok_or_else(|| {
                    BackendError::BadResponse(format!("{url}: no choices[0].message.content"))
                })?
                .to_string();
            let input = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
            let output = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
            Ok(BackendOutput {
                text,
                usage: Usage {
                    requests: 1,
                    input_tokens: input,
                    output_tokens: output,
                    cost_usd: price(
                        input,
                        output,
                        self.config.input_usd_per_mtok,
                        self.config.output_usd_per_mtok,
                    ),
                },
            })
        })
    }
}

/// The Anthropic Messages API backend.
#[derive(Debug)]
pub struct AnthropicBackend {
    config: AnthropicConfig,
    key: String,
    client: reqwest::Client,
    timeout: Duration,
}

impl AnthropicBackend {
    /// Reads the API key and builds the client.
    pub fn new(config: AnthropicConfig, timeout: Duration) -> Result<Self, TeacherError> {
        Ok(AnthropicBackend {
            key: key_from_env("anthropic", &config.api_key_env)?,
            client: client(timeout)?,
            config,
            timeout,
        })
    }
}

impl Backend for AnthropicBackend {
    fn name(&self) -> &str {
        "anthropic"
    }

    fn generate<'a>(
        &'a self,
        request: &'a BatchRequest,
    ) -> BoxFuture<'a, Result<BackendOutput, BackendError>> {
        Box::pin(async move {
            let url = format!("{}/v1/messages", self.config.base_url.trim_end_matches('/'));
            let body = json!({
                "model": self.config.model,
                "max_tokens": self.config.max_tokens,
                "temperature": self.config.temperature,
                "system": request.generator_system_prompt,
                "messages": [{"role": "user", "content": request.prompt}],
            });
            let req = self
                .client
                .post(&url)
                .header("x-api-key", &self.key)
                .header("anthropic-version", "2023-06-01")
                .json(&body);
            let v = post_json(req, &url, self.timeout).await?;
            let blocks = v["content"].as_array().ok_or_else(|| {
                BackendError::BadResponse(format!("{url}: no `content` array in the response"))
            })?;
            let text: String = blocks
                .iter()
                .filter(|b| b["type"] == "text")
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join("");
            let input = v["usage"]["input_tokens"].as_u64().unwrap_or(0);
            let output = v["usage"]["output_tokens"].as_u64().unwrap_or(0);
            Ok(BackendOutput {
                text,
                usage: Usage {
                    requests: 1,
                    input_tokens: input,
                    output_tokens: output,
                    cost_usd: price(
                        input,
                        output,
                        self.config.input_usd_per_mtok,
                        self.config.output_usd_per_mtok,
                    ),
                },
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_all_three_http_date_forms() {
        // 1994-11-06 08:49:37 UTC is 784111777 s after the epoch.
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777 - 90);
        let secs = |v: &str| parse_retry_after(v, now).map(|d| d.as_secs());
        assert_eq!(secs("2"), Some(2));
        assert_eq!(secs(" 120 "), Some(120));
        assert_eq!(secs("Sun, 06 Nov 1994 08:49:37 GMT"), Some(90));
        assert_eq!(secs("Sunday, 06-Nov-94 08:49:37 GMT"), Some(90));
        assert_eq!(secs("Sun Nov  6 08:49:37 1994"), Some(90));
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2028 23:59:59 GMT"),
            Some(1_835_481_599)
        );
        // A date already past asks for no wait.
        assert_eq!(secs("Sat, 05 Nov 1994 08:49:37 GMT"), Some(0));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn garbage_retry_after_values_are_ignored() {
        let now = SystemTime::now();
        for v in [
            "",
            "soon",
            "-5",
            "1.5",
            "Sun, 06 Nov 1994 08:49:37 CET",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
            "Sun, 06 Nov 1994 8:49:37 GMT",
        ] {
            assert_eq!(parse_retry_after(v, now), None, "{v:?}");
        }
    }
}
