//! qatflow-teacher: writes training conversations with a teacher model.
//!
//! - [`config`]: categories, tools and prompts from `config/teacher/` (data, not code);
//! - [`backend`]: the teacher backends behind one trait (`claude-cli`, `openai`,
//!   `anthropic`, `offline`);
//! - [`parse`]: teacher output → conversations, and the production-prompt injection;
//! - [`ledger`]: the resumable batch ledger in the store's database;
//! - [`run`]: a whole run ([`run_generation`] / [`generate`]) and its [`GenerationReport`].

pub mod backend;
pub mod config;
pub mod error;
pub mod ledger;
pub mod parse;
pub mod run;

pub use backend::{
    AnthropicConfig, Backend, BackendConfig, BackendKind, BackendOutput, BackendSettings,
    BatchRequest, ClaudeCliConfig, OfflineConfig, OpenAiConfig, UnknownBackend, Usage,
};
pub use config::{Category, TeacherConfig, ToolSpec};
pub use error::{BackendError, TeacherError};
pub use ledger::{Ledger, LedgerEntry, RawRejected};
pub use run::{
    generate, run_generation, validate_store, CancellationToken, CategoryReport, EventSink,
    FailedBatch, GenerateOptions, GenerationEvent, GenerationReport, RetryRecord,
};
