//! One module per subcommand.

/// `$f::<B>(args…, device)` with `B` the inference backend of `$device` (a
/// `qatflow_core::Device`): burn's `flex` on the CPU, CUDA on `cuda:N`. The one place the
/// CLI's inference commands name those backends. `unfused` picks CUDA without burn's fusion
/// layer (`qatflow_kernels::CudaUnfused`; the server needs it).
macro_rules! on_inference_backend {
    (unfused $device:expr, $f:ident($($arg:expr),* $(,)?)) => {
        on_inference_backend!(@on qatflow_kernels::CudaUnfused, $device, $f($($arg),*))
    };
    ($device:expr, $f:ident($($arg:expr),* $(,)?)) => {
        on_inference_backend!(@on burn::backend::Cuda, $device, $f($($arg),*))
    };
    (@on $cuda:ty, $device:expr, $f:ident($($arg:expr),*)) => {
        match $device {
            qatflow_core::Device::Cpu => $f::<burn::backend::Flex>($($arg,)* Default::default()),
            qatflow_core::Device::Cuda(i) => {
                $crate::cmd::kernel_cache();
                $f::<$cuda>($($arg,)* burn::backend::cuda::CudaDevice::new(i))
            }
        }
    };
}

pub mod bench;
pub mod bench_gates;
pub mod dataset;
pub mod demo;
pub mod export;
pub mod generate;
pub mod infer;
pub mod model;
pub mod node;
pub mod quant_check;
pub mod render_audit;
pub mod serve;
pub mod train;
pub mod validate;

/// Turns CubeCL's compiled-kernel cache on before any GPU work and says where it is (the
/// GPU commands call it: a second run loads its kernels instead of compiling them again).
pub(crate) fn kernel_cache() {
    match qatflow_kernels::cache::enable_compilation_cache() {
        qatflow_kernels::cache::CacheSetting::On(dir) => {
            tracing::info!(dir = %dir.display(), "CubeCL kernel cache (QATFLOW_KERNEL_CACHE=off disables it)")
        }
        other => tracing::info!(setting = ?other, "CubeCL kernel cache"),
    }
}
