//! CubeCL kernels for NVFP4 weights, one unit per 16-element block, one pass over the tensor.
//!
//! Each unit reads its block as two vectors of 8 elements, takes the block amax, computes the
//! FP8 E4M3 block scale (`amax / (6 × weight_scale_2)`, zero → 1.0, clamp `[2^-9, 448]`, round
//! to nearest even) and rounds every element's quotient `x / (scale × weight_scale_2)` to E2M1
//! with ModelOpt's ties. Results are bit-identical to the reference codec
//! (`qatflow_nvfp4::codec`):
//!
//! - The block scale is the codec's arithmetic, operation for operation: one correctly rounded
//!   division (CubeCL emits `/` as IEEE division unless a kernel opts into fast math, which
//!   these do not) and exact power-of-two scalings; `round` compiles to CUDA's `rint`.
//! - The element quotients are where the time went: an IEEE division per element held the
//!   kernels to about 0.55 of copy bandwidth on an H100. The kernels instead multiply by the
//!   block's reciprocal `r = 1 / d` (rounded once), which is within 2 units in the last place
//!   of the correctly rounded quotient, and redo the exact division only where that can
//!   matter: when the approximate quotient lies within 1e-4 of a rounding tie, or is so small
//!   that underflow could change its sign test. Everywhere else both quotients round to the
//!   same E2M1 value (see `grid_point`). `kernels/GPU.md` has the measurements.
//! - E2M1 rounding itself is `rint` on a power-of-two grid: `|q| × m` with `m = 2` below 2,
//!   `1` below 4 and `½` above puts ModelOpt's ties (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5) at
//!   half-integers, where ties-to-even picks the even E2M1 code, as ModelOpt does.
//!
//! The tests of this module replay the same arithmetic on the CPU and compare it with the codec
//! on ties, near-ties, extremes and random blocks; `examples/gpu_check.rs` compares the kernels
//! themselves with the codec on a GPU.

use cubecl::prelude::*;

/// Biased float32 exponent of 2^-6, the smallest normal E4M3 binade.
const MIN_NORMAL_BIASED_EXP: u32 = 121;

/// Distance from a half-integer on the scaled axis below which the exact division decides.
const TIE_WINDOW: f32 = 1e-4;

/// Quotients below this magnitude (about 2^-120) are recomputed exactly, so underflow to zero
/// cannot flip a sign test.
const UNDERFLOW_GUARD: f32 = 7.5e-37;

/// Block reciprocals at or above this are not used (the divisor is tiny or subnormal): the
/// whole block takes the exact division.
const MAX_RECIPROCAL: f32 = 1e30;

