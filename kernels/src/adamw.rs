//! One AdamW update of one parameter as one CUDA kernel: read the weight, its gradient, both
//! moments and the Kahan compensation once, write their new values once.
//!
//! The trainer's tensor form of the update (`qatflow-train`'s `optim.rs`) is a chain of ~15
//! tensor operations; burn fuses some of them, but every stored f32 intermediate of a
//! parameter is a whole-tensor allocation, and for an embedding of 151,936 × 4,096 each is
//! 2.5 GB. [`update`] is the same arithmetic per element, in the same f32 operations and
//! order ([`reference`] spells it out in Rust; the tests check it against the tensor form on
//! the CPU bit for bit), in one pass. On CUDA it runs as a custom operation of burn's fusion
//! stream (or directly on a CubeCL tensor without fusion); [`available`] says whether a
//! backend has it. CubeCL emits IEEE division and square root; NVRTC may contract a
//! multiply-add into an FMA, so on the GPU a value can differ from [`reference`] in its last
//! bit (`examples/gemm_check.rs` measures how often).

use std::any::TypeId;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorMetadata};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use burn_fusion::FusionTensor;
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::*;
use half::bf16;

use crate::custom::FusedRuntime;
use crate::custom::{self, empty, CubeCall};
use crate::{cube_count, p, t, KernelElement, CUBE_SIZE};
use qatflow_nvfp4::codec::Element;

/// The scalars of one update, as the f32 values the tensor form multiplies and divides by
/// (each computed in f64 from the hyperparameters, then rounded once to f32, as burn does
/// with a scalar operand).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// β₁.
    pub beta1: f32,
    /// 1 − β₁.
    pub one_minus_beta1: f32,
    /// β₂.
    pub beta2: f32,
    /// 1 − β₂.
    pub one_minus_beta2: f32,
    /// 1 − β₁ᵗ.
    pub bias_correction1: f32,
    /// 1 − β₂ᵗ.
    pub bias_correction2: f32,
    /// ε, added to √v̂.
    pub eps: f32,
    /// −lr.
    pub neg_lr: f32,
    /// lr × weight decay; `None` when there is no decay (the term is then not computed).
    pub lr_weight_decay: Option<f32>,
    /// Factor the gradient is multiplied by first (global-norm clipping); `None` for 1.
    pub grad_scale: Option<f32>,
    /// `Some(seed)`: the new BF16 weight is rounded stochastically ([`stochastic_bf16`] with
    /// this seed and the element's index) instead of to nearest.
    pub stochastic: Option<u32>,
}

impl AdamWStep {
    /// The scalars of step `t` (1-based) at learning rate `lr`.
    pub fn new(
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        lr: f64,
        t: i32,
        grad_scale: f64,
    ) -> AdamWStep {
        AdamWStep {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            bias_correction1: (1.0 - beta1.powi(t)) as f32,
            bias_correction2: (1.0 - beta2.powi(t)) as f32,
            eps: eps as f32,
            neg_lr: (-lr) as f32,
            lr_weight_decay: (weight_decay > 0.0).then_some((lr * weight_decay) as f32),
            grad_scale: (grad_scale != 1.0).then_some(grad_scale as f32),
            stochastic: None,
        }
    }
}

