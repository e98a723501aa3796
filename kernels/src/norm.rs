//! RMSNorm forward and backward as one autodiff operation on CUDA, one kernel a pass.
//!
//! The model's RMSNorm is a chain of tensor operations (widen, square, row mean, add ε,
//! square root, reciprocal, multiply, narrow, multiply by the gain): about eight graph nodes
//! and several f32 `[rows, hidden]` passes forward, more than twice that backward, four norms a
//! Qwen3 layer. Here forward is one kernel (one cube of 256 units a row: Σx², then the scaled
//! row), backward one row kernel (`dx`, and each row's `1/rms` for the next) and one column
//! kernel (the gain's gradient, partial sums over blocks of 64 rows, then summed), recomputed
//! from the input in backward under balanced checkpointing instead of stored. Both
//! conventions: `narrow(x · r) · w` (Llama, Qwen3) and Qwen3.5's `narrow(x · r · (1 + w))`.
//! The same f32 formulas as the tensor form, summed in another order.
//!
//! [`try_rms_norm`] applies on the CUDA autodiff backends qatflow trains on, with the
//! training engine on (`QATFLOW_GEMM=cublaslt`, not named in `QATFLOW_KERNELS_OFF`) and BF16
//! input and gain; everything else keeps the model's tensor form.

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorMetadata};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use burn_fusion::Fusion;
use cubecl::prelude::*;
use half::bf16;

use crate::custom::{self, empty, CubeCall};
use crate::custom::{downcast, upcast, Cube, CubeBf16};
use crate::softmax::cube_reduce;
use crate::{cube_count, p, t, to_dtype, CUBE_SIZE};

/// Rows a unit of the gain-gradient kernel sums.
const CHUNK_ROWS: usize = 64;

/// `1 / sqrt(mean(x²) + eps)` of the row at `base`, for every unit of the cube.
#[allow(clippy::too_many_arguments)]
#[cube]
fn row_rstd<F: Float>(
    x: &Array<F>,
    shared: &mut SharedMemory<f32>,
    base: usize,
    hidden: usize,
    unit: usize,
    step: usize,
    hidden_f: f32,
    eps: f32,
) -> f32 {
    let mut part = 0.0f32;
    let mut j = unit;
    while j < hidden {
        let v = f32::cast_from(x[base + j]);
        part += v * v;
        j += step;
    }
    let mean = cube_reduce(shared, part, false) / hidden_f;
    1.0f32 / f32::sqrt(mean + eps)
}

/// One cube a row: `narrow(x · r) · w`, or `narrow(x · r · (1 + w))` when `offset`.
#[cube(launch_unchecked)]
fn rms_norm_kernel<F: Float>(
    x: &Array<F>,
    w: &Array<F>,
    out: &mut Array<F>,
    hidden: u32,
    hidden_f: f32,
    eps: f32,
    #[comptime] offset: bool,
) {
    let (unit, step) = (UNIT_POS as usize, CUBE_DIM as usize);
    let hidden = hidden as usize;
    let base = CUBE_POS * hidden;
    let mut shared = SharedMemory::<f32>::new(256usize);
    let r = row_rstd::<F>(x, &mut shared, base, hidden, unit, step, hidden_f, eps);
    let mut j = unit;
    while j < hidden {
        let n = f32::cast_from(x[base + j]) * r;
        if offset {
            out[base + j] = F::cast_from(n * (1.0f32 + f32::cast_from(w[j])));
        } else {
            out[base + j] = F::cast_from(n) * w[j];
        }
        j += step;
    }
}

/// The gradient reaching `x · r` at element `j`: `widen(narrow(dy · w))`, or `dy · (1 + w)`
/// in f32 when `offset`.
#[cube]
fn grad_normed<F: Float>(
    dy: &Array<F>,
    w: &Array<F>,
    base: usize,
    j: usize,
    #[comptime] offset: bool,
) -> f32 {
    if offset {
        f32::cast_from(dy[base + j]) * (1.0f32 + f32::cast_from(w[j]))
    } else {
        f32::cast_from(dy[base + j] * w[j])
    }
}

