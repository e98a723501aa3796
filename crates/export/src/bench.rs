//! Random-init checkpoints of a given decoder configuration, for benchmarking the exporter
//! (`qatflow bench-export`): BF16 weights from a seeded generator, written tensor by tensor,
//! with weight amax `max|W|` and made-up input amaxes (group rule applied).

use std::collections::BTreeMap;
use std::path::Path;

use qatflow_checkpoint::st::TensorSpec;
use qatflow_checkpoint::{
    CheckpointInfo, CheckpointWriter, TensorEntry, MODEL_FILE, QUANTIZERS_FILE,
};
use qatflow_nvfp4::keys::{key, INPUT_AMAX, WEIGHT_AMAX};
use qatflow_nvfp4::linears::quantized_module;
use safetensors::Dtype;
use serde_json::{json, Value};

use crate::error::ExportError;

/// `config.json` of Qwen3-1.7B (hidden 2048, intermediate 6144, 28 layers, 16 heads, 8 KV
/// heads, head_dim 128, vocabulary 151936, tied embeddings).
pub fn qwen3_1_7b_config() -> Value {
    json!({
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 6144,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": null,
        "rope_theta": 1000000,
        "sliding_window": null,
        "tie_word_embeddings": true,
        "dtype": "bfloat16",
        "use_cache": true,
        "use_sliding_window": false,
        "vocab_size": 151936
    })
}

/// `config.json` of Qwen3-0.6B (hidden 1024, intermediate 3072, 28 layers, 16 heads, 8 KV
/// heads, head_dim 128, vocabulary 151936, tied embeddings): a faster benchmark.
pub fn qwen3_0_6b_config() -> Value {
    let mut c = qwen3_1_7b_config();
    c["hidden_size"] = json!(1024);
    c["intermediate_size"] = json!(3072);
    c
}

fn dim(config: &Value, key: &str) -> Result<usize, ExportError> {
    config
        .get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| ExportError::BadInput {
            path: "config.json".into(),
            problem: format!("`{key}` is missing or not a number"),
        })
}

/// Names and shapes of every parameter of a Llama/Qwen3-style decoder `config`.
pub fn parameter_shapes(config: &Value) -> Result<Vec<(String, Vec<usize>)>, ExportError> {
    let h = dim(config, "hidden_size")?;
    let inter = dim(config, "intermediate_size")?;
    let layers = dim(config, "num_hidden_layers")?;
    let heads = dim(config, "num_attention_heads")?;
    let kv = dim(config, "num_key_value_heads")?;
    let hd = config
        .get("head_dim")
        .and_then(Value::as_u64)
        .map_or(h / heads, |v| v as usize);
    let vocab = dim(config, "vocab_size")?;
    let qk_norm = config.get("model_type").and_then(Value::as_str) == Some("qwen3");
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![vocab, h])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![heads * hd, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv * hd, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv * hd, h]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, heads * hd]));
        if qk_norm {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
        }
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![inter, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, inter]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if config.get("tie_word_embeddings").and_then(Value::as_bool) != Some(true) {
        out.push(("lm_head.weight".to_string(), vec![vocab, h]));
    }
    Ok(out)
}

/// xorshift64*: a fast, seeded generator (benchmark data needs speed, not quality).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Roughly normal with standard deviation `std` (sum of four uniforms).
    fn normal(&mut self, std: f32) -> f32 {
        let r = self.next();
        let s: u32 = (0..4).map(|i| ((r >> (16 * i)) & 0xFFFF) as u32).sum();
        (s as f32 / 65535.0 - 2.0) * std * 1.732
    }
}

/// Writes a random-init checkpoint of `config` at `step` into `run_dir` (BF16 weights, norm
/// weights 1, quantizer amaxes), tensor by tensor: memory stays at one chunk.
pub fn write_random_checkpoint(
    run_dir: &Path,
    config: &Value,
    step: u64,
    seed: u64,
) -> Result<CheckpointInfo, ExportError> {
    let shapes = parameter_shapes(config)?;
    let mut w = CheckpointWriter::create(run_dir, step)?;
    let specs = shapes
        .iter()
        .map(|(n, s)| TensorSpec {
            name: n.clone(),
            dtype: Dtype::BF16,
            shape: s.clone(),
        })
        .collect();
    let model = w.create_safetensors(MODEL_FILE, specs)?;
    let mut rng = Rng(seed | 1);
    let mut weight_amax = BTreeMap::new();
    let mut input_amax = BTreeMap::new();
    const CHUNK: usize = 1 << 20;
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        let is_norm = shape.len() == 1;
        let mut amax = 0f32;
        let mut done = 0;
        while done < n {
            let len = CHUNK.min(n - done);
            let mut bytes = Vec::with_capacity(len * 2);
            for _ in 0..len {
                let v = if is_norm {
                    half::bf16::ONE
                } else {
                    half::bf16::from_f32(rng.normal(0.02))
                };
                amax = amax.max(v.to_f32().abs());
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            model.write_chunk(name, (done * 2) as u64, &bytes)?;
            done += len;
        }
        if let Some(module) = quantized_module(name, shape) {
            weight_amax.insert(module.to_owned(), amax);
            input_amax.insert(module.to_owned(), 1.0 + (rng.next() % 2000) as f32 / 100.0);
        }
    }
    model.finish()?;
    let weight_amax = qatflow_model::apply_group_rule(&weight_amax);
    let input_amax = qatflow_model::apply_group_rule(&input_amax);
    let mut q = Vec::new();
    for (m, a) in &weight_amax {
        q.push(TensorEntry::scalar_f32(key(m, WEIGHT_AMAX), *a));
        q.push(TensorEntry::scalar_f32(key(m, INPUT_AMAX), input_amax[m]));
    }
    w.write_safetensors(QUANTIZERS_FILE, &q)?;
    let bytes = serde_json::to_vec_pretty(config).expect("a config serializes");
    w.write_bytes("config.json", &bytes)?;
    Ok(w.commit("bench")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_1_7b_has_1_7b_parameters() {
        let shapes = parameter_shapes(&qwen3_1_7b_config()).unwrap();
        let n: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        // Qwen3-1.7B: 1.72 B parameters with tied embeddings.
        assert!((1_700_000_000..1_730_000_000).contains(&n), "{n}");
        assert!(!shapes.iter().any(|(n, _)| n == "lm_head.weight"));
        let small: usize = parameter_shapes(&qwen3_0_6b_config())
            .unwrap()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        // Qwen3-0.6B: 0.6 B parameters (0.44 B without the embedding).
        assert!((590_000_000..610_000_000).contains(&small), "{small}");
    }
}
