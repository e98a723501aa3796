//! qatflow-store: the sled database that holds datasets.
//!
//! Trees (all keys big-endian so that sled's byte order is numeric order):
//! - `conversations`: content hash (32 bytes) → [`Record`] as JSON;
//! - `by_seq`: import sequence number (u64) → content hash, so exports keep import order;
//! - `idx_category`: `category \0 seq` → content hash;
//! - `idx_flag`: `flag \0 seq` → content hash, one entry per distinct gate flag;
//! - `idx_messages`: hash of the canonical `messages` array → content hash of the first
//!   conversation stored with them; a later conversation with the same messages (it
//!   differs only in other fields, such as its category) is stored with the flag
//!   [`DUPLICATE_MESSAGES`];
//! - `meta`: `schema_version` (u32) and `next_seq` (u64);
//! - `node_jobs`: the node's job records ([`JobRecords`], through [`Store::jobs`]).
//!
//! Other crates keep their own trees in the same database (through [`Store::tree`]), each
//! opened only by its owner: the teacher's batch ledger (`teacher_ledger`,
//! `teacher_pending`, `teacher_plan`, `teacher_raw_rejected`, `teacher_spend`), the shard outbox
//! (`shards_out`, `shards_out_order`, `shards_out_state`; it reads the conversations
//! through [`Store::iter_since`]) and the shard inbox (`shards_in`, `shards_rejected`).
//!
//! Conversations are inserted in sled transactions over all trees ([`BATCH`] at a time),
//! keyed by their content hash, so re-importing the same line is a no-op. [`Store::insert_batch`] flushes before it
//! returns: a caller that is told a write succeeded can rely on it (sled is only durable
//! after `flush`). The schema version is checked at open; a database written by a newer
//! qatflow is refused.

pub mod error;
pub mod jobs;

pub use error::StoreError;
pub use jobs::JobRecords;

use qatflow_core::{Conversation, ConversationId};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The flag of a conversation whose messages equal those of a conversation stored before
/// it (the two differ only outside `messages`).
pub const DUPLICATE_MESSAGES: &str = "duplicate_messages";

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Default database directory, relative to the working directory.
pub const DEFAULT_DB_PATH: &str = "qatflow-data/db";

/// What is stored per conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Import sequence number (import order).
    pub seq: u64,
    /// Category (`topic_switch`, …), if known.
    pub category: Option<String>,
    /// Where it came from (a teacher backend, an imported file).
    pub source: Option<String>,
    /// Distinct gate flags (check names); empty for a clean conversation.
    pub flags: Vec<String>,
    /// Seconds since the Unix epoch at import.
    pub imported_at: u64,
    /// The conversation as one JSON line, unknown fields included.
    pub conversation: String,
}

/// A stored conversation with its id.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredConversation {
    /// Content hash.
    pub id: ConversationId,
    /// The stored record.
    pub record: Record,
}

impl StoredConversation {
    /// Parses the stored conversation.
    pub fn conversation(&self) -> Result<Conversation, serde_json::Error> {
        Conversation::from_json(&self.record.conversation)
    }
}

/// A conversation to insert.
#[derive(Debug, Clone, Copy)]
pub struct NewConversation<'a> {
    /// The conversation.
    pub conversation: &'a Conversation,
    /// Its category.
    pub category: Option<&'a str>,
    /// Its source.
    pub source: Option<&'a str>,
    /// Its gate flags (check names).
    pub flags: &'a [String],
}

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    /// A new conversation was stored.
    Inserted(ConversationId),
    /// The same content was already stored; nothing changed.
    Duplicate(ConversationId),
}

/// Which stored conversations to read.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this category.
    pub category: Option<String>,
    /// Only conversations with no flag.
    pub clean_only: bool,
    /// Only conversations with this flag.
    pub flag: Option<String>,
}

/// Counts per category and flag.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StoreStats {
    /// Stored conversations.
    pub conversations: u64,
    /// Of those, without any flag.
    pub clean: u64,
    /// Per category (`(none)` for uncategorised): (total, clean).
    pub by_category: BTreeMap<String, CategoryCount>,
    /// Conversations per flag.
    pub by_flag: BTreeMap<String, u64>,
}

