//! The tiny random Qwen3.5 of the ModelOpt 0.47 fixtures (3 Gated DeltaNet layers + 1 gated
//! attention layer, hidden 256, vocab 2048) on the CPU `Flex` backend: logits and
//! per-sequence NLL against transformers 5.17 (float32) on lengths below and across the
//! chunk size, recurrent decoding against the chunked forward, the VL wrapper config and
//! `model.language_model.` names, the NVFP4 export against fake quantization, and the
//! quantizable linears.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{DType, Int, Tensor, TensorData};
use qatflow_model::eval::eval_nll;
use qatflow_model::weights::Checkpoint;
use qatflow_model::{Architecture, CausalLm, LoadOptions, ModelConfig, Precision};
use qatflow_nvfp4::QuantizerAmax;
use safetensors::SafeTensors;
use serde_json::Value;

type B = Flex;

const VOCAB: usize = 2048;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn modelopt(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/modelopt-0.47.0")
        .join(file)
}

fn meta() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("qwen35_tiny_meta.json")).unwrap())
        .unwrap()
}

fn config() -> ModelConfig {
    ModelConfig::from_json(
        &meta()["source_config.json"],
        Path::new("qwen35_tiny_meta.json"),
    )
    .unwrap()
}

fn ids() -> Vec<Vec<u32>> {
    serde_json::from_value(meta()["ids"].clone()).unwrap()
}

fn load_file(file: &Path, options: LoadOptions) -> CausalLm<B> {
    let ckpt = Checkpoint::from_files(&[file.to_path_buf()]).unwrap();
    CausalLm::from_checkpoint(&config(), &ckpt, options, &Default::default()).unwrap()
}

