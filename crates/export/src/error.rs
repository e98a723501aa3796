//! Errors of exporting: each says what was wrong, where, and what to do.

use std::path::{Path, PathBuf};

/// Everything that can stop an export or a PTQ run.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The output directory exists and `--force` was not given.
    #[error("{dir} already exists; pass --force to replace it, or choose another --out")]
    OutputExists {
        /// The output directory.
        dir: PathBuf,
    },
    /// The output directory would replace or contain the source.
    #[error("--out {out} would overwrite the source {source_dir}; choose another --out")]
    OutputIsSource {
        /// The output directory.
        out: PathBuf,
        /// The source directory.
        source_dir: PathBuf,
    },
    /// The source directory holds no weights.
    #[error("{dir} has no model.safetensors or model.safetensors.index.json; point at a checkpoint or Hugging Face model directory")]
    NoWeights {
        /// The directory.
        dir: PathBuf,
    },
    /// A source file is unusable.
    #[error("{path}: {problem}")]
    BadInput {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },
    /// A quantized linear has no calibrated amax.
    #[error("{file}: no `{tensor}`; a checkpoint without quantizer state cannot be exported (it would silently lose its calibration): export a checkpoint written by the QAT trainer, or run `qatflow quantize` for PTQ")]
    MissingAmax {
        /// The quantizer file.
        file: PathBuf,
        /// The missing tensor's name.
        tensor: String,
    },
    /// The quantizer state names a linear the model does not have.
    #[error("{file}: `{tensor}` belongs to no quantizable linear of the model; the quantizer state does not match model.safetensors")]
    UnknownAmax {
        /// The quantizer file.
        file: PathBuf,
        /// The tensor's name.
        tensor: String,
    },
    /// The checkpoint does not verify.
    #[error(transparent)]
    Checkpoint(#[from] qatflow_checkpoint::CheckpointError),
    /// A run directory has no checkpoint that verifies.
    #[error("{run_dir}: no checkpoint verifies{}", skipped.iter().map(|s| format!("\n  {s}")).collect::<String>())]
    NoValidCheckpoint {
        /// The run directory.
        run_dir: PathBuf,
        /// Why each checkpoint was rejected.
        skipped: Vec<String>,
    },
    /// A tensor could not be quantized.
    #[error("{0}")]
    Nvfp4(#[from] qatflow_nvfp4::Error),
    /// Writing a safetensors file failed.
    #[error(transparent)]
    Safetensors(#[from] qatflow_checkpoint::st::StError),
    /// Reading back the written output found a problem.
    #[error("verifying the export {path}: {problem}")]
    Verify {
        /// The written file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Loading the model for PTQ failed.
    #[error(transparent)]
    Load(#[from] qatflow_model::LoadError),
    /// Calibration failed.
    #[error(transparent)]
    Calib(#[from] qatflow_model::CalibError),
    /// The export was cancelled (Ctrl-C); its temporary directory was removed.
    #[error("cancelled; nothing was written (the temporary output directory was removed)")]
    Cancelled,
    /// `--vl-wrapper on` for a model that has no VL wrapper.
    #[error("{path}: model_type is {model_type:?}; the VL wrapper exists only for `qwen3_5_text` configs: use --vl-wrapper auto or off")]
    NoVlWrapper {
        /// The source config.json.
        path: PathBuf,
        /// Its `model_type`.
        model_type: String,
    },
    /// PTQ of an architecture the model crate cannot run.
    #[error("{path}: PTQ needs a forward pass, and the model crate cannot run model_type {model_type:?} yet; export a QAT checkpoint of it with `qatflow export` instead (its amaxes come from quantizers.safetensors)")]
    UnsupportedPtq {
        /// The source config.json.
        path: PathBuf,
        /// Its `model_type`.
        model_type: String,
    },
    /// The calibration data is unusable.
    #[error("{path}: {problem}")]
    Calibration {
        /// The calibration file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

impl ExportError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ExportError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
