//! Post-training quantization (the PTQ baseline): ModelOpt's "max" calibration of a Hugging
//! Face model in f32, on the CPU or any burn device (`--device cuda`), then the same export
//! as for checkpoints. Weight amax is
//! `max|W|` of each exported weight, input amax the calibrated `max|x|`, both under the
//! shared-input group rule.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use qatflow_checkpoint::{sha256_file, FileEntry};
use qatflow_core::Progress;
use qatflow_model::{
    apply_group_rule, calibrate_inputs, weight_amax, CausalLm, LoadOptions, ModelConfig,
    ModelFamily, Precision, Tokenizer,
};
use qatflow_nvfp4::LinearAmax;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::error::ExportError;
use crate::report::{CalibTiming, ExportReport, SourceDescription};
use crate::source::{weight_files, SourceTensors};
use crate::writer::{quantized_modules, write_export, ExportOptions};

/// Calibrated amaxes of a model directory: loads it in f32 on `device`, runs
/// [`calibrate_inputs`] over `calib`, takes `max|W|` per linear, applies the group rule.
pub fn calibrate_dir<B: Backend>(
    hf_dir: &Path,
    calib: &[Vec<u32>],
    progress: &dyn Progress,
    device: &B::Device,
) -> Result<BTreeMap<String, LinearAmax>, ExportError> {
    calibrate_timed::<B>(hf_dir, calib, progress, device).map(|(amax, _)| amax)
}

/// [`calibrate_dir`] with the wall times of loading and calibrating.
fn calibrate_timed<B: Backend>(
    hf_dir: &Path,
    calib: &[Vec<u32>],
    progress: &dyn Progress,
    device: &B::Device,
) -> Result<(BTreeMap<String, LinearAmax>, CalibTiming), ExportError> {
    let options = LoadOptions {
        precision: Precision::F32,
        emulate_nvfp4_activations: false,
    };
    let started = Instant::now();
    let model = CausalLm::<B>::load(hf_dir, options, device)?;
    // The upload is asynchronous on a GPU: wait for it so the load time is its own.
    // A failed sync surfaces again at the first read-back, so it is not fatal here.
    let _ = B::sync(device);
    let loaded = Instant::now();
    let input = apply_group_rule(&calibrate_inputs(&model, calib, progress)?);
    let weight = apply_group_rule(&weight_amax(&model));
    drop(model);
    let timing = CalibTiming {
        load_seconds: (loaded - started).as_secs_f64(),
        calibrate_seconds: loaded.elapsed().as_secs_f64(),
    };
    weight
        .into_iter()
        .map(|(m, w)| {
            let i = *input.get(&m).ok_or_else(|| ExportError::Calibration {
                path: hf_dir.to_path_buf(),
                problem: format!("calibration never reached linear `{m}`"),
            })?;
            Ok((
                m,
                LinearAmax {
                    weight: w,
                    input: i,
                },
            ))
        })
        .collect::<Result<_, _>>()
        .map(|amax| (amax, timing))
}

/// Refuses PTQ of an architecture the model crate cannot run a forward pass of (Qwen3.5
/// today), with an error that points at `qatflow export` of a QAT checkpoint instead.
fn check_ptq_supported(hf_dir: &Path) -> Result<(), ExportError> {
    let path = hf_dir.join("config.json");
    let Some(config) = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    else {
        // The load below reports a missing or broken config.json.
        return Ok(());
    };
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    if matches!(model_type, "qwen3_5_text" | "qwen3_5")
        && ModelConfig::from_json(&config, &path).is_err()
    {
        return Err(ExportError::UnsupportedPtq {
            path,
            model_type: model_type.to_owned(),
        });
    }
    Ok(())
}

