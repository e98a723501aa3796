//! The receiving side: resumable upload into a temporary file, checksum, idempotent commit
//! and import into the dataset store.
//!
//! Layout under the inbox directory: `partial/<id>.part` (bytes received so far; its length
//! is the committed offset) and `shards/<id>.jsonl.zst` (verified shards). The tree
//! `shards_in` of the store's database maps a shard id to its [`CommitRecord`] once its
//! conversations are imported. Commit order: verify the partial file's size and sha256 →
//! fsync and rename it into `shards/` → import (the store dedupes by content hash, so a
//! repeated import changes nothing) → record → flush. A crash at any point leaves a state
//! from which the same commit call finishes the job.
//!
//! The checksum proves transport, not content: every imported conversation is checked
//! again with the receiver's own gates and stored with the flags they find. A verified
//! shard whose content cannot be imported (it does not decode, decodes past the limits, or
//! holds a line that is not a conversation) is moved to `quarantine/<id>.jsonl.zst` and
//! recorded in the tree `shards_rejected` (id → reason); queries, appends and commits of
//! it then answer [`ShardError::Rejected`], so the sender stops retrying and reports it.

use crate::fsutil::{io_err, rename_durable};
use crate::{decode, ShardError, ShardId};
use qatflow_core::Conversation;
use qatflow_gates::Checker;
use qatflow_store::{InsertOutcome, NewConversation, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Size bounds of the receiving side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxLimits {
    /// Largest shard file accepted, in bytes.
    pub max_shard_bytes: u64,
    /// Largest chunk accepted, in bytes.
    pub max_chunk_bytes: u64,
    /// Largest decompressed shard accepted, in bytes.
    pub max_decoded_bytes: u64,
}

impl Default for InboxLimits {
    /// 64 MiB shards, 1 MiB chunks, 1 GiB decompressed.
    fn default() -> InboxLimits {
        InboxLimits {
            max_shard_bytes: 64 << 20,
            max_chunk_bytes: 1 << 20,
            max_decoded_bytes: 1 << 30,
        }
    }
}

/// What the receiver holds of a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryState {
    /// Bytes received; the next chunk must start here.
    pub committed_offset: u64,
    /// The shard is committed and imported.
    pub committed: bool,
    /// The shard was verified but its content was rejected (why); it is quarantined and
    /// will never be committed.
    pub rejected: Option<String>,
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitOutcome {
    /// Conversations newly stored.
    pub imported: u64,
    /// Conversations the store already held.
    pub duplicates: u64,
    /// The shard had been committed before; nothing was done.
    pub already_committed: bool,
}

/// A committed shard as `shards_in` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// File size in bytes.
    pub size: u64,
    /// Conversations in the shard.
    pub conversations: u64,
    /// Commit order, from 0.
    pub index: u64,
}

/// The receiving side; see the module docs. Cheap to clone; all clones share one lock, so
/// appends and commits of one inbox never interleave.
#[derive(Clone)]
pub struct Inbox {
    partial_dir: PathBuf,
    shard_dir: PathBuf,
    quarantine_dir: PathBuf,
    db_path: PathBuf,
    tree: sled::Tree,
    rejected: sled::Tree,
    limits: InboxLimits,
    checker: Arc<Checker>,
    lock: Arc<Mutex<()>>,
}

