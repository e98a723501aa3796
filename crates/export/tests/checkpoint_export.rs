//! Export of a QAT-format checkpoint of the tiny Qwen3: the export, re-loaded through the
//! model crate's NVFP4 loader (W4A4 emulation), computes the fake-quantized checkpoint's
//! function; refusals and corruption leave no output directory and name what is wrong.

mod common;

use std::path::Path;

use burn::backend::Flex;
use common::*;
use qatflow_core::NoProgress;
use qatflow_export::checkpoint::read_quantizers;
use qatflow_export::{
    export_checkpoint, latest_valid_checkpoint, CancellationToken, ExportError, ExportOptions,
    ExportReport,
};
use qatflow_model::{eval_nll, CausalLm, LoadOptions, Precision};
use qatflow_nvfp4::keys::{INPUT_AMAX, WEIGHT_AMAX};
use qatflow_nvfp4::QuantizerAmax;

type B = Flex;

/// Largest |Δ mean NLL| (nats) allowed between the export and the fake-quantized checkpoint:
/// both quantize the same weights with the same scales; what remains is float32 summation
/// order and `input_scale × 2688` versus the stored amax (one rounding).
const NLL_MARGIN: f64 = 1e-4;

fn nll_of_fake_quantized(ckpt: &Path) -> f64 {
    let mut model = CausalLm::<B>::load(ckpt, LoadOptions::default(), &Default::default()).unwrap();
    let q = read_quantizers(&ckpt.join("quantizers.safetensors")).unwrap();
    for l in model.linears_mut() {
        let quant = QuantizerAmax {
            weight: Some(q[&format!("{}{WEIGHT_AMAX}", l.name)]),
            input: Some(q[&format!("{}{INPUT_AMAX}", l.name)]),
        };
        l.set_fake_quant(quant).unwrap();
    }
    eval_nll(&model, calib_ids()).unwrap().mean_nll
}

fn nll_of_export(dir: &Path) -> f64 {
    let options = LoadOptions {
        precision: Precision::F32,
        emulate_nvfp4_activations: true,
    };
    let model = CausalLm::<B>::load(dir, options, &Default::default()).unwrap();
    eval_nll(&model, calib_ids()).unwrap().mean_nll
}

/// `export_checkpoint` without progress or cancellation.
fn export(
    checkpoint: &Path,
    out: &Path,
    options: &ExportOptions,
) -> Result<ExportReport, ExportError> {
    export_checkpoint(
        checkpoint,
        out,
        options,
        &NoProgress,
        &CancellationToken::new(),
    )
}

#[test]
fn export_evaluates_like_the_fake_quantized_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tiny_hf_dir(tmp.path());
    let run = tmp.path().join("run");
    let info = tiny_checkpoint(&run, &hf, 100);
    let out = tmp.path().join("export");
    let report = export(&info.dir, &out, &ExportOptions::default()).unwrap();
    assert_eq!(report.source.step, Some(100));
    assert_eq!(report.source.files, info.files);
    assert_eq!(report.totals.quantized_linears, 14);
    assert!(report.totals.max_rel_error_quantized < 0.2);

    let fq = nll_of_fake_quantized(&info.dir);
    let exported = nll_of_export(&out);
    let plain = {
        let m =
            CausalLm::<B>::load(&info.dir, LoadOptions::default(), &Default::default()).unwrap();
        eval_nll(&m, calib_ids()).unwrap().mean_nll
    };
    println!("mean NLL: source {plain:.6}, fake-quantized {fq:.6}, export {exported:.6}");
    assert!(
        (fq - exported).abs() <= NLL_MARGIN,
        "export {exported} vs fake-quantized {fq}"
    );
    // Quantization does change the function: the comparison is not vacuous.
    assert!((plain - fq).abs() > 10.0 * NLL_MARGIN);

    // Tokenizer/config files and the report came along; no temporary directory is left.
    for f in [
        "config.json",
        "hf_quant_config.json",
        "generation_config.json",
        "export_report.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp-")), "{names:?}");

    // latest-valid picks this checkpoint even when a newer one is corrupt.
    let newer = tiny_checkpoint(&run, &hf, 200);
    std::fs::write(newer.dir.join("quantizers.safetensors"), b"garbage").unwrap();
    assert_eq!(latest_valid_checkpoint(&run).unwrap().step, 100);
}

#[test]
fn sharded_export_loads_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tiny_hf_dir(tmp.path());
    let info = tiny_checkpoint(&tmp.path().join("run"), &hf, 1);
    let single = tmp.path().join("single");
    let sharded = tmp.path().join("sharded");
    export(&info.dir, &single, &ExportOptions::default()).unwrap();
    let options = ExportOptions {
        max_shard_bytes: 1 << 20,
        ..ExportOptions::default()
    };
    export(&info.dir, &sharded, &options).unwrap();
    assert!(!sharded.join("model.safetensors").exists());
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sharded.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let files: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(files.len() > 1, "{files:?}");
    // Same tensors, byte for byte, across the shards.
    let mut merged = std::collections::BTreeMap::new();
    for f in files {
        merged.extend(tensors(&sharded.join(f)));
    }
    assert_eq!(merged, tensors(&single.join("model.safetensors")));
    assert_eq!(nll_of_export(&sharded), nll_of_export(&single));
}

