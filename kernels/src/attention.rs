//! Training attention on CUDA that never stores the `len × keys` scores: one autodiff
//! operation whose forward keeps only `q`, `k`, `v` (and the mask) and whose backward
//! recomputes the scores and probabilities of its layer, then runs the four gradient GEMMs
//! through cuBLASLt ([`crate::gemm`]).
//!
//! The scores exist only while one layer's forward or backward runs (not flash-style
//! tiling: a layer's `heads × len × keys` FP32 scores are still materialized then), instead
//! of burn's autodiff keeping the scores and the softmax input of every layer until the
//! backward pass. Grouped-query heads read their key/value head without copying it (the
//! query heads of one KV head are folded into the row dimension, as in
//! `qatflow_model::layers::attention`). Other backends get `None` and keep their own path.

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_fusion::Fusion;

use crate::fake_quant::{downcast, upcast, Cube, CubeBf16};
use crate::gemm::{self, CudaGemm};
use crate::{reduce, to_dtype};

/// Wraps a primitive as a tensor of rank `D`.
fn t<I: Backend, const D: usize>(p: FloatTensor<I>) -> Tensor<I, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// The primitive of a tensor.
fn p<I: Backend, const D: usize>(x: Tensor<I, D>) -> FloatTensor<I> {
    x.into_primitive().tensor()
}

/// Batched GEMM of rank-3 tensors on the cuBLASLt path.
fn bmm<I: CudaGemm>(a: Tensor<I, 3>, b: Tensor<I, 3>, ta: bool, tb: bool) -> Tensor<I, 3> {
    t(I::gemm(p(a), p(b), ta, tb))
}

/// The dimensions of one attention call: `q` `[batch, heads, len, hd]`, `k`/`v`
/// `[batch, kv_heads, keys, hd]`.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    len: usize,
    keys: usize,
    head_dim: usize,
}

impl Dims {
    fn of(q: &[usize], k: &[usize]) -> Dims {
        Dims {
            batch: q[0],
            heads: q[1],
            len: q[2],
            head_dim: q[3],
            kv_heads: k[1],
            keys: k[2],
        }
    }

    /// Query heads per KV head.
    fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// Probabilities `[batch·kv_heads, rep·len, keys]` in FP32: softmax of the scaled scores
/// plus the mask, as `qatflow_model::layers::attention` computes them.
fn probabilities<I: CudaGemm>(
    q: Tensor<I, 3>,
    k: Tensor<I, 3>,
    mask: Option<Tensor<I, 4>>,
    d: Dims,
    scale: f64,
) -> Tensor<I, 3> {
    let scores = bmm(q, k, false, true)
        .cast(DType::F32)
        .mul_scalar(scale)
        .reshape([d.batch, d.heads, d.len, d.keys]);
    let scores = match mask {
        Some(m) => scores + m,
        None => scores,
    };
    let rows = d.batch * d.heads * d.len;
    reduce::softmax(scores.reshape([rows, d.keys])).reshape([
        d.batch * d.kv_heads,
        d.rep() * d.len,
        d.keys,
    ])
}

/// The forward on inner tensors: `[batch, heads, len, hd]`.
fn forward<I: CudaGemm>(
    q: FloatTensor<I>,
    k: FloatTensor<I>,
    v: FloatTensor<I>,
    mask: Option<FloatTensor<I>>,
    scale: f64,
) -> FloatTensor<I> {
    let (q, k, v) = (t::<I, 4>(q), t::<I, 4>(k), t::<I, 4>(v));
    let d = Dims::of(&q.dims(), &k.dims());
    let bk = d.batch * d.kv_heads;
    let q = q.reshape([bk, d.rep() * d.len, d.head_dim]);
    let k = k.reshape([bk, d.keys, d.head_dim]);
    let v = v.reshape([bk, d.keys, d.head_dim]);
    let probs = probabilities(q, k, mask.map(t), d, scale).cast(DType::BF16);
    p(bmm(probs, v, false, false).reshape([d.batch, d.heads, d.len, d.head_dim]))
}

/// Backward of the attention operation (see the module docs).
#[derive(Debug)]
struct AttentionBackward;

impl<I: CudaGemm> Backward<I, 3> for AttentionBackward {
    /// `q`, `k`, `v`, the mask and the score scale.
    type State = (NodeId, NodeId, NodeId, Option<FloatTensor<I>>, f64);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let (q_id, k_id, v_id, mask, scale) = ops.state;
        let q = t::<I, 4>(checkpointer.retrieve_node_output(q_id));
        let k = t::<I, 4>(checkpointer.retrieve_node_output(k_id));
        let v = t::<I, 4>(checkpointer.retrieve_node_output(v_id));
        let d_out = t::<I, 4>(grads.consume::<I>(&ops.node));
        let d = Dims::of(&q.dims(), &k.dims());
        let bk = d.batch * d.kv_heads;
        let rows = d.rep() * d.len;
        let q = q.reshape([bk, rows, d.head_dim]);
        let k = k.reshape([bk, d.keys, d.head_dim]);
        let v = v.reshape([bk, d.keys, d.head_dim]);
        let d_out = to_dtype(d_out, DType::BF16).reshape([bk, rows, d.head_dim]);
        let probs = probabilities(q.clone(), k.clone(), mask.map(t), d, scale);
        // dV = Pᵀ · dO; dP = dO · Vᵀ; dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale.
        let dv = bmm(probs.clone().cast(DType::BF16), d_out.clone(), true, false);
        let dp = bmm(d_out, v, false, true).cast(DType::F32);
        let rows_all = bk * rows;
        let row = reduce::row_sum((dp.clone() * probs.clone()).reshape([rows_all, d.keys]))
            .reshape([bk, rows, 1]);
        let ds = (probs * (dp - row)).mul_scalar(scale).cast(DType::BF16);
        let dq = bmm(ds.clone(), k, false, false);
        let dk = bmm(ds, q, true, false);
        let shape_q = [d.batch, d.heads, d.len, d.head_dim];
        let shape_kv = [d.batch, d.kv_heads, d.keys, d.head_dim];
        let [q_parent, k_parent, v_parent] = ops.parents;
        if let Some(node) = q_parent {
            grads.register::<I>(node.id, p(dq.reshape(shape_q)));
        }
        if let Some(node) = k_parent {
            grads.register::<I>(node.id, p(dk.reshape(shape_kv)));
        }
        if let Some(node) = v_parent {
            grads.register::<I>(node.id, p(dv.reshape(shape_kv)));
        }
    }
}

