//! Teacher backends behind one trait: each turns a batch prompt into raw text output.
//!
//! - [`claude_cli`]: runs the Claude Code CLI (or any command) with the prompt on stdin;
//! - [`http`]: OpenAI-compatible `/v1/chat/completions` and Anthropic's Messages API;
//! - [`offline`]: a deterministic template generator, no network;
//! - [`select`]: the backend chosen by name from flat settings (CLI flags, node config).
//!
//! Backends only produce text; parsing, retries, prompt injection, gates and storage are
//! the same for all of them (see [`crate::run`]).

pub mod claude_cli;
pub mod http;
pub mod offline;
mod offline_phrases;
pub mod select;

use crate::config::TeacherConfig;
use crate::error::{BackendError, TeacherError};
use serde::Serialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use claude_cli::ClaudeCliConfig;
pub use http::{AnthropicConfig, OpenAiConfig};
pub use offline::OfflineConfig;
pub use select::{BackendKind, BackendSettings, UnknownBackend};

/// A boxed future, as trait objects need.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Tokens and cost a backend reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Usage {
    /// Calls made (every attempt counts).
    pub requests: u64,
    /// Prompt tokens, where reported.
    pub input_tokens: u64,
    /// Completion tokens, where reported.
    pub output_tokens: u64,
    /// Cost in US dollars, where reported or priced.
    pub cost_usd: Option<f64>,
}

impl Usage {
    /// Adds another usage.
    pub fn add(&mut self, other: &Usage) {
        self.requests += other.requests;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cost_usd = match (self.cost_usd, other.cost_usd) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
        };
    }
}

/// One batch to generate.
#[derive(Debug, Clone)]
pub struct BatchRequest {
    /// Category name.
    pub category: String,
    /// Batch index within the category.
    pub index: u64,
    /// Index of the batch's first conversation within the category.
    pub first_item: u64,
    /// Conversations asked for.
    pub size: usize,
    /// Instructions for the teacher itself (system message / appended system prompt).
    pub generator_system_prompt: String,
    /// The batch prompt.
    pub prompt: String,
    /// 0 for the first attempt.
    pub attempt: u32,
}

/// What one successful call returned.
#[derive(Debug, Clone, Default)]
pub struct BackendOutput {
    /// The raw text.
    pub text: String,
    /// What the call reported.
    pub usage: Usage,
}

/// A teacher backend.
pub trait Backend: Send + Sync {
    /// A short name, stored as the conversations' `source` (`offline`, `openai`, …).
    fn name(&self) -> &str;
    /// Generates the raw output of one batch. Dropping the future cancels the call (and
    /// kills a child process).
    fn generate<'a>(
        &'a self,
        request: &'a BatchRequest,
    ) -> BoxFuture<'a, Result<BackendOutput, BackendError>>;
}

/// Which backend to use, with its settings.
#[derive(Debug, Clone)]
pub enum BackendConfig {
    /// The Claude Code CLI (or another command).
    ClaudeCli(ClaudeCliConfig),
    /// An OpenAI-compatible chat-completions server.
    OpenAi(OpenAiConfig),
    /// Anthropic's Messages API.
    Anthropic(AnthropicConfig),
    /// The offline template generator.
    Offline(OfflineConfig),
}

impl BackendConfig {
    /// The backend's name (`claude-cli`, `openai`, `anthropic`, `offline`).
    pub fn name(&self) -> &'static str {
        match self {
            BackendConfig::ClaudeCli(_) => "claude-cli",
            BackendConfig::OpenAi(_) => "openai",
            BackendConfig::Anthropic(_) => "anthropic",
            BackendConfig::Offline(_) => "offline",
        }
    }

    /// Builds the backend; `timeout` bounds each call.
    pub fn build(
        &self,
        teacher: &TeacherConfig,
        timeout: Duration,
    ) -> Result<Arc<dyn Backend>, TeacherError> {
        Ok(match self {
            BackendConfig::ClaudeCli(c) => Arc::new(claude_cli::ClaudeCliBackend::new(c.clone())),
            BackendConfig::OpenAi(c) => Arc::new(http::OpenAiBackend::new(c.clone(), timeout)?),
            BackendConfig::Anthropic(c) => {
                Arc::new(http::AnthropicBackend::new(c.clone(), timeout)?)
            }
            BackendConfig::Offline(c) => Arc::new(offline::OfflineBackend::new(c, teacher)?),
        })
    }
}
