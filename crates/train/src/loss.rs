//! The assistant-only losses, over exactly the positions whose *target* token the model
//! generates when serving (the `model` crate's assistant mask), computed from hidden states
//! in row chunks so the `[tokens, vocab]` logits never exist at once in f32 for the whole
//! batch:
//! - SFT: next-token cross-entropy. On CUDA the LM head and the loss are one operation
//!   (`qatflow_kernels::loss`) that also recomputes the chunks in backward.
//! - QAD: forward KL(teacher ‖ student) at temperature 1 against a teacher model run on the
//!   same device without gradients ([`Objective::Qad`]), optionally mixed with the SFT loss.

use burn::tensor::backend::{AutodiffBackend, Backend};
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

    /// The padded token ids as the model's `[batch, width]` input on `device`.
    pub fn ids_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        let data = TensorData::new(self.ids.clone(), [self.lengths.len(), self.width]);
        Tensor::from_data(data, device)
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
        let picked = log_softmax(model.logits(flat.clone().select(0, idx))).gather(1, tgt);
        total = total - picked.sum();
    }
    total
}

/// `[rows, vocab]` logits as f32 log-probabilities.
fn log_softmax<B: Backend>(logits: Tensor<B, 2>) -> Tensor<B, 2> {
    qatflow_kernels::reduce::log_softmax(qatflow_kernels::to_dtype(logits, DType::F32))
}

/// Sum over `batch`'s target positions of KL(teacher ‖ student) between the next-token
/// distributions (a scalar tensor `[1]` in f32), from the student's hidden states (with
/// gradient) and the teacher's (without). The gradient with respect to the student's logits
/// is `p_student − p_teacher` at each target position and zero elsewhere.
pub fn kl_sum_from_hidden<B: AutodiffBackend>(
    student: &CausalLm<B>,
    hidden: Tensor<B, 3>,
    teacher: &CausalLm<B::InnerBackend>,
    teacher_hidden: Tensor<B::InnerBackend, 3>,
    batch: &Batch,
) -> Tensor<B, 1> {
    let device = hidden.device();
    let inner_device = teacher_hidden.device();
    let [b, w, h] = hidden.dims();
    let flat = hidden.reshape([b * w, h]);
    let teacher_flat = teacher_hidden.reshape([b * w, teacher.config().hidden_size]);
    let vocab = student.config().vocab_size;
    let chunk = (MAX_CHUNK_LOGITS / vocab.max(1)).max(1);
    let mut total = Tensor::<B, 1>::zeros([1], (&device, DType::F32));
    for rows in batch.rows.chunks(chunk) {
        let n = rows.len();
        let data = TensorData::new(rows.to_vec(), [n]);
        let idx = Tensor::<B, 1, Int>::from_data(data.clone(), &device);
        let inner_idx = Tensor::<B::InnerBackend, 1, Int>::from_data(data, &inner_device);
        let log_p_teacher = log_softmax(teacher.logits(teacher_flat.clone().select(0, inner_idx)));
        let p_teacher = Tensor::<B, 2>::from_inner(log_p_teacher.clone().exp());
        let log_p_teacher = Tensor::<B, 2>::from_inner(log_p_teacher);
        let log_p_student = log_softmax(student.logits(flat.clone().select(0, idx)));
        total = total + (p_teacher * (log_p_teacher - log_p_student)).sum();
    }
    total
}

/// What the student learns from: the data's tokens, or a teacher's distributions too.
pub enum Objective<B: AutodiffBackend> {
    /// Next-token cross-entropy ([`nll_sum_from_hidden`]).
    Sft,
    /// Quantization-aware distillation: `(1 − sft_weight)·KL + sft_weight·NLL` per target.
    Qad {
        /// The teacher (the BF16 model), without fake quantization or gradients.
        teacher: Box<CausalLm<B::InnerBackend>>,
        /// Weight of the SFT loss in the mix, in [0, 1].
        sft_weight: f64,
    },
}

/// Runs the training forward of `batch` and returns its summed loss under `objective`
/// (the summed target NLL for [`Objective::Sft`]).
pub fn loss_sum<B: AutodiffBackend>(
    model: &CausalLm<B>,
    batch: &Batch,
    objective: &Objective<B>,
) -> Tensor<B, 1> {
    let ids = batch.ids_tensor::<B>(&model.device());
    let hidden = model.forward_hidden(ids.clone(), Some(&batch.lengths), None);
    loss_sum_from_hidden(model, hidden, ids, batch, objective)
}

