//! Training attention on CUDA that never stores the `len × keys` scores: one autodiff
//! operation whose forward keeps only `q`, `k`, `v`, the mask and each row's log-sum-exp, and
//! whose backward recomputes the scores, then runs the gradient GEMMs through cuBLASLt
//! ([`crate::gemm`]).
//!
//! Queries go in blocks of [`QUERY_BLOCK`] positions: a block's scores (`heads × block ×
//! keys`, BF16) exist while it runs, never a layer's whole `heads × len × keys`, and since
//! the mask is causal a block stops at the last key its last query sees (two blocks of a
//! 2,048-token sequence do 3/4 of the full product). Per block, forward is `S = Q·Kᵀ` (GEMM),
//! the softmax kernel (`crate::softmax`: probabilities and log-sum-exp, no f32 `[rows,
//! keys]` tensor), `O = P·V` (GEMM); backward is `S` and `dP = dO·Vᵀ` (GEMMs), the softmax
//! backward kernel (`P` and `dS`), then `dV = Pᵀ·dO`, `dQ = dS·K`, `dK = dSᵀ·Q` (GEMMs); the
//! key gradients of the blocks add up in f32. This is query tiling, not flash attention's
//! key tiling with an online softmax: a block row still sees all its keys at once.
//! Grouped-query heads read their key/value head without copying it (the query heads of one
//! KV head are folded into the row dimension, as in `qatflow_model::layers::attention`).
//! Other backends get `None` and keep their own path.

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
use burn::tensor::{DType, Tensor};
use burn_fusion::Fusion;

use crate::custom::{downcast, upcast, Cube, CubeBf16};
use crate::gemm::{self, CudaGemm};
use crate::{p, softmax, t, to_dtype};

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

/// Query positions of one block: a block's scores are `heads × QUERY_BLOCK × keys`.
const QUERY_BLOCK: usize = 1024;

/// One block of query positions `[start, end)` and the keys `[0, keys)` they can see.
#[derive(Debug, Clone, Copy)]
struct Block {
    start: usize,
    end: usize,
    keys: usize,
}

impl Dims {
    /// The query blocks of `block` positions. The mask is causal (query `i` of `len`, after
    /// `keys − len` earlier positions, sees keys `≤ keys − len + i`, as
    /// `qatflow_model::arch::layers::attention_mask` builds it), so a block stops at the keys
    /// its last query sees; without a mask every query sees every key.
    fn blocks(&self, block: usize, masked: bool) -> Vec<Block> {
        let past = self.keys - self.len;
        (0..self.len)
            .step_by(block.max(1))
            .map(|start| {
                let end = (start + block).min(self.len);
                let keys = if masked { past + end } else { self.keys };
                Block { start, end, keys }
            })
            .collect()
    }

    fn rows(&self, b: Block) -> softmax::Rows {
        softmax::Rows {
            batch: self.batch,
            heads: self.heads,
            queries: b.end - b.start,
            keys: b.keys,
        }
    }
}

/// The operands of one block: `q` `[batch·kv_heads, rep·n, hd]`, `k`, `v` `[batch·kv_heads,
/// keys, hd]` and the mask `[batch, n, keys]`.
struct Operands<I: Backend> {
    q: Tensor<I, 3>,
    k: Tensor<I, 3>,
    v: Tensor<I, 3>,
    mask: Option<Tensor<I, 3>>,
}

/// `x` `[batch, heads, len, hd]` at query positions `[start, end)`, as `[batch·kv_heads,
/// rep·n, hd]` (whole when the block is).
fn query_rows<I: Backend>(x: &Tensor<I, 4>, d: Dims, b: Block) -> Tensor<I, 3> {
    let n = b.end - b.start;
    let x = if n == d.len {
        x.clone()
    } else {
        x.clone()
            .slice([0..d.batch, 0..d.heads, b.start..b.end, 0..d.head_dim])
    };
    x.reshape([d.batch * d.kv_heads, d.rep() * n, d.head_dim])
}

