//! The CubeCL kernel of NVFP4 fake quantization, one unit per 16-element block, one pass
//! over the tensor.
//!
//! Each unit reads its block as two vectors of 8 elements, takes the block amax, computes the
//! FP8 E4M3 block scale (`amax / (6 × weight_scale_2)`, zero → 1.0, clamp `[2^-9, 448]`, round
//! to nearest even) and rounds every element's quotient `x / (scale × weight_scale_2)` to E2M1
//! with ModelOpt's ties. Every constant of the scheme is `qatflow_nvfp4`'s, and the results
//! are bit-identical to its reference codec (`qatflow_nvfp4::codec::fake_quantize`):
//!
//! - The block scale is the codec's arithmetic, operation for operation: one correctly rounded
//!   division (CubeCL emits `/` as IEEE division unless a kernel opts into fast math, which
//!   this one does not) and exact power-of-two scalings; `round` compiles to CUDA's `rint`.
//! - The element quotients are where the time went: an IEEE division per element held the
//!   kernel to about 0.55 of copy bandwidth on an H100. The kernel instead multiplies by the
//!   block's reciprocal `r = 1 / d` (rounded once), which is within 2 units in the last place
//!   of the correctly rounded quotient, and redoes the exact division only where that can
//!   matter: when the approximate quotient lies within 1e-4 of a rounding tie, or is so small
//!   that underflow could change its sign test. Everywhere else both quotients round to the
//!   same E2M1 value (see `grid_point`). `kernels/GPU.md` has the measurements.
//! - E2M1 rounding itself is the grid form of the rule (`qatflow_nvfp4::e2m1::GRID_HALVES_BELOW`):
//!   `rint` of `|q|` scaled by 2 below 2, 1 below 4 and ½ above, which puts ModelOpt's ties
//!   (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5) at half-integers, where ties-to-even picks the even
//!   E2M1 code, as ModelOpt does.
//!
//! The tests of this module replay the same arithmetic on the CPU and compare it with the codec
//! on ties, near-ties, extremes and random blocks; `kernels/tests/conformance.rs` and
//! `examples/gpu_check.rs` compare the kernel itself with the codec on a GPU.

use cubecl::prelude::*;
use qatflow_nvfp4::codec::{BLOCK_SIZE, ZERO_BLOCK_SCALE_VALUE};
use qatflow_nvfp4::e2m1::{
    E2M1_MAX, GRID_HALVES_BELOW, GRID_ONES_BELOW, GRID_SCALE_HALVES, GRID_SCALE_ONES,
    GRID_SCALE_TWOS, SMALLEST_NONZERO_BOUND,
};
use qatflow_nvfp4::fp8::{E4M3_MANTISSA_BITS, E4M3_MAX, E4M3_MIN_NORMAL, E4M3_MIN_POSITIVE};

/// Elements per vector: a block is two vectors.
const VECTOR: usize = 8;
const _: () = assert!(2 * VECTOR == BLOCK_SIZE, "a block is two vectors of 8");

/// Exponent bias of float32 (IEEE 754).
const F32_EXP_BIAS: u32 = 127;

/// Biased float32 exponent of 2^-6, the smallest normal E4M3 binade.
const MIN_NORMAL_BIASED_EXP: u32 = E4M3_MIN_NORMAL.to_bits() >> 23;

/// `eb + INV_QUANTUM_EXP_SUM - eb'`: the biased exponent of `1 / quantum` for a scale of
/// biased exponent `eb` is this minus `eb` (quantum `2^(e - mantissa bits)`).
const INV_QUANTUM_EXP_SUM: u32 = 2 * F32_EXP_BIAS + E4M3_MANTISSA_BITS;

/// Scaled quotients below this are negative non-zero E2M1 values.
const NEGATIVE_BELOW: f32 = -SMALLEST_NONZERO_BOUND;

