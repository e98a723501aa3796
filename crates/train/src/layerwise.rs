//! The optimizer step that updates each block during backward
//! (`optim.update_during_backward`), so the whole model's gradients never exist at once.
//!
//! The forward detaches the hidden states at every block boundary
//! ([`CausalLm::forward_hidden_split`]): the embedding, each decoder block, and the final
//! norm with the loss become separate autodiff graphs. Backward then runs them from the
//! last: the loss's graph gives the final norm's and LM head's gradients and the gradient of
//! the last block's output; each block's graph is differentiated from that gradient
//! (`sum(output ⊙ g)` has exactly `g` as its output gradient), its parameters are updated
//! with AdamW at once, and their old values and gradients are freed before the next block.
//! The peak holds one block's gradients instead of all of them (plus, with tied embeddings,
//! the LM head's share of the embedding gradient, added to the lookup's at the end).
//!
//! The arithmetic is the whole-graph step's: each gradient is the same sum of the same
//! terms, and the update is the same AdamW (unclipped: the global norm is only known after
//! the last block, so the configuration asks for `grad_clip = 0`; the norm is still
//! reported). The update's order over parameters differs, which only matters to the CPU
//! tensor form of stochastic rounding (its draws come from one generator in update order).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use qatflow_model::params::replace_params;
use qatflow_model::CausalLm;

use crate::data::Example;
use crate::grads::param_grads;
use crate::loss::{loss_sum_from_hidden, Batch, Objective};
use crate::metrics::StepStats;
use crate::optim::{uniform, AdamW};

/// What the segments' updates share: the optimizer, the step's learning rate, the parameters
/// already updated, gradients waiting for a later segment, the running Σg².
struct Updater<'a, B: AutodiffBackend> {
    optimizer: &'a mut AdamW<B::InnerBackend>,
    lr: f64,
    device: burn::tensor::Device<B::InnerBackend>,
    /// Parameters used by more than one segment (the tied embedding): their gradient is
    /// complete only after the embedding's segment.
    shared: BTreeSet<String>,
    waiting: BTreeMap<String, Tensor<B::InnerBackend, 1>>,
    updated: BTreeSet<String>,
    square_sum: Option<Tensor<B::InnerBackend, 1>>,
    update_s: f64,
}

impl<B: AutodiffBackend> Updater<'_, B> {
    /// Updates every parameter with a gradient in `grads` (keeping shared ones' gradients
    /// until `last`), and puts the new values into the model.
    fn apply(&mut self, model: CausalLm<B>, grads: &B::Gradients, last: bool) -> CausalLm<B> {
        let started = Instant::now();
        let mut values = BTreeMap::new();
        for p in param_grads(&model, grads) {
            assert!(
                !self.updated.contains(&p.name),
                "`{}` received a gradient after its update: a parameter used by two blocks \
                 cannot be updated during backward",
                p.name
            );
            let grad = match self.waiting.remove(&p.name) {
                // The order of burn's own accumulation: the earlier segment's share first.
                Some(earlier) => earlier + p.grad,
                None => p.grad,
            };
            if self.shared.contains(&p.name) && !last {
                self.waiting.insert(p.name, grad);
                continue;
            }
            let sq = qatflow_kernels::reduce::square_sum(grad.clone());
            self.square_sum = Some(match self.square_sum.take() {
                Some(acc) => acc + sq,
                None => sq,
            });
            let device = self.device.clone();
            let new = self
                .optimizer
                .update(&p.name, p.value, grad, 1.0, self.lr, |n| {
                    uniform::<B::InnerBackend>(n, &device)
                });
            values.insert(p.name.clone(), Tensor::from_inner(new));
            self.updated.insert(p.name);
        }
        let model = replace_params(model, &mut values);
        self.update_s += started.elapsed().as_secs_f64();
        model
    }
}

