//! Randomly initialized models of named configurations: what benchmarks (`bench-train`,
//! `bench-export`) and CPU tests train when no pretrained weights are needed. Writes a
//! Hugging Face directory (`config.json` + `model.safetensors`) that every loader reads.

use std::io::Write;
use std::path::Path;

use burn::tensor::backend::Backend;
use safetensors::Dtype;
use serde_json::{json, Value};

use crate::arch::model::expected_tensors;
use crate::arch::model::{CausalLm, LoadOptions};
use crate::config::{Architecture, ModelConfig};
use crate::io::weights::{LoadError, Precision};
use crate::rng::SplitMix64;

/// Errors of writing a random model.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The named configuration does not exist.
    #[error("unknown model config `{0}`; known: {known}", known = NAMED_CONFIGS.join(", "))]
    UnknownConfig(String),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Writing failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Loading the written model failed.
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// Names accepted by [`named_config`].
pub const NAMED_CONFIGS: &[&str] = &[
    "smollm2-135m",
    "qwen3-1.7b",
    "qwen3-4b",
    "qwen3-8b",
    "qwen3.5-9b",
    "qwen3.5-2b",
    "tiny-llama",
    "tiny-qwen3",
    "tiny-qwen3.5",
];

/// The `config.json` of a named configuration: `smollm2-135m` (SmolLM2-135M-Instruct's),
/// `qwen3-1.7b`, `qwen3-4b`, `qwen3-8b` (those Qwen3 models' shapes; the 8B has an untied LM
/// head), `qwen3.5-9b` / `qwen3.5-2b` (the text model of Qwen3.5-9B / Qwen3.5-2B: 32 / 24
/// layers, three Gated DeltaNet layers per full-attention layer), or the tiny two-layer test
/// models `tiny-llama` / `tiny-qwen3` (vocabulary 49152, SmolLM2's, so they can use its
/// tokenizer) and the tiny four-layer `tiny-qwen3.5` (vocabulary 248320, Qwen3.5's, for
/// the tokenizer of `model fetch qwen3.5-tokenizer`).
pub fn named_config(name: &str) -> Result<Value, InitError> {
    let v = match name {
        "smollm2-135m" => json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "tie_word_embeddings": true, "max_position_embeddings": 8192,
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"
        }),
        "qwen3-1.7b" => qwen3_json(2048, 6144, 28, 16, true),
        // Qwen3-4B's and Qwen3-8B's shapes (the 8B has an untied LM head).
        "qwen3-4b" => qwen3_json(2560, 9728, 36, 32, true),
        "qwen3-8b" => qwen3_json(4096, 12288, 36, 32, false),
        "qwen3.5-9b" => qwen35_json(4096, 12288, 32, (16, 4), (16, 32), false),
        "qwen3.5-2b" => qwen35_json(2048, 6144, 24, (8, 2), (16, 16), true),
        "tiny-llama" => tiny_json(Architecture::Llama, 49152),
        "tiny-qwen3" => tiny_json(Architecture::Qwen3, 49152),
        "tiny-qwen3.5" => tiny_json(Architecture::Qwen35, 248_320),
        other => return Err(InitError::UnknownConfig(other.to_string())),
    };
    Ok(v)
}

/// A Qwen3 config (`Qwen3ForCausalLM`) of the released family's shape: head_dim 128, 8 KV
/// heads, rope theta 1e6, vocabulary 151936.
fn qwen3_json(
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    tied: bool,
) -> Value {
    json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": 151936, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 8,
        "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": tied, "max_position_embeddings": 40960,
        "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
        "torch_dtype": "bfloat16"
    })
}

/// A Qwen3.5 text config (`Qwen3_5ForCausalLM`) of the released family's shape: head_dim
/// 256 with a quarter rotated (theta 1e7), Gated DeltaNet heads of 128, kernel 4, full
/// attention every fourth layer, vocabulary 248320.
fn qwen35_json(
    hidden: usize,
    intermediate: usize,
    layers: usize,
    (heads, kv_heads): (usize, usize),
    (linear_k_heads, linear_v_heads): (usize, usize),
    tied: bool,
) -> Value {
    let layer_types: Vec<&str> = (0..layers)
        .map(|i| {
            if (i + 1) % 4 == 0 {
                "full_attention"
            } else {
                "linear_attention"
            }
        })
        .collect();
    json!({
        "architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text",
        "vocab_size": 248320, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": 256, "rms_norm_eps": 1e-6,
        "attn_output_gate": true, "full_attention_interval": 4, "layer_types": layer_types,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
        "linear_num_key_heads": linear_k_heads, "linear_num_value_heads": linear_v_heads,
        "linear_value_head_dim": 128, "partial_rotary_factor": 0.25,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                            "partial_rotary_factor": 0.25},
        "tie_word_embeddings": tied, "max_position_embeddings": 262144,
        "hidden_act": "silu", "eos_token_id": 248044, "dtype": "bfloat16"
    })
}

