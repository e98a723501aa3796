//! GGUF → Hugging Face directory: BF16 `model.safetensors` with HF tensor names (Q/K
//! rope permutation undone), `config.json` for `LlamaForCausalLM`, and `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json` rebuilt from the GGUF metadata.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::io::gguf::{unpermute_qk, Gguf, GgufError, GgufFile, MetaValue};

/// Errors of importing a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The GGUF file itself is unreadable or malformed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A model architecture other than `llama`.
    #[error("{path}: general.architecture is {arch:?}; only \"llama\" (Llama / SmolLM2) GGUF files can be imported")]
    UnsupportedArchitecture {
        /// The GGUF file.
        path: PathBuf,
        /// Its architecture.
        arch: String,
    },
    /// A required metadata key is missing or has the wrong type.
    #[error("GGUF metadata {key:?} is missing or not {expected}")]
    Metadata {
        /// The key.
        key: String,
        /// The type expected.
        expected: &'static str,
    },
    /// A tokenizer this importer cannot rebuild as a `tokenizer.json`.
    #[error("GGUF tokenizer {what} is not supported: {detail}")]
    UnsupportedTokenizer {
        /// Which field (`tokenizer.ggml.model`, `tokenizer.ggml.pre`).
        what: &'static str,
        /// The value found and what is supported.
        detail: String,
    },
    /// A tensor with an unknown name or an unexpected shape.
    #[error("GGUF tensor {name:?}: {problem}")]
    Tensor {
        /// The GGUF tensor name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// Writing the output directory failed.
    #[error("writing {path}: {message}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The error.
        message: String,
    },
}

/// Llama hyperparameters read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaParams {
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP intermediate size.
    pub intermediate: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Vocabulary size of the embedding.
    pub vocab_size: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether the LM head is the embedding (no `output.weight` tensor).
    pub tie_word_embeddings: bool,
}

/// What [`import_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    /// The output directory.
    pub out_dir: PathBuf,
    /// Hyperparameters of the model.
    pub params: LlamaParams,
    /// Hugging Face tensor names and shapes written to `model.safetensors`, sorted by name.
    pub tensors: Vec<(String, Vec<usize>)>,
}

fn meta<'a>(g: &'a Gguf, key: &str) -> Option<&'a MetaValue> {
    g.get(key)
}

/// Upper bound for any size in the metadata (keeps shape products far from overflow).
const MAX_SIZE: u64 = 1 << 24;

fn meta_usize(g: &Gguf, key: &str) -> Result<usize, ImportError> {
    meta(g, key)
        .and_then(MetaValue::as_u64)
        .filter(|&v| v <= MAX_SIZE)
        .map(|v| v as usize)
        .ok_or_else(|| ImportError::Metadata {
            key: key.into(),
            expected: "an unsigned integer up to 2^24",
        })
}

/// Rounds a value stored as f32 to the shortest decimal that names that f32
/// (`9.999999747378752e-06` → `1e-05`), as Hugging Face configs write it.
fn f32_decimal(x: f64) -> f64 {
    (x as f32).to_string().parse().unwrap_or(x)
}