fn load(file: &str, options: LoadOptions) -> CausalLm<B> {
    load_file(&modelopt(file), options)
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
    let bytes = std::fs::read(fixtures().join("qwen35_tiny_hf_logits_f32.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor("logits").unwrap();
    assert_eq!(view.shape(), [2, 48, VOCAB]);
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Mean NLL of `seq` under `logits` rows (`[len, vocab]`, row p predicts token p + 1).
fn nll(logits: &[f32], seq: &[u32]) -> f64 {
    let mut sum = 0f64;
    for p in 0..seq.len() - 1 {
        let row = &logits[p * VOCAB..][..VOCAB];
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        sum += lse - row[seq[p + 1] as usize] as f64;
    }
    sum / (seq.len() - 1) as f64
}

#[test]
fn config_is_read_with_the_layer_pattern() {
    let c = config();
    assert_eq!(c.architecture, Architecture::Qwen35);
    let h = c.hybrid.as_ref().unwrap();
    assert_eq!(h.layer_types.len(), 4);
    assert_eq!(h.rotary_dim, 16);
    assert_eq!(h.conv_dim(), 2 * 4 * 32 + 4 * 32);
    assert!(h.attn_output_gate);
}

#[test]
fn f32_logits_and_nll_match_transformers() {
    let model = load("qwen35_tiny_bf16.safetensors", LoadOptions::default());
    let hf = hf_logits();
    let got = logits_vec(model.forward(ids_tensor(&ids()), None));
    let diff = max_abs_diff(&got, &hf);
    println!("qwen35_tiny f32 max |Δlogit| vs transformers 5.17: {diff:e}");
    assert!(diff <= 1e-3, "max |Δ| = {diff}");
    // Per-sequence NLL, also of prefixes of several lengths (causal: a prefix's logits are
    // the first rows of the whole sequence's).
    for (s, seq) in ids().iter().enumerate() {
        for len in [2, 17, 33, 48] {
            let prefix = &seq[..len];
            let ours = logits_vec(model.forward(ids_tensor(&[prefix.to_vec()]), None));
            let theirs = &hf[s * 48 * VOCAB..][..len * VOCAB];
            let (a, b) = (nll(&ours, prefix), nll(theirs, prefix));
            assert!(
                (a - b).abs() < 2e-3,
                "sequence {s} length {len}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn eval_nll_agrees_with_transformers() {
    let model = load("qwen35_tiny_bf16.safetensors", LoadOptions::default());
    let report = eval_nll(&model, ids()).unwrap();
    let hf = hf_logits();
    for (s, (seq, got)) in ids().iter().zip(&report.sequences).enumerate() {
        let want = nll(&hf[s * 48 * VOCAB..][..48 * VOCAB], seq);
        println!(
            "sequence {s}: NLL {:.6} (transformers {want:.6})",
            got.mean_nll
        );
        assert!((got.mean_nll - want).abs() < 2e-3, "sequence {s}");
    }
}

#[test]
fn bf16_logits_stay_close_to_transformers_f32() {
    let model = load(
        "qwen35_tiny_bf16.safetensors",
        LoadOptions {
            precision: Precision::Bf16,
            ..LoadOptions::default()
        },
    );
    assert_eq!(model.dtype(), DType::BF16);
    let got = logits_vec(model.forward(ids_tensor(&ids()), None));
    let diff = max_abs_diff(&got, &hf_logits());
    println!("qwen35_tiny bf16 max |Δlogit| vs transformers f32: {diff:e}");
    assert!(diff <= 0.05, "max |Δ| = {diff}");
}

#[test]
fn recurrent_decoding_matches_the_chunked_forward() {
    let model = load("qwen35_tiny_bf16.safetensors", LoadOptions::default());
    let seq = ids()[1].clone();
    let full = logits_vec(model.forward(ids_tensor(std::slice::from_ref(&seq)), None));
    let mut cache = model.new_cache();
    let mut got = Vec::new();
    // A 20-token prefill, 10 single tokens (the recurrent form), then a chunk of 18.
    for (start, end) in [(0, 20)]
        .into_iter()
        .chain((20..30).map(|p| (p, p + 1)))
        .chain([(30, 48)])
    {
        let hidden = model.forward_hidden(
            ids_tensor(&[seq[start..end].to_vec()]),
            None,
            Some(&mut cache),
        );
        let part = logits_vec(model.logits(hidden));
        let diff = max_abs_diff(&part, &full[start * VOCAB..end * VOCAB]);
        assert!(diff <= 1e-4, "positions {start}..{end}: max |Δ| = {diff}");
        got.extend(part);
        assert_eq!(cache.len(), end);
    }
    let diff = max_abs_diff(&got, &full);
    println!("recurrent decode vs chunked forward max |Δ|: {diff:e}");
}

#[test]
fn eval_decode_reports_the_recurrent_form_against_the_chunked_forward() {
    let model = load("qwen35_tiny_bf16.safetensors", LoadOptions::default());
    let report = qatflow_model::eval_decode(&model, ids(), 20).unwrap();
    assert_eq!(report.prefill, 20);
    assert_eq!(report.sequences.len(), 2);
    assert!(report.sequences.iter().all(|s| s.tokens == 48));
    assert!(report.max_abs_diff <= 1e-4, "{report:?}");
    // The shortest valid sequence decodes one token after the prefill; one token less is an error.
    let short = qatflow_model::eval_decode(&model, vec![ids()[0][..21].to_vec()], 20).unwrap();
    assert!(short.max_abs_diff <= 1e-4, "{short:?}");
    assert!(qatflow_model::eval_decode(&model, vec![ids()[0][..20].to_vec()], 20).is_err());
}

#[test]
fn padded_batch_matches_single_sequences() {
    let model = load("qwen35_tiny_bf16.safetensors", LoadOptions::default());
    let all = ids();
    let seqs = vec![all[0].clone(), all[1][..29].to_vec()];
    let lengths: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let batch = logits_vec(model.forward(ids_tensor(&seqs), Some(&lengths)));
    for (b, s) in seqs.iter().enumerate() {
        let single = logits_vec(model.forward(ids_tensor(std::slice::from_ref(s)), None));
        let rows = &batch[b * 48 * VOCAB..][..s.len() * VOCAB];
        let diff = max_abs_diff(rows, &single);
        assert!(diff <= 1e-5, "sequence {b}: max |Δ| = {diff}");
    }
}

#[test]
fn quantizable_linears_are_exactly_modelopts() {
    let mut model = load("qwen35_tiny_bf16.safetensors", LoadOptions::default());
    let mut names: Vec<String> = model
        .linears_mut()
        .into_iter()
        .map(|l| l.name.clone())
        .collect();
    names.sort();
    // The modules ModelOpt quantized: those with a packed weight in its export.
    let bytes = std::fs::read(modelopt("qwen35_tiny_nvfp4.safetensors")).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut want: Vec<String> = header
        .tensors()
        .into_iter()
        .filter(|(n, i)| n.ends_with(".weight") && i.dtype == safetensors::Dtype::U8)
        .map(|(n, _)| n.trim_end_matches(".weight").to_string())
        .collect();
    want.sort();
    assert_eq!(names.len(), 25);
    assert_eq!(names, want);
}

/// Group amax (q/k/v, gate/up, in_proj_qkv/in_proj_z) of `max|W|` per linear.
fn group_amax(model: &mut CausalLm<B>) -> Vec<(String, f32)> {
    let own: std::collections::BTreeMap<String, f32> = model
        .linears_mut()
        .into_iter()
        .map(|l| (l.name.clone(), l.weight.val().abs().max().into_scalar()))
        .collect();
    qatflow_model::apply_group_rule(&own).into_iter().collect()
}

#[test]
fn nvfp4_export_equals_fake_quantized_bf16_model() {
    // Weight-only (W4A16): ModelOpt's dequantized weights are exactly what QLinear's weight
    // fake quantizer makes of the BF16 weights with the group amax (in_proj_qkv/in_proj_z
    // share one).
    let export = load(
        "qwen35_tiny_nvfp4.safetensors",
        LoadOptions {
            emulate_nvfp4_activations: false,
            ..LoadOptions::default()
        },
    );
    let mut fq = load("qwen35_tiny_bf16.safetensors", LoadOptions::default());
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
    let ids = ids_tensor(&ids());
    let a = logits_vec(export.forward(ids.clone(), None));
    let b = logits_vec(fq.forward(ids, None));
    let diff = max_abs_diff(&a, &b);
    println!("NVFP4 export (W4A16) vs fake-quantized BF16 model max |Δ|: {diff:e}");
    assert!(diff <= 1e-5, "max |Δ| = {diff}");
}

/// Rewrites the fixture's tensors as a VL checkpoint: `model.*` → `model.language_model.*`,
/// plus an `mtp.*` and a `model.visual.*` tensor the loader must skip.
fn vl_checkpoint(dir: &Path) {
    let bytes = std::fs::read(modelopt("qwen35_tiny_bf16.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let extra = vec![0u8; 4 * 8];
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .names()
        .into_iter()
        .map(|n| {
            let renamed = match n.strip_prefix("model.") {
                Some(rest) => format!("model.language_model.{rest}"),
                None => n.to_string(),
            };
            (renamed, st.tensor(n).unwrap())
        })
        .collect();
    for name in ["mtp.fc.weight", "model.visual.patch_embed.proj.weight"] {
        views.push((
            name.to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 4], &extra)
                .unwrap(),
        ));
    }
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let text = meta()["source_config.json"].clone();
    let wrapper = serde_json::json!({
        "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
        "eos_token_id": 7, "tie_word_embeddings": false, "text_config": text,
        "vision_config": {"depth": 1}
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&wrapper).unwrap(),
    )
    .unwrap();
}

#[test]
fn vl_checkpoint_loads_under_language_model_names() {
    let tmp = tempfile::tempdir().unwrap();
    vl_checkpoint(tmp.path());
    let config = ModelConfig::from_file(&tmp.path().join("config.json")).unwrap();
    assert_eq!(config.architecture, Architecture::Qwen35);
    assert_eq!(config.eos_token_ids, vec![7]);
    let mut vl =
        CausalLm::<B>::load(tmp.path(), LoadOptions::default(), &Default::default()).unwrap();
    assert!(matches!(vl, CausalLm::Qwen35Vl(_)));
    let text = load("qwen35_tiny_bf16.safetensors", LoadOptions::default());
    let ids = ids_tensor(&ids()[..1]);
    assert_eq!(
        logits_vec(vl.forward(ids.clone(), None)),
        logits_vec(text.forward(ids, None))
    );
    let names: Vec<String> = vl
        .linears_mut()
        .into_iter()
        .map(|l| l.name.clone())
        .collect();
    assert!(names
        .iter()
        .all(|n| n.starts_with("model.language_model.layers.")));
    // Parameters keep the checkpoint's names, so a training checkpoint is written like it.
    let params: Vec<String> = qatflow_model::params::named_params(&vl)
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert!(params.contains(&"model.language_model.layers.0.linear_attn.A_log".to_string()));
    assert!(params.contains(&"model.language_model.embed_tokens.weight".to_string()));
    assert!(params.contains(&"lm_head.weight".to_string()));
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    let mut stored: Vec<String> = ckpt
        .names()
        .filter(|n| !n.starts_with("mtp.") && !n.starts_with("model.visual."))
        .map(String::from)
        .collect();
    let mut params = params;
    stored.sort();
    params.sort();
    assert_eq!(params, stored);
}

#[test]
fn text_checkpoint_params_have_checkpoint_names() {
    let model = load("qwen35_tiny_bf16.safetensors", LoadOptions::default());
    let mut params: Vec<(String, Vec<usize>)> = qatflow_model::params::named_params(&model)
        .into_iter()
        .map(|p| (p.name, p.shape))
        .collect();
    let ckpt = Checkpoint::from_files(&[modelopt("qwen35_tiny_bf16.safetensors")]).unwrap();
    let mut stored: Vec<(String, Vec<usize>)> = ckpt
        .names()
        .map(|n| (n.to_string(), ckpt.info(n).unwrap().1))
        .collect();
    params.sort();
    stored.sort();
    assert_eq!(params, stored);
}

#[test]
fn missing_linear_attention_tensors_are_named() {
    let mut c = config();
    c.hybrid.as_mut().unwrap().linear_num_value_heads = 8;
    let ckpt = Checkpoint::from_files(&[modelopt("qwen35_tiny_bf16.safetensors")]).unwrap();
    let err =
        CausalLm::<B>::from_checkpoint(&c, &ckpt, LoadOptions::default(), &Default::default())
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("`model.layers.0.linear_attn.A_log`: shape [4], expected [8]"),
        "{err}"
    );
    assert!(err.contains("linear_attn.in_proj_qkv.weight"), "{err}");
}

mod qat {
    //! One QAT step on the fixture: fake quantizers on exactly ModelOpt's linears (group
    //! amaxes), gradients reaching every parameter (the delta rule's `A_log`, `dt_bias`,
    //! `conv1d` included), and a plain gradient step lowering the loss.

    use super::*;
    use burn::backend::Autodiff;
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::activation::log_softmax;
    use burn::tensor::backend::AutodiffBackend;
    use qatflow_model::params::{hf_name, map_params};
    use std::collections::BTreeMap;

    type AD = Autodiff<Flex>;

    struct Grads<'a> {
        grads: &'a <AD as AutodiffBackend>::Gradients,
        path: Vec<String>,
        out: BTreeMap<String, Vec<f32>>,
    }

    impl ModuleVisitor<AD> for Grads<'_> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }

        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }

        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
            if let Some(g) = param.val().grad(self.grads) {
                self.out
                    .insert(hf_name(&self.path), g.into_data().to_vec::<f32>().unwrap());
            }
        }
    }

    fn loss(model: &CausalLm<AD>, seq: &[u32]) -> Tensor<AD, 1> {
        let n = seq.len();
        let logits = model.forward(ids_tensor_ad(&seq[..n - 1]), None);
        let targets: Vec<i32> = seq[1..].iter().map(|&t| t as i32).collect();
        let targets = Tensor::<AD, 3, Int>::from_data(
            TensorData::new(targets, [1, n - 1, 1]),
            &Default::default(),
        );
        log_softmax(logits, 2).gather(2, targets).mean().neg()
    }

    fn ids_tensor_ad(ids: &[u32]) -> Tensor<AD, 2, Int> {
        let data: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        Tensor::from_data(TensorData::new(data, [1, ids.len()]), &Default::default())
    }

    #[test]
    fn qat_step_reaches_every_parameter_and_lowers_the_loss() {
        let ckpt = Checkpoint::from_files(&[modelopt("qwen35_tiny_bf16.safetensors")]).unwrap();
        let mut model = CausalLm::<AD>::from_checkpoint(
            &config(),
            &ckpt,
            LoadOptions::default(),
            &Default::default(),
        )
        .unwrap();
        let calib = ids();
        let input = qatflow_model::apply_group_rule(
            &qatflow_model::calibrate_inputs(&model, &calib, &qatflow_core::NoProgress).unwrap(),
        );
        let weight = qatflow_model::apply_group_rule(&qatflow_model::weight_amax(&model));
        for layer in model.linears_mut() {
            layer
                .set_fake_quant(QuantizerAmax {
                    weight: Some(weight[&layer.name]),
                    input: Some(input[&layer.name]),
                })
                .unwrap();
        }
        let seq = &calib[0];
        let before = loss(&model, seq);
        let before_value: f32 = before.clone().into_scalar();
        let grads = before.backward();
        let mut visitor = Grads {
            grads: &grads,
            path: Vec::new(),
            out: BTreeMap::new(),
        };
        model.visit(&mut visitor);
        let params = qatflow_model::params::named_params(&model);
        assert_eq!(
            visitor.out.len(),
            params.len(),
            "every parameter has a gradient"
        );
        for (name, g) in &visitor.out {
            assert!(
                g.iter().all(|v| v.is_finite()),
                "{name}: non-finite gradient"
            );
            assert!(g.iter().any(|v| *v != 0.0), "{name}: zero gradient");
        }
        let grads = visitor.out;
        let model = map_params(model, |name, flat| {
            let g = Tensor::<AD, 1>::from_data(
                TensorData::new(grads[name].clone(), [grads[name].len()]),
                &Default::default(),
            );
            flat - g.mul_scalar(0.5)
        });
        let after: f32 = loss(&model, seq).into_scalar();
        println!("QAT step on the tiny Qwen3.5: loss {before_value:.4} → {after:.4}");
        assert!(after < before_value - 1e-3, "{before_value} → {after}");
    }
}
