//! qatflow-gates: does a dataset teach the behaviour we want?
//!
//! - [`checks`]: per-conversation checks (`markdown`, `emoji`, `verbose`, `think_prefix`,
//!   tool-call checks, …), each finding named verbatim;
//! - [`dataset`]: dataset-level counts and thresholds, and [`validate`] over a JSONL file;
//! - [`profile`]: gate profiles from `config/gates/*.toml` (`v3`, `v4` built in);
//! - [`text`]: the text detectors the checks use.

pub mod checks;
pub mod dataset;
mod emoji_table;
pub mod profile;
pub mod text;

pub use checks::{Check, Checker, ConversationReport, Finding};
pub use dataset::{validate, DatasetStats, FlaggedLine, GateResult, ValidationReport};
pub use profile::{GateProfile, ProfileError};
