//! The tiny random Qwen3 of the ModelOpt 0.47 fixtures (2 layers, hidden 256, 4/2 heads,
//! head_dim 64, vocab 2048) on the CPU `Flex` backend: logits against transformers 5.17
//! (float32), padded batches and the KV cache against the full forward, the NVFP4 export
//! against fake quantization and the BF16 model, sharded loading, evaluation, and load
//! errors.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{DType, Int, Tensor, TensorData};
use qatflow_model::eval::{eval_kld, eval_kld_many, eval_nll};
use qatflow_model::weights::Checkpoint;
use qatflow_model::{
    CausalLm, ConfigError, KvCache, LoadError, LoadOptions, ModelConfig, Precision,
};
use qatflow_nvfp4::QuantizerAmax;
use safetensors::SafeTensors;
use serde_json::Value;

type B = Flex;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn modelopt(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/modelopt-0.47.0")
        .join(file)
}

fn meta() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("qwen3_tiny_meta.json")).unwrap())
        .unwrap()
}

fn config() -> ModelConfig {
    ModelConfig::from_json(
        &meta()["source_config.json"],
        Path::new("qwen3_tiny_meta.json"),
    )
    .unwrap()
}

fn calib_ids() -> Vec<Vec<u32>> {
    serde_json::from_value(meta()["calib_ids"].clone()).unwrap()
}

fn load(file: &str, options: LoadOptions) -> CausalLm<B> {
    let ckpt = Checkpoint::from_files(&[modelopt(file)]).unwrap();
    CausalLm::from_checkpoint(&config(), &ckpt, options, &Default::default()).unwrap()
}

fn f32_options() -> LoadOptions {
    LoadOptions::default()
}

fn ids_tensor(seqs: &[Vec<u32>]) -> Tensor<B, 2, Int> {
    let width = seqs.iter().map(Vec::len).max().unwrap();
    let mut flat = vec![0i32; seqs.len() * width];
    for (b, s) in seqs.iter().enumerate() {
        for (p, &t) in s.iter().enumerate() {
            flat[b * width + p] = t as i32;
        }
    }
    Tensor::from_data(
        TensorData::new(flat, [seqs.len(), width]),
        &Default::default(),
    )
}