/// 32 random bits for element `index` under `seed`: a murmur3-style finalizer of the two
/// (wrapping u32 arithmetic, the kernel's own).
pub fn random_bits(seed: u32, index: u32) -> u32 {
    let mut x = index.wrapping_mul(0x9E37_79B9) ^ seed;
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

/// Stochastic rounding of `x` to BF16 as the kernel does it: 16 random bits added to the
/// f32 bit pattern's low half, then truncation. The magnitude rounds up with probability
/// equal to the dropped fraction of a BF16 step (unbiased); zero stays zero.
pub fn stochastic_bf16(x: f32, seed: u32, index: u32) -> bf16 {
    let bits = x.to_bits().wrapping_add(random_bits(seed, index) & 0xFFFF);
    bf16::from_bits((bits >> 16) as u16)
}

/// One parameter's stored state, as tensors of type `T` (flat burn tensors for [`update`]):
/// the weight (F32, or BF16), the moments (F32 or BF16) and the Kahan compensation (the
/// weight's dtype; only with BF16 weights under Kahan summation).
#[derive(Debug, Clone)]
pub struct Slots<T> {
    /// The weight, flat.
    pub param: T,
    /// First moment.
    pub exp_avg: T,
    /// Second moment.
    pub exp_avg_sq: T,
    /// What BF16 rounding of the weight dropped so far (Kahan), when kept.
    pub compensation: Option<T>,
}

impl<T> Slots<T> {
    /// Every tensor through `f`.
    fn map<U>(self, f: impl Fn(T) -> U) -> Slots<U> {
        Slots {
            param: f(self.param),
            exp_avg: f(self.exp_avg),
            exp_avg_sq: f(self.exp_avg_sq),
            compensation: self.compensation.map(f),
        }
    }
}

/// The update of one element, in the kernel's f32 operations and order: weight `w` (stored
/// as `P`), gradient `g` (already f32), moments `m`, `v` (stored as `M`), compensation `c`
/// (used when `kahan`). Returns the new stored weight, moments and compensation, each f32
/// rounded to its storage type to nearest even (as CUDA does).
pub fn reference<P: KernelElement, M: KernelElement>(
    s: &AdamWStep,
    kahan: bool,
    wc: [P; 2],
    g: f32,
    mv: [M; 2],
) -> (P, M, M, P) {
    reference_rounded(s, kahan, wc, g, mv, P::from_f32_value, M::from_f32_value)
}

/// [`reference`] with the roundings to the storage types given (`to_p` for the weight and
/// compensation, `to_m` for the moments): a backend whose casts round differently is compared
/// with its own rounding.
pub fn reference_rounded<P: Element, M: Element>(
    s: &AdamWStep,
    kahan: bool,
    [w, c]: [P; 2],
    g: f32,
    [m, v]: [M; 2],
    to_p: impl Fn(f32) -> P,
    to_m: impl Fn(f32) -> M,
) -> (P, M, M, P) {
    let g = match s.grad_scale {
        Some(k) => g * k,
        None => g,
    };
    let m = Element::to_f32(m) * s.beta1 + g * s.one_minus_beta1;
    let v = Element::to_f32(v) * s.beta2 + g * g * s.one_minus_beta2;
    let denom = (v / s.bias_correction2).sqrt() + s.eps;
    let w = Element::to_f32(w);
    let mut delta = (m / s.bias_correction1) / denom * s.neg_lr;
    if let Some(k) = s.lr_weight_decay {
        delta -= w * k;
    }
    let (m, v) = (to_m(m), to_m(v));
    if kahan {
        let y = delta - Element::to_f32(c);
        let new = to_p(w + y);
        let comp = (Element::to_f32(new) - w) - y;
        (new, m, v, to_p(comp))
    } else {
        (to_p(w + delta), m, v, c)
    }
}

/// The element kernel of [`update`]: one unit per element. `comp` and `new_comp` are only
/// touched when `kahan` (otherwise any buffers of `P` may be passed).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn adamw_kernel<P: Float, G: Float, M: Float>(
    param: &Array<P>,
    grad: &Array<G>,
    exp_avg: &Array<M>,
    exp_avg_sq: &Array<M>,
    comp: &Array<P>,
    new_param: &mut Array<P>,
    new_exp_avg: &mut Array<M>,
    new_exp_avg_sq: &mut Array<M>,
    new_comp: &mut Array<P>,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    bias_correction1: f32,
    bias_correction2: f32,
    eps: f32,
    neg_lr: f32,
    lr_weight_decay: f32,
    grad_scale: f32,
    seed: u32,
    len: u32,
    #[comptime] kahan: bool,
    #[comptime] scaled: bool,
    #[comptime] decay: bool,
    #[comptime] stochastic: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= len as usize {
        terminate!();
    }
    let mut g = f32::cast_from(grad[i]);
    if scaled {
        g *= grad_scale;
    }
    let m = f32::cast_from(exp_avg[i]) * beta1 + g * one_minus_beta1;
    let v = f32::cast_from(exp_avg_sq[i]) * beta2 + g * g * one_minus_beta2;
    let denom = f32::sqrt(v / bias_correction2) + eps;
    let w = f32::cast_from(param[i]);
    let mut delta = (m / bias_correction1) / denom * neg_lr;
    if decay {
        delta -= w * lr_weight_decay;
    }
    new_exp_avg[i] = M::cast_from(m);
    new_exp_avg_sq[i] = M::cast_from(v);
    if kahan {
        let y = delta - f32::cast_from(comp[i]);
        let new = P::cast_from(w + y);
        new_param[i] = new;
        new_comp[i] = P::cast_from((f32::cast_from(new) - w) - y);
    } else if stochastic {
        let bits = u32::reinterpret(w + delta) + (kernel_random_bits(seed, i as u32) & 0xFFFFu32);
        new_param[i] = P::cast_from(f32::reinterpret(bits & 0xFFFF_0000u32));
    } else {
        new_param[i] = P::cast_from(w + delta);
    }
}

