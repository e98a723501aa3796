//! NVFP4 fake quantization of burn tensors, through the one-pass CubeCL kernel
//! ([`crate::kernel::fake_quantize_kernel`]) when the tensor lives on CUDA, through the
//! reference codec's block loop on the CPU, and through `qatflow_nvfp4::fake_quant`'s tensor
//! operations on any other backend. All give bit-identical
//! values (`examples/gpu_check.rs` checks it on a GPU).
//!
//! The model code is generic over burn backends, so the CUDA path is found at run time: the
//! tensor's primitive is matched against the CUDA primitives qatflow runs on (`CubeBackend`,
//! `Fusion<CubeBackend>`, and both under `Autodiff`). On burn's `flex` CPU backend the
//! reference codec runs over the tensor's data on every core. Under fusion the kernel is registered
//! as a custom operation of the fusion stream, so it runs in stream order and needs no sync.
//! The straight-through estimator is the same as `qatflow_nvfp4::fake_quant::fake_quantize`'s
//! (`fq(x.detach()) + (x - x.detach())`): the kernel only ever sees detached values.

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::Flex;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use burn_fusion::{Fusion, FusionTensor};
use cubecl::cuda::CudaRuntime;
use half::bf16;
use qatflow_nvfp4::codec::BLOCK_SIZE;
use qatflow_nvfp4::fake_quant::fake_quantize_value as tensor_ops_fake_quantize;

use crate::custom::{downcast, upcast, Cube, CubeBf16, FusedRuntime};
use crate::{launch_fake_quantize, Result};

/// NVFP4 fake quantization with the straight-through estimator: the same contract as
/// `qatflow_nvfp4::fake_quant::fake_quantize` (shape `[.., K]` with `K % 16 == 0`, the
/// calibrated global `amax`, identity gradient), with the CubeCL kernel on CUDA.
///
/// Under autodiff on CUDA it is one operation whose backward passes the gradient through
/// and which, under burn's balanced checkpointing, is recomputed in backward rather than
/// stored (same values and gradient as the composed form elsewhere).
pub fn fake_quantize<B: Backend, const D: usize>(
    name: &str,
    x: Tensor<B, D>,
    amax: f32,
) -> Result<Tensor<B, D>> {
    let dims = x.dims();
    let n: usize = dims.iter().product();
    qatflow_nvfp4::codec::check_shape(name, &dims, n)?;
    let scale_2 = qatflow_nvfp4::codec::global_scale(name, amax)?;
    let x = if matches!(x.dtype(), DType::F32 | DType::BF16) {
        match ste_on_cuda::<B>(x.into_primitive().tensor(), scale_2) {
            Ok(out) => return Ok(Tensor::from_primitive(TensorPrimitive::Float(out))),
            Err(x) => Tensor::from_primitive(TensorPrimitive::Float(x)),
        }
    } else {
        x
    };
    qatflow_nvfp4::fake_quant::straight_through(x, |detached| {
        fake_quantize_value(name, detached, amax)
    })
}

/// A CUDA backend the fake-quant kernel runs on (with or without fusion).
pub(crate) trait CudaFakeQuant: Backend {
    /// The kernel's values for `x` with global scale `scale_2`.
    fn fake_quantize(x: FloatTensor<Self>, scale_2: f32) -> FloatTensor<Self>;
}

impl CudaFakeQuant for Fusion<Cube> {
    fn fake_quantize(x: FloatTensor<Self>, scale_2: f32) -> FloatTensor<Self> {
        fused_fake_quantize(x, scale_2)
    }
}

impl CudaFakeQuant for Fusion<CubeBf16> {
    fn fake_quantize(x: FloatTensor<Self>, scale_2: f32) -> FloatTensor<Self> {
        fused_fake_quantize(x, scale_2)
    }
}

/// [`CudaFakeQuant::fake_quantize`] as part of the fake-quant phase (`crate::phase`).
fn timed_fake_quantize<I: CudaFakeQuant>(x: FloatTensor<I>, scale_2: f32) -> FloatTensor<I> {
    let device = I::float_device(&x);
    crate::phase::timed::<I, _>(crate::phase::Phase::FakeQuant, &device, || {
        I::fake_quantize(x, scale_2)
    })
}