fn logits_vec(t: Tensor<B, 3>) -> Vec<f32> {
    t.cast(DType::F32).into_data().iter::<f32>().collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn hf_logits() -> Vec<f32> {
    let bytes = std::fs::read(fixtures().join("qwen3_tiny_hf_logits_f32.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor("logits").unwrap();
    assert_eq!(view.shape(), [4, 64, 2048]);
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn f32_logits_match_transformers() {
    let model = load("qwen3_tiny_bf16.safetensors", f32_options());
    let got = logits_vec(model.forward(ids_tensor(&calib_ids()), None));
    let diff = max_abs_diff(&got, &hf_logits());
    println!("qwen3_tiny f32 max |Δ| vs transformers 5.17: {diff:e}");
    assert!(diff <= 1e-3, "max |Δ| = {diff}");
}

#[test]
fn bf16_logits_stay_close_to_transformers_f32() {
    let model = load(
        "qwen3_tiny_bf16.safetensors",
        LoadOptions {
            precision: Precision::Bf16,
            ..LoadOptions::default()
        },
    );
    assert_eq!(model.dtype(), DType::BF16);
    let got = logits_vec(model.forward(ids_tensor(&calib_ids()), None));
    let diff = max_abs_diff(&got, &hf_logits());
    println!("qwen3_tiny bf16 max |Δ| vs transformers f32: {diff:e}");
    assert!(diff <= 0.05, "max |Δ| = {diff}");
}

#[test]
fn padded_batch_matches_single_sequences() {
    let model = load("qwen3_tiny_bf16.safetensors", f32_options());
    let ids = calib_ids();
    let seqs = vec![ids[0].clone(), ids[1][..37].to_vec(), ids[2][..5].to_vec()];
    let lengths: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let batch = logits_vec(model.forward(ids_tensor(&seqs), Some(&lengths)));
    for (b, s) in seqs.iter().enumerate() {
        let single = logits_vec(model.forward(ids_tensor(std::slice::from_ref(s)), None));
        let rows = &batch[b * 64 * 2048..][..s.len() * 2048];
        let diff = max_abs_diff(rows, &single);
        assert!(diff <= 1e-5, "sequence {b}: max |Δ| = {diff}");
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let model = load("qwen3_tiny_bf16.safetensors", f32_options());
    let seq = calib_ids()[3].clone();
    let full = logits_vec(model.forward(ids_tensor(std::slice::from_ref(&seq)), None));
    let mut cache: KvCache<B> = model.new_cache();
    let mut got = Vec::new();
    // A 20-token prefill, 10 single tokens, then a chunk of 34.
    for (start, end) in [(0, 20)]
        .into_iter()
        .chain((20..30).map(|p| (p, p + 1)))
        .chain([(30, 64)])
    {
        let hidden = model.forward_hidden(
            ids_tensor(&[seq[start..end].to_vec()]),
            None,
            Some(&mut cache),
        );
        got.extend(logits_vec(model.logits(hidden)));
        assert_eq!(cache.len(), end);
    }
    let diff = max_abs_diff(&got, &full);
    println!("KV cache vs full forward max |Δ|: {diff:e}");
    assert!(diff <= 1e-5, "max |Δ| = {diff}");
}

fn group_amax(model: &mut CausalLm<B>) -> Vec<(String, f32)> {
    let maxes: Vec<(String, f32)> = model
        .linears_mut()
        .into_iter()
        .map(|l| {
            let m = l.weight.val().abs().max().into_scalar();
            (l.name.clone(), m)
        })
        .collect();
    // q/k/v and gate/up read the same input: they share the group's largest amax.
    let group = |name: &str| {
        let (layer, tail) = name.rsplit_once('.').unwrap();
        let parent = layer.rsplit_once('.').unwrap().0;
        match tail {
            "q_proj" | "k_proj" | "v_proj" => ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|t| format!("{parent}.self_attn.{t}"))
                .collect::<Vec<_>>(),
            "gate_proj" | "up_proj" => ["gate_proj", "up_proj"]
                .iter()
                .map(|t| format!("{parent}.mlp.{t}"))
                .collect(),
            _ => vec![name.to_string()],
        }
    };
    maxes
        .iter()
        .map(|(name, _)| {
            let members = group(name);
            let amax = maxes
                .iter()
                .filter(|(n, _)| members.contains(n))
                .map(|(_, m)| *m)
                .fold(0f32, f32::max);
            (name.clone(), amax)
        })
        .collect()
}

#[test]
fn nvfp4_export_equals_fake_quantized_bf16_model() {
    // Weight-only (W4A16): the export's dequantized weights are exactly what QLinear's
    // weight fake quantizer makes of the BF16 weights with the group amax.
    let export = load(
        "qwen3_tiny_nvfp4.safetensors",
        LoadOptions {
            emulate_nvfp4_activations: false,
            ..LoadOptions::default()
        },
    );
    let mut fq = load("qwen3_tiny_bf16.safetensors", f32_options());
    for (name, amax) in group_amax(&mut fq) {
        let layer = fq
            .linears_mut()
            .into_iter()
            .find(|l| l.name == name)
            .unwrap();
        layer
            .set_fake_quant(QuantizerAmax {
                weight: Some(amax),
                input: None,
            })
            .unwrap();
    }
    let ids = ids_tensor(&calib_ids());
    let a = logits_vec(export.forward(ids.clone(), None));
    let b = logits_vec(fq.forward(ids, None));
    let diff = max_abs_diff(&a, &b);
    println!("NVFP4 export (W4A16) vs fake-quantized BF16 model max |Δ|: {diff:e}");
    assert!(diff <= 1e-5, "max |Δ| = {diff}");
}

#[test]
fn nvfp4_export_logits_are_close_to_bf16() {
    let bf16 = load("qwen3_tiny_bf16.safetensors", f32_options());
    let ids = ids_tensor(&calib_ids());
    let reference = logits_vec(bf16.forward(ids.clone(), None));
    // Measured: W4A16 max |Δ| 0.415, mean KL 0.0031; W4A4 0.523, 0.0053 (the random
    // model's logits have a standard deviation of 0.32, and its near-uniform next-token
    // distributions make top-1 agreement meaningless here).
    let mut previous = 0.0;
    for (label, emulate, margin, kl_margin) in
        [("W4A16", false, 0.5, 0.005), ("W4A4", true, 0.65, 0.008)]
    {
        let export = load(
            "qwen3_tiny_nvfp4.safetensors",
            LoadOptions {
                emulate_nvfp4_activations: emulate,
                ..LoadOptions::default()
            },
        );
        let got = logits_vec(export.forward(ids.clone(), None));
        let diff = max_abs_diff(&got, &reference);
        let kld = eval_kld(&bf16, &export, calib_ids()).unwrap();
        println!(
            "NVFP4 {label} vs BF16: max |Δlogit| {diff:.4}, mean KL {:.5}, p99 KL {:.5}, top-1 agreement {:.3}",
            kld.mean_kld, kld.p99_kld, kld.top1_agreement
        );
        assert!(diff > 0.0 && diff <= margin, "{label}: max |Δ| = {diff}");
        assert!(kld.mean_kld <= kl_margin, "{label}: {kld:?}");
        // The NLLs that come with the KL are `eval nll`'s.
        for (model, nll) in [(&bf16, kld.base_nll), (&export, kld.other_nll)] {
            let want = eval_nll(model, calib_ids()).unwrap().mean_nll;
            let got = nll.expect("sequences of two or more tokens");
            assert!(
                (got - want).abs() < 1e-6 * want.abs().max(1.0),
                "{label}: {got} vs {want}"
            );
        }
        assert!(
            kld.mean_kld > previous,
            "activation quantization adds error"
        );
        previous = kld.mean_kld;
    }
}

#[test]
fn eval_nll_matches_transformers_log_softmax() {
    let model = load("qwen3_tiny_bf16.safetensors", f32_options());
    let ids = calib_ids();
    let seqs = vec![ids[0].clone(), ids[1][..10].to_vec(), ids[2].clone()];
    let report = eval_nll(&model, seqs.clone()).unwrap();
    let hf = hf_logits();
    let (mut total, mut count) = (0f64, 0usize);
    for (s, (seq, got)) in seqs.iter().zip(&report.sequences).enumerate() {
        let row = [0, 1, 2][s];
        let mut sum = 0f64;
        for p in 0..seq.len() - 1 {
            let logits = &hf[(row * 64 + p) * 2048..][..2048];
            let max = logits
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = max
                + logits
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            sum += lse - logits[seq[p + 1] as usize] as f64;
        }
        let n = seq.len() - 1;
        assert_eq!(got.tokens, seq.len());
        assert!((got.mean_nll - sum / n as f64).abs() < 1e-4, "sequence {s}");
        total += sum;
        count += n;
    }
    assert_eq!(report.predicted_tokens, count);
    assert!((report.mean_nll - total / count as f64).abs() < 1e-4);
    assert!((report.perplexity - report.mean_nll.exp()).abs() < 1e-9);
    // A random model is close to uniform over 2048 tokens.
    assert!(report.perplexity > 1000.0, "{report:?}");
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["sequences"][1]["mean_nll"].is_number());
}

/// Several models against one base in one pass give each model's own `eval_kld` report.
#[test]
fn kld_of_several_models_in_one_pass_equals_one_at_a_time() {
    let bf16 = load("qwen3_tiny_bf16.safetensors", f32_options());
    let w4a4 = load(
        "qwen3_tiny_nvfp4.safetensors",
        LoadOptions {
            emulate_nvfp4_activations: true,
            ..LoadOptions::default()
        },
    );
    let w4a16 = load("qwen3_tiny_nvfp4.safetensors", LoadOptions::default());
    let options = qatflow_model::eval::EvalOptions::default();
    let many = eval_kld_many(&bf16, &[&w4a4, &bf16, &w4a16], calib_ids(), &options).unwrap();
    assert_eq!(many.len(), 3);
    for (got, other) in many.iter().zip([&w4a4, &bf16, &w4a16]) {
        let want = eval_kld(&bf16, other, calib_ids()).unwrap();
        assert_eq!(got.positions, want.positions);
        assert_eq!(got.base_nll, want.base_nll);
        for (a, b) in [
            (got.mean_kld, want.mean_kld),
            (got.p99_kld, want.p99_kld),
            (got.top1_agreement, want.top1_agreement),
            (got.other_nll.unwrap(), want.other_nll.unwrap()),
        ] {
            assert!(
                (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                "{got:?} vs {want:?}"
            );
        }
    }
    assert!(many[0].mean_kld > 0.0 && many[1].mean_kld.abs() < 1e-6);
}

#[test]
fn kld_of_a_model_with_itself_is_zero() {
    let model = load("qwen3_tiny_bf16.safetensors", f32_options());
    let r = eval_kld(&model, &model, calib_ids()).unwrap();
    assert_eq!(r.positions, 256);
    assert!(r.mean_kld.abs() < 1e-6 && r.p99_kld.abs() < 1e-6, "{r:?}");
    assert_eq!(r.top1_agreement, 1.0);
    assert_eq!(r.base_nll, r.other_nll);
    assert_eq!(
        eval_kld(&model, &model, vec![vec![1]]).unwrap().base_nll,
        None
    );
    assert!(eval_nll(&model, vec![vec![1]]).is_err());
    assert!(eval_nll(&model, vec![vec![1, 5000]]).is_err());
}

/// A Hugging Face directory with the tiny Qwen3's config.json and `files` copied in.
fn model_dir(files: &[(&str, PathBuf)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec_pretty(&meta()["source_config.json"]).unwrap(),
    )
    .unwrap();
    for (name, src) in files {
        std::fs::copy(src, dir.path().join(name)).unwrap();
    }
    dir
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let bytes = std::fs::read(modelopt("qwen3_tiny_bf16.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let dir = model_dir(&[]);
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.path().join(&file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), Value::String(file.clone()));
        }
    }
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": weight_map})).unwrap(),
    )
    .unwrap();
    let sharded = CausalLm::<B>::load(dir.path(), f32_options(), &Default::default()).unwrap();
    let single = load("qwen3_tiny_bf16.safetensors", f32_options());
    let ids = ids_tensor(&calib_ids()[..1]);
    assert_eq!(
        logits_vec(sharded.forward(ids.clone(), None)),
        logits_vec(single.forward(ids, None))
    );
}

fn load_err(dir: &Path) -> LoadError {
    CausalLm::<B>::load(dir, f32_options(), &Default::default()).unwrap_err()
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let dir = model_dir(&[]);
    let bytes = std::fs::read(modelopt("qwen3_tiny_bf16.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(matches!(err, LoadError::Safetensors { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    std::fs::write(dir.path().join("model.safetensors"), &bytes[..5]).unwrap();
    assert!(matches!(
        load_err(dir.path()),
        LoadError::Safetensors { .. }
    ));
}

#[test]
fn config_missing_a_field_is_named() {
    let dir = model_dir(&[("model.safetensors", modelopt("qwen3_tiny_bf16.safetensors"))]);
    let mut config = meta()["source_config.json"].clone();
    config.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        matches!(&err, LoadError::Config(ConfigError::MissingField { field, .. }) if field == "num_hidden_layers"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert!(matches!(
        load_err(dir.path()),
        LoadError::Config(ConfigError::Io { .. })
    ));
}

#[test]
fn missing_and_mismatched_tensors_are_all_named() {
    let mut config = config();
    config.intermediate_size = 1024;
    config.num_layers = 3;
    let ckpt = Checkpoint::from_files(&[modelopt("qwen3_tiny_bf16.safetensors")]).unwrap();
    let err = CausalLm::<B>::from_checkpoint(&config, &ckpt, f32_options(), &Default::default())
        .unwrap_err();
    let LoadError::Tensors { problems, .. } = &err else {
        panic!("{err}");
    };
    let text = err.to_string();
    assert!(
        text.contains(
            "`model.layers.0.mlp.up_proj.weight`: shape [768, 256], expected [1024, 256]"
        ),
        "{text}"
    );
    assert!(
        text.contains("`model.layers.2.self_attn.q_norm.weight`: missing"),
        "{text}"
    );
    // 3 MLP weights × 2 layers mismatched, and all 11 tensors of layer 2 missing.
    assert_eq!(problems.len(), 6 + 11, "{text}");
    let empty = tempfile::tempdir().unwrap();
    std::fs::write(
        empty.path().join("config.json"),
        serde_json::to_vec(&meta()["source_config.json"]).unwrap(),
    )
    .unwrap();
    assert!(matches!(
        load_err(empty.path()),
        LoadError::NoWeights { .. }
    ));
}

#[test]
fn tokenizer_vocab_mismatch_is_a_clear_error() {
    let dir = model_dir(&[("model.safetensors", modelopt("qwen3_tiny_bf16.safetensors"))]);
    // A word-level tokenizer whose ids go past the model's 2048-token vocabulary.
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "hello": 1, "world": 5000},
                  "unk_token": "<unk>"}
    });
    std::fs::write(
        dir.path().join("tokenizer.json"),
        serde_json::to_vec(&tokenizer).unwrap(),
    )
    .unwrap();
    let err =
        qatflow_model::load_with_tokenizer::<B>(dir.path(), f32_options(), &Default::default())
            .unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::Tokenizer(qatflow_model::TokenizerError::VocabSize {
                max_id: 5000,
                vocab_size: 2048
            })
        ),
        "{err}"
    );
}
