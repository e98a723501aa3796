//! Conversation identity: the sha256 of a conversation's canonical JSON.
//!
//! Canonical JSON is compact (no whitespace), with object keys sorted by their UTF-8 bytes at
//! every level and strings and numbers written as `serde_json` writes them. Two lines that
//! differ only in key order or whitespace therefore get the same id, which is what makes a
//! re-import a no-op.

use crate::Conversation;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// A conversation's content hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConversationId(pub [u8; 32]);

impl ConversationId {
    /// The id of a conversation.
    pub fn of(conversation: &Conversation) -> ConversationId {
        let value = serde_json::to_value(conversation).expect("a Conversation always serializes");
        ConversationId::of_value(&value)
    }

    /// The id of any JSON value (the hash of its canonical form).
    pub fn of_value(value: &Value) -> ConversationId {
        let mut buf = Vec::with_capacity(1024);
        canonical_json(value, &mut buf);
        ConversationId(Sha256::digest(&buf).into())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex characters, for display.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConversationId({})", self.short())
    }
}

/// Error for a string that is not a 64-character hex id.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a conversation id: expected 64 hex characters (a sha256)")]
pub struct ParseIdError(String);

impl FromStr for ConversationId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseIdError(s.to_string()))?;
        Ok(ConversationId(out))
    }
}

/// Appends the canonical JSON of `value` to `out`.
pub fn canonical_json(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).expect("writing to a Vec cannot fail");
                out.push(b':');
                canonical_json(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(v, out);
            }
            out.push(b']');
        }
        leaf => serde_json::to_writer(&mut *out, leaf).expect("writing to a Vec cannot fail"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_and_whitespace_do_not_change_the_id() {
        let a = Conversation::from_json(r#"{"messages":[{"role":"user","content":"hi"}],"b":1,"a":{"y":2,"x":[1,{"d":0,"c":1}]}}"#).unwrap();
        let b = Conversation::from_json(
            "{ \"a\": {\"x\": [1, {\"c\": 1, \"d\": 0}], \"y\": 2},\n \"messages\": [{\"content\": \"hi\", \"role\": \"user\"}], \"b\": 1 }",
        )
        .unwrap();
        assert_eq!(ConversationId::of(&a), ConversationId::of(&b));
    }

    #[test]
    fn content_changes_the_id() {
        let a =
            Conversation::from_json(r#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        let b =
            Conversation::from_json(r#"{"messages":[{"role":"user","content":"hi!"}]}"#).unwrap();
        assert_ne!(ConversationId::of(&a), ConversationId::of(&b));
    }

    #[test]
    fn canonical_form_is_sorted_and_compact() {
        let v: Value = serde_json::from_str(r#"{"b": [1, 2.5, "é"], "a": null}"#).unwrap();
        let mut out = Vec::new();
        canonical_json(&v, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":null,"b":[1,2.5,"é"]}"#
        );
        // sha256 of that string, computed independently with `printf '%s' ... | sha256sum`.
        assert_eq!(
            ConversationId::of_value(&v).to_hex(),
            "21fddaeebc6c84f1b55624c41336b0e521adecf3e414f2eaa12789afd6167428"
        );
    }

    #[test]
    fn hex_round_trip_and_bad_ids() {
        let id = ConversationId([7; 32]);
        assert_eq!(id.to_hex().parse::<ConversationId>().unwrap(), id);
        assert!("xyz".parse::<ConversationId>().is_err());
        assert!("ab".repeat(31).parse::<ConversationId>().is_err());
    }
}
