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

/// Rounding bounds of ModelOpt's `_cast_fp4` (searchsorted, left side): bound `i` lies
/// halfway between the magnitudes of codes `i` and `i + 1`.
pub const E2M1_BOUNDS: [f32; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];

/// Sign bit of a code.
pub const SIGN_BIT: u8 = 8;

/// Largest magnitude code (6.0); magnitudes above the last bound saturate to it.
pub const MAX_MAGNITUDE_CODE: u8 = 7;

/// Whether a magnitude exactly on bound `i` rounds up to code `i + 1`: ties go to the even
/// code, so the bounds below codes 2, 4 and 6 (0.75, 1.75, 3.5) round up, the others down.
pub const fn tie_rounds_up(bound: usize) -> bool {
    (bound + 1) % 2 == 0
}

/// Magnitudes below this round to zero (the first bound); the sign bit of a non-zero result
/// is set exactly when the scaled value is below its negative.
pub const SMALLEST_NONZERO_BOUND: f32 = E2M1_BOUNDS[0];

/// The same rule on a power-of-two grid (the GPU kernels' arithmetic): below
/// [`GRID_HALVES_BELOW`] (2) the E2M1 magnitudes are the multiples of ½, below
/// [`GRID_ONES_BELOW`] (4) the multiples of 1, above the multiples of 2. Scaling `|x|` by the
/// grid's [`GRID_SCALE_HALVES`], [`GRID_SCALE_ONES`] or [`GRID_SCALE_TWOS`] puts every bound at
/// a half-integer, where round-half-to-even (`rint`) picks the even code; the code is that
/// integer plus [`GRID_CODE_OFFSET_ONES`] or [`GRID_CODE_OFFSET_TWOS`] (0 on the first grid),
/// capped at [`MAX_MAGNITUDE_CODE`]. [`grid_magnitude_code`] is this form in Rust.
pub const GRID_HALVES_BELOW: f32 = E2M1_VALUES[4];
/// End of the grid of ones (see [`GRID_HALVES_BELOW`]).
pub const GRID_ONES_BELOW: f32 = E2M1_VALUES[6];
/// Scale of the grid of halves.
pub const GRID_SCALE_HALVES: f32 = 2.0;
/// Scale of the grid of ones.
pub const GRID_SCALE_ONES: f32 = 1.0;
/// Scale of the grid of twos.
pub const GRID_SCALE_TWOS: f32 = 0.5;
/// Code of `k` on the grid of ones is `k` plus this (2.0 is code 4).
pub const GRID_CODE_OFFSET_ONES: u32 = 4 - 2;
/// Code of `k` on the grid of twos is `k` plus this (4.0 = 2 × 2 is code 6).
pub const GRID_CODE_OFFSET_TWOS: u32 = 6 - 2;

/// Magnitude code (0..=7) of a non-negative, non-NaN `a` in grid form (see
/// [`GRID_HALVES_BELOW`]); equal to the bound count of [`encode`] for every such `a`.
pub fn grid_magnitude_code(a: f32) -> u8 {
    let (scale, offset) = if a < GRID_HALVES_BELOW {
        (GRID_SCALE_HALVES, 0)
    } else if a < GRID_ONES_BELOW {
        (GRID_SCALE_ONES, GRID_CODE_OFFSET_ONES)
    } else {
        (GRID_SCALE_TWOS, GRID_CODE_OFFSET_TWOS)
    };
    let k = (a * scale)
        .round_ties_even()
        .min(f32::from(MAX_MAGNITUDE_CODE));
    ((k as u32 + offset).min(u32::from(MAX_MAGNITUDE_CODE))) as u8
}

/// [`encode`] in a 32-bit lane and without branches, so that a block of calls vectorizes
/// (the export's hot loop, [`crate::vectorized`]); the same rule and the same codes.
#[inline(always)]
pub fn code(x: f32) -> u32 {
    let a = x.abs();
    // Bound `i` is passed above it, and on it where its tie rounds up.
    let passed = |i: usize| {
        let b = E2M1_BOUNDS[i];
        u32::from((a > b) | (tie_rounds_up(i) & (a == b)))
    };
    let mag = passed(0) + passed(1) + passed(2) + passed(3) + passed(4) + passed(5) + passed(6);
    let mag = if a.is_nan() {
        u32::from(MAX_MAGNITUDE_CODE)
    } else {
        mag
    };
    mag | if x < 0.0 { u32::from(SIGN_BIT) } else { 0 }
}

/// Encodes an already-scaled value as a 4-bit E2M1 code (in the low nibble).
///
/// The sign bit is set for `x < 0` only, as in ModelOpt: `-0.0` gives code 0, while a small
/// negative that rounds to zero (e.g. `-0.1`) gives code 8. Magnitudes above 5 saturate to 6,
/// infinities included. NaN gives code 7 (+6), which is what ModelOpt's `searchsorted` yields;
/// the tensor-level functions of this crate refuse NaN before it gets here.
#[inline]
pub fn encode(x: f32) -> u8 {
    code(x) as u8
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
    fn grid_form_is_the_same_rule() {
        let mut probes: Vec<f32> = vec![0.0, 1e-30, 7.0, 1e30, f32::INFINITY];
        for b in E2M1_BOUNDS.iter().chain(&E2M1_VALUES[..8]) {
            let b = *b;
            probes.extend([b, f32::from_bits(b.to_bits() + 1)]);
            probes.push(f32::from_bits(b.to_bits().max(1) - 1));
        }
        probes.extend((0..0x7F80_0000u32).step_by(4099).map(f32::from_bits));
        for a in probes {
            assert_eq!(grid_magnitude_code(a), encode(a), "{a}");
        }
        for (i, v) in E2M1_VALUES[..8].iter().enumerate() {
            let (scale, offset) = match *v {
                v if v < GRID_HALVES_BELOW => (GRID_SCALE_HALVES, 0),
                v if v < GRID_ONES_BELOW => (GRID_SCALE_ONES, GRID_CODE_OFFSET_ONES),
                _ => (GRID_SCALE_TWOS, GRID_CODE_OFFSET_TWOS),
            };
            assert_eq!((v * scale) as u32 + offset, i as u32, "{v}");
        }
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
