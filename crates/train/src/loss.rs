//! The assistant-only loss: next-token cross-entropy summed over exactly the positions
//! whose *target* token the model generates when serving (the `model` crate's assistant
//! mask), computed from hidden states in row chunks so the `[tokens, vocab]` logits never
//! exist at once in f32 for the whole batch. On CUDA the LM head and the loss are one
//! operation (`qatflow_kernels::loss`) that also recomputes the chunks in backward.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use qatflow_model::CausalLm;

use crate::data::Example;

/// Largest logits chunk, in elements (rows × vocabulary).
pub const MAX_CHUNK_LOGITS: usize = 1 << 26;

/// A padded micro-batch ready for the model.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids `[batch × width]`, right-padded with 0.
    pub ids: Vec<i32>,
    /// Unpadded lengths.
    pub lengths: Vec<usize>,
    /// Padded width.
    pub width: usize,
    /// Flat row indices `b × width + t` whose next token `t + 1` is a loss target.
    pub rows: Vec<i32>,
    /// The target token of each row.
    pub targets: Vec<i32>,
}

impl Batch {
    /// Pads `examples` into one batch and lists its loss positions.
    pub fn new(examples: &[&Example]) -> Batch {
        let width = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = vec![0i32; examples.len() * width];
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for (b, e) in examples.iter().enumerate() {
            for (t, &id) in e.ids.iter().enumerate() {
                ids[b * width + t] = id as i32;
                if t > 0 && e.mask[t] {
                    rows.push((b * width + t - 1) as i32);
                    targets.push(id as i32);
                }
            }
        }
        Batch {
            ids,
            lengths: examples.iter().map(|e| e.ids.len()).collect(),
            width,
            rows,
            targets,
        }
    }

    /// Tokens in the batch (unpadded).
    pub fn tokens(&self) -> usize {
        self.lengths.iter().sum()
    }
}

/// Sum of the negative log-likelihoods of `batch`'s targets given hidden states
/// `[batch, width, hidden]` (a scalar tensor `[1]` in f32). Positions outside the mask are
/// never gathered, so their hidden states receive exactly zero gradient.
pub fn nll_sum_from_hidden<B: Backend>(
    model: &CausalLm<B>,
    hidden: Tensor<B, 3>,
    batch: &Batch,
) -> Tensor<B, 1> {
    let device = hidden.device();
    let [b, w, h] = hidden.dims();
    let flat = hidden.reshape([b * w, h]);
    let vocab = model.config().vocab_size;
    let chunk = (MAX_CHUNK_LOGITS / vocab.max(1)).max(1);
    if !batch.rows.is_empty() && qatflow_kernels::loss::supported::<B>(&device, flat.dtype()) {
        // Training on CUDA: one operation that recomputes each chunk's logits in backward.
        let n = batch.rows.len();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(batch.rows.clone(), [n]), &device);
        let rows = flat.clone().select(0, idx);
        match qatflow_kernels::loss::try_nll_sum(
            rows,
            model.lm_head_weight(),
            &batch.targets,
            chunk,
        ) {
            Ok(total) => return total,
            Err(_) => unreachable!("`supported` said the chunked loss runs here"),
        }
    }
    let mut total = Tensor::<B, 1>::zeros([1], (&device, DType::F32));
    for (rows, targets) in batch.rows.chunks(chunk).zip(batch.targets.chunks(chunk)) {
        let n = rows.len();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(rows.to_vec(), [n]), &device);
        let tgt =
            Tensor::<B, 2, Int>::from_data(TensorData::new(targets.to_vec(), [n, 1]), &device);
        let logits = model.logits(flat.clone().select(0, idx));
        let logits = if logits.dtype() == DType::F32 {
            logits
        } else {
            logits.cast(DType::F32)
        };
        let max = logits.clone().detach().max_dim(1);
        let shifted = logits - max;
        let lse = shifted.clone().exp().sum_dim(1).log();
        let picked = shifted.gather(1, tgt);
        total = total + (lse - picked).sum();
    }
    total
}

/// Runs the training forward of `batch` and returns the summed target NLL.
pub fn nll_sum<B: Backend>(model: &CausalLm<B>, batch: &Batch) -> Tensor<B, 1> {
    let device = model.device();
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(batch.ids.clone(), [batch.lengths.len(), batch.width]),
        &device,
    );
    let hidden = model.forward_hidden(ids, Some(&batch.lengths), None);
    nll_sum_from_hidden(model, hidden, batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use qatflow_model::init::{random_init, tiny_config};
    use qatflow_model::Architecture;

    type A = Autodiff<Flex>;

    fn example(ids: &[u32], mask: &[bool]) -> Example {
        Example {
            ids: ids.to_vec(),
            mask: mask.to_vec(),
        }
    }

    #[test]
    fn only_masked_targets_are_rows() {
        let a = example(&[5, 6, 7, 8], &[false, true, true, false]);
        let b = example(&[9, 10], &[false, true]);
        let batch = Batch::new(&[&a, &b]);
        assert_eq!(batch.width, 4);
        assert_eq!(batch.rows, vec![0, 1, 4]);
        assert_eq!(batch.targets, vec![6, 7, 10]);
        assert_eq!(batch.tokens(), 6);
    }

    #[test]
    fn positions_outside_the_mask_get_exactly_zero_gradient() {
        let config = tiny_config(Architecture::Llama, 97);
        let model = random_init::<A>(&config, 3, &Default::default());
        let ex = example(
            &[1, 5, 9, 13, 17, 21],
            &[false, false, true, true, false, false],
        );
        let batch = Batch::new(&[&ex]);
        let ids = Tensor::<A, 2, Int>::from_data(
            TensorData::new(batch.ids.clone(), [1, batch.width]),
            &Default::default(),
        );
        let hidden = model
            .forward_hidden(ids, Some(&batch.lengths), None)
            .detach()
            .require_grad();
        let loss = nll_sum_from_hidden(&model, hidden.clone(), &batch);
        let grads = loss.backward();
        let g = hidden
            .grad(&grads)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let h = config.hidden_size;
        // Rows 1 and 2 predict the masked tokens 2 and 3; every other row is untouched.
        for pos in 0..6 {
            let row = &g[pos * h..(pos + 1) * h];
            let nonzero = row.iter().any(|&v| v != 0.0);
            assert_eq!(nonzero, pos == 1 || pos == 2, "position {pos}");
        }
    }

    #[test]
    fn chunked_sum_equals_eval_nll() {
        // The same targets as eval's full-sequence NLL when every token is a target.
        let config = tiny_config(Architecture::Qwen3, 61);
        let model = random_init::<Flex>(&config, 5, &Default::default());
        let ids = vec![3u32, 14, 15, 9, 26, 5, 35];
        let ex = example(&ids, &[true; 7]);
        let sum: f32 = nll_sum(&model, &Batch::new(&[&ex])).into_scalar();
        let report = qatflow_model::eval_nll(&model, vec![ids]).unwrap();
        assert!(
            (sum as f64 / 6.0 - report.mean_nll).abs() < 1e-5,
            "{sum} vs {report:?}"
        );
    }
}
