//! A Hugging Face `tokenizer.json` (byte-level BPE) built from a tiktoken rank file.
//!
//! A tiktoken file lists every mergeable token as `BASE64(bytes) RANK`, one per line; the
//! rank is the token id and also the merge priority. Hugging Face's BPE needs merges
//! instead. They are derived the way transformers' `TikTokenConverter`
//! (`convert_slow_tokenizer.py`) derives them: for each token, every split into two
//! tokens, listed in the rank order of the merged token (see [`bpe_merges`]), so both
//! tokenizers merge in the same order. Token bytes are written in GPT-2's byte-to-unicode
//! alphabet; the pre-tokenizer splits on the tiktoken pattern and then maps bytes (no
//! regex of its own), and `ignore_merges` is on because tiktoken takes a whole piece that
//! is itself a token without merging.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

/// Errors of reading a tiktoken file or converting it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TiktokenError {
    /// A line is not `BASE64 RANK`.
    #[error("tiktoken file line {line}: {problem}; expected `BASE64TOKEN RANK` per line")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// The ranks are not exactly `0..n`, each once.
    #[error(
        "tiktoken ranks must be 0..{count} with no gaps or repeats, but rank {rank} {problem}"
    )]
    Ranks {
        /// Number of tokens in the file.
        count: usize,
        /// The offending rank.
        rank: u64,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A single byte has no rank: byte-level BPE could not encode it.
    #[error("byte {0:#04x} has no rank; a byte-level BPE table must rank all 256 single bytes")]
    MissingByte(u8),
    /// An added token's id is taken by a BPE token or another added token.
    #[error("added token {content:?} has id {id}, which is already used; added ids must follow the BPE ranks")]
    AddedId {
        /// The token text.
        content: String,
        /// Its id.
        id: u32,
    },
}

/// A token the tokenizer matches whole before BPE (`<|im_end|>`, `<think>`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedToken {
    /// Its id.
    pub id: u32,
    /// Its text.
    pub content: String,
    /// Special tokens are dropped by `decode(.., skip_special_tokens=true)`.
    pub special: bool,
}

fn base64_value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Decodes standard base64 (with `=` padding, as tiktoken files use).
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let body = text.trim_end_matches('=');
    if text.len() % 4 != 0 || text.len() - body.len() > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in body.as_bytes() {
        acc = (acc << 6) | u32::from(base64_value(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    (acc == 0).then_some(out)
}

/// Reads a tiktoken file into its tokens' bytes, indexed by rank.
pub fn parse_tiktoken(text: &str) -> Result<Vec<Vec<u8>>, TiktokenError> {
    let mut ranked: Vec<(u64, Vec<u8>)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |problem: String| TiktokenError::Line {
            line: i + 1,
            problem,
        };
        let mut fields = line.split_whitespace();
        let (Some(token), Some(rank), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad(format!("{line:?} does not have two fields")));
        };
        let bytes = base64_decode(token).ok_or_else(|| bad(format!("{token:?} is not base64")))?;
        let rank = rank
            .parse::<u64>()
            .map_err(|e| bad(format!("rank {rank:?}: {e}")))?;
        ranked.push((rank, bytes));
    }
    let count = ranked.len();
    let mut tokens: Vec<Option<Vec<u8>>> = vec![None; count];
    for (rank, bytes) in ranked {
        let ranks_err = |problem| TiktokenError::Ranks {
            count,
            rank,
            problem,
        };
        let slot = usize::try_from(rank)
            .ok()
            .and_then(|r| tokens.get_mut(r))
            .ok_or_else(|| ranks_err("is out of range"))?;
        if slot.replace(bytes).is_some() {
            return Err(ranks_err("appears twice"));
        }
    }
    Ok(tokens.into_iter().map(|t| t.unwrap_or_default()).collect())
}

/// GPT-2's byte-to-unicode alphabet: printable Latin-1 bytes stand for themselves, the
/// others map to U+0100 onwards in byte order.
pub fn byte_to_char() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        table[b as usize] = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("U+0100..U+0143 are chars");
            next += 1;
            c
        };
    }
    table
}

/// The merges that make Hugging Face's BPE merge like tiktoken: for every token of two
/// or more bytes, in rank order, every split of it into two tokens (ordered by their
/// ranks), as `(left, right)` ranks. tiktoken merges the adjacent pair whose concatenation
/// has the lowest rank, whichever split it is; listing all splits under the merged
/// token's rank lets Hugging Face's merge-priority BPE make the same choice. A token
/// with no such split is only ever produced whole (tiktoken's and `ignore_merges`' direct
/// lookup of a piece).
pub fn bpe_merges(tokens: &[Vec<u8>]) -> Result<Vec<(u32, u32)>, TiktokenError> {
    let rank_of: HashMap<&[u8], u32> = tokens
        .iter()
        .enumerate()
        .map(|(r, t)| (t.as_slice(), r as u32))
        .collect();
    for b in 0..=255u8 {
        if !rank_of.contains_key([b].as_slice()) {
            return Err(TiktokenError::MissingByte(b));
        }
    }
    let mut merges = Vec::with_capacity(tokens.len() * 2);
    let mut local = Vec::new();
    for token in tokens {
        local.clear();
        for k in 1..token.len() {
            if let (Some(&l), Some(&r)) = (rank_of.get(&token[..k]), rank_of.get(&token[k..])) {
                local.push((l, r));
            }
        }
        local.sort_unstable();
        merges.extend_from_slice(&local);
    }
    Ok(merges)
}

