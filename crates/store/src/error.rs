//! [`StoreError`]: every error of the store, its job records and other crates' trees.

use std::path::PathBuf;

/// Errors of the dataset store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption, a lock held by another process).
    #[error("{path}: database error: {source}; is another qatflow process using it?")]
    Sled {
        /// The database directory.
        path: PathBuf,
        /// The sled error.
        source: sled::Error,
    },
    /// The database was written by a newer qatflow.
    #[error("{path}: database schema version {found} is newer than this qatflow understands ({supported}); upgrade qatflow or use another --db")]
    NewerSchema {
        /// The database directory.
        path: PathBuf,
        /// Version found in the database.
        found: u32,
        /// Version this build supports.
        supported: u32,
    },
    /// A stored record does not decode.
    #[error("{path}: record {id} is corrupt: {message}; re-import the dataset into a fresh --db")]
    Corrupt {
        /// The database directory.
        path: PathBuf,
        /// The record's id.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// Another crate asked for one of the store's own trees.
    #[error("tree {name:?} belongs to the store; read it through qatflow_store::Store")]
    OwnTree {
        /// The tree's name.
        name: String,
    },
    /// A category or flag name contains a NUL byte, which index keys use as separator.
    #[error("invalid {what} name {name:?}: NUL bytes are not allowed")]
    InvalidName {
        /// `category` or `flag`.
        what: &'static str,
        /// The offending name.
        name: String,
    },
}
