//! Layer-level activation checkpointing on burn's autodiff: with burn's balanced
//! checkpointing, an operation marked memory-bound is recomputed in backward from its
//! inputs instead of keeping its output, and one marked compute-bound keeps its output.
//! qatflow's CUDA operations (the cuBLASLt GEMMs, the straight-through fake quantization)
//! are marked memory-bound, so a decoder block keeps nothing of its own; the
//! [`block_input`] marker at the start of every block is compute-bound, so each block's
//! input is kept and the recomputation of one block stops there. Backward then recomputes
//! one block at a time: activation memory grows with one layer, not with the depth.
//!
//! It works with the cuBLASLt path only (opt-in, `QATFLOW_GEMM=cublaslt`);
//! `QATFLOW_RECOMPUTE=off` keeps the GEMM outputs instead (burn's own balanced strategy,
//! which recomputes only element-wise work).
//!
//! [`matmul`] is burn's batched matmul marked the same way, for the matmuls that are not
//! linear layers (the Gated DeltaNet's chunk algorithm): burn marks its own matmul
//! compute-bound, so without it every chunk product of every layer stayed stored until
//! backward.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};
use burn_fusion::Fusion;

use crate::custom::{downcast, upcast, Cube, CubeBf16};

/// Backward of the marker: the identity.
#[derive(Debug)]
struct MarkerBackward;

impl<I: Backend> Backward<I, 1> for MarkerBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<I>(&ops.node);
        let [parent] = ops.parents;
        if let Some(node) = parent {
            grads.register::<I>(node.id, grad);
        }
    }
}

/// The marker under `Autodiff<I, C>`: the same values as a compute-bound node.
fn mark<I: Backend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<I, C>>,
) -> FloatTensor<Autodiff<I, C>> {
    let out = x.primitive.clone();
    MarkerBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateless(out)
}

fn mark_when<B: Backend, I: Backend, C: CheckpointStrategy>(
    x: FloatTensor<B>,
) -> Result<FloatTensor<B>, FloatTensor<B>> {
    if std::any::TypeId::of::<B>() != std::any::TypeId::of::<Autodiff<I, C>>() {
        return Err(x);
    }
    let x = downcast::<_, FloatTensor<Autodiff<I, C>>>(x)?;
    Ok(upcast(mark::<I, C>(x)))
}

/// Marks `x` as a decoder block's input (see the module docs): the same tensor, kept for
/// the backward pass under the CUDA autodiff backends with balanced checkpointing, where
/// the block's own operations are recomputed; unchanged everywhere else.
pub fn block_input<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing as Balanced;
    if !crate::gemm::layer_recompute() {
        return x;
    }
    let prim = x.into_primitive().tensor();
    let r = mark_when::<B, Fusion<Cube>, Balanced>(prim)
        .or_else(mark_when::<B, Fusion<CubeBf16>, Balanced>);
    match r {
        Ok(y) | Err(y) => Tensor::from_primitive(TensorPrimitive::Float(y)),
    }
}

/// Backward of [`matmul`]: `da = dc · bᵀ`, `db = aᵀ · dc` (operands of equal batch dims).
#[derive(Debug)]
struct MatmulBackward;

/// `x` with its last two dimensions swapped.
fn transposed<I: Backend>(x: FloatTensor<I>) -> FloatTensor<I> {
    let rank = x.shape().num_dims();
    I::float_swap_dims(x, rank - 2, rank - 1)
}

impl<I: Backend> Backward<I, 2> for MatmulBackward {
    /// The checkpointed `a` (needed for `db`) and `b` (needed for `da`).
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let (a_id, b_id) = ops.state;
        let a: Option<FloatTensor<I>> = a_id.map(|id| checkpointer.retrieve_node_output(id));
        let b: Option<FloatTensor<I>> = b_id.map(|id| checkpointer.retrieve_node_output(id));
        let dc = grads.consume::<I>(&ops.node);
        let [a_parent, b_parent] = ops.parents;
        if let (Some(node), Some(b)) = (a_parent, b) {
            grads.register::<I>(node.id, I::float_matmul(dc.clone(), transposed::<I>(b)));
        }
        if let (Some(node), Some(a)) = (b_parent, a) {
            grads.register::<I>(node.id, I::float_matmul(transposed::<I>(a), dc));
        }
    }
}

/// Recomputes a matmul's output from its saved operands in backward.
#[derive(Debug)]
struct RetroMatmul<I> {
    a: NodeId,
    b: NodeId,
    _backend: std::marker::PhantomData<I>,
}

impl<I: Backend> RetroForward for RetroMatmul<I> {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let a = states.get_state::<FloatTensor<I>>(&self.a);
        let b = states.get_state::<FloatTensor<I>>(&self.b);
        states.save(out_node, I::float_matmul(a, b));
    }
}

