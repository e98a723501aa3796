//! The CPU decoder's arithmetic: weight matrices stored in BF16 when that is lossless (else
//! float32) and multiplied by float32 activations with float32 accumulation, several input
//! rows per pass over a weight row, output rows split over rayon's threads; plus RMSNorm
//! and SwiGLU on slices. AVX2 + FMA when the CPU has them (checked at run time), plain Rust
//! otherwise; both sum in the same blocked order, so they agree to float32 rounding.

use half::bf16;
use rayon::prelude::*;

/// Output rows one rayon task computes: enough work to amortize the task, and a slice of
/// the weight that stays in the core's L2 cache while every input row passes over it.
const ROWS_PER_TASK: usize = 32;

/// Input rows multiplied together against one weight row (one load of the weight row,
/// four dot products).
const INPUT_BLOCK: usize = 4;

/// A weight matrix `[out, in]` in row-major (Hugging Face) layout.
#[derive(Debug, Clone)]
pub enum Matrix {
    /// Every value is exactly a bfloat16: stored as one, half the memory traffic.
    Bf16 {
        /// The values' bfloat16 bits.
        data: Vec<u16>,
        /// Rows (output features).
        rows: usize,
        /// Columns (input features).
        cols: usize,
    },
    /// Values that bfloat16 would round (dequantized NVFP4 weights, say).
    F32 {
        /// The values.
        data: Vec<f32>,
        /// Rows (output features).
        rows: usize,
        /// Columns (input features).
        cols: usize,
    },
}

impl Matrix {
    /// Stores `data` `[rows, cols]` as BF16 when every value survives the round trip, else
    /// as float32.
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Matrix {
        assert_eq!(data.len(), rows * cols, "matrix data and shape disagree");
        let exact = data
            .iter()
            .all(|&v| bf16::from_f32(v).to_f32().to_bits() == v.to_bits());
        if exact {
            let data = data.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
            Matrix::Bf16 { data, rows, cols }
        } else {
            Matrix::F32 { data, rows, cols }
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Matrix::Bf16 { rows, .. } | Matrix::F32 { rows, .. } => *rows,
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Matrix::Bf16 { cols, .. } | Matrix::F32 { cols, .. } => *cols,
        }
    }

    /// Row `r` as float32 (the embedding lookup).
    pub fn row(&self, r: usize) -> Vec<f32> {
        let c = self.cols();
        match self {
            Matrix::Bf16 { data, .. } => data[r * c..(r + 1) * c]
                .iter()
                .map(|&b| bf16::from_bits(b).to_f32())
                .collect(),
            Matrix::F32 { data, .. } => data[r * c..(r + 1) * c].to_vec(),
        }
    }

    /// The dot product of row `o` with `x`.
    fn dot(&self, o: usize, x: &[f32]) -> f32 {
        let c = self.cols();
        match self {
            Matrix::Bf16 { data, .. } => dot_bf16(&data[o * c..(o + 1) * c], x),
            Matrix::F32 { data, .. } => dot_f32(&data[o * c..(o + 1) * c], x),
        }
    }

    /// The dot products of row `o` with four input rows.
    fn dot4(&self, o: usize, xs: [&[f32]; INPUT_BLOCK]) -> [f32; INPUT_BLOCK] {
        let c = self.cols();
        match self {
            Matrix::Bf16 { data, .. } => dot4_bf16(&data[o * c..(o + 1) * c], xs),
            Matrix::F32 { data, .. } => dot4_f32(&data[o * c..(o + 1) * c], xs),
        }
    }

    /// `x · selfᵀ` for `x` `[n, cols]` (row-major): returns `[n, rows]`.
    pub fn matmul_t(&self, x: &[f32], n: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows(), self.cols());
        assert_eq!(x.len(), n * cols, "input rows and matrix width disagree");
        // Computed transposed, `[rows, n]`: each task owns a contiguous run of output rows.
        let mut yt = vec![0f32; rows * n];
        yt.par_chunks_mut(ROWS_PER_TASK * n)
            .enumerate()
            .for_each(|(task, out)| {
                let first = task * ROWS_PER_TASK;
                if n == 1 {
                    for (o, y) in (first..).zip(out.iter_mut()) {
                        *y = self.dot(o, x);
                    }
                    return;
                }
                for r0 in (0..n).step_by(INPUT_BLOCK) {
                    let block = INPUT_BLOCK.min(n - r0);
                    let xs: [&[f32]; INPUT_BLOCK] = std::array::from_fn(|i| {
                        let r = r0 + i.min(block - 1);
                        &x[r * cols..(r + 1) * cols]
                    });
                    for (k, o) in (first..first + out.len() / n).enumerate() {
                        let sums = self.dot4(o, xs);
                        out[k * n + r0..k * n + r0 + block].copy_from_slice(&sums[..block]);
                    }
                }
            });
        if n == 1 {
            return yt;
        }
        let mut y = vec![0f32; n * rows];
        for (o, col) in yt.chunks_exact(n).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                y[r * rows + o] = v;
            }
        }
        y
    }
}

