//! What ModelOpt 0.47's `export_hf_checkpoint` writes besides the tensors: which tensors are
//! NVFP4-quantized, the `quantization_config` block of `config.json`, and
//! `hf_quant_config.json`. `quant_algo` is always plain `NVFP4` (vLLM refuses
//! `MIXED_PRECISION` in the seeds' builds, and `NVFP4_AWQ` everywhere).

use serde_json::{json, Map, Value};

/// ModelOpt's version whose format this exporter reproduces.
pub const MODELOPT_VERSION: &str = "0.47.0";

/// `producer.version` written into the configs: ModelOpt's version with qatflow as a PEP 440
/// local label, so tools that parse it still read 0.47.0.
pub fn producer_version() -> String {
    format!("{MODELOPT_VERSION}+qatflow.{}", env!("CARGO_PKG_VERSION"))
}

/// Modules ModelOpt leaves unquantized (BF16) in a dense decoder.
pub const EXCLUDE_MODULES: &[&str] = &["lm_head", "model.embed_tokens"];

/// Last name component of the linears NVFP4 quantizes (attention and MLP projections).
pub const QUANTIZED_LINEARS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The module name if `tensor` is the weight of a quantized linear
/// (`model.layers.N.….{q,k,v,o,gate,up,down}_proj.weight` of rank 2).
pub fn quantized_module<'a>(tensor: &'a str, shape: &[usize]) -> Option<&'a str> {
    let module = tensor.strip_suffix(".weight")?;
    let leaf = module.rsplit('.').next()?;
    (shape.len() == 2 && module.starts_with("model.layers.") && QUANTIZED_LINEARS.contains(&leaf))
        .then_some(module)
}

fn producer() -> Value {
    json!({"name": "modelopt", "version": producer_version()})
}

/// `hf_quant_config.json`.
pub fn hf_quant_config() -> Value {
    json!({
        "producer": producer(),
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": null,
            "group_size": 16,
            "exclude_modules": EXCLUDE_MODULES,
        }
    })
}

/// The `quantization_config` block ModelOpt appends to `config.json`.
pub fn quantization_config() -> Value {
    let fp4 = json!({"dynamic": false, "num_bits": 4, "type": "float", "group_size": 16});
    json!({
        "config_groups": {
            "group_0": {
                "input_activations": fp4.clone(),
                "weights": fp4,
                "targets": ["Linear"],
            }
        },
        "ignore": EXCLUDE_MODULES,
        "quant_algo": "NVFP4",
        "producer": producer(),
        "quant_method": "modelopt",
    })
}

/// The exported `config.json`: the source's, with `dtype` `bfloat16` (the unquantized
/// tensors are BF16, as ModelOpt writes them) and the `quantization_config` block last.
pub fn export_config(source: &Map<String, Value>) -> Value {
    let mut config = source.clone();
    config.insert("dtype".into(), json!("bfloat16"));
    if config.contains_key("torch_dtype") {
        config.insert("torch_dtype".into(), json!("bfloat16"));
    }
    config.shift_remove("quantization_config");
    config.insert("quantization_config".into(), quantization_config());
    Value::Object(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_modules_are_the_projections() {
        fn q(n: &str) -> Option<&str> {
            quantized_module(n, &[32, 16])
        }
        assert_eq!(
            q("model.layers.3.self_attn.k_proj.weight"),
            Some("model.layers.3.self_attn.k_proj")
        );
        assert_eq!(
            q("model.layers.0.mlp.down_proj.weight"),
            Some("model.layers.0.mlp.down_proj")
        );
        assert_eq!(q("lm_head.weight"), None);
        assert_eq!(q("model.embed_tokens.weight"), None);
        assert_eq!(q("model.layers.0.self_attn.q_norm.weight"), None);
        assert_eq!(q("model.layers.0.self_attn.q_proj.bias"), None);
        assert_eq!(
            quantized_module("model.layers.0.mlp.up_proj.weight", &[16]),
            None
        );
    }

    #[test]
    fn producer_version_keeps_modelopt_version() {
        assert!(producer_version().starts_with("0.47.0+qatflow."));
        assert_eq!(
            hf_quant_config()["quantization"]["quant_algo"],
            json!("NVFP4")
        );
    }
}