/// Backward of the straight-through fake quantization: the identity.
#[derive(Debug)]
struct SteBackward;

impl<I: Backend> Backward<I, 1> for SteBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<I>(&ops.node);
        let [parent] = ops.parents;
        if let Some(node) = parent {
            grads.register::<I>(node.id, grad);
        }
    }
}

/// Recomputes the fake-quantized values from the saved input in backward.
#[derive(Debug)]
struct RetroFakeQuantize<I> {
    input: NodeId,
    scale_2: f32,
    _backend: std::marker::PhantomData<I>,
}

impl<I: CudaFakeQuant> RetroForward for RetroFakeQuantize<I> {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let x = states.get_state::<FloatTensor<I>>(&self.input);
        states.save(out_node, timed_fake_quantize::<I>(x, self.scale_2));
    }
}

/// The straight-through operation under `Autodiff<I, C>`.
fn autodiff_ste<I: CudaFakeQuant, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<I, C>>,
    scale_2: f32,
) -> FloatTensor<Autodiff<I, C>> {
    let retro = RetroFakeQuantize::<I> {
        input: x.node.id,
        scale_2,
        _backend: std::marker::PhantomData,
    };
    let out = timed_fake_quantize::<I>(x.primitive.clone(), scale_2);
    SteBackward
        .prepare::<C>([x.node.clone()])
        .memory_bound()
        .retro_forward(retro)
        .parents([&x])
        .stateless(out)
}

/// Runs [`autodiff_ste`] when `B` is `Autodiff<I, C>`.
fn ste_when<B: Backend, I: CudaFakeQuant, C: CheckpointStrategy>(
    x: FloatTensor<B>,
    scale_2: f32,
) -> std::result::Result<FloatTensor<B>, FloatTensor<B>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I, C>>() {
        return Err(x);
    }
    let x = downcast::<_, FloatTensor<Autodiff<I, C>>>(x)?;
    Ok(upcast(autodiff_ste::<I, C>(x, scale_2)))
}

/// The straight-through operation on the CUDA autodiff backends qatflow trains on.
fn ste_on_cuda<B: Backend>(
    x: FloatTensor<B>,
    scale_2: f32,
) -> std::result::Result<FloatTensor<B>, FloatTensor<B>> {
    ste_when::<B, Fusion<Cube>, BalancedCheckpointing>(x, scale_2)
        .or_else(|x| ste_when::<B, Fusion<Cube>, NoCheckpointing>(x, scale_2))
        .or_else(|x| ste_when::<B, Fusion<CubeBf16>, BalancedCheckpointing>(x, scale_2))
        .or_else(|x| ste_when::<B, Fusion<CubeBf16>, NoCheckpointing>(x, scale_2))
}

/// The straight-through estimator around a value computed before (the step's cached
/// fake-quantized weight): returns `value` with `x`'s identity gradient, the same values and
/// gradient as [`fake_quantize`] when `value` is `fake_quantize_value(x)`.
///
/// Under autodiff on CUDA it is one operation that computes nothing: forward hands `value`
/// out, backward passes the gradient to `x`, and balanced checkpointing's recompute hands
/// `value` out again. Elsewhere it is the composed form `value + (x − x.detach())`.
pub fn straight_through_value<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    value: Tensor<B, D>,
) -> Tensor<B, D> {
    let applies = matches!(x.dtype(), DType::F32 | DType::BF16) && x.dtype() == value.dtype();
    let (x, value) = if applies {
        let pair = (x.into_primitive().tensor(), value.into_primitive().tensor());
        match value_on_cuda::<B>(pair) {
            Ok(out) => return Tensor::from_primitive(TensorPrimitive::Float(out)),
            Err((x, v)) => (
                Tensor::from_primitive(TensorPrimitive::Float(x)),
                Tensor::from_primitive(TensorPrimitive::Float(v)),
            ),
        }
    } else {
        (x, value)
    };
    value + (x.clone() - x.detach())
}

