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

/// Modules ModelOpt always leaves unquantized (BF16) and lists first in `exclude_modules`.
pub const EXCLUDE_MODULES: &[&str] = &["lm_head", "model.embed_tokens"];

/// Last name component of the linears NVFP4 quantizes: attention and MLP projections, and
/// Qwen3.5's Gated DeltaNet projections `in_proj_qkv`, `in_proj_z` and `out_proj`.
pub const QUANTIZED_LINEARS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "in_proj_qkv",
    "in_proj_z",
    "out_proj",
];

/// Last name component of the decoder-layer modules ModelOpt leaves in BF16 and names in
/// `exclude_modules`: Qwen3.5's depthwise `conv1d` and the tiny `in_proj_a` / `in_proj_b`
/// (`[linear_num_value_heads, hidden]`) of its linear-attention layers.
pub const EXCLUDED_LAYER_MODULES: &[&str] = &["conv1d", "in_proj_a", "in_proj_b"];

/// Name prefixes of decoder layers: text-only checkpoints (`model.layers.`) and the
/// language model of a VL checkpoint (`model.language_model.layers.`).
pub const LAYER_PREFIXES: &[&str] = &["model.layers.", "model.language_model.layers."];

fn in_layer(module: &str) -> bool {
    LAYER_PREFIXES.iter().any(|p| module.starts_with(p))
}

/// The module name if `tensor` is the weight of a quantized linear
/// (`model.layers.N.….{q,k,v,o,gate,up,down}_proj.weight` or Qwen3.5's
/// `linear_attn.{in_proj_qkv,in_proj_z,out_proj}.weight`, of rank 2).
pub fn quantized_module<'a>(tensor: &'a str, shape: &[usize]) -> Option<&'a str> {
    let module = tensor.strip_suffix(".weight")?;
    let leaf = module.rsplit('.').next()?;
    (shape.len() == 2 && in_layer(module) && QUANTIZED_LINEARS.contains(&leaf)).then_some(module)
}

/// `exclude_modules` of a model with these tensor names: [`EXCLUDE_MODULES`], then every
/// module of [`EXCLUDED_LAYER_MODULES`] the model has, in name order (as ModelOpt lists them).
pub fn exclude_modules<'a>(tensor_names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut layers: Vec<String> = tensor_names
        .into_iter()
        .filter_map(|t| t.strip_suffix(".weight"))
        .filter(|m| {
            in_layer(m) && EXCLUDED_LAYER_MODULES.contains(&m.rsplit('.').next().unwrap_or(""))
        })
        .map(str::to_owned)
        .collect();
    layers.sort();
    layers.dedup();
    EXCLUDE_MODULES
        .iter()
        .map(|m| (*m).to_owned())
        .chain(layers)
        .collect()
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
            "group_size": 16,
            "exclude_modules": exclude,
        }
    })
}

/// The `quantization_config` block ModelOpt appends to `config.json`.
pub fn quantization_config(exclude: &[String]) -> Value {
    let fp4 = json!({"dynamic": false, "num_bits": 4, "type": "float", "group_size": 16});
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
        assert_eq!(
            q("model.layers.0.linear_attn.in_proj_qkv.weight"),
            Some("model.layers.0.linear_attn.in_proj_qkv")
        );
        assert_eq!(
            q("model.language_model.layers.2.linear_attn.out_proj.weight"),
            Some("model.language_model.layers.2.linear_attn.out_proj")
        );
        assert_eq!(q("model.layers.0.linear_attn.in_proj_a.weight"), None);
        assert_eq!(q("model.layers.0.linear_attn.conv1d.weight"), None);
        assert_eq!(q("mtp.layers.0.mlp.up_proj.weight"), None);
    }

    #[test]
    fn qwen3_5_exclusions_follow_the_tensors() {
        let names = [
            "model.layers.1.linear_attn.in_proj_b.weight",
            "model.layers.0.linear_attn.conv1d.weight",
            "model.layers.0.linear_attn.in_proj_a.weight",
            "model.layers.0.linear_attn.A_log",
            "model.layers.0.linear_attn.in_proj_qkv.weight",
            "model.layers.3.self_attn.q_proj.weight",
        ];
        assert_eq!(
            exclude_modules(names),
            [
                "lm_head",
                "model.embed_tokens",
                "model.layers.0.linear_attn.conv1d",
                "model.layers.0.linear_attn.in_proj_a",
                "model.layers.1.linear_attn.in_proj_b",
            ]
        );
        assert_eq!(
            exclude_modules(["model.layers.0.mlp.up_proj.weight"]),
            EXCLUDE_MODULES
        );
    }

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
