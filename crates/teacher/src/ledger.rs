//! The batch ledger: which batches of which category are finished, kept in sled trees of
//! the store's own database, so `resume` generates exactly the missing batches.
//!
//! Trees (keys: `category \0 index` with the index as big-endian u64):
//! - `teacher_ledger`: finished batches → [`LedgerEntry`];
//! - `teacher_pending`: batches being committed → [`PendingBatch`] (a write-ahead record);
//! - `teacher_plan`: category → the batch size its indexes were computed with;
//! - `teacher_spend`: `total` → the [`Usage`] of every teacher request ever made for this
//!   store (requests, tokens, cost), added after each batch;
//! - `teacher_raw_rejected`: `category \0 index \0 line` → [`RawRejected`]: output lines
//!   that did not parse (`invalid_json`), kept verbatim with their batch, written in the
//!   same transaction as the batch's ledger entry, so nothing a teacher wrote is lost.
//!
//! Committing a batch: (1) its conversations and flags are written to `teacher_pending`
//! and flushed; (2) they are inserted into the store, which flushes; (3) the ledger entry
//! is written and the pending record removed in one transaction, and flushed. A crash
//! after (1) leaves a pending record that [`Ledger::recover`] replays at the next start
//! (inserts are idempotent: conversations are keyed by content hash), so a batch is
//! either finished with all its conversations stored or not finished at all, whatever the
//! backend: nothing is generated twice and nothing is lost.

use crate::backend::Usage;
use crate::error::TeacherError;
use qatflow_core::Conversation;
use qatflow_store::{NewConversation, Store};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// Counts of one finished batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Conversations stored without flags.
    pub accepted: u64,
    /// Conversations stored with flags.
    pub rejected: u64,
    /// Conversations that were already stored (same content).
    pub duplicates: u64,
    /// Output lines that did not parse.
    pub unparsed_lines: u64,
    /// Attempts it took.
    pub attempts: u32,
    /// The store `source` of its conversations.
    pub source: String,
    /// Seconds since the Unix epoch when it finished.
    pub finished_at: u64,
}

/// A teacher output line that did not parse, kept as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawRejected {
    /// Its category.
    #[serde(default)]
    pub category: String,
    /// Its batch index.
    #[serde(default)]
    pub batch: u64,
    /// 1-based line number in the batch's output.
    pub line: usize,
    /// Always `invalid_json`.
    pub check: String,
    /// The parse error.
    pub error: String,
    /// The line, verbatim.
    pub text: String,
    /// The batch's store `source` (`backend:category/index`).
    #[serde(default)]
    pub source: String,
}

/// One conversation of a pending batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingItem {
    /// The conversation as one JSON line.
    pub conversation: String,
    /// Its gate flags.
    pub flags: Vec<String>,
}

/// A batch whose commit has started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingBatch {
    /// Its category.
    pub category: String,
    /// The ledger entry it will get.
    pub entry: LedgerEntry,
    /// Its conversations.
    pub items: Vec<PendingItem>,
    /// Its output lines that did not parse.
    #[serde(default)]
    pub raw_rejected: Vec<RawRejected>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Plan {
    per_batch: u64,
}

/// The ledger trees; see the module docs.
#[derive(Clone)]
pub struct Ledger {
    path: PathBuf,
    done: sled::Tree,
    pending: sled::Tree,
    plan: sled::Tree,
    raw: sled::Tree,
    spend: sled::Tree,
}

const SPEND_KEY: &[u8] = b"total";

