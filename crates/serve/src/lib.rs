//! qatflow-serve: an embedded OpenAI-compatible chat server for qatflow's model
//! directories (Hugging Face BF16/F32, NVFP4 exports with W4A4 emulation or weight-only):
//! Chat Completions with streaming, tools and thinking, a step-batching model worker with a
//! prefix cache, Prometheus metrics, and the tool-call parsers of each model family
//! ([`toolcall`]), which the benchmark uses too. It knows nothing of actors or gRPC.

pub mod api;
pub mod engine;
pub mod metrics;
pub mod output;
pub mod server;
pub mod toolcall;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use engine::{Engine, EngineConfig};
pub use server::{check_bind, router, serve, AppState, ServeOptions};
pub use toolcall::{parse_hermes, parse_qwen_xml, Parsed, ToolCall, ToolCallFormat};

/// Errors of starting a server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model could not be loaded.
    #[error(transparent)]
    Load(#[from] qatflow_model::LoadError),
    /// `config.json` is unusable.
    #[error(transparent)]
    Config(#[from] qatflow_model::ConfigError),
    /// The tokenizer could not be loaded.
    #[error(transparent)]
    Tokenizer(#[from] qatflow_model::TokenizerError),
    /// The chat template does not render.
    #[error(transparent)]
    Template(#[from] qatflow_model::TemplateError),
    /// The model directory has no chat template.
    #[error("{dir} has no chat template (tokenizer_config.json \"chat_template\" or chat_template.jinja); the server renders every request with it")]
    NoTemplate {
        /// The model directory.
        dir: PathBuf,
    },
    /// A non-loopback address without a token.
    #[error("refusing to listen on {0} without a bearer token: set --token (or QATFLOW_TOKEN) or bind to 127.0.0.1")]
    NeedsToken(SocketAddr),
    /// The model worker could not start.
    #[error("the model worker could not start: {0}")]
    Worker(String),
}