fn tiny_json(arch: Architecture, vocab: usize) -> Value {
    let (arch_name, model_type) = match arch {
        Architecture::Llama => ("LlamaForCausalLM", "llama"),
        Architecture::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        Architecture::Qwen35 => return tiny_qwen35_json(vocab),
    };
    json!({
        "architectures": [arch_name], "model_type": model_type,
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "max_position_embeddings": 4096,
        "hidden_act": "silu", "eos_token_id": 2, "torch_dtype": "float32"
    })
}

/// A tiny Qwen3.5 (three Gated DeltaNet layers with 2 key / 4 value heads, then one gated
/// attention layer) with `vocab` rows.
fn tiny_qwen35_json(vocab: usize) -> Value {
    json!({
        "architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text",
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-6, "attn_output_gate": true,
        "layer_types": ["linear_attention", "linear_attention", "linear_attention",
                        "full_attention"],
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_value_head_dim": 16,
        "partial_rotary_factor": 0.25, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "max_position_embeddings": 4096,
        "hidden_act": "silu", "eos_token_id": 2, "torch_dtype": "float32"
    })
}

/// A tiny two-layer configuration of `arch` with `vocab` rows (for unit tests; Qwen3.5's
/// has four layers, three of them linear attention).
pub fn tiny_config(arch: Architecture, vocab: usize) -> ModelConfig {
    ModelConfig::from_json(&tiny_json(arch, vocab), Path::new("<tiny>"))
        .expect("the tiny configuration is valid")
}

/// A deterministic stream of normal samples (SplitMix64 + Box-Muller): the same seed gives
/// the same model on every machine.
struct Normal {
    rng: SplitMix64,
    spare: Option<f64>,
}

impl Normal {
    fn new(seed: u64) -> Self {
        Normal {
            rng: SplitMix64::new(seed ^ 0x9E37_79B9_7F4A_7C15),
            spare: None,
        }
    }

    fn uniform(&mut self) -> f64 {
        ((self.rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn sample(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        self.spare = Some(r * t.sin());
        r * t.cos()
    }
}

/// Writes `dir/config.json` (the given HF config) and `dir/model.safetensors` with weights
/// drawn from N(0, 0.02²) (norms set to one), stored as `dtype` (F32 or BF16), streaming
/// one tensor at a time. Returns the parsed configuration.
pub fn write_random_model(
    config_json: &Value,
    seed: u64,
    dtype: Dtype,
    dir: &Path,
) -> Result<ModelConfig, InitError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InitError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config_path = dir.join("config.json");
    let config = ModelConfig::from_json(config_json, &config_path)?;
    let text = serde_json::to_string_pretty(config_json).expect("JSON values serialize");
    std::fs::write(&config_path, text).map_err(io(&config_path))?;

    let tensors: Vec<(String, Vec<usize>, bool)> = expected_tensors(&config)
        .into_iter()
        .map(|(n, s, linear)| {
            if linear {
                (format!("{n}.weight"), s, true)
            } else {
                (n, s, false)
            }
        })
        .collect();
    let width = match dtype {
        Dtype::BF16 => 2,
        _ => 4,
    };
    let dtype_name = if width == 2 { "BF16" } else { "F32" };
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, _) in &tensors {
        let bytes = shape.iter().product::<usize>() * width;
        header.insert(
            name.clone(),
            json!({"dtype": dtype_name, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).expect("JSON serializes");
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let path = dir.join("model.safetensors");
    let file = std::fs::File::create(&path).map_err(io(&path))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|()| out.write_all(&header))
        .map_err(io(&path))?;
    let mut rng = Normal::new(seed);
    let mut buf = Vec::with_capacity(1 << 20);
    let qwen35 = config.architecture == Architecture::Qwen35;
    for (name, shape, _) in &tensors {
        let n: usize = shape.iter().product();
        let is_norm = shape.len() == 1;
        // Qwen3.5's (1 + w) norms start at zero, as transformers initializes them.
        let constant = if qwen35 && crate::arch::qwen35::is_offset_norm(name) {
            0.0
        } else {
            1.0
        };
        for _ in 0..n {
            let v = if is_norm {
                constant
            } else {
                (rng.sample() * 0.02) as f32
            };
            if width == 2 {
                buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            } else {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            if buf.len() >= 1 << 20 {
                out.write_all(&buf).map_err(io(&path))?;
                buf.clear();
            }
        }
    }
    out.write_all(&buf).map_err(io(&path))?;
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .map_err(io(&path))?;
    Ok(config)
}

/// Files a model directory's tokenizer consists of (those present are copied).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Copies the [`TOKENIZER_FILES`] of model directory `src` into `dst`, so a random model can
/// train on conversations; fails when `src` has no `tokenizer.json`.
pub fn copy_tokenizer_files(src: &Path, dst: &Path) -> Result<usize, InitError> {
    if !src.join("tokenizer.json").exists() {
        return Err(InitError::Io {
            path: src.join("tokenizer.json"),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no tokenizer.json; point at a Hugging Face model directory",
            ),
        });
    }
    let mut copied = 0;
    for f in TOKENIZER_FILES {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), dst.join(f)).map_err(|source| InitError::Io {
                path: dst.join(f),
                source,
            })?;
            copied += 1;
        }
    }
    Ok(copied)
}

