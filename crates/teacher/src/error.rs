//! Errors of the teacher: what was wrong, where, and what to do about it.

use std::path::PathBuf;
use std::time::Duration;

/// Errors that stop a generation run.
#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    /// A teacher config file is invalid.
    #[error("{origin}: invalid teacher config: {message}")]
    Config {
        /// The file (or `built-in/<file>`).
        origin: String,
        /// What is wrong, with line and column where known.
        message: String,
    },
    /// A teacher config file cannot be read.
    #[error("{path}: cannot read teacher config: {source}; pass --teacher-dir with a directory holding categories.toml, tools.toml, generation.toml and system_prompt.txt")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `--category` names no configured category.
    #[error("unknown category `{name}`; configured categories: {known}")]
    UnknownCategory {
        /// The name asked for.
        name: String,
        /// The configured names.
        known: String,
    },
    /// The offline backend has no scenes for a category.
    #[error("category `{category}`: {message}; fix its `offline` list in categories.toml or use another backend")]
    Offline {
        /// The category.
        category: String,
        /// What is wrong.
        message: String,
    },
    /// The dataset store failed.
    #[error(transparent)]
    Store(#[from] qatflow_store::StoreError),
    /// The batch ledger (sled trees beside the store's) failed.
    #[error("{path}: batch ledger error: {message}")]
    Ledger {
        /// The database directory.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The ledger already has finished batches and `resume` was not asked for.
    #[error("the ledger already holds {batches} finished batches of category `{category}`; pass --resume to generate only the missing batches, or use a fresh --db")]
    NotResuming {
        /// The category.
        category: String,
        /// Its finished batches.
        batches: u64,
    },
    /// `resume` with a different batch size than the ledger was written with.
    #[error("category `{category}` was generated with --per-batch {ledger}, not {asked}; resume with --per-batch {ledger} (batch indexes depend on it)")]
    PlanMismatch {
        /// The category.
        category: String,
        /// The batch size in the ledger.
        ledger: u64,
        /// The batch size asked for.
        asked: u64,
    },
    /// A backend failed in a way retrying cannot fix (bad key, missing program).
    #[error("{backend} backend: {message}")]
    Backend {
        /// The backend name.
        backend: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// An option is out of range.
    #[error("invalid option: {0}")]
    Options(String),
    /// A background task failed (a panic in store or batch code: a bug).
    #[error("{0}; this is a bug, please report it with the log")]
    Task(String),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Why one backend attempt failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// A non-success HTTP status.
    #[error("HTTP {status} from {url}: {body}")]
    Http {
        /// The status code.
        status: u16,
        /// The URL called.
        url: String,
        /// The start of the response body.
        body: String,
        /// The wait a 429, 503 or 529 answer asked for in its `Retry-After` header.
        retry_after: Option<Duration>,
    },
    /// No answer within the per-batch timeout.
    #[error("no answer within {0:?} (the per-batch timeout)")]
    Timeout(Duration),
    /// Connection refused, reset, or another transport failure.
    #[error("transport error: {0}")]
    Transport(String),
    /// The response is not what the protocol says.
    #[error("malformed response: {0}")]
    BadResponse(String),
    /// The teacher process exited with an error.
    #[error("teacher command failed ({status}): {stderr}")]
    Process {
        /// The exit status.
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
    /// A problem retrying cannot fix: a missing API key, an unknown program, HTTP 401.
    #[error("{0}")]
    Fatal(String),
}

impl BackendError {
    /// The wait the server asked for before the next attempt (`Retry-After`), if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            BackendError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// True when another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            BackendError::Http { status, .. } => {
                matches!(status, 408 | 409 | 425 | 429) || (500..600).contains(status)
            }
            BackendError::Fatal(_) => false,
            _ => true,
        }
    }
}
