//! What ModelOpt 0.47's `export_hf_checkpoint` writes besides the tensors: the
//! `quantization_config` block of `config.json` and `hf_quant_config.json` (which tensors are
//! NVFP4-quantized is `qatflow_nvfp4::linears`). `quant_algo` is always plain `NVFP4` (vLLM refuses
//! `MIXED_PRECISION` in the seeds' builds, and `NVFP4_AWQ` everywhere).

use qatflow_nvfp4::BLOCK_SIZE;
use serde_json::{json, Map, Value};

/// ModelOpt's version whose format this exporter reproduces.
pub const MODELOPT_VERSION: &str = "0.47.0";

/// `producer.version` written into the configs: ModelOpt's version with qatflow as a PEP 440
/// local label, so tools that parse it still read 0.47.0.
pub fn producer_version() -> String {
    format!("{MODELOPT_VERSION}+qatflow.{}", env!("CARGO_PKG_VERSION"))
}

fn producer() -> Value {
    json!({"name": "modelopt", "version": producer_version()})
}

/// `hf_quant_config.json`.
pub fn hf_quant_config(exclude: &[String]) -> Value {
    json!({
        "producer": producer(),
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": null,
            "group_size": BLOCK_SIZE,
            "exclude_modules": exclude,
        }
    })
}

/// The `quantization_config` block ModelOpt appends to `config.json`.
pub fn quantization_config(exclude: &[String]) -> Value {
    let fp4 = json!({"dynamic": false, "num_bits": 4, "type": "float", "group_size": BLOCK_SIZE});
    json!({
        "config_groups": {
            "group_0": {
                "input_activations": fp4.clone(),
                "weights": fp4,
                "targets": ["Linear"],
            }
        },
        "ignore": exclude,
        "quant_algo": "NVFP4",
        "producer": producer(),
        "quant_method": "modelopt",
    })
}

/// The exported `config.json` as ModelOpt writes it: the source's, with `dtype` `bfloat16`
/// (the unquantized tensors are BF16) and the `quantization_config` block last.
pub fn export_config(source: &Map<String, Value>, exclude: &[String]) -> Value {
    let mut config = source.clone();
    config.insert("dtype".into(), json!("bfloat16"));
    if config.contains_key("torch_dtype") {
        config.insert("torch_dtype".into(), json!("bfloat16"));
    }
    config.shift_remove("quantization_config");
    config.insert("quantization_config".into(), quantization_config(exclude));
    Value::Object(config)
}

/// `model_type` of a text-only Qwen3.5 config, the one that gets the VL wrapper.
pub const QWEN3_5_TEXT: &str = "qwen3_5_text";

/// `model_type` of a config, if it has one.
pub fn model_type(config: &Map<String, Value>) -> Option<&str> {
    config.get("model_type").and_then(Value::as_str)
}

/// The VL wrapper vLLM needs to serve a text-only Qwen3.5 export (the seeds' cookbook,
/// "Export Gotchas" 4): `model_type` `qwen3_5`, architecture
/// `Qwen3_5ForConditionalGeneration`, and the exported text config (with its
/// `quantization_config`) as `text_config`. `tie_word_embeddings` is repeated at the top
/// level, where the wrapper's own default would otherwise apply.
pub fn vl_wrapper_config(text_config: Value) -> Value {
    let mut wrapper = Map::new();
    wrapper.insert("model_type".into(), json!("qwen3_5"));
    if let Some(tie) = text_config.get("tie_word_embeddings") {
        wrapper.insert("tie_word_embeddings".into(), tie.clone());
    }
    wrapper.insert("text_config".into(), text_config);
    wrapper.insert(
        "architectures".into(),
        json!(["Qwen3_5ForConditionalGeneration"]),
    );
    Value::Object(wrapper)
}

/// The `preprocessor_config.json` stub that vLLM's Qwen3.5 conditional-generation model
/// expects to find (cookbook "Export Gotchas" 5): the Qwen3-VL image processor settings
/// (patch 16, merge 2, temporal patch 2, mean/std 0.5). It is only read when images are
/// served; text-only serving (`--language-model-only`) needs only that it exists.
pub fn preprocessor_config() -> Value {
    json!({
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "merge_size": 2,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": 16777216, "shortest_edge": 65536}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vl_wrapper_nests_the_text_config() {
        let text = json!({"model_type": QWEN3_5_TEXT, "tie_word_embeddings": false});
        let w = vl_wrapper_config(text.clone());
        assert_eq!(w["model_type"], "qwen3_5");
        assert_eq!(
            w["architectures"],
            json!(["Qwen3_5ForConditionalGeneration"])
        );
        assert_eq!(w["text_config"], text);
        assert_eq!(w["tie_word_embeddings"], false);
    }

    #[test]
    fn producer_version_keeps_modelopt_version() {
        assert!(producer_version().starts_with("0.47.0+qatflow."));
        assert_eq!(
            hf_quant_config(&[])["quantization"]["quant_algo"],
            json!("NVFP4")
        );
    }
}