/// `a · b` under `Autodiff<I, C>` as a memory-bound operation: its output is recomputed in
/// backward from `a` and `b`.
fn autodiff_matmul<I: Backend, C: CheckpointStrategy>(
    a: FloatTensor<Autodiff<I, C>>,
    b: FloatTensor<Autodiff<I, C>>,
) -> FloatTensor<Autodiff<I, C>> {
    let (a_tracked, b_tracked) = (a.is_tracked(), b.is_tracked());
    let retro = RetroMatmul::<I> {
        a: a.node.id,
        b: b.node.id,
        _backend: std::marker::PhantomData,
    };
    let prep = MatmulBackward
        .prepare::<C>([a.node.clone(), b.node.clone()])
        .memory_bound()
        .retro_forward(retro)
        .parents([&a, &b]);
    match prep.stateful() {
        OpsKind::Tracked(mut prep) => {
            let a_state = b_tracked.then(|| prep.checkpoint(&a));
            let b_state = a_tracked.then(|| prep.checkpoint(&b));
            let c = I::float_matmul(a.primitive, b.primitive);
            prep.finish((a_state, b_state), c)
        }
        OpsKind::UnTracked(prep) => prep.finish(I::float_matmul(a.primitive, b.primitive)),
    }
}

fn matmul_when<B: Backend, I: Backend, C: CheckpointStrategy>(
    (a, b): (FloatTensor<B>, FloatTensor<B>),
) -> Result<FloatTensor<B>, (FloatTensor<B>, FloatTensor<B>)> {
    if std::any::TypeId::of::<B>() != std::any::TypeId::of::<Autodiff<I, C>>() {
        return Err((a, b));
    }
    let a =
        downcast::<_, FloatTensor<Autodiff<I, C>>>(a).unwrap_or_else(|_| unreachable!("B is X"));
    let b =
        downcast::<_, FloatTensor<Autodiff<I, C>>>(b).unwrap_or_else(|_| unreachable!("B is X"));
    Ok(upcast(autodiff_matmul::<I, C>(a, b)))
}

/// `a.matmul(b)`, recomputed in backward instead of stored under the CUDA autodiff backends
/// with balanced checkpointing and layer recompute on ([`crate::gemm::layer_recompute`]);
/// burn's `matmul` everywhere else. The operands must have equal dimensions but the last two
/// (no broadcasting; burn's `matmul` is used when they differ).
pub fn matmul<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing as Balanced;
    let (da, db) = (a.dims(), b.dims());
    if !crate::gemm::layer_recompute() || da[..D - 2] != db[..D - 2] {
        return a.matmul(b);
    }
    let operands = (a.into_primitive().tensor(), b.into_primitive().tensor());
    let r = matmul_when::<B, Fusion<Cube>, Balanced>(operands)
        .or_else(matmul_when::<B, Fusion<CubeBf16>, Balanced>);
    match r {
        Ok(c) => Tensor::from_primitive(TensorPrimitive::Float(c)),
        Err((a, b)) => {
            let a: Tensor<B, D> = Tensor::from_primitive(TensorPrimitive::Float(a));
            a.matmul(Tensor::from_primitive(TensorPrimitive::Float(b)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    type Ad = Autodiff<Flex, BalancedCheckpointing>;

    fn sample(dims: [usize; 4], seed: usize) -> Tensor<Ad, 4> {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i + seed) * 7919) % 211) as f32 / 53.0 - 2.0)
            .collect();
        Tensor::from_data(TensorData::new(v, dims), &Default::default())
    }

    /// The recomputed matmul inside a chain, under balanced checkpointing: values and
    /// gradients of both operands equal burn's matmul's.
    #[test]
    fn recomputed_matmul_has_burns_values_and_gradients() {
        let run = |recompute: bool| {
            let a = sample([2, 3, 5, 4], 1).require_grad();
            let b = sample([2, 3, 4, 6], 2).require_grad();
            let x = a.clone().exp() * 0.5;
            let c = if recompute {
                let p = autodiff_matmul::<Flex, BalancedCheckpointing>(
                    x.into_primitive().tensor(),
                    b.clone().into_primitive().tensor(),
                );
                Tensor::<Ad, 4>::from_primitive(TensorPrimitive::Float(p))
            } else {
                x.matmul(b.clone())
            };
            let loss = (c.clone() * c.clone().sin()).sum();
            let grads = loss.backward();
            (
                c.into_data(),
                a.grad(&grads).unwrap().into_data(),
                b.grad(&grads).unwrap().into_data(),
            )
        };
        let (c0, da0, db0) = run(false);
        let (c1, da1, db1) = run(true);
        c1.assert_approx_eq::<f32>(&c0, Default::default());
        da1.assert_approx_eq::<f32>(&da0, Default::default());
        db1.assert_approx_eq::<f32>(&db0, Default::default());
    }

    #[test]
    fn off_cuda_it_is_burns_matmul() {
        let a = sample([1, 2, 3, 4], 3);
        let b = sample([1, 2, 4, 2], 4);
        assert_eq!(
            matmul(a.clone(), b.clone())
                .into_data()
                .to_vec::<f32>()
                .unwrap(),
            a.matmul(b).into_data().to_vec::<f32>().unwrap()
        );
    }
}