/// One cube a row: `dx = r·g − x·r³·mean(g·x)` and the row's `r` for the gain's gradient.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn rms_norm_backward_kernel<F: Float>(
    x: &Array<F>,
    w: &Array<F>,
    dy: &Array<F>,
    dx: &mut Array<F>,
    rstd: &mut Array<f32>,
    hidden: u32,
    hidden_f: f32,
    eps: f32,
    #[comptime] offset: bool,
) {
    let (unit, step) = (UNIT_POS as usize, CUBE_DIM as usize);
    let hidden = hidden as usize;
    let base = CUBE_POS * hidden;
    let mut shared = SharedMemory::<f32>::new(256usize);
    let r = row_rstd::<F>(x, &mut shared, base, hidden, unit, step, hidden_f, eps);
    let mut part = 0.0f32;
    let mut j = unit;
    while j < hidden {
        part += grad_normed::<F>(dy, w, base, j, offset) * f32::cast_from(x[base + j]);
        j += step;
    }
    let mean = cube_reduce(&mut shared, part, false) / hidden_f;
    let r3 = r * r * r;
    let mut j2 = unit;
    while j2 < hidden {
        let g = grad_normed::<F>(dy, w, base, j2, offset);
        dx[base + j2] = F::cast_from(r * g - f32::cast_from(x[base + j2]) * r3 * mean);
        j2 += step;
    }
    if unit == 0usize {
        rstd[CUBE_POS] = r;
    }
}

/// One unit a (block of [`CHUNK_ROWS`] rows, column), `units` = blocks × hidden of them:
/// `Σ dy · narrow(x · r)` (or `Σ dy · x · r` when `offset`) over the block's rows, into
/// `partial[block, column]`.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn rms_norm_gain_kernel<F: Float>(
    x: &Array<F>,
    dy: &Array<F>,
    rstd: &Array<f32>,
    partial: &mut Array<f32>,
    rows: u32,
    hidden: u32,
    chunk_rows: u32,
    units: u32,
    #[comptime] offset: bool,
) {
    let i = ABSOLUTE_POS;
    let (rows, hidden, chunk_rows) = (rows as usize, hidden as usize, chunk_rows as usize);
    if i >= units as usize {
        terminate!();
    }
    let col = i % hidden;
    let start = (i / hidden) * chunk_rows;
    let mut end = start + chunk_rows;
    if end > rows {
        end = rows;
    }
    let mut acc = 0.0f32;
    let mut r = start;
    while r < end {
        let n = f32::cast_from(x[r * hidden + col]) * rstd[r];
        let mut term = n;
        if !offset {
            term = f32::cast_from(F::cast_from(n));
        }
        acc += f32::cast_from(dy[r * hidden + col]) * term;
        r += 1usize;
    }
    partial[i] = acc;
}

/// A launch of the norm: forward `[x, w] → [out]`, backward `[x, w, dy] → [dx, partial]`.
#[derive(Debug, Clone, Copy)]
struct Launch {
    backward: bool,
    eps: f32,
    offset: bool,
}

impl CubeCall for Launch {
    const NAME: &'static str = "qatflow_rms_norm";

