//! Model hyperparameters read from a Hugging Face `config.json` (Llama, Qwen3 dense and the
//! Qwen3.5 hybrid, text-only `qwen3_5_text` or the `text_config` of a `qwen3_5` VL config),
//! accepting both transformers v4 (`rope_theta`, `rope_scaling`) and v5
//! (`rope_parameters`) spellings of the rotary embedding settings.

use std::path::{Path, PathBuf};

use qatflow_nvfp4::linears::{ArchLinears, DENSE, QWEN3_5};
use serde_json::Value;

/// Errors of reading a `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}; a Hugging Face model directory needs a config.json")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{path}: not valid JSON: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A required field is absent (or has the wrong JSON type).
    #[error("{path}: field `{field}` is missing or not {expected}; add it to config.json (see the model's Hugging Face config)")]
    MissingField {
        /// The file (or `<inline>`).
        path: PathBuf,
        /// The field.
        field: String,
        /// The JSON type expected.
        expected: &'static str,
    },
    /// A field has a value this crate cannot run.
    #[error("{path}: {problem}")]
    Unsupported {
        /// The file (or `<inline>`).
        path: PathBuf,
        /// What is not supported, and what is.
        problem: String,
    },
}

/// The decoder architectures this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Architecture {
    /// `LlamaForCausalLM` (SmolLM2 and Llama 2/3).
    Llama,
    /// `Qwen3ForCausalLM` (dense Qwen3: per-head q/k RMSNorm).
    Qwen3,
    /// Qwen3.5 (`qwen3_5_text`, or a `qwen3_5` VL config's text model): Gated DeltaNet
    /// linear-attention layers mixed with gated full-attention layers.
    Qwen35,
}

impl Architecture {
    /// The linears NVFP4 quantizes in this architecture, and their shared-input groups
    /// (`qatflow_nvfp4::linears`' table).
    pub fn nvfp4_linears(self) -> &'static ArchLinears {
        match self {
            Architecture::Llama | Architecture::Qwen3 => &DENSE,
            Architecture::Qwen35 => &QWEN3_5,
        }
    }
}

/// The token mixer of one Qwen3.5 decoder layer (`layer_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LayerKind {
    /// `linear_attention`: a Gated DeltaNet.
    LinearAttention,
    /// `full_attention`: gated softmax attention with partial RoPE.
    FullAttention,
}

/// The Qwen3.5-specific hyperparameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HybridConfig {
    /// The mixer of each layer (`layer_types`, or every `full_attention_interval`-th layer
    /// full attention when absent).
    pub layer_types: Vec<LayerKind>,
    /// Gated DeltaNet key (query/key) heads (`linear_num_key_heads`).
    pub linear_num_key_heads: usize,
    /// Gated DeltaNet value heads (`linear_num_value_heads`, a multiple of the key heads).
    pub linear_num_value_heads: usize,
    /// Width of a key head (`linear_key_head_dim`).
    pub linear_key_head_dim: usize,
    /// Width of a value head (`linear_value_head_dim`).
    pub linear_value_head_dim: usize,
    /// Kernel width of the depthwise causal convolution (`linear_conv_kernel_dim`).
    pub linear_conv_kernel_dim: usize,
    /// Rotated dimensions of each attention head: `head_dim × partial_rotary_factor`.
    pub rotary_dim: usize,
    /// `q_proj` also produces a sigmoid output gate per head (`attn_output_gate`).
    pub attn_output_gate: bool,
}

impl HybridConfig {
    /// Total key width `linear_num_key_heads × linear_key_head_dim` (of q and of k).
    pub fn key_dim(&self) -> usize {
        self.linear_num_key_heads * self.linear_key_head_dim
    }

    /// Total value width `linear_num_value_heads × linear_value_head_dim`.
    pub fn value_dim(&self) -> usize {
        self.linear_num_value_heads * self.linear_value_head_dim
    }

    /// Channels of `in_proj_qkv` and the convolution: `2 × key_dim + value_dim`.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
}

/// Frequency scaling of the rotary embedding (`rope_type`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RopeScaling {
    /// `default`: `inv_freq[i] = theta^(-2i/d)`.
    None,
    /// `linear`: every inverse frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// `llama3`: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: f64,
    },
}

