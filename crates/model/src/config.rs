//! Model hyperparameters read from a Hugging Face `config.json` (Llama and Qwen3 dense),
//! accepting both transformers v4 (`rope_theta`, `rope_scaling`) and v5
//! (`rope_parameters`) spellings of the rotary embedding settings.

use std::path::{Path, PathBuf};

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
        let f = Fields { json, path };
        let model_type = json
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| f.missing("model_type", "a string"))?;
        let architecture = match model_type {
            "llama" => Architecture::Llama,
            "qwen3" => Architecture::Qwen3,
            other => {
                return Err(f.unsupported(format!(
                    "model_type {other:?} is not implemented; supported: llama, qwen3"
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
