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

use crate::fsutil::{io_err, rename_durable};
use crate::{decode, ShardError, ShardId};
use qatflow_core::Conversation;
use qatflow_store::{InsertOutcome, NewConversation, Store};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryState {
    /// Bytes received; the next chunk must start here.
    pub committed_offset: u64,
    /// The shard is committed and imported.
    pub committed: bool,
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
    db_path: PathBuf,
    tree: sled::Tree,
    limits: InboxLimits,
    lock: Arc<Mutex<()>>,
}

impl Inbox {
    /// Opens the inbox of `store` with files under `dir` (created if needed). Stray
    /// temporary files of an interrupted rename are removed.
    pub fn open(store: &Store, dir: &Path, limits: InboxLimits) -> Result<Inbox, ShardError> {
        let partial_dir = dir.join("partial");
        let shard_dir = dir.join("shards");
        for d in [&partial_dir, &shard_dir] {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        let tree = store
            .db()
            .open_tree("shards_in")
            .map_err(|source| ShardError::Sled {
                path: store.path().to_path_buf(),
                source,
            })?;
        Ok(Inbox {
            partial_dir,
            shard_dir,
            db_path: store.path().to_path_buf(),
            tree,
            limits,
            lock: Arc::new(Mutex::new(())),
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
            });
        }
        let offset = match file_len(&self.shard_path(id))? {
            Some(len) => len,
            None => file_len(&self.partial_path(id))?.unwrap_or(0),
        };
        Ok(QueryState {
            committed_offset: offset,
            committed: false,
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
    /// and imports its conversations into `store`. Committing a committed shard does
    /// nothing and says so. A shard whose bytes do not verify is discarded.
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
        let lines = decode(&bytes, self.limits.max_decoded_bytes).map_err(|e| match e {
            ShardError::Format { message, .. } => ShardError::Format {
                id: id.to_string(),
                message,
            },
            other => other,
        })?;
        let mut conversations = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            let c =
                Conversation::from_json(&line.conversation).map_err(|e| ShardError::Format {
                    id: id.to_string(),
                    message: format!("line {}: not a conversation: {e}", i + 1),
                })?;
            conversations.push(c);
        }
        let outcomes =
            store.insert_batch(
                lines
                    .iter()
                    .zip(&conversations)
                    .map(|(l, c)| NewConversation {
                        conversation: c,
                        category: l.category.as_deref(),
                        source: l.source.as_deref(),
                        flags: &[],
                    }),
            )?;
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
