//! The reference NVFP4 codec in plain Rust, bit-exact with ModelOpt 0.47's export
//! (`NVFP4QTensor.quantize` / `get_weights_scaling_factor` / `dequantize` in
//! `modelopt/torch/quantization/qtensor/nvfp4_tensor.py`).
//!
//! For a tensor `[.., K]` with `K % 16 == 0` and a calibrated `amax`:
//! - `weight_scale_2 = amax × fp32(1/2688)` (float32 multiplication by the reciprocal, as
//!   PyTorch divides a CUDA tensor by a scalar);
//! - per block of 16 along `K`: `s = block_amax / (6 × weight_scale_2)`, all-zero block → 1.0,
//!   clamp to `[2^-9, 448]`, round to FP8 E4M3FN (nearest even) → `weight_scale`;
//! - codes: E2M1 of `x / (float(weight_scale) × weight_scale_2)` (product first, then an IEEE
//!   division), packed two per byte with the even element in the low nibble;
//! - dequantize: `E2M1[code] × (float(weight_scale) × weight_scale_2)`.

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::{e2m1, fp8};

/// Elements per NVFP4 block, along the last dimension.
pub const BLOCK_SIZE: usize = 16;

/// `6 × 448`: the largest E2M1 value times the largest E4M3 scale.
pub const GLOBAL_SCALE_DIVISOR: f32 = e2m1::E2M1_MAX * fp8::E4M3_MAX;

/// `fp32(1 / 2688)`, the factor ModelOpt's global scales are computed with.
pub const RECIP_GLOBAL_SCALE_DIVISOR: f32 = 1.0 / GLOBAL_SCALE_DIVISOR;

/// The scale ModelOpt gives an all-zero block.
pub const ZERO_BLOCK_SCALE_VALUE: f32 = 1.0;

/// FP8 byte of [`ZERO_BLOCK_SCALE_VALUE`].
pub const ZERO_BLOCK_SCALE: u8 = 0x38;

