//! The vectorized CPU variant of [`crate::codec::quantize`]: NVFP4 quantization of whole rows
//! straight from a tensor's raw little-endian bytes (BF16, F16 or F32), block by block with no
//! per-element allocation, written so that the compiler vectorizes it (and built for AVX2
//! where the CPU has it). The exporter's hot path.
//!
//! The block math is the codec's ([`codec::block_scale`], the branch-free [`e2m1::code`] of
//! the E2M1 rule, the same divisor); the tests check that the output is byte-identical to
//! [`codec::quantize`].

use std::sync::OnceLock;

use safetensors::Dtype;

use crate::{codec, e2m1, fp8};

const BLOCK: usize = codec::BLOCK_SIZE;

/// Decoded value of every FP8 E4M3FN byte (the table of [`fp8::decode`]).
fn fp8_values() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| fp8::decode(i as u8)))
}

/// A source element type read from little-endian bytes.
trait Source {
    /// Bytes per element.
    const WIDTH: usize;
    /// One element (`bytes.len() == WIDTH`) as f32 (exact).
    fn element(bytes: &[u8]) -> f32;
    /// The 16 elements of one block (`bytes.len() == 16 × WIDTH`) as f32 (exact).
    #[inline(always)]
    fn load(bytes: &[u8]) -> [f32; BLOCK] {
        let mut out = [0f32; BLOCK];
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(Self::WIDTH)) {
            *o = Self::element(b);
        }
        out
    }
}

struct Bf16;
struct F16;
struct F32;

impl Source for Bf16 {
    const WIDTH: usize = 2;
    #[inline(always)]
    fn element(b: &[u8]) -> f32 {
        f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
    }
}

impl Source for F16 {
    const WIDTH: usize = 2;
    #[inline(always)]
    fn element(b: &[u8]) -> f32 {
        half::f16::from_le_bytes([b[0], b[1]]).to_f32()
    }
}

