//! HTTP teacher backends: any OpenAI-compatible `/v1/chat/completions` server, and
//! Anthropic's Messages API. API keys come from environment variables; usage tokens are
//! recorded from each response, and priced when prices per million tokens are given.

use super::{Backend, BackendOutput, BatchRequest, BoxFuture, Usage};
use crate::error::{BackendError, TeacherError};
use serde_json::{json, Value};
use std::time::Duration;

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
    let body = response.text().await.map_err(|e| transport(e, timeout))?;
    if !status.is_success() {
        let snippet: String = body.chars().take(300).collect();
        let err = BackendError::Http {
            status: status.as_u16(),
            url: url.to_string(),
            body: snippet,
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