/// Builds the `tokenizer.json` of a tiktoken encoding: NFC normalizer (as Qwen's
/// tokenizers apply), `Split(pat_str, Isolated)` then byte-level mapping, BPE with the
/// derived merges, the added tokens with their ids, and a byte-level decoder.
///
/// Added tokens are `normalized: true`, matched in the NFC text like the Python package
/// does (NFC first, then tiktoken's special-token split): with `false` they would be
/// matched in the raw text, and a special token followed by a combining mark that NFC
/// composes with its last character (`<tool_call>` + U+0338 → `<tool_call≯`) would
/// still be split out as the special token.
pub fn tokenizer_json(
    tokens: &[Vec<u8>],
    pat_str: &str,
    added: &[AddedToken],
) -> Result<Value, TiktokenError> {
    let merges = bpe_merges(tokens)?;
    let table = byte_to_char();
    let text: Vec<String> = tokens
        .iter()
        .map(|t| t.iter().map(|&b| table[b as usize]).collect())
        .collect();
    let mut vocab = Map::with_capacity(text.len());
    for (rank, t) in text.iter().enumerate() {
        vocab.insert(t.clone(), json!(rank));
    }
    let merges: Vec<Value> = merges
        .into_iter()
        .map(|(l, r)| json!([text[l as usize], text[r as usize]]))
        .collect();
    let mut used: std::collections::HashSet<u32> = (0..tokens.len() as u32).collect();
    let mut added_json = Vec::with_capacity(added.len());
    for a in added {
        if !used.insert(a.id) {
            return Err(TiktokenError::AddedId {
                content: a.content.clone(),
                id: a.id,
            });
        }
        added_json.push(json!({
            "id": a.id, "content": a.content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": true, "special": a.special,
        }));
    }
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_json,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pat_str}, "behavior": "Isolated", "invert": false},
            byte_level,
        ]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": true, "vocab": vocab, "merges": merges,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
            for _ in chunk.len()..3 {
                out.push('=');
            }
        }
        out
    }

    /// All 256 bytes, then `ab`, `abc`, `bc`, `abcd`.
    fn table() -> String {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for t in [&b"ab"[..], b"abc", b"bc", b"abcd"] {
            tokens.push(t.to_vec());
        }
        tokens
            .iter()
            .enumerate()
            .map(|(r, t)| format!("{} {r}\n", b64(t)))
            .collect()
    }

    #[test]
    fn base64_round_trips_and_rejects_garbage() {
        for len in 0..8 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 97 + 3) as u8).collect();
            assert_eq!(base64_decode(&b64(&bytes)).unwrap(), bytes, "{len}");
        }
        assert_eq!(base64_decode("IGlu").unwrap(), b" in");
        assert!(base64_decode("I").is_none());
        assert!(base64_decode("I*lu").is_none());
        assert!(base64_decode("IR==").is_none(), "non-zero trailing bits");
    }

    #[test]
    fn merges_list_every_split_in_rank_order() {
        let tokens = parse_tiktoken(&table()).unwrap();
        assert_eq!(tokens.len(), 260);
        let (a, b, c, d) = (97, 98, 99, 100);
        // ab (256); abc (257) = ab+c, a+bc (bc is 258, a later rank, still listed);
        // bc (258); abcd (259) = abc+d.
        assert_eq!(
            bpe_merges(&tokens).unwrap(),
            [(a, b), (a, 258), (256, c), (b, c), (257, d)]
        );
    }

    #[test]
    fn bad_tables_are_errors() {
        let err = parse_tiktoken("YQ== 0\nYg== x\n").unwrap_err();
        assert!(matches!(err, TiktokenError::Line { line: 2, .. }), "{err}");
        let err = parse_tiktoken("YQ== 0\nYg== 0\n").unwrap_err();
        assert!(err.to_string().contains("appears twice"), "{err}");
        let err = parse_tiktoken("YQ== 0\nYg== 5\n").unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        let tokens = parse_tiktoken("YQ== 0\nYg== 1\n").unwrap();
        assert_eq!(
            bpe_merges(&tokens).unwrap_err(),
            TiktokenError::MissingByte(0)
        );
        // `xyz` with no `xy`/`yz` has no merge: only ever produced whole.
        let mut text = table();
        text.push_str(&format!("{} 260\n", b64(b"xyz")));
        let tokens = parse_tiktoken(&text).unwrap();
        assert_eq!(bpe_merges(&tokens).unwrap().len(), 5);
    }

    #[test]
    fn tokenizer_json_loads_and_encodes_like_tiktoken() {
        let tokens = parse_tiktoken(&table()).unwrap();
        let added = [AddedToken {
            id: 260,
            content: "<|end|>".into(),
            special: true,
        }];
        let json = tokenizer_json(&tokens, r"\S+|\s+", &added).unwrap();
        let tok: tokenizers::Tokenizer = json.to_string().parse().unwrap();
        let ids = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
        assert_eq!(ids("abcd"), [259]);
        assert_eq!(ids("abcx abc<|end|>"), [257, 120, 32, 257, 260]);
        assert_eq!(ids("bcd é"), [258, 100, 32, 0xC3, 0xA9]);
        // NFC comes first: `>` + U+0338 is `≯`, so no special token here.
        assert_eq!(
            ids("<|end|>\u{338}"),
            [60, 124, 101, 110, 100, 124, 0xE2, 0x89, 0xAF]
        );
        assert_eq!(
            tok.decode(&[259, 32, 0xC3, 0xA9, 260], true).unwrap(),
            "abcd é"
        );
        let dup = [AddedToken {
            id: 5,
            content: "x".into(),
            special: false,
        }];
        assert!(matches!(
            tokenizer_json(&tokens, ".", &dup),
            Err(TiktokenError::AddedId { id: 5, .. })
        ));
    }
}
