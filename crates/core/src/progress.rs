//! Progress reporting that library code can call without knowing who listens.
//!
//! Long-running library functions take a `&dyn Progress`: the CLI renders it as an
//! `indicatif` bar, an actor forwards it as job events, tests pass [`NoProgress`].

/// Receives progress from a long-running operation.
pub trait Progress: Send + Sync {
    /// The total amount of work, in the operation's own unit (lines, bytes, steps).
    fn set_total(&self, total: u64);
    /// `n` more units are done.
    fn advance(&self, n: u64);
    /// A short status message.
    fn message(&self, _msg: &str) {}
}

/// A [`Progress`] that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_total(&self, _total: u64) {}
    fn advance(&self, _n: u64) {}
}