/// `1 / m` of each E2M1 grid scale `m`: the value of a grid point `k` is `k / m`.
const INV_SCALE_HALVES: f32 = 1.0 / GRID_SCALE_HALVES;
/// See [`INV_SCALE_HALVES`].
const INV_SCALE_ONES: f32 = 1.0 / GRID_SCALE_ONES;
/// See [`INV_SCALE_HALVES`].
const INV_SCALE_TWOS: f32 = 1.0 / GRID_SCALE_TWOS;

/// Distance from a half-integer on the scaled axis below which the exact division decides.
const TIE_WINDOW: f32 = 1e-4;

/// Quotients below this magnitude (about 2^-120) are recomputed exactly, so underflow to zero
/// cannot flip a sign test.
const UNDERFLOW_GUARD: f32 = 7.5e-37;

/// Block reciprocals at or above this are not used (the divisor is tiny or subnormal): the
/// whole block takes the exact division.
const MAX_RECIPROCAL: f32 = 1e30;

/// FP8 block scale (as an f32 value) of a block with `max|x| = block_amax`.
///
/// The E4M3 rounding quantum of a scale `s` in `[2^-9, 448]` is 2^(e-3) in binade
/// `[2^e, 2^(e+1))` and 2^-9 below 2^-5. `s / quantum` is exact, so it is computed as a
/// product with the power-of-two reciprocal.
#[cube]
fn block_scale(block_amax: f32, scale_2: f32) -> f32 {
    let raw = block_amax / (E2M1_MAX * scale_2);
    let s = select(raw == 0.0f32, ZERO_BLOCK_SCALE_VALUE, raw);
    let s = f32::clamp(s, E4M3_MIN_POSITIVE, E4M3_MAX);
    let biased = (u32::reinterpret(s) >> 23u32) & 0xFFu32;
    let eb = select(
        biased < MIN_NORMAL_BIASED_EXP,
        MIN_NORMAL_BIASED_EXP,
        biased,
    );
    let quantum = f32::reinterpret((eb - E4M3_MANTISSA_BITS) << 23u32);
    let inv_quantum = f32::reinterpret((INV_QUANTUM_EXP_SUM - eb) << 23u32);
    f32::round(s * inv_quantum) * quantum
}

/// `max|x|` over the 8 elements of a vector.
#[cube]
fn amax8<F: Float>(x: Vector<F, Const<8>>) -> f32 {
    let mut amax = 0.0f32;
    #[unroll]
    for i in 0..8 {
        amax = f32::max(amax, f32::abs(f32::cast_from(x[i])));
    }
    amax
}

/// The E2M1 grid scale `m` of a magnitude (see the module header).
#[cube]
fn grid_scale(a: f32) -> f32 {
    select(
        a < GRID_HALVES_BELOW,
        GRID_SCALE_HALVES,
        select(a < GRID_ONES_BELOW, GRID_SCALE_ONES, GRID_SCALE_TWOS),
    )
}

/// E2M1 rounding of the quotient `x / d` on the scaled axis. Returns `[k, m, q, 1/m]`: the
/// quotient `q` (the correctly rounded one wherever it can change the result), its grid scale
/// `m` and `k = rint(|q| × m)`. The magnitude value is `min(k / m, 6)`.
///
/// `q ≈ x × r` differs from the correctly rounded quotient by at most about 1.5 × 2^-23 of its
/// value, i.e. less than 2^-20 on the scaled axis below the last tie (5, scaled to 2.5), so
/// the two round alike unless one lies within [`TIE_WINDOW`] of a half-integer. At the switch
/// points of `m` (|q| = 2 and 4) both sides give the same value, so an approximate `q` on the
/// other side of one is harmless.
#[cube]
fn grid_point(x: f32, d: f32, r: f32, exact_only: bool) -> Vector<f32, Const<4>> {
    let mut q = x * r;
    let a = f32::abs(q);
    let mut m = grid_scale(a);
    let z = a * m;
    let mut k = f32::round(z);
    let near_tie = f32::abs(z - k) >= 0.5f32 - TIE_WINDOW;
    let underflow = x != 0.0f32 && a < UNDERFLOW_GUARD;
    if exact_only || near_tie || underflow {
        q = x / d;
        let a = f32::abs(q);
        m = grid_scale(a);
        k = f32::round(a * m);
    }
    let mut out = Vector::<f32, Const<4>>::empty();
    out[0] = k;
    out[1] = m;
    out[2] = q;
    out[3] = select(
        m == GRID_SCALE_HALVES,
        INV_SCALE_HALVES,
        select(m == GRID_SCALE_ONES, INV_SCALE_ONES, INV_SCALE_TWOS),
    );
    out
}