/// The ledger key of a batch.
pub fn batch_key(category: &str, index: u64) -> Vec<u8> {
    let mut k = category.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn prefix(category: &str) -> Vec<u8> {
    let mut k = category.as_bytes().to_vec();
    k.push(0);
    k
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Ledger {
    /// Opens the ledger trees in the store's database.
    pub fn open(store: &Store) -> Result<Ledger, TeacherError> {
        let path = store.path().to_path_buf();
        let open = |name: &str| {
            store.tree(name).map_err(|e| TeacherError::Ledger {
                path: path.clone(),
                message: format!("cannot open tree {name}: {e}"),
            })
        };
        Ok(Ledger {
            done: open("teacher_ledger")?,
            pending: open("teacher_pending")?,
            plan: open("teacher_plan")?,
            raw: open("teacher_raw_rejected")?,
            spend: open("teacher_spend")?,
            path,
        })
    }

    fn err(&self, message: impl std::fmt::Display) -> TeacherError {
        TeacherError::Ledger {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    fn flush(&self) -> Result<(), TeacherError> {
        // Flushing one tree flushes the whole database.
        self.done
            .flush()
            .map(|_| ())
            .map_err(|e| self.err(format!("flush failed: {e}")))
    }

    /// The finished batch indexes of a category, ascending.
    pub fn finished(&self, category: &str) -> Result<Vec<u64>, TeacherError> {
        let mut out = Vec::new();
        for item in self.done.scan_prefix(prefix(category)) {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let idx: [u8; 8] = k[k.len() - 8..]
                .try_into()
                .map_err(|_| self.err("a ledger key is too short"))?;
            out.push(u64::from_be_bytes(idx));
        }
        Ok(out)
    }

    /// The entry of a finished batch.
    pub fn entry(&self, category: &str, index: u64) -> Result<Option<LedgerEntry>, TeacherError> {
        match self
            .done
            .get(batch_key(category, index))
            .map_err(|e| self.err(e))?
        {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| self.err(format!("entry {category}/{index} is corrupt: {e}"))),
            None => Ok(None),
        }
    }

    /// What every run so far spent (zero when nothing was recorded).
    pub fn spend(&self) -> Result<Usage, TeacherError> {
        match self.spend.get(SPEND_KEY).map_err(|e| self.err(e))? {
            Some(v) => serde_json::from_slice(&v)
                .map_err(|e| self.err(format!("the spend record is corrupt: {e}"))),
            None => Ok(Usage::default()),
        }
    }

    /// Adds `usage` to the recorded spend (flushed); returns the new total.
    pub fn add_spend(&self, usage: &Usage) -> Result<Usage, TeacherError> {
        let mut total = self.spend()?;
        total.add(usage);
        self.spend
            .insert(
                SPEND_KEY,
                serde_json::to_vec(&total).expect("usage serializes"),
            )
            .map_err(|e| self.err(e))?;
        self.flush()?;
        Ok(total)
    }

    /// Every teacher output line that did not parse, by category, batch and line.
    pub fn raw_rejected(&self) -> Result<Vec<RawRejected>, TeacherError> {
        self.raw
            .iter()
            .map(|item| {
                let (_, v) = item.map_err(|e| self.err(e))?;
                serde_json::from_slice(&v)
                    .map_err(|e| self.err(format!("a raw rejected line is corrupt: {e}")))
            })
            .collect()
    }

    /// The batch size a category's ledger was written with, if any.
    pub fn plan(&self, category: &str) -> Result<Option<u64>, TeacherError> {
        match self.plan.get(category).map_err(|e| self.err(e))? {
            Some(v) => serde_json::from_slice::<Plan>(&v)
                .map(|p| Some(p.per_batch))
                .map_err(|e| self.err(format!("plan of {category} is corrupt: {e}"))),
            None => Ok(None),
        }
    }

    /// Records the batch size of a category (flushed).
    pub fn set_plan(&self, category: &str, per_batch: u64) -> Result<(), TeacherError> {
        let v = serde_json::to_vec(&Plan { per_batch }).expect("a plan serializes");
        self.plan.insert(category, v).map_err(|e| self.err(e))?;
        self.flush()
    }

    /// Commits a batch as the module docs describe; returns the entry with its duplicate
    /// count filled in.
    pub fn commit(
        &self,
        store: &Store,
        index: u64,
        mut batch: PendingBatch,
    ) -> Result<LedgerEntry, TeacherError> {
        let key = batch_key(&batch.category, index);
        batch.entry.finished_at = now();
        let bytes = serde_json::to_vec(&batch).expect("a pending batch serializes");
        self.pending
            .insert(key.clone(), bytes)
            .map_err(|e| self.err(e))?;
        self.flush()?;
        let duplicates = insert_items(store, &batch)?;
        batch.entry.duplicates = duplicates;
        self.finish(&key, index, &batch)?;
        Ok(batch.entry)
    }

    fn finish(&self, key: &[u8], index: u64, batch: &PendingBatch) -> Result<(), TeacherError> {
        let bytes = serde_json::to_vec(&batch.entry).expect("an entry serializes");
        let raw: Vec<(Vec<u8>, Vec<u8>)> = batch
            .raw_rejected
            .iter()
            .map(|r| {
                let mut k = key.to_vec();
                k.push(0);
                k.extend_from_slice(&(r.line as u64).to_be_bytes());
                let record = RawRejected {
                    category: batch.category.clone(),
                    batch: index,
                    check: "invalid_json".into(),
                    source: batch.entry.source.clone(),
                    ..r.clone()
                };
                (
                    k,
                    serde_json::to_vec(&record).expect("a raw line serializes"),
                )
            })
            .collect();
        (&self.done, &self.pending, &self.raw)
            .transaction(|(done, pending, raw_tree)| {
                done.insert(key, bytes.clone())?;
                pending.remove(key)?;
                for (k, v) in &raw {
                    raw_tree.insert(k.as_slice(), v.as_slice())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e: TransactionError<()>| self.err(format!("transaction failed: {e:?}")))?;
        self.flush()
    }

    /// Finishes every batch whose commit was cut off; returns their keys as
    /// `(category, index)`.
    pub fn recover(&self, store: &Store) -> Result<Vec<(String, u64)>, TeacherError> {
        let mut out = Vec::new();
        let pending: Vec<_> = self
            .pending
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))?;
        for (key, bytes) in pending {
            let batch: PendingBatch = serde_json::from_slice(&bytes)
                .map_err(|e| self.err(format!("a pending batch is corrupt: {e}")))?;
            insert_items(store, &batch)?;
            let idx: [u8; 8] = key[key.len() - 8..]
                .try_into()
                .map_err(|_| self.err("a pending key is too short"))?;
            let index = u64::from_be_bytes(idx);
            self.finish(&key, index, &batch)?;
            out.push((batch.category, index));
        }
        Ok(out)
    }
}

/// Inserts a batch's conversations (flushed); returns how many were already stored.
fn insert_items(store: &Store, batch: &PendingBatch) -> Result<u64, TeacherError> {
    let parsed: Vec<Conversation> = batch
        .items
        .iter()
        .map(|i| {
            Conversation::from_json(&i.conversation).map_err(|e| TeacherError::Ledger {
                path: store.path().to_path_buf(),
                message: format!("a pending conversation is corrupt: {e}"),
            })
        })
        .collect::<Result<_, _>>()?;
    let outcomes =
        store.insert_batch(
            parsed
                .iter()
                .zip(&batch.items)
                .map(|(c, i)| NewConversation {
                    conversation: c,
                    category: Some(&batch.category),
                    source: Some(&batch.entry.source),
                    flags: &i.flags,
                }),
        )?;
    Ok(outcomes
        .iter()
        .filter(|o| matches!(o, qatflow_store::InsertOutcome::Duplicate(_)))
        .count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qatflow_store::Filter;

    fn batch(tag: &str, n: usize) -> PendingBatch {
        PendingBatch {
            category: "c".into(),
            entry: LedgerEntry {
                accepted: n as u64,
                source: "test:c/0".into(),
                ..LedgerEntry::default()
            },
            items: (0..n)
                .map(|i| PendingItem {
                    conversation: format!(
                        r#"{{"messages":[{{"role":"user","content":"{tag}{i}"}}]}}"#
                    ),
                    flags: vec![],
                })
                .collect(),
            raw_rejected: Vec::new(),
        }
    }

    #[test]
    fn a_commit_cut_off_after_its_write_ahead_record_is_finished_on_recovery() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let ledger = Ledger::open(&store).unwrap();
            // Step (1) of a commit, then a crash: the record is durable, nothing else.
            let key = batch_key("c", 4);
            ledger
                .pending
                .insert(key, serde_json::to_vec(&batch("a", 3)).unwrap())
                .unwrap();
            ledger.flush().unwrap();
            // And a batch whose conversations were partly inserted before the crash.
            let half = batch("b", 2);
            insert_items(
                &store,
                &PendingBatch {
                    items: half.items[..1].to_vec(),
                    ..half.clone()
                },
            )
            .unwrap();
            ledger
                .pending
                .insert(batch_key("c", 5), serde_json::to_vec(&half).unwrap())
                .unwrap();
            ledger.flush().unwrap();
            assert_eq!(ledger.finished("c").unwrap(), Vec::<u64>::new());
        }
        let store = Store::open(dir.path()).unwrap();
        let ledger = Ledger::open(&store).unwrap();
        let recovered = ledger.recover(&store).unwrap();
        assert_eq!(recovered, [("c".to_string(), 4), ("c".to_string(), 5)]);
        assert_eq!(ledger.finished("c").unwrap(), [4, 5]);
        assert_eq!(ledger.entry("c", 4).unwrap().unwrap().accepted, 3);
        assert_eq!(store.len(), 5);
        assert!(ledger.pending.is_empty());
        assert!(ledger.recover(&store).unwrap().is_empty());
        let sources: Vec<String> = store
            .iter(&Filter::default())
            .map(|s| s.unwrap().record.source.unwrap())
            .collect();
        assert!(sources.iter().all(|s| s == "test:c/0"));
    }

    #[test]
    fn commit_stores_then_records_and_counts_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ledger = Ledger::open(&store).unwrap();
        let e = ledger.commit(&store, 0, batch("x", 2)).unwrap();
        assert_eq!((e.accepted, e.duplicates), (2, 0));
        assert!(e.finished_at > 0);
        let e = ledger.commit(&store, 1, batch("x", 3)).unwrap();
        assert_eq!(e.duplicates, 2);
        assert_eq!(ledger.finished("c").unwrap(), [0, 1]);
        assert_eq!(store.len(), 3);
        let mut with_bad = batch("y", 1);
        with_bad.raw_rejected.push(RawRejected {
            category: String::new(),
            batch: 0,
            line: 3,
            check: String::new(),
            error: "EOF while parsing".into(),
            text: r#"{"messages":[{"role":"user","#.into(),
            source: String::new(),
        });
        ledger.commit(&store, 2, with_bad).unwrap();
        let raw = ledger.raw_rejected().unwrap();
        assert_eq!(raw.len(), 1);
        assert_eq!(
            (raw[0].category.as_str(), raw[0].batch, raw[0].line),
            ("c", 2, 3)
        );
        assert_eq!(raw[0].check, "invalid_json");
        assert_eq!(raw[0].text, r#"{"messages":[{"role":"user","#);
        assert_eq!(raw[0].source, "test:c/0");
        let one = Usage {
            requests: 2,
            input_tokens: 10,
            output_tokens: 5,
            cost_usd: None,
        };
        ledger.add_spend(&one).unwrap();
        assert_eq!(ledger.add_spend(&one).unwrap().requests, 4);
        assert_eq!(ledger.spend().unwrap().output_tokens, 10);
        ledger.set_plan("c", 7).unwrap();
        assert_eq!(ledger.plan("c").unwrap(), Some(7));
        assert_eq!(ledger.plan("d").unwrap(), None);
    }
}