/// Whether the AVX2 + FMA kernels can run here.
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The dot product of a BF16 weight row and an input row (decoding one token).
fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); lengths are checked inside.
        return unsafe { avx2::dot_bf16(w, x) };
    }
    assert_eq!(w.len(), x.len(), "weight row and input row lengths differ");
    w.iter()
        .zip(x)
        .fold(0.0, |s, (&w, &x)| bf16::from_bits(w).to_f32().mul_add(x, s))
}

/// The dot product of two float32 rows (a float32 weight row and an input row, a key and
/// a query).
pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); lengths are checked inside.
        return unsafe { avx2::dot_f32(w, x) };
    }
    assert_eq!(w.len(), x.len(), "weight row and input row lengths differ");
    w.iter().zip(x).fold(0.0, |s, (&w, &x)| w.mul_add(x, s))
}

/// Dot products of one BF16 weight row with four input rows.
fn dot4_bf16(w: &[u16], xs: [&[f32]; INPUT_BLOCK]) -> [f32; INPUT_BLOCK] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); lengths are checked inside.
        return unsafe { avx2::dot4_bf16(w, xs) };
    }
    dot4_portable(w.len(), |i| bf16::from_bits(w[i]).to_f32(), xs)
}

/// Dot products of one float32 weight row with four input rows.
fn dot4_f32(w: &[f32], xs: [&[f32]; INPUT_BLOCK]) -> [f32; INPUT_BLOCK] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); lengths are checked inside.
        return unsafe { avx2::dot4_f32(w, xs) };
    }
    dot4_portable(w.len(), |i| w[i], xs)
}

/// The plain-Rust dot products, summed as the AVX2 path sums: eight lanes per input row,
/// added pairwise at the end, the tail (`len % 8`) last.
fn dot4_portable(
    len: usize,
    w: impl Fn(usize) -> f32,
    xs: [&[f32]; INPUT_BLOCK],
) -> [f32; INPUT_BLOCK] {
    let mut out = [0f32; INPUT_BLOCK];
    for (o, x) in out.iter_mut().zip(xs) {
        assert_eq!(x.len(), len, "weight row and input row lengths differ");
        let mut lanes = [0f32; 8];
        let body = len / 8 * 8;
        for i in (0..body).step_by(8) {
            for (l, lane) in lanes.iter_mut().enumerate() {
                *lane = w(i + l).mul_add(x[i + l], *lane);
            }
        }
        let mut s = horizontal(lanes);
        for (i, &xi) in x.iter().enumerate().skip(body) {
            s = w(i).mul_add(xi, s);
        }
        *o = s;
    }
    out
}

