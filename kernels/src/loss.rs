//! The LM head and cross-entropy as one autodiff operation on CUDA: the summed negative
//! log-likelihood of target tokens given their hidden states, computed chunk by chunk of
//! rows in forward and again in backward, so the `[rows, vocab]` logits and their gradient
//! exist one chunk at a time and are never stored between the passes.
//!
//! Forward keeps only the hidden rows and the head weight (the operation's inputs). Backward
//! recomputes each chunk's logits (one cuBLASLt GEMM), forms `softmax − onehot` scaled by
//! the incoming gradient, and runs the two gradient GEMMs; the head's gradient is summed
//! over chunks in FP32. Other backends get their inputs back and keep their own path.

use std::any::TypeId;
use std::sync::Arc;

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
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorData};
use burn_fusion::Fusion;

use crate::custom::{downcast, upcast, Cube, CubeBf16};
use crate::gemm::{self, CudaGemm};
use crate::{p, reduce, t};

/// Row ranges of the chunks and their targets as `[n, 1]` index tensors.
fn chunks<I: Backend>(
    targets: &[i32],
    chunk: usize,
    device: &I::Device,
) -> Vec<(std::ops::Range<usize>, Tensor<I, 2, Int>)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < targets.len() {
        let end = (start + chunk).min(targets.len());
        let idx = Tensor::<I, 2, Int>::from_data(
            TensorData::new(targets[start..end].to_vec(), [end - start, 1]),
            device,
        );
        out.push((start..end, idx));
        start = end;
    }
    out
}

/// FP32 logits of `h` `[n, hidden]` against `w` `[vocab, hidden]`, shifted by their row
/// maximum, and the log-sum-exp of each shifted row.
fn shifted_logits<I: CudaGemm>(h: Tensor<I, 2>, w: Tensor<I, 2>) -> (Tensor<I, 2>, Tensor<I, 2>) {
    let logits = t::<I, 2>(I::gemm(p(h), p(w), false, true)).cast(DType::F32);
    let max = reduce::row_max(logits.clone());
    let shifted = logits - max;
    let lse = reduce::row_sum(shifted.clone().exp()).log();
    (shifted, lse)
}

fn forward<I: CudaGemm>(
    h: FloatTensor<I>,
    w: FloatTensor<I>,
    targets: &[i32],
    chunk: usize,
) -> FloatTensor<I> {
    let phase_device = I::float_device(&h);
    crate::phase::timed::<I, _>(crate::phase::Phase::Loss, &phase_device, || {
        let (h, w) = (t::<I, 2>(h), t::<I, 2>(w));
        let device = h.device();
        let mut total = Tensor::<I, 1>::zeros([1], (&device, DType::F32));
        for (rows, tgt) in chunks::<I>(targets, chunk, &device) {
            let hc = h.clone().slice([rows, 0..h.dims()[1]]);
            let (shifted, lse) = shifted_logits(hc, w.clone());
            let picked = shifted.gather(1, tgt);
            total = total + (lse - picked).sum();
        }
        p(total)
    })
}

/// Backward of the chunked loss.
#[derive(Debug)]
struct LossBackward;

impl<I: CudaGemm> Backward<I, 2> for LossBackward {
    /// Hidden rows, head weight, the targets and the chunk size.
    type State = (NodeId, NodeId, Arc<Vec<i32>>, usize);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let (h_id, w_id, targets, chunk) = ops.state;
        let h = t::<I, 2>(checkpointer.retrieve_node_output(h_id));
        let w = t::<I, 2>(checkpointer.retrieve_node_output(w_id));
        let g = t::<I, 1>(grads.consume::<I>(&ops.node))
            .cast(DType::F32)
            .reshape([1, 1]);
        let device = h.device();
        let [n, hidden] = h.dims();
        let [vocab, _] = w.dims();
        let phase = crate::phase::Phase::Loss;
        let (dh, dw) = crate::phase::timed::<I, _>(phase, &device, || {
            let (mut dh, mut dw) = (Vec::new(), None::<Tensor<I, 2>>);
            for (rows, tgt) in chunks::<I>(&targets, chunk, &device) {
                let len = rows.len();
                let hc = h.clone().slice([rows, 0..hidden]);
                let (shifted, lse) = shifted_logits(hc.clone(), w.clone());
                let probs = (shifted - lse).exp();
                let minus_one = Tensor::<I, 2>::full([len, 1], -1.0, (&device, DType::F32));
                let dlogits = (probs.scatter(1, tgt, minus_one, IndexingUpdateOp::Add) * g.clone())
                    .cast(DType::BF16);
                dh.push(t::<I, 2>(I::gemm(
                    p(dlogits.clone()),
                    p(w.clone()),
                    false,
                    false,
                )));
                let part = t::<I, 2>(I::gemm(p(dlogits), p(hc), true, false)).cast(DType::F32);
                dw = Some(match dw {
                    Some(acc) => acc + part,
                    None => part,
                });
            }
            let dh = if dh.is_empty() {
                Tensor::<I, 2>::zeros([n, hidden], (&device, DType::BF16))
            } else {
                Tensor::cat(dh, 0)
            };
            let dw = dw.unwrap_or_else(|| Tensor::zeros([vocab, hidden], (&device, DType::F32)));
            (p(dh.cast(w.dtype())), p(dw.cast(w.dtype())))
        });
        let [h_parent, w_parent] = ops.parents;
        if let Some(node) = h_parent {
            grads.register::<I>(node.id, dh);
        }
        if let Some(node) = w_parent {
            grads.register::<I>(node.id, dw);
        }
    }
}