/// A randomly initialized model of `config` held in memory (written to a temporary
/// directory and loaded back in f32, so it is exactly what a loader of that directory gets).
pub fn random_init<B: Backend>(config: &ModelConfig, seed: u64, device: &B::Device) -> CausalLm<B> {
    let dir = std::env::temp_dir().join(format!(
        "qatflow-init-{}-{seed}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let json = config_json(config);
    write_random_model(&json, seed, Dtype::F32, &dir).expect("writing a temporary model");
    let model = CausalLm::load(
        &dir,
        LoadOptions {
            precision: Precision::F32,
            emulate_nvfp4_activations: false,
        },
        device,
    )
    .expect("loading the model just written");
    let _ = std::fs::remove_dir_all(&dir);
    model
}

/// The `config.json` value that describes `config` (the fields qatflow reads; rope scaling
/// is not described, so use it for unscaled-rope configurations such as the named ones).
pub fn config_json(config: &ModelConfig) -> Value {
    let (arch_name, model_type) = match config.architecture {
        Architecture::Llama => ("LlamaForCausalLM", "llama"),
        Architecture::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        Architecture::Qwen35 => ("Qwen3_5ForCausalLM", "qwen3_5_text"),
    };
    let mut json = json!({
        "architectures": [arch_name], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope.theta,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": "silu", "eos_token_id": config.eos_token_ids,
    });
    if let Some(h) = &config.hybrid {
        let layer_types: Vec<&str> = h
            .layer_types
            .iter()
            .map(|k| match k {
                crate::config::LayerKind::LinearAttention => "linear_attention",
                crate::config::LayerKind::FullAttention => "full_attention",
            })
            .collect();
        let extra = json!({
            "layer_types": layer_types,
            "linear_num_key_heads": h.linear_num_key_heads,
            "linear_num_value_heads": h.linear_num_value_heads,
            "linear_key_head_dim": h.linear_key_head_dim,
            "linear_value_head_dim": h.linear_value_head_dim,
            "linear_conv_kernel_dim": h.linear_conv_kernel_dim,
            "partial_rotary_factor": h.rotary_dim as f64 / config.head_dim as f64,
            "attn_output_gate": h.attn_output_gate,
        });
        if let (Some(o), Value::Object(e)) = (json.as_object_mut(), extra) {
            o.extend(e);
        }
    }
    json
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_configs_parse_and_unknown_names_are_listed() {
        for name in NAMED_CONFIGS {
            let json = named_config(name).unwrap();
            ModelConfig::from_json(&json, Path::new(name)).unwrap();
        }
        let err = named_config("gpt-5").unwrap_err().to_string();
        assert!(err.contains("qwen3-1.7b"), "{err}");
    }

    #[test]
    fn qwen35_9b_has_the_published_parameter_count() {
        // 8,953,803,264 text parameters (embedding, untied head, 24 Gated DeltaNet and 8
        // gated attention layers), the count of Qwen3.5-9B's text stack.
        let config =
            ModelConfig::from_json(&named_config("qwen3.5-9b").unwrap(), Path::new("9b")).unwrap();
        let params: usize = expected_tensors(&config)
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum();
        assert_eq!(params, 8_953_803_264);
        let h = config.hybrid.unwrap();
        assert_eq!((h.rotary_dim, h.conv_dim()), (64, 8192));
    }

    #[test]
    fn same_seed_same_weights_and_loadable() {
        let tmp = tempfile::tempdir().unwrap();
        let json = tiny_json(Architecture::Qwen3, 256);
        for (sub, seed) in [("a", 3), ("b", 3), ("c", 4)] {
            write_random_model(&json, seed, Dtype::BF16, &tmp.path().join(sub)).unwrap();
        }
        let read = |s: &str| std::fs::read(tmp.path().join(s).join("model.safetensors")).unwrap();
        assert_eq!(read("a"), read("b"));
        assert_ne!(read("a"), read("c"));
        let model = CausalLm::<burn::backend::Flex>::load(
            &tmp.path().join("a"),
            LoadOptions::default(),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(model.config().vocab_size, 256);
    }
}