/// Totals of one category.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CategoryCount {
    /// Stored conversations.
    pub total: u64,
    /// Of those, without any flag.
    pub clean: u64,
}

/// The dataset store; see the module docs.
#[derive(Clone)]
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    conversations: sled::Tree,
    by_seq: sled::Tree,
    idx_category: sled::Tree,
    idx_flag: sled::Tree,
    idx_messages: sled::Tree,
    meta: sled::Tree,
}

/// The trees the store owns; [`Store::tree`] refuses them.
const OWN_TREES: [&str; 7] = [
    "conversations",
    "by_seq",
    "idx_category",
    "idx_flag",
    "idx_messages",
    "meta",
    jobs::TREE,
];

const KEY_SCHEMA: &[u8] = b"schema_version";
const KEY_NEXT_SEQ: &[u8] = b"next_seq";

fn index_key(name: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 9);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Conversations per sled transaction in [`Store::insert_batch`]: one transaction per
/// conversation made imports of shards the bottleneck of shipping.
pub const BATCH: usize = 512;

/// A conversation checked and serialized for insertion.
struct Prepared {
    id: ConversationId,
    messages: ConversationId,
    category: Option<String>,
    source: Option<String>,
    flags: Vec<String>,
    conversation: String,
}

impl Prepared {
    fn new(new: NewConversation<'_>) -> Result<Prepared, StoreError> {
        if let Some(c) = new.category {
            check_name("category", c)?;
        }
        for f in new.flags {
            check_name("flag", f)?;
        }
        let mut flags: Vec<String> = new.flags.to_vec();
        flags.sort();
        flags.dedup();
        let messages =
            serde_json::to_value(&new.conversation.messages).expect("messages always serialize");
        Ok(Prepared {
            id: ConversationId::of(new.conversation),
            messages: ConversationId::of_value(&messages),
            category: new.category.map(str::to_string),
            source: new.source.map(str::to_string),
            flags,
            conversation: new.conversation.to_json(),
        })
    }
}

fn index_prefix(name: &str) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.push(0);
    k
}

fn check_name(what: &'static str, name: &str) -> Result<(), StoreError> {
    if name.contains('\0') {
        return Err(StoreError::InvalidName {
            what,
            name: name.to_string(),
        });
    }
    Ok(())
}