fn operands<I: Backend>(
    q: &Tensor<I, 4>,
    k: &Tensor<I, 4>,
    v: &Tensor<I, 4>,
    mask: Option<&Tensor<I, 4>>,
    d: Dims,
    b: Block,
) -> Operands<I> {
    let n = b.end - b.start;
    let keys = |x: &Tensor<I, 4>| {
        let x = if b.keys == d.keys {
            x.clone()
        } else {
            x.clone()
                .slice([0..d.batch, 0..d.kv_heads, 0..b.keys, 0..d.head_dim])
        };
        x.reshape([d.batch * d.kv_heads, b.keys, d.head_dim])
    };
    let mask = mask.map(|m| {
        let m = if n == d.len && b.keys == d.keys {
            m.clone()
        } else {
            m.clone()
                .slice([0..d.batch, 0..1, b.start..b.end, 0..b.keys])
        };
        m.reshape([d.batch, n, b.keys])
    });
    Operands {
        q: query_rows(q, d, b),
        k: keys(k),
        v: keys(v),
        mask,
    }
}

/// The forward on inner tensors `[batch, heads, len, hd]`, in query blocks of `block`
/// positions: the output and each block's row log-sum-exp.
fn forward<I: CudaGemm>(
    q: FloatTensor<I>,
    k: FloatTensor<I>,
    v: FloatTensor<I>,
    mask: Option<FloatTensor<I>>,
    scale: f64,
    block: usize,
) -> (FloatTensor<I>, Vec<FloatTensor<I>>) {
    let phase_device = I::float_device(&q);
    crate::phase::timed::<I, _>(crate::phase::Phase::Attention, &phase_device, || {
        let (q, k, v) = (t::<I, 4>(q), t::<I, 4>(k), t::<I, 4>(v));
        let mask = mask.map(t::<I, 4>);
        let d = Dims::of(&q.dims(), &k.dims());
        let (mut outs, mut lses) = (Vec::new(), Vec::new());
        for b in d.blocks(block, mask.is_some()) {
            let o = operands(&q, &k, &v, mask.as_ref(), d, b);
            let r = d.rows(b);
            let [bk, rows, keys] = [d.batch * d.kv_heads, d.rep() * r.queries, b.keys];
            let scores = bmm(o.q, o.k, false, true).reshape([r.batch * r.heads * r.queries, keys]);
            let (probs, lse) = softmax::forward(scores, o.mask, r, scale as f32);
            let out = bmm(probs.reshape([bk, rows, keys]), o.v, false, false);
            outs.push(out.reshape([d.batch, d.heads, r.queries, d.head_dim]));
            lses.push(p(lse));
        }
        let out = if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(outs, 2)
        };
        (p(out), lses)
    })
}

/// Adds the f32 `[bk, n, hd]` gradient of a block's keys into `acc` `[bk, keys, hd]` (its
/// first `n` keys).
fn add_keys<I: Backend>(acc: Tensor<I, 3>, part: Tensor<I, 3>) -> Tensor<I, 3> {
    let [bk, n, hd] = part.dims();
    let range = [0..bk, 0..n, 0..hd];
    let sum = acc.clone().slice(range.clone()) + to_dtype(part, DType::F32);
    acc.slice_assign(range, sum)
}

/// Backward of the attention operation (see the module docs).
#[derive(Debug)]
struct AttentionBackward;

/// What backward keeps: `q`, `k`, `v`, the mask, the score scale, the query block and each
/// block's row log-sum-exp.
type State<I> = (
    NodeId,
    NodeId,
    NodeId,
    Option<FloatTensor<I>>,
    f64,
    usize,
    Vec<FloatTensor<I>>,
);

