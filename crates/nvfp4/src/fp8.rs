//! FP8 E4M3FN, the type of NVFP4's per-block scales: bias 7, no infinity, NaN = `0x7F`/`0xFF`,
//! largest finite 448 (`0x7E`), smallest subnormal 2^-9 (`0x01`).
//!
//! Encoding rounds to nearest, ties to even, like PyTorch's `fp8e4m3fn_from_fp32_value`
//! (`c10/util/Float8_e4m3fn.h`) for every input below 448; unlike c10 (which returns NaN from
//! 480 up) it saturates to ±448, the clamp ModelOpt applies before its cast.

/// Largest finite E4M3FN value.
pub const E4M3_MAX: f32 = 448.0;

/// Smallest positive E4M3FN value (subnormal 2^-9), the lower clamp of NVFP4 block scales.
pub const E4M3_MIN_POSITIVE: f32 = 1.0 / 512.0;

/// The canonical NaN byte.
pub const E4M3_NAN: u8 = 0x7F;

/// Smallest normal E4M3FN value, 2^-6. The rounding quantum is `2^(e - E4M3_MANTISSA_BITS)`
/// in a binade `[2^e, 2^(e+1))` from here up, and [`E4M3_MIN_POSITIVE`] below.
pub const E4M3_MIN_NORMAL: f32 = 1.0 / 64.0;

/// Mantissa bits of E4M3FN.
pub const E4M3_MANTISSA_BITS: u32 = 3;

/// Encodes `x` as E4M3FN: round to nearest even, saturate to ±448, NaN to `0x7F`.
///
/// `-0.0` and negative values that round to zero keep the sign bit (`0x80`), as in c10.
#[inline]
pub fn encode(x: f32) -> u8 {
    if x.is_nan() {
        return E4M3_NAN;
    }
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    if a < E4M3_MIN_NORMAL {
        // Subnormals are multiples of 2^-9; 8 * 2^-9 is the smallest normal, whose code is 0x08.
        // `a * 512` is exact (power-of-two scaling of a value far from the float32 limits).
        return sign | ((a * 512.0).round_ties_even() as u8);
    }
    // Normal: a = 2^e * m / 8 with m in [8, 16).
    let e = ((a.to_bits() >> 23) & 0xFF) as i32 - 127;
    let m = (a * f32::powi(2.0, 3 - e)).round_ties_even() as u8;
    // m == 16 carries into the exponent field, which the addition does by itself.
    sign | ((((e + 7) as u8) << 3) + (m - 8))
}

/// Decodes an E4M3FN byte; `0x7F` and `0xFF` give NaN.
#[inline]
pub fn decode(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((byte >> 3) & 0x0F);
    let man = f32::from(byte & 0x07);
    if exp == 0x0F && byte & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man * E4M3_MIN_POSITIVE
    } else {
        sign * (8.0 + man) * f32::powi(2.0, exp - 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// All finite non-negative E4M3FN values, ascending.
    fn grid() -> Vec<f32> {
        (0u8..0x7F).map(decode).collect()
    }

    #[test]
    fn known_constants() {
        assert_eq!(decode(0x7E), 448.0);
        assert_eq!(decode(0x38), 1.0);
        assert_eq!(decode(0x01), E4M3_MIN_POSITIVE);
        assert_eq!(decode(0x08), E4M3_MIN_NORMAL);
        assert_eq!(decode(0x43), 2.75);
        assert!(decode(0x7F).is_nan() && decode(0xFF).is_nan());
        assert_eq!(encode(448.0), 0x7E);
        assert_eq!(encode(2.688), 0x43);
        assert_eq!(encode(1.0), 0x38);
        assert_eq!(encode(E4M3_MIN_POSITIVE), 0x01);
    }

    #[test]
    fn special_inputs() {
        assert_eq!(encode(f32::NAN), E4M3_NAN);
        assert_eq!(encode(f32::INFINITY), 0x7E);
        assert_eq!(encode(f32::NEG_INFINITY), 0xFE);
        assert_eq!(encode(1.0e9), 0x7E);
        assert_eq!(encode(-0.0), 0x80);
        assert_eq!(encode(0.0), 0x00);
        // Below half the smallest subnormal flushes to zero; exactly half is a tie to even (0).
        assert_eq!(encode(E4M3_MIN_POSITIVE / 2.0), 0x00);
        assert_eq!(encode(E4M3_MIN_POSITIVE * 0.75), 0x01);
    }

    #[test]
    fn every_finite_byte_round_trips() {
        for byte in (0u8..=0xFF).filter(|b| b & 0x7F != 0x7F) {
            assert_eq!(encode(decode(byte)), byte, "byte {byte:#04x}");
        }
    }

    #[test]
    fn grid_is_strictly_increasing() {
        let g = grid();
        assert!(g.windows(2).all(|w| w[0] < w[1]));
    }

    proptest! {
        #[test]
        fn decode_encode_is_nearest_even(x in 0.0f32..448.0) {
            let byte = encode(x);
            let got = decode(byte);
            let g = grid();
            let best = g.iter().map(|v| (v - x).abs()).fold(f32::INFINITY, f32::min);
            prop_assert!((got - x).abs() <= best, "x={x} got={got}");
            let ties: Vec<&f32> = g.iter().filter(|v| (*v - x).abs() == best).collect();
            if ties.len() == 2 {
                prop_assert_eq!(byte & 1, 0, "tie at {} must go to the even mantissa", x);
            }
        }

        #[test]
        fn negative_mirrors_positive(x in 0.0f32..1000.0) {
            prop_assert_eq!(encode(-x), encode(x) | 0x80);
        }
    }
}
