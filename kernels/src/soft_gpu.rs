//! A software GPU for the kernels' tests: CubeCL's wgpu runtime on a Vulkan device, which on
//! machines without a GPU (developers', CI's) is Mesa's lavapipe, an LLVM-compiled Vulkan
//! implementation on the CPU (`scripts/test.sh` installs it). The kernels run there exactly
//! as written for CUDA (same CubeCL source, another compiler), in F32 (WGSL has no BF16), so
//! their indexing, reductions, masking and per-element arithmetic are tested on every run
//! instead of only on a rented GPU.

use burn::tensor::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};

/// The runtime of the tests' device.
pub(crate) type Soft = WgpuRuntime;

/// burn's backend on the tests' device (no fusion): [`crate::custom::on_cuda`] runs the
/// kernels' launches on it as on CUDA.
pub(crate) type SoftBackend = burn_cubecl::CubeBackend<Soft, f32, i32, u32>;

/// The tests' device: the first Vulkan adapter wgpu finds (lavapipe where there is no GPU).
pub(crate) fn device() -> WgpuDevice {
    WgpuDevice::DefaultDevice
}

/// An F32 tensor of `shape` holding `values`, on the tests' device.
pub(crate) fn tensor(values: &[f32], shape: &[usize]) -> CubeTensor<Soft> {
    assert_eq!(
        values.len(),
        shape.iter().product::<usize>(),
        "values for the shape"
    );
    let client = Soft::client(&device());
    let handle = client.create_from_slice(f32::as_bytes(values));
    CubeTensor::new_contiguous(
        client,
        device(),
        Shape::from(shape.to_vec()),
        handle,
        DType::F32,
    )
}

/// The values of an F32 tensor of the tests' device.
pub(crate) fn read(t: &CubeTensor<Soft>) -> Vec<f32> {
    assert_eq!(t.dtype, DType::F32, "the tests read F32 tensors");
    let t = burn_cubecl::kernel::into_contiguous(t.clone());
    let bytes = t
        .client
        .read_one(t.handle.clone())
        .expect("reading a tensor back from the Vulkan device");
    f32::from_bytes(&bytes).to_vec()
}

/// Deterministic pseudo-random values in (−1, 1).
pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = qatflow_core::rng::SplitMix64::new(seed);
    (0..n)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
        .collect()
}

/// Largest `|a − b| / (1 + |b|)` over two equal-length slices (NaN counts as a mismatch
/// unless both are NaN).
pub(crate) fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            if x.is_nan() && y.is_nan() {
                0.0
            } else if x.is_nan() || y.is_nan() {
                f32::INFINITY
            } else {
                (x - y).abs() / (1.0 + y.abs())
            }
        })
        .fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_makes_the_round_trip() {
        let v = values(1000, 1);
        assert!(v.iter().all(|x| x.abs() < 1.0));
        assert_eq!(read(&tensor(&v, &[10, 100])), v);
    }
}