/// Hands a value computed before out again in backward's recompute.
#[derive(Debug)]
struct RetroValue<I: Backend> {
    value: FloatTensor<I>,
}

impl<I: Backend> RetroForward for RetroValue<I> {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        states.save(out_node, self.value.clone());
    }
}

/// [`straight_through_value`] under `Autodiff<I, C>`.
fn autodiff_value<I: Backend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<I, C>>,
    value: FloatTensor<I>,
) -> FloatTensor<Autodiff<I, C>> {
    SteBackward
        .prepare::<C>([x.node.clone()])
        .memory_bound()
        .retro_forward(RetroValue::<I> {
            value: value.clone(),
        })
        .parents([&x])
        .stateless(value)
}

/// Runs [`autodiff_value`] when `B` is `Autodiff<I, C>`; `value` is a detached tensor of
/// `B`, whose inner tensor is what the operation hands out.
fn value_when<B: Backend, I: CudaFakeQuant, C: CheckpointStrategy>(
    (x, value): (FloatTensor<B>, FloatTensor<B>),
) -> std::result::Result<FloatTensor<B>, (FloatTensor<B>, FloatTensor<B>)> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I, C>>() {
        return Err((x, value));
    }
    let cast = |t: FloatTensor<B>| {
        downcast::<_, FloatTensor<Autodiff<I, C>>>(t).unwrap_or_else(|_| unreachable!("B is X"))
    };
    let value = cast(value).primitive;
    Ok(upcast(autodiff_value::<I, C>(cast(x), value)))
}

/// [`straight_through_value`] on the CUDA autodiff backends qatflow trains on.
fn value_on_cuda<B: Backend>(
    pair: (FloatTensor<B>, FloatTensor<B>),
) -> std::result::Result<FloatTensor<B>, (FloatTensor<B>, FloatTensor<B>)> {
    value_when::<B, Fusion<Cube>, BalancedCheckpointing>(pair)
        .or_else(value_when::<B, Fusion<Cube>, NoCheckpointing>)
        .or_else(value_when::<B, Fusion<CubeBf16>, BalancedCheckpointing>)
        .or_else(value_when::<B, Fusion<CubeBf16>, NoCheckpointing>)
}

/// The forward value of [`fake_quantize`] (no gradient path).
pub fn fake_quantize_value<B: Backend, const D: usize>(
    name: &str,
    x: Tensor<B, D>,
    amax: f32,
) -> Result<Tensor<B, D>> {
    let dims = x.dims();
    let n: usize = dims.iter().product();
    qatflow_nvfp4::codec::check_shape(name, &dims, n)?;
    let scale_2 = qatflow_nvfp4::codec::global_scale(name, amax)?;
    if !matches!(x.dtype(), DType::F32 | DType::BF16) {
        return Ok(tensor_ops_fake_quantize(name, x, amax)?);
    }
    if is_host::<B>() {
        return Ok(on_host(x, scale_2));
    }
    let primitive = x.into_primitive().tensor();
    match on_cuda::<B>(primitive, scale_2) {
        Ok(out) => Ok(Tensor::from_primitive(TensorPrimitive::Float(out))),
        Err(primitive) => {
            let x = Tensor::from_primitive(TensorPrimitive::Float(primitive));
            Ok(tensor_ops_fake_quantize(name, x, amax)?)
        }
    }
}

/// Whether `B` keeps its tensors in host memory (burn's `flex`, with or without autodiff):
/// reading a tensor back is then a copy, not a device transfer.
fn is_host<B: Backend>() -> bool {
    TypeId::of::<burn::tensor::Device<B>>() == TypeId::of::<burn::tensor::Device<Flex>>()
}

/// Elements below which the host path stays on one thread.
const HOST_PARALLEL_MIN: usize = 1 << 16;