/// Rotary position embedding settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RopeConfig {
    /// Base of the inverse frequencies.
    pub theta: f64,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

/// Hyperparameters of a decoder-only model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// The architecture (`model_type`).
    pub architecture: Architecture,
    /// Rows of the embedding and the LM head.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head (Qwen3: independent of `hidden_size / num_heads`).
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Rotary embedding.
    pub rope: RopeConfig,
    /// The LM head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// End-of-sequence ids from config.json (`eos_token_id`, number or list).
    pub eos_token_ids: Vec<u32>,
    /// Qwen3.5's layer pattern and Gated DeltaNet shapes (`None` for other architectures).
    #[serde(default)]
    pub hybrid: Option<HybridConfig>,
}

struct Fields<'a> {
    json: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn missing(&self, field: &str, expected: &'static str) -> ConfigError {
        ConfigError::MissingField {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            expected,
        }
    }

    fn usize(&self, field: &str) -> Result<usize, ConfigError> {
        self.json
            .get(field)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| self.missing(field, "a non-negative integer"))
    }

    fn f64_or(&self, field: &str, default: f64) -> Result<f64, ConfigError> {
        match self.json.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.missing(field, "a number")),
        }
    }

    fn unsupported(&self, problem: String) -> ConfigError {
        ConfigError::Unsupported {
            path: self.path.to_path_buf(),
            problem,
        }
    }
}

fn rope_config(f: &Fields<'_>) -> Result<RopeConfig, ConfigError> {
    // v5: `rope_parameters` holds the type, theta and scaling keys; v4: top-level
    // `rope_theta` plus an optional `rope_scaling` object.
    let params = f.json.get("rope_parameters").filter(|v| v.is_object());
    let scaling = params.or_else(|| f.json.get("rope_scaling").filter(|v| v.is_object()));
    let theta = match params.and_then(|p| p.get("rope_theta")) {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| f.missing("rope_parameters.rope_theta", "a number"))?,
        None => f
            .json
            .get("rope_theta")
            .and_then(Value::as_f64)
            .ok_or_else(|| f.missing("rope_theta", "a number"))?,
    };
    let Some(s) = scaling else {
        return Ok(RopeConfig {
            theta,
            scaling: RopeScaling::None,
        });
    };
    let sub = Fields {
        json: s,
        path: f.path,
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = || {
        s.get("factor")
            .and_then(Value::as_f64)
            .ok_or_else(|| f.missing("rope_scaling.factor", "a number"))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: sub.f64_or("low_freq_factor", 1.0)?,
            high_freq_factor: sub.f64_or("high_freq_factor", 4.0)?,
            original_max_position_embeddings: s
                .get("original_max_position_embeddings")
                .and_then(Value::as_f64)
                .ok_or_else(|| {
                    f.missing("rope_scaling.original_max_position_embeddings", "a number")
                })?,
        },
        other => {
            return Err(f.unsupported(format!(
                "rope_type {other:?} is not implemented; supported: default, linear, llama3"
            )))
        }
    };
    Ok(RopeConfig { theta, scaling })
}