/// One optimizer step over one micro-batch `examples` with every block's parameters
/// updated as soon as its gradients exist (see the module docs). `sr_seed` seeds stochastic
/// rounding. Returns the updated model and the step's statistics (`optimizer_s` is the host
/// time spent issuing the updates, which run interleaved with backward).
pub fn step<B: AutodiffBackend>(
    model: CausalLm<B>,
    optimizer: &mut AdamW<B::InnerBackend>,
    objective: &Objective<B>,
    examples: &[&Example],
    lr: f64,
    sr_seed: u64,
) -> (CausalLm<B>, StepStats) {
    let started = Instant::now();
    let targets: usize = examples.iter().map(|e| e.targets()).sum();
    let batch = Batch::new(examples);
    let ids = batch.ids_tensor::<B>(&model.device());
    // outs[i]: what reached boundary i (the embedding's output, then each block's);
    // leaves[i]: the fresh leaf the next segment read instead.
    let mut outs = Vec::new();
    let mut leaves = Vec::new();
    let hidden = model.forward_hidden_split(ids.clone(), Some(&batch.lengths), &mut |_, x| {
        let leaf = x.clone().detach().require_grad();
        outs.push(x);
        leaves.push(leaf.clone());
        leaf
    });
    let loss = loss_sum_from_hidden(&model, hidden, ids, &batch, objective) / targets.max(1) as f64;
    let loss_value = loss.clone().into_scalar().elem::<f32>();
    let inner_device = loss.clone().inner().device();
    optimizer.seed_rounding(&inner_device, sr_seed);
    let shared = model.shared_params().into_iter().collect();
    let mut updater = Updater::<B> {
        optimizer,
        lr,
        device: inner_device,
        shared,
        waiting: BTreeMap::new(),
        updated: BTreeSet::new(),
        square_sum: None,
        update_s: 0.0,
    };
    let grads = loss.backward();
    let mut model = updater.apply(model, &grads, false);
    let mut g = boundary_grad(leaves.pop(), &grads);
    drop(grads);
    while let Some(out) = outs.pop() {
        let seeded = (out * Tensor::from_inner(g)).sum();
        let grads = seeded.backward();
        model = updater.apply(model, &grads, outs.is_empty());
        match leaves.pop() {
            Some(leaf) => g = boundary_grad(Some(leaf), &grads),
            None => break,
        }
    }
    assert!(
        updater.waiting.is_empty(),
        "gradients of {:?} were never applied",
        updater.waiting.keys().collect::<Vec<_>>()
    );
    updater.optimizer.finish_step();
    let grad_norm = updater
        .square_sum
        .take()
        .map_or(0.0, |t| f64::from(t.into_scalar().elem::<f32>()))
        .sqrt();
    let stats = StepStats {
        loss: loss_value,
        grad_norm: grad_norm as f32,
        tokens: batch.tokens() as u64,
        targets: targets as u64,
        forward_backward_s: started.elapsed().as_secs_f64(),
        optimizer_s: updater.update_s,
    };
    (model, stats)
}