impl Source for F32 {
    const WIDTH: usize = 4;
    #[inline(always)]
    fn element(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// Squared error and squared source of the quantized elements: `(Σ(dequantized − x)², Σx²)`.
pub type ErrorSums = (f64, f64);

/// A NaN or infinite element: its index within the source and its value.
pub type NonFinite = (usize, f32);

/// [`quantize_blocks`] compiled for AVX2 where the CPU has it (the same IEEE operations in
/// the same order, so the same bytes; only wider registers), else as is.
fn quantize_with<S: Source>(
    src: &[u8],
    scale_2: f32,
    packed: &mut [u8],
    scales: &mut [u8],
) -> Result<ErrorSums, NonFinite> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { quantize_avx2::<S>(src, scale_2, packed, scales) };
    }
    quantize_blocks::<S>(src, scale_2, packed, scales)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2<S: Source>(
    src: &[u8],
    scale_2: f32,
    packed: &mut [u8],
    scales: &mut [u8],
) -> Result<ErrorSums, NonFinite> {
    quantize_blocks::<S>(src, scale_2, packed, scales)
}

#[inline(always)]
fn quantize_blocks<S: Source>(
    src: &[u8],
    scale_2: f32,
    packed: &mut [u8],
    scales: &mut [u8],
) -> Result<ErrorSums, NonFinite> {
    let table = fp8_values();
    let (mut err, mut reference) = (0f64, 0f64);
    let blocks = src
        .chunks_exact(BLOCK * S::WIDTH)
        .zip(packed.chunks_exact_mut(BLOCK / 2))
        .zip(scales.iter_mut());
    for (b, ((bytes, out), scale)) in blocks.enumerate() {
        let x = S::load(bytes);
        let mut amax = 0f32;
        let mut finite = true;
        for v in x {
            amax = amax.max(v.abs());
            finite &= v.is_finite();
        }
        if !finite {
            let i = x
                .iter()
                .position(|v| !v.is_finite())
                .expect("one is not finite");
            return Err((b * BLOCK + i, x[i]));
        }
        let s = codec::block_scale(amax, scale_2);
        *scale = s;
        let step = table[usize::from(s)] * scale_2;
        let mut codes = [0u32; BLOCK];
        for (c, v) in codes.iter_mut().zip(x) {
            *c = e2m1::code(v / step);
        }
        for (o, pair) in out.iter_mut().zip(codes.chunks_exact(2)) {
            *o = (pair[0] | (pair[1] << 4)) as u8;
        }
        let mut dequantized = [0f32; BLOCK];
        for (d, c) in dequantized.iter_mut().zip(codes) {
            *d = e2m1::E2M1_VALUES[c as usize] * step;
        }
        for (d, v) in dequantized.iter().zip(x) {
            err += f64::from(d - v) * f64::from(d - v);
            reference += f64::from(v) * f64::from(v);
        }
    }
    Ok((err, reference))
}

/// Quantizes the raw little-endian elements `src` (of `dtype`; whole blocks) with the global
/// scale `scale_2` (from [`codec::weight_scale_2`]) into `packed` (`n / 2` bytes) and
/// `scales` (`n / 16` FP8 bytes), exactly as [`codec::quantize`] does. Returns the error
/// sums, or the first NaN or infinite element.
///
/// # Panics
/// If `dtype` is not BF16, F16 or F32, or the buffers do not fit `src`.
pub fn quantize_bytes(
    dtype: Dtype,
    src: &[u8],
    scale_2: f32,
    packed: &mut [u8],
    scales: &mut [u8],
) -> Result<ErrorSums, NonFinite> {
    let width = dtype.bitsize() / 8;
    let n = src.len() / width;
    assert!(
        n % BLOCK == 0 && packed.len() == n / 2 && scales.len() == n / BLOCK,
        "quantize_bytes: buffers do not fit {n} elements"
    );
    match dtype {
        Dtype::BF16 => quantize_with::<Bf16>(src, scale_2, packed, scales),
        Dtype::F16 => quantize_with::<F16>(src, scale_2, packed, scales),
        Dtype::F32 => quantize_with::<F32>(src, scale_2, packed, scales),
        other => panic!("quantize_bytes: {other:?} is not a float source type"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(dtype: Dtype, bytes: &[u8], rows: usize, amax: f32) -> codec::Nvfp4Tensor {
        let cols = bytes.len() / (dtype.bitsize() / 8) / rows;
        let shape = [rows, cols];
        match dtype {
            Dtype::BF16 => {
                let v: Vec<half::bf16> = bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                    .collect();
                codec::quantize("t", &v, &shape, amax).unwrap()
            }
            Dtype::F16 => {
                let v: Vec<half::f16> = bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                    .collect();
                codec::quantize("t", &v, &shape, amax).unwrap()
            }
            _ => {
                let v: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                codec::quantize("t", &v, &shape, amax).unwrap()
            }
        }
    }

    fn check_same(dtype: Dtype, values: &[f32], amax: f32) {
        let bytes: Vec<u8> = match dtype {
            Dtype::BF16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let want = reference(dtype, &bytes, 1, amax);
        let n = values.len();
        let (mut packed, mut scales) = (vec![0; n / 2], vec![0; n / BLOCK]);
        let scale_2 = codec::weight_scale_2("t", amax).unwrap();
        let (err, _) = quantize_bytes(dtype, &bytes, scale_2, &mut packed, &mut scales).unwrap();
        assert_eq!(packed, want.packed, "{dtype:?} packed codes");
        assert_eq!(scales, want.weight_scale, "{dtype:?} block scales");
        // The portable build of the loop (what CPUs without AVX2 run) gives the same bytes.
        let (mut p2, mut s2) = (vec![0; n / 2], vec![0; n / BLOCK]);
        let portable = match dtype {
            Dtype::BF16 => quantize_blocks::<Bf16>(&bytes, scale_2, &mut p2, &mut s2),
            Dtype::F16 => quantize_blocks::<F16>(&bytes, scale_2, &mut p2, &mut s2),
            _ => quantize_blocks::<F32>(&bytes, scale_2, &mut p2, &mut s2),
        };
        assert_eq!((p2, s2), (packed.clone(), scales.clone()), "portable loop");
        assert_eq!(portable.unwrap().0, err);
        let want_err: f64 = want
            .dequantize()
            .iter()
            .zip(&bytes_to_f32(dtype, &bytes))
            .map(|(d, x)| f64::from(d - x).powi(2))
            .sum();
        assert!(
            (err - want_err).abs() <= 1e-9 * want_err.max(1e-30),
            "{err} vs {want_err}"
        );
    }

    fn bytes_to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(dtype.bitsize() / 8)
            .map(|c| match dtype {
                Dtype::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                Dtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                _ => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            })
            .collect()
    }

    #[test]
    fn e2m1_lane_code_is_the_codec_rule() {
        let mut probes = vec![
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e30,
        ];
        for b in e2m1::E2M1_BOUNDS.iter().chain(&e2m1::E2M1_VALUES) {
            for x in [
                *b,
                -*b,
                f32::from_bits(b.to_bits() + 1),
                f32::from_bits(b.to_bits().max(1) - 1),
            ] {
                probes.push(x);
                probes.push(-x);
            }
        }
        for x in probes {
            assert_eq!(e2m1::code(x), u32::from(e2m1::encode(x)), "{x}");
        }
        for bits in (0..=u32::MAX).step_by(65_537) {
            let x = f32::from_bits(bits);
            assert_eq!(e2m1::code(x), u32::from(e2m1::encode(x)), "{x} ({bits:#x})");
        }
    }

    #[test]
    fn crafted_blocks_match_the_codec() {
        // Zeros, ties, tiny and outlier blocks, a block that saturates the scale.
        let mut v = vec![0.0f32; 16];
        v.extend((0..16).map(|i| [0.75, 1.75, 3.5, -0.25, 5.0, -6.0, 2.5, 1.25][i % 8]));
        v.extend((0..16).map(|i| 1e-30 * i as f32));
        v.extend((0..16).map(|i| if i == 3 { 1e4 } else { 0.01 * i as f32 }));
        v.extend((0..16).map(|i| -(i as f32) * 37.0));
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            for amax in [1.0f32, 0.05, 448.0 * 6.0, 1e4] {
                check_same(dtype, &v, amax);
            }
        }
    }

    #[test]
    fn non_finite_elements_are_found() {
        let mut v = [0.5f32; 48];
        v[37] = f32::NAN;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let (mut p, mut s) = (vec![0; 24], vec![0; 3]);
        let err = quantize_bytes(Dtype::F32, &bytes, 0.01, &mut p, &mut s).unwrap_err();
        assert_eq!(err.0, 37);
        assert!(err.1.is_nan());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_rows_match_the_codec(
            values in proptest::collection::vec(-100.0f32..100.0, 1..8usize)
                .prop_flat_map(|seeds| proptest::collection::vec(-1.0f32..1.0, seeds.len() * 16)
                    .prop_map(move |v| v.iter().enumerate().map(|(i, x)| x * seeds[i / 16]).collect::<Vec<f32>>())),
            amax_scale in 0.01f32..4.0,
        ) {
            let amax = values.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3) * amax_scale;
            for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
                check_same(dtype, &values, amax);
            }
        }
    }
}