/// Sums eight lanes pairwise: (0+4, 1+5, 2+6, 3+7), then (0+2, 1+3), then 0+1.
fn horizontal(l: [f32; 8]) -> f32 {
    let a = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let b = [a[0] + a[2], a[1] + a[3]];
    b[0] + b[1]
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{horizontal, INPUT_BLOCK};
    use std::arch::x86_64::*;

    /// Eight lanes of a `__m256` as an array.
    #[target_feature(enable = "avx2,fma")]
    fn lanes(v: __m256) -> [f32; 8] {
        let mut out = [0f32; 8];
        // SAFETY: `out` holds eight floats; the store is unaligned.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
        out
    }

    /// Four dot products, `load(i)` giving eight weights from index `i` as float32.
    #[target_feature(enable = "avx2,fma")]
    fn dot4(
        len: usize,
        load: impl Fn(usize) -> __m256,
        tail: impl Fn(usize) -> f32,
        xs: [&[f32]; INPUT_BLOCK],
    ) -> [f32; INPUT_BLOCK] {
        for x in xs {
            assert_eq!(x.len(), len, "weight row and input row lengths differ");
        }
        let body = len / 8 * 8;
        let mut acc = [_mm256_setzero_ps(); INPUT_BLOCK];
        for i in (0..body).step_by(8) {
            let w = load(i);
            for (a, x) in acc.iter_mut().zip(xs) {
                // SAFETY: `i + 8 <= body <= len == x.len()`.
                let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
                *a = _mm256_fmadd_ps(w, xv, *a);
            }
        }
        let mut out = [0f32; INPUT_BLOCK];
        for ((o, a), x) in out.iter_mut().zip(acc).zip(xs) {
            let mut s = horizontal(lanes(a));
            for (i, &xi) in x.iter().enumerate().skip(body) {
                s = tail(i).mul_add(xi, s);
            }
            *o = s;
        }
        out
    }

    /// One dot product, four accumulators (32 values per step) to keep the FMA units busy.
    #[target_feature(enable = "avx2,fma")]
    fn dot(
        len: usize,
        load: impl Fn(usize) -> __m256,
        tail: impl Fn(usize) -> f32,
        x: &[f32],
    ) -> f32 {
        assert_eq!(x.len(), len, "weight row and input row lengths differ");
        let xv = |i: usize| {
            // SAFETY: callers pass `i + 8 <= len == x.len()`.
            unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) }
        };
        let mut acc = [_mm256_setzero_ps(); 4];
        let wide = len / 32 * 32;
        for i in (0..wide).step_by(32) {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(load(i + 8 * k), xv(i + 8 * k), *a);
            }
        }
        let body = len / 8 * 8;
        for i in (wide..body).step_by(8) {
            acc[0] = _mm256_fmadd_ps(load(i), xv(i), acc[0]);
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut s = horizontal(lanes(sum));
        for (i, &xi) in x.iter().enumerate().skip(body) {
            s = tail(i).mul_add(xi, s);
        }
        s
    }

    /// [`super::dot_bf16`] with AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
        dot(
            w.len(),
            |i| bf16x8(w, i),
            |i| f32::from_bits((w[i] as u32) << 16),
            x,
        )
    }

    /// [`super::dot_f32`] with AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        // SAFETY: callers pass `i + 8 <= w.len()`.
        let load = |i: usize| unsafe { _mm256_loadu_ps(w.as_ptr().add(i)) };
        dot(w.len(), load, |i| w[i], x)
    }

    /// Eight BF16 values from `w[i..]` widened to float32 (a BF16 value is the high half of
    /// its float32).
    #[target_feature(enable = "avx2,fma")]
    fn bf16x8(w: &[u16], i: usize) -> __m256 {
        assert!(i + 8 <= w.len(), "eight values from {i} past the row's end");
        // SAFETY: the eight values are inside `w` (checked above); the load is unaligned.
        let h = unsafe { _mm_loadu_si128(w.as_ptr().add(i) as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }

    /// [`super::dot4_bf16`] with AVX2: eight BF16 weights widened to float32 per step.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4_bf16(w: &[u16], xs: [&[f32]; INPUT_BLOCK]) -> [f32; INPUT_BLOCK] {
        dot4(
            w.len(),
            |i| bf16x8(w, i),
            |i| f32::from_bits((w[i] as u32) << 16),
            xs,
        )
    }

    /// [`super::dot4_f32`] with AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4_f32(w: &[f32], xs: [&[f32]; INPUT_BLOCK]) -> [f32; INPUT_BLOCK] {
        // SAFETY: callers pass `i + 8 <= w.len()`.
        let load = |i: usize| unsafe { _mm256_loadu_ps(w.as_ptr().add(i)) };
        dot4(w.len(), load, |i| w[i], xs)
    }
}

/// One key/value head of a sequence's cache: position `j`'s key is
/// `keys[j * head_dim..][..head_dim]`, its value likewise in `values`.
#[derive(Debug, Clone, Copy)]
pub struct KvView<'a> {
    /// Keys `[positions, head_dim]`.
    pub keys: &'a [f32],
    /// Values `[positions, head_dim]`.
    pub values: &'a [f32],
    /// Floats per head.
    pub head_dim: usize,
}

/// Attention of some query heads over a run of positions, not yet normalized (the pieces of
/// one softmax computed apart and joined by [`merge`]): per head, the largest score `m`, the
/// sum of `exp(score − m)` and the sum of `exp(score − m) · value`.
#[derive(Debug, Clone)]
pub struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    out: Vec<f32>,
}