/// The attention operation under `Autodiff<I, C>`.
fn autodiff_attention<I: CudaGemm, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<I, C>>,
    k: FloatTensor<Autodiff<I, C>>,
    v: FloatTensor<Autodiff<I, C>>,
    mask: Option<FloatTensor<I>>,
    scale: f64,
) -> FloatTensor<Autodiff<I, C>> {
    match AttentionBackward
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (
                prep.checkpoint(&q),
                prep.checkpoint(&k),
                prep.checkpoint(&v),
                mask.clone(),
                scale,
            );
            let out = forward::<I>(q.primitive, k.primitive, v.primitive, mask, scale);
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward::<I>(
            q.primitive,
            k.primitive,
            v.primitive,
            mask,
            scale,
        )),
    }
}

/// The inputs of one call, handed back when the backend is not the one tried.
type Inputs<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    Option<FloatTensor<B>>,
);

/// Runs the operation when `B` is `Autodiff<I, C>` (by type identity).
fn when_backend<B: Backend, I: CudaGemm, C: CheckpointStrategy>(
    (q, k, v, mask): Inputs<B>,
    scale: f64,
) -> Result<FloatTensor<B>, Inputs<B>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I, C>>() {
        return Err((q, k, v, mask));
    }
    let cast = |x: FloatTensor<B>| {
        downcast::<_, FloatTensor<Autodiff<I, C>>>(x).unwrap_or_else(|_| unreachable!("B is X"))
    };
    // The mask is a constant: its inner tensor is all the operation needs.
    let mask = mask.map(|m| cast(m).primitive);
    let out = autodiff_attention::<I, C>(cast(q), cast(k), cast(v), mask, scale);
    Ok(upcast(out))
}

/// Scaled dot-product attention `[batch, heads, len, hd]` of BF16 `q` `[batch, heads, len,
/// hd]` and `k`/`v` `[batch, kv_heads, keys, hd]` with an additive FP32 `mask`
/// `[batch, 1, len, keys]`, when `B` is one of the CUDA autodiff backends qatflow trains
/// on and cuBLASLt is usable; the inputs back otherwise.
#[allow(clippy::type_complexity)]
pub fn try_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4>>,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    let applies = gemm::enabled()
        && [&q, &k, &v].iter().all(|x| x.dtype() == DType::BF16)
        && mask.is_none_or(|m| m.dtype() == DType::F32)
        && q.dims()[1] % k.dims()[1] == 0
        && gemm::cuda_index::<B>(&q.device()).is_some_and(gemm::available);
    if !applies {
        return Err((q, k, v));
    }
    let scale = (q.dims()[3] as f64).powf(-0.5);
    let inputs = (p(q), p(k), p(v), mask.map(|m| p(m.clone())));
    let r = when_backend::<B, Fusion<Cube>, BalancedCheckpointing>(inputs, scale)
        .or_else(|i| when_backend::<B, Fusion<Cube>, NoCheckpointing>(i, scale))
        .or_else(|i| when_backend::<B, Fusion<CubeBf16>, BalancedCheckpointing>(i, scale))
        .or_else(|i| when_backend::<B, Fusion<CubeBf16>, NoCheckpointing>(i, scale));
    match r {
        Ok(out) => Ok(t(out)),
        Err((q, k, v, _)) => Err((t(q), t(k), t(v))),
    }
}