impl Inbox {
    /// Opens the inbox of `store` with files under `dir` (created if needed); every
    /// imported conversation is checked with `checker` (the receiver's gate profile) and
    /// stored with its flags.
    pub fn open(
        store: &Store,
        dir: &Path,
        limits: InboxLimits,
        checker: Checker,
    ) -> Result<Inbox, ShardError> {
        let partial_dir = dir.join("partial");
        let shard_dir = dir.join("shards");
        let quarantine_dir = dir.join("quarantine");
        for d in [&partial_dir, &shard_dir, &quarantine_dir] {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        let tree = store.tree("shards_in")?;
        let rejected = store.tree("shards_rejected")?;
        Ok(Inbox {
            partial_dir,
            shard_dir,
            quarantine_dir,
            db_path: store.path().to_path_buf(),
            tree,
            rejected,
            limits,
            checker: Arc::new(checker),
            lock: Arc::new(Mutex::new(())),
        })
    }

    /// Where a rejected shard's file is kept.
    pub fn quarantine_path(&self, id: &ShardId) -> PathBuf {
        self.quarantine_dir.join(id.file_name())
    }

    /// Why shard `id` was rejected, if it was.
    pub fn rejection(&self, id: &ShardId) -> Result<Option<String>, ShardError> {
        Ok(self
            .rejected
            .get(id.as_str())
            .map_err(|e| self.sled_err(e))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Number of rejected (quarantined) shards.
    pub fn rejected_count(&self) -> u64 {
        self.rejected.len() as u64
    }

    /// Moves a verified shard whose content cannot be imported to the quarantine and
    /// records why; returns the error to answer.
    fn reject(&self, id: &ShardId, reason: String) -> Result<ShardError, ShardError> {
        let from = self.shard_path(id);
        if file_len(&from)?.is_some() {
            rename_durable(&from, &self.quarantine_path(id))?;
        }
        self.rejected
            .insert(id.as_str(), reason.as_bytes())
            .map_err(|e| self.sled_err(e))?;
        self.rejected.flush().map_err(|e| self.sled_err(e))?;
        Ok(ShardError::Rejected {
            id: id.to_string(),
            reason,
        })
    }

    /// The inbox's limits.
    pub fn limits(&self) -> InboxLimits {
        self.limits
    }

    fn sled_err(&self, source: sled::Error) -> ShardError {
        ShardError::Sled {
            path: self.db_path.clone(),
            source,
        }
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn partial_path(&self, id: &ShardId) -> PathBuf {
        self.partial_dir.join(format!("{id}.part"))
    }

    fn shard_path(&self, id: &ShardId) -> PathBuf {
        self.shard_dir.join(id.file_name())
    }

    fn record(&self, id: &ShardId) -> Result<Option<CommitRecord>, ShardError> {
        match self.tree.get(id.as_str()).map_err(|e| self.sled_err(e))? {
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| ShardError::Corrupt {
                        path: self.db_path.clone(),
                        key: format!("shards_in/{id}"),
                        message: e.to_string(),
                    })
            }
            None => Ok(None),
        }
    }

    fn query_locked(&self, id: &ShardId) -> Result<QueryState, ShardError> {
        if self.record(id)?.is_some() {
            let size = file_len(&self.shard_path(id))?.unwrap_or(0);
            return Ok(QueryState {
                committed_offset: size,
                committed: true,
                rejected: None,
            });
        }
        if let Some(reason) = self.rejection(id)? {
            let size = file_len(&self.quarantine_path(id))?.unwrap_or(0);
            return Ok(QueryState {
                committed_offset: size,
                committed: false,
                rejected: Some(reason),
            });
        }
        let offset = match file_len(&self.shard_path(id))? {
            Some(len) => len,
            None => file_len(&self.partial_path(id))?.unwrap_or(0),
        };
        Ok(QueryState {
            committed_offset: offset,
            committed: false,
            rejected: None,
        })
    }

    /// What the receiver holds of `id`.
    pub fn query(&self, id: &ShardId) -> Result<QueryState, ShardError> {
        let _g = self.guard();
        self.query_locked(id)
    }

    /// Appends `data` at `offset` of shard `id` (whose whole size is `total_size`); returns
    /// the new committed offset. The offset must equal the committed offset; sizes are
    /// checked against the limits before anything is written.
    pub fn append(
        &self,
        id: &ShardId,
        offset: u64,
        data: &[u8],
        total_size: u64,
    ) -> Result<u64, ShardError> {
        let too_large = |what, size, limit| ShardError::TooLarge {
            id: id.to_string(),
            what,
            size,
            limit,
        };
        if data.len() as u64 > self.limits.max_chunk_bytes {
            return Err(too_large(
                "chunk",
                data.len() as u64,
                self.limits.max_chunk_bytes,
            ));
        }
        if total_size > self.limits.max_shard_bytes {
            return Err(too_large("shard", total_size, self.limits.max_shard_bytes));
        }
        if offset + data.len() as u64 > total_size {
            return Err(too_large("shard", offset + data.len() as u64, total_size));
        }
        let _g = self.guard();
        let state = self.query_locked(id)?;
        if let Some(reason) = state.rejected {
            return Err(ShardError::Rejected {
                id: id.to_string(),
                reason,
            });
        }
        if state.committed_offset != offset || (state.committed && !data.is_empty()) {
            return Err(ShardError::OffsetMismatch {
                id: id.to_string(),
                offset,
                committed: state.committed_offset,
            });
        }
        if data.is_empty() {
            return Ok(offset);
        }
        let path = self.partial_path(id);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all(data).map_err(io_err(&path))?;
        Ok(offset + data.len() as u64)
    }

    /// Makes the bytes received for `id` durable (called at the end of an upload stream).
    pub fn sync(&self, id: &ShardId) -> Result<(), ShardError> {
        let _g = self.guard();
        let path = self.partial_path(id);
        match std::fs::File::open(&path) {
            Ok(f) => f.sync_all().map_err(io_err(&path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Verifies shard `id` (its sha256 must be the id, its size `size`), moves it into place
    /// and imports its conversations into `store`, each with the flags of the receiver's
    /// gates. Committing a committed shard does nothing and says so. A shard whose bytes do
    /// not verify is discarded; one whose content cannot be imported is quarantined and
    /// answered [`ShardError::Rejected`] (see the module docs).
    pub fn commit(
        &self,
        store: &Store,
        id: &ShardId,
        size: u64,
    ) -> Result<CommitOutcome, ShardError> {
        let _g = self.guard();
        if self.record(id)?.is_some() {
            return Ok(CommitOutcome {
                already_committed: true,
                ..CommitOutcome::default()
            });
        }
        if let Some(reason) = self.rejection(id)? {
            return Err(ShardError::Rejected {
                id: id.to_string(),
                reason,
            });
        }
        let final_path = self.shard_path(id);
        if file_len(&final_path)?.is_none() {
            let partial = self.partial_path(id);
            let bytes = std::fs::read(&partial).map_err(io_err(&partial))?;
            let problem = if bytes.len() as u64 != size {
                Some(format!("received {} bytes, expected {size}", bytes.len()))
            } else if &ShardId::of_bytes(&bytes) != id {
                Some(format!(
                    "received bytes hash to {}",
                    ShardId::of_bytes(&bytes)
                ))
            } else {
                None
            };
            if let Some(message) = problem {
                std::fs::remove_file(&partial).map_err(io_err(&partial))?;
                return Err(ShardError::Checksum {
                    id: id.to_string(),
                    message,
                });
            }
            rename_durable(&partial, &final_path)?;
        }
        let bytes = std::fs::read(&final_path).map_err(io_err(&final_path))?;
        if &ShardId::of_bytes(&bytes) != id {
            std::fs::remove_file(&final_path).map_err(io_err(&final_path))?;
            return Err(ShardError::Checksum {
                id: id.to_string(),
                message: "the stored shard file no longer matches its id".into(),
            });
        }
        let lines = match decode(&bytes, self.limits.max_decoded_bytes) {
            Ok(lines) => lines,
            Err(ShardError::Format { message, .. }) => return Err(self.reject(id, message)?),
            Err(ShardError::TooLarge {
                what, size, limit, ..
            }) => {
                return Err(self.reject(
                    id,
                    format!("{what} of more than {size} bytes exceeds the limit of {limit} bytes"),
                )?)
            }
            Err(other) => return Err(other),
        };
        drop(bytes);
        let mut conversations = Vec::with_capacity(lines.len());
        let mut flags = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            let c = match Conversation::from_json(&line.conversation) {
                Ok(c) => c,
                Err(e) => {
                    return Err(self.reject(id, format!("line {}: not a conversation: {e}", i + 1))?)
                }
            };
            flags.push(
                self.checker
                    .check(&c)
                    .flags()
                    .into_iter()
                    .map(|f| f.name().to_string())
                    .collect::<Vec<_>>(),
            );
            conversations.push(c);
        }
        let inserted = store.insert_batch(lines.iter().zip(&conversations).zip(&flags).map(
            |((l, c), f)| NewConversation {
                conversation: c,
                category: l.category.as_deref(),
                source: l.source.as_deref(),
                flags: f,
            },
        ));
        let outcomes = match inserted {
            Ok(o) => o,
            Err(StoreError::InvalidName { what, name }) => {
                return Err(self.reject(
                    id,
                    format!("invalid {what} name {name:?}: NUL bytes are not allowed"),
                )?)
            }
            Err(e) => return Err(e.into()),
        };
        let imported = outcomes
            .iter()
            .filter(|o| matches!(o, InsertOutcome::Inserted(_)))
            .count() as u64;
        let record = CommitRecord {
            size,
            conversations: lines.len() as u64,
            index: self.tree.len() as u64,
        };
        self.tree
            .insert(
                id.as_str(),
                serde_json::to_vec(&record).expect("commit record serializes"),
            )
            .map_err(|e| self.sled_err(e))?;
        self.tree.flush().map_err(|e| self.sled_err(e))?;
        Ok(CommitOutcome {
            imported,
            duplicates: outcomes.len() as u64 - imported,
            already_committed: false,
        })
    }

    /// Number of committed shards.
    pub fn committed_count(&self) -> u64 {
        self.tree.len() as u64
    }
}

fn file_len(path: &Path) -> Result<Option<u64>, ShardError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}
