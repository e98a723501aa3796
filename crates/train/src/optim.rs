//! AdamW with updates that do not vanish in BF16, and the learning-rate schedule.
//!
//! With BF16 weights and a 1e-5 learning rate most updates are smaller than half a BF16
//! ulp and round-to-nearest drops them. [`OptimPrecision`] chooses the remedy: FP32 master
//! weights, a Kahan compensation buffer (what rounding dropped is carried into the next
//! step), or stochastic rounding (unbiased in expectation). All arithmetic of an update is
//! in f32; every tensor here is a flat view of one parameter, keyed by its Hugging Face
//! name, so the state saves and restores by name. On CUDA an update is one kernel
//! (`qatflow_kernels::adamw`, the same f32 arithmetic element by element) instead of the
//! tensor operations, which stored whole-parameter f32 temporaries; its stochastic rounding
//! draws 16 bits per element from a hash of the step's seed, the parameter's name and the
//! element's index (the tensor form draws from the backend's generator), so a resumed run
//! rounds as the uninterrupted one did.

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};
use qatflow_kernels::adamw::{self, AdamWStep, Slots};
use qatflow_kernels::to_dtype;

use crate::config::{MomentPrecision, OptimPrecision, OptimSection};

/// Optimizer state of one parameter.
#[derive(Debug, Clone)]
pub struct ParamState<B: Backend> {
    /// First moment (f32, or BF16 under [`MomentPrecision::Bf16`]).
    pub exp_avg: Tensor<B, 1>,
    /// Second moment (f32, or BF16 under [`MomentPrecision::Bf16`]).
    pub exp_avg_sq: Tensor<B, 1>,
    /// Kahan compensation (BF16), only under [`OptimPrecision::Bf16Kahan`].
    pub compensation: Option<Tensor<B, 1>>,
}

/// AdamW over named flat parameters.
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    /// Hyperparameters.
    pub hp: OptimSection,
    /// Completed optimizer steps (Adam's `t`).
    pub step: u64,
    /// Per-parameter state by Hugging Face name.
    pub state: BTreeMap<String, ParamState<B>>,
    /// This step's stochastic-rounding seed ([`AdamW::seed_rounding`]).
    rounding_seed: u64,
}

/// `t` widened to f32 (unchanged when it already is).
pub fn f32_of<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    to_dtype(t, DType::F32)
}

/// Rounds f32 values to BF16 stochastically: down or up to a neighbouring BF16 value with
/// probabilities proportional to the distance, using `uniform` draws in `[0, 1)`.
///
/// The BF16 spacing at `x` is `2^(floor(log2|x|) − 7)`; `log2` is computed in floating point,
/// so within float error of a power of two the spacing may be taken one binade off, which
/// keeps the result a BF16 value and the rounding unbiased up to that rare edge.
pub fn stochastic_round_bf16<B: Backend>(x: Tensor<B, 1>, uniform: Tensor<B, 1>) -> Tensor<B, 1> {
    let ln2 = std::f32::consts::LN_2;
    let mag = x.clone().abs().clamp_min(f32::MIN_POSITIVE);
    let exponent = (mag.log() / ln2).floor() - 7.0;
    // 2^e, snapped to an exact power of two by a BF16 round trip.
    let spacing = (exponent * ln2).exp().cast(DType::BF16).cast(DType::F32);
    let low = (x.clone() / spacing.clone()).floor() * spacing.clone();
    let frac = (x.clone() - low.clone()) / spacing.clone();
    let up = uniform.lower(frac).float();
    let rounded = low + spacing * up;
    let zero = x.clone().equal_elem(0.0);
    rounded.mask_fill(zero, 0.0).cast(DType::BF16)
}

impl<B: Backend> AdamW<B> {
    /// A fresh optimizer.
    pub fn new(hp: OptimSection) -> Self {
        AdamW {
            hp,
            step: 0,
            state: BTreeMap::new(),
            rounding_seed: 0,
        }
    }

