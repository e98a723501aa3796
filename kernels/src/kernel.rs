//! CubeCL kernels for NVFP4 weights, one unit per 16-element block, one pass over the tensor.
//!
//! Each unit reads its block as two vectors of 8 elements, takes the block amax, computes the
//! FP8 E4M3 block scale (`amax / (6 × weight_scale_2)`, zero → 1.0, clamp `[2^-9, 448]`, round
//! to nearest even), then rounds `x / (scale × weight_scale_2)` to E2M1 with ModelOpt's ties.
//! The arithmetic is the reference codec's, operation for operation (`qatflow_nvfp4::codec`),
//! so results are bit-identical: every step is a single IEEE float32 operation (CubeCL emits
//! `/` as a correctly rounded division unless a kernel opts into fast math, which these do not)
//! and `round` compiles to CUDA's `rint` (ties to even).

use cubecl::prelude::*;

/// Biased float32 exponent of 2^-6, the smallest normal E4M3 binade.
const MIN_NORMAL_BIASED_EXP: u32 = 121;

/// E4M3 rounding quantum of a block scale `s` in `[2^-9, 448]` (element 0, as float32 bits) and
/// the base of its byte (element 1). The quantum is 2^(e-3) in binade `[2^e, 2^(e+1))` and 2^-9
/// below 2^-5; the byte is `8 × (e + 6) + round(s / quantum)`, the mantissa carry falling into
/// the exponent field by itself.
#[cube]
fn e4m3_quantum_base(s: f32) -> Vector<u32, Const<2>> {
    let biased = (u32::reinterpret(s) >> 23u32) & 0xFFu32;
    let eb = select(
        biased < MIN_NORMAL_BIASED_EXP,
        MIN_NORMAL_BIASED_EXP,
        biased,
    );
    let mut out = Vector::<u32, Const<2>>::empty();
    out[0] = (eb - 3u32) << 23u32;
    out[1] = (eb - MIN_NORMAL_BIASED_EXP) * 8u32;
    out
}

/// FP8 block scale of a block with `max|x| = block_amax`: returns the scale's float value in
/// element 0 (as bits) and its E4M3 byte in element 1.
#[cube]
fn block_scale(block_amax: f32, scale_2: f32) -> Vector<u32, Const<2>> {
    let raw = block_amax / (6.0f32 * scale_2);
    let s = select(raw == 0.0f32, 1.0f32, raw);
    let s = f32::clamp(s, 0.001953125f32, 448.0f32);
    let qb = e4m3_quantum_base(s);
    let quantum = f32::reinterpret(qb[0]);
    let m = f32::round(s / quantum);
    let mut out = Vector::<u32, Const<2>>::empty();
    out[0] = u32::reinterpret(m * quantum);
    out[1] = qb[1] + u32::cast_from(m);
    out
}

/// E2M1 magnitude code (0..=7) of `|y|` under ModelOpt's rule.
#[cube]
fn e2m1_magnitude_code(a: f32) -> u32 {
    select(a > 0.25f32, 1u32, 0u32)
        + select(a >= 0.75f32, 1u32, 0u32)
        + select(a > 1.25f32, 1u32, 0u32)
        + select(a >= 1.75f32, 1u32, 0u32)
        + select(a > 2.5f32, 1u32, 0u32)
        + select(a >= 3.5f32, 1u32, 0u32)
        + select(a > 5.0f32, 1u32, 0u32)
}

/// E2M1 magnitude value of `|y|` under ModelOpt's rule (sum of the rounding steps).
#[cube]
fn e2m1_magnitude_value(a: f32) -> f32 {
    select(a > 0.25f32, 0.5f32, 0.0f32)
        + select(a >= 0.75f32, 0.5f32, 0.0f32)
        + select(a > 1.25f32, 0.5f32, 0.0f32)
        + select(a >= 1.75f32, 0.5f32, 0.0f32)
        + select(a > 2.5f32, 1.0f32, 0.0f32)
        + select(a >= 3.5f32, 1.0f32, 0.0f32)
        + select(a > 5.0f32, 2.0f32, 0.0f32)
}

/// `max|x|` over the two 8-element halves of a block.
#[cube]
fn block_amax<F: Float>(lo: Vector<F, Const<8>>, hi: Vector<F, Const<8>>) -> f32 {
    let mut amax = 0.0f32;
    #[unroll]
    for i in 0..8 {
        amax = f32::max(amax, f32::abs(f32::cast_from(lo[i])));
        amax = f32::max(amax, f32::abs(f32::cast_from(hi[i])));
    }
    amax
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
    let scale = block_scale(block_amax::<F>(lo, hi), scale_2);
    let divisor = f32::reinterpret(scale[0]) * scale_2;
    let mut out_lo = Vector::<F, Const<8>>::empty();
    let mut out_hi = Vector::<F, Const<8>>::empty();
    #[unroll]
    for i in 0..8 {
        let y = f32::cast_from(lo[i]) / divisor;
        let v = e2m1_magnitude_value(f32::abs(y));
        // Non-zero results have |y| > 0.25; zero results stay +0.0 like the codec's.
        out_lo[i] = F::cast_from(select(y < -0.25f32, -v, v) * divisor);
        let y = f32::cast_from(hi[i]) / divisor;
        let v = e2m1_magnitude_value(f32::abs(y));
        out_hi[i] = F::cast_from(select(y < -0.25f32, -v, v) * divisor);
    }
    output[2 * block] = out_lo;
    output[2 * block + 1] = out_hi;
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
    let scale = block_scale(block_amax::<F>(lo, hi), scale_2);
    let divisor = f32::reinterpret(scale[0]) * scale_2;
    let mut word_lo = 0u32;
    let mut word_hi = 0u32;
    let mut shift = 0u32;
    #[unroll]
    for i in 0..8 {
        let y = f32::cast_from(lo[i]) / divisor;
        let code = e2m1_magnitude_code(f32::abs(y)) + select(y < 0.0f32, 8u32, 0u32);
        word_lo |= code << shift;
        let y = f32::cast_from(hi[i]) / divisor;
        let code = e2m1_magnitude_code(f32::abs(y)) + select(y < 0.0f32, 8u32, 0u32);
        word_hi |= code << shift;
        shift += 4u32;
    }
    packed[2 * block] = word_lo;
    packed[2 * block + 1] = word_hi;
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