/// The gradient of a boundary's leaf (every segment reads its leaf, so it has one).
fn boundary_grad<B: AutodiffBackend>(
    leaf: Option<Tensor<B, 3>>,
    grads: &B::Gradients,
) -> Tensor<B::InnerBackend, 3> {
    leaf.and_then(|l| l.grad(grads))
        .expect("every block boundary feeds the next segment, so its leaf has a gradient")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MomentPrecision, OptimPrecision, OptimSection};
    use crate::run::{optimizer_step, StepOutcome};
    use burn::backend::{Autodiff, Flex};
    use burn::module::AutodiffModule;
    use qatflow_model::init::{config_json, tiny_config, write_random_model};
    use qatflow_model::params::named_params;
    use qatflow_model::{Architecture, LoadOptions, Precision};
    use qatflow_nvfp4::QuantizerAmax;
    use tokio_util::sync::CancellationToken;

    type A = Autodiff<Flex>;

    /// A random tiny model of `arch` (stored BF16, loaded at `precision`) with fake
    /// quantizers on its linears.
    fn quantized(arch: Architecture, tied: bool, precision: Precision) -> CausalLm<A> {
        let mut config = tiny_config(arch, 64);
        config.tie_word_embeddings = tied;
        let dir = tempfile::tempdir().unwrap();
        write_random_model(
            &config_json(&config),
            5,
            safetensors::Dtype::BF16,
            dir.path(),
        )
        .unwrap();
        let options = LoadOptions {
            precision,
            emulate_nvfp4_activations: false,
        };
        let mut model = CausalLm::<A>::load(dir.path(), options, &Default::default()).unwrap();
        let weight = qatflow_model::calib::weight_amax(&model.valid());
        for layer in model.linears_mut() {
            let q = QuantizerAmax {
                weight: weight.get(&layer.name).copied(),
                input: Some(3.0),
            };
            layer.set_fake_quant(q).unwrap();
        }
        model
    }

    /// Three steps over a padded batch of two; every parameter's bits after each, and the
    /// steps' losses and gradient norms.
    fn train(
        mut model: CausalLm<A>,
        precision: OptimPrecision,
        moments: MomentPrecision,
        during_backward: bool,
        objective: &Objective<A>,
    ) -> (Vec<Vec<u32>>, Vec<(f32, f32)>) {
        let mut optimizer = AdamW::new(OptimSection {
            precision,
            moments,
            grad_accum: 1,
            grad_clip: 0.0,
            weight_decay: 0.01,
            update_during_backward: during_backward,
            ..OptimSection::default()
        });
        let a = Example {
            ids: (0..11).map(|i| (i * 7 + 3) % 64).collect(),
            mask: (0..11).map(|i| i > 3).collect(),
        };
        let b = Example {
            ids: (0..6).map(|i| (i * 5 + 1) % 64).collect(),
            mask: (0..6).map(|i| i % 2 == 1).collect(),
        };
        let (mut bits, mut stats) = (Vec::new(), Vec::new());
        for step in 0..3 {
            let StepOutcome::Done(next, s) = optimizer_step(
                model,
                &mut optimizer,
                objective,
                &[vec![&a, &b]],
                1e-3,
                step,
                &CancellationToken::new(),
            ) else {
                unreachable!("never cancelled")
            };
            model = next;
            stats.push((s.loss, s.grad_norm));
            for p in named_params(&model.valid()) {
                let v = p.flat.into_data().convert::<f32>().to_vec::<f32>().unwrap();
                bits.push(v.iter().map(|x| x.to_bits()).collect());
            }
        }
        (bits, stats)
    }

    #[test]
    fn updating_during_backward_ends_where_the_whole_graph_step_does() {
        for (arch, tied) in [
            (Architecture::Qwen3, true),
            (Architecture::Llama, false),
            (Architecture::Qwen35, false),
        ] {
            for (precision, moments, stored) in [
                (OptimPrecision::Fp32, MomentPrecision::Fp32, Precision::F32),
                (
                    OptimPrecision::Bf16Kahan,
                    MomentPrecision::Bf16,
                    Precision::Bf16,
                ),
            ] {
                let what = format!("{arch:?} tied={tied} {precision:?}");
                let sft = Objective::Sft;
                let whole = train(
                    quantized(arch, tied, stored),
                    precision,
                    moments,
                    false,
                    &sft,
                );
                let split = train(
                    quantized(arch, tied, stored),
                    precision,
                    moments,
                    true,
                    &sft,
                );
                assert_eq!(whole.0.len(), split.0.len());
                for (i, (w, s)) in whole.0.iter().zip(&split.0).enumerate() {
                    let differ = w.iter().zip(s).filter(|(a, b)| a != b).count();
                    assert_eq!(differ, 0, "{what}: {differ} values of parameter {i} differ");
                }
                for ((lw, nw), (ls, ns)) in whole.1.iter().zip(&split.1) {
                    assert_eq!(lw, ls, "{what}: loss");
                    // Σg² is summed over parameters in another order.
                    assert!((nw - ns).abs() <= 1e-5 * nw, "{what}: norm {nw} vs {ns}");
                }
                assert!(whole.1[2].0 < whole.1[0].0, "{what}: the loss goes down");
            }
        }
    }

    #[test]
    fn updating_during_backward_under_distillation_ends_where_the_whole_graph_step_does() {
        // QAD: the loss's graph also holds the teacher's forward (no gradients).
        let teacher = quantized(Architecture::Qwen3, false, Precision::F32).valid();
        let qad = Objective::Qad {
            teacher: Box::new(teacher),
            sft_weight: 0.25,
        };
        let (p, m) = (OptimPrecision::Fp32, MomentPrecision::Fp32);
        let student = || quantized(Architecture::Qwen3, false, Precision::F32);
        let whole = train(student(), p, m, false, &qad);
        let split = train(student(), p, m, true, &qad);
        assert_eq!(whole.0, split.0, "parameters differ");
        assert_eq!(
            whole.1.iter().map(|s| s.0).collect::<Vec<_>>(),
            split.1.iter().map(|s| s.0).collect::<Vec<_>>()
        );
    }
}