/// PTQ of the Hugging Face directory `hf_dir` into `out` with calibration token sequences,
/// calibrating on the CPU ([`quantize_hf_on`] takes another device).
/// Calibration reports to `calib_progress` (one step per sequence), the export to
/// `export_progress` (bytes). `cancel` is checked after calibration and throughout the
/// export ([`crate::writer::write_export`]).
#[allow(clippy::too_many_arguments)]
pub fn quantize_hf(
    hf_dir: &Path,
    calib: &[Vec<u32>],
    out: &Path,
    options: &ExportOptions,
    calib_progress: &dyn Progress,
    export_progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<ExportReport, ExportError> {
    let cpu = Default::default();
    quantize_hf_on::<Flex>(
        hf_dir,
        calib,
        out,
        options,
        calib_progress,
        export_progress,
        cancel,
        &cpu,
    )
}

/// [`quantize_hf`] with calibration on `device` (a GPU: `burn::backend::Cuda`); the
/// export itself always runs on the CPU's vectorized codec.
#[allow(clippy::too_many_arguments)]
pub fn quantize_hf_on<B: Backend>(
    hf_dir: &Path,
    calib: &[Vec<u32>],
    out: &Path,
    options: &ExportOptions,
    calib_progress: &dyn Progress,
    export_progress: &dyn Progress,
    cancel: &CancellationToken,
    device: &B::Device,
) -> Result<ExportReport, ExportError> {
    check_ptq_supported(hf_dir)?;
    let mut paths = weight_files(hf_dir)?;
    paths.push(hf_dir.join("config.json"));
    // The source files' digests (seconds for a multi-GB model) are computed on another
    // thread while the model calibrates.
    let (calibrated, files) = std::thread::scope(|scope| {
        let hashing = scope.spawn(|| source_entries(&paths));
        let calibrated = calibrate_timed::<B>(hf_dir, calib, calib_progress, device);
        let files = hashing
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        (calibrated, files)
    });
    let ((amax, timing), files) = (calibrated?, files?);
    if cancel.is_cancelled() {
        return Err(ExportError::Cancelled);
    }
    let tensors = SourceTensors::open_dir(hf_dir)?;
    let modules = quantized_modules(&tensors);
    if let Some(m) = modules.iter().find(|m| !amax.contains_key(*m)) {
        return Err(ExportError::Calibration {
            path: hf_dir.to_path_buf(),
            problem: format!("the model has no linear `{m}` although its weights do"),
        });
    }
    let source = SourceDescription {
        kind: "hf".into(),
        dir: hf_dir.to_path_buf(),
        step: None,
        config_hash: None,
        calib_sequences: Some(calib.len()),
        calib_timing: Some(timing),
        files,
    };
    write_export(
        hf_dir,
        &tensors,
        &amax,
        &hf_dir.join("config.json"),
        source,
        out,
        options,
        export_progress,
        cancel,
    )
}

/// Name, size and SHA-256 of each source file, for the export report's provenance.
fn source_entries(paths: &[std::path::PathBuf]) -> Result<Vec<FileEntry>, ExportError> {
    paths
        .iter()
        .map(|p| {
            let (sha256, size) = sha256_file(p)?;
            Ok(FileEntry {
                name: p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                size,
                sha256,
            })
        })
        .collect()
}

fn calib_err(path: &Path, problem: String) -> ExportError {
    ExportError::Calibration {
        path: path.to_path_buf(),
        problem,
    }
}

/// Reads `--calib-token-ids`: a JSON array of token-id arrays; at most `limit` sequences.
pub fn read_token_ids(path: &Path, limit: usize) -> Result<Vec<Vec<u32>>, ExportError> {
    let text = std::fs::read(path).map_err(|e| ExportError::io(path, e))?;
    let mut ids: Vec<Vec<u32>> = serde_json::from_slice(&text).map_err(|e| {
        calib_err(
            path,
            format!("expected a JSON array of arrays of token ids: {e}"),
        )
    })?;
    ids.truncate(limit);
    if ids.iter().all(Vec::is_empty) {
        return Err(calib_err(path, "no token ids".into()));
    }
    Ok(ids)
}

/// Reads `--calib`: OpenAI chat JSONL, each conversation rendered with the model's chat
/// template (with its `tools`, if any) and tokenized; at most `limit` conversations.
pub fn read_conversations(
    hf_dir: &Path,
    path: &Path,
    limit: usize,
) -> Result<Vec<Vec<u32>>, ExportError> {
    let config: Value = std::fs::read(hf_dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let tokenizer = Tokenizer::from_dir(hf_dir, ModelFamily::detect(&config))
        .map_err(|e| calib_err(hf_dir, format!("cannot load the tokenizer: {e}")))?;
    let text = std::fs::read_to_string(path).map_err(|e| ExportError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if out.len() >= limit {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let at = |problem: String| calib_err(path, format!("line {}: {problem}", i + 1));
        let v: Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
        let messages = v
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| at("no `messages` array".into()))?;
        let tools = v.get("tools").and_then(Value::as_array).map(Vec::as_slice);
        let enc = tokenizer
            .encode_conversation(messages, tools, None)
            .map_err(|e| at(e.to_string()))?;
        out.push(enc.ids);
    }
    if out.is_empty() {
        return Err(calib_err(path, "no conversations".into()));
    }
    Ok(out)
}