/// Divisor `d = scale × weight_scale_2` of a block, its reciprocal, and whether the block must
/// use the exact division throughout (element 2, 1.0 or 0.0).
#[cube]
fn divisor(scale: f32, scale_2: f32) -> Vector<f32, Const<4>> {
    let d = scale * scale_2;
    let r = 1.0f32 / d;
    let mut out = Vector::<f32, Const<4>>::empty();
    out[0] = d;
    out[1] = r;
    out[2] = select(r < MAX_RECIPROCAL, 0.0f32, 1.0f32);
    out[3] = 0.0f32;
    out
}

/// Fake-quantized values of 8 elements of a block with divisor `d`.
#[cube]
fn fake_quantize8<F: Float>(
    x: Vector<F, Const<8>>,
    div: Vector<f32, Const<4>>,
) -> Vector<F, Const<8>> {
    let d = div[0];
    let mut out = Vector::<F, Const<8>>::empty();
    #[unroll]
    for i in 0..8 {
        let g = grid_point(f32::cast_from(x[i]), d, div[1], div[2] != 0.0f32);
        let v = f32::min(g[0] * g[3], E2M1_MAX);
        // Only quotients beyond the first bound are non-zero; zero results stay +0.0 like
        // the codec's.
        out[i] = F::cast_from(select(g[2] < NEGATIVE_BELOW, -v, v) * d);
    }
    out
}

/// Fake quantization: `output = dequantize(quantize(input))`, blocks of 16 along the flat
/// (row-major) tensor, i.e. along the last dimension when it is a multiple of 16.
///
/// `input` and `output` are viewed as vectors of 8 elements: block `b` is vectors `2b, 2b+1`.
#[cube(launch_unchecked)]
pub fn fake_quantize_kernel<F: Float>(
    input: &Array<Vector<F, Const<8>>>,
    output: &mut Array<Vector<F, Const<8>>>,
    scale_2: f32,
    num_blocks: u32,
) {
    let block = ABSOLUTE_POS;
    if block >= num_blocks as usize {
        terminate!();
    }
    let lo = input[2 * block];
    let hi = input[2 * block + 1];
    let scale = block_scale(f32::max(amax8::<F>(lo), amax8::<F>(hi)), scale_2);
    let div = divisor(scale, scale_2);
    output[2 * block] = fake_quantize8::<F>(lo, div);
    output[2 * block + 1] = fake_quantize8::<F>(hi, div);
}

/// Plain copy of `u32` words, the bandwidth reference of the GPU benchmark.
#[cube(launch_unchecked)]
pub fn copy_kernel(
    input: &Array<Vector<u32, Const<4>>>,
    output: &mut Array<Vector<u32, Const<4>>>,
    len: u32,
) {
    let i = ABSOLUTE_POS;
    if i >= len as usize {
        terminate!();
    }
    output[i] = input[i];
}

#[cfg(test)]
mod tests {
    //! The kernel's arithmetic replayed in Rust (every step the same IEEE float32 operation),
    //! against the reference codec.