fn autodiff_loss<I: CudaGemm, C: CheckpointStrategy>(
    h: FloatTensor<Autodiff<I, C>>,
    w: FloatTensor<Autodiff<I, C>>,
    targets: Arc<Vec<i32>>,
    chunk: usize,
) -> FloatTensor<Autodiff<I, C>> {
    match LossBackward
        .prepare::<C>([h.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (
                prep.checkpoint(&h),
                prep.checkpoint(&w),
                targets.clone(),
                chunk,
            );
            let out = forward::<I>(h.primitive, w.primitive, &targets, chunk);
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(forward::<I>(h.primitive, w.primitive, &targets, chunk))
        }
    }
}

type Inputs<B> = (FloatTensor<B>, FloatTensor<B>);

fn when_backend<B: Backend, I: CudaGemm, C: CheckpointStrategy>(
    (h, w): Inputs<B>,
    targets: &Arc<Vec<i32>>,
    chunk: usize,
) -> Result<FloatTensor<B>, Inputs<B>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I, C>>() {
        return Err((h, w));
    }
    let cast = |x: FloatTensor<B>| {
        downcast::<_, FloatTensor<Autodiff<I, C>>>(x).unwrap_or_else(|_| unreachable!("B is X"))
    };
    Ok(upcast(autodiff_loss::<I, C>(
        cast(h),
        cast(w),
        targets.clone(),
        chunk,
    )))
}

/// True when [`try_nll_sum`] runs for `B` on this `device` with `dtype` activations: one
/// of the CUDA autodiff backends qatflow trains on, BF16, cuBLASLt usable.
pub fn supported<B: Backend>(device: &B::Device, dtype: DType) -> bool {
    type Ad<I, C> = Autodiff<Fusion<I>, C>;
    let id = TypeId::of::<B>();
    let known = [
        TypeId::of::<Ad<Cube, BalancedCheckpointing>>(),
        TypeId::of::<Ad<Cube, NoCheckpointing>>(),
        TypeId::of::<Ad<CubeBf16, BalancedCheckpointing>>(),
        TypeId::of::<Ad<CubeBf16, NoCheckpointing>>(),
    ];
    gemm::enabled()
        && dtype == DType::BF16
        && known.contains(&id)
        && gemm::cuda_index::<B>(device).is_some_and(gemm::available)
}

/// The summed target NLL `[1]` (FP32) of BF16 hidden rows `h` `[n, hidden]` against the LM
/// head `w` `[vocab, hidden]` with one target token per row, in chunks of `chunk` rows,
/// when `B` is one of the CUDA autodiff backends qatflow trains on; the inputs back
/// otherwise.
#[allow(clippy::type_complexity)]
pub fn try_nll_sum<B: Backend>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    targets: &[i32],
    chunk: usize,
) -> Result<Tensor<B, 1>, (Tensor<B, 2>, Tensor<B, 2>)> {
    let applies = gemm::enabled()
        && chunk > 0
        && !targets.is_empty()
        && h.dtype() == DType::BF16
        && w.dtype() == DType::BF16
        && h.dims()[0] == targets.len()
        && gemm::cuda_index::<B>(&h.device()).is_some_and(gemm::available);
    if !applies {
        return Err((h, w));
    }
    let targets = Arc::new(targets.to_vec());
    let inputs = (p(h), p(w));
    let r = when_backend::<B, Fusion<Cube>, BalancedCheckpointing>(inputs, &targets, chunk)
        .or_else(|i| when_backend::<B, Fusion<Cube>, NoCheckpointing>(i, &targets, chunk))
        .or_else(|i| when_backend::<B, Fusion<CubeBf16>, BalancedCheckpointing>(i, &targets, chunk))
        .or_else(|i| when_backend::<B, Fusion<CubeBf16>, NoCheckpointing>(i, &targets, chunk));
    match r {
        Ok(out) => Ok(t(out)),
        Err((h, w)) => Err((t(h), t(w))),
    }
}
