//! GPU kernels of qatflow, with the reference codec as the CPU path. The NVFP4 scheme
//! (constants, rounding rule) is `qatflow_nvfp4`'s; this crate is its CubeCL backend.
//!
//! - [`adamw`]: one AdamW update of a parameter as one CUDA kernel.
//! - [`attention`]: training attention on CUDA that recomputes its scores in backward
//!   instead of storing them.
//! - [`cache`]: CubeCL's compiled-kernel cache, on by default in a user cache directory.
//! - [`kernel`]: the CubeCL kernel of NVFP4 fake quantization.
//! - [`cublaslt`]: the cuBLASLt entry points, loaded at run time.
//! - [`deltanet`]: the gated delta rule (Qwen3.5's linear attention) as one forward and one
//!   backward kernel.
//! - [`fake_quant`]: fake quantization of burn tensors, the kernel on CUDA and tensor
//!   operations elsewhere (what the model's linear layers call).
//! - [`gemm`]: the linear layers' GEMMs (`x · wᵀ` and its backward) through cuBLASLt on
//!   CUDA, burn's matmul elsewhere.
//! - [`Quantizer`]: fake quantization of host slices on a [`Device`] — the CubeCL kernel on
//!   a CUDA device, the reference codec (`qatflow_nvfp4::codec`) on the CPU — with
//!   bit-identical results.
//! - [`loss`]: the LM head and cross-entropy as one chunked operation on CUDA.
//! - [`norm`]: RMSNorm forward and backward as one operation on CUDA, a kernel a pass.
//! - [`phase`]: per-phase step times (attention, norm, fake quantization, loss) for `bench-train`.
//! - [`reduce`]: row maxima and sums of long rows (logits) split into lanes on CUDA.
//! - `softmax`: the attention's softmax and its backward, one kernel each on CUDA.
//! - [`recompute`]: layer-level activation checkpointing (a decoder block keeps only its
//!   input; backward recomputes the block).

pub mod adamw;
pub mod attention;
pub mod cache;
pub mod cublaslt;
pub mod deltanet;
pub mod fake_quant;
pub mod gemm;
// The launch modules and types that `#[cube]` generates for each kernel carry no docs.
mod custom;
#[allow(missing_docs)]
pub mod kernel;
pub mod loss;
pub mod norm;
pub mod phase;
pub mod recompute;
pub mod reduce;
#[cfg(test)]
mod soft_gpu;
mod softmax;

use cubecl::cuda::{CudaDevice, CudaRuntime};

/// burn's CUDA backend without its fusion layer (`burn::backend::Cuda` is the fused one).
/// `qatflow serve` runs on it: its engine thread drives a model loaded on another thread,
/// and burn-fusion 0.21's stream bookkeeping failed there on the first request ("index out
/// of bounds" in `burn-cubecl-fusion`'s `engine/codegen/ir.rs`, then "Ordering is bigger
/// than operations"). The fake-quant kernel and the cuBLASLt GEMMs serve both.
pub type CudaUnfused = burn_cubecl::CubeBackend<CudaRuntime, f32, i32, u8>;
use cubecl::prelude::*;
use cubecl::server::Handle;
use half::bf16;
use qatflow_core::Device;
use qatflow_nvfp4::codec::{self, Element, BLOCK_SIZE};