/// [`random_bits`] in the kernel.
#[cube]
fn kernel_random_bits(seed: u32, index: u32) -> u32 {
    let mut x = (index * 0x9E37_79B9u32) ^ seed;
    x ^= x >> 16u32;
    x *= 0x7FEB_352Du32;
    x ^= x >> 15u32;
    x *= 0x846C_A68Bu32;
    x ^ (x >> 16u32)
}

impl AdamWStep {
    /// The scalars in the order [`adamw_kernel`] takes them.
    fn kernel_scalars(&self) -> [f32; 10] {
        [
            self.beta1,
            self.one_minus_beta1,
            self.beta2,
            self.one_minus_beta2,
            self.bias_correction1,
            self.bias_correction2,
            self.eps,
            self.neg_lr,
            self.lr_weight_decay.unwrap_or(0.0),
            self.grad_scale.unwrap_or(1.0),
        ]
    }
}

/// Whether [`update`] runs as one kernel for backend `B`: burn's CUDA backend, with or
/// without fusion, not under autodiff (the optimizer runs on the inner backend), and the
/// training engine on (`QATFLOW_GEMM=cublaslt`, [`crate::gemm::enabled`]; without it the
/// trainer keeps burn's path throughout, the reference the engine is compared with).
pub fn available<B: Backend>() -> bool {
    if !crate::gemm::kernel_on("adamw") {
        return false;
    }
    let t = TypeId::of::<FloatTensor<B>>();
    t == TypeId::of::<CubeTensor<CudaRuntime>>() || t == TypeId::of::<FusionTensor<FusedRuntime>>()
}

/// One AdamW update of `slots` with gradient `grad` (flat, F32 or BF16, the weight's length)
/// as one kernel; `kahan` uses and updates `slots.compensation`.
///
/// Panics when [`available`] is false for `B`, or on dtypes or lengths the trainer never
/// sends (weights F32/BF16, moments F32/BF16, a compensation in the weight's dtype exactly
/// when `kahan`): those are bugs of the caller.
pub fn update<B: Backend>(
    slots: Slots<Tensor<B, 1>>,
    grad: Tensor<B, 1>,
    step: &AdamWStep,
    kahan: bool,
) -> Slots<Tensor<B, 1>> {
    assert!(available::<B>(), "the fused AdamW update runs on CUDA only");
    assert_eq!(
        kahan,
        slots.compensation.is_some(),
        "a Kahan compensation exactly under Kahan summation"
    );
    assert!(
        step.stochastic.is_none() || (!kahan && slots.param.dtype() == DType::BF16),
        "stochastic rounding applies to BF16 weights without Kahan summation"
    );
    let inputs = [slots.param, grad, slots.exp_avg, slots.exp_avg_sq]
        .into_iter()
        .chain(slots.compensation)
        .map(p)
        .collect();
    let out = custom::on_cuda::<B, _>(&Update(*step), inputs)
        .unwrap_or_else(|_| unreachable!("`available` checked the backend"));
    let mut out = out.into_iter().map(t);
    let mut next = || out.next().expect("one output a state tensor");
    Slots {
        param: next(),
        exp_avg: next(),
        exp_avg_sq: next(),
        compensation: out.next(),
    }
}

/// The launch of one update: inputs `[weight, gradient, m, v, compensation?]`, outputs the
/// new `[weight, m, v, compensation?]`.
#[derive(Debug, Clone, Copy)]
struct Update(AdamWStep);

impl CubeCall for Update {
    const NAME: &'static str = "qatflow_adamw";

