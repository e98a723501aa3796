//! The shard file: zstd-compressed JSONL, one accepted conversation per line:
//!
//! ```json
//! {"category":"topic_switch","source":"offline","conversation":{"messages":[...]}}
//! ```
//!
//! `conversation` is the stored conversation's JSON, byte for byte, so its content hash on
//! the receiving node is the one it had on the sending node.

use crate::ShardError;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::io::{BufRead, Read};

/// zstd level of shard files (fast; JSONL compresses well at any level).
const ZSTD_LEVEL: i32 = 3;

/// One conversation in a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLine {
    /// Its category, if known.
    pub category: Option<String>,
    /// Where it came from, if known.
    pub source: Option<String>,
    /// The conversation as one JSON object, as stored.
    pub conversation: String,
}

#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    category: Option<String>,
    source: Option<String>,
    #[serde(borrow)]
    conversation: &'a RawValue,
}

/// Encodes lines as a shard file's bytes.
pub fn encode(lines: &[ShardLine]) -> Result<Vec<u8>, ShardError> {
    let jsonl = encode_jsonl(lines)?;
    zstd::bulk::compress(&jsonl, ZSTD_LEVEL).map_err(|e| ShardError::Format {
        id: "-".into(),
        message: format!("zstd compression failed: {e}"),
    })
}

/// The uncompressed JSONL of `lines` (what [`encode`] compresses).
pub fn encode_jsonl(lines: &[ShardLine]) -> Result<Vec<u8>, ShardError> {
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let raw: Box<RawValue> =
            RawValue::from_string(line.conversation.clone()).map_err(|e| ShardError::Format {
                id: "-".into(),
                message: format!("line {}: conversation is not JSON: {e}", i + 1),
            })?;
        let wire = Wire {
            category: line.category.clone(),
            source: line.source.clone(),
            conversation: &raw,
        };
        serde_json::to_writer(&mut out, &wire).map_err(|e| ShardError::Format {
            id: "-".into(),
            message: format!("line {}: {e}", i + 1),
        })?;
        out.push(b'\n');
    }
    Ok(out)
}

/// Largest ratio of decoded to compressed bytes a shard may have. Real shards compress
/// about 150× (every conversation repeats the long system prompt); a zstd bomb reaches
/// tens of thousands.
pub const MAX_RATIO: u64 = 1000;

/// Decoded bytes allowed whatever the ratio (small shards compress less predictably).
pub const RATIO_FLOOR: u64 = 8 << 20;

/// The decoded size a shard of `compressed` bytes may reach: `max_decoded`, or less when
/// [`MAX_RATIO`] (with a floor of [`RATIO_FLOOR`]) says so.
pub fn decoded_limit(compressed: u64, max_decoded: u64) -> u64 {
    max_decoded.min(compressed.saturating_mul(MAX_RATIO).max(RATIO_FLOOR))
}

/// Decodes a shard file's bytes as a stream, line by line, refusing more decoded bytes
/// than [`decoded_limit`] allows (a compressed shard could otherwise expand without bound):
/// memory stays within the limit whatever the file claims.
pub fn decode(bytes: &[u8], max_decoded: u64) -> Result<Vec<ShardLine>, ShardError> {
    let err = |message: String| ShardError::Format {
        id: "-".into(),
        message,
    };
    let limit = decoded_limit(bytes.len() as u64, max_decoded);
    let decoder =
        zstd::stream::read::Decoder::new(bytes).map_err(|e| err(format!("not zstd: {e}")))?;
    let mut reader = std::io::BufReader::new(decoder.take(limit.saturating_add(1)));
    let mut lines = Vec::new();
    let mut line = Vec::new();
    let mut total = 0u64;
    for i in 1.. {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| err(format!("zstd stream is corrupt: {e}")))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(ShardError::TooLarge {
                id: "-".into(),
                what: "decompressed shard",
                size: total,
                limit,
            });
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if text.is_empty() {
            continue;
        }
        let wire: Wire<'_> =
            serde_json::from_slice(text).map_err(|e| err(format!("line {i}: {e}")))?;
        if !wire.conversation.get().starts_with('{') {
            return Err(err(format!("line {i}: conversation is not a JSON object")));
        }
        lines.push(ShardLine {
            category: wire.category,
            source: wire.source,
            conversation: wire.conversation.get().to_string(),
        });
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn line_strategy() -> impl Strategy<Value = ShardLine> {
        (
            proptest::option::of("[a-z_]{1,12}"),
            proptest::option::of(".{0,12}"),
            proptest::collection::vec((".{0,10}", ".{0,30}"), 0..4),
        )
            .prop_map(|(category, source, pairs)| {
                let messages: Vec<serde_json::Value> = pairs
                    .into_iter()
                    .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
                    .collect();
                ShardLine {
                    category,
                    source,
                    conversation: serde_json::json!({ "messages": messages }).to_string(),
                }
            })
    }

    proptest! {
        #[test]
        fn lines_round_trip(lines in proptest::collection::vec(line_strategy(), 0..20)) {
            let bytes = encode(&lines).unwrap();
            prop_assert_eq!(decode(&bytes, 1 << 20).unwrap(), lines);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes, 1 << 16);
        }

        #[test]
        fn compressed_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let compressed = zstd::bulk::compress(&bytes, 1).unwrap();
            let _ = decode(&compressed, 1 << 16);
        }

        #[test]
        fn arbitrary_jsonl_never_panics(text in ".{0,300}") {
            let bytes = zstd::bulk::compress(text.as_bytes(), 1).unwrap();
            let _ = decode(&bytes, 1 << 16);
        }
    }

    #[test]
    fn conversation_bytes_are_kept_exactly() {
        let line = ShardLine {
            category: Some("c".into()),
            source: None,
            conversation: r#"{"z":1.50,"a":[],"messages":[]}"#.into(),
        };
        let back = decode(&encode(std::slice::from_ref(&line)).unwrap(), 1024).unwrap();
        assert_eq!(back, vec![line]);
    }

    #[test]
    fn a_zstd_bomb_stops_at_the_ratio_cap() {
        // 64 MiB of zeros compress to a few KiB: far past the ratio cap, while the
        // configured maximum (1 GiB) would let it through.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
        let limit = decoded_limit(bomb.len() as u64, 1 << 30);
        assert!(limit < 64 << 20, "{limit}");
        match decode(&bomb, 1 << 30) {
            Err(ShardError::TooLarge {
                what: "decompressed shard",
                limit: l,
                ..
            }) => assert_eq!(l, limit),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn decompression_is_bounded() {
        let line = ShardLine {
            category: None,
            source: None,
            conversation: format!(r#"{{"pad":"{}"}}"#, "x".repeat(10_000)),
        };
        let bytes = encode(&[line]).unwrap();
        assert!(bytes.len() < 1000);
        let err = decode(&bytes, 4096).unwrap_err().to_string();
        assert!(err.contains("exceeds the limit of 4096 bytes"), "{err}");
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let err = decode(b"not zstd at all", 1024).unwrap_err().to_string();
        assert!(err.contains("zstd"), "{err}");
        let bytes = zstd::bulk::compress(b"{\"conversation\": 3}\n", 1).unwrap();
        let err = decode(&bytes, 1024).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
