//! Errors of sealing, shipping and receiving shards.

use std::path::PathBuf;

/// Errors of the shard libraries.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// A shard id is not 64 lowercase hex digits.
    #[error("invalid shard id {id:?}: expected the shard's sha256 as 64 lowercase hex digits")]
    InvalidId {
        /// The offending id (truncated to 80 characters).
        id: String,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// sled failed.
    #[error("{path}: shard ledger error: {source}")]
    Sled {
        /// The database directory.
        path: PathBuf,
        /// The sled error.
        source: sled::Error,
    },
    /// The dataset store failed.
    #[error(transparent)]
    Store(#[from] qatflow_store::StoreError),
    /// A shard file does not decode.
    #[error("shard {id}: {message}")]
    Format {
        /// The shard id (or `-` before it is known).
        id: String,
        /// What is wrong.
        message: String,
    },
    /// A chunk does not start at the receiver's committed offset.
    #[error("shard {id}: chunk at offset {offset}, but {committed} bytes are committed; query the committed offset and resend from there")]
    OffsetMismatch {
        /// The shard id.
        id: String,
        /// The chunk's offset.
        offset: u64,
        /// The receiver's committed offset.
        committed: u64,
    },
    /// A chunk, shard or decoded shard exceeds a limit.
    #[error("shard {id}: {what} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The shard id.
        id: String,
        /// `chunk`, `shard` or `decompressed shard`.
        what: &'static str,
        /// The size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The received bytes do not hash to the shard id, or their size differs.
    #[error(
        "shard {id}: {message}; the partial file was discarded, send the shard again from offset 0"
    )]
    Checksum {
        /// The shard id.
        id: String,
        /// What differed.
        message: String,
    },
    /// A sealed shard's file is missing or does not match its recorded digest.
    #[error(
        "sealed shard {id} at {path}: {message}; the outbox directory was changed outside qatflow"
    )]
    SealedFileBad {
        /// The shard id.
        id: String,
        /// The expected file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A verified shard whose content cannot be imported; it is quarantined for good.
    #[error("shard {id} was rejected by the receiver: {reason}; it is kept in the receiver's inbox/quarantine and will not be imported, fix the sender's data")]
    Rejected {
        /// The shard id.
        id: String,
        /// Why.
        reason: String,
    },
    /// A record in a shard ledger does not decode.
    #[error("{path}: shard ledger record {key} is corrupt: {message}")]
    Corrupt {
        /// The database directory.
        path: PathBuf,
        /// The record's key.
        key: String,
        /// What is wrong.
        message: String,
    },
}