/// The reference codec's block loop over the tensor's values, on every core: one pass over
/// the data instead of the ~20 tensor operations of the composed form (which dominated
/// CPU evaluation of NVFP4 exports). Output in the input's dtype; values as the codec's
/// (F32 and BF16 inputs; BF16 results rounded to nearest even, as the CUDA kernel does).
fn on_host<B: Backend, const D: usize>(x: Tensor<B, D>, scale_2: f32) -> Tensor<B, D> {
    let device = x.device();
    let dtype = x.dtype();
    let data = x.into_data();
    let shape = data.shape.clone();
    let mut values: Vec<f32> = data
        .convert::<f32>()
        .into_vec()
        .expect("converted to f32 just above");
    let blocks = |chunk: &mut [f32]| {
        for block in chunk.chunks_exact_mut(BLOCK_SIZE) {
            let block: &mut [f32; BLOCK_SIZE] = block.try_into().expect("exact chunks");
            qatflow_nvfp4::codec::fake_quantize_block(block, scale_2);
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if values.len() < HOST_PARALLEL_MIN || threads == 1 {
        blocks(&mut values);
    } else {
        let per = values.len().div_ceil(threads).next_multiple_of(BLOCK_SIZE);
        std::thread::scope(|s| {
            for chunk in values.chunks_mut(per) {
                s.spawn(move || blocks(chunk));
            }
        });
    }
    Tensor::from_data(TensorData::new(values, shape), (&device, dtype))
}

/// Runs the kernel when `B`'s float primitive is one of the CUDA primitives; gives the
/// primitive back untouched otherwise.
fn on_cuda<B: Backend>(
    x: FloatTensor<B>,
    scale_2: f32,
) -> std::result::Result<FloatTensor<B>, FloatTensor<B>> {
    let x = match downcast::<_, CubeTensor<CudaRuntime>>(x) {
        Ok(t) => return Ok(upcast(cube_fake_quantize(t, scale_2))),
        Err(x) => x,
    };
    let x = match downcast::<_, FusionTensor<FusedRuntime>>(x) {
        Ok(t) => return Ok(upcast(fused_fake_quantize(t, scale_2))),
        Err(x) => x,
    };
    // `Autodiff`'s primitive depends on the inner backend's float element type, not on the
    // checkpointing strategy.
    let x = match under_autodiff::<B, Fusion<Cube>>(x, scale_2, fused_fake_quantize) {
        Ok(t) => return Ok(t),
        Err(x) => x,
    };
    let x = match under_autodiff::<B, Fusion<CubeBf16>>(x, scale_2, fused_fake_quantize) {
        Ok(t) => return Ok(t),
        Err(x) => x,
    };
    let x = match under_autodiff::<B, Cube>(x, scale_2, cube_fake_quantize) {
        Ok(t) => return Ok(t),
        Err(x) => x,
    };
    under_autodiff::<B, CubeBf16>(x, scale_2, cube_fake_quantize)
}

/// Applies `f` to the inner tensor when `B`'s primitive is `Autodiff<I>`'s; the result is an
/// untracked leaf (the caller adds the straight-through path).
fn under_autodiff<B: Backend, I: Backend>(
    x: FloatTensor<B>,
    scale_2: f32,
    f: fn(FloatTensor<I>, f32) -> FloatTensor<I>,
) -> std::result::Result<FloatTensor<B>, FloatTensor<B>> {
    let t = downcast::<_, FloatTensor<Autodiff<I>>>(x)?;
    let inner = f(Autodiff::<I>::inner(t), scale_2);
    Ok(upcast(Autodiff::<I>::from_inner(inner)))
}

/// The kernel on a CubeCL tensor (made contiguous first), into a new tensor of its dtype.
fn cube_fake_quantize<R: CubeRuntime>(x: CubeTensor<R>, scale_2: f32) -> CubeTensor<R> {
    use burn::tensor::TensorMetadata;
    let x = burn_cubecl::kernel::into_contiguous(x);
    let shape = x.shape();
    let n = shape.num_elements();
    let size = x.dtype.size();
    let out = CubeTensor::new_contiguous(
        x.client.clone(),
        x.device.clone(),
        shape,
        x.client.empty(n * size),
        x.dtype,
    );
    match x.dtype {
        DType::F32 => launch_fake_quantize::<f32, R>(
            &x.client,
            x.handle.clone(),
            out.handle.clone(),
            n,
            scale_2,
        ),
        DType::BF16 => launch_fake_quantize::<bf16, R>(
            &x.client,
            x.handle.clone(),
            out.handle.clone(),
            n,
            scale_2,
        ),
        other => unreachable!("fake_quantize_value sends only F32 and BF16 here, not {other:?}"),
    }
    out
}

/// [`cube_fake_quantize`] as a custom operation of the fusion stream.
fn fused_fake_quantize(x: FusionTensor<FusedRuntime>, scale_2: f32) -> FusionTensor<FusedRuntime> {
    let mut out = crate::custom::on_cuda::<Fusion<Cube>, _>(&FakeQuantize { scale_2 }, vec![x])
        .unwrap_or_else(|_| unreachable!("a fusion tensor of burn's CUDA backend"));
    out.remove(0)
}

/// The launch of one fake quantization: a tensor in, its fake-quantized values out.
#[derive(Debug, Clone, Copy)]
struct FakeQuantize {
    scale_2: f32,
}

impl crate::custom::CubeCall for FakeQuantize {
    const NAME: &'static str = "qatflow_nvfp4_fake_quantize";

    fn outputs(&self, inputs: &[(Vec<usize>, DType)]) -> Vec<(Vec<usize>, DType)> {
        inputs.to_vec()
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>) -> Vec<CubeTensor<R>> {
        inputs
            .into_iter()
            .map(|x| cube_fake_quantize(x, self.scale_2))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Ad = Autodiff<Flex>;

    fn sample(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0 + if i % 29 == 0 { 9.0 } else { 0.0 })
            .collect()
    }

    /// The cached-value operation (what CUDA runs) on the CPU: its output is the value, its
    /// gradient the identity, also when balanced checkpointing recomputes it in backward.
    #[test]
    fn the_value_operation_hands_out_the_value_with_the_identity_gradient() {
        fn run<C: CheckpointStrategy>() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
            type In = Flex;
            let dev = Default::default();
            let w0 = Tensor::<In, 2>::from_data(TensorData::new(sample(64), [4, 16]), &dev);
            let value = fake_quantize_value("w", w0.clone(), 9.5).unwrap();
            let w = Tensor::<Autodiff<In, C>, 2>::from_inner(w0).require_grad();
            let out = autodiff_value::<In, C>(
                w.clone().into_primitive().tensor(),
                value.clone().into_primitive().tensor(),
            );
            let out = Tensor::<Autodiff<In, C>, 2>::from_primitive(TensorPrimitive::Float(out));
            // A compute-bound consumer whose backward needs `out` (recomputed under the
            // balanced strategy).
            let x = Tensor::<Autodiff<In, C>, 2>::from_inner(Tensor::<In, 2>::from_data(
                TensorData::new(sample(48), [3, 16]),
                &dev,
            ));
            let y = x.matmul(out.clone().transpose());
            let grads = (y.clone() * y).sum().backward();
            let g = w.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
            (
                out.inner().into_data().to_vec::<f32>().unwrap(),
                value.into_data().to_vec::<f32>().unwrap(),
                g,
            )
        }
        let (out, value, g_plain) = run::<NoCheckpointing>();
        assert_eq!(out, value);
        let (out, _, g_balanced) = run::<BalancedCheckpointing>();
        assert_eq!(out, value);
        assert_eq!(g_plain, g_balanced);
        assert!(g_plain.iter().any(|&g| g != 0.0));
        // The same gradient as the composed form (identity through the value).
        let dev = Default::default();
        let w =
            Tensor::<Ad, 2>::from_data(TensorData::new(sample(64), [4, 16]), &dev).require_grad();
        let v = Tensor::<Ad, 2>::from_data(TensorData::new(value.clone(), [4, 16]), &dev);
        let out = straight_through_value(w.clone(), v);
        let x = Tensor::<Ad, 2>::from_data(TensorData::new(sample(48), [3, 16]), &dev);
        let y = x.matmul(out.transpose());
        let g = w.grad(&(y.clone() * y).sum().backward()).unwrap();
        assert_eq!(g.into_data().to_vec::<f32>().unwrap(), g_plain);
    }

    #[test]
    fn off_cuda_it_is_the_tensor_ops_path_bit_for_bit() {
        let data = sample(4 * 64);
        let x = Tensor::<Flex, 2>::from_data(
            TensorData::new(data.clone(), [4, 64]),
            &Default::default(),
        );
        let got = fake_quantize_value("x", x.clone(), 13.0).unwrap();
        let want = tensor_ops_fake_quantize("x", x, 13.0).unwrap();
        let bits = |t: Tensor<Flex, 2>| -> Vec<u32> {
            t.into_data()
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(got), bits(want));
        let codec = qatflow_nvfp4::codec::fake_quantize("x", &data, &[4, 64], 13.0).unwrap();
        let x = Tensor::<Flex, 2>::from_data(TensorData::new(data, [4, 64]), &Default::default());
        let got = fake_quantize_value("x", x, 13.0).unwrap();
        assert_eq!(
            bits(got),
            codec.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_host_path_matches_the_codec_on_many_threads_and_in_bf16() {
        let rows = HOST_PARALLEL_MIN / 64 + 3;
        let data = sample(rows * 64);
        let codec = qatflow_nvfp4::codec::fake_quantize("x", &data, &[rows, 64], 21.0).unwrap();
        let x = Tensor::<Flex, 2>::from_data(
            TensorData::new(data.clone(), [rows, 64]),
            &Default::default(),
        );
        let got = fake_quantize_value("x", x, 21.0).unwrap().into_data();
        assert_eq!(got.to_vec::<f32>().unwrap(), codec);
        let halves: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        let codec = qatflow_nvfp4::codec::fake_quantize("x", &halves, &[rows, 64], 21.0).unwrap();
        let x = Tensor::<Flex, 2>::from_data(
            TensorData::new(halves, [rows, 64]),
            (&Default::default(), DType::BF16),
        );
        let got = fake_quantize_value("x", x, 21.0).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let want: Vec<bf16> = codec.iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(got.into_data().to_vec::<bf16>().unwrap(), want);
    }

    #[test]
    fn gradient_passes_straight_through() {
        let x = Tensor::<Ad, 2>::from_data(
            TensorData::new(sample(2 * 32), [2, 32]),
            &Default::default(),
        )
        .require_grad();
        let weights = Tensor::<Ad, 2>::from_data(
            TensorData::new(sample(2 * 32), [2, 32]),
            &Default::default(),
        );
        let grads = (fake_quantize("x", x.clone(), 10.0).unwrap() * weights.clone())
            .sum()
            .backward();
        let g = x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        assert_eq!(g, weights.into_data().to_vec::<f32>().unwrap());
    }

    #[test]
    fn bad_shapes_and_amax_are_refused() {
        let x = Tensor::<Flex, 2>::zeros([2, 24], &Default::default());
        assert!(fake_quantize_value("x", x, 1.0)
            .unwrap_err()
            .to_string()
            .contains("16"));
        let x = Tensor::<Flex, 2>::zeros([2, 32], &Default::default());
        assert!(fake_quantize_value("x", x, 0.0).is_err());
    }

    /// The CubeCL kernel on the software GPU against the reference codec, value for value
    /// (F32 input; ties, zeros, a block at the top of the range and blocks far below it).
    #[test]
    fn the_kernel_equals_the_codec() {
        use crate::custom::CubeCall;
        use crate::soft_gpu::{self, read, Soft};
        let mut data = sample(4096);
        data[16..32].fill(0.0);
        data[32..48].iter_mut().for_each(|v| *v *= 1e-4);
        let amax = qatflow_nvfp4::codec::amax("w", &data).expect("finite");
        let want = qatflow_nvfp4::codec::fake_quantize("w", &data, &[64, 64], amax).unwrap();
        let scale_2 = qatflow_nvfp4::codec::weight_scale_2("w", amax).unwrap();
        let got = FakeQuantize { scale_2 }.run::<Soft>(vec![soft_gpu::tensor(&data, &[64, 64])]);
        let got = read(&got[0]);
        let wrong: Vec<usize> = (0..data.len()).filter(|&i| got[i] != want[i]).collect();
        assert!(
            wrong.is_empty(),
            "{} values differ, first {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
}
