//! ModelOpt's "max" calibration: one forward pass (no autodiff) over calibration sequences
//! records, per quantized linear ([`QLinear`], keyed by its Hugging Face module name), the
//! largest `|x|` of its input; and `max|W|` of each linear's weight.
//!
//! The inputs are seen through the linear layer's own hook ([`InputAmaxHook`]), installed
//! for the pass: outside [`calibrate_inputs`] an observation is one read of a thread-local
//! flag.
//!
//! The amaxes come back raw; [`apply_group_rule`] gives each linear its shared-input group's
//! largest amax (q/k/v, gate/up), which is what the exporter and the fake quantizers use.

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use qatflow_core::Progress;
use qatflow_nvfp4::linears::shared_input_group;

use crate::arch::layers::to_dtype;
use crate::arch::model::CausalLm;
use crate::linear::{InputAmaxHook, QLinear};

/// Errors of calibration.
#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    /// No calibration sequences were given, or all are empty.
    #[error("no calibration tokens: give at least one non-empty sequence")]
    Empty,
    /// A token id is outside the model's vocabulary.
    #[error("calibration sequence {index} holds token {token}, outside the model's vocabulary of {vocab_size}; tokenize with the model's own tokenizer")]
    TokenOutOfRange {
        /// Index of the sequence.
        index: usize,
        /// The token id.
        token: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// An activation was NaN or infinite.
    #[error("calibration: {0}")]
    NonFinite(#[from] qatflow_nvfp4::Error),
    /// Calibration is already running on this thread.
    #[error("calibrate_inputs was called while a calibration is running on the same thread")]
    Nested,
}

/// Sequences per forward pass during calibration (only sequences of equal length share one,
/// so that no padding position reaches a linear's input).
const CALIB_BATCH: usize = 8;

/// Runs `model` forward over `sequences` and returns, per quantized linear (Hugging Face
/// module name), the largest `|x|` its input reached: ModelOpt's max calibration, raw (no
/// group rule). `progress` counts sequences. Empty sequences are skipped.
pub fn calibrate_inputs<B: Backend>(
    model: &CausalLm<B>,
    sequences: &[Vec<u32>],
    progress: &dyn Progress,
) -> Result<BTreeMap<String, f32>, CalibError> {
    let vocab_size = model.config().vocab_size;
    for (index, s) in sequences.iter().enumerate() {
        if let Some(&token) = s.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(CalibError::TokenOutOfRange {
                index,
                token,
                vocab_size,
            });
        }
    }
    let nonempty: Vec<&Vec<u32>> = sequences.iter().filter(|s| !s.is_empty()).collect();
    if nonempty.is_empty() {
        return Err(CalibError::Empty);
    }
    progress.set_total(nonempty.len() as u64);
    let device = model.device();
    let hook = InputAmaxHook::install().ok_or(CalibError::Nested)?;
    let mut i = 0;
    while i < nonempty.len() {
        let len = nonempty[i].len();
        let mut j = i + 1;
        while j < nonempty.len() && j - i < CALIB_BATCH && nonempty[j].len() == len {
            j += 1;
        }
        let ids: Vec<i32> = nonempty[i..j]
            .iter()
            .flat_map(|s| s.iter().map(|&t| t as i32))
            .collect();
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [j - i, len]), &device);
        // Only the linears' inputs matter; reading one value back makes the backend run
        // the whole forward.
        let hidden = model.forward_hidden(input, None, None);
        let _ = to_dtype(hidden.slice([0..1, 0..1, 0..1]), DType::F32).into_data();
        progress.advance((j - i) as u64);
        i = j;
    }
    Ok(hook.finish()?)
}

/// Each linear's amax replaced by the largest amax of its shared-input group
/// ([`shared_input_group`]: q/k/v, gate/up); group members missing from `amax` are ignored.
pub fn apply_group_rule(amax: &BTreeMap<String, f32>) -> BTreeMap<String, f32> {
    amax.iter()
        .map(|(name, &own)| {
            let shared = shared_input_group(name)
                .iter()
                .filter_map(|m| amax.get(m))
                .fold(own, |m, &a| m.max(a));
            (name.clone(), shared)
        })
        .collect()
}

/// `max|W|` of each quantized linear's weight (Hugging Face module name → amax), no group
/// rule: the weight quantizer's calibration for PTQ.
pub fn weight_amax<B: Backend>(model: &CausalLm<B>) -> BTreeMap<String, f32> {
    // Cloning a burn module shares its tensors; it only gives access to `linears_mut`.
    let mut model = model.clone();
    model
        .linears_mut()
        .into_iter()
        .map(|l: &mut QLinear<B>| {
            let amax = to_dtype(l.weight.val().abs().max(), DType::F32)
                .into_data()
                .iter::<f32>()
                .next()
                .unwrap_or(0.0);
            (l.name.clone(), amax)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_rule_takes_the_group_max() {
        let amax: BTreeMap<String, f32> = [
            ("l.0.self_attn.q_proj", 1.0),
            ("l.0.self_attn.k_proj", 3.0),
            ("l.0.self_attn.v_proj", 2.0),
            ("l.0.self_attn.o_proj", 5.0),
            ("l.0.mlp.gate_proj", 0.5),
            ("l.0.mlp.up_proj", 0.25),
            ("l.0.mlp.down_proj", 9.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let g = apply_group_rule(&amax);
        let want = [3.0, 3.0, 3.0, 5.0, 0.5, 0.5, 9.0];
        let names = [
            "l.0.self_attn.q_proj",
            "l.0.self_attn.k_proj",
            "l.0.self_attn.v_proj",
            "l.0.self_attn.o_proj",
            "l.0.mlp.gate_proj",
            "l.0.mlp.up_proj",
            "l.0.mlp.down_proj",
        ];
        for (n, w) in names.iter().zip(want) {
            assert_eq!(g[*n], w, "{n}");
        }
    }
}