fn id_list(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|v| v as u32).into_iter().collect(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

/// Qwen3.5's fields, with transformers' defaults (`configuration_qwen3_5.py`) where absent.
fn hybrid_config(f: &Fields<'_>, base: &ModelConfig) -> Result<HybridConfig, ConfigError> {
    let usize_or = |field: &str, default: usize| match f.json.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(_) => f.usize(field),
    };
    let layer_types = match f.json.get("layer_types") {
        None | Some(Value::Null) => {
            let interval = usize_or("full_attention_interval", 4)?.max(1);
            (0..base.num_layers)
                .map(|i| {
                    if (i + 1) % interval == 0 {
                        LayerKind::FullAttention
                    } else {
                        LayerKind::LinearAttention
                    }
                })
                .collect()
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v.as_str() {
                Some("linear_attention") => Ok(LayerKind::LinearAttention),
                Some("full_attention") => Ok(LayerKind::FullAttention),
                _ => Err(f.unsupported(format!(
                    "layer_types entry {v} is not implemented; supported: linear_attention, full_attention"
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(f.missing("layer_types", "an array of strings")),
    };
    // v5 puts partial_rotary_factor into rope_parameters as well; either place counts.
    let factor = match f
        .json
        .get("rope_parameters")
        .and_then(|p| p.get("partial_rotary_factor"))
    {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| f.missing("rope_parameters.partial_rotary_factor", "a number"))?,
        None => f.f64_or("partial_rotary_factor", 0.25)?,
    };
    // `mrope_section` (M-RoPE) is ignored: text-only positions give every section the
    // same 1-D position, which is exactly ordinary RoPE.
    let linear_num_key_heads = usize_or("linear_num_key_heads", 16)?;
    Ok(HybridConfig {
        layer_types,
        linear_num_key_heads,
        linear_num_value_heads: usize_or("linear_num_value_heads", 32)?,
        linear_key_head_dim: usize_or("linear_key_head_dim", 128)?,
        linear_value_head_dim: usize_or("linear_value_head_dim", 128)?,
        linear_conv_kernel_dim: usize_or("linear_conv_kernel_dim", 4)?,
        rotary_dim: (base.head_dim as f64 * factor) as usize,
        attn_output_gate: f
            .json
            .get("attn_output_gate")
            .and_then(Value::as_bool)
            .unwrap_or(true),
    })
}

impl ModelConfig {
    /// Reads `config.json` of a model directory.
    pub fn from_file(path: &Path) -> Result<ModelConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| ConfigError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        ModelConfig::from_json(&json, path)
    }

    /// Parses a config.json value; `path` is only used in error messages.
    pub fn from_json(json: &Value, path: &Path) -> Result<ModelConfig, ConfigError> {
        let outer = Fields { json, path };
        let model_type = json
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| outer.missing("model_type", "a string"))?;
        if model_type == "qwen3_5" {
            // The VL wrapper: the language model is described by `text_config`; its
            // end-of-sequence ids and tying may also be set at the top level.
            let text = json
                .get("text_config")
                .filter(|t| t.is_object())
                .ok_or_else(|| outer.missing("text_config", "an object"))?;
            let mut text = text.clone();
            if text.get("model_type").is_none() {
                text["model_type"] = Value::from("qwen3_5_text");
            }
            let mut config = ModelConfig::from_json(&text, path)?;
            if config.architecture != Architecture::Qwen35 {
                return Err(outer.unsupported(format!(
                    "text_config.model_type of a qwen3_5 config must be qwen3_5_text, not {:?}",
                    text["model_type"]
                )));
            }
            if text
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .is_none()
            {
                if let Some(tie) = json.get("tie_word_embeddings").and_then(Value::as_bool) {
                    config.tie_word_embeddings = tie;
                }
            }
            for id in id_list(json.get("eos_token_id")) {
                if !config.eos_token_ids.contains(&id) {
                    config.eos_token_ids.push(id);
                }
            }
            return Ok(config);
        }
        let f = outer;
        let architecture = match model_type {
            "llama" => Architecture::Llama,
            "qwen3" => Architecture::Qwen3,
            "qwen3_5_text" => Architecture::Qwen35,
            other => {
                return Err(f.unsupported(format!(
                    "model_type {other:?} is not implemented; supported: llama, qwen3, qwen3_5_text, qwen3_5"
                )))
            }
        };
        for (field, what) in [
            ("attention_bias", "attention biases"),
            ("mlp_bias", "MLP biases"),
        ] {
            if json.get(field).and_then(Value::as_bool) == Some(true) {
                return Err(f.unsupported(format!("{field}: true ({what}) is not implemented")));
            }
        }
        if let Some(act) = json.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(f.unsupported(format!(
                    "hidden_act {act:?} is not implemented; only silu (SwiGLU)"
                )));
            }
        }
        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = match json.get("num_key_value_heads") {
            None | Some(Value::Null) => num_heads,
            Some(_) => f.usize("num_key_value_heads")?,
        };
        let head_dim = match json.get("head_dim") {
            None | Some(Value::Null) if num_heads > 0 => hidden_size / num_heads,
            _ => f.usize("head_dim")?,
        };
        let config = ModelConfig {
            architecture,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_layers: f.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: json
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .ok_or_else(|| f.missing("rms_norm_eps", "a number"))?,
            rope: rope_config(&f)?,
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_position_embeddings: json
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map_or(4096, |v| v as usize),
            eos_token_ids: id_list(json.get("eos_token_id")),
            hybrid: None,
        };
        let config = ModelConfig {
            hybrid: match architecture {
                Architecture::Qwen35 => Some(hybrid_config(&f, &config)?),
                _ => None,
            },
            ..config
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |problem: String| ConfigError::Unsupported {
            path: path.to_path_buf(),
            problem,
        };
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0
        {
            return Err(bad(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            )));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return Err(bad(format!(
                "head_dim {} must be even and positive (rotary halves)",
                self.head_dim
            )));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return Err(bad(
                "vocab_size, hidden_size and num_hidden_layers must be positive".into(),
            ));
        }
        if let Some(h) = &self.hybrid {
            if h.layer_types.len() != self.num_layers {
                return Err(bad(format!(
                    "layer_types has {} entries for num_hidden_layers {}",
                    h.layer_types.len(),
                    self.num_layers
                )));
            }
            if h.linear_num_key_heads == 0 || h.linear_num_value_heads % h.linear_num_key_heads != 0
            {
                return Err(bad(format!(
                    "linear_num_value_heads {} must be a positive multiple of linear_num_key_heads {}",
                    h.linear_num_value_heads, h.linear_num_key_heads
                )));
            }
            if h.linear_key_head_dim == 0
                || h.linear_value_head_dim == 0
                || h.linear_conv_kernel_dim == 0
            {
                return Err(bad(
                    "linear_key_head_dim, linear_value_head_dim and linear_conv_kernel_dim must be positive"
                        .into(),
                ));
            }
            if h.rotary_dim % 2 != 0 || h.rotary_dim > self.head_dim {
                return Err(bad(format!(
                    "head_dim {} × partial_rotary_factor gives {} rotary dimensions; it must be even and at most head_dim",
                    self.head_dim, h.rotary_dim
                )));
            }
        }
        Ok(())
    }

    /// Query heads per key/value head.
    pub fn n_rep(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn qwen3() -> Value {
        json!({
            "model_type": "qwen3", "vocab_size": 2048, "hidden_size": 256,
            "intermediate_size": 768, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": false, "max_position_embeddings": 512,
        })
    }

    #[test]
    fn reads_v5_rope_parameters() {
        let c = ModelConfig::from_json(&qwen3(), Path::new("config.json")).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen3);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.rope.theta, 10000.0);
        assert_eq!(c.rope.scaling, RopeScaling::None);
        assert_eq!(c.n_rep(), 2);
    }

    #[test]
    fn reads_v4_rope_theta_and_llama3_scaling() {
        let mut j = qwen3();
        let o = j.as_object_mut().unwrap();
        o.remove("rope_parameters");
        o.insert("model_type".into(), json!("llama"));
        o.insert("rope_theta".into(), json!(500000.0));
        o.insert(
            "rope_scaling".into(),
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        );
        o.remove("head_dim");
        let c = ModelConfig::from_json(&j, Path::new("c.json")).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.rope.theta, 500000.0);
        assert!(matches!(
            c.rope.scaling,
            RopeScaling::Llama3 { factor, .. } if factor == 8.0
        ));
    }

    #[test]
    fn missing_field_is_named() {
        let mut j = qwen3();
        j.as_object_mut().unwrap().remove("intermediate_size");
        let err = ModelConfig::from_json(&j, Path::new("dir/config.json")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::MissingField { field, .. } if field == "intermediate_size"),
            "{err}"
        );
        assert!(err.to_string().contains("dir/config.json"));
    }

    #[test]
    fn unsupported_values_are_errors() {
        let mut j = qwen3();
        j["model_type"] = json!("gpt2");
        assert!(ModelConfig::from_json(&j, Path::new("c")).is_err());
        let mut j = qwen3();
        j["rope_parameters"] = json!({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0});
        let err = ModelConfig::from_json(&j, Path::new("c")).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
        let mut j = qwen3();
        j["num_key_value_heads"] = json!(3);
        assert!(ModelConfig::from_json(&j, Path::new("c")).is_err());
    }
}