/// FP8 block scale of a block with `max|x| = block_amax`: returns the scale's float value in
/// element 0 (as bits) and its E4M3 byte in element 1.
///
/// The E4M3 rounding quantum of a scale `s` in `[2^-9, 448]` is 2^(e-3) in binade
/// `[2^e, 2^(e+1))` and 2^-9 below 2^-5; the byte is `8 × (e + 6) + round(s / quantum)`, the
/// mantissa carry falling into the exponent field by itself. `s / quantum` is exact, so it is
/// computed as a product with the power-of-two reciprocal.
#[cube]
fn block_scale(block_amax: f32, scale_2: f32) -> Vector<u32, Const<2>> {
    let raw = block_amax / (6.0f32 * scale_2);
    let s = select(raw == 0.0f32, 1.0f32, raw);
    let s = f32::clamp(s, 0.001953125f32, 448.0f32);
    let biased = (u32::reinterpret(s) >> 23u32) & 0xFFu32;
    let eb = select(
        biased < MIN_NORMAL_BIASED_EXP,
        MIN_NORMAL_BIASED_EXP,
        biased,
    );
    let quantum = f32::reinterpret((eb - 3u32) << 23u32);
    let inv_quantum = f32::reinterpret((257u32 - eb) << 23u32);
    let m = f32::round(s * inv_quantum);
    let mut out = Vector::<u32, Const<2>>::empty();
    out[0] = u32::reinterpret(m * quantum);
    out[1] = (eb - MIN_NORMAL_BIASED_EXP) * 8u32 + u32::cast_from(m);
    out
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

/// E2M1 rounding of the quotient `x / d` on the scaled axis. Returns `[k, m, q, 1/m]`: the
/// quotient `q` (the correctly rounded one wherever it can change the result), its grid scale
/// `m` and `k = rint(|q| × m)`. The magnitude code is `min(k + {0, 2, 4}[m = 2, 1, ½], 7)` and
/// the magnitude value `min(k / m, 6)`.
///
/// `q ≈ x × r` differs from the correctly rounded quotient by at most about 1.5 × 2^-23 of its
/// value, i.e. less than 2^-20 on the scaled axis below the last tie (5, scaled to 2.5), so
/// the two round alike unless one lies within [`TIE_WINDOW`] of a half-integer. At the switch
/// points of `m` (|q| = 2 and 4) both sides give the same code, so an approximate `q` on the
/// other side of one is harmless.
#[cube]
fn grid_point(x: f32, d: f32, r: f32, exact_only: bool) -> Vector<f32, Const<4>> {
    let mut q = x * r;
    let a = f32::abs(q);
    let mut m = select(a < 2.0f32, 2.0f32, select(a < 4.0f32, 1.0f32, 0.5f32));
    let z = a * m;
    let mut k = f32::round(z);
    let near_tie = f32::abs(z - k) >= 0.5f32 - TIE_WINDOW;
    let underflow = x != 0.0f32 && a < UNDERFLOW_GUARD;
    if exact_only || near_tie || underflow {
        q = x / d;
        let a = f32::abs(q);
        m = select(a < 2.0f32, 2.0f32, select(a < 4.0f32, 1.0f32, 0.5f32));
        k = f32::round(a * m);
    }
    let mut out = Vector::<f32, Const<4>>::empty();
    out[0] = k;
    out[1] = m;
    out[2] = q;
    out[3] = select(m == 2.0f32, 0.5f32, select(m == 1.0f32, 1.0f32, 2.0f32));
    out
}

/// Divisor `d = scale × weight_scale_2` of a block, its reciprocal, and whether the block must
/// use the exact division throughout (element 2, 1.0 or 0.0).
#[cube]
fn divisor(scale_bits: u32, scale_2: f32) -> Vector<f32, Const<4>> {
    let d = f32::reinterpret(scale_bits) * scale_2;
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
        let v = f32::min(g[0] * g[3], 6.0f32);
        // Non-zero results have |q| > 0.25; zero results stay +0.0 like the codec's.
        out[i] = F::cast_from(select(g[2] < -0.25f32, -v, v) * d);
    }
    out
}

/// E2M1 codes of 8 elements of a block with divisor `d`, element `i` in bits `4i..4i+4`.
#[cube]
fn codes8<F: Float>(x: Vector<F, Const<8>>, div: Vector<f32, Const<4>>) -> u32 {
    let mut word = 0u32;
    let mut shift = 0u32;
    #[unroll]
    for i in 0..8 {
        let g = grid_point(f32::cast_from(x[i]), div[0], div[1], div[2] != 0.0f32);
        let offset = select(
            g[1] == 2.0f32,
            0.0f32,
            select(g[1] == 1.0f32, 2.0f32, 4.0f32),
        );
        let magnitude = u32::cast_from(f32::min(g[0] + offset, 7.0f32));
        word |= (magnitude + select(g[2] < 0.0f32, 8u32, 0u32)) << shift;
        shift += 4u32;
    }
    word
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
    let div = divisor(scale[0], scale_2);
    output[2 * block] = fake_quantize8::<F>(lo, div);
    output[2 * block + 1] = fake_quantize8::<F>(hi, div);
}

