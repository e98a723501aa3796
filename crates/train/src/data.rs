//! The data pipeline: conversations (JSONL file or dataset store) rendered with the model's
//! chat template into token ids with assistant masks, truncated to the sequence limit, and
//! a deterministic per-epoch order that a checkpoint cursor can resume exactly.

use std::path::PathBuf;
use std::sync::Arc;

use qatflow_model::rng::SplitMix64;
use qatflow_model::Tokenizer;
use qatflow_store::{Filter, Store};
use serde_json::Value;

use crate::config::DataSection;

/// The empty think block that `no_thinking` prefixes to assistant replies lacking one.
pub const EMPTY_THINK: &str = "<think>\n\n</think>\n\n";

/// Errors of reading or encoding the training data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The JSONL file could not be read.
    #[error(transparent)]
    Jsonl(#[from] qatflow_core::JsonlError),
    /// A line is not a conversation.
    #[error("{path}:{line}: {problem}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] qatflow_store::StoreError),
    /// A conversation could not be rendered or tokenized.
    #[error("conversation {origin}: {source}")]
    Encode {
        /// `file:line` or the store id.
        origin: String,
        /// The tokenizer's error.
        source: qatflow_model::TokenizerError,
    },
    /// Nothing to train on.
    #[error("no usable conversations in {origin} ({dropped} had no assistant token within data.max_seq_len); check the data path and filters")]
    Empty {
        /// Where the data came from.
        origin: String,
        /// Conversations dropped.
        dropped: usize,
    },
}

/// Where conversations come from.
#[derive(Clone)]
pub enum Dataset {
    /// A JSONL file of `{"messages": [...]}` lines.
    Jsonl(PathBuf),
    /// An open dataset store (the node passes its own handle; a sled database can be open
    /// in one process only), read in import order.
    Store {
        /// The store.
        store: Arc<Store>,
        /// Which conversations.
        filter: Filter,
    },
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dataset::Jsonl(p) => write!(f, "Jsonl({})", p.display()),
            Dataset::Store { store, filter } => {
                write!(f, "Store({}, {filter:?})", store.path().display())
            }
        }
    }
}

impl Dataset {
    /// A short description for messages.
    pub fn origin(&self) -> String {
        match self {
            Dataset::Jsonl(p) => p.display().to_string(),
            Dataset::Store { store, .. } => store.path().display().to_string(),
        }
    }

    /// Every conversation as `(origin, JSON object)`, in file / import order.
    pub fn conversations(&self) -> Result<Vec<(String, Value)>, DataError> {
        let mut out = Vec::new();
        match self {
            Dataset::Jsonl(path) => {
                let reader = qatflow_core::JsonlReader::open(path)?;
                for line in reader {
                    let line = line?;
                    let text = line.text.map_err(|problem| DataError::Line {
                        path: path.clone(),
                        line: line.number,
                        problem: problem.to_string(),
                    })?;
                    if text.trim().is_empty() {
                        continue;
                    }
                    let value: Value =
                        serde_json::from_str(&text).map_err(|e| DataError::Line {
                            path: path.clone(),
                            line: line.number,
                            problem: format!("not valid JSON: {e}"),
                        })?;
                    out.push((format!("{}:{}", path.display(), line.number), value));
                }
            }
            Dataset::Store { store, filter } => {
                for item in store.iter(filter) {
                    let stored = item?;
                    let value: Value =
                        serde_json::from_str(&stored.record.conversation).map_err(|e| {
                            DataError::Line {
                                path: store.path().to_path_buf(),
                                line: stored.record.seq as usize,
                                problem: format!("stored conversation is not JSON: {e}"),
                            }
                        })?;
                    out.push((format!("store seq {}", stored.record.seq), value));
                }
            }
        }
        Ok(out)
    }
}

/// One training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids (at most `max_seq_len`).
    pub ids: Vec<u32>,
    /// Per token: the model generates it, so predicting it is part of the loss.
    pub mask: Vec<bool>,
}