    fn outputs(&self, inputs: &[(Vec<usize>, DType)]) -> Vec<(Vec<usize>, DType)> {
        let (shape, dtype) = inputs[0].clone();
        if !self.backward {
            return vec![(shape, dtype)];
        }
        let hidden = shape[1];
        vec![
            (shape.clone(), dtype),
            (vec![shape[0].div_ceil(CHUNK_ROWS), hidden], DType::F32),
        ]
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>) -> Vec<CubeTensor<R>> {
        let inputs: Vec<_> = inputs
            .into_iter()
            .map(burn_cubecl::kernel::into_contiguous)
            .collect();
        let x = &inputs[0];
        let dims = x.meta.shape().to_vec();
        let (rows, hidden) = (dims[0], dims[1]);
        let dtype = x.dtype;
        let outs: Vec<_> = self
            .outputs(&[(dims, dtype)])
            .into_iter()
            .map(|(shape, dtype)| empty(x, shape, dtype))
            .collect();
        let client = x.client.clone();
        let n = rows * hidden;
        // SAFETY: each handle is passed with the element count its buffer holds.
        let arg = |h: &cubecl::server::Handle, len: usize| unsafe {
            ArrayArg::from_raw_parts(h.clone(), len)
        };
        let (hidden_u, hidden_f) = (hidden as u32, hidden as f32);
        macro_rules! launch {
            ($t:ty) => {
                if !self.backward {
                    // SAFETY: `x` and `out` hold `rows × hidden` elements, `w` `hidden`; cube
                    // `row < rows` reads and writes its own row only.
                    unsafe {
                        rms_norm_kernel::launch_unchecked::<$t, R>(
                            &client,
                            CubeCount::Static(rows as u32, 1, 1),
                            CubeDim::new_1d(CUBE_SIZE),
                            arg(&x.handle, n),
                            arg(&inputs[1].handle, hidden),
                            arg(&outs[0].handle, n),
                            hidden_u,
                            hidden_f,
                            self.eps,
                            self.offset,
                        )
                    }
                } else {
                    let rstd = empty(x, vec![rows], DType::F32);
                    // SAFETY: `x`, `dy` and `dx` hold `rows × hidden` elements, `w` `hidden`,
                    // `rstd` `rows` f32; cube `row` touches its own row and `rstd[row]`.
                    unsafe {
                        rms_norm_backward_kernel::launch_unchecked::<$t, R>(
                            &client,
                            CubeCount::Static(rows as u32, 1, 1),
                            CubeDim::new_1d(CUBE_SIZE),
                            arg(&x.handle, n),
                            arg(&inputs[1].handle, hidden),
                            arg(&inputs[2].handle, n),
                            arg(&outs[0].handle, n),
                            arg(&rstd.handle, rows),
                            hidden_u,
                            hidden_f,
                            self.eps,
                            self.offset,
                        )
                    }
                    let units = rows.div_ceil(CHUNK_ROWS) * hidden;
                    // SAFETY: unit `i < blocks × hidden` reads rows of its block below `rows`
                    // and writes `partial[i]` only.
                    unsafe {
                        rms_norm_gain_kernel::launch_unchecked::<$t, R>(
                            &client,
                            cube_count(units),
                            CubeDim::new_1d(CUBE_SIZE),
                            arg(&x.handle, n),
                            arg(&inputs[2].handle, n),
                            arg(&rstd.handle, rows),
                            arg(&outs[1].handle, units),
                            rows as u32,
                            hidden_u,
                            CHUNK_ROWS as u32,
                            units as u32,
                            self.offset,
                        )
                    }
                }
            };
        }
        match dtype {
            DType::BF16 => launch!(bf16),
            DType::F32 => launch!(f32),
            other => panic!("RMSNorm kernel: dtype {other:?} (F32/BF16 only)"),
        }
        outs
    }
}

/// `1 / sqrt(mean(x²) + eps)` `[rows, 1]` and `x` in f32 (the tensor form).
fn rstd_of<I: Backend>(x: Tensor<I, 2>, eps: f32) -> (Tensor<I, 2>, Tensor<I, 2>) {
    let xf = to_dtype(x, DType::F32);
    let r = xf
        .clone()
        .square()
        .mean_dim(1)
        .add_scalar(eps)
        .sqrt()
        .recip();
    (r, xf)
}