impl LlamaParams {
    /// Reads the `llama.*` hyperparameters; `vocab_size` falls back to the token list.
    pub fn from_gguf(g: &Gguf) -> Result<LlamaParams, ImportError> {
        let hidden = meta_usize(g, "llama.embedding_length")?;
        let heads = meta_usize(g, "llama.attention.head_count")?;
        let kv_heads = match meta(g, "llama.attention.head_count_kv") {
            Some(_) => meta_usize(g, "llama.attention.head_count_kv")?,
            None => heads,
        };
        if heads == 0 || kv_heads == 0 || hidden % heads != 0 || heads % kv_heads != 0 {
            return Err(ImportError::Metadata {
                key: "llama.attention.head_count".into(),
                expected: "a head count dividing embedding_length and divisible by head_count_kv",
            });
        }
        let head_dim = match meta(g, "llama.attention.key_length") {
            Some(_) => meta_usize(g, "llama.attention.key_length")?,
            None => hidden / heads,
        };
        let vocab_size = match meta(g, "llama.vocab_size") {
            Some(_) => meta_usize(g, "llama.vocab_size")?,
            None => meta(g, "tokenizer.ggml.tokens")
                .and_then(MetaValue::as_array)
                .map(<[MetaValue]>::len)
                .filter(|&n| n as u64 <= MAX_SIZE)
                .ok_or_else(|| ImportError::Metadata {
                    key: "llama.vocab_size".into(),
                    expected: "an unsigned integer (nor is tokenizer.ggml.tokens present)",
                })?,
        };
        let float = |key: &str, default: f64| -> Result<f64, ImportError> {
            match meta(g, key) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .map(f32_decimal)
                    .ok_or_else(|| ImportError::Metadata {
                        key: key.into(),
                        expected: "a number",
                    }),
            }
        };
        Ok(LlamaParams {
            num_layers: meta_usize(g, "llama.block_count")?,
            hidden,
            intermediate: meta_usize(g, "llama.feed_forward_length")?,
            heads,
            kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings: meta_usize(g, "llama.context_length")?,
            rope_theta: float("llama.rope.freq_base", 10000.0)?,
            rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
            tie_word_embeddings: g.tensor("output.weight").is_none(),
        })
    }

    /// The `config.json` of the equivalent Hugging Face `LlamaForCausalLM`.
    pub fn hf_config(&self, bos: Option<u64>, eos: Option<u64>, pad: Option<u64>) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vocab_size": self.vocab_size,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "use_cache": true,
            "torch_dtype": "bfloat16",
        })
    }

    /// Expected Hugging Face name and shape of a GGUF tensor, and the head count whose
    /// rope permutation must be undone (for `attn_q` / `attn_k`).
    fn map_tensor(&self, gguf_name: &str) -> Option<(String, Vec<usize>, Option<usize>)> {
        let (h, kv, hd) = (self.hidden, self.kv_heads * self.head_dim, self.head_dim);
        let q = self.heads * hd;
        match gguf_name {
            "token_embd.weight" => {
                return Some((
                    "model.embed_tokens.weight".into(),
                    vec![self.vocab_size, h],
                    None,
                ))
            }
            "output_norm.weight" => return Some(("model.norm.weight".into(), vec![h], None)),
            "output.weight" => {
                return Some(("lm_head.weight".into(), vec![self.vocab_size, h], None))
            }
            _ => {}
        }
        let rest = gguf_name.strip_prefix("blk.")?;
        let (layer, suffix) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        if layer >= self.num_layers {
            return None;
        }
        let (hf, shape, perm) = match suffix {
            "attn_q.weight" => ("self_attn.q_proj.weight", vec![q, h], Some(self.heads)),
            "attn_k.weight" => ("self_attn.k_proj.weight", vec![kv, h], Some(self.kv_heads)),
            "attn_v.weight" => ("self_attn.v_proj.weight", vec![kv, h], None),
            "attn_output.weight" => ("self_attn.o_proj.weight", vec![h, q], None),
            "ffn_gate.weight" => ("mlp.gate_proj.weight", vec![self.intermediate, h], None),
            "ffn_up.weight" => ("mlp.up_proj.weight", vec![self.intermediate, h], None),
            "ffn_down.weight" => ("mlp.down_proj.weight", vec![h, self.intermediate], None),
            "attn_norm.weight" => ("input_layernorm.weight", vec![h], None),
            "ffn_norm.weight" => ("post_attention_layernorm.weight", vec![h], None),
            _ => return None,
        };
        Some((format!("model.layers.{layer}.{hf}"), shape, perm))
    }
}

/// The Qwen2 pre-tokenizer regex (also in Qwen3's `tokenizer.json`).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token type of a control (special) token in `tokenizer.ggml.token_type`.
const TOKEN_CONTROL: i64 = 3;
/// Token type of a user-defined added token.
const TOKEN_USER_DEFINED: i64 = 4;

