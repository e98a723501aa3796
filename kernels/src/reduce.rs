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
//! [`softmax`] (the attention's) and [`log_softmax`] are built on the two.
//!
//! [`square_sum`] (Σx² of a whole tensor, the gradient norm's terms) has the same trouble with
//! burn's whole-tensor sum, which took 79 ms of a Qwen3-1.7B step for ~3.4 GB of gradients; on
//! CUDA with the training engine on (`QATFLOW_GEMM=cublaslt`) one kernel reads the tensor once
//! in its own dtype, 2¹⁸ units each accumulating a strided share in f32.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorMetadata};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use half::bf16;

use crate::custom::{self, empty, CubeCall};
use crate::gemm::cuda_index;
use crate::{cube_count, t, to_dtype, CUBE_SIZE};

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
    lanes_for_len::<B>(&x.device(), x.dims()[1])
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

/// The mean over the last dimension of `x` (kept as size 1), as `mean_dim(D - 1)`: on CUDA
/// with the training engine on (`QATFLOW_GEMM=cublaslt`) a [`row_sum`] split into lanes
/// divided by the length (RMSNorm's `[tokens, hidden]` rows: 2,048 threads each walking
/// 2,048 elements otherwise), elsewhere burn's `mean_dim` unchanged.
pub fn mean_last<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let dims = x.dims();
    let len = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    if !crate::gemm::kernel_on("mean_last") || lanes_for_len::<B>(&x.device(), len) <= 1 {
        return x.mean_dim(D - 1);
    }
    let mut kept = dims;
    kept[D - 1] = 1;
    (row_sum(x.reshape([rows, len])) / len as f64).reshape(kept)
}

/// Lanes for rows of `len` on `device`: split on CUDA, whole rows elsewhere.
fn lanes_for_len<B: Backend>(device: &B::Device, len: usize) -> usize {
    if cuda_index::<B>(device).is_some() {
        lanes(len)
    } else {
        1
    }
}

/// Row-wise softmax of `[rows, len]` scores (max-shifted), with [`row_max`] and [`row_sum`]:
/// the attention's `heads × len` rows of `keys` scores, split into lanes on CUDA.
pub fn softmax<B: Backend>(scores: Tensor<B, 2>) -> Tensor<B, 2> {
    let max = row_max(scores.clone());
    let e = (scores - max).exp();
    let sum = row_sum(e.clone());
    e / sum
}

/// Float32 log-probabilities of `[rows, vocab]` float32 logits (max-shifted; the shift is
/// detached, which leaves the gradient unchanged), with [`row_max`] and [`row_sum`].
pub fn log_softmax<B: Backend>(logits: Tensor<B, 2>) -> Tensor<B, 2> {
    let max = row_max(logits.clone().detach());
    let shifted = logits - max;
    let lse = row_sum(shifted.clone().exp()).log();
    shifted - lse
}

/// Units of [`square_sum`]'s kernel: 2¹⁸ (an H100 holds ~270k resident threads).
const SQUARE_SUM_UNITS: usize = 1 << 18;

/// Σ x² over the elements of a flat `x`, in f32, as a one-element tensor. On CUDA (training
/// engine on) one kernel pass plus a sum of its partials; elsewhere `x` widened to f32,
/// squared and summed by burn (the values the CPU always gave).
pub fn square_sum<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    let kernel = crate::gemm::kernel_on("square_sum")
        && x.dims()[0] > 0
        && matches!(x.dtype(), DType::F32 | DType::BF16);
    let x = if kernel {
        match custom::on_cuda::<B, _>(&SquareSum, vec![x.into_primitive().tensor()]) {
            Ok(mut partials) => return t::<B, 1>(partials.remove(0)).sum(),
            Err(mut x) => t(x.remove(0)),
        }
    } else {
        x
    };
    to_dtype(x, DType::F32).powi_scalar(2).sum()
}

/// The launch of [`square_sum_kernel`]: a flat tensor in, its `[units]` f32 partial sums out.
#[derive(Debug, Clone, Copy)]
struct SquareSum;

impl CubeCall for SquareSum {
    const NAME: &'static str = "qatflow_square_sum";