/// The norm of `x` `[rows, hidden]` with gain `w` on inner tensors: the kernel on CUDA, the
/// tensor form elsewhere.
fn forward<I: Backend>(
    x: FloatTensor<I>,
    w: FloatTensor<I>,
    eps: f32,
    offset: bool,
) -> FloatTensor<I> {
    let phase_device = I::float_device(&x);
    crate::phase::timed::<I, _>(crate::phase::Phase::Norm, &phase_device, || {
        let launch = Launch {
            backward: false,
            eps,
            offset,
        };
        let (x, w) = match custom::on_cuda::<I, _>(&launch, vec![x, w]) {
            Ok(mut out) => return out.remove(0),
            Err(mut inputs) => {
                let w = inputs.pop().expect("the gain");
                (t::<I, 2>(inputs.pop().expect("the input")), t::<I, 1>(w))
            }
        };
        let dtype = x.dtype();
        let (r, xf) = rstd_of(x, eps);
        let normed = xf * r;
        let out = if offset {
            to_dtype(
                normed * to_dtype(w, DType::F32).add_scalar(1.0).unsqueeze(),
                dtype,
            )
        } else {
            to_dtype(normed, dtype) * w.unsqueeze()
        };
        p(out)
    })
}

/// The gradients of `x` and `w` from `dy`, on inner tensors.
fn backward<I: Backend>(
    x: FloatTensor<I>,
    w: FloatTensor<I>,
    dy: FloatTensor<I>,
    eps: f32,
    offset: bool,
) -> (FloatTensor<I>, FloatTensor<I>) {
    let phase_device = I::float_device(&x);
    crate::phase::timed::<I, _>(crate::phase::Phase::Norm, &phase_device, || {
        let launch = Launch {
            backward: true,
            eps,
            offset,
        };
        let w_dtype = w.dtype();
        // The kernel reads `dy` in the input's dtype.
        let dy = p(to_dtype(t::<I, 2>(dy), x.dtype()));
        let (x, w, dy) = match custom::on_cuda::<I, _>(&launch, vec![x, w, dy]) {
            Ok(mut out) => {
                let partial = t::<I, 2>(out.pop().expect("the gain's partial sums"));
                let hidden = partial.dims()[1];
                let dw = to_dtype(partial.sum_dim(0).reshape([hidden]), w_dtype);
                return (out.pop().expect("dx"), p(dw));
            }
            Err(mut inputs) => {
                let dy = t::<I, 2>(inputs.pop().expect("dy"));
                let w = t::<I, 1>(inputs.pop().expect("the gain"));
                (t::<I, 2>(inputs.pop().expect("the input")), w, dy)
            }
        };
        let [_, hidden] = x.dims();
        let dtype = x.dtype();
        let (r, xf) = rstd_of(x, eps);
        let normed = xf.clone() * r.clone();
        let dyf = to_dtype(dy.clone(), DType::F32);
        let (g, dw) = if offset {
            let gain = to_dtype(w, DType::F32).add_scalar(1.0).unsqueeze();
            (dyf.clone() * gain, (dyf * normed).sum_dim(0))
        } else {
            let g = to_dtype(dy * w.unsqueeze(), DType::F32);
            (
                g,
                (dyf * to_dtype(to_dtype(normed, dtype), DType::F32)).sum_dim(0),
            )
        };
        let mean = (g.clone() * xf.clone()).sum_dim(1) / hidden as f64;
        let r3 = r.clone() * r.clone() * r.clone();
        let dx = to_dtype(r * g - xf * r3 * mean, dtype);
        (p(dx), p(to_dtype(dw.reshape([hidden]), w_dtype)))
    })
}

/// Backward of the norm operation.
#[derive(Debug)]
struct NormBackward;

impl<I: Backend> Backward<I, 2> for NormBackward {
    /// The input's and the gain's nodes, ε and the convention.
    type State = (NodeId, NodeId, f32, bool);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let (x_id, w_id, eps, offset) = ops.state;
        let x = checkpointer.retrieve_node_output::<FloatTensor<I>>(x_id);
        let w = checkpointer.retrieve_node_output::<FloatTensor<I>>(w_id);
        let dy = grads.consume::<I>(&ops.node);
        let (dx, dw) = backward::<I>(x, w, dy, eps, offset);
        let [x_parent, w_parent] = ops.parents;
        if let Some(node) = x_parent {
            grads.register::<I>(node.id, dx);
        }
        if let Some(node) = w_parent {
            grads.register::<I>(node.id, dw);
        }
    }
}

