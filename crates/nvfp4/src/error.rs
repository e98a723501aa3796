//! Errors of the NVFP4 library: each says what was wrong, where, and what to do.

use std::path::PathBuf;

/// Everything that can go wrong while quantizing, dequantizing or checking NVFP4 tensors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The last dimension is not a multiple of the 16-element block size.
    #[error(
        "tensor `{name}` with shape {shape:?}: last dimension {last} is not a multiple of 16; \
         NVFP4 quantizes blocks of 16 along the last dimension, so leave this tensor unquantized \
         or pad its input dimension"
    )]
    NotBlockAligned {
        /// Tensor name (or a description of the call site).
        name: String,
        /// Shape that was given.
        shape: Vec<usize>,
        /// Size of the last dimension.
        last: usize,
    },
    /// The tensor has no dimensions (a scalar) or a zero-sized dimension.
    #[error(
        "tensor `{name}` with shape {shape:?} cannot be block-quantized: it needs at least one \
         dimension and no zero-sized dimension"
    )]
    EmptyShape {
        /// Tensor name.
        name: String,
        /// Shape that was given.
        shape: Vec<usize>,
    },
    /// The number of values does not match the product of the shape.
    #[error("tensor `{name}`: shape {shape:?} holds {expected} values but {actual} were given; pass data and shape of the same tensor")]
    LengthMismatch {
        /// Tensor name.
        name: String,
        /// Shape that was given.
        shape: Vec<usize>,
        /// Number of elements the shape implies.
        expected: usize,
        /// Number of elements that were passed.
        actual: usize,
    },
    /// A NaN or infinite element: NVFP4 has no encoding for it.
    #[error("tensor `{name}`: element {index} is {value}, which NVFP4 cannot represent; fix the weights (or activations) before quantizing")]
    NonFinite {
        /// Tensor name.
        name: String,
        /// Flat (row-major) index of the first offending element.
        index: usize,
        /// The offending value.
        value: f32,
    },
    /// The calibrated amax cannot produce a finite, positive global scale.
    #[error(
        "`{name}`: amax {amax} gives no usable NVFP4 global scale (amax / 2688 must be a positive \
         normal float32); calibrate with data that reaches this tensor, or leave an all-zero \
         tensor unquantized"
    )]
    InvalidAmax {
        /// Tensor (or quantizer) name.
        name: String,
        /// The amax that was given.
        amax: f32,
    },
    /// Packed codes or scales do not fit the declared shape.
    #[error("NVFP4 tensor `{name}`: field `{field}` has {actual} bytes but shape {shape:?} needs {expected}; the packed weight, weight_scale and shape must come from the same export")]
    PackedMismatch {
        /// Tensor name.
        name: String,
        /// Which field: `weight` (packed codes) or `weight_scale`.
        field: &'static str,
        /// Logical (unpacked) shape.
        shape: Vec<usize>,
        /// Expected byte count.
        expected: usize,
        /// Actual byte count.
        actual: usize,
    },
    /// A safetensors file could not be read.
    #[error("cannot read `{path}`: {source}; check that the file exists and is readable")]
    Io {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file could not be parsed.
    #[error("`{path}` is not a valid safetensors file: {message}")]
    Safetensors {
        /// File path.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// The fake-quantized burn tensor had an unexpected layout.
    #[error("fake quantization of `{name}`: {message}")]
    Tensor {
        /// Tensor name.
        name: String,
        /// What was wrong.
        message: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
