//! FP4 E2M1, the NVFP4 element type: 1 sign bit (bit 3), 2 exponent bits, 1 mantissa bit.
//!
//! Values are ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}; there is no infinity and no NaN.
//! Rounding follows ModelOpt's `NVFP4QTensor._cast_fp4`
//! (`modelopt/torch/quantization/qtensor/nvfp4_tensor.py`): the code is the number of bounds
//! `[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5]` strictly below `|x|`, plus one when `|x|` is exactly
//! 0.75, 1.75 or 3.5. That is round to nearest with ties to the even code, saturating at 6.

/// Largest E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;

/// Decoded value of each of the 16 codes; code 8 (negative zero) decodes to `+0.0`, as in
/// ModelOpt's `e2m1_values` table.
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Rounding bounds of ModelOpt's `_cast_fp4` (searchsorted, left side).
pub const E2M1_BOUNDS: [f32; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];

/// Magnitude code (0..=7) of a non-negative, non-NaN `a` under ModelOpt's rule.
#[inline]
fn magnitude_code(a: f32) -> u8 {
    let below = E2M1_BOUNDS.iter().filter(|&&b| b < a).count() as u8;
    let tie_up = u8::from(a == 0.75 || a == 1.75 || a == 3.5);
    below + tie_up
}

/// Encodes an already-scaled value as a 4-bit E2M1 code (in the low nibble).
///
/// The sign bit is set for `x < 0` only, as in ModelOpt: `-0.0` gives code 0, while a small
/// negative that rounds to zero (e.g. `-0.1`) gives code 8. Magnitudes above 5 saturate to 6,
/// infinities included. NaN gives code 7 (+6), which is what ModelOpt's `searchsorted` yields;
/// the tensor-level functions of this crate refuse NaN before it gets here.
#[inline]
pub fn encode(x: f32) -> u8 {
    let sign = if x < 0.0 { 8 } else { 0 };
    let a = x.abs();
    let mag = if a.is_nan() { 7 } else { magnitude_code(a) };
    sign | mag
}

/// Decodes the low nibble of `code` (the high nibble is ignored).
#[inline]
pub fn decode(code: u8) -> f32 {
    E2M1_VALUES[usize::from(code & 0x0F)]
}

/// Rounds an already-scaled value to the E2M1 grid (same rule as [`encode`]), keeping the
/// sign of the input for non-zero results and returning `+0.0` for zero results.
#[inline]
pub fn round(x: f32) -> f32 {
    decode(encode(x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Non-negative grid values.
    const GRID: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

    #[test]
    fn modelopt_cast_fp4_equivalence_vectors() {
        // Inputs and expected codes of ModelOpt's test_cast_fp4_equivalence (nvfp4_spec.md §7.1).
        let cases: [(&[f32], &[u8]); 3] = [
            (&[0.25, 0.75, 1.25, 1.75, 2.5, 3.5], &[0, 2, 2, 4, 4, 6]),
            (
                &[0.1, 2.5, 1.0, 4.8, 1.5, 1.25, 3.25, 5.0],
                &[0, 4, 2, 6, 3, 2, 5, 6],
            ),
            (&[0.0, 0.75, 1.25, 1.75, 2.5, 5.5], &[0, 2, 2, 4, 4, 7]),
        ];
        for (inputs, codes) in cases {
            for (&x, &c) in inputs.iter().zip(codes) {
                assert_eq!(encode(x), c, "encode({x})");
                let neg = if x == 0.0 { 0 } else { c | 8 };
                assert_eq!(encode(-x), neg, "encode(-{x})");
            }
        }
    }

    #[test]
    fn signed_zero_nan_and_infinity() {
        assert_eq!(encode(-0.0), 0);
        assert_eq!(encode(0.0), 0);
        assert_eq!(encode(-0.1), 8);
        assert_eq!(decode(8).to_bits(), 0.0f32.to_bits());
        assert_eq!(encode(f32::NAN), 7);
        assert_eq!(encode(f32::INFINITY), 7);
        assert_eq!(encode(f32::NEG_INFINITY), 15);
    }

    #[test]
    fn every_code_round_trips() {
        for code in 0u8..16 {
            let v = decode(code);
            let expected = if code == 8 { 0 } else { code };
            assert_eq!(encode(v), expected, "code {code} value {v}");
        }
    }

    proptest! {
        #[test]
        fn decode_encode_is_nearest(x in -8.0f32..8.0) {
            let got = decode(encode(x));
            let err = (got - x).abs();
            let a = x.abs();
            let best = GRID.iter().map(|g| (g - a).abs()).fold(f32::INFINITY, f32::min);
            prop_assert!(err <= best, "x={x} got={got} best error={best}");
            // Exact midpoints go to the even code (mantissa bit clear).
            let ties = GRID.windows(2).filter(|w| (w[0] + w[1]) / 2.0 == a).count();
            if ties > 0 {
                prop_assert_eq!(encode(x) & 1, 0, "tie {} must round to even", x);
            }
        }

        #[test]
        fn saturates_beyond_grid(x in 5.0001f32..1.0e30) {
            prop_assert_eq!(encode(x), 7);
            prop_assert_eq!(encode(-x), 15);
        }

        #[test]
        fn sign_bit_follows_modelopt(x in proptest::num::f32::NORMAL | proptest::num::f32::SUBNORMAL) {
            prop_assert_eq!(encode(x) & 8 != 0, x < 0.0);
        }
    }
}