fn token_type(v: &MetaValue) -> Option<i64> {
    match *v {
        MetaValue::I32(t) => Some(t.into()),
        _ => v.as_u64().and_then(|t| i64::try_from(t).ok()),
    }
}

fn string_list<'a>(g: &'a Gguf, key: &str) -> Result<Vec<&'a str>, ImportError> {
    let err = || ImportError::Metadata {
        key: key.into(),
        expected: "an array of strings",
    };
    meta(g, key)
        .and_then(MetaValue::as_array)
        .ok_or_else(err)?
        .iter()
        .map(|v| v.as_str().ok_or_else(err))
        .collect()
}

/// Rebuilds a Hugging Face `tokenizer.json` (byte-level BPE) from the GGUF vocabulary,
/// merges and token types; control tokens become special added tokens, user-defined
/// ones non-special added tokens. Supports `tokenizer.ggml.model = "gpt2"` with the
/// `smollm`, `gpt2`/`default` and `qwen2` pre-tokenizers.
pub fn tokenizer_json_from_gguf(g: &Gguf) -> Result<Value, ImportError> {
    let model = meta(g, "tokenizer.ggml.model")
        .and_then(MetaValue::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(ImportError::UnsupportedTokenizer {
            what: "tokenizer.ggml.model",
            detail: format!("{model:?} (only \"gpt2\", byte-level BPE, is)"),
        });
    }
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre = meta(g, "tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
    let (normalizer, pre_tokenizer) = match pre {
        "smollm" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
        ),
        "gpt2" | "default" => (Value::Null, byte_level(true)),
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]}),
        ),
        other => {
            return Err(ImportError::UnsupportedTokenizer {
                what: "tokenizer.ggml.pre",
                detail: format!(
                    "{other:?} (supported: \"smollm\", \"gpt2\", \"default\", \"qwen2\")"
                ),
            })
        }
    };
    let tokens = string_list(g, "tokenizer.ggml.tokens")?;
    let merges = string_list(g, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match meta(g, "tokenizer.ggml.token_type").and_then(MetaValue::as_array) {
        Some(list) => list.iter().map(|v| token_type(v).unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(ImportError::Metadata {
            key: "tokenizer.ggml.token_type".into(),
            expected: "an array as long as tokenizer.ggml.tokens",
        });
    }
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        if vocab.insert(tok.to_string(), json!(id)).is_some() {
            return Err(ImportError::Metadata {
                key: "tokenizer.ggml.tokens".into(),
                expected: "an array of distinct tokens",
            });
        }
        if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == TOKEN_CONTROL,
            }));
        }
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    }))
}

fn token_id(g: &Gguf, key: &str) -> Option<u64> {
    meta(g, key).and_then(MetaValue::as_u64)
}

/// `tokenizer_config.json` from the GGUF special-token ids and chat template.
fn tokenizer_config(g: &Gguf, params: &LlamaParams) -> Value {
    let tokens = meta(g, "tokenizer.ggml.tokens").and_then(MetaValue::as_array);
    let name = |key: &str| -> Value {
        token_id(g, key)
            .and_then(|id| tokens?.get(usize::try_from(id).ok()?)?.as_str())
            .map_or(Value::Null, |s| Value::String(s.into()))
    };
    let flag =
        |key: &str, default: bool| meta(g, key).and_then(MetaValue::as_bool).unwrap_or(default);
    let mut config = json!({
        "add_bos_token": flag("tokenizer.ggml.add_bos_token", false),
        "add_eos_token": flag("tokenizer.ggml.add_eos_token", false),
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "clean_up_tokenization_spaces": false,
        "model_max_length": params.max_position_embeddings,
        "tokenizer_class": "GPT2Tokenizer",
    });
    if let Some(t) = meta(g, "tokenizer.chat_template").and_then(MetaValue::as_str) {
        config["chat_template"] = Value::String(t.into());
    }
    config
}

