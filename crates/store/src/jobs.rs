//! [`JobRecords`]: the node's durable job records in the store's database (tree
//! `node_jobs`): small values by key (`train`, `export`: a job's recorded intent; `serve`,
//! `serving_state`: the serving supervisor's process and model records), every write
//! flushed before it returns, so a node restarted after `kill -9` finds what it recorded.

use std::path::PathBuf;

use crate::error::StoreError;

/// The tree's name.
pub(crate) const TREE: &str = "node_jobs";

/// The node's job records; cheap to clone.
#[derive(Clone)]
pub struct JobRecords {
    tree: sled::Tree,
    path: PathBuf,
}

impl JobRecords {
    pub(crate) fn open(db: &sled::Db, path: PathBuf) -> Result<JobRecords, StoreError> {
        let tree = db.open_tree(TREE).map_err(|source| StoreError::Sled {
            path: path.clone(),
            source,
        })?;
        Ok(JobRecords { tree, path })
    }

    fn err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    /// The value recorded under `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree
            .get(key.as_bytes())
            .map_err(|e| self.err(e))?
            .map(|v| v.to_vec()))
    }

    /// The value under `key` as text (lossy UTF-8), if any; `None` also when it cannot be
    /// read.
    pub fn text(&self, key: &str) -> Option<String> {
        let v = self.get(key).ok()??;
        Some(String::from_utf8_lossy(&v).into_owned())
    }

    /// Records `value` under `key` durably (or removes the key with `None`).
    pub fn set(&self, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        match value {
            Some(v) => self.tree.insert(key.as_bytes(), v).map(|_| ()),
            None => self.tree.remove(key.as_bytes()).map(|_| ()),
        }
        .map_err(|e| self.err(e))?;
        self.tree.flush().map(|_| ()).map_err(|e| self.err(e))
    }
}
