//! NVFP4 for qatflow: the one owner of the scheme. The format bit-exact with NVIDIA ModelOpt
//! 0.47's export, its CPU implementations, fake quantization with a straight-through
//! estimator for burn tensors (what QAT puts in every quantized linear layer), which linears
//! are quantized and the tensor names they are stored under. The CubeCL kernels of
//! `qatflow-kernels` compute the same functions from this crate's constants.
//!
//! - [`e2m1`], [`fp8`]: the element and scale number formats and their rounding rules.
//! - [`codec`]: the reference quantizer/dequantizer, packing and global scales.
//! - [`vectorized`]: the codec's quantizer over raw tensor bytes, vectorized (the export).
//! - [`fake_quant`]: fake quantization of burn tensors with the straight-through estimator.
//! - [`amax`]: [`LinearAmax`], a quantized linear's calibrated amaxes.
//! - [`linears`]: the quantized linears of each architecture and their shared-input groups.
//! - [`keys`]: the tensor names of a quantized linear in exports and checkpoints.
//! - [`check`]: per-tensor round-trip error of a safetensors file (`qatflow quant-check`).

pub mod amax;
pub mod check;
pub mod codec;
pub mod e2m1;
pub mod error;
pub mod fake_quant;
pub mod fp8;
pub mod keys;
pub mod linears;
pub mod vectorized;

pub use amax::{LinearAmax, QuantizerAmax};
pub use check::{quant_check, QuantCheckReport, TensorCheck};
pub use codec::{
    fake_quantize, input_scale, quantize, weight_scale_2, Element, Nvfp4Tensor, BLOCK_SIZE,
};
pub use error::{Error, Result};
