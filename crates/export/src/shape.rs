//! Shape checks of source tensors against `config.json`, before anything is written: a
//! checkpoint whose config says one size while its tensors have another would export
//! without complaint and then fail to load in vLLM or `qatflow chat`.
//!
//! Only what every supported architecture agrees on is checked: the hidden size (norms,
//! embeddings, the input side of q/k/v/gate/up projections, the output side of o/down
//! projections), the vocabulary size (embeddings, `lm_head`), the MLP width and the layer
//! count. Tensors of other names (Qwen3.5's linear attention, for one) are left alone.

use crate::error::ExportError;
use crate::source::SourceTensors;
use serde_json::{Map, Value};
use std::path::Path;

/// The sizes `config.json` declares (a Qwen3.5 wrapper's `text_config` counts too).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Sizes {
    hidden: Option<usize>,
    vocab: Option<usize>,
    intermediate: Option<usize>,
    layers: Option<usize>,
}

fn sizes(config: &Map<String, Value>) -> Sizes {
    let text = config.get("text_config").and_then(Value::as_object);
    let get = |key: &str| {
        config
            .get(key)
            .or_else(|| text.and_then(|t| t.get(key)))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
    };
    Sizes {
        hidden: get("hidden_size"),
        vocab: get("vocab_size"),
        intermediate: get("intermediate_size"),
        layers: get("num_hidden_layers"),
    }
}

/// What one tensor's shape should be, by its name: `(axis, config key, size)` triples.
fn expectations(name: &str, s: &Sizes) -> Vec<(usize, &'static str, Option<usize>)> {
    let leaf = name.strip_suffix(".weight").unwrap_or(name);
    let last = leaf.rsplit('.').next().unwrap_or(leaf);
    match last {
        "embed_tokens" | "lm_head" => {
            vec![(0, "vocab_size", s.vocab), (1, "hidden_size", s.hidden)]
        }
        // The final norm and the per-layer norms around each block; norms inside a block
        // (Qwen3.5's `linear_attn.norm`, q/k norms) have head sizes.
        "norm" if name.ends_with(".weight") && layer_index(name).is_none() => {
            vec![(0, "hidden_size", s.hidden)]
        }
        "input_layernorm" | "post_attention_layernorm" if name.ends_with(".weight") => {
            vec![(0, "hidden_size", s.hidden)]
        }
        "q_proj" | "k_proj" | "v_proj" if name.ends_with(".weight") => {
            vec![(1, "hidden_size", s.hidden)]
        }
        "o_proj" if name.ends_with(".weight") => vec![(0, "hidden_size", s.hidden)],
        "gate_proj" | "up_proj" if name.ends_with(".weight") && name.contains(".mlp.") => vec![
            (0, "intermediate_size", s.intermediate),
            (1, "hidden_size", s.hidden),
        ],
        "down_proj" if name.ends_with(".weight") && name.contains(".mlp.") => vec![
            (0, "hidden_size", s.hidden),
            (1, "intermediate_size", s.intermediate),
        ],
        _ => Vec::new(),
    }
}

/// The layer index of a `….layers.N.…` tensor name.
fn layer_index(name: &str) -> Option<usize> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// Checks every tensor of `tensors` against the sizes in `config` (read from
/// `config_path`); the first mismatch is an error naming the tensor, its shape and the
/// config key.
pub fn check_shapes(
    config: &Map<String, Value>,
    config_path: &Path,
    tensors: &SourceTensors,
) -> Result<(), ExportError> {
    let s = sizes(config);
    let bad = |problem: String| {
        ExportError::BadInput {
        path: config_path.to_path_buf(),
        problem: format!(
            "{problem}; config.json and the weights disagree, so the export would not load: fix config.json or export another checkpoint"
        ),
    }
    };
    for (name, info) in tensors.tensors() {
        for (axis, key, want) in expectations(name, &s) {
            let (Some(want), Some(&got)) = (want, info.shape.get(axis)) else {
                continue;
            };
            if got != want {
                return Err(bad(format!(
                    "tensor `{name}` has shape {:?}, but {key} is {want} (axis {axis} is {got})",
                    info.shape
                )));
            }
        }
        if let (Some(layers), Some(i)) = (s.layers, layer_index(name)) {
            if i >= layers {
                return Err(bad(format!(
                    "tensor `{name}` belongs to layer {i}, but num_hidden_layers is {layers}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes_of(json: &str) -> Sizes {
        sizes(
            serde_json::from_str::<Value>(json)
                .unwrap()
                .as_object()
                .unwrap(),
        )
    }

    #[test]
    fn expectations_follow_the_names() {
        let s = sizes_of(
            r#"{"hidden_size": 64, "vocab_size": 100, "intermediate_size": 128, "num_hidden_layers": 2}"#,
        );
        assert_eq!(
            expectations("model.layers.0.mlp.down_proj.weight", &s),
            vec![
                (0, "hidden_size", Some(64)),
                (1, "intermediate_size", Some(128))
            ]
        );
        assert_eq!(
            expectations("model.embed_tokens.weight", &s),
            vec![(0, "vocab_size", Some(100)), (1, "hidden_size", Some(64))]
        );
        assert!(expectations("model.layers.0.linear_attn.in_proj_qkv.weight", &s).is_empty());
        assert_eq!(
            layer_index("model.layers.12.self_attn.q_proj.weight"),
            Some(12)
        );
        let nested = sizes_of(r#"{"text_config": {"hidden_size": 32}}"#);
        assert_eq!(nested.hidden, Some(32));
    }
}
