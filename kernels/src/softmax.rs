//! The attention's softmax and its backward as one kernel each on CUDA.
//!
//! A layer's (or a query block's) scores `[rows, keys]` come out of a cuBLASLt GEMM in BF16.
//! [`forward`] turns them into the BF16 probabilities of `softmax(scores · scale + mask)` and
//! each row's log-sum-exp (f32); [`backward`] takes the scores again, the probabilities'
//! gradient `dP` and that log-sum-exp, and writes the probabilities (for `dV = Pᵀ·dO`) and
//! the scores' gradient `dS = P ⊙ (dP − Σ P·dP) · scale`, both BF16. On CUDA each is one
//! kernel, one cube of 256 units a row: the row is read three times (twice in backward) but
//! stays in L2, and nothing of `[rows, keys]` size exists in f32. Burn's tensor form of the
//! same arithmetic (widen, scale, add the mask, max, exp, sum, divide, narrow, each a pass of
//! f32 `[rows, keys]` tensors) is the path everywhere else and the reference of the tests.
//!
//! Rows are ordered `[batch][head][query]` and the mask, when there is one, is
//! `[batch, queries, keys]` f32 (shared by the heads): row `r` reads mask row
//! `(r / (heads · queries)) · queries + r % queries`.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use half::bf16;

use crate::custom::{self, empty, CubeCall};
use crate::{p, t, to_dtype, CUBE_SIZE};

/// The shape of one call: `batch · heads · queries` rows of `keys` scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rows {
    /// Sequences.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Query positions of this call (a block of the layer's).
    pub queries: usize,
    /// Keys each row attends over.
    pub keys: usize,
}

impl Rows {
    fn count(&self) -> usize {
        self.batch * self.heads * self.queries
    }
}

/// `op` over the cube's units of one value each (`max` when `max`, else the sum); every
/// unit gets the result. `shared` holds one f32 a unit.
#[cube]
pub(crate) fn cube_reduce(
    shared: &mut SharedMemory<f32>,
    value: f32,
    #[comptime] max: bool,
) -> f32 {
    let unit = UNIT_POS as usize;
    shared[unit] = value;
    sync_cube();
    let mut stride = CUBE_DIM as usize / 2usize;
    while stride > 0usize {
        if unit < stride {
            let a = shared[unit];
            let b = shared[unit + stride];
            if max {
                shared[unit] = f32::max(a, b);
            } else {
                shared[unit] = a + b;
            }
        }
        sync_cube();
        stride /= 2usize;
    }
    let total = shared[0usize];
    sync_cube();
    total
}

/// The scaled (and masked) score `j` of the row at `base` (mask row at `mask_base`).
#[cube]
fn score<F: Float>(
    scores: &Array<F>,
    mask: &Array<f32>,
    base: usize,
    mask_base: usize,
    j: usize,
    scale: f32,
    #[comptime] masked: bool,
) -> f32 {
    let mut s = f32::cast_from(scores[base + j]) * scale;
    if masked {
        s += mask[mask_base + j];
    }
    s
}

/// The offset of row `row`'s mask row (see the module docs).
#[cube]
fn mask_base(row: usize, keys: usize, heads: usize, queries: usize) -> usize {
    let batch = row / (heads * queries);
    (batch * queries + row % queries) * keys
}

/// One cube a row: its probabilities `exp(s − lse)` and `lse = max + ln Σ exp(s − max)`.
/// `mask` is only read when `masked`.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn softmax_forward_kernel<F: Float>(
    scores: &Array<F>,
    mask: &Array<f32>,
    probs: &mut Array<F>,
    lse: &mut Array<f32>,
    scale: f32,
    keys: u32,
    heads: u32,
    queries: u32,
    #[comptime] masked: bool,
) {
    let row = CUBE_POS;
    let (unit, step) = (UNIT_POS as usize, CUBE_DIM as usize);
    let keys = keys as usize;
    let base = row * keys;
    let mbase = mask_base(row, keys, heads as usize, queries as usize);
    let mut shared = SharedMemory::<f32>::new(256usize);
    // A finite start: a fully masked row never computes `∞ − ∞` (its probabilities are then
    // `0 / 0`, as the tensor form gives).
    let mut top = f32::new(-3.0e38);
    let mut j = unit;
    while j < keys {
        top = f32::max(top, score::<F>(scores, mask, base, mbase, j, scale, masked));
        j += step;
    }
    let max = cube_reduce(&mut shared, top, true);
    let mut part = 0.0f32;
    let mut j2 = unit;
    while j2 < keys {
        part += f32::exp(score::<F>(scores, mask, base, mbase, j2, scale, masked) - max);
        j2 += step;
    }
    let log_sum = max + f32::ln(cube_reduce(&mut shared, part, false));
    let mut j3 = unit;
    while j3 < keys {
        let s = score::<F>(scores, mask, base, mbase, j3, scale, masked);
        probs[base + j3] = F::cast_from(f32::exp(s - log_sum));
        j3 += step;
    }
    if unit == 0usize {
        lse[row] = log_sum;
    }
}