    fn outputs(&self, inputs: &[(Vec<usize>, DType)]) -> Vec<(Vec<usize>, DType)> {
        let mut outs = inputs.to_vec();
        outs.remove(1);
        outs
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>) -> Vec<CubeTensor<R>> {
        let mut it = inputs.into_iter();
        let mut next = || it.next().expect("an input the caller passed");
        let (param, grad, exp_avg, exp_avg_sq) = (next(), next(), next(), next());
        let slots = Slots {
            param,
            exp_avg,
            exp_avg_sq,
            compensation: it.next(),
        };
        let new = cube_update(slots, grad, &self.0);
        [new.param, new.exp_avg, new.exp_avg_sq]
            .into_iter()
            .chain(new.compensation)
            .collect()
    }
}

/// The kernel on CubeCL tensors: the new state of `slots` after gradient `grad`.
fn cube_update<R: CubeRuntime>(
    slots: Slots<CubeTensor<R>>,
    grad: CubeTensor<R>,
    step: &AdamWStep,
) -> Slots<CubeTensor<R>> {
    let Slots {
        param,
        exp_avg,
        exp_avg_sq,
        compensation: comp,
    } = slots.map(burn_cubecl::kernel::into_contiguous);
    let grad = burn_cubecl::kernel::into_contiguous(grad);
    let n = param.shape().num_elements();
    for (what, t) in [
        ("gradient", &grad),
        ("first moment", &exp_avg),
        ("second moment", &exp_avg_sq),
    ]
    .into_iter()
    .chain(comp.as_ref().map(|c| ("compensation", c)))
    {
        assert_eq!(
            t.shape().num_elements(),
            n,
            "AdamW: the {what} has another length than its weight"
        );
    }
    if let Some(c) = &comp {
        assert_eq!(c.dtype, param.dtype, "AdamW: compensation dtype");
    }
    assert_eq!(exp_avg.dtype, exp_avg_sq.dtype, "AdamW: moment dtypes");
    let client = param.client.clone();
    let like = |t: &CubeTensor<R>| empty(t, t.shape().to_vec(), t.dtype);
    let new = Slots {
        param: like(&param),
        exp_avg: like(&exp_avg),
        exp_avg_sq: like(&exp_avg_sq),
        compensation: comp.as_ref().map(like),
    };
    let kahan = comp.is_some();
    // Without Kahan the kernel never touches its compensation buffers: the weight's stand in.
    let comp_in = comp.as_ref().unwrap_or(&param).handle.clone();
    let comp_out = new
        .compensation
        .as_ref()
        .unwrap_or(&new.param)
        .handle
        .clone();
    let handles = Handles {
        n,
        inputs: [
            param.handle.clone(),
            grad.handle.clone(),
            exp_avg.handle.clone(),
            exp_avg_sq.handle.clone(),
            comp_in,
        ],
        outputs: [
            new.param.handle.clone(),
            new.exp_avg.handle.clone(),
            new.exp_avg_sq.handle.clone(),
            comp_out,
        ],
        scalars: step.kernel_scalars(),
        seed: step.stochastic.unwrap_or(0),
        flags: [
            kahan,
            step.grad_scale.is_some(),
            step.lr_weight_decay.is_some(),
            step.stochastic.is_some(),
        ],
    };
    match (param.dtype, grad.dtype, exp_avg.dtype) {
        (DType::F32, DType::F32, DType::F32) => handles.launch::<f32, f32, f32, R>(&client),
        (DType::F32, DType::F32, DType::BF16) => handles.launch::<f32, f32, bf16, R>(&client),
        (DType::F32, DType::BF16, DType::F32) => handles.launch::<f32, bf16, f32, R>(&client),
        (DType::F32, DType::BF16, DType::BF16) => handles.launch::<f32, bf16, bf16, R>(&client),
        (DType::BF16, DType::F32, DType::F32) => handles.launch::<bf16, f32, f32, R>(&client),
        (DType::BF16, DType::F32, DType::BF16) => handles.launch::<bf16, f32, bf16, R>(&client),
        (DType::BF16, DType::BF16, DType::F32) => handles.launch::<bf16, bf16, f32, R>(&client),
        (DType::BF16, DType::BF16, DType::BF16) => handles.launch::<bf16, bf16, bf16, R>(&client),
        other => {
            panic!("AdamW kernel: weight, gradient and moment dtypes {other:?} (F32/BF16 only)")
        }
    }
    new
}

