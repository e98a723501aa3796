//! Tensor names of a quantized linear `M`, as ModelOpt 0.47 writes them: in an export
//! (`M.weight` packed, [`WEIGHT_SCALE`], [`WEIGHT_SCALE_2`], [`INPUT_SCALE`]) and in a QAT
//! checkpoint's quantizer state ([`WEIGHT_AMAX`], [`INPUT_AMAX`]).

/// Suffix of a linear's weight (packed E2M1 codes in an export).
pub const WEIGHT: &str = ".weight";

/// Suffix of a linear's FP8 E4M3 block scales in an export.
pub const WEIGHT_SCALE: &str = ".weight_scale";

/// Suffix of a linear's global weight scale (F32 scalar) in an export.
pub const WEIGHT_SCALE_2: &str = ".weight_scale_2";

/// Suffix of a linear's input scale (F32 scalar) in an export.
pub const INPUT_SCALE: &str = ".input_scale";

/// Suffix of a linear's input quantizer (the name fake quantization reports errors under).
pub const INPUT_QUANTIZER: &str = ".input_quantizer";

/// Suffix of a linear's weight quantizer.
pub const WEIGHT_QUANTIZER: &str = ".weight_quantizer";

/// Suffix of a linear's calibrated weight amax (F32 scalar) in a checkpoint's quantizer state.
pub const WEIGHT_AMAX: &str = ".weight_quantizer._amax";

/// Suffix of a linear's calibrated input amax (F32 scalar) in a checkpoint's quantizer state.
pub const INPUT_AMAX: &str = ".input_quantizer._amax";

/// The tensor `module` + `suffix` (e.g. `key("model.layers.0.mlp.up_proj", WEIGHT_SCALE_2)`).
pub fn key(module: &str, suffix: &str) -> String {
    format!("{module}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantizer_names_extend_their_quantizer() {
        assert_eq!(WEIGHT_AMAX, format!("{WEIGHT_QUANTIZER}._amax"));
        assert_eq!(INPUT_AMAX, format!("{INPUT_QUANTIZER}._amax"));
        assert_eq!(key("m.q_proj", WEIGHT_SCALE_2), "m.q_proj.weight_scale_2");
    }
}
