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
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};
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

/// Most sequences per forward pass during calibration.
const CALIB_BATCH: usize = 8;

/// A calibration pass of a dense model on a GPU may carry padding up to its real tokens
/// divided by this (a quarter): sequences of near lengths share one forward pass (fewer
/// passes and fewer distinct shapes to compile kernels for); the padding positions are left
/// out of the maxima.
const PAD_SLACK: usize = 4;

/// Groups sequence `lengths` into forward passes, longest first: at most [`CALIB_BATCH`]
/// sequences each; with `pad`, sequences shorter than the pass's first one are right-padded
/// as long as the padding stays within [`PAD_SLACK`], else only equal lengths share a pass.
fn batches(lengths: &[usize], pad: bool) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut rest = order.into_iter().peekable();
    while let Some(first) = rest.next() {
        let longest = lengths[first];
        let mut batch = vec![first];
        let mut real = longest;
        while batch.len() < CALIB_BATCH {
            let Some(&next) = rest.peek() else { break };
            let len = lengths[next];
            let padding = longest * (batch.len() + 1) - (real + len);
            let fits = if pad {
                padding * PAD_SLACK <= real + len
            } else {
                len == longest
            };
            if !fits {
                break;
            }
            batch.push(next);
            real += len;
            rest.next();
        }
        out.push(batch);
    }
    out
}

/// Runs `model` forward over `sequences` and returns, per quantized linear (Hugging Face
/// module name), the largest `|x|` its input reached: ModelOpt's max calibration, raw (no
/// group rule). `progress` counts sequences. Empty sequences are skipped.
pub fn calibrate_inputs<B: Backend>(
    model: &CausalLm<B>,
    sequences: &[Vec<u32>],
    progress: &dyn Progress,
) -> Result<BTreeMap<String, f32>, CalibError> {
    // Every linear of a dense decoder sees `[batch, seq, features]`, what padding needs;
    // Qwen3.5's Gated DeltaNet layers share passes only between equal lengths. On the CPU
    // padded passes were slower (8 SmolLM2 conversations: 74.0 s against 56.6 s one length
    // per pass, 3 runs each on the 2-core VM): there, too, only equal lengths share one.
    let pad = matches!(model, CausalLm::Llama(_) | CausalLm::Qwen3(_))
        && qatflow_kernels::gemm::cuda_index::<B>(&model.device()).is_some();
    calibrate_passes(model, sequences, progress, pad)
}

/// [`calibrate_inputs`] with sequences of near lengths padded into shared passes or not.
fn calibrate_passes<B: Backend>(
    model: &CausalLm<B>,
    sequences: &[Vec<u32>],
    progress: &dyn Progress,
    pad: bool,
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
    let lengths: Vec<usize> = nonempty.iter().map(|s| s.len()).collect();
    for batch in batches(&lengths, pad) {
        let len = lengths[batch[0]];
        let mut ids = Vec::with_capacity(batch.len() * len);
        let mut padding = Vec::with_capacity(batch.len() * len);
        for &k in &batch {
            let s = nonempty[k];
            ids.extend(s.iter().map(|&t| t as i32));
            ids.extend(std::iter::repeat_n(0, len - s.len()));
            padding.extend((0..len).map(|p| p >= s.len()));
        }
        let shape = [batch.len(), len];
        hook.set_padding(
            padding
                .contains(&true)
                .then(|| Tensor::<B, 2, Bool>::from_data(TensorData::new(padding, shape), &device)),
        );
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, shape), &device);
        // Only the linears' inputs matter; reading one value back makes the backend run
        // the whole forward.
        let hidden = model.forward_hidden(input, None, None);
        let _ = to_dtype(hidden.slice([0..1, 0..1, 0..1]), DType::F32).into_data();
        progress.advance(batch.len() as u64);
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
    use crate::arch::init::{random_init, tiny_config};
    use crate::config::Architecture;
    use burn::backend::Flex;
    use qatflow_core::NoProgress;

    #[test]
    fn passes_take_near_lengths_longest_first_and_every_sequence_once() {
        let lengths = [5, 40, 38, 7, 40, 39, 3, 40, 36, 5];
        let padded = batches(&lengths, true);
        assert_eq!(padded[0], vec![1, 4, 7, 5, 2, 8, 3]);
        for pass in &padded {
            let longest = lengths[pass[0]];
            let real: usize = pass.iter().map(|&i| lengths[i]).sum();
            assert!(pass.len() <= CALIB_BATCH);
            assert!(
                (longest * pass.len() - real) * PAD_SLACK <= real,
                "{pass:?}"
            );
        }
        let mut seen: Vec<usize> = padded.concat();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        let equal = batches(&lengths, false);
        assert_eq!(equal[0], vec![1, 4, 7]);
        assert!(equal
            .iter()
            .all(|p| p.iter().all(|&i| lengths[i] == lengths[p[0]])));
        assert_eq!(batches(&[4; 20], true).len(), 3);
    }

    #[test]
    fn padded_passes_give_the_maxima_of_one_sequence_at_a_time() {
        let device = Default::default();
        for arch in [Architecture::Llama, Architecture::Qwen3] {
            let model = random_init::<Flex>(&tiny_config(arch, 64), 7, &device);
            let sequences: Vec<Vec<u32>> = [9usize, 12, 11, 12, 10, 3]
                .iter()
                .enumerate()
                .map(|(k, &n)| (0..n).map(|t| ((t * 7 + k * 13) % 64) as u32).collect())
                .collect();
            assert!(
                batches(&sequences.iter().map(Vec::len).collect::<Vec<_>>(), true)
                    .iter()
                    .any(|p| p
                        .iter()
                        .any(|&i| sequences[i].len() != sequences[p[0]].len()))
            );
            let together = calibrate_passes(&model, &sequences, &NoProgress, true).unwrap();
            let mut alone: BTreeMap<String, f32> = BTreeMap::new();
            for s in &sequences {
                for (name, a) in
                    calibrate_inputs(&model, std::slice::from_ref(s), &NoProgress).unwrap()
                {
                    let m = alone.entry(name).or_insert(0.0);
                    *m = m.max(a);
                }
            }
            assert_eq!(together.len(), alone.len());
            for (name, a) in &alone {
                let b = together[name];
                assert!(
                    (a - b).abs() <= 1e-5 * a.abs(),
                    "{arch:?} {name}: {a} vs {b}"
                );
            }
        }
    }

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