/// Errors of the kernel front end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input was refused by the NVFP4 rules (shape, non-finite values, amax).
    #[error(transparent)]
    Nvfp4(#[from] qatflow_nvfp4::Error),
    /// The GPU could not run the kernel or return its result.
    #[error("NVFP4 kernel `{kernel}` on {device} failed for tensor `{name}`: {message}; check the CUDA driver and free device memory")]
    Device {
        /// Kernel name.
        kernel: &'static str,
        /// Device description.
        device: String,
        /// Tensor name.
        name: String,
        /// Runtime message.
        message: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An element type both paths accept: `f32` or `bf16`.
pub trait KernelElement: Element + CubeElement + Float {
    /// Rounds an f32 to this type (nearest even).
    fn from_f32_value(v: f32) -> Self;
}

impl KernelElement for f32 {
    fn from_f32_value(v: f32) -> Self {
        v
    }
}

impl KernelElement for bf16 {
    fn from_f32_value(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// NVFP4 fake quantization of host slices on one device.
#[derive(Clone)]
pub enum Quantizer {
    /// The reference codec.
    Cpu,
    /// The CubeCL kernels on a CUDA device.
    Cuda {
        /// Device index.
        index: usize,
        /// The device's compute client.
        client: ComputeClient<CudaRuntime>,
    },
}

impl std::fmt::Debug for Quantizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Quantizer({:?})", self.device())
    }
}

/// Wraps a float primitive as a tensor of rank `D`.
pub(crate) fn t<I: burn::tensor::backend::Backend, const D: usize>(
    x: burn::tensor::ops::FloatTensor<I>,
) -> burn::tensor::Tensor<I, D> {
    burn::tensor::Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(x))
}

/// The float primitive of a tensor.
pub(crate) fn p<I: burn::tensor::backend::Backend, const D: usize>(
    x: burn::tensor::Tensor<I, D>,
) -> burn::tensor::ops::FloatTensor<I> {
    x.into_primitive().tensor()
}

/// Casts `x` to `dtype` unless it already has it (no kernel then).
pub fn to_dtype<B: burn::tensor::backend::Backend, const D: usize>(
    x: burn::tensor::Tensor<B, D>,
    dtype: burn::tensor::DType,
) -> burn::tensor::Tensor<B, D> {
    if x.dtype() == dtype {
        x
    } else {
        x.cast(dtype)
    }
}

/// Units per cube of the block kernels.
pub(crate) const CUBE_SIZE: u32 = 256;

impl Quantizer {
    /// A quantizer for `device` (opens the CUDA context on first use of the device).
    pub fn new(device: Device) -> Self {
        match device {
            Device::Cpu => Self::Cpu,
            Device::Cuda(index) => Self::Cuda {
                index,
                client: CudaRuntime::client(&CudaDevice { index }),
            },
        }
    }

    /// The device this quantizer runs on.
    pub fn device(&self) -> Device {
        match self {
            Self::Cpu => Device::Cpu,
            Self::Cuda { index, .. } => Device::Cuda(*index),
        }
    }

    /// `dequantize(quantize(data))` with the calibrated `amax`, as f32 (same contract as
    /// [`qatflow_nvfp4::codec::fake_quantize`]; the GPU path checks shape and amax, not finiteness).
    pub fn fake_quantize<T: KernelElement>(
        &self,
        name: &str,
        data: &[T],
        shape: &[usize],
        amax: f32,
    ) -> Result<Vec<T>> {
        match self {
            Self::Cpu => Ok(codec::fake_quantize(name, data, shape, amax)?
                .into_iter()
                .map(T::from_f32_value)
                .collect()),
            Self::Cuda { index, client } => {
                let (n, scale_2) = prepare(name, data.len(), shape, amax)?;
                let input = client.create_from_slice(T::as_bytes(data));
                let output = client.empty(n * size_of::<T>());
                launch_fake_quantize::<T, CudaRuntime>(client, input, output.clone(), n, scale_2);
                let bytes = client
                    .read_one(output)
                    .map_err(|e| device_error("fake_quantize_kernel", *index, name, e))?;
                Ok(T::from_bytes(&bytes).to_vec())
            }
        }
    }
}

/// Launches [`kernel::fake_quantize_kernel`] on device buffers: `input` and `output` hold `n`
/// elements of `T` (`n % 16 == 0`); `scale_2` is `weight_scale_2` from the calibrated amax.
pub fn launch_fake_quantize<T: KernelElement, R: Runtime>(
    client: &ComputeClient<R>,
    input: Handle,
    output: Handle,
    n: usize,
    scale_2: f32,
) {
    let blocks = n / BLOCK_SIZE;
    // SAFETY: both buffers hold n elements (n / 8 vectors of 8) and the kernel touches only
    // vectors 2b and 2b + 1 of blocks b < n / 16.
    unsafe {
        kernel::fake_quantize_kernel::launch_unchecked::<T, R>(
            client,
            cube_count(blocks),
            CubeDim::new_1d(CUBE_SIZE),
            ArrayArg::from_raw_parts(input, n / 8),
            ArrayArg::from_raw_parts(output, n / 8),
            scale_2,
            blocks as u32,
        );
    }
}

/// Launches [`kernel::copy_kernel`]: copies `bytes` bytes (a multiple of 16) from `input` to
/// `output`, the memory-bandwidth reference of the benchmark.
pub fn launch_copy(
    client: &ComputeClient<CudaRuntime>,
    input: Handle,
    output: Handle,
    bytes: usize,
) {
    let vectors = bytes / 16;
    // SAFETY: both buffers hold `bytes` bytes, i.e. `vectors` vectors of 4 words.
    unsafe {
        kernel::copy_kernel::launch_unchecked::<CudaRuntime>(
            client,
            cube_count(vectors),
            CubeDim::new_1d(CUBE_SIZE),
            ArrayArg::from_raw_parts(input, vectors),
            ArrayArg::from_raw_parts(output, vectors),
            vectors as u32,
        );
    }
}

/// Validates shape and amax like the codec; returns the element count and `weight_scale_2`.
fn prepare(name: &str, len: usize, shape: &[usize], amax: f32) -> Result<(usize, f32)> {
    let n = codec::check_shape(name, shape, len)?;
    Ok((n, codec::weight_scale_2(name, amax)?))
}

/// Cubes of [`CUBE_SIZE`] units covering `units` units.
pub fn cube_count(units: usize) -> CubeCount {
    CubeCount::Static((units as u32).div_ceil(CUBE_SIZE), 1, 1)
}

fn device_error(
    kernel: &'static str,
    index: usize,
    name: &str,
    e: impl std::fmt::Display,
) -> Error {
    Error::Device {
        kernel,
        device: format!("CUDA device {index}"),
        name: name.to_owned(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_path_is_the_codec() {
        let data: Vec<bf16> = (0..64)
            .map(|i| bf16::from_f32((i as f32 - 31.5) / 9.0))
            .collect();
        let amax = codec::amax("w", &data).expect("finite");
        let q = Quantizer::new(Device::Cpu);
        assert_eq!(q.device(), Device::Cpu);
        let fq = q
            .fake_quantize("w", &data, &[2, 32], amax)
            .expect("quantizable");
        let want = codec::fake_quantize("w", &data, &[2, 32], amax).expect("quantizable");
        assert_eq!(fq, want.into_iter().map(bf16::from_f32).collect::<Vec<_>>());
        let err = q.fake_quantize("w", &data, &[4, 16], 0.0).unwrap_err();
        assert!(matches!(
            err,
            Error::Nvfp4(qatflow_nvfp4::Error::InvalidAmax { .. })
        ));
    }

    #[test]
    fn cube_count_covers_all_blocks() {
        assert!(matches!(cube_count(1), CubeCount::Static(1, 1, 1)));
        assert!(matches!(cube_count(256), CubeCount::Static(1, 1, 1)));
        assert!(matches!(cube_count(257), CubeCount::Static(2, 1, 1)));
    }
}
