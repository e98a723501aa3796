//! The checkpoint index of a training run: one sled database at `RUN_DIR/manifest.sled`,
//! tree `checkpoints`, key = step (u64 big-endian), value = [`CheckpointRecord`] as JSON.
//!
//! Files are the truth, sled is the index: a checkpoint directory carries its own
//! `manifest.json` with the sha256 of every file, and readers verify the files, not this
//! index. Every write here is flushed before it returns.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use qatflow_store::{open_db, StoreError};

/// One file of a checkpoint: name inside the checkpoint directory, size and sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name, relative to the checkpoint directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex sha256 of the content.
    pub sha256: String,
}

/// What the index holds per committed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Optimizer step of the checkpoint.
    pub step: u64,
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Hash of the training configuration that produced it.
    pub config_hash: String,
    /// Seconds since the Unix epoch at commit.
    pub created_unix: u64,
    /// The files and their checksums (as in the directory's `manifest.json`).
    pub files: Vec<FileEntry>,
}

/// The sled index of a run's checkpoints; see the module docs.
#[derive(Clone)]
pub struct CheckpointManifest {
    path: PathBuf,
    db: sled::Db,
    tree: sled::Tree,
}

impl std::fmt::Debug for CheckpointManifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointManifest")
            .field("path", &self.path)
            .finish()
    }
}

impl CheckpointManifest {
    /// Opens (creating if needed) the index database at `path` (`RUN_DIR/manifest.sled`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let err = |source| StoreError::Sled {
            path: path.clone(),
            source,
        };
        let db = open_db(&path).map_err(err)?;
        let tree = db.open_tree("checkpoints").map_err(err)?;
        Ok(Self { path, db, tree })
    }

    fn sled_err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(drop).map_err(|e| self.sled_err(e))
    }

    /// Records (or replaces) the checkpoint of `record.step`; flushed before it returns.
    pub fn record(&self, record: &CheckpointRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).expect("a record always serializes");
        self.tree
            .insert(record.step.to_be_bytes(), value)
            .map_err(|e| self.sled_err(e))?;
        self.flush()
    }

    /// Removes the checkpoint of `step` (no-op when absent); flushed before it returns.
    /// Returns whether it was present.
    pub fn remove(&self, step: u64) -> Result<bool, StoreError> {
        let old = self
            .tree
            .remove(step.to_be_bytes())
            .map_err(|e| self.sled_err(e))?;
        self.flush()?;
        Ok(old.is_some())
    }

    /// The record of `step`, if any.
    pub fn get(&self, step: u64) -> Result<Option<CheckpointRecord>, StoreError> {
        match self
            .tree
            .get(step.to_be_bytes())
            .map_err(|e| self.sled_err(e))?
        {
            Some(v) => self.decode(step, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Every recorded checkpoint, oldest step first.
    pub fn list(&self) -> Result<Vec<CheckpointRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            let step =
                k.as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        path: self.path.clone(),
                        id: format!("checkpoints/{}", hex::encode(&k)),
                        message: format!("key of {} bytes, expected 8", k.len()),
                    })?;
            out.push(self.decode(step, &v)?);
        }
        Ok(out)
    }

    fn decode(&self, step: u64, bytes: &[u8]) -> Result<CheckpointRecord, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            id: format!("checkpoints/{step}"),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64) -> CheckpointRecord {
        CheckpointRecord {
            step,
            dir: PathBuf::from(format!("/run/checkpoints/step-{step:08}")),
            config_hash: "abc".into(),
            created_unix: 1_700_000_000 + step,
            files: vec![FileEntry {
                name: "model.safetensors".into(),
                size: 10 * step,
                sha256: "00".repeat(32),
            }],
        }
    }

    #[test]
    fn record_list_remove_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.sled");
        {
            let m = CheckpointManifest::open(&path).unwrap();
            for step in [300, 5, 40] {
                m.record(&record(step)).unwrap();
            }
            assert!(m.remove(40).unwrap());
            assert!(!m.remove(41).unwrap());
        }
        let m = CheckpointManifest::open(&path).unwrap();
        let steps: Vec<u64> = m.list().unwrap().iter().map(|r| r.step).collect();
        assert_eq!(steps, [5, 300]);
        assert_eq!(m.get(300).unwrap(), Some(record(300)));
        assert_eq!(m.get(40).unwrap(), None);
    }
}