/// Export quantization: packed E2M1 codes (two `u32` words per block, element `i` of the block
/// in bits `4i..4i+4` of the little-endian pair, i.e. even elements in low nibbles) and one FP8
/// E4M3 scale byte per block.
#[cube(launch_unchecked)]
pub fn quantize_kernel<F: Float>(
    input: &Array<Vector<F, Const<8>>>,
    packed: &mut Array<u32>,
    scales: &mut Array<u8>,
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
    let div = divisor(scale[0], scale_2);
    packed[2 * block] = codes8::<F>(lo, div);
    packed[2 * block + 1] = codes8::<F>(hi, div);
    scales[block] = u8::cast_from(scale[1]);
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
    //! The kernels' arithmetic replayed in Rust (every step the same IEEE float32 operation),
    //! against the reference codec.

    use super::{MAX_RECIPROCAL, MIN_NORMAL_BIASED_EXP, TIE_WINDOW, UNDERFLOW_GUARD};
    use proptest::prelude::*;
    use qatflow_nvfp4::codec::{self, BLOCK_SIZE};
    use qatflow_nvfp4::e2m1::{E2M1_BOUNDS, E2M1_VALUES};

    fn block_scale(block_amax: f32, scale_2: f32) -> (f32, u8) {
        let raw = block_amax / (6.0 * scale_2);
        let s = if raw == 0.0 { 1.0 } else { raw };
        let s = s.clamp(0.001953125, 448.0);
        let eb = ((s.to_bits() >> 23) & 0xFF).max(MIN_NORMAL_BIASED_EXP);
        let quantum = f32::from_bits((eb - 3) << 23);
        let inv_quantum = f32::from_bits((257 - eb) << 23);
        let m = (s * inv_quantum).round_ties_even();
        (
            m * quantum,
            ((eb - MIN_NORMAL_BIASED_EXP) * 8 + m as u32) as u8,
        )
    }

    /// `(code, value)` of one element, as `grid_point` + `codes8` / `fake_quantize8` compute it.
    fn element(x: f32, d: f32, r: f32, exact_only: bool) -> (u8, f32) {
        let grid = |a: f32| {
            if a < 2.0 {
                2.0
            } else if a < 4.0 {
                1.0
            } else {
                0.5
            }
        };
        let mut q = x * r;
        let a = q.abs();
        let mut m = grid(a);
        let z = a * m;
        let mut k = z.round_ties_even();
        let near_tie = (z - k).abs() >= 0.5 - TIE_WINDOW;
        let underflow = x != 0.0 && a < UNDERFLOW_GUARD;
        if exact_only || near_tie || underflow {
            q = x / d;
            m = grid(q.abs());
            k = (q.abs() * m).round_ties_even();
        }
        let inv = 1.0 / m;
        let offset = if m == 2.0 {
            0.0
        } else if m == 1.0 {
            2.0
        } else {
            4.0
        };
        let code = (k + offset).min(7.0) as u8 + if q < 0.0 { 8 } else { 0 };
        let v = (k * inv).min(6.0);
        (code, if q < -0.25 { -v } else { v } * d)
    }

    /// Checks one block against `codec::quantize_block` and `codec::fake_quantize_block`.
    fn check_block(block: &[f32; BLOCK_SIZE], scale_2: f32) -> Result<(), String> {
        let amax = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let (scale, byte) = block_scale(amax, scale_2);
        let d = scale * scale_2;
        let r = 1.0 / d;
        let exact_only = r >= MAX_RECIPROCAL;
        let mut want_codes = [0u8; BLOCK_SIZE];
        let want_byte = codec::quantize_block(block, scale_2, &mut want_codes);
        let mut want_values = *block;
        codec::fake_quantize_block(&mut want_values, scale_2);
        if byte != want_byte {
            return Err(format!("scale byte {byte} != {want_byte} for amax {amax}"));
        }
        for (i, &x) in block.iter().enumerate() {
            let (code, value) = element(x, d, r, exact_only);
            if code != want_codes[i] || value.to_bits() != want_values[i].to_bits() {
                return Err(format!(
                    "x = {x:e} (bits {:#x}), d = {d:e}: code {code} value {value:e}, codec {} {:e}",
                    x.to_bits(),
                    want_codes[i],
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
            .filter(|s| *s >= 0.001953125)
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
