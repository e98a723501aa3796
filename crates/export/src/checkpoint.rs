//! Export of a QAT checkpoint ([`qatflow_checkpoint`] format): verify it, read the quantizer
//! state, and stream the weights into an NVFP4 directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use qatflow_checkpoint::{
    list, verify, verify_checksums, verify_structure, CheckpointInfo, MODEL_FILE, QUANTIZERS_FILE,
};
use qatflow_core::Progress;
use qatflow_nvfp4::keys::{key, INPUT_AMAX, WEIGHT_AMAX};
use qatflow_nvfp4::LinearAmax;
use safetensors::{Dtype, SafeTensors};

use crate::error::ExportError;
use crate::report::{ExportReport, SourceDescription};
use crate::source::SourceTensors;
use crate::writer::{quantized_modules, write_export_then, ExportOptions};
use tokio_util::sync::CancellationToken;

/// Reads `quantizers.safetensors`: every F32 scalar, by name.
pub fn read_quantizers(path: &Path) -> Result<BTreeMap<String, f32>, ExportError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ExportError::BadInput {
                path: path.to_path_buf(),
                problem: "missing: a checkpoint without quantizer state cannot be exported; export a checkpoint written by the QAT trainer, or run `qatflow quantize` for PTQ".into(),
            })
        }
        Err(e) => return Err(ExportError::io(path, e)),
    };
    let bad = |problem: String| ExportError::BadInput {
        path: path.to_path_buf(),
        problem,
    };
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a complete safetensors file ({e})")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        if view.dtype() != Dtype::F32 || view.data().len() != 4 {
            return Err(bad(format!(
                "`{name}` is {:?} {:?}; quantizer amaxes are F32 scalars",
                view.dtype(),
                view.shape()
            )));
        }
        let d = view.data();
        out.insert(
            name.to_owned(),
            f32::from_le_bytes([d[0], d[1], d[2], d[3]]),
        );
    }
    Ok(out)
}

/// The amaxes of every quantized linear of `modules` from the quantizer tensors; a missing
/// one is an error naming it. The shared-input group rule is applied again (the trainer
/// applies it already; doing it here makes an export without it impossible) and a change is
/// logged.
pub fn linear_amaxes(
    modules: &[String],
    quantizers: &BTreeMap<String, f32>,
    file: &Path,
) -> Result<BTreeMap<String, LinearAmax>, ExportError> {
    let get = |module: &str, suffix: &str| {
        let tensor = key(module, suffix);
        quantizers
            .get(&tensor)
            .copied()
            .ok_or_else(|| ExportError::MissingAmax {
                file: file.to_path_buf(),
                tensor,
            })
    };
    let mut weight = BTreeMap::new();
    let mut input = BTreeMap::new();
    for m in modules {
        weight.insert(m.clone(), get(m, WEIGHT_AMAX)?);
        input.insert(m.clone(), get(m, INPUT_AMAX)?);
    }
    for name in quantizers.keys() {
        let module = name
            .strip_suffix(WEIGHT_AMAX)
            .or_else(|| name.strip_suffix(INPUT_AMAX));
        if !module.is_some_and(|m| weight.contains_key(m)) {
            return Err(ExportError::UnknownAmax {
                file: file.to_path_buf(),
                tensor: name.clone(),
            });
        }
    }
    let gw = qatflow_model::apply_group_rule(&weight);
    let gi = qatflow_model::apply_group_rule(&input);
    if gw != weight || gi != input {
        tracing::warn!(file = %file.display(), "quantizer amaxes did not follow the shared-input group rule; applied it (q/k/v and gate/up share the group's largest amax)");
    }
    Ok(modules
        .iter()
        .map(|m| {
            (
                m.clone(),
                LinearAmax {
                    weight: gw[m],
                    input: gi[m],
                },
            )
        })
        .collect())
}

/// Exports the checkpoint directory `dir` into `out`. The checkpoint is verified in full:
/// sizes and safetensors headers before anything is written, and every file's sha256 on a
/// thread of its own while the export runs; a mismatch fails the export before its
/// directory is renamed into place (so nothing is left behind).
pub fn export_checkpoint(
    dir: &Path,
    out: &Path,
    options: &ExportOptions,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<ExportReport, ExportError> {
    let info = verify_structure(dir)?;
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let hashing = s.spawn(|| {
            verify_checksums(&info, &|| {
                done.load(Ordering::Relaxed) || cancel.is_cancelled()
            })
        });
        let checked = || match hashing.join().expect("the checksum thread does not panic") {
            Ok(true) => Ok(()),
            Ok(false) => Err(ExportError::Cancelled),
            Err(e) => Err(ExportError::from(e)),
        };
        let result = export_with(&info, out, options, progress, cancel, checked);
        done.store(true, Ordering::Relaxed);
        result
    })
}

/// The newest checkpoint of `run_dir` that verifies; logs the newer ones that did not.
pub fn latest_valid_checkpoint(run_dir: &Path) -> Result<CheckpointInfo, ExportError> {
    let mut skipped = Vec::new();
    for dir in list(run_dir)? {
        match verify(&dir) {
            Ok(info) => {
                for s in &skipped {
                    tracing::warn!("skipped a newer checkpoint that does not verify: {s}");
                }
                return Ok(info);
            }
            Err(e) => skipped.push(e.to_string()),
        }
    }
    Err(ExportError::NoValidCheckpoint {
        run_dir: run_dir.to_path_buf(),
        skipped,
    })
}

/// Exports an already verified checkpoint ([`qatflow_checkpoint::verify`]).
pub fn export_verified(
    info: &CheckpointInfo,
    out: &Path,
    options: &ExportOptions,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<ExportReport, ExportError> {
    export_with(info, out, options, progress, cancel, || Ok(()))
}

fn export_with(
    info: &CheckpointInfo,
    out: &Path,
    options: &ExportOptions,
    progress: &dyn Progress,
    cancel: &CancellationToken,
    before_commit: impl FnOnce() -> Result<(), ExportError>,
) -> Result<ExportReport, ExportError> {
    let dir = &info.dir;
    let tensors = SourceTensors::open_files(&[dir.join(MODEL_FILE)])?;
    let qfile: PathBuf = dir.join(QUANTIZERS_FILE);
    let quantizers = read_quantizers(&qfile)?;
    let amax = linear_amaxes(&quantized_modules(&tensors), &quantizers, &qfile)?;
    let source = SourceDescription {
        kind: "checkpoint".into(),
        dir: dir.clone(),
        step: Some(info.step),
        config_hash: Some(info.config_hash.clone()),
        calib_sequences: None,
        calib_timing: None,
        files: info.files.clone(),
    };
    write_export_then(
        dir,
        &tensors,
        &amax,
        &qfile,
        source,
        out,
        options,
        progress,
        cancel,
        before_commit,
    )
}
