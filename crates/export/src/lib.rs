//! qatflow-export: turns a QAT checkpoint, or (for the PTQ baseline) a plain Hugging Face
//! model, into a directory that vLLM serves with `--quantization modelopt_fp4`, in exactly
//! the format NVIDIA ModelOpt 0.47 writes (the scheme itself is `qatflow-nvfp4`'s).
//!
//! - [`checkpoint`]: export of a verified checkpoint with its quantizer state;
//! - [`ptq`]: max calibration of a Hugging Face model on the CPU, then the same export;
//! - [`writer`]: the streaming pipeline (a tensor at a time, split into pieces that several
//!   threads quantize at once), the temporary sibling directory, read-back verification
//!   and the final rename;
//! - [`modelopt`]: the config blocks ModelOpt writes;
//! - [`source`]: memory-mapped reading of source weights;
//! - [`report`]: the `export_report.json` it writes;
//! - [`shape`]: source tensor shapes checked against `config.json` before writing;
//! - [`bench`]: random-init checkpoints for benchmarking.
//!
//! The NVFP4 scheme is `qatflow-nvfp4`'s (the codec and its vectorized variant, which linears
//! are quantized, the group rule, the tensor names); nothing here re-implements NVFP4.

pub mod bench;
pub mod checkpoint;
pub mod error;
pub mod modelopt;
mod pieces;
pub mod ptq;
pub mod report;
pub mod shape;
pub mod source;
pub mod writer;

pub use checkpoint::{export_checkpoint, export_verified, latest_valid_checkpoint};
pub use error::ExportError;
pub use ptq::{quantize_hf, quantize_hf_on, read_conversations, read_token_ids};
pub use report::ExportReport;
pub use tokio_util::sync::CancellationToken;
pub use writer::{ExportOptions, VlWrapper, PAUSE_ENV};