/// safetensors writes through a private (0600) temporary file; give the checkpoint the
/// usual 0644 so a server running as another user can read it.
#[cfg(unix)]
fn readable_by_all(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

#[cfg(not(unix))]
fn readable_by_all(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ImportError> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| ImportError::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

fn write_json(path: &Path, value: &Value) -> Result<(), ImportError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ImportError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_file(path, text.as_bytes())
}

/// Imports a Llama-architecture GGUF file (memory-mapped) into a Hugging Face directory
/// `out_dir` (created if needed): `model.safetensors` (BF16), `config.json`,
/// `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`.
pub fn import_gguf(path: &Path, out_dir: &Path) -> Result<ImportSummary, ImportError> {
    let file = GgufFile::open(path)?;
    let g = &file.gguf;
    let arch = meta(g, "general.architecture")
        .and_then(MetaValue::as_str)
        .unwrap_or("");
    if arch != "llama" {
        return Err(ImportError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            arch: arch.into(),
        });
    }
    let params = LlamaParams::from_gguf(g)?;
    let tokenizer = tokenizer_json_from_gguf(g)?;

    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(g.tensors.len());
    for t in &g.tensors {
        let (hf_name, expected, perm) =
            params
                .map_tensor(&t.name)
                .ok_or_else(|| ImportError::Tensor {
                    name: t.name.clone(),
                    problem: "no Hugging Face Llama tensor corresponds to this name".into(),
                })?;
        let shape = t.shape();
        if shape != expected {
            return Err(ImportError::Tensor {
                name: t.name.clone(),
                problem: format!("shape {shape:?}, but the metadata implies {expected:?}"),
            });
        }
        let mut values = file.dequantize(&t.name)?;
        if let Some(n_head) = perm {
            values = unpermute_qk(&values, shape[0], shape[1], n_head, &t.name)?;
        }
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        tensors.push((hf_name, shape, bytes));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for layer in 0..params.num_layers {
        let q = format!("model.layers.{layer}.self_attn.q_proj.weight");
        if tensors.binary_search_by(|t| t.0.as_str().cmp(&q)).is_err() {
            return Err(ImportError::Tensor {
                name: format!("blk.{layer}.attn_q.weight"),
                problem: format!("missing, but llama.block_count is {}", params.num_layers),
            });
        }
    }

    std::fs::create_dir_all(out_dir).map_err(|e| ImportError::Write {
        path: out_dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ImportError::Write {
            path: out_dir.join("model.safetensors"),
            message: e.to_string(),
        })?;
    let st_meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let st_path = out_dir.join("model.safetensors");
    let st_tmp = st_path.with_extension("partial");
    safetensors::tensor::serialize_to_file(views, Some(st_meta), &st_tmp)
        .map_err(|e| e.to_string())
        .and_then(|()| readable_by_all(&st_tmp).map_err(|e| e.to_string()))
        .and_then(|()| std::fs::rename(&st_tmp, &st_path).map_err(|e| e.to_string()))
        .map_err(|message| ImportError::Write {
            path: st_path.clone(),
            message,
        })?;

    let bos = token_id(g, "tokenizer.ggml.bos_token_id");
    let eos = token_id(g, "tokenizer.ggml.eos_token_id");
    let pad = token_id(g, "tokenizer.ggml.padding_token_id");
    write_json(
        &out_dir.join("config.json"),
        &params.hf_config(bos, eos, pad),
    )?;
    write_json(&out_dir.join("tokenizer.json"), &tokenizer)?;
    write_json(
        &out_dir.join("tokenizer_config.json"),
        &tokenizer_config(g, &params),
    )?;
    let mut generation = json!({"bos_token_id": bos, "eos_token_id": eos});
    if let Some(pad) = pad {
        generation["pad_token_id"] = json!(pad);
    }
    write_json(&out_dir.join("generation_config.json"), &generation)?;

    Ok(ImportSummary {
        out_dir: out_dir.to_path_buf(),
        params,
        tensors: tensors.into_iter().map(|(n, s, _)| (n, s)).collect(),
    })
}