/// One cube a row: `P = exp(s − lse)` and `dS = P ⊙ (dP − Σ P·dP) · scale`.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn softmax_backward_kernel<F: Float>(
    scores: &Array<F>,
    d_probs: &Array<F>,
    mask: &Array<f32>,
    lse: &Array<f32>,
    probs: &mut Array<F>,
    d_scores: &mut Array<F>,
    scale: f32,
    keys: u32,
    heads: u32,
    queries: u32,
    #[comptime] masked: bool,
) {
    let row = CUBE_POS;
    let (unit, step) = (UNIT_POS as usize, CUBE_DIM as usize);
    let keys = keys as usize;
    let base = row * keys;
    let mbase = mask_base(row, keys, heads as usize, queries as usize);
    let log_sum = lse[row];
    let mut shared = SharedMemory::<f32>::new(256usize);
    let mut part = 0.0f32;
    let mut j = unit;
    while j < keys {
        let p = f32::exp(score::<F>(scores, mask, base, mbase, j, scale, masked) - log_sum);
        part += p * f32::cast_from(d_probs[base + j]);
        j += step;
    }
    let dot = cube_reduce(&mut shared, part, false);
    let mut j2 = unit;
    while j2 < keys {
        let p = f32::exp(score::<F>(scores, mask, base, mbase, j2, scale, masked) - log_sum);
        let dp = f32::cast_from(d_probs[base + j2]);
        probs[base + j2] = F::cast_from(p);
        d_scores[base + j2] = F::cast_from(p * (dp - dot) * scale);
        j2 += step;
    }
}

/// `scores · scale + mask` in f32, `[batch, heads, queries, keys]` (the tensor form).
fn scaled<I: Backend>(
    scores: Tensor<I, 2>,
    mask: Option<Tensor<I, 3>>,
    r: Rows,
    scale: f32,
) -> Tensor<I, 4> {
    let s = to_dtype(scores, DType::F32)
        .mul_scalar(scale)
        .reshape([r.batch, r.heads, r.queries, r.keys]);
    match mask {
        Some(m) => s + m.reshape([r.batch, 1, r.queries, r.keys]),
        None => s,
    }
}

/// Which kernel a call runs, with its scalars.
#[derive(Debug, Clone, Copy)]
struct Spec {
    backward: bool,
    rows: Rows,
    scale: f32,
    masked: bool,
}

impl CubeCall for Spec {
    const NAME: &'static str = "qatflow_attention_softmax";

    /// `[probs, lse]` forward, `[probs, dS]` backward, for scores of the first input's dtype.
    fn outputs(&self, inputs: &[(Vec<usize>, DType)]) -> Vec<(Vec<usize>, DType)> {
        let (rows, keys, dtype) = (self.rows.count(), self.rows.keys, inputs[0].1);
        let second = if self.backward {
            (vec![rows, keys], dtype)
        } else {
            (vec![rows], DType::F32)
        };
        vec![(vec![rows, keys], dtype), second]
    }