/// Recomputes the norm's output from its saved input and gain in backward.
#[derive(Debug)]
struct RetroNorm<I> {
    x: NodeId,
    w: NodeId,
    eps: f32,
    offset: bool,
    _backend: std::marker::PhantomData<I>,
}

impl<I: Backend> RetroForward for RetroNorm<I> {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let x = states.get_state::<FloatTensor<I>>(&self.x);
        let w = states.get_state::<FloatTensor<I>>(&self.w);
        states.save(out_node, forward::<I>(x, w, self.eps, self.offset));
    }
}

/// The norm operation under `Autodiff<I, C>` on `x` `[rows, hidden]`.
fn autodiff_norm<I: Backend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<I, C>>,
    w: FloatTensor<Autodiff<I, C>>,
    eps: f32,
    offset: bool,
) -> FloatTensor<Autodiff<I, C>> {
    let retro = RetroNorm::<I> {
        x: x.node.id,
        w: w.node.id,
        eps,
        offset,
        _backend: std::marker::PhantomData,
    };
    match NormBackward
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .memory_bound()
        .retro_forward(retro)
        .parents([&x, &w])
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (prep.checkpoint(&x), prep.checkpoint(&w), eps, offset);
            prep.finish(state, forward::<I>(x.primitive, w.primitive, eps, offset))
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(forward::<I>(x.primitive, w.primitive, eps, offset))
        }
    }
}

/// Runs [`autodiff_norm`] when `B` is `Autodiff<I, C>`.
fn when_backend<B: Backend, I: Backend, C: CheckpointStrategy>(
    (x, w): (FloatTensor<B>, FloatTensor<B>),
    eps: f32,
    offset: bool,
) -> Result<FloatTensor<B>, (FloatTensor<B>, FloatTensor<B>)> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I, C>>() {
        return Err((x, w));
    }
    let cast = |v: FloatTensor<B>| {
        downcast::<_, FloatTensor<Autodiff<I, C>>>(v).unwrap_or_else(|_| unreachable!("B is X"))
    };
    Ok(upcast(autodiff_norm::<I, C>(cast(x), cast(w), eps, offset)))
}

/// RMSNorm of `x` over its last dimension with gain `w` — `narrow(x · r) · w`, or Qwen3.5's
/// `narrow(x · r · (1 + w))` when `offset` — as one operation on the CUDA autodiff backends
/// qatflow trains on (see the module docs); the inputs back elsewhere.
#[allow(clippy::type_complexity)]
pub fn try_rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 1>,
    eps: f64,
    offset: bool,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 1>)> {
    let applies = crate::gemm::kernel_on("rms_norm")
        && x.dtype() == DType::BF16
        && w.dtype() == DType::BF16
        && crate::gemm::cuda_index::<B>(&x.device()).is_some();
    if !applies {
        return Err((x, w));
    }
    let dims = x.dims();
    let hidden = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let flat = x.reshape([rows, hidden]);
    let eps = eps as f32;
    let inputs = (p(flat), p(w));
    let r = when_backend::<B, Fusion<Cube>, BalancedCheckpointing>(inputs, eps, offset)
        .or_else(|i| when_backend::<B, Fusion<Cube>, NoCheckpointing>(i, eps, offset))
        .or_else(|i| when_backend::<B, Fusion<CubeBf16>, BalancedCheckpointing>(i, eps, offset))
        .or_else(|i| when_backend::<B, Fusion<CubeBf16>, NoCheckpointing>(i, eps, offset));
    match r {
        Ok(out) => Ok(t::<B, 2>(out).reshape(dims)),
        Err((x, w)) => Err((t::<B, 2>(x).reshape(dims), t(w))),
    }
}

