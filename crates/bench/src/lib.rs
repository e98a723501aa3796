//! qatflow-bench: does a served model keep its manners, and how fast does it answer?
//!
//! - [`suite`]: behaviour suites as data (`config/bench/*.toml`);
//! - [`client`]: a timed streaming OpenAI Chat Completions client;
//! - [`checks`]: the checks of one response, with the data gates' definitions;
//! - [`run`]: a suite against an endpoint, into a [`Report`];
//! - [`report`]: the JSON report, its table and reports side by side;
//! - [`decide`]: the promote/rollback rule of the serving supervisor;
//! - [`server`]: `qatflow serve MODEL_DIR` as a child process for a run.

pub mod checks;
pub mod client;
pub mod decide;
pub mod report;
pub mod run;
pub mod server;
pub mod suite;

pub use client::{Client, Sample};
pub use decide::{decide, Decision, Margins};
pub use report::{compare_table, Report};
pub use run::{run, RunOptions, Setup};
pub use suite::Suite;

use std::path::PathBuf;

/// Errors of a bench run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A suite file is invalid.
    #[error("{origin}: invalid bench suite: {message}")]
    Suite {
        /// The file or directory.
        origin: String,
        /// What is wrong, with line and column for TOML errors.
        message: String,
    },
    /// A file cannot be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A report file is not usable.
    #[error("{path}: {message}")]
    Report {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The endpoint failed or answered something unusable.
    #[error("{url}: {message}")]
    Endpoint {
        /// The URL asked.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The run cannot start (system prompt, tools, profile, warm-up).
    #[error("{0}")]
    Setup(String),
    /// The local server could not be started.
    #[error("serving the model directory: {0}")]
    Server(String),
    /// The run was cancelled.
    #[error("cancelled")]
    Cancelled,
}
