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

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::autodiff::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_fusion::Fusion;

use crate::fake_quant::{downcast, upcast, Cube, CubeBf16};

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