impl<I: CudaGemm> Backward<I, 3> for AttentionBackward {
    type State = State<I>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let (q_id, k_id, v_id, mask, scale, block, lses) = ops.state;
        let q = t::<I, 4>(checkpointer.retrieve_node_output(q_id));
        let k = t::<I, 4>(checkpointer.retrieve_node_output(k_id));
        let v = t::<I, 4>(checkpointer.retrieve_node_output(v_id));
        let mask = mask.map(t::<I, 4>);
        let dtype = q.dtype();
        let d_out = to_dtype(t::<I, 4>(grads.consume::<I>(&ops.node)), dtype);
        let d = Dims::of(&q.dims(), &k.dims());
        let bk = d.batch * d.kv_heads;
        let device = q.device();
        let phase = crate::phase::Phase::Attention;
        let (dq, dk, dv) = crate::phase::timed::<I, _>(phase, &device, || {
            let (mut dqs, mut dk, mut dv) = (Vec::new(), None, None);
            // The last block sees every key: its key gradients start the f32 sums.
            let blocks = d.blocks(block, mask.is_some());
            for (b, lse) in blocks.into_iter().zip(lses).rev() {
                let o = operands(&q, &k, &v, mask.as_ref(), d, b);
                let r = d.rows(b);
                let (rows, keys) = (d.rep() * r.queries, b.keys);
                let d_o = query_rows(&d_out, d, b);
                let flat = [r.batch * r.heads * r.queries, keys];
                let scores = bmm(o.q.clone(), o.k.clone(), false, true).reshape(flat);
                let dp = bmm(d_o.clone(), o.v, false, true).reshape(flat);
                let (probs, ds) = softmax::backward(scores, dp, o.mask, t(lse), r, scale as f32);
                let (probs, ds) = (
                    probs.reshape([bk, rows, keys]),
                    ds.reshape([bk, rows, keys]),
                );
                let dv_b = bmm(probs, d_o, true, false);
                let dk_b = bmm(ds.clone(), o.q, true, false);
                dqs.push(
                    bmm(ds, o.k, false, false).reshape([d.batch, d.heads, r.queries, d.head_dim]),
                );
                dk = Some(match dk {
                    None => dk_b,
                    Some(acc) => add_keys(to_dtype(acc, DType::F32), dk_b),
                });
                dv = Some(match dv {
                    None => dv_b,
                    Some(acc) => add_keys(to_dtype(acc, DType::F32), dv_b),
                });
            }
            dqs.reverse();
            let dq = if dqs.len() == 1 {
                dqs.remove(0)
            } else {
                Tensor::cat(dqs, 2)
            };
            let shape_kv = [d.batch, d.kv_heads, d.keys, d.head_dim];
            let keys_grad = |g: Option<Tensor<I, 3>>| {
                p(to_dtype(g.expect("at least one query block"), dtype).reshape(shape_kv))
            };
            (p(dq), keys_grad(dk), keys_grad(dv))
        });
        let [q_parent, k_parent, v_parent] = ops.parents;
        if let Some(node) = q_parent {
            grads.register::<I>(node.id, dq);
        }
        if let Some(node) = k_parent {
            grads.register::<I>(node.id, dk);
        }
        if let Some(node) = v_parent {
            grads.register::<I>(node.id, dv);
        }
    }
}

