//! qatflow-shards: moving accepted conversations from the workstation's store into the GPU
//! node's store as shard files, resumably and exactly once.
//!
//! - [`id`]: [`ShardId`], a shard's sha256 as 64 lowercase hex digits — the only form a
//!   shard name from the wire may take before it becomes a file name;
//! - [`format`]: the shard file, zstd-compressed JSONL of [`ShardLine`]s;
//! - [`outbox`]: the sending side: [`Outbox::seal`] turns newly accepted conversations
//!   into shard files (count or size limit), recorded in sled before they are announced;
//! - [`inbox`]: the receiving side: appends at the committed offset into a temporary file,
//!   verifies the checksum, commits idempotently and imports into the dataset store.
//!
//! Files are the truth and sled is the index (ARCHITECTURE.md, "The restart contract"): a
//! shard file is written, fsynced and renamed into place, its directory fsynced, and only
//! then recorded.
//! Nothing here knows about actors or gRPC.

pub mod error;
pub mod format;
mod fsutil;
pub mod id;
pub mod inbox;
pub mod outbox;

pub use error::ShardError;
pub use format::{decode, encode, ShardLine};
pub use id::ShardId;
pub use inbox::{CommitOutcome, Inbox, InboxLimits, QueryState};
pub use outbox::{Outbox, SealLimits, ShardMeta};