/// [`loss_sum`] from the student's final hidden states `hidden` of `ids` (the batch's token
/// ids as a tensor).
pub fn loss_sum_from_hidden<B: AutodiffBackend>(
    model: &CausalLm<B>,
    hidden: Tensor<B, 3>,
    ids: Tensor<B, 2, Int>,
    batch: &Batch,
    objective: &Objective<B>,
) -> Tensor<B, 1> {
    match objective {
        Objective::Sft => nll_sum_from_hidden(model, hidden, batch),
        Objective::Qad {
            teacher,
            sft_weight,
        } => {
            let teacher_hidden = teacher.forward_hidden(ids.inner(), Some(&batch.lengths), None);
            let kl = kl_sum_from_hidden(model, hidden.clone(), teacher, teacher_hidden, batch);
            if *sft_weight == 0.0 {
                kl
            } else {
                kl * (1.0 - sft_weight) + nll_sum_from_hidden(model, hidden, batch) * *sft_weight
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::module::AutodiffModule;
    use qatflow_model::init::{random_init, tiny_config};
    use qatflow_model::Architecture;

    type A = Autodiff<Flex>;

    fn example(ids: &[u32], mask: &[bool]) -> Example {
        Example {
            ids: ids.to_vec(),
            mask: mask.to_vec(),
        }
    }

    /// The gradient of the leaf `x` in `grads`, flattened.
    fn grad_of<const D: usize>(
        x: &Tensor<A, D>,
        grads: &<A as AutodiffBackend>::Gradients,
    ) -> Vec<f32> {
        x.grad(grads).unwrap().into_data().to_vec::<f32>().unwrap()
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
        let ids = batch.ids_tensor::<A>(&Default::default());
        let hidden = model
            .forward_hidden(ids, Some(&batch.lengths), None)
            .detach()
            .require_grad();
        let loss = nll_sum_from_hidden(&model, hidden.clone(), &batch);
        let g = grad_of(&hidden, &loss.backward());
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
        let model = random_init::<A>(&config, 5, &Default::default());
        let ids = vec![3u32, 14, 15, 9, 26, 5, 35];
        let ex = example(&ids, &[true; 7]);
        let sum: f32 = loss_sum(&model, &Batch::new(&[&ex]), &Objective::Sft).into_scalar();
        let report = qatflow_model::eval_nll(&model, vec![ids]).unwrap();
        assert!(
            (sum as f64 / 6.0 - report.mean_nll).abs() < 1e-5,
            "{sum} vs {report:?}"
        );
    }

    fn qad(teacher: CausalLm<Flex>, sft_weight: f64) -> Objective<A> {
        Objective::Qad {
            teacher: Box::new(teacher),
            sft_weight,
        }
    }

    #[test]
    fn qad_against_itself_is_zero_and_against_another_model_is_eval_kld() {
        let config = tiny_config(Architecture::Llama, 61);
        let student = random_init::<A>(&config, 5, &Default::default());
        let ids = vec![3u32, 14, 15, 9, 26, 5, 35, 7];
        let ex = example(&ids, &[true; 8]);
        let batch = Batch::new(&[&ex]);
        let own = qad(student.valid(), 0.0);
        let kl: f32 = loss_sum(&student, &batch, &own).into_scalar();
        assert!(kl.abs() < 1e-5, "{kl}");
        // The KL at the 7 target positions is eval's KL over the first 7 tokens (the same
        // contexts), with the teacher as eval's base.
        let teacher = random_init::<Flex>(&config, 6, &Default::default());
        let report =
            qatflow_model::eval_kld(&teacher, &student.valid(), vec![ids[..7].to_vec()]).unwrap();
        let kl: f32 = loss_sum(&student, &batch, &qad(teacher.clone(), 0.0)).into_scalar();
        assert!(kl > 0.0);
        assert!(
            (kl as f64 / 7.0 - report.mean_kld).abs() < 1e-5 * report.mean_kld.max(1.0),
            "{kl} vs {report:?}"
        );
        // sft_weight mixes in the cross-entropy linearly.
        let nll: f32 = loss_sum(&student, &batch, &Objective::Sft).into_scalar();
        let mixed: f32 = loss_sum(&student, &batch, &qad(teacher.clone(), 0.25)).into_scalar();
        assert!(
            (mixed - (0.75 * kl + 0.25 * nll)).abs() < 1e-4 * nll,
            "{mixed}"
        );
        let only_nll: f32 = loss_sum(&student, &batch, &qad(teacher, 1.0)).into_scalar();
        assert!((only_nll - nll).abs() < 1e-5 * nll, "{only_nll} vs {nll}");
    }

    #[test]
    fn qad_gradient_reaches_only_target_rows_and_is_p_student_minus_p_teacher() {
        let config = tiny_config(Architecture::Llama, 29);
        let student = random_init::<A>(&config, 2, &Default::default());
        let teacher = random_init::<Flex>(&config, 3, &Default::default());
        let ex = example(&[1, 5, 9, 13, 17], &[false, false, true, true, false]);
        let batch = Batch::new(&[&ex]);
        let ids = batch.ids_tensor::<A>(&Default::default());
        let hidden = student.forward_hidden(ids.clone(), Some(&batch.lengths), None);
        let teacher_hidden = teacher.forward_hidden(ids.inner(), Some(&batch.lengths), None);
        // Gradient with respect to the logits: take them as the leaf.
        let logits = student.logits(hidden.clone()).detach().require_grad();
        let t_log_p = log_softmax(teacher.logits(teacher_hidden.clone()).squeeze_dim::<2>(0));
        let s_log_p = log_softmax(logits.clone().squeeze_dim::<2>(0));
        let kl = (Tensor::<A, 2>::from_inner(t_log_p.clone().exp())
            * (Tensor::<A, 2>::from_inner(t_log_p.clone()) - s_log_p.clone()))
        .select(
            0,
            Tensor::<A, 1, Int>::from_data(TensorData::new(vec![1, 2], [2]), &Default::default()),
        )
        .sum();
        let g = grad_of(&logits, &kl.backward());
        let ps = s_log_p.inner().exp().into_data().to_vec::<f32>().unwrap();
        let pt = t_log_p.exp().into_data().to_vec::<f32>().unwrap();
        for (i, ((g, s), t)) in g.iter().zip(&ps).zip(&pt).enumerate() {
            let row = i / 29;
            let want = if row == 1 || row == 2 { s - t } else { 0.0 };
            assert!((g - want).abs() < 1e-6, "row {row}: {g} vs {want}");
        }
        // kl_sum_from_hidden computes the same value at the same rows.
        let sum: f32 =
            kl_sum_from_hidden(&student, hidden, &teacher, teacher_hidden, &batch).into_scalar();
        let direct: f32 = kl.into_scalar();
        assert!((sum - direct).abs() < 1e-5, "{sum} vs {direct}");
    }
}