/// The attention operation under `Autodiff<I, C>`, in query blocks of `block` positions.
fn autodiff_attention<I: CudaGemm, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<I, C>>,
    k: FloatTensor<Autodiff<I, C>>,
    v: FloatTensor<Autodiff<I, C>>,
    mask: Option<FloatTensor<I>>,
    scale: f64,
    block: usize,
) -> FloatTensor<Autodiff<I, C>> {
    match AttentionBackward
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let ids = (
                prep.checkpoint(&q),
                prep.checkpoint(&k),
                prep.checkpoint(&v),
            );
            let (out, lses) = forward::<I>(
                q.primitive,
                k.primitive,
                v.primitive,
                mask.clone(),
                scale,
                block,
            );
            let state = (ids.0, ids.1, ids.2, mask, scale, block, lses);
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => {
            let (out, _) = forward::<I>(q.primitive, k.primitive, v.primitive, mask, scale, block);
            prep.finish(out)
        }
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
    let out = autodiff_attention::<I, C>(cast(q), cast(k), cast(v), mask, scale, QUERY_BLOCK);
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
    let applies = gemm::kernel_on("attention")
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

#[cfg(test)]
mod tests {
    //! The blocked operation (forward, and backward through burn's autodiff) on the CPU with
    //! burn's matmul standing in for cuBLASLt, against the plain formula differentiated by
    //! burn: grouped-query heads, padding, earlier keys, blocks that do not divide the length.

    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    type A = Autodiff<Flex>;

    impl CudaGemm for Flex {
        fn gemm(
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            ta: bool,
            tb: bool,
        ) -> FloatTensor<Self> {
            let (a, b) = (t::<Flex, 3>(a), t::<Flex, 3>(b));
            let a = if ta { a.swap_dims(1, 2) } else { a };
            let b = if tb { b.swap_dims(1, 2) } else { b };
            p(a.matmul(b))
        }
    }

    /// A causal mask `[batch, 1, len, keys]` after `keys − len` earlier positions, with
    /// `valid[b]` keys valid in sequence `b` (as the model's `attention_mask`).
    fn mask(len: usize, keys: usize, valid: &[usize]) -> Tensor<Flex, 4> {
        let past = keys - len;
        let mut m = vec![0f32; valid.len() * len * keys];
        for (b, &n) in valid.iter().enumerate() {
            for i in 0..len {
                for j in 0..keys {
                    if j > past + i || j >= n {
                        m[(b * len + i) * keys + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Tensor::from_data(
            TensorData::new(m, [valid.len(), 1, len, keys]),
            &Default::default(),
        )
    }

    /// Grouped-query attention as the model's tensor path computes it.
    fn reference(
        q: Tensor<A, 4>,
        k: Tensor<A, 4>,
        v: Tensor<A, 4>,
        mask: Tensor<Flex, 4>,
    ) -> Tensor<A, 4> {
        let [b, h, len, hd] = q.dims();
        let [_, kvh, keys, _] = k.dims();
        let rep = h / kvh;
        let s = q
            .reshape([b, kvh, rep * len, hd])
            .matmul(k.swap_dims(2, 3))
            .mul_scalar((hd as f64).powf(-0.5))
            .reshape([b, h, len, keys])
            + Tensor::<A, 4>::from_inner(mask);
        burn::tensor::activation::softmax(s, 3)
            .reshape([b, kvh, rep * len, keys])
            .matmul(v)
            .reshape([b, h, len, hd])
    }

    fn check(len: usize, keys: usize, valid: &[usize], block: usize) {
        let (batch, heads, kv_heads, hd) = (valid.len(), 4, 2, 8);
        let dev = Default::default();
        let rand = |shape: [usize; 4]| {
            Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &dev)
        };
        let (q0, k0, v0) = (
            rand([batch, heads, len, hd]),
            rand([batch, kv_heads, keys, hd]),
            rand([batch, kv_heads, keys, hd]),
        );
        let weight = rand([batch, heads, len, hd]);
        let m = mask(len, keys, valid);
        let run = |blocked: bool| {
            let leaf = |x: &Tensor<Flex, 4>| Tensor::<A, 4>::from_inner(x.clone()).require_grad();
            let (q, k, v) = (leaf(&q0), leaf(&k0), leaf(&v0));
            let out = if blocked {
                let scale = (hd as f64).powf(-0.5);
                let prim = autodiff_attention::<Flex, NoCheckpointing>(
                    p(q.clone()),
                    p(k.clone()),
                    p(v.clone()),
                    Some(p(m.clone())),
                    scale,
                    block,
                );
                t::<A, 4>(prim)
            } else {
                reference(q.clone(), k.clone(), v.clone(), m.clone())
            };
            let grads = (out.clone() * Tensor::from_inner(weight.clone()))
                .sum()
                .backward();
            let g = |x: &Tensor<A, 4>| x.grad(&grads).expect("a gradient").into_data();
            (out.inner().into_data(), g(&q), g(&k), g(&v))
        };
        let (want, got) = (run(false), run(true));
        let tol = burn::tensor::Tolerance::<f32>::absolute(2e-5);
        for (name, w, g) in [
            ("output", &want.0, &got.0),
            ("dq", &want.1, &got.1),
            ("dk", &want.2, &got.2),
            ("dv", &want.3, &got.3),
        ] {
            assert_eq!(w.shape, g.shape, "{name}");
            g.assert_approx_eq::<f32>(w, tol);
        }
    }

    #[test]
    fn blocks_equal_the_formula_with_gqa_padding_and_gradients() {
        check(37, 37, &[37, 30], 16);
        check(37, 37, &[37, 30], 1024);
        check(32, 32, &[32], 8);
    }

    #[test]
    fn blocks_after_earlier_keys_see_those_keys() {
        check(20, 29, &[29, 25], 8);
    }

    #[test]
    fn causal_blocks_stop_at_the_keys_their_last_query_sees() {
        let d = Dims::of(&[1, 4, 10, 8], &[1, 2, 14, 8]);
        let b: Vec<(usize, usize, usize)> = d
            .blocks(4, true)
            .iter()
            .map(|b| (b.start, b.end, b.keys))
            .collect();
        assert_eq!(b, [(0, 4, 8), (4, 8, 12), (8, 10, 14)]);
        assert!(d.blocks(4, false).iter().all(|b| b.keys == 14));
    }
}
