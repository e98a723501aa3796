//! The sending side: sealing accepted conversations into shard files and remembering which
//! ones the receiver has committed.
//!
//! Trees in the store's database: `shards_out` (shard id → [`ShardMeta`] as JSON),
//! `shards_out_order` (seal index, big-endian u64 → shard id) and `shards_out_state`
//! (`next_seq`: the first store sequence number not yet sealed; `next_index`). A shard is
//! written durably first and recorded in one transaction with the cursor after, then
//! flushed: a crash in between leaves an unrecorded file that the next seal rewrites with
//! the same content (sealing is deterministic), never a record without a file.

use crate::fsutil::{io_err, write_durable};
use crate::{encode, ShardError, ShardId, ShardLine};
use qatflow_store::Store;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use std::path::{Path, PathBuf};

const KEY_NEXT_SEQ: &[u8] = b"next_seq";
const KEY_NEXT_INDEX: &[u8] = b"next_index";

/// When a shard is sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealLimits {
    /// At most this many conversations per shard.
    pub max_conversations: usize,
    /// At most about this many bytes of uncompressed JSONL per shard (a single larger
    /// conversation still makes a shard of its own).
    pub max_bytes: usize,
}

impl Default for SealLimits {
    /// 500 conversations or 8 MiB.
    fn default() -> SealLimits {
        SealLimits {
            max_conversations: 500,
            max_bytes: 8 << 20,
        }
    }
}

/// A sealed shard as the outbox records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMeta {
    /// Content address (sha256 of the file).
    pub id: ShardId,
    /// Seal order, from 0.
    pub index: u64,
    /// File size in bytes.
    pub size: u64,
    /// Conversations in the shard.
    pub conversations: u64,
    /// Store sequence number of its first conversation.
    pub first_seq: u64,
    /// Store sequence number of its last conversation.
    pub last_seq: u64,
    /// The receiver committed it.
    pub shipped: bool,
    /// The receiver rejected its content for good (its reason); it is not shipped again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

/// The sending side's shard ledger and directory; see the module docs.
#[derive(Clone)]
pub struct Outbox {
    dir: PathBuf,
    db_path: PathBuf,
    shards: sled::Tree,
    order: sled::Tree,
    state: sled::Tree,
}

fn be_u64(v: &[u8]) -> Option<u64> {
    v.try_into().ok().map(u64::from_be_bytes)
}

