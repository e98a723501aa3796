//! `export_report.json`: per source tensor how it was exported and its relative error
//! (dequantized vs source), totals, and the source with its checksums.

use std::path::PathBuf;

use qatflow_checkpoint::FileEntry;
use serde::{Deserialize, Serialize};

/// Where an export came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceDescription {
    /// `checkpoint` (QAT) or `hf` (PTQ of a Hugging Face directory).
    pub kind: String,
    /// The source directory.
    pub dir: PathBuf,
    /// The checkpoint's step.
    pub step: Option<u64>,
    /// The checkpoint's training-configuration hash.
    pub config_hash: Option<String>,
    /// Number of calibration sequences (PTQ).
    pub calib_sequences: Option<usize>,
    /// Where PTQ's time before the export went (absent for QAT checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calib_timing: Option<CalibTiming>,
    /// The source files with size and sha256.
    pub files: Vec<FileEntry>,
}

/// Wall times of PTQ's calibration, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CalibTiming {
    /// Loading the model onto the calibration device.
    pub load_seconds: f64,
    /// Running the calibration sequences and taking the weights' maxima.
    pub calibrate_seconds: f64,
}

/// One source tensor in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorReport {
    /// Source tensor name.
    pub name: String,
    /// Source dtype (`F32`, `BF16`, ...).
    pub source_dtype: String,
    /// Source shape.
    pub shape: Vec<usize>,
    /// `NVFP4` (packed weight + scales) or the dtype written (`BF16`).
    pub exported_as: String,
    /// `‖dequantized − source‖₂ / ‖source‖₂`.
    pub rel_error: f64,
    /// Weight quantizer amax used (quantized linears).
    pub weight_amax: Option<f32>,
    /// Input quantizer amax used (quantized linears).
    pub input_amax: Option<f32>,
}

/// A file of the output directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputFile {
    /// File name.
    pub name: String,
    /// Size in bytes (`export_report.json` itself is not listed).
    pub size: u64,
}

/// Totals of an export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Source tensors.
    pub tensors: usize,
    /// Of those, NVFP4-quantized linears.
    pub quantized_linears: usize,
    /// Bytes of source tensor data.
    pub source_bytes: u64,
    /// Bytes of the written weight files.
    pub weight_bytes: u64,
    /// Mean relative error over the quantized linears.
    pub mean_rel_error_quantized: f64,
    /// Largest relative error of a quantized linear.
    pub max_rel_error_quantized: f64,
    /// Wall time of writing the export (after loading/calibration).
    pub seconds: f64,
}

/// `export_report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportReport {
    /// Always `qatflow-export-report`.
    pub format: String,
    /// Always `NVFP4`.
    pub quant_algo: String,
    /// The producer block written into the configs.
    pub producer: serde_json::Value,
    /// The source and its checksums.
    pub source: SourceDescription,
    /// The files written (besides this report).
    pub output_files: Vec<OutputFile>,
    /// Totals.
    pub totals: Totals,
    /// Per source tensor, in name order.
    pub tensors: Vec<TensorReport>,
}