    use super::{
        BLOCK_SIZE, E2M1_MAX, E4M3_MANTISSA_BITS, E4M3_MAX, E4M3_MIN_POSITIVE, GRID_HALVES_BELOW,
        GRID_ONES_BELOW, GRID_SCALE_HALVES, GRID_SCALE_ONES, GRID_SCALE_TWOS, INV_QUANTUM_EXP_SUM,
        INV_SCALE_HALVES, INV_SCALE_ONES, INV_SCALE_TWOS, MAX_RECIPROCAL, MIN_NORMAL_BIASED_EXP,
        NEGATIVE_BELOW, TIE_WINDOW, UNDERFLOW_GUARD, ZERO_BLOCK_SCALE_VALUE,
    };
    use proptest::prelude::*;
    use qatflow_nvfp4::codec;
    use qatflow_nvfp4::e2m1::{E2M1_BOUNDS, E2M1_VALUES};

    fn block_scale(block_amax: f32, scale_2: f32) -> f32 {
        let raw = block_amax / (E2M1_MAX * scale_2);
        let s = if raw == 0.0 {
            ZERO_BLOCK_SCALE_VALUE
        } else {
            raw
        };
        let s = s.clamp(E4M3_MIN_POSITIVE, E4M3_MAX);
        let eb = ((s.to_bits() >> 23) & 0xFF).max(MIN_NORMAL_BIASED_EXP);
        let quantum = f32::from_bits((eb - E4M3_MANTISSA_BITS) << 23);
        let inv_quantum = f32::from_bits((INV_QUANTUM_EXP_SUM - eb) << 23);
        (s * inv_quantum).round_ties_even() * quantum
    }

    fn grid_scale(a: f32) -> f32 {
        if a < GRID_HALVES_BELOW {
            GRID_SCALE_HALVES
        } else if a < GRID_ONES_BELOW {
            GRID_SCALE_ONES
        } else {
            GRID_SCALE_TWOS
        }
    }

    /// The value of one element, as `grid_point` + `fake_quantize8` compute it.
    fn element(x: f32, d: f32, r: f32, exact_only: bool) -> f32 {
        let mut q = x * r;
        let a = q.abs();
        let mut m = grid_scale(a);
        let z = a * m;
        let mut k = z.round_ties_even();
        let near_tie = (z - k).abs() >= 0.5 - TIE_WINDOW;
        let underflow = x != 0.0 && a < UNDERFLOW_GUARD;
        if exact_only || near_tie || underflow {
            q = x / d;
            m = grid_scale(q.abs());
            k = (q.abs() * m).round_ties_even();
        }
        let inv = if m == GRID_SCALE_HALVES {
            INV_SCALE_HALVES
        } else if m == GRID_SCALE_ONES {
            INV_SCALE_ONES
        } else {
            INV_SCALE_TWOS
        };
        let v = (k * inv).min(E2M1_MAX);
        (if q < NEGATIVE_BELOW { -v } else { v }) * d
    }

    /// Checks one block against `codec::quantize_block` and `codec::fake_quantize_block`.
    fn check_block(block: &[f32; BLOCK_SIZE], scale_2: f32) -> Result<(), String> {
        let amax = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let scale = block_scale(amax, scale_2);
        let d = scale * scale_2;
        let r = 1.0 / d;
        let exact_only = r >= MAX_RECIPROCAL;
        let mut codes = [0u8; BLOCK_SIZE];
        let want_byte = codec::quantize_block(block, scale_2, &mut codes);
        let mut want_values = *block;
        codec::fake_quantize_block(&mut want_values, scale_2);
        let want_scale = qatflow_nvfp4::fp8::decode(want_byte);
        if scale.to_bits() != want_scale.to_bits() {
            return Err(format!("scale {scale} != {want_scale} for amax {amax}"));
        }
        for (i, &x) in block.iter().enumerate() {
            let value = element(x, d, r, exact_only);
            if value.to_bits() != want_values[i].to_bits() {
                return Err(format!(
                    "x = {x:e} (bits {:#x}), d = {d:e}: value {value:e}, codec {:e}",
                    x.to_bits(),
                    want_values[i]
                ));
            }
        }
        Ok(())
    }