    /// The kernel on CubeCL tensors: forward takes `[scores, mask?]` and gives `[probs,
    /// lse]`, backward takes `[scores, dP, lse, mask?]` and gives `[probs, dS]`.
    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>) -> Vec<CubeTensor<R>> {
        let mut it = inputs.into_iter().map(burn_cubecl::kernel::into_contiguous);
        let mut next = || it.next().expect("an input the caller passed");
        let scores = next();
        let (d_probs, lse) = if self.backward {
            (Some(next()), Some(next()))
        } else {
            (None, None)
        };
        let mask = self.masked.then(next);
        let outs: Vec<_> = self
            .outputs(&[(Vec::new(), scores.dtype)])
            .into_iter()
            .map(|(shape, dtype)| empty(&scores, shape, dtype))
            .collect();
        let (a, b) = (&outs[0], &outs[1]);
        let r = self.rows;
        let (rows, n) = (r.count(), r.count() * r.keys);
        // Without a mask the kernel never reads it: the scores stand in.
        let (mask_handle, mask_len) = match &mask {
            Some(m) => (m.handle.clone(), r.batch * r.queries * r.keys),
            None => (scores.handle.clone(), n),
        };
        let client = scores.client.clone();
        // SAFETY: each handle below is passed with the element count its buffer holds.
        let arg = |h: &cubecl::server::Handle, len: usize| unsafe {
            ArrayArg::from_raw_parts(h.clone(), len)
        };
        macro_rules! launch {
            ($t:ty) => {
                match (&d_probs, &lse) {
                    // SAFETY: scores, dP and both `[rows, keys]` outputs hold `rows × keys`
                    // elements, the log-sum-exp `rows` f32 and the mask `batch × queries ×
                    // keys` f32 (read only when `masked`); cube `row < rows` reads its own row
                    // and mask row and writes its own row only.
                    (Some(dp), Some(lse)) => unsafe {
                        softmax_backward_kernel::launch_unchecked::<$t, R>(
                            &client,
                            CubeCount::Static(rows as u32, 1, 1),
                            CubeDim::new_1d(CUBE_SIZE),
                            arg(&scores.handle, n),
                            arg(&dp.handle, n),
                            arg(&mask_handle, mask_len),
                            arg(&lse.handle, rows),
                            arg(&a.handle, n),
                            arg(&b.handle, n),
                            self.scale,
                            r.keys as u32,
                            r.heads as u32,
                            r.queries as u32,
                            self.masked,
                        )
                    },
                    // SAFETY: as above; the second output is the `rows` f32 log-sum-exp.
                    _ => unsafe {
                        softmax_forward_kernel::launch_unchecked::<$t, R>(
                            &client,
                            CubeCount::Static(rows as u32, 1, 1),
                            CubeDim::new_1d(CUBE_SIZE),
                            arg(&scores.handle, n),
                            arg(&mask_handle, mask_len),
                            arg(&a.handle, n),
                            arg(&b.handle, rows),
                            self.scale,
                            r.keys as u32,
                            r.heads as u32,
                            r.queries as u32,
                            self.masked,
                        )
                    },
                }
            };
        }
        if let Some(dp) = &d_probs {
            assert_eq!(
                dp.dtype, scores.dtype,
                "attention softmax: dP and scores dtypes"
            );
        }
        match scores.dtype {
            DType::BF16 => launch!(bf16),
            DType::F32 => launch!(f32),
            other => panic!("attention softmax kernel: scores of dtype {other:?} (F32/BF16 only)"),
        }
        outs
    }
}

impl Spec {
    /// Runs the kernel when `I` is burn's CUDA backend and the training engine is on; the
    /// inputs back otherwise.
    fn on_cuda<I: Backend>(
        &self,
        inputs: Vec<FloatTensor<I>>,
    ) -> Result<[FloatTensor<I>; 2], Vec<FloatTensor<I>>> {
        if !crate::gemm::kernel_on("softmax") {
            return Err(inputs);
        }
        let mut out = custom::on_cuda::<I, _>(self, inputs)?.into_iter();
        let a = out.next().expect("two outputs");
        Ok([a, out.next().expect("two outputs")])
    }
}