/// A float element type the codec reads (converted exactly to `f32`).
pub trait Element: Copy + Send + Sync + 'static {
    /// The value as `f32` (exact for every implementor).
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for bf16 {
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl Element for f16 {
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Global scale from an amax: `amax × fp32(1/2688)`.
///
/// Fails unless the result is a positive normal float32 (amax NaN, infinite, negative, zero or
/// below about 3e-35): such a tensor has no NVFP4 encoding with finite, non-zero scales.
pub fn global_scale(name: &str, amax: f32) -> Result<f32> {
    let scale = amax * RECIP_GLOBAL_SCALE_DIVISOR;
    if amax.is_finite() && scale.is_normal() && scale > 0.0 {
        Ok(scale)
    } else {
        Err(Error::InvalidAmax {
            name: name.to_owned(),
            amax,
        })
    }
}

/// An amax whose [`global_scale`] is exactly `scale_2` (bit for bit), for loading a stored
/// `input_scale` / `weight_scale_2` back into an amax-driven fake quantizer: a plain
/// `scale_2 × 2688` rounds twice and can move the global scale by an ulp, which flips FP8
/// block scales. Searches the floats next to `scale_2 × 2688`; when none maps back exactly
/// (possible where the product's ulp is coarser than `scale_2`'s), returns the one whose
/// scale is closest.
pub fn amax_for_global_scale(scale_2: f32) -> f32 {
    let guess = scale_2 * GLOBAL_SCALE_DIVISOR;
    if !guess.is_finite() || guess <= 0.0 {
        return guess;
    }
    let mut best = guess;
    let mut best_err = f32::INFINITY;
    for step in -8i32..=8 {
        let candidate = f32::from_bits((guess.to_bits() as i64 + step as i64) as u32);
        let err = (candidate * RECIP_GLOBAL_SCALE_DIVISOR - scale_2).abs();
        if err < best_err || (err == best_err && step == 0) {
            best = candidate;
            best_err = err;
        }
        if err == 0.0 && step >= 0 {
            break;
        }
    }
    best
}

/// `weight_scale_2` of a weight whose quantizer calibrated `amax` (for PTQ: `max|W|`; for a
/// group of linears reading the same input: the group's largest amax).
pub fn weight_scale_2(name: &str, amax: f32) -> Result<f32> {
    global_scale(name, amax)
}

/// `input_scale` of a linear from the calibrated activation amax (`max|x|` over the calibration
/// data, the group's largest for linears that read the same input).
pub fn input_scale(name: &str, amax: f32) -> Result<f32> {
    global_scale(name, amax)
}

/// FP8 byte of the block scale for a block whose `max|x|` is `block_amax`, under the global
/// scale `scale_2` (a positive normal float32 from [`global_scale`]).
#[inline]
pub fn block_scale(block_amax: f32, scale_2: f32) -> u8 {
    let s = block_amax / (e2m1::E2M1_MAX * scale_2);
    if s == 0.0 {
        return ZERO_BLOCK_SCALE;
    }
    fp8::encode(s.clamp(fp8::E4M3_MIN_POSITIVE, fp8::E4M3_MAX))
}

/// Quantizes one block: returns the FP8 scale byte and fills `codes` with E2M1 codes.
#[inline]
pub fn quantize_block(block: &[f32; BLOCK_SIZE], scale_2: f32, codes: &mut [u8; BLOCK_SIZE]) -> u8 {
    let block_amax = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let scale = block_scale(block_amax, scale_2);
    let divisor = fp8::decode(scale) * scale_2;
    for (c, &x) in codes.iter_mut().zip(block) {
        *c = e2m1::encode(x / divisor);
    }
    scale
}

/// Fake-quantizes one block in place: each value becomes its dequantized NVFP4 value.
#[inline]
pub fn fake_quantize_block(block: &mut [f32; BLOCK_SIZE], scale_2: f32) {
    let mut codes = [0u8; BLOCK_SIZE];
    let scale = quantize_block(block, scale_2, &mut codes);
    let step = fp8::decode(scale) * scale_2;
    for (x, c) in block.iter_mut().zip(codes) {
        *x = e2m1::decode(c) * step;
    }
}

/// Checks that `shape` is block-quantizable and holds `len` elements; returns the element count.
pub fn check_shape(name: &str, shape: &[usize], len: usize) -> Result<usize> {
    let Some(&last) = shape.last() else {
        return Err(Error::EmptyShape {
            name: name.to_owned(),
            shape: shape.to_vec(),
        });
    };
    if shape.contains(&0) {
        return Err(Error::EmptyShape {
            name: name.to_owned(),
            shape: shape.to_vec(),
        });
    }
    if last % BLOCK_SIZE != 0 {
        return Err(Error::NotBlockAligned {
            name: name.to_owned(),
            shape: shape.to_vec(),
            last,
        });
    }
    let expected: usize = shape.iter().product();
    if expected != len {
        return Err(Error::LengthMismatch {
            name: name.to_owned(),
            shape: shape.to_vec(),
            expected,
            actual: len,
        });
    }
    Ok(expected)
}

/// `max|x|` over `data` as f32; fails on the first NaN or infinite element.
pub fn amax<T: Element>(name: &str, data: &[T]) -> Result<f32> {
    let mut m = 0.0f32;
    for (index, x) in data.iter().enumerate() {
        let v = x.to_f32();
        if !v.is_finite() {
            return Err(Error::NonFinite {
                name: name.to_owned(),
                index,
                value: v,
            });
        }
        m = m.max(v.abs());
    }
    Ok(m)
}

/// Copies block `b` of `data` into an f32 array.
#[inline]
fn load_block<T: Element>(data: &[T], b: usize) -> [f32; BLOCK_SIZE] {
    let mut out = [0.0f32; BLOCK_SIZE];
    for (o, x) in out
        .iter_mut()
        .zip(&data[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE])
    {
        *o = x.to_f32();
    }
    out
}

/// Packs E2M1 codes two per byte: `byte = code[2k] | code[2k + 1] << 4`.
///
/// An odd trailing code goes alone into the low nibble of the last byte.
pub fn pack_nibbles(codes: &[u8]) -> Vec<u8> {
    codes
        .chunks(2)
        .map(|pair| (pair[0] & 0x0F) | (pair.get(1).copied().unwrap_or(0) << 4))
        .collect()
}

/// Unpacks bytes into codes, low nibble first: `2 × packed.len()` codes.
pub fn unpack_nibbles(packed: &[u8]) -> Vec<u8> {
    packed.iter().flat_map(|b| [b & 0x0F, b >> 4]).collect()
}

/// An NVFP4-quantized tensor in ModelOpt's export layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Nvfp4Tensor {
    /// Logical shape `[.., K]` of the unpacked tensor.
    pub shape: Vec<usize>,
    /// Packed E2M1 codes, shape `[.., K/2]` (ModelOpt's `weight`, dtype U8).
    pub packed: Vec<u8>,
    /// FP8 E4M3FN block scales, shape `[.., K/16]` (ModelOpt's `weight_scale`).
    pub weight_scale: Vec<u8>,
    /// Per-tensor global scale (ModelOpt's `weight_scale_2`).
    pub weight_scale_2: f32,
}

impl Nvfp4Tensor {
    /// Rebuilds a tensor from exported parts, checking that their sizes fit `shape`.
    pub fn from_parts(
        name: &str,
        shape: Vec<usize>,
        packed: Vec<u8>,
        weight_scale: Vec<u8>,
        weight_scale_2: f32,
    ) -> Result<Self> {
        let n: usize = shape.iter().product();
        check_shape(name, &shape, n)?;
        for (field, actual, expected) in [
            ("weight", packed.len(), n / 2),
            ("weight_scale", weight_scale.len(), n / BLOCK_SIZE),
        ] {
            if actual != expected {
                return Err(Error::PackedMismatch {
                    name: name.to_owned(),
                    field,
                    shape,
                    expected,
                    actual,
                });
            }
        }
        Ok(Self {
            shape,
            packed,
            weight_scale,
            weight_scale_2,
        })
    }

    /// Shape of [`Self::packed`]: the logical shape with the last dimension halved.
    pub fn packed_shape(&self) -> Vec<usize> {
        self.with_last(|k| k / 2)
    }

    /// Shape of [`Self::weight_scale`]: the logical shape with the last dimension divided by 16.
    pub fn scale_shape(&self) -> Vec<usize> {
        self.with_last(|k| k / BLOCK_SIZE)
    }

    fn with_last(&self, f: impl Fn(usize) -> usize) -> Vec<usize> {
        let mut s = self.shape.clone();
        if let Some(last) = s.last_mut() {
            *last = f(*last);
        }
        s
    }

    /// Unpacked E2M1 codes, one per element, row-major.
    pub fn codes(&self) -> Vec<u8> {
        unpack_nibbles(&self.packed)
    }

    /// Dequantized values: `E2M1[code] × (float(weight_scale) × weight_scale_2)`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.packed.len() * 2);
        for (bytes, &scale) in self.packed.chunks(BLOCK_SIZE / 2).zip(&self.weight_scale) {
            let step = fp8::decode(scale) * self.weight_scale_2;
            for &b in bytes {
                out.push(e2m1::decode(b) * step);
                out.push(e2m1::decode(b >> 4) * step);
            }
        }
        out
    }
}