impl Outbox {
    /// Opens the outbox of `store`, keeping shard files in `dir` (created if needed), and
    /// checks that every unshipped shard's file is present and matches its digest.
    pub fn open(store: &Store, dir: &Path) -> Result<Outbox, ShardError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let outbox = Outbox {
            dir: dir.to_path_buf(),
            db_path: store.path().to_path_buf(),
            shards: store.tree("shards_out")?,
            order: store.tree("shards_out_order")?,
            state: store.tree("shards_out_state")?,
        };
        for meta in outbox.pending()? {
            let bytes = outbox.read(&meta)?;
            if ShardId::of_bytes(&bytes) != meta.id {
                return Err(ShardError::SealedFileBad {
                    id: meta.id.to_string(),
                    path: outbox.path_of(&meta.id),
                    message: "its sha256 differs from the recorded one".into(),
                });
            }
        }
        Ok(outbox)
    }

    fn sled_err(&self, source: sled::Error) -> ShardError {
        ShardError::Sled {
            path: self.db_path.clone(),
            source,
        }
    }

    fn corrupt(&self, key: &str, message: impl Into<String>) -> ShardError {
        ShardError::Corrupt {
            path: self.db_path.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn counter(&self, key: &[u8]) -> Result<u64, ShardError> {
        match self.state.get(key).map_err(|e| self.sled_err(e))? {
            Some(v) => be_u64(&v)
                .ok_or_else(|| self.corrupt(&String::from_utf8_lossy(key), "not a big-endian u64")),
            None => Ok(0),
        }
    }

    /// Where a sealed shard's file lives.
    pub fn path_of(&self, id: &ShardId) -> PathBuf {
        self.dir.join(id.file_name())
    }

    /// A sealed shard's bytes.
    pub fn read(&self, meta: &ShardMeta) -> Result<Vec<u8>, ShardError> {
        let path = self.path_of(&meta.id);
        std::fs::read(&path).map_err(|e| ShardError::SealedFileBad {
            id: meta.id.to_string(),
            path: path.clone(),
            message: e.to_string(),
        })
    }

    /// Seals the accepted (unflagged) conversations stored since the last seal into shards
    /// of at most `limits`. A last, smaller shard is sealed only when `flush_partial` is
    /// set (generation finished or idle). Returns the new shards in order; each is durable
    /// and recorded when this returns.
    pub fn seal(
        &self,
        store: &Store,
        limits: &SealLimits,
        flush_partial: bool,
    ) -> Result<Vec<ShardMeta>, ShardError> {
        let mut sealed = Vec::new();
        let mut lines: Vec<ShardLine> = Vec::new();
        let mut bytes = 0usize;
        let mut first_seq = 0u64;
        let mut scanned_to = 0u64;
        let start = self.counter(KEY_NEXT_SEQ)?;
        for entry in store.iter_since(start) {
            let (seq, stored) = entry?;
            scanned_to = seq;
            if !stored.record.flags.is_empty() {
                continue;
            }
            if lines.is_empty() {
                first_seq = seq;
            }
            bytes += stored.record.conversation.len() + 64;
            lines.push(ShardLine {
                category: stored.record.category,
                source: stored.record.source,
                conversation: stored.record.conversation,
            });
            if lines.len() >= limits.max_conversations.max(1) || bytes >= limits.max_bytes {
                sealed.push(self.write_shard(&lines, first_seq, seq)?);
                lines.clear();
                bytes = 0;
            }
        }
        if flush_partial && !lines.is_empty() {
            sealed.push(self.write_shard(&lines, first_seq, scanned_to)?);
        }
        Ok(sealed)
    }

    fn write_shard(
        &self,
        lines: &[ShardLine],
        first_seq: u64,
        last_seq: u64,
    ) -> Result<ShardMeta, ShardError> {
        let bytes = encode(lines)?;
        let id = ShardId::of_bytes(&bytes);
        write_durable(&self.path_of(&id), &bytes)?;
        let index = self.counter(KEY_NEXT_INDEX)?;
        let meta = ShardMeta {
            id: id.clone(),
            index,
            size: bytes.len() as u64,
            conversations: lines.len() as u64,
            first_seq,
            last_seq,
            shipped: false,
            rejected: None,
        };
        let json = serde_json::to_vec(&meta).expect("shard meta serializes");
        (&self.shards, &self.order, &self.state)
            .transaction(|(shards, order, state)| {
                shards.insert(id.as_str().as_bytes(), json.as_slice())?;
                order.insert(&index.to_be_bytes(), id.as_str().as_bytes())?;
                state.insert(KEY_NEXT_SEQ, &(last_seq + 1).to_be_bytes())?;
                state.insert(KEY_NEXT_INDEX, &(index + 1).to_be_bytes())?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => self.sled_err(e),
                TransactionError::Abort(()) => unreachable!("the transaction never aborts"),
            })?;
        self.shards.flush().map_err(|e| self.sled_err(e))?;
        Ok(meta)
    }

    /// Every sealed shard, in seal order.
    pub fn all(&self) -> Result<Vec<ShardMeta>, ShardError> {
        let mut out = Vec::new();
        for entry in self.order.iter() {
            let (_, id) = entry.map_err(|e| self.sled_err(e))?;
            let key = String::from_utf8_lossy(&id).into_owned();
            let bytes = self
                .shards
                .get(&id)
                .map_err(|e| self.sled_err(e))?
                .ok_or_else(|| self.corrupt(&key, "ordered but not recorded"))?;
            out.push(
                serde_json::from_slice(&bytes).map_err(|e| self.corrupt(&key, e.to_string()))?,
            );
        }
        Ok(out)
    }

    /// Sealed shards the receiver has neither committed nor rejected yet, in seal order.
    pub fn pending(&self) -> Result<Vec<ShardMeta>, ShardError> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|m| !m.shipped && m.rejected.is_none())
            .collect())
    }

    /// Sealed shards the receiver rejected, in seal order.
    pub fn rejected(&self) -> Result<Vec<ShardMeta>, ShardError> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|m| m.rejected.is_some())
            .collect())
    }

    /// Records that the receiver committed a shard (durable when this returns).
    pub fn mark_shipped(&self, id: &ShardId) -> Result<(), ShardError> {
        self.update(id, |meta| meta.shipped = true)
    }

    /// Records that the receiver rejected a shard's content for good, and why (durable
    /// when this returns); it leaves the pending shards.
    pub fn mark_rejected(&self, id: &ShardId, reason: &str) -> Result<(), ShardError> {
        self.update(id, |meta| meta.rejected = Some(reason.to_string()))
    }

    fn update(&self, id: &ShardId, change: impl FnOnce(&mut ShardMeta)) -> Result<(), ShardError> {
        let key = id.as_str().as_bytes();
        let bytes = self
            .shards
            .get(key)
            .map_err(|e| self.sled_err(e))?
            .ok_or_else(|| self.corrupt(id.as_str(), "not a sealed shard"))?;
        let mut meta: ShardMeta =
            serde_json::from_slice(&bytes).map_err(|e| self.corrupt(id.as_str(), e.to_string()))?;
        change(&mut meta);
        self.shards
            .insert(
                key,
                serde_json::to_vec(&meta).expect("shard meta serializes"),
            )
            .map_err(|e| self.sled_err(e))?;
        self.shards.flush().map_err(|e| self.sled_err(e))?;
        Ok(())
    }

    /// `(sealed, shipped)` shard counts.
    pub fn counts(&self) -> Result<(u64, u64), ShardError> {
        let all = self.all()?;
        let shipped = all.iter().filter(|m| m.shipped).count() as u64;
        Ok((all.len() as u64, shipped))
    }
}