impl Example {
    /// Tokens that are loss targets (masked tokens after the first position).
    pub fn targets(&self) -> usize {
        self.mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// Encoded examples plus what was dropped.
#[derive(Debug, Clone, Default)]
pub struct Encoded {
    /// Usable examples, in source order.
    pub examples: Vec<Example>,
    /// Conversations with no loss target left after truncation.
    pub dropped: usize,
    /// Conversations truncated to `max_seq_len`.
    pub truncated: usize,
}

fn add_empty_think(messages: &mut Value) {
    let Some(list) = messages.as_array_mut() else {
        return;
    };
    for m in list {
        if m.get("role").and_then(Value::as_str) != Some("assistant") {
            continue;
        }
        if let Some(Value::String(content)) = m.get_mut("content") {
            if !content.trim_start().starts_with("<think>") {
                *content = format!("{EMPTY_THINK}{content}");
            }
        }
    }
}

/// Renders and tokenizes conversations (their `messages` and optional `tools`).
pub fn encode_all(
    conversations: &[(String, Value)],
    tokenizer: &Tokenizer,
    data: &DataSection,
) -> Result<Encoded, DataError> {
    let mut out = Encoded::default();
    for (origin, conv) in conversations {
        let mut messages = conv.get("messages").cloned().unwrap_or(Value::Null);
        if !messages.is_array() {
            return Err(DataError::Line {
                path: PathBuf::from(origin),
                line: 0,
                problem: "no `messages` array".into(),
            });
        }
        if data.no_thinking {
            add_empty_think(&mut messages);
        }
        let tools = conv
            .get("tools")
            .and_then(Value::as_array)
            .map(Vec::as_slice);
        let enc = tokenizer
            .encode_conversation(
                messages.as_array().map(Vec::as_slice).unwrap_or_default(),
                tools,
                data.enable_thinking,
            )
            .map_err(|source| DataError::Encode {
                origin: origin.clone(),
                source,
            })?;
        let mut ex = Example {
            ids: enc.ids,
            mask: enc.assistant_mask,
        };
        if ex.ids.len() > data.max_seq_len {
            ex.ids.truncate(data.max_seq_len);
            ex.mask.truncate(data.max_seq_len);
            out.truncated += 1;
        }
        if ex.targets() == 0 {
            out.dropped += 1;
        } else {
            out.examples.push(ex);
        }
    }
    Ok(out)
}

/// The order of `n` examples in `epoch`: a Fisher-Yates shuffle seeded by `(seed, epoch)`,
/// so any epoch's order can be recomputed on resume without replaying earlier ones.
pub fn epoch_order(n: usize, seed: u64, epoch: u32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng =
        SplitMix64::new(seed ^ (u64::from(epoch) + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Optimizer steps in an epoch of `n` examples at `per_step` examples per step (the last
/// step takes the remainder).
pub fn steps_per_epoch(n: usize, per_step: usize) -> u64 {
    n.div_ceil(per_step) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn epoch_order_is_a_permutation(n in 0usize..200, seed in any::<u64>(), epoch in 0u32..10) {
            let mut o = epoch_order(n, seed, epoch);
            prop_assert_eq!(o.clone(), epoch_order(n, seed, epoch));
            o.sort_unstable();
            prop_assert_eq!(o, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn epochs_differ_and_steps_round_up() {
        assert_ne!(epoch_order(50, 1, 0), epoch_order(50, 1, 1));
        assert_eq!(steps_per_epoch(17, 8), 3);
        assert_eq!(steps_per_epoch(16, 8), 2);
    }

    #[test]
    fn no_thinking_prefixes_only_replies_without_a_think_block() {
        let mut m = serde_json::json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "assistant", "content": "<think>x</think>Yes."},
            {"role": "assistant", "content": null, "tool_calls": []}
        ]);
        add_empty_think(&mut m);
        assert_eq!(m[0]["content"], "hi");
        assert_eq!(m[1]["content"], format!("{EMPTY_THINK}Hello."));
        assert_eq!(m[2]["content"], "<think>x</think>Yes.");
        assert!(m[3]["content"].is_null());
    }
}