/// How long [`open_db`] waits for a database lock that a just-closed handle may still hold.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Opens (creating if needed) the sled database at `path`, waiting up to 5 s for its
/// file lock. sled releases the lock of a closed database only when its background flusher
/// next wakes (every 500 ms by default), so reopening right after a drop, in this process or
/// in a restarted one, can find the lock still held. A lock held longer than that belongs to
/// another live process and is reported.
pub fn open_db(path: &Path) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new().path(path).open() {
            // sled 0.34 reports the held lock as an `Other` I/O error with this message.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = path.as_ref().to_path_buf();
        let err = |source| StoreError::Sled {
            path: path.clone(),
            source,
        };
        let db = open_db(&path).map_err(err)?;
        let store = Store {
            conversations: db.open_tree("conversations").map_err(err)?,
            by_seq: db.open_tree("by_seq").map_err(err)?,
            idx_category: db.open_tree("idx_category").map_err(err)?,
            idx_flag: db.open_tree("idx_flag").map_err(err)?,
            idx_messages: db.open_tree("idx_messages").map_err(err)?,
            meta: db.open_tree("meta").map_err(err)?,
            db,
            path: path.clone(),
        };
        match store.meta.get(KEY_SCHEMA).map_err(|e| store.sled_err(e))? {
            Some(v) => {
                let found =
                    u32::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                        path: store.path.clone(),
                        id: "meta/schema_version".into(),
                        message: format!("{} bytes, expected 4", v.len()),
                    })?);
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        path: store.path.clone(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
            }
            None => {
                store
                    .meta
                    .insert(KEY_SCHEMA, &SCHEMA_VERSION.to_be_bytes())
                    .map_err(|e| store.sled_err(e))?;
                store.flush()?;
            }
        }
        Ok(store)
    }

    /// Opens (creating if needed) tree `name` of the store's database, for a crate that
    /// keeps its own records beside the store's (the module doc lists every such tree and
    /// its owner). The store's own trees are refused: they are read through its methods.
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        if OWN_TREES.contains(&name) {
            return Err(StoreError::OwnTree {
                name: name.to_string(),
            });
        }
        self.db.open_tree(name).map_err(|e| self.sled_err(e))
    }

    /// The node's job records (tree `node_jobs`).
    pub fn jobs(&self) -> Result<JobRecords, StoreError> {
        JobRecords::open(&self.db, self.path.clone())
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sled_err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|e| self.sled_err(e))
    }

    /// Inserts one conversation without flushing; see [`Store::insert_batch`].
    pub fn insert(&self, new: NewConversation<'_>) -> Result<InsertOutcome, StoreError> {
        let item = Prepared::new(new)?;
        Ok(self.insert_prepared(std::slice::from_ref(&item))?[0])
    }

    /// Inserts conversations in order, up to [`BATCH`] per sled transaction, and flushes
    /// once at the end: when this returns `Ok`, every insert is durable. Every item is
    /// checked (names without NUL bytes) before the first is written, so an invalid item
    /// refuses the whole batch instead of leaving half of it stored. Each transaction is
    /// atomic and an insert of a stored conversation is a no-op, so a batch cut off by a
    /// crash can simply be inserted again.
    pub fn insert_batch<'a>(
        &self,
        items: impl IntoIterator<Item = NewConversation<'a>>,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        let prepared = items
            .into_iter()
            .map(Prepared::new)
            .collect::<Result<Vec<_>, _>>()?;
        let mut outcomes = Vec::with_capacity(prepared.len());
        for chunk in prepared.chunks(BATCH) {
            outcomes.extend(self.insert_prepared(chunk)?);
        }
        self.flush()?;
        Ok(outcomes)
    }

    /// Inserts `items` in one transaction over all trees.
    fn insert_prepared(&self, items: &[Prepared]) -> Result<Vec<InsertOutcome>, StoreError> {
        let imported_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let trees = (
            &self.conversations,
            &self.by_seq,
            &self.idx_category,
            &self.idx_flag,
            &self.idx_messages,
            &self.meta,
        );
        let result = trees.transaction(
            |(convs, by_seq, idx_cat, idx_flag, idx_msg, meta): &(
                TransactionalTree,
                TransactionalTree,
                TransactionalTree,
                TransactionalTree,
                TransactionalTree,
                TransactionalTree,
            )| {
                let first = meta
                    .get(KEY_NEXT_SEQ)?
                    .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
                    .unwrap_or(0);
                let mut seq = first;
                let mut outcomes = Vec::with_capacity(items.len());
                for item in items {
                    // Reads see this transaction's own writes: a repeat within the batch is
                    // a duplicate too.
                    if convs.get(item.id.0)?.is_some() {
                        outcomes.push(InsertOutcome::Duplicate(item.id));
                        continue;
                    }
                    let mut flags = item.flags.clone();
                    match idx_msg.get(item.messages.0)? {
                        Some(first) if first.as_ref() != item.id.0 => {
                            flags.push(DUPLICATE_MESSAGES.to_string());
                            flags.sort();
                            flags.dedup();
                        }
                        Some(_) => {}
                        None => {
                            idx_msg.insert(&item.messages.0, &item.id.0)?;
                        }
                    }
                    let record = Record {
                        seq,
                        category: item.category.clone(),
                        source: item.source.clone(),
                        flags: flags.clone(),
                        imported_at,
                        conversation: item.conversation.clone(),
                    };
                    let bytes = serde_json::to_vec(&record).map_err(|e| {
                        ConflictableTransactionError::Abort((item.id, e.to_string()))
                    })?;
                    convs.insert(&item.id.0, bytes)?;
                    by_seq.insert(&seq.to_be_bytes(), &item.id.0)?;
                    if let Some(cat) = &item.category {
                        idx_cat.insert(index_key(cat, seq), &item.id.0)?;
                    }
                    for f in &flags {
                        idx_flag.insert(index_key(f, seq), &item.id.0)?;
                    }
                    outcomes.push(InsertOutcome::Inserted(item.id));
                    seq += 1;
                }
                if seq != first {
                    meta.insert(KEY_NEXT_SEQ, &seq.to_be_bytes())?;
                }
                Ok(outcomes)
            },
        );
        match result {
            Ok(outcomes) => Ok(outcomes),
            Err(TransactionError::Storage(e)) => Err(self.sled_err(e)),
            Err(TransactionError::Abort((id, message))) => Err(StoreError::Corrupt {
                path: self.path.clone(),
                id: id.to_hex(),
                message,
            }),
        }
    }

    /// The stored conversation with this id.
    pub fn get(&self, id: &ConversationId) -> Result<Option<StoredConversation>, StoreError> {
        match self.conversations.get(id.0).map_err(|e| self.sled_err(e))? {
            Some(bytes) => Ok(Some(self.decode(*id, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Number of stored conversations.
    pub fn len(&self) -> usize {
        self.conversations.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.conversations.is_empty()
    }

    fn decode(&self, id: ConversationId, bytes: &[u8]) -> Result<StoredConversation, StoreError> {
        let record = serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            id: id.to_hex(),
            message: e.to_string(),
        })?;
        Ok(StoredConversation { id, record })
    }

    fn id_from(&self, bytes: &[u8]) -> Result<ConversationId, StoreError> {
        bytes
            .try_into()
            .map(ConversationId)
            .map_err(|_| StoreError::Corrupt {
                path: self.path.clone(),
                id: hex::encode(bytes),
                message: "index entry is not a 32-byte id".into(),
            })
    }

    /// Stored conversations matching `filter`, in import order.
    pub fn iter(
        &self,
        filter: &Filter,
    ) -> impl Iterator<Item = Result<StoredConversation, StoreError>> + '_ {
        let ids: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            match (&filter.category, &filter.flag) {
                (Some(cat), _) => Box::new(self.idx_category.scan_prefix(index_prefix(cat))),
                (None, Some(flag)) => Box::new(self.idx_flag.scan_prefix(index_prefix(flag))),
                (None, None) => Box::new(self.by_seq.iter()),
            };
        let filter = filter.clone();
        ids.filter_map(move |entry| {
            let result = (|| {
                let (_, id_bytes) = entry.map_err(|e| self.sled_err(e))?;
                let id = self.id_from(&id_bytes)?;
                let bytes = self
                    .conversations
                    .get(id.0)
                    .map_err(|e| self.sled_err(e))?
                    .ok_or_else(|| StoreError::Corrupt {
                        path: self.path.clone(),
                        id: id.to_hex(),
                        message: "indexed but not stored".into(),
                    })?;
                self.decode(id, &bytes)
            })();
            match result {
                Ok(s) => {
                    let keep = (!filter.clean_only || s.record.flags.is_empty())
                        && filter
                            .flag
                            .as_ref()
                            .is_none_or(|f| s.record.flags.iter().any(|g| g == f))
                        && filter
                            .category
                            .as_ref()
                            .is_none_or(|c| s.record.category.as_deref() == Some(c.as_str()));
                    keep.then_some(Ok(s))
                }
                Err(e) => Some(Err(e)),
            }
        })
    }

    /// Every stored conversation from import sequence number `seq` on, in import order,
    /// with its sequence number: the feed of the shard outbox, which resumes where it left.
    pub fn iter_since(
        &self,
        seq: u64,
    ) -> impl Iterator<Item = Result<(u64, StoredConversation), StoreError>> + '_ {
        let corrupt = move |id: String, message: &str| StoreError::Corrupt {
            path: self.path.clone(),
            id,
            message: message.into(),
        };
        self.by_seq.range(seq.to_be_bytes()..).map(move |entry| {
            let (k, v) = entry.map_err(|e| self.sled_err(e))?;
            let seq = k
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| corrupt("by_seq".into(), "key is not a big-endian u64"))?;
            let id = self.id_from(&v)?;
            let stored = self
                .get(&id)?
                .ok_or_else(|| corrupt(id.to_hex(), "indexed but not stored"))?;
            Ok((seq, stored))
        })
    }

    /// Counts per category and flag.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut stats = StoreStats::default();
        for item in self.iter(&Filter::default()) {
            let s = item?;
            let clean = s.record.flags.is_empty();
            stats.conversations += 1;
            stats.clean += u64::from(clean);
            let cat = s.record.category.clone().unwrap_or_else(|| "(none)".into());
            let entry = stats.by_category.entry(cat).or_default();
            entry.total += 1;
            entry.clean += u64::from(clean);
            for f in &s.record.flags {
                *stats.by_flag.entry(f.clone()).or_default() += 1;
            }
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(text: &str) -> Conversation {
        Conversation::from_json(&format!(
            r#"{{"messages":[{{"role":"user","content":{text:?}}},{{"role":"assistant","content":"ok"}}],"x_extra":[1,2]}}"#
        ))
        .unwrap()
    }

    fn new<'a>(c: &'a Conversation, cat: &'a str, flags: &'a [String]) -> NewConversation<'a> {
        NewConversation {
            conversation: c,
            category: Some(cat),
            source: Some("test"),
            flags,
        }
    }

    #[test]
    fn reopening_right_after_closing_waits_for_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        for _ in 0..20 {
            let store = Store::open(&path).unwrap();
            drop(store);
        }
        // A lock held by a live handle is still reported, after the wait.
        let held = Store::open(&path).unwrap();
        let started = Instant::now();
        let err = match Store::open(&path) {
            Ok(_) => panic!("a second handle opened a database that is in use"),
            Err(e) => e.to_string(),
        };
        assert!(started.elapsed() >= LOCK_WAIT, "{:?}", started.elapsed());
        assert!(
            err.contains("is another qatflow process using it?"),
            "{err}"
        );
        drop(held);
    }

    #[test]
    fn other_crates_get_their_own_trees_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("db")).unwrap();
        for own in OWN_TREES {
            assert!(
                matches!(store.tree(own), Err(StoreError::OwnTree { .. })),
                "{own}"
            );
        }
        store.tree("shards_in").unwrap();
        let jobs = store.jobs().unwrap();
        jobs.set("train", Some(b"running")).unwrap();
        assert_eq!(jobs.text("train").as_deref(), Some("running"));
        jobs.set("train", None).unwrap();
        assert_eq!(jobs.get("train").unwrap(), None);
    }

    #[test]
    fn reimport_is_a_noop_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = conv("a");
        let b = conv("b");
        {
            let store = Store::open(dir.path()).unwrap();
            let out = store
                .insert_batch([new(&a, "x", &[]), new(&b, "y", &[])])
                .unwrap();
            assert!(matches!(out[0], InsertOutcome::Inserted(_)));
            let again = store.insert_batch([new(&a, "x", &[])]).unwrap();
            assert_eq!(again[0], InsertOutcome::Duplicate(ConversationId::of(&a)));
            assert_eq!(store.len(), 2);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.len(), 2);
        // Same content, different key order and whitespace: still a duplicate.
        let a2 = Conversation::from_json(
            r#"{"x_extra": [1, 2], "messages": [{"content": "a", "role": "user"}, {"role": "assistant", "content": "ok"}]}"#,
        )
        .unwrap();
        assert!(matches!(
            store.insert(new(&a2, "x", &[])).unwrap(),
            InsertOutcome::Duplicate(_)
        ));
        let got = store.get(&ConversationId::of(&a)).unwrap().unwrap();
        assert_eq!(got.conversation().unwrap(), a);
        assert_eq!(got.record.seq, 0);
        assert_eq!(got.record.source.as_deref(), Some("test"));
    }

    #[test]
    fn batches_span_transactions_and_repeats_within_one_are_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let n = BATCH + BATCH / 2;
        let convs: Vec<Conversation> = (0..n).map(|i| conv(&format!("c{i}"))).collect();
        let flagged = vec!["markdown".to_string()];
        // Every conversation twice, the repeat right after the first: within one
        // transaction, and across a transaction boundary at BATCH.
        let items = convs
            .iter()
            .flat_map(|c| [new(c, "x", &flagged), new(c, "x", &flagged)]);
        let out = store.insert_batch(items).unwrap();
        assert_eq!(out.len(), 2 * n);
        for (i, pair) in out.chunks(2).enumerate() {
            let id = ConversationId::of(&convs[i]);
            assert_eq!(
                pair,
                [InsertOutcome::Inserted(id), InsertOutcome::Duplicate(id)]
            );
        }
        assert_eq!(store.len(), n);
        // Sequence numbers are dense and in input order across transactions.
        for (i, c) in convs.iter().enumerate() {
            let got = store.get(&ConversationId::of(c)).unwrap().unwrap();
            assert_eq!(got.record.seq, i as u64);
        }
        let stats = store.stats().unwrap();
        assert_eq!(stats.conversations, n as u64);
        // The whole batch again is a no-op.
        let again = store
            .insert_batch(convs.iter().map(|c| new(c, "x", &[])))
            .unwrap();
        assert!(again
            .iter()
            .all(|o| matches!(o, InsertOutcome::Duplicate(_))));
        assert_eq!(store.len(), n);
        let d = conv("after");
        store.insert(new(&d, "x", &[])).unwrap();
        let got = store.get(&ConversationId::of(&d)).unwrap().unwrap();
        assert_eq!(
            got.record.seq, n as u64,
            "next_seq continues after the batches"
        );
    }

    #[test]
    fn filters_and_stats_follow_the_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let md = ["markdown".to_string(), "verbose".to_string()];
        let convs: Vec<Conversation> = (0..6).map(|i| conv(&format!("m{i}"))).collect();
        let items = convs.iter().enumerate().map(|(i, c)| {
            new(
                c,
                if i % 2 == 0 { "even" } else { "odd" },
                if i % 3 == 0 { &md[..] } else { &[] },
            )
        });
        store.insert_batch(items).unwrap();
        let texts = |f: Filter| -> Vec<String> {
            store
                .iter(&f)
                .map(|s| {
                    s.unwrap().conversation().unwrap().messages[0]
                        .content_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        assert_eq!(
            texts(Filter::default()),
            ["m0", "m1", "m2", "m3", "m4", "m5"]
        );
        assert_eq!(
            texts(Filter {
                category: Some("even".into()),
                ..Default::default()
            }),
            ["m0", "m2", "m4"]
        );
        assert_eq!(
            texts(Filter {
                category: Some("even".into()),
                clean_only: true,
                ..Default::default()
            }),
            ["m2", "m4"]
        );
        assert_eq!(
            texts(Filter {
                flag: Some("verbose".into()),
                ..Default::default()
            }),
            ["m0", "m3"]
        );
        assert_eq!(
            texts(Filter {
                category: Some("ev".into()),
                ..Default::default()
            }),
            Vec::<String>::new()
        );
        let stats = store.stats().unwrap();
        assert_eq!(stats.conversations, 6);
        assert_eq!(stats.clean, 4);
        assert_eq!(
            stats.by_category["even"],
            CategoryCount { total: 3, clean: 2 }
        );
        assert_eq!(stats.by_flag["markdown"], 2);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .meta
                .insert(KEY_SCHEMA, &(SCHEMA_VERSION + 1).to_be_bytes())
                .unwrap();
            store.flush().unwrap();
        }
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("schema version 2 is newer"), "{err}");
    }

    #[test]
    fn identical_messages_under_other_metadata_are_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = conv("same");
        let mut b = a.clone();
        b.extra
            .insert("category".into(), serde_json::Value::String("other".into()));
        assert_ne!(ConversationId::of(&a), ConversationId::of(&b));
        let out = store
            .insert_batch([new(&a, "x", &[]), new(&b, "y", &[])])
            .unwrap();
        assert!(out.iter().all(|o| matches!(o, InsertOutcome::Inserted(_))));
        let first = store.get(&ConversationId::of(&a)).unwrap().unwrap();
        let second = store.get(&ConversationId::of(&b)).unwrap().unwrap();
        assert!(first.record.flags.is_empty());
        assert_eq!(second.record.flags, [DUPLICATE_MESSAGES]);
        assert_eq!(store.stats().unwrap().by_flag[DUPLICATE_MESSAGES], 1);
    }

    #[test]
    fn an_invalid_item_refuses_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let convs: Vec<Conversation> = (0..BATCH + 10).map(|i| conv(&format!("n{i}"))).collect();
        let items = convs
            .iter()
            .enumerate()
            .map(|(i, c)| new(c, if i == BATCH + 5 { "bad\0cat" } else { "ok" }, &[]));
        assert!(matches!(
            store.insert_batch(items),
            Err(StoreError::InvalidName { .. })
        ));
        assert_eq!(store.len(), 0, "nothing of a refused batch is stored");
    }

    #[test]
    fn nul_in_names_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = conv("z");
        assert!(matches!(
            store.insert(new(&c, "a\0b", &[])),
            Err(StoreError::InvalidName { .. })
        ));
    }
}
