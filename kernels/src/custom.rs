//! One CubeCL launch as a burn operation on CUDA, with or without burn's fusion layer.
//!
//! A [`CubeCall`] says what a launch makes of its input tensors (shapes and dtypes of its
//! outputs, known before it runs) and runs it on CubeCL tensors. [`on_cuda`] runs it when the
//! backend is burn's CUDA backend: directly on a `CubeTensor`, or under fusion as a custom
//! operation of the fusion stream (so it runs in stream order with burn's own kernels), and
//! hands the inputs back on any other backend, whose caller then takes the tensor form. It
//! also names the CUDA backends qatflow runs on and casts between a generic backend's types
//! and theirs ([`downcast`], [`upcast`]).

use std::any::TypeId;
use std::fmt::Debug;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::FusionTensor;
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use cubecl::cuda::CudaRuntime;

use std::any::Any;

use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::{CubeBackend, CubeRuntime};
use half::bf16;

/// The CUDA backend without fusion.
pub(crate) type Cube = CubeBackend<CudaRuntime, f32, i32, u8>;
/// The CUDA backend with BF16 as its default float type.
pub(crate) type CubeBf16 = CubeBackend<CudaRuntime, bf16, i32, u8>;
/// Fusion's handle type for CUDA.
pub(crate) type FusedRuntime = FusionCubeRuntime<CudaRuntime>;

/// `t` as a `U` when `T` is `U`.
pub(crate) fn downcast<T: 'static, U: 'static>(t: T) -> std::result::Result<U, T> {
    if TypeId::of::<T>() == TypeId::of::<U>() {
        let boxed: Box<dyn Any> = Box::new(t);
        Ok(*boxed.downcast::<U>().expect("same TypeId"))
    } else {
        Err(t)
    }
}

/// The inverse of [`downcast`], for a type already known to match.
pub(crate) fn upcast<T: 'static, U: 'static>(t: T) -> U {
    downcast::<T, U>(t).unwrap_or_else(|_| unreachable!("called only after a successful downcast"))
}

/// One launch: its outputs and how it runs.
pub(crate) trait CubeCall: Debug + Clone + Send + Sync + 'static {
    /// Name of the fusion stream's custom operation.
    const NAME: &'static str;

    /// Shapes and dtypes of the outputs for inputs of these shapes and dtypes.
    fn outputs(&self, inputs: &[(Vec<usize>, DType)]) -> Vec<(Vec<usize>, DType)>;

    /// The launch on CubeCL tensors of any runtime (any layout; make them contiguous as
    /// needed): CUDA in training, a software Vulkan device in the kernels' tests.
    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>) -> Vec<CubeTensor<R>>;
}

/// Runs `call` when `I` is burn's CUDA backend (with or without fusion); the inputs back
/// otherwise.
pub(crate) fn on_cuda<I: Backend, K: CubeCall>(
    call: &K,
    inputs: Vec<FloatTensor<I>>,
) -> Result<Vec<FloatTensor<I>>, Vec<FloatTensor<I>>> {
    let tid = TypeId::of::<FloatTensor<I>>();
    // The tests' software GPU runs the same launches as CUDA.
    #[cfg(test)]
    if tid == TypeId::of::<CubeTensor<crate::soft_gpu::Soft>>() {
        let soft = inputs.into_iter().map(upcast).collect();
        let out = call.run::<crate::soft_gpu::Soft>(soft);
        return Ok(out.into_iter().map(upcast).collect());
    }
    if tid == TypeId::of::<FusionTensor<FusedRuntime>>() {
        let fused = inputs.into_iter().map(upcast).collect();
        Ok(fused_call(call, fused).into_iter().map(upcast).collect())
    } else if tid == TypeId::of::<CubeTensor<CudaRuntime>>() {
        let cube = inputs.into_iter().map(upcast).collect();
        Ok(call
            .run::<CudaRuntime>(cube)
            .into_iter()
            .map(upcast)
            .collect())
    } else {
        Err(inputs)
    }
}

/// `call` as one custom operation of the fusion stream.
fn fused_call<K: CubeCall>(
    call: &K,
    inputs: Vec<FusionTensor<FusedRuntime>>,
) -> Vec<FusionTensor<FusedRuntime>> {
    let client = inputs[0].client.clone();
    let described: Vec<(Vec<usize>, DType)> =
        inputs.iter().map(|t| (t.shape.to_vec(), t.dtype)).collect();
    let outs: Vec<TensorIr> = call
        .outputs(&described)
        .into_iter()
        .map(|(shape, dtype)| {
            TensorIr::uninit(client.create_empty_handle(), Shape::from(shape), dtype)
        })
        .collect();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let irs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(K::NAME, &irs, &outs);
    client.register(
        streams,
        OperationIr::Custom(desc.clone()),
        CallOp {
            desc,
            call: call.clone(),
        },
    )
}

/// The fusion stream's record of one launch.
#[derive(Debug, Clone)]
struct CallOp<K> {
    desc: CustomOpIr,
    call: K,
}

impl<K: CubeCall> Operation<FusedRuntime> for CallOp<K> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<FusedRuntime as burn_fusion::FusionRuntime>::FusionHandle>,
    ) {
        let inputs = self
            .desc
            .inputs
            .iter()
            .map(|ir| handles.get_float_tensor::<Cube>(ir))
            .collect();
        for (ir, out) in self.desc.outputs.iter().zip(self.call.run(inputs)) {
            handles.register_float_tensor::<Cube>(&ir.id, out);
        }
    }
}

/// An empty contiguous CubeCL tensor on `like`'s device.
pub(crate) fn empty<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: Vec<usize>,
    dtype: DType,
) -> CubeTensor<R> {
    let client = like.client.clone();
    let n: usize = shape.iter().product();
    CubeTensor::new_contiguous(
        client.clone(),
        like.device.clone(),
        Shape::from(shape),
        client.empty(n * dtype.size()),
        dtype,
    )
}