/// The probabilities (the scores' dtype) and the row log-sum-exp `[rows]` f32 of
/// `softmax(scores · scale + mask)` for `scores` `[rows, keys]`: one kernel on CUDA (training
/// engine on), burn's tensor operations elsewhere.
pub(crate) fn forward<I: Backend>(
    scores: Tensor<I, 2>,
    mask: Option<Tensor<I, 3>>,
    r: Rows,
    scale: f32,
) -> (Tensor<I, 2>, Tensor<I, 1>) {
    let spec = Spec {
        backward: false,
        rows: r,
        scale,
        masked: mask.is_some(),
    };
    let mut inputs = vec![p(scores)];
    inputs.extend(mask.map(p));
    let mut it = match spec.on_cuda::<I>(inputs) {
        Ok([probs, lse]) => return (t(probs), t(lse)),
        Err(inputs) => inputs.into_iter(),
    };
    let scores = t::<I, 2>(it.next().expect("the scores"));
    let dtype = scores.dtype();
    let s = scaled(scores, it.next().map(t), r, scale).reshape([r.count(), r.keys]);
    let max = crate::reduce::row_max(s.clone());
    let lse = (s.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let probs = to_dtype((s - lse.clone()).exp(), dtype);
    (probs, lse.reshape([r.count()]))
}

/// The probabilities and the scores' gradient (both the scores' dtype) from the scores, the
/// probabilities' gradient `d_probs` (same shape) and [`forward`]'s log-sum-exp.
pub(crate) fn backward<I: Backend>(
    scores: Tensor<I, 2>,
    d_probs: Tensor<I, 2>,
    mask: Option<Tensor<I, 3>>,
    lse: Tensor<I, 1>,
    r: Rows,
    scale: f32,
) -> (Tensor<I, 2>, Tensor<I, 2>) {
    let spec = Spec {
        backward: true,
        rows: r,
        scale,
        masked: mask.is_some(),
    };
    let mut inputs = vec![p(scores), p(d_probs), p(lse)];
    inputs.extend(mask.map(p));
    let mut it = match spec.on_cuda::<I>(inputs) {
        Ok([probs, ds]) => return (t(probs), t(ds)),
        Err(inputs) => inputs.into_iter(),
    };
    let scores = t::<I, 2>(it.next().expect("the scores"));
    let d_probs = t::<I, 2>(it.next().expect("dP"));
    let lse = t::<I, 1>(it.next().expect("the log-sum-exp"));
    let dtype = scores.dtype();
    let s = scaled(scores, it.next().map(t), r, scale).reshape([r.count(), r.keys]);
    let probs = (s - lse.reshape([r.count(), 1])).exp();
    let dp = to_dtype(d_probs, DType::F32);
    let dot = crate::reduce::row_sum(probs.clone() * dp.clone());
    let ds = (probs.clone() * (dp - dot)).mul_scalar(scale);
    (to_dtype(probs, dtype), to_dtype(ds, dtype))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soft_gpu::{self, max_rel_diff, read, values, Soft};
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    fn host(values: &[f32], shape: &[usize]) -> Tensor<Flex, 2> {
        Tensor::<Flex, 1>::from_floats(values, &Default::default()).reshape([shape[0], shape[1]])
    }

    fn floats<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    /// A `[batch, queries, keys]` mask as the model makes it: causal with the queries at the
    /// end of the keys, and the last `padded` keys of the last sequence masked (right padding).
    fn mask(r: Rows, padded: usize) -> Vec<f32> {
        let mut m = vec![0f32; r.batch * r.queries * r.keys];
        for b in 0..r.batch {
            for i in 0..r.queries {
                for j in 0..r.keys {
                    let future = j > r.keys - r.queries + i;
                    let pad = b == r.batch - 1 && j >= r.keys - padded;
                    if future || pad {
                        m[(b * r.queries + i) * r.keys + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        m
    }

    /// Both kernels on the software GPU against the tensor form on the CPU, with and without
    /// a mask, rows longer than a cube (300 keys over 256 units) and shorter (7).
    #[test]
    fn the_kernels_equal_the_tensor_form() {
        for (keys, queries, masked) in [(300, 5, true), (300, 5, false), (7, 7, true)] {
            let r = Rows {
                batch: 2,
                heads: 3,
                queries,
                keys,
            };
            let n = r.count() * keys;
            let scores: Vec<f32> = values(n, 1).iter().map(|v| v * 8.0).collect();
            let dp = values(n, 2);
            let m = masked.then(|| mask(r, 2));
            let scale = 0.3;
            let spec = |backward| Spec {
                backward,
                rows: r,
                scale,
                masked,
            };
            let host_mask = || {
                m.as_ref().map(|m| {
                    Tensor::<Flex, 3>::from_data(
                        TensorData::new(m.clone(), [r.batch, r.queries, r.keys]),
                        &Default::default(),
                    )
                })
            };
            let shape = [r.count(), keys];
            let (want_p, want_lse) = forward(host(&scores, &shape), host_mask(), r, scale);
            let mut inputs = vec![soft_gpu::tensor(&scores, &shape)];
            inputs.extend(
                m.as_ref()
                    .map(|m| soft_gpu::tensor(m, &[r.batch, queries, keys])),
            );
            let got = spec(false).run::<Soft>(inputs);
            let want_lse = floats(want_lse);
            assert!(
                max_rel_diff(&read(&got[0]), &floats(want_p)) < 1e-5,
                "{r:?}"
            );
            assert!(max_rel_diff(&read(&got[1]), &want_lse) < 1e-5, "{r:?}");

            let lse = Tensor::<Flex, 1>::from_floats(want_lse.as_slice(), &Default::default());
            let (want_p, want_ds) = backward(
                host(&scores, &shape),
                host(&dp, &shape),
                host_mask(),
                lse,
                r,
                scale,
            );
            let mut inputs = vec![
                soft_gpu::tensor(&scores, &shape),
                soft_gpu::tensor(&dp, &shape),
                soft_gpu::tensor(&want_lse, &[r.count()]),
            ];
            inputs.extend(
                m.as_ref()
                    .map(|m| soft_gpu::tensor(m, &[r.batch, queries, keys])),
            );
            let got = spec(true).run::<Soft>(inputs);
            assert!(
                max_rel_diff(&read(&got[0]), &floats(want_p)) < 1e-5,
                "{r:?}"
            );
            assert!(
                max_rel_diff(&read(&got[1]), &floats(want_ds)) < 1e-5,
                "{r:?}"
            );
        }
    }
}
