//! Row maxima and sums of long rows (`[rows, vocab]` logits) that keep a GPU busy.
//!
//! burn 0.21 built without `autotune` reduces with one GPU thread per output element, so a
//! row maximum of a `[441, 151936]` logits chunk runs on 441 threads, each walking its whole
//! row: 6.3 ms on an H100 for what memory bandwidth allows in ~0.1 ms (the chunked loss's 20
//! reductions were a sixth of a Qwen3-1.7B QAT step's kernel time in CubeCL's profile of
//! 2026-12-07). On CUDA, [`row_max`] and [`row_sum`] split each row into contiguous lanes
//! first (`[rows · lanes, vocab / lanes]`), reduce the lanes, then the `[rows, lanes]`
//! partials: `lanes` times as many threads in the long pass. The maximum is the same value;
//! the sum adds in another order (f32 rounding). Other backends reduce the row directly.
//! [`log_softmax`] is built on the two.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::gemm::cuda_index;

/// Fewest elements a lane keeps: below it the second pass would cost more than it saves.
const MIN_LANE: usize = 256;

/// Lanes a row of `len` elements is split into: the largest power of two up to 256 that
/// divides `len` and leaves lanes of at least [`MIN_LANE`] elements (1: no split).
fn lanes(len: usize) -> usize {
    (1..=8)
        .rev()
        .map(|p| 1usize << p)
        .find(|&g| len % g == 0 && len / g >= MIN_LANE)
        .unwrap_or(1)
}

/// How a row is reduced.
#[derive(Clone, Copy)]
enum Op {
    Max,
    Sum,
}

impl Op {
    fn apply<B: Backend>(self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Op::Max => x.max_dim(1),
            Op::Sum => x.sum_dim(1),
        }
    }
}

/// `op` over each row of `x` `[rows, len]` in `lanes` contiguous parts, then over the parts.
fn split_reduce<B: Backend>(x: Tensor<B, 2>, lanes: usize, op: Op) -> Tensor<B, 2> {
    let [rows, len] = x.dims();
    if lanes <= 1 || len % lanes != 0 {
        return op.apply(x);
    }
    let partial = op.apply(x.reshape([rows * lanes, len / lanes]));
    op.apply(partial.reshape([rows, lanes]))
}

/// Lanes for `x` on its device: split on CUDA, whole rows elsewhere.
fn lanes_for<B: Backend>(x: &Tensor<B, 2>) -> usize {
    if cuda_index::<B>(&x.device()).is_some() {
        lanes(x.dims()[1])
    } else {
        1
    }
}

/// The maximum of each row of `x` `[rows, len]`, as `[rows, 1]`.
pub fn row_max<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let lanes = lanes_for(&x);
    split_reduce(x, lanes, Op::Max)
}

/// The sum of each row of `x` `[rows, len]`, as `[rows, 1]`.
pub fn row_sum<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let lanes = lanes_for(&x);
    split_reduce(x, lanes, Op::Sum)
}

/// Float32 log-probabilities of `[rows, vocab]` float32 logits (max-shifted; the shift is
/// detached, which leaves the gradient unchanged), with [`row_max`] and [`row_sum`].
pub fn log_softmax<B: Backend>(logits: Tensor<B, 2>) -> Tensor<B, 2> {
    let max = row_max(logits.clone().detach());
    let shifted = logits - max;
    let lse = row_sum(shifted.clone().exp()).log();
    shifted - lse
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorData;

    type B = Flex;

    #[test]
    fn lanes_divide_the_row_and_stay_long_enough() {
        assert_eq!(lanes(151_936), 128);
        assert_eq!(lanes(49_152), 128);
        assert_eq!(lanes(248_320), 256);
        assert_eq!(lanes(32_001), 1);
        assert_eq!(lanes(300), 1);
        assert_eq!(lanes(512), 2);
        for len in [151_936usize, 49_152, 248_320, 128_256, 32_000, 1_024] {
            let g = lanes(len);
            assert_eq!(len % g, 0, "{len}");
            assert!(g == 1 || len / g >= MIN_LANE, "{len}");
        }
    }

    fn sample(rows: usize, len: usize) -> Tensor<B, 2> {
        let v: Vec<f32> = (0..rows * len)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0)
            .collect();
        Tensor::from_data(TensorData::new(v, [rows, len]), &Default::default())
    }

    #[test]
    fn split_rows_give_the_row_max_and_sum() {
        let x = sample(5, 1_024);
        for lanes in [1, 2, 4, 32, 3] {
            let max = split_reduce(x.clone(), lanes, Op::Max);
            assert_eq!(max.dims(), [5, 1]);
            assert_eq!(
                max.into_data().to_vec::<f32>().unwrap(),
                x.clone().max_dim(1).into_data().to_vec::<f32>().unwrap()
            );
            let sum = split_reduce(x.clone(), lanes, Op::Sum).into_data();
            sum.assert_approx_eq::<f32>(&x.clone().sum_dim(1).into_data(), Default::default());
        }
    }

    #[test]
    fn gradients_through_the_split_are_those_of_whole_rows() {
        type A = Autodiff<Flex>;
        let grad = |lanes: usize| {
            let x = Tensor::<A, 2>::from_data(sample(3, 512).into_data(), &Default::default())
                .require_grad();
            let y = split_reduce(x.clone(), lanes, Op::Sum).sum()
                + split_reduce(x.clone(), lanes, Op::Max).sum() * 2.0;
            x.grad(&y.backward()).unwrap().into_data()
        };
        let whole = grad(1);
        assert_eq!(
            whole
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .filter(|&&g| g == 3.0)
                .count(),
            3,
            "one maximum a row"
        );
        grad(4).assert_approx_eq::<f32>(&whole, Default::default());
    }

    #[test]
    fn log_softmax_rows_are_normalized_log_probabilities() {
        let lp = log_softmax(sample(4, 700));
        let total = lp.exp().sum_dim(1).into_data();
        total.assert_approx_eq::<f32>(
            &TensorData::new(vec![1.0f32; 4], [4, 1]),
            Default::default(),
        );
    }

    #[test]
    fn off_cuda_rows_are_reduced_whole() {
        let x = sample(2, 151_936);
        assert_eq!(lanes_for(&x), 1);
        assert_eq!(
            row_max(x.clone()).into_data().to_vec::<f32>().unwrap(),
            x.clone().max_dim(1).into_data().to_vec::<f32>().unwrap()
        );
        assert_eq!(
            row_sum(x.clone()).into_data().to_vec::<f32>().unwrap(),
            x.sum_dim(1).into_data().to_vec::<f32>().unwrap()
        );
    }
}