    /// The learning rate of optimizer step `step` (0-based) out of `total`: linear warmup
    /// over `warmup_ratio × total` steps, then cosine decay to `lr × min_lr_ratio`.
    pub fn lr_at(hp: &OptimSection, step: u64, total: u64) -> f64 {
        let total = total.max(1) as f64;
        let warmup = (hp.warmup_ratio * total).ceil();
        let s = step as f64;
        if s < warmup {
            return hp.lr * (s + 1.0) / warmup;
        }
        let progress = ((s - warmup) / (total - warmup).max(1.0)).clamp(0.0, 1.0);
        let floor = hp.lr * hp.min_lr_ratio;
        floor + (hp.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    /// Applies one AdamW update to `param` (flat, f32 or BF16) with gradient `grad` (flat,
    /// any float dtype) times `grad_scale` (global-norm clipping; 1 for none) at learning
    /// rate `lr`; `uniform` supplies the random draws for stochastic rounding (ignored
    /// otherwise). Returns the new value in the parameter's dtype.
    pub fn update(
        &mut self,
        name: &str,
        param: Tensor<B, 1>,
        grad: Tensor<B, 1>,
        grad_scale: f64,
        lr: f64,
        uniform: impl FnOnce(usize) -> Tensor<B, 1>,
    ) -> Tensor<B, 1> {
        let hp = &self.hp;
        let t = (self.step + 1) as i32;
        let n = param.dims()[0];
        let device = param.device();
        let precision = hp.precision;
        let moments = match hp.moments {
            MomentPrecision::Fp32 => DType::F32,
            MomentPrecision::Bf16 => DType::BF16,
        };
        let state = self
            .state
            .entry(name.to_string())
            .or_insert_with(|| ParamState {
                exp_avg: Tensor::zeros([n], (&device, moments)),
                exp_avg_sq: Tensor::zeros([n], (&device, moments)),
                compensation: (precision == OptimPrecision::Bf16Kahan)
                    .then(|| Tensor::zeros([n], (&device, DType::BF16))),
            });
        let stored_weight = match precision {
            OptimPrecision::Fp32 => DType::F32,
            _ => DType::BF16,
        };
        if param.dtype() == stored_weight && adamw::available::<B>() {
            let mut step = AdamWStep::new(
                hp.beta1,
                hp.beta2,
                hp.eps,
                hp.weight_decay,
                lr,
                t,
                grad_scale,
            );
            if precision == OptimPrecision::Bf16Stochastic {
                step.stochastic = Some(parameter_seed(self.rounding_seed, name));
            }
            let slots = Slots {
                param,
                exp_avg: state.exp_avg.clone(),
                exp_avg_sq: state.exp_avg_sq.clone(),
                compensation: state.compensation.take(),
            };
            let kahan = precision == OptimPrecision::Bf16Kahan;
            let new = adamw::update(slots, grad, &step, kahan);
            state.exp_avg = new.exp_avg;
            state.exp_avg_sq = new.exp_avg_sq;
            state.compensation = new.compensation;
            return new.param;
        }
        let g = if grad_scale == 1.0 {
            f32_of(grad)
        } else {
            f32_of(grad) * grad_scale
        };
        let (b1, b2) = (hp.beta1, hp.beta2);
        let m = f32_of(state.exp_avg.clone()) * b1 + g.clone() * (1.0 - b1);
        let v = f32_of(state.exp_avg_sq.clone()) * b2 + g.clone() * g * (1.0 - b2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let denom = (v.clone() / bc2).sqrt() + hp.eps;
        let w = f32_of(param.clone());
        let mut delta = (m.clone() / bc1) / denom * (-lr);
        state.exp_avg = to_dtype(m, moments);
        state.exp_avg_sq = to_dtype(v, moments);
        if hp.weight_decay > 0.0 {
            delta = delta - w.clone() * (lr * hp.weight_decay);
        }
        match precision {
            OptimPrecision::Fp32 => w + delta,
            OptimPrecision::Bf16Plain => (w + delta).cast(DType::BF16),
            OptimPrecision::Bf16Stochastic => stochastic_round_bf16(w + delta, uniform(n)),
            OptimPrecision::Bf16Kahan => {
                let c = f32_of(state.compensation.clone().expect("kahan state exists"));
                let y = delta - c;
                let new = (w.clone() + y.clone()).cast(DType::BF16);
                let comp = (f32_of(new.clone()) - w) - y;
                state.compensation = Some(comp.cast(DType::BF16));
                new
            }
        }
    }

    /// Seeds this step's stochastic rounding: the CUDA kernel's seed, and the generator of
    /// `device` that the tensor form draws from.
    pub fn seed_rounding(&mut self, device: &B::Device, seed: u64) {
        B::seed(device, seed);
        self.rounding_seed = seed;
    }

    /// Marks the end of an optimizer step (after every parameter was updated).
    pub fn finish_step(&mut self) {
        self.step += 1;
    }
}

/// The stochastic-rounding seed of parameter `name` under step seed `seed` (FNV-1a of the
/// name folded into both halves of the seed).
fn parameter_seed(seed: u64, name: &str) -> u32 {
    let h = name.bytes().fold(0x811C_9DC5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    h ^ seed as u32 ^ (seed >> 32) as u32
}

/// Uniform `[0, 1)` draws for stochastic rounding on `device`.
pub fn uniform<B: Backend>(n: usize, device: &B::Device) -> Tensor<B, 1> {
    Tensor::random([n], Distribution::Uniform(0.0, 1.0), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    type B = Flex;

    fn bf16_param(values: &[f32]) -> Tensor<B, 1> {
        Tensor::<B, 1>::from_data(
            TensorData::new(values.to_vec(), [values.len()]),
            &Default::default(),
        )
        .cast(DType::BF16)
    }

    fn values(t: Tensor<B, 1>) -> Vec<f32> {
        t.cast(DType::F32).into_data().to_vec::<f32>().unwrap()
    }

    fn hp(precision: OptimPrecision) -> OptimSection {
        OptimSection {
            precision,
            ..OptimSection::default()
        }
    }

    /// Steps of lr 1e-5 on weights near 1.0 (BF16 ulp 2^-7 ≈ 0.0078): Adam's unit-size
    /// update is 1e-5, far below half an ulp.
    fn small_steps(precision: OptimPrecision, steps: usize) -> Vec<f32> {
        B::seed(&Default::default(), 7);
        let mut opt = AdamW::<B>::new(hp(precision));
        let mut w = bf16_param(&[1.0; 64]);
        for _ in 0..steps {
            let g = Tensor::<B, 1>::ones([64], &Default::default());
            w = opt.update("w", w, g, 1.0, 1e-5, |n| {
                uniform::<B>(n, &Default::default())
            });
            opt.finish_step();
        }
        values(w)
    }

    #[test]
    fn plain_bf16_loses_small_updates_compensated_ones_do_not() {
        // 1000 steps × 1e-5 = 0.01 in total, more than one ulp (0.0039 below 1.0).
        assert!(small_steps(OptimPrecision::Bf16Plain, 1000)
            .iter()
            .all(|&v| v == 1.0));
        let kahan = small_steps(OptimPrecision::Bf16Kahan, 1000);
        assert!(kahan.iter().all(|&v| v < 1.0), "{kahan:?}");
        assert!(kahan.iter().all(|&v| (v - 0.99).abs() < 0.004), "{kahan:?}");
        let sr = small_steps(OptimPrecision::Bf16Stochastic, 1000);
        let mean: f32 = sr.iter().sum::<f32>() / sr.len() as f32;
        assert!((mean - 0.99).abs() < 0.002, "mean {mean}");
    }

    #[test]
    fn fp32_matches_the_adamw_formula() {
        let mut opt = AdamW::<B>::new(OptimSection {
            weight_decay: 0.1,
            ..OptimSection::default()
        });
        let w = Tensor::<B, 1>::from_data(
            TensorData::new(vec![0.5f32, -2.0], [2]),
            &Default::default(),
        );
        let g = Tensor::<B, 1>::from_data(
            TensorData::new(vec![0.1f32, -0.3], [2]),
            &Default::default(),
        );
        let got = values(opt.update("w", w, g, 1.0, 1e-3, |_| unreachable!()));
        // Step 1: m̂ = g, v̂ = g², so the Adam step is lr·sign(g) (up to ε).
        let want = [
            0.5 - 1e-3 - 1e-3 * 0.1 * 0.5,
            -2.0 + 1e-3 + 1e-3 * 0.1 * 2.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn stochastic_rounding_gives_neighbours_with_the_right_odds() {
        let x = 1.0f32 + 2f32.powi(-7) * 0.25; // a quarter of the way from 1.0 to the next BF16
        let n = 20_000;
        let xs = Tensor::<B, 1>::from_data(TensorData::new(vec![x; n], [n]), &Default::default());
        B::seed(&Default::default(), 1);
        let out = values(stochastic_round_bf16(
            xs,
            uniform::<B>(n, &Default::default()),
        ));
        let up = out.iter().filter(|&&v| v > 1.0).count() as f64 / n as f64;
        assert!(out.iter().all(|&v| v == 1.0 || v == 1.0 + 2f32.powi(-7)));
        assert!((up - 0.25).abs() < 0.02, "{up}");
        let exact = Tensor::<B, 1>::from_data(
            TensorData::new(vec![0.0f32, -3.0, 1.5, 2f32.powi(-100)], [4]),
            &Default::default(),
        );
        let out = values(stochastic_round_bf16(
            exact,
            uniform::<B>(4, &Default::default()),
        ));
        assert_eq!(out, vec![0.0, -3.0, 1.5, 2f32.powi(-100)]);
    }

    #[test]
    fn bf16_moments_are_stored_in_bf16_and_track_fp32_moments() {
        let run = |moments| {
            let mut opt = AdamW::<B>::new(OptimSection {
                precision: OptimPrecision::Bf16Kahan,
                moments,
                ..OptimSection::default()
            });
            let mut w = bf16_param(&[1.0; 64]);
            for step in 0..200 {
                let g: Vec<f32> = (0..64)
                    .map(|i| 0.01 * ((i * 7 + step) % 13) as f32 - 0.05)
                    .collect();
                let g = Tensor::<B, 1>::from_data(TensorData::new(g, [64]), &Default::default());
                w = opt.update("w", w, g, 1.0, 1e-3, |_| unreachable!());
                opt.finish_step();
            }
            (values(w), opt.state["w"].exp_avg.dtype())
        };
        let (w32, d32) = run(MomentPrecision::Fp32);
        let (w16, d16) = run(MomentPrecision::Bf16);
        assert_eq!((d32, d16), (DType::F32, DType::BF16));
        assert!(w16.iter().any(|&v| v != 1.0), "{w16:?}");
        // Two BF16 ulps near 1.0: rounding the moments moves no weight further.
        for (a, b) in w32.iter().zip(&w16) {
            assert!((a - b).abs() <= 2.0 * 2f32.powi(-7), "{w32:?} vs {w16:?}");
        }
    }

    /// burn-flex's f32 → BF16 cast of `x`, as f32. It is not always correctly rounded: just
    /// above a tie it rounds down (0x3B448001 becomes 0x3B44; `half` and CUDA give 0x3B45).
    fn flex_bf16(x: f32) -> f32 {
        let t = Tensor::<B, 1>::from_data(TensorData::new(vec![x], [1]), &Default::default());
        values(t.cast(DType::BF16))[0]
    }

    #[test]
    fn flex_bf16_cast_rounds_down_just_above_a_tie() {
        assert_eq!(
            flex_bf16(f32::from_bits(0x3B44_8001)).to_bits(),
            0x3B44_0000
        );
        assert_eq!(
            half::bf16::from_f32(f32::from_bits(0x3B44_8001)).to_bits(),
            0x3B45
        );
        assert_eq!(
            flex_bf16(f32::from_bits(0x3B44_C000)).to_bits(),
            0x3B45_0000
        );
    }

    /// Five updates of the tensor form against the CUDA kernel's element arithmetic
    /// (`qatflow_kernels::adamw::reference_rounded`, with burn-flex's BF16 rounding: see
    /// [`flex_bf16`]), compared bit for bit.
    fn tensor_form_matches_reference<P, M>(hp: OptimSection, grad_scale: f64)
    where
        P: qatflow_kernels::KernelElement,
        M: qatflow_kernels::KernelElement,
    {
        use qatflow_kernels::adamw::reference_rounded;
        let flex = |x: f32, bf16: bool| if bf16 { flex_bf16(x) } else { x };
        let to_p = |x: f32| P::from_f32_value(flex(x, size_of::<P>() == 2));
        let to_m = |x: f32| M::from_f32_value(flex(x, size_of::<M>() == 2));
        let n = 97;
        let kahan = hp.precision == OptimPrecision::Bf16Kahan;
        let dtype = if hp.precision == OptimPrecision::Fp32 {
            DType::F32
        } else {
            DType::BF16
        };
        let mut opt = AdamW::<B>::new(hp.clone());
        let init: Vec<f32> = (0..n).map(|i| (i as f32 - 40.0) / 31.0).collect();
        let mut w =
            Tensor::<B, 1>::from_data(TensorData::new(init.clone(), [n]), &Default::default())
                .cast(dtype);
        let mut rw: Vec<P> = init.iter().map(|&x| to_p(x)).collect();
        let mut rc = vec![P::from_f32_value(0.0); n];
        let mut rm = vec![M::from_f32_value(0.0); n];
        let mut rv = vec![M::from_f32_value(0.0); n];
        for step in 0..5u64 {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * 13 + step as usize * 7) % 23) as f32 * 0.01 - 0.11)
                .collect();
            let gt =
                Tensor::<B, 1>::from_data(TensorData::new(g.clone(), [n]), &Default::default())
                    .cast(DType::BF16);
            let lr = 1e-3 * (step + 1) as f64;
            w = opt.update("w", w, gt, grad_scale, lr, |_| unreachable!());
            let s = AdamWStep::new(
                hp.beta1,
                hp.beta2,
                hp.eps,
                hp.weight_decay,
                lr,
                step as i32 + 1,
                grad_scale,
            );
            for i in 0..n {
                let g = flex_bf16(g[i]);
                (rw[i], rm[i], rv[i], rc[i]) =
                    reference_rounded(&s, kahan, [rw[i], rc[i]], g, [rm[i], rv[i]], to_p, to_m);
            }
            opt.finish_step();
        }
        let bits =
            |t: Tensor<B, 1>| -> Vec<u32> { values(t).iter().map(|v| v.to_bits()).collect() };
        fn ref_bits<E: qatflow_nvfp4::codec::Element>(v: &[E]) -> Vec<u32> {
            v.iter().map(|&x| x.to_f32().to_bits()).collect()
        }
        let what = format!(
            "{:?} {:?} wd {} scale {grad_scale}",
            hp.precision, hp.moments, hp.weight_decay
        );
        let st = &opt.state["w"];
        assert_eq!(bits(w), ref_bits(&rw), "weights, {what}");
        assert_eq!(
            bits(st.exp_avg.clone()),
            ref_bits(&rm),
            "first moment, {what}"
        );
        assert_eq!(
            bits(st.exp_avg_sq.clone()),
            ref_bits(&rv),
            "second moment, {what}"
        );
        if kahan {
            let c = st.compensation.clone().expect("kahan state");
            assert_eq!(bits(c), ref_bits(&rc), "compensation, {what}");
        }
    }

    #[test]
    fn tensor_form_is_the_cuda_kernels_arithmetic() {
        use half::bf16;
        let hp = |precision, moments, weight_decay| OptimSection {
            precision,
            moments,
            weight_decay,
            ..OptimSection::default()
        };
        for (wd, scale) in [(0.0, 1.0), (0.1, 0.37)] {
            tensor_form_matches_reference::<bf16, f32>(
                hp(OptimPrecision::Bf16Kahan, MomentPrecision::Fp32, wd),
                scale,
            );
            tensor_form_matches_reference::<bf16, bf16>(
                hp(OptimPrecision::Bf16Kahan, MomentPrecision::Bf16, wd),
                scale,
            );
            tensor_form_matches_reference::<bf16, f32>(
                hp(OptimPrecision::Bf16Plain, MomentPrecision::Fp32, wd),
                scale,
            );
            tensor_form_matches_reference::<f32, f32>(
                hp(OptimPrecision::Fp32, MomentPrecision::Fp32, wd),
                scale,
            );
            tensor_form_matches_reference::<f32, bf16>(
                hp(OptimPrecision::Fp32, MomentPrecision::Bf16, wd),
                scale,
            );
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let hp = OptimSection {
            warmup_ratio: 0.1,
            min_lr_ratio: 0.1,
            ..OptimSection::default()
        };
        let lr = |s| AdamW::<B>::lr_at(&hp, s, 100);
        assert!(lr(0) < lr(5) && lr(5) < lr(9));
        assert!((lr(9) - 1e-5).abs() < 1e-12);
        assert!(lr(50) < lr(10));
        assert!((lr(99) - 1e-6).abs() < 1e-8);
    }
}