/// [`Partial`] attention of the query heads `qs` (`[heads, head_dim]`, every one reading
/// `kv`) over `positions`, scores `q·k × scale`. Each key and value is read once for all the
/// heads.
pub fn attend(
    qs: &[f32],
    kv: KvView<'_>,
    positions: std::ops::Range<usize>,
    scale: f32,
) -> Partial {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { attend_avx2(qs, kv, positions, scale) };
    }
    attend_with(qs, kv, positions, scale, |k, q| {
        k.iter().zip(q).fold(0.0, |s, (&a, &b)| a.mul_add(b, s))
    })
}

/// [`attend`] compiled for AVX2 + FMA: the AVX2 dot product for the scores, the weighted
/// sums vectorized by the compiler.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    qs: &[f32],
    kv: KvView<'_>,
    positions: std::ops::Range<usize>,
    scale: f32,
) -> Partial {
    // SAFETY: this function runs only where the CPU has AVX2 and FMA.
    attend_with(qs, kv, positions, scale, |k, q| unsafe {
        avx2::dot_f32(k, q)
    })
}

/// [`attend`] with `dot` for the scores.
#[inline(always)]
fn attend_with(
    qs: &[f32],
    kv: KvView<'_>,
    positions: std::ops::Range<usize>,
    scale: f32,
    dot: impl Fn(&[f32], &[f32]) -> f32,
) -> Partial {
    let head_dim = kv.head_dim;
    let heads = qs.len() / head_dim;
    let count = positions.len();
    let at = |j: usize| j * head_dim..(j + 1) * head_dim;
    let mut scores = vec![0f32; heads * count];
    for (i, j) in positions.clone().enumerate() {
        let k = &kv.keys[at(j)];
        for (h, q) in qs.chunks_exact(head_dim).enumerate() {
            scores[h * count + i] = dot(k, q) * scale;
        }
    }
    let (mut max, mut sum) = (vec![f32::NEG_INFINITY; heads], vec![0f32; heads]);
    for ((row, m), total) in scores.chunks_exact_mut(count).zip(&mut max).zip(&mut sum) {
        *m = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        for s in row.iter_mut() {
            *s = (*s - *m).exp();
            *total += *s;
        }
    }
    let mut out = vec![0f32; qs.len()];
    for (i, j) in positions.enumerate() {
        let v = &kv.values[at(j)];
        for (h, o) in out.chunks_exact_mut(head_dim).enumerate() {
            let p = scores[h * count + i];
            for (o, v) in o.iter_mut().zip(v) {
                *o += p * v;
            }
        }
    }
    Partial { max, sum, out }
}

/// Joins the [`Partial`]s of one set of query heads over disjoint runs of positions into
/// their attention output `out` (`[heads, head_dim]`): the softmax over all the positions.
pub fn merge(parts: &[Partial], out: &mut [f32]) {
    let heads = parts[0].max.len();
    let head_dim = out.len() / heads;
    for (h, o) in out.chunks_exact_mut(head_dim).enumerate() {
        let m = parts.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.max[h]));
        let weights: Vec<f32> = parts.iter().map(|p| (p.max[h] - m).exp()).collect();
        let total: f32 = parts.iter().zip(&weights).map(|(p, w)| p.sum[h] * w).sum();
        o.fill(0.0);
        for (p, w) in parts.iter().zip(&weights) {
            for (o, v) in o.iter_mut().zip(&p.out[h * head_dim..(h + 1) * head_dim]) {
                *o += v * w;
            }
        }
        o.iter_mut().for_each(|v| *v /= total);
    }
}

/// RMSNorm of each `width`-wide row of `x` in place, as [`crate::layers::RmsNorm`] computes
/// it in float32: `x / sqrt(mean(x²) + eps) * weight`.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(weight.len()) {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        let inv = 1.0 / (mean_square + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * inv * w;
        }
    }
}