/// Quantizes `data` (row-major, `shape = [.., K]`, `K % 16 == 0`) with the calibrated `amax`.
///
/// Use `amax = max|data|` ([`amax`]) for PTQ, the frozen calibrated amax during QAT, and the
/// group's largest amax for linears that read the same input. Fails on a bad shape, a NaN or
/// infinite element, or an amax without a usable global scale.
pub fn quantize<T: Element>(
    name: &str,
    data: &[T],
    shape: &[usize],
    amax: f32,
) -> Result<Nvfp4Tensor> {
    let n = check_shape(name, shape, data.len())?;
    let scale_2 = weight_scale_2(name, amax)?;
    self::amax(name, data)?;
    let blocks = n / BLOCK_SIZE;
    let mut packed = Vec::with_capacity(n / 2);
    let mut weight_scale = Vec::with_capacity(blocks);
    let mut codes = [0u8; BLOCK_SIZE];
    for b in 0..blocks {
        let block = load_block(data, b);
        weight_scale.push(quantize_block(&block, scale_2, &mut codes));
        packed.extend(codes.chunks(2).map(|p| p[0] | (p[1] << 4)));
    }
    Ok(Nvfp4Tensor {
        shape: shape.to_vec(),
        packed,
        weight_scale,
        weight_scale_2: scale_2,
    })
}

