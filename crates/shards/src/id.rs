//! Shard ids: content addresses that are safe to use as file names.

use crate::ShardError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// A shard's id: the sha256 of its file, as 64 lowercase hex digits. Constructed only by
/// [`ShardId::parse`] (which rejects anything else, so `../x` never reaches the file
/// system) or from a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ShardId(String);

impl TryFrom<String> for ShardId {
    type Error = ShardError;
    fn try_from(s: String) -> Result<ShardId, ShardError> {
        ShardId::parse(&s)
    }
}

impl From<ShardId> for String {
    fn from(id: ShardId) -> String {
        id.0
    }
}

impl ShardId {
    /// Validates an id from the wire or a ledger.
    pub fn parse(text: &str) -> Result<ShardId, ShardError> {
        let ok = text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if ok {
            Ok(ShardId(text.to_string()))
        } else {
            Err(ShardError::InvalidId {
                id: text.chars().take(80).collect(),
            })
        }
    }

    /// The id of a shard file with these bytes.
    pub fn of_bytes(bytes: &[u8]) -> ShardId {
        ShardId(hex::encode(Sha256::digest(bytes)))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shard's file name (`<id>.jsonl.zst`).
    pub fn file_name(&self) -> String {
        format!("{}.jsonl.zst", self.0)
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_are_digests_only() {
        let id = ShardId::of_bytes(b"abc");
        assert_eq!(ShardId::parse(id.as_str()).unwrap(), id);
        for bad in [
            "../../etc/x",
            "",
            "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789",
            "shard-1",
        ] {
            assert!(ShardId::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn parsed_ids_never_contain_path_characters(s in ".{0,80}") {
            if let Ok(id) = ShardId::parse(&s) {
                prop_assert_eq!(id.as_str().len(), 64);
                prop_assert!(!id.file_name().contains('/') && !id.file_name().contains(".."));
            }
        }
    }
}