/// SwiGLU: `silu(gate) * up`, for `gate_up` rows holding `[gate | up]` of width
/// `2 * inter`; returns rows of width `inter`.
pub fn swiglu(gate_up: &[f32], inter: usize) -> Vec<f32> {
    gate_up
        .chunks_exact(2 * inter)
        .flat_map(|row| {
            let (gate, up) = row.split_at(inter);
            gate.iter()
                .zip(up)
                .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f64; n * rows];
        for r in 0..n {
            for o in 0..rows {
                y[r * rows + o] = (0..cols)
                    .map(|i| w[o * cols + i] as f64 * x[r * cols + i] as f64)
                    .sum();
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
                (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn storage_is_bf16_only_when_lossless() {
        let exact: Vec<f32> = values(64, 1)
            .iter()
            .map(|&v| bf16::from_f32(v).to_f32())
            .collect();
        assert!(matches!(Matrix::new(exact, 8, 8), Matrix::Bf16 { .. }));
        let mut rounded = values(64, 1);
        rounded[5] = 1.0 + f32::EPSILON;
        let m = Matrix::new(rounded.clone(), 8, 8);
        assert!(matches!(m, Matrix::F32 { .. }));
        assert_eq!(m.row(0), rounded[..8]);
    }

    proptest! {
        #[test]
        fn matmul_matches_a_float64_reference(
            rows in 1usize..80,
            cols in 1usize..70,
            n in 1usize..7,
            seed in 0u32..1000,
            bf in any::<bool>(),
        ) {
            let mut w = values(rows * cols, seed);
            if bf {
                w.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
            }
            let x = values(n * cols, seed + 1);
            let m = Matrix::new(w.clone(), rows, cols);
            let y = m.matmul_t(&x, n);
            let reference = naive(&w, rows, cols, &x, n);
            for (a, b) in y.iter().zip(&reference) {
                prop_assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
            // The portable sums are the AVX2 sums (same blocked order, fused multiply-add).
            let xs: [&[f32]; INPUT_BLOCK] = std::array::from_fn(|i| &x[(i % n) * cols..(i % n + 1) * cols]);
            let portable = dot4_portable(cols, |i| w[i], xs);
            let fast = dot4_f32(&w[..cols], xs);
            prop_assert_eq!(portable, fast);
        }
    }

    /// Softmax attention of one head in float64.
    fn naive_attention(q: &[f32], keys: &[f32], values: &[f32], scale: f32) -> Vec<f32> {
        let d = q.len();
        let scores: Vec<f64> = keys
            .chunks_exact(d)
            .map(|k| {
                k.iter()
                    .zip(q)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let total: f64 = e.iter().sum();
        (0..d)
            .map(|i| {
                e.iter()
                    .zip(values.chunks_exact(d))
                    .map(|(p, v)| p / total * v[i] as f64)
                    .sum::<f64>() as f32
            })
            .collect()
    }

    #[test]
    fn attention_in_pieces_is_the_whole_softmax() {
        let (heads, d, len) = (3, 24, 37);
        let qs = values(heads * d, 5);
        let keys: Vec<f32> = values(len * d, 6).iter().map(|v| v * 8.0).collect();
        let vals = values(len * d, 7);
        let kv = KvView {
            keys: &keys,
            values: &vals,
            head_dim: d,
        };
        let whole = {
            let mut out = vec![0f32; heads * d];
            merge(&[attend(&qs, kv, 0..len, 0.3)], &mut out);
            out
        };
        let mut pieces = vec![0f32; heads * d];
        let parts = [0..5, 5..6, 6..30, 30..len].map(|r| attend(&qs, kv, r, 0.3));
        merge(&parts, &mut pieces);
        for h in 0..heads {
            let reference = naive_attention(&qs[h * d..(h + 1) * d], &keys, &vals, 0.3);
            for (i, r) in reference.iter().enumerate() {
                for got in [whole[h * d + i], pieces[h * d + i]] {
                    assert!((got - r).abs() < 1e-5, "head {h} [{i}]: {got} vs {r}");
                }
            }
        }
    }

    #[test]
    fn rms_norm_and_swiglu_follow_their_formulas() {
        let mut x = vec![3.0, 4.0, 1.0, 1.0];
        rms_norm(&mut x, &[1.0, 2.0], 0.5);
        let (a, b) = (1.0 / (13.0f32).sqrt(), 1.0 / (1.5f32).sqrt());
        assert_eq!(x, [3.0 * a, 4.0 * a * 2.0, b, b * 2.0]);
        let y = swiglu(&[0.0, 2.0, 5.0, 7.0], 2);
        assert_eq!(y, [0.0, 2.0 / (1.0 + (-2.0f32).exp()) * 7.0]);
    }
}
