//! NVFP4 for qatflow: the format bit-exact with NVIDIA ModelOpt 0.47's export, and fake
//! quantization with a straight-through estimator for burn tensors (what QAT puts in every
//! quantized linear layer).
//!
//! - [`e2m1`], [`fp8`]: the element and scale number formats.
//! - [`codec`]: the reference quantizer/dequantizer, packing and global scales.
//! - [`fake_quant`]: fake quantization of burn tensors with the straight-through estimator.
//! - [`groups`]: the shared-input group rule (q/k/v, gate/up share one global amax).
//! - [`check`]: per-tensor round-trip error of a safetensors file (`qatflow quant-check`).

pub mod check;
pub mod codec;
pub mod e2m1;
pub mod error;
pub mod fake_quant;
pub mod fp8;
pub mod groups;

pub use check::{quant_check, QuantCheckReport, TensorCheck};
pub use codec::{
    fake_quantize, input_scale, quantize, weight_scale_2, Element, Nvfp4Tensor, BLOCK_SIZE,
};
pub use error::{Error, Result};