#[cfg(test)]
mod tests {
    //! The operation on the CPU (the tensor form standing in for the kernels) against the
    //! model's composed RMSNorm differentiated by burn, both conventions.

    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tolerance};

    type A = Autodiff<Flex>;

    /// The model's RMSNorm (`qatflow_model`'s `RmsNorm` / `OffsetRmsNorm`).
    fn composed(x: Tensor<A, 2>, w: Tensor<A, 1>, eps: f64, offset: bool) -> Tensor<A, 2> {
        let dtype = x.dtype();
        let xf = to_dtype(x, DType::F32);
        let ms = xf.clone().square().mean_dim(1);
        let normed = xf * ms.add_scalar(eps).sqrt().recip();
        if offset {
            to_dtype(
                normed * to_dtype(w, DType::F32).add_scalar(1.0).unsqueeze(),
                dtype,
            )
        } else {
            to_dtype(normed, dtype) * w.unsqueeze()
        }
    }

    #[test]
    fn the_operation_equals_the_composed_norm_with_gradients() {
        let dev = Default::default();
        Flex::seed(&dev, 7);
        for (offset, dtype) in [
            (false, DType::F32),
            (true, DType::F32),
            (false, DType::BF16),
            (true, DType::BF16),
        ] {
            let x0 = Tensor::<Flex, 2>::random([70, 48], Distribution::Normal(0.0, 2.0), &dev)
                .cast(dtype);
            let w0 =
                Tensor::<Flex, 1>::random([48], Distribution::Normal(0.5, 0.3), &dev).cast(dtype);
            let up = Tensor::<Flex, 2>::random([70, 48], Distribution::Normal(0.0, 1.0), &dev);
            let run = |fused: bool| {
                let x = Tensor::<A, 2>::from_inner(x0.clone()).require_grad();
                let w = Tensor::<A, 1>::from_inner(w0.clone()).require_grad();
                let y = if fused {
                    t::<A, 2>(autodiff_norm::<Flex, NoCheckpointing>(
                        p(x.clone()),
                        p(w.clone()),
                        1e-6,
                        offset,
                    ))
                } else {
                    composed(x.clone(), w.clone(), 1e-6, offset)
                };
                let grads = (to_dtype(y.clone(), DType::F32) * Tensor::from_inner(up.clone()))
                    .sum()
                    .backward();
                let f = |v: Tensor<Flex, 2>| to_dtype(v, DType::F32).into_data();
                (
                    f(y.inner()),
                    f(x.grad(&grads).unwrap()),
                    to_dtype(w.grad(&grads).unwrap(), DType::F32).into_data(),
                )
            };
            let (want, got) = (run(false), run(true));
            let tol = if dtype == DType::BF16 {
                Tolerance::<f32>::rel_abs(2e-2, 2e-2)
            } else {
                Tolerance::<f32>::rel_abs(1e-4, 1e-4)
            };
            got.0.assert_approx_eq::<f32>(&want.0, tol);
            got.1.assert_approx_eq::<f32>(&want.1, tol);
            // burn sums the composed form's BF16 gain gradient over rows in BF16; the
            // operation sums in f32.
            let tol_w = if dtype == DType::BF16 {
                Tolerance::<f32>::rel_abs(6e-2, 6e-2)
            } else {
                tol
            };
            got.2.assert_approx_eq::<f32>(&want.2, tol_w);
        }
    }

    /// Under balanced checkpointing the output is recomputed in backward (a matmul consumer
    /// needs it): the same gradients as without checkpointing.
    #[test]
    fn the_recomputed_output_gives_the_same_gradients() {
        fn grads<C: CheckpointStrategy>() -> Vec<f32> {
            type X<C> = Autodiff<Flex, C>;
            let dev = Default::default();
            let data = |n: usize, k: f32| -> Vec<f32> {
                (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * k).collect()
            };
            let x = Tensor::<X<C>, 2>::from_data(
                burn::tensor::TensorData::new(data(6 * 32, 0.05), [6, 32]),
                &dev,
            )
            .require_grad();
            let w = Tensor::<X<C>, 1>::from_data(
                burn::tensor::TensorData::new(data(32, 0.01), [32]),
                &dev,
            )
            .require_grad();
            let m = Tensor::<X<C>, 2>::from_data(
                burn::tensor::TensorData::new(data(32 * 5, 0.02), [32, 5]),
                &dev,
            );
            let y = t::<X<C>, 2>(autodiff_norm::<Flex, C>(
                p(x.clone()),
                p(w.clone()),
                1e-6,
                true,
            ));
            let z = y.matmul(m).exp().sum();
            let g = z.backward();
            let mut out = x.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap();
            out.extend(w.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap());
            out
        }
        assert_eq!(grads::<NoCheckpointing>(), grads::<BalancedCheckpointing>());
    }

    #[test]
    fn off_cuda_the_model_keeps_its_own_norm() {
        let x = Tensor::<A, 2>::zeros([2, 16], &Default::default());
        let w = Tensor::<A, 1>::ones([16], &Default::default());
        assert!(try_rms_norm(x, w, 1e-6, false).is_err());
    }

    /// The three kernels on the software GPU against the tensor form on the CPU: both
    /// conventions, rows longer than a cube (300 over 256 units) and a row count that is not
    /// a multiple of the gain kernel's 64-row blocks.
    #[test]
    fn the_kernels_equal_the_tensor_form() {
        use crate::soft_gpu::{self, max_rel_diff, read, values, Soft};
        let (rows, hidden) = (70, 300);
        let x = values(rows * hidden, 1);
        let w = values(hidden, 2);
        let dy = values(rows * hidden, 3);
        let host = |v: &[f32], shape: [usize; 2]| {
            p(Tensor::<Flex, 1>::from_floats(v, &Default::default()).reshape(shape))
        };
        let gain = || {
            p(Tensor::<Flex, 1>::from_floats(
                w.as_slice(),
                &Default::default(),
            ))
        };
        let floats = |x: FloatTensor<Flex>| -> Vec<f32> {
            let n = x.shape().num_elements();
            t::<Flex, 2>(x)
                .reshape([n])
                .into_data()
                .convert::<f32>()
                .to_vec()
                .unwrap()
        };
        for offset in [false, true] {
            let eps = 1e-6;
            let want = floats(forward::<Flex>(
                host(&x, [rows, hidden]),
                gain(),
                eps,
                offset,
            ));
            let launch = |backward| Launch {
                backward,
                eps,
                offset,
            };
            let gpu = |v: &[f32], shape: &[usize]| soft_gpu::tensor(v, shape);
            let got = launch(false).run::<Soft>(vec![gpu(&x, &[rows, hidden]), gpu(&w, &[hidden])]);
            assert!(
                max_rel_diff(&read(&got[0]), &want) < 1e-5,
                "offset {offset}"
            );

            let (want_dx, want_dw) = backward::<Flex>(
                host(&x, [rows, hidden]),
                gain(),
                host(&dy, [rows, hidden]),
                eps,
                offset,
            );
            let got = launch(true).run::<Soft>(vec![
                gpu(&x, &[rows, hidden]),
                gpu(&w, &[hidden]),
                gpu(&dy, &[rows, hidden]),
            ]);
            assert!(
                max_rel_diff(&read(&got[0]), &floats(want_dx)) < 1e-5,
                "offset {offset}"
            );
            let partial = read(&got[1]);
            assert_eq!(partial.len(), rows.div_ceil(CHUNK_ROWS) * hidden);
            let dw: Vec<f32> = (0..hidden)
                .map(|j| partial.iter().skip(j).step_by(hidden).sum())
                .collect();
            assert!(
                max_rel_diff(&dw, &floats(want_dw)) < 1e-5,
                "offset {offset}"
            );
        }
    }
}