/// The buffers and flags of one launch.
struct Handles {
    n: usize,
    inputs: [cubecl::server::Handle; 5],
    outputs: [cubecl::server::Handle; 4],
    scalars: [f32; 10],
    seed: u32,
    flags: [bool; 4],
}

impl Handles {
    fn launch<P: KernelElement, G: KernelElement, M: KernelElement, R: Runtime>(
        self,
        client: &ComputeClient<R>,
    ) {
        let n = self.n;
        let [p, g, m, v, c] = self.inputs;
        let [np, nm, nv, nc] = self.outputs;
        let [kahan, scaled, decay, stochastic] = self.flags;
        let [b1, omb1, b2, omb2, bc1, bc2, eps, neg_lr, lr_wd, scale] = self.scalars;
        // SAFETY: every buffer holds `n` elements of its type (the weight's stand-ins for the
        // compensation are only passed when `kahan` is false, and the kernel then leaves them
        // alone), and the kernel touches index `i < n` only.
        unsafe {
            adamw_kernel::launch_unchecked::<P, G, M, R>(
                client,
                cube_count(n),
                CubeDim::new_1d(CUBE_SIZE),
                ArrayArg::from_raw_parts(p, n),
                ArrayArg::from_raw_parts(g, n),
                ArrayArg::from_raw_parts(m, n),
                ArrayArg::from_raw_parts(v, n),
                ArrayArg::from_raw_parts(c, n),
                ArrayArg::from_raw_parts(np, n),
                ArrayArg::from_raw_parts(nm, n),
                ArrayArg::from_raw_parts(nv, n),
                ArrayArg::from_raw_parts(nc, n),
                b1,
                omb1,
                b2,
                omb2,
                bc1,
                bc2,
                eps,
                neg_lr,
                lr_wd,
                scale,
                self.seed,
                n as u32,
                kahan,
                scaled,
                decay,
                stochastic,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_scalars_are_the_f64_values_rounded_once() {
        let s = AdamWStep::new(0.9, 0.999, 1e-8, 0.0, 2e-5, 3, 1.0);
        assert_eq!(s.bias_correction1, (1.0 - 0.9f64.powi(3)) as f32);
        assert_eq!(s.one_minus_beta2, (1.0 - 0.999f64) as f32);
        assert_eq!(s.neg_lr, -2e-5f32);
        assert_eq!((s.lr_weight_decay, s.grad_scale), (None, None));
        let s = AdamWStep::new(0.9, 0.95, 1e-8, 0.1, 1e-3, 1, 0.5);
        assert_eq!(s.lr_weight_decay, Some((1e-3f64 * 0.1) as f32));
        assert_eq!(s.grad_scale, Some(0.5));
        assert_eq!(s.kernel_scalars()[8..], [(1e-3f64 * 0.1) as f32, 0.5]);
    }

    #[test]
    fn kahan_reference_carries_what_bf16_rounding_drops() {
        let s = AdamWStep::new(0.9, 0.999, 1e-8, 0.0, 1e-5, 1, 1.0);
        let one = bf16::from_f32(1.0);
        let (mut w, mut c) = (one, bf16::ZERO);
        let (mut m, mut v) = (0.0f32, 0.0f32);
        for _ in 0..1000 {
            (w, m, v, c) = reference::<bf16, f32>(&s, true, [w, c], 1.0, [m, v]);
        }
        assert!(w.to_f32() < 1.0, "{w}");
        let (plain, ..) = reference::<bf16, f32>(&s, false, [one, bf16::ZERO], 1.0, [0.0, 0.0]);
        assert_eq!(plain, one, "a 1e-5 step is below half a BF16 ulp");
    }

    #[test]
    fn stochastic_rounding_picks_a_neighbour_with_the_right_odds() {
        // 1 + 0.3 BF16 steps: 1.0 w.p. 0.7, 1 + 2^-7 w.p. 0.3.
        let step = 2f32.powi(-7);
        for x in [
            1.0 + 0.3 * step,
            -(1.0 + 0.3 * step),
            3.0e-3 * (1.0 + 0.6 * step),
        ] {
            let lo = bf16::from_bits((x.to_bits() >> 16) as u16);
            let hi = bf16::from_bits(lo.to_bits() + 1);
            let n = 100_000u32;
            let mut ups = 0u32;
            for i in 0..n {
                let r = stochastic_bf16(x, 77, i);
                assert!(r == lo || r == hi, "{x}: {r} is no neighbour");
                ups += u32::from(r == hi);
            }
            let frac = (x.abs() - lo.to_f32().abs()) / (hi.to_f32().abs() - lo.to_f32().abs());
            let p = f64::from(ups) / f64::from(n);
            assert!(
                (p - f64::from(frac)).abs() < 0.01,
                "{x}: up {p}, want {frac}"
            );
        }
        assert_eq!(stochastic_bf16(0.0, 1, 2), bf16::ZERO);
        assert_eq!(stochastic_bf16(1.0, 1, 2), bf16::ONE, "BF16 values stay");
        assert_ne!(random_bits(1, 2), random_bits(2, 2));
        assert_ne!(random_bits(1, 2), random_bits(1, 3));
    }

    #[test]
    fn off_cuda_it_is_not_available() {
        assert!(!available::<burn::backend::Flex>());
        assert!(!available::<burn::backend::Autodiff<burn::backend::Flex>>());
    }

    /// The kernel on the software GPU (F32 weights and moments) against [`reference`] element
    /// by element: plain, Kahan, weight decay with clipping, and the stochastic rounding's
    /// bits (the kernel's truncation of an F32 weight is the BF16 value [`stochastic_bf16`]
    /// picks). Not the compensation of F32 weights: Vulkan's float operations may be
    /// reassociated unless marked precise, and lavapipe folds `((w + y) − w) − y` to zero
    /// when no BF16 rounding stands between (on CUDA the BF16 cast does).
    #[test]
    fn the_kernel_equals_the_reference() {
        use crate::soft_gpu::{self, read, values, Soft};
        let n = 1000;
        let w = values(n, 1);
        let g = values(n, 2);
        let m: Vec<f32> = values(n, 3).iter().map(|x| x * 0.1).collect();
        let v: Vec<f32> = values(n, 4).iter().map(|x| x * x * 0.01).collect();
        let c: Vec<f32> = values(n, 5).iter().map(|x| x * 1e-7).collect();
        for (kahan, decay, clip, stochastic) in [
            (false, 0.0, 1.0, None),
            (true, 0.0, 1.0, None),
            (false, 0.1, 0.5, None),
            (true, 0.1, 0.5, None),
            (false, 0.0, 1.0, Some(99)),
        ] {
            let mut step = AdamWStep::new(0.9, 0.999, 1e-8, decay, 1e-3, 3, clip);
            step.stochastic = stochastic;
            let gpu = |x: &[f32]| soft_gpu::tensor(x, &[n]);
            let mut inputs = vec![gpu(&w), gpu(&g), gpu(&m), gpu(&v)];
            if kahan {
                inputs.push(gpu(&c));
            }
            let got: Vec<Vec<f32>> = Update(step).run::<Soft>(inputs).iter().map(read).collect();
            assert_eq!(got.len(), 3 + usize::from(kahan));
            for i in 0..n {
                let (mut nw, nm, nv, _) =
                    reference::<f32, f32>(&step, kahan, [w[i], c[i]], g[i], [m[i], v[i]]);
                if let Some(seed) = stochastic {
                    // The reference's new weight before rounding, then the kernel's rounding.
                    let plain = AdamWStep {
                        stochastic: None,
                        ..step
                    };
                    let (exact, ..) =
                        reference::<f32, f32>(&plain, false, [w[i], c[i]], g[i], [m[i], v[i]]);
                    nw = stochastic_bf16(exact, seed, i as u32).to_f32();
                }
                let case = format!("element {i}, kahan {kahan}, decay {decay}, {stochastic:?}");
                // Within one F32 unit in the last place: the compiler may contract a multiply
                // and an add into an FMA (as NVRTC may).
                let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
                assert!(
                    ulps(got[0][i], nw) <= 1,
                    "weight {} vs {nw}, {case}",
                    got[0][i]
                );
                assert!(ulps(got[1][i], nm) <= 1, "m {} vs {nm}, {case}", got[1][i]);
                assert!(ulps(got[2][i], nv) <= 1, "v {} vs {nv}, {case}", got[2][i]);
            }
        }
    }
}