    /// Every E4M3 scale value that a block can get.
    fn e4m3_scales() -> Vec<f32> {
        (1u8..=0x7E)
            .map(qatflow_nvfp4::fp8::decode)
            .filter(|s| *s >= E4M3_MIN_POSITIVE)
            .collect()
    }

    #[test]
    fn ties_and_their_neighbours_round_like_the_codec() {
        let points: Vec<f32> = E2M1_BOUNDS
            .iter()
            .chain(E2M1_VALUES.iter())
            .copied()
            .chain([2.0, 4.0, 5.5, 6.5, 7.0, 12.0])
            .collect();
        let mut checked = 0usize;
        for scale_2 in [1.0f32, 0.37, 3.1e-3, 1.7e-9, 2.9e4] {
            for s in e4m3_scales() {
                // A block whose amax makes the block scale exactly `s`.
                let d = s * scale_2;
                for &p in &points {
                    let mut block = [0.0f32; BLOCK_SIZE];
                    block[0] = 6.0 * d;
                    for (j, ulps) in (-7i32..=7).enumerate() {
                        let t = p * d;
                        let x = f32::from_bits((t.to_bits() as i32 + ulps).max(0) as u32);
                        block[1 + j] = if j % 2 == 0 { x } else { -x };
                    }
                    check_block(&block, scale_2).unwrap();
                    checked += 1;
                }
            }
        }
        assert!(checked > 10_000, "{checked} blocks");
    }

    #[test]
    fn zeros_subnormals_and_extremes_round_like_the_codec() {
        let specials = [
            0.0f32,
            -0.0,
            f32::from_bits(1),
            -f32::from_bits(1),
            1e-40,
            -3e-39,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            1e-30,
            -2.5e-20,
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        for scale_2 in [
            1.0f32,
            1e-38,
            3e-42,
            1.2e-30,
            5e35,
            codec::weight_scale_2("w", 2688.0).unwrap(),
        ] {
            for &big in &[0.0f32, 1e-30, 1.0, 448.0, 3e38] {
                let mut block = [0.0f32; BLOCK_SIZE];
                block[0] = big;
                block[1..1 + specials.len()].copy_from_slice(&specials);
                block[15] = -big;
                check_block(&block, scale_2).unwrap();
            }
        }
    }

    proptest! {
        #[test]
        fn random_blocks_round_like_the_codec(
            mantissas in proptest::collection::vec(-1.0f32..1.0, BLOCK_SIZE),
            exponents in proptest::collection::vec(-30i32..30, BLOCK_SIZE),
            amax_factor in 0.01f32..100.0,
        ) {
            let mut block = [0.0f32; BLOCK_SIZE];
            for (i, b) in block.iter_mut().enumerate() {
                *b = mantissas[i] * 2f32.powi(exponents[i] / 6);
            }
            let amax = block.iter().fold(0.0f32, |m, x| m.max(x.abs())) * amax_factor;
            prop_assume!(amax > 0.0);
            let scale_2 = codec::weight_scale_2("w", amax).unwrap();
            check_block(&block, scale_2).map_err(TestCaseError::fail)?;
        }

        #[test]
        fn any_finite_bits_round_like_the_codec(
            bits in proptest::collection::vec(any::<u32>(), BLOCK_SIZE),
            amax_bits in 0x0A00_0000u32..0x7F00_0000,
        ) {
            let mut block = [0.0f32; BLOCK_SIZE];
            for (b, v) in block.iter_mut().zip(&bits) {
                let x = f32::from_bits(*v);
                *b = if x.is_finite() { x } else { 1.0 };
            }
            let scale_2 = codec::weight_scale_2("w", f32::from_bits(amax_bits)).unwrap();
            check_block(&block, scale_2).map_err(TestCaseError::fail)?;
        }
    }
}