/// `dequantize(quantize(data))` without building the packed form: what a fake quantizer's
/// forward returns. Same checks as [`quantize`].
pub fn fake_quantize<T: Element>(
    name: &str,
    data: &[T],
    shape: &[usize],
    amax: f32,
) -> Result<Vec<f32>> {
    let n = check_shape(name, shape, data.len())?;
    let scale_2 = global_scale(name, amax)?;
    self::amax(name, data)?;
    let mut out = Vec::with_capacity(n);
    for b in 0..n / BLOCK_SIZE {
        let mut block = load_block(data, b);
        fake_quantize_block(&mut block, scale_2);
        out.extend_from_slice(&block);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn worked_example_a_grid_and_ties() {
        // nvfp4_spec.md §7.2 example A: amax 6 makes the divisor exactly 1.
        let x: [f32; 16] = [
            0., 0.25, 0.5, 0.75, 1., 1.25, 1.5, 1.75, 2., 2.5, 3., 3.5, 4., 5., 6., -6.,
        ];
        let q = quantize("example_a", &x, &[1, 16], 6.0).expect("quantizable");
        assert_eq!(q.weight_scale_2.to_bits(), 0x3B12_4925);
        assert_eq!(q.weight_scale, vec![0x7E]);
        assert_eq!(
            q.packed,
            vec![0x00, 0x21, 0x22, 0x43, 0x44, 0x65, 0x66, 0xF7]
        );
    }

    #[test]
    fn shape_errors_name_the_problem() {
        let data = vec![0.5f32; 24];
        let err = quantize("model.x.weight", &data, &[2, 12], 1.0).unwrap_err();
        assert!(matches!(err, Error::NotBlockAligned { last: 12, .. }));
        assert!(err.to_string().contains("model.x.weight") && err.to_string().contains("[2, 12]"));
        let err = quantize("t", &data, &[2, 16], 1.0).unwrap_err();
        assert!(matches!(
            err,
            Error::LengthMismatch {
                expected: 32,
                actual: 24,
                ..
            }
        ));
        assert!(matches!(
            quantize::<f32>("t", &[], &[], 1.0),
            Err(Error::EmptyShape { .. })
        ));
        assert!(matches!(
            quantize::<f32>("t", &[], &[0, 16], 1.0),
            Err(Error::EmptyShape { .. })
        ));
    }

    #[test]
    fn non_finite_inputs_and_amax_are_refused() {
        let mut data = vec![0.5f32; 32];
        data[17] = f32::NAN;
        let err = quantize("w", &data, &[2, 16], 1.0).unwrap_err();
        assert!(matches!(err, Error::NonFinite { index: 17, .. }));
        data[17] = f32::NEG_INFINITY;
        assert!(matches!(
            quantize("w", &data, &[2, 16], 1.0),
            Err(Error::NonFinite { index: 17, .. })
        ));
        let ok = vec![0.5f32; 16];
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY, 1.0e-40] {
            assert!(
                matches!(
                    quantize("w", &ok, &[16], bad),
                    Err(Error::InvalidAmax { .. })
                ),
                "amax {bad}"
            );
        }
    }

    #[test]
    fn negative_zero_encodes_as_positive_zero() {
        let mut x = [-0.0f32; 16];
        x[0] = 1.0;
        let q = quantize("w", &x, &[16], 1.0).expect("quantizable");
        assert_eq!(q.codes()[1..], [0u8; 15]);
        assert!(q.dequantize()[1..].iter().all(|v| v.to_bits() == 0));
    }

    #[test]
    fn all_zero_block_gets_scale_one() {
        let mut x = vec![0.0f32; 32];
        x[20] = 3.0;
        let q = quantize("w", &x, &[32], 3.0).expect("quantizable");
        assert_eq!(q.weight_scale[0], ZERO_BLOCK_SCALE);
        assert_eq!(q.weight_scale[1], block_scale(3.0, q.weight_scale_2));
        assert!(q.dequantize()[..16].iter().all(|v| v.to_bits() == 0));
    }

    #[test]
    fn zero_block_scale_byte_is_its_value() {
        assert_eq!(fp8::encode(ZERO_BLOCK_SCALE_VALUE), ZERO_BLOCK_SCALE);
    }

    #[test]
    fn pack_unpack_round_trip_and_order() {
        assert_eq!(pack_nibbles(&[0x1, 0x2, 0xF]), vec![0x21, 0x0F]);
        assert_eq!(unpack_nibbles(&[0x21, 0xF7]), vec![1, 2, 7, 15]);
    }

    #[test]
    fn from_parts_checks_sizes() {
        let err =
            Nvfp4Tensor::from_parts("w", vec![2, 16], vec![0; 15], vec![0x38; 2], 1.0).unwrap_err();
        assert!(matches!(
            err,
            Error::PackedMismatch {
                field: "weight",
                expected: 16,
                actual: 15,
                ..
            }
        ));
        let err =
            Nvfp4Tensor::from_parts("w", vec![2, 16], vec![0; 16], vec![0x38; 3], 1.0).unwrap_err();
        assert!(matches!(
            err,
            Error::PackedMismatch {
                field: "weight_scale",
                ..
            }
        ));
    }

    fn block_strategy() -> impl Strategy<Value = Vec<f32>> {
        // Magnitudes spread over many binades, with exact zeros mixed in.
        proptest::collection::vec(
            prop_oneof![
                3 => (-30i32..10, -1.0f32..1.0).prop_map(|(e, m)| m * f32::powi(2.0, e)),
                1 => Just(0.0f32),
            ],
            BLOCK_SIZE * 4,
        )
    }

    proptest! {
        #[test]
        fn scales_are_finite_positive(data in block_strategy(), grow in 0.01f32..100.0) {
            let m = amax("w", &data).expect("finite");
            prop_assume!(m > 0.0);
            // A calibrated amax that is smaller or larger than the current weights (QAT drift).
            let q = quantize("w", &data, &[4, BLOCK_SIZE], m * grow);
            prop_assume!(q.is_ok());
            let q = q.expect("checked");
            prop_assert!(q.weight_scale_2.is_finite() && q.weight_scale_2 > 0.0);
            for &s in &q.weight_scale {
                let v = fp8::decode(s);
                prop_assert!(v.is_finite() && v > 0.0, "scale byte {:#04x}", s);
            }
            prop_assert!(q.dequantize().iter().all(|v| v.is_finite()));
        }

        #[test]
        fn fake_quantize_equals_dequantize_quantize(data in block_strategy()) {
            let m = amax("w", &data).expect("finite");
            prop_assume!(m > 1.0e-30);
            let q = quantize("w", &data, &[2, 2 * BLOCK_SIZE], m).expect("quantizable");
            let fq = fake_quantize("w", &data, &[2, 2 * BLOCK_SIZE], m).expect("quantizable");
            let dq = q.dequantize();
            prop_assert!(fq.iter().zip(&dq).all(|(a, b)| a.to_bits() == b.to_bits()));
        }

        #[test]
        fn pack_unpack_inverse(codes in proptest::collection::vec(0u8..16, 0..64usize).prop_map(|mut v| { if v.len() % 2 == 1 { v.pop(); } v })) {
            prop_assert_eq!(unpack_nibbles(&pack_nibbles(&codes)), codes);
        }
    }

    #[test]
    fn stored_scales_load_back_to_the_same_global_scale() {
        let mut exact = 0;
        let n = 20_000u32;
        for i in 0..n {
            // Amaxes over many binades, as calibration produces them.
            let amax = f32::from_bits(0x3a00_0000 + i.wrapping_mul(0x0003_1337) % 0x0a00_0000);
            let scale_2 = global_scale("t", amax).unwrap();
            let back = amax_for_global_scale(scale_2);
            let again = back * RECIP_GLOBAL_SCALE_DIVISOR;
            assert!((again - scale_2).abs() <= scale_2 * f32::EPSILON, "{amax}");
            exact += usize::from(again.to_bits() == scale_2.to_bits());
        }
        // Every scale that came from an amax has an exact preimage: that amax.
        assert_eq!(exact, n as usize);
    }
}