    fn outputs(&self, inputs: &[(Vec<usize>, DType)]) -> Vec<(Vec<usize>, DType)> {
        let n: usize = inputs[0].0.iter().product();
        vec![(vec![n.min(SQUARE_SUM_UNITS)], DType::F32)]
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>) -> Vec<CubeTensor<R>> {
        inputs.into_iter().map(cube_square_sum).collect()
    }
}

/// Each unit `i` sums `x[j]²` over `j = i, i + units, …` (adjacent units read adjacent
/// elements) into `partial[i]`.
#[cube(launch_unchecked)]
fn square_sum_kernel<F: Float>(x: &Array<F>, partial: &mut Array<f32>, len: u32, units: u32) {
    let i = ABSOLUTE_POS;
    let (len, units) = (len as usize, units as usize);
    if i >= units {
        terminate!();
    }
    let mut acc = 0.0f32;
    let mut j = i;
    while j < len {
        let v = f32::cast_from(x[j]);
        acc += v * v;
        j += units;
    }
    partial[i] = acc;
}

/// [`square_sum_kernel`] on a CubeCL tensor: its `[units]` f32 partial sums.
fn cube_square_sum<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    let x = burn_cubecl::kernel::into_contiguous(x);
    let n = x.shape().num_elements();
    let units = n.min(SQUARE_SUM_UNITS);
    let client = x.client.clone();
    let out = empty(&x, vec![units], DType::F32);
    macro_rules! launch {
        ($t:ty) => {
            // SAFETY: `x` holds `n` elements of its dtype, `out` holds `units` f32, and unit
            // `i < units` reads indices `< n` and writes `out[i]` only.
            unsafe {
                square_sum_kernel::launch_unchecked::<$t, R>(
                    &client,
                    cube_count(units),
                    CubeDim::new_1d(CUBE_SIZE),
                    ArrayArg::from_raw_parts(x.handle.clone(), n),
                    ArrayArg::from_raw_parts(out.handle.clone(), units),
                    n as u32,
                    units as u32,
                )
            }
        };
    }
    match x.dtype {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        other => unreachable!("square_sum sends only F32 and BF16 here, not {other:?}"),
    }
    out
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
    fn softmax_rows_are_burns_softmax() {
        let x = sample(4, 700);
        let got = softmax(x.clone()).into_data();
        got.assert_approx_eq::<f32>(
            &burn::tensor::activation::softmax(x, 1).into_data(),
            Default::default(),
        );
    }

    #[test]
    fn off_cuda_mean_last_is_mean_dim() {
        let x = sample(6, 512).reshape([2, 3, 512]);
        assert_eq!(
            mean_last(x.clone()).into_data().to_vec::<f32>().unwrap(),
            x.mean_dim(2).into_data().to_vec::<f32>().unwrap()
        );
    }

    #[test]
    fn off_cuda_square_sum_is_the_widened_sum_of_squares() {
        let x = sample(3, 100)
            .reshape([300])
            .cast(burn::tensor::DType::BF16);
        let want = x
            .clone()
            .cast(burn::tensor::DType::F32)
            .powi_scalar(2)
            .sum();
        let got = square_sum(x);
        assert_eq!(got.dims(), [1]);
        assert_eq!(
            got.into_data().to_vec::<f32>().unwrap(),
            want.into_data().to_vec::<f32>().unwrap()
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

    /// The square-sum kernel on the software GPU: its partial sums add up to Σx² (lengths
    /// below, at and above the unit count).
    #[test]
    fn the_square_sum_kernel_sums_every_square() {
        use crate::soft_gpu::{self, read, values, Soft};
        for n in [5, SQUARE_SUM_UNITS, SQUARE_SUM_UNITS * 3 + 17] {
            let x = values(n, 4);
            let partial = read(&SquareSum.run::<Soft>(vec![soft_gpu::tensor(&x, &[n])])[0]);
            assert_eq!(partial.len(), n.min(SQUARE_SUM_UNITS));
            let got: f64 = partial.iter().map(|&v| f64::from(v)).sum();
            let want: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            assert!((got - want).abs() <= 1e-5 * want, "{n}: {got} vs {want}");
        }
    }
}
