//! A tiny random Llama (GQA 4/2 heads, tied embeddings, Llama-3 RoPE scaling) written as
//! a BF16 safetensors file: loading, the KV cache against the full forward, tied vs
//! untied LM heads, and the F32/BF16 precisions.

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::{DType, Int, Tensor, TensorData};
use qatflow_model::expected_tensors;
use qatflow_model::weights::Checkpoint;
use qatflow_model::{CausalLm, LoadError, LoadOptions, ModelConfig, Precision};
use serde_json::json;

type B = Flex;

fn config(tied: bool) -> ModelConfig {
    ModelConfig::from_json(
        &json!({
            "model_type": "llama", "vocab_size": 96, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            "tie_word_embeddings": tied, "max_position_embeddings": 128,
        }),
        Path::new("config.json"),
    )
    .unwrap()
}

/// Writes deterministic pseudo-random BF16 weights for every tensor `config` needs.
fn write_weights(config: &ModelConfig, path: &Path) {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut tensors = Vec::new();
    for (name, shape, linear) in expected_tensors(config) {
        let name = if linear {
            format!("{name}.weight")
        } else {
            name
        };
        let n: usize = shape.iter().product();
        let norm = name.contains("norm");
        let bytes: Vec<u8> = (0..n)
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let v = if norm { 1.0 + 0.2 * u } else { 0.4 * u };
                half::bf16::from_f32(v).to_le_bytes()
            })
            .collect();
        tensors.push((name, shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn ids(v: &[u32]) -> Tensor<B, 2, Int> {
    let data: Vec<i32> = v.iter().map(|&t| t as i32).collect();
    Tensor::from_data(TensorData::new(data, [1, v.len()]), &Default::default())
}

fn floats(t: Tensor<B, 3>) -> Vec<f32> {
    t.cast(DType::F32).into_data().iter::<f32>().collect()
}

fn load(config: &ModelConfig, path: &Path, precision: Precision) -> CausalLm<B> {
    let ckpt = Checkpoint::from_files(&[path.to_path_buf()]).unwrap();
    CausalLm::from_checkpoint(
        config,
        &ckpt,
        LoadOptions {
            precision,
            ..LoadOptions::default()
        },
        &Default::default(),
    )
    .unwrap()
}

#[test]
fn tied_llama_kv_cache_matches_full_forward_in_both_precisions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let config = config(true);
    write_weights(&config, &path);
    let seq: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 96).collect();
    for (precision, tol) in [(Precision::F32, 1e-5), (Precision::Bf16, 0.1)] {
        let model = load(&config, &path, precision);
        assert_eq!(model.dtype(), precision.dtype());
        assert_eq!(
            floats(model.lm_head_weight().unsqueeze()),
            floats(model.embed_weight().unsqueeze()),
            "tied LM head is the embedding"
        );
        let full = floats(model.forward(ids(&seq), None));
        let mut cache = model.new_cache();
        let mut got = Vec::new();
        for (a, b) in [(0, 7)].into_iter().chain((7..24).map(|p| (p, p + 1))) {
            let h = model.forward_hidden(ids(&seq[a..b]), None, Some(&mut cache));
            got.extend(floats(model.logits(h)));
        }
        let diff = full
            .iter()
            .zip(&got)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= tol, "{precision:?}: max |Δ| = {diff}");
        assert!(full.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn untied_config_needs_an_lm_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_weights(&config(true), &path);
    let ckpt = Checkpoint::from_files(&[path]).unwrap();
    let err = CausalLm::<B>::from_checkpoint(
        &config(false),
        &ckpt,
        LoadOptions::default(),
        &Default::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, LoadError::Tensors { problems, .. } if problems.len() == 1 && problems[0].contains("`lm_head.weight`: missing")),
        "{err}"
    );
}
