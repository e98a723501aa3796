//! [`LinearAmax`]: the calibrated global amaxes of one quantized linear, the one type every
//! crate passes them in (the exporter, the trainer's checkpoints, the model's layers).

use serde::{Deserialize, Serialize};

/// Global amaxes of one quantized linear: its weight quantizer's and its input quantizer's
/// (the group's largest for linears that read the same input, see [`crate::groups`]).
///
/// `A` is `f32` where both sides are quantized (export, [`crate::fake_quant::linear`]) and
/// `Option<f32>` where a side may be off ([`QuantizerAmax`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LinearAmax<A = f32> {
    /// Calibrated weight amax (frozen during QAT) → `weight_scale_2`.
    pub weight: A,
    /// Calibrated input-activation amax → `input_scale`.
    pub input: A,
}

/// A linear's amaxes where either side may be unquantized: weight-only W4A16 sets only
/// `weight`; an imported NVFP4 export whose weights are already dequantized sets only `input`.
pub type QuantizerAmax = LinearAmax<Option<f32>>;

impl LinearAmax<Option<f32>> {
    /// Both sides unquantized.
    pub const OFF: Self = LinearAmax {
        weight: None,
        input: None,
    };

    /// True when neither side is quantized.
    pub fn is_off(&self) -> bool {
        self.weight.is_none() && self.input.is_none()
    }

    /// Both amaxes, when both sides are quantized.
    pub fn both(&self) -> Option<LinearAmax> {
        Some(LinearAmax {
            weight: self.weight?,
            input: self.input?,
        })
    }
}

impl From<LinearAmax> for LinearAmax<Option<f32>> {
    fn from(a: LinearAmax) -> Self {
        LinearAmax {
            weight: Some(a.weight),
            input: Some(a.input),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_sides_convert_both_ways() {
        let both = LinearAmax {
            weight: 2.0,
            input: 3.0,
        };
        let q = QuantizerAmax::from(both);
        assert_eq!(q.both(), Some(both));
        assert!(!q.is_off() && QuantizerAmax::OFF.is_off());
        assert_eq!(QuantizerAmax::default(), QuantizerAmax::OFF);
        let weight_only = LinearAmax {
            weight: Some(1.0),
            input: None,
        };
        assert_eq!(weight_only.both(), None);
    }
}