#[test]
fn refusals_and_corruption_leave_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tiny_hf_dir(tmp.path());
    let info = tiny_checkpoint(&tmp.path().join("run"), &hf, 5);
    let out = tmp.path().join("out");
    let opts = ExportOptions::default();

    // An existing output is refused without --force and replaced with it.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("stale.txt"), b"x").unwrap();
    let err = export(&info.dir, &out, &opts).unwrap_err();
    assert!(matches!(err, ExportError::OutputExists { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    let force = ExportOptions {
        force: true,
        ..opts.clone()
    };
    export(&info.dir, &out, &force).unwrap();
    assert!(!out.join("stale.txt").exists());
    assert!(out.join("model.safetensors").is_file());

    // The source itself is never the output.
    let err = export(&info.dir, &info.dir, &force).unwrap_err();
    assert!(matches!(err, ExportError::OutputIsSource { .. }), "{err}");

    // A truncated checkpoint file is reported by name, and nothing is written.
    let out2 = tmp.path().join("out2");
    let model = info.dir.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let err = export(&info.dir, &out2, &opts).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    assert!(!out2.exists());
    std::fs::write(&model, &bytes).unwrap();

    // A checkpoint whose quantizer state lacks a linear is an error naming the tensor.
    let run = tmp.path().join("run2");
    let mut w = qatflow_checkpoint::CheckpointWriter::create(&run, 1).unwrap();
    w.copy_file(&model, "model.safetensors").unwrap();
    w.copy_model_files(&hf).unwrap();
    let mut q: Vec<_> = read_quantizers(&info.dir.join("quantizers.safetensors"))
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.down_proj.input_quantizer._amax")
        .map(|(n, v)| qatflow_checkpoint::TensorEntry::scalar_f32(n, v))
        .collect();
    q.sort_by(|a, b| a.name.cmp(&b.name));
    w.write_safetensors("quantizers.safetensors", &q).unwrap();
    let partial = w.commit("test").unwrap();
    let err = export(&partial.dir, &out2, &opts).unwrap_err();
    assert!(matches!(err, ExportError::MissingAmax { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("model.layers.1.mlp.down_proj.input_quantizer._amax"),
        "{err}"
    );
    assert!(!out2.exists());
}

/// Cancels `token` once `after` progress updates have arrived.
struct CancelAfter {
    token: CancellationToken,
    after: usize,
    seen: std::sync::atomic::AtomicUsize,
}

impl qatflow_core::Progress for CancelAfter {
    fn set_total(&self, _: u64) {}
    fn advance(&self, _: u64) {
        let seen = self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if seen == self.after {
            self.token.cancel();
        }
    }
}

fn temp_dirs(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[test]
fn cancelled_and_corrupt_exports_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tiny_hf_dir(tmp.path());
    let info = tiny_checkpoint(&tmp.path().join("run"), &hf, 3);
    let out = tmp.path().join("out");
    let opts = ExportOptions::default();

    // Cancelled after 5 of the 25 tensors (Ctrl-C in the CLI).
    let progress = CancelAfter {
        token: CancellationToken::new(),
        after: 5,
        seen: Default::default(),
    };
    let err = export_checkpoint(&info.dir, &out, &opts, &progress, &progress.token).unwrap_err();
    assert!(matches!(err, ExportError::Cancelled), "{err}");
    assert_eq!(progress.seen.load(std::sync::atomic::Ordering::Relaxed), 5);
    assert!(!out.exists());
    assert_eq!(temp_dirs(tmp.path()), Vec::<String>::new());

    // Cancelled before it starts.
    let cancelled = CancellationToken::new();
    cancelled.cancel();
    let err = export_checkpoint(&info.dir, &out, &opts, &NoProgress, &cancelled).unwrap_err();
    assert!(matches!(err, ExportError::Cancelled), "{err}");
    assert!(!out.exists());

    // A flipped byte inside the weights keeps every size and header intact; the checksum,
    // computed while the export runs, stops the export before its rename.
    let model = info.dir.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&model, &bytes).unwrap();
    let err = export(&info.dir, &out, &opts).unwrap_err();
    assert!(
        matches!(
            err,
            ExportError::Checkpoint(qatflow_checkpoint::CheckpointError::ChecksumMismatch { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    assert!(!out.exists());
    assert_eq!(temp_dirs(tmp.path()), Vec::<String>::new());
}
