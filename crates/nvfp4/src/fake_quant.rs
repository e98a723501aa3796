//! Fake quantization of burn tensors: what QAT puts in every quantized linear layer.
//!
//! Semantics follow ModelOpt's `NVFP4_DEFAULT_CFG`
//! (`modelopt/torch/quantization/config.py` up to 0.4x; `modelopt_recipes/configs/numerics/nvfp4.yaml`
//! and `configs/ptq/presets/model/nvfp4.yaml` in 0.47): `num_bits = e2m1`,
//! `block_sizes = {-1: 16, type: dynamic, scale_bits: e4m3}`, `axis = None`, for both
//! `*weight_quantizer` and `*input_quantizer`, with `max` calibration
//! (`modelopt/torch/quantization/model_calib.py::max_calibrate`):
//! - weights: blocks of 16 along the input (last) dimension; the global amax is the weight
//!   quantizer's calibrated amax (`max|W|` at calibration), frozen during QAT, while the block
//!   scales are recomputed from the current weights at every forward;
//! - input activations: blocks of 16 along the last (hidden) dimension, per token, with a
//!   static global amax collected by a calibration pass ([`AmaxCalibrator`]).
//!
//! The forward value is the ModelOpt *export's* dequantization, bit-exact with
//! [`crate::codec::fake_quantize`] (ModelOpt's Triton fake-quant kernel uses an approximate
//! division and may differ from its own export at rounding boundaries; qatflow trains the
//! function it exports).
//!
//! Backward: ModelOpt >= 0.43 defaults to `pass_through_bwd=True`
//! (`modelopt/torch/quantization/config.py`, field `pass_through_bwd`; implemented in
//! `modelopt/torch/quantization/tensor_quant.py::_fake_tensor_quant_backward`): the gradient is
//! the identity everywhere, *not* masked outside `[-amax, amax]`. qatflow does the same.
//! It is built as `fq(x.detach()) + (x - x.detach())`: for finite `x`, `x - x` is exactly
//! `+0.0`, so the forward value is bit-identical to `fq(x)`; the only tracked operations are a
//! subtraction and an addition, whose backward is the identity and saves no tensor, so it
//! works on every burn backend (flex, cuda, with or without fusion) with no custom backward.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Tensor};

use crate::amax::LinearAmax;
use crate::codec::{global_scale, BLOCK_SIZE, ZERO_BLOCK_SCALE_VALUE};
use crate::e2m1::{tie_rounds_up, E2M1_BOUNDS, E2M1_MAX, E2M1_VALUES, SMALLEST_NONZERO_BOUND};
use crate::error::{Error, Result};
use crate::fp8::{E4M3_MANTISSA_BITS, E4M3_MAX, E4M3_MIN_NORMAL, E4M3_MIN_POSITIVE};

/// NVFP4 fake quantization with the straight-through estimator.
///
/// `x` has shape `[.., K]` with `K % 16 == 0`; `amax` is the calibrated global amax of this
/// quantizer (the group's largest for linears that read the same input). Returns the
/// dequantized values in `x`'s dtype (computed in float32); gradients pass straight through.
/// Non-finite elements give non-finite outputs (the codec refuses them with an error instead).
pub fn fake_quantize<B: Backend, const D: usize>(
    name: &str,
    x: Tensor<B, D>,
    amax: f32,
) -> Result<Tensor<B, D>> {
    straight_through(x, |detached| fake_quantize_value(name, detached, amax))
}

/// The straight-through estimator around a forward function: returns `forward(x.detach())`
/// as `q + (x - x.detach())`, whose value is bit-identical to `q` for finite `x` and whose
/// gradient with respect to `x` is the identity (see the module header).
pub fn straight_through<B: Backend, const D: usize, E>(
    x: Tensor<B, D>,
    forward: impl FnOnce(Tensor<B, D>) -> std::result::Result<Tensor<B, D>, E>,
) -> std::result::Result<Tensor<B, D>, E> {
    let q = forward(x.clone().detach())?;
    Ok(q + (x.clone() - x.detach()))
}

/// The forward value of [`fake_quantize`] without the gradient path (inference, tests, export
/// previews). Same arguments and errors.
pub fn fake_quantize_value<B: Backend, const D: usize>(
    name: &str,
    x: Tensor<B, D>,
    amax: f32,
) -> Result<Tensor<B, D>> {
    let dims = x.dims();
    let k = dims[D - 1];
    let n: usize = dims.iter().product();
    crate::codec::check_shape(name, &dims, n)?;
    let scale_2 = global_scale(name, amax)?;
    let dtype = x.dtype();
    let x = if dtype == DType::F32 {
        x
    } else {
        x.cast(DType::F32)
    };
    let blocks = x.reshape([n / k, k / BLOCK_SIZE, BLOCK_SIZE]);

    // FP8 block scale: amax_b / (6 * ws2), zero -> 1.0, clamp to [2^-9, 448], round to E4M3.
    let s = block_amax(blocks.clone()).div_scalar(E2M1_MAX * scale_2);
    let s = s
        .clone()
        .mask_fill(s.equal_elem(0.0), ZERO_BLOCK_SCALE_VALUE)
        .clamp(E4M3_MIN_POSITIVE, E4M3_MAX);
    let s = round_to_e4m3(s);

    // E2M1 of x / (s * ws2), ties per ModelOpt, then dequantize with the same divisor.
    let divisor = s.mul_scalar(scale_2);
    let scaled = blocks / divisor.clone();
    let magnitude = scaled.clone().abs();
    let mut value = magnitude.zeros_like();
    for (i, &bound) in E2M1_BOUNDS.iter().enumerate() {
        let v = E2M1_VALUES[i + 1];
        let mask = if tie_rounds_up(i) {
            magnitude.clone().greater_equal_elem(bound)
        } else {
            magnitude.clone().greater_elem(bound)
        };
        value = value.mask_fill(mask, v);
    }
    // Only magnitudes above the first bound are non-zero, so zero results stay +0.0 like the
    // codec's.
    let negative = scaled.lower_elem(-SMALLEST_NONZERO_BOUND);
    let value = value.clone().mask_where(negative, value.neg());
    let out = (value * divisor).reshape(dims);
    Ok(if dtype == DType::F32 {
        out
    } else {
        out.cast(dtype)
    })
}

/// `max|x|` over the last dimension (16) as four halvings of element-wise maxima: exact like a
/// reduction, and made of element-wise operations that burn's fusion joins into one kernel
/// (a 16-wide reduction per output element is a poor fit for a reduce kernel).
fn block_amax<B: Backend>(blocks: Tensor<B, 3>) -> Tensor<B, 3> {
    let mut m = blocks.abs();
    let mut width = BLOCK_SIZE;
    while width > 1 {
        width /= 2;
        m = m
            .clone()
            .narrow(2, 0, width)
            .max_pair(m.narrow(2, width, width));
    }
    m
}

/// Rounds positive values in `[2^-9, 448]` to the nearest E4M3FN value, ties to even.
///
/// The quantum is 2^-9 below 2^-5 (subnormals and the first normal binade) and 2^(e-3) in the
/// binade `[2^e, 2^(e+1))`; `s / quantum` is exact and `round` is round-half-to-even on every
/// burn backend (`rint` in CUDA).
fn round_to_e4m3<B: Backend, const D: usize>(s: Tensor<B, D>) -> Tensor<B, D> {
    let mut quantum = s.full_like(E4M3_MIN_POSITIVE);
    // The first normal binade has the subnormals' quantum already.
    for e in binade(E4M3_MIN_NORMAL) + 1..=binade(E4M3_MAX) {
        let mask = s.clone().greater_equal_elem(f32::powi(2.0, e));
        quantum = quantum.mask_fill(mask, f32::powi(2.0, e - E4M3_MANTISSA_BITS as i32));
    }
    (s / quantum.clone()).round() * quantum
}

/// `e` of the binade `[2^e, 2^(e+1))` that holds the positive normal `x`.
fn binade(x: f32) -> i32 {
    ((x.to_bits() >> 23) & 0xFF) as i32 - 127
}

/// Running `max|x|` over calibration batches: ModelOpt's `max` calibration of an input
/// quantizer (per tensor, over all batches and tokens).
///
/// The running maximum stays on the device: [`observe`](Self::observe) only queues kernels, so
/// a calibration pass over a GPU model runs as one stream of work, and [`amax`](Self::amax)
/// reads the result back once. A NaN or infinite activation counts as an infinite `|x|`, so
/// one reduction per batch both takes the maximum and notices it.
#[derive(Debug, Clone)]
pub struct AmaxCalibrator<B: Backend> {
    /// `max|x|` in f32 of everything seen (infinite once a NaN or infinity was seen); `None`
    /// before the first batch.
    seen: Option<Tensor<B, 1>>,
}

impl<B: Backend> Default for AmaxCalibrator<B> {
    fn default() -> Self {
        Self { seen: None }
    }
}

impl<B: Backend> AmaxCalibrator<B> {
    /// A calibrator that has seen nothing (amax 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one batch into the running maximum (queued on the device; nothing is read back).
    pub fn observe<const D: usize>(&mut self, x: &Tensor<B, D>) {
        let x = x.clone().detach();
        let non_finite = x.clone().is_finite().bool_not();
        let m = x.abs().mask_fill(non_finite, f32::INFINITY).max();
        self.fold(m.cast(DType::F32));
    }

    /// Merges another calibrator (e.g. from another data-parallel rank): the max of both.
    pub fn merge(&mut self, other: &Self) {
        if let Some(m) = other.seen.clone() {
            self.fold(m);
        }
    }

    /// Folds a maximum into what was seen.
    fn fold(&mut self, m: Tensor<B, 1>) {
        self.seen = Some(match self.seen.take() {
            None => m,
            Some(amax) => amax.max_pair(m),
        });
    }

    /// The calibrated amax (0 before any batch), read back from the device.
    ///
    /// Fails when a NaN or infinite activation was seen: a calibration set with them cannot
    /// give a usable scale, so find the batch (`name` says which quantizer) and fix it.
    pub fn amax(&self, name: &str) -> Result<f32> {
        let Some(amax) = &self.seen else {
            return Ok(0.0);
        };
        let m: f32 = amax.clone().into_scalar().elem();
        if !m.is_finite() {
            return Err(Error::Tensor {
                name: name.to_owned(),
                message: "NaN or infinite calibration activations; remove the conversations \
                          that produce them before calibrating"
                    .to_owned(),
            });
        }
        Ok(m)
    }

    /// `input_scale` for the export (`amax / 2688`); fails while nothing non-zero was seen.
    pub fn input_scale(&self, name: &str) -> Result<f32> {
        crate::codec::input_scale(name, self.amax(name)?)
    }
}

/// A W4A4 NVFP4 fake-quantized linear layer: `fq(x) · fq(W)ᵀ + b`.
///
/// `weight` is in Hugging Face layout `[out, in]` (blocks run along `in`); `x` is `[.., in]`.
pub fn linear<B: Backend, const D: usize>(
    name: &str,
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    amax: LinearAmax,
) -> Result<Tensor<B, D>> {
    let [out_features, in_features] = weight.dims();
    let x_dims = x.dims();
    if x_dims[D - 1] != in_features {
        return Err(Error::Tensor {
            name: name.to_owned(),
            message: format!(
                "input shape {x_dims:?} does not end in the weight's in_features {in_features} \
                 (weight shape [{out_features}, {in_features}], expected [out, in])"
            ),
        });
    }
    let xq = fake_quantize(&format!("{name}.input_quantizer"), x, amax.input)?;
    let wq = fake_quantize(&format!("{name}.weight_quantizer"), weight, amax.weight)?;
    let y = xq.matmul(wq.transpose().unsqueeze());
    Ok(match bias {
        Some(b) => y + b.unsqueeze(),
        None => y,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{TensorData, Tolerance};
    use proptest::prelude::*;

    type B = Flex;
    type AB = Autodiff<Flex>;

    /// Deterministic pseudo-random values with outliers, zero blocks and exact ties.
    fn sample(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed | 1;
        (0..n)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                match i % 97 {
                    0 => u * 300.0,
                    1..=16 if (i / 97) % 3 == 0 => 0.0,
                    20 => 0.75 * (state % 7) as f32,
                    _ => u * 2.0,
                }
            })
            .collect()
    }

    fn tensor<Bk: Backend, const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<Bk, D> {
        Tensor::from_data(TensorData::new(data, shape), &Default::default())
    }

    fn bits(t: Tensor<impl Backend, 2>) -> Vec<u32> {
        t.into_data()
            .to_vec::<f32>()
            .expect("f32 data")
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn forward_is_bit_exact_with_codec() {
        let (rows, cols) = (24, 96);
        let x = sample(rows * cols, 7);
        let max = codec::amax("x", &x).expect("finite");
        // Calibrated amax equal to, below (saturating blocks) and above the current max.
        for amax in [max, max * 0.3, max * 4.0] {
            let want: Vec<u32> = codec::fake_quantize("x", &x, &[rows, cols], amax)
                .expect("quantizable")
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let got = fake_quantize_value("x", tensor::<B, 2>(x.clone(), [rows, cols]), amax)
                .expect("quantizable");
            assert_eq!(bits(got), want, "amax {amax}");
            let ste = fake_quantize("x", tensor::<AB, 2>(x.clone(), [rows, cols]), amax)
                .expect("quantizable");
            assert_eq!(bits(ste), want, "STE forward, amax {amax}");
        }
    }

    #[test]
    fn e4m3_binades_span_the_scale_range() {
        assert_eq!(binade(E4M3_MIN_NORMAL) + 1, -5);
        assert_eq!(binade(E4M3_MAX), 8);
    }

    #[test]
    fn leading_dimensions_are_flattened() {
        let x = sample(2 * 3 * 32, 11);
        let amax = codec::amax("x", &x).expect("finite");
        let want = codec::fake_quantize("x", &x, &[6, 32], amax).expect("quantizable");
        let got =
            fake_quantize_value("x", tensor::<B, 3>(x, [2, 3, 32]), amax).expect("quantizable");
        assert_eq!(got.dims(), [2, 3, 32]);
        assert_eq!(got.into_data().to_vec::<f32>().expect("f32"), want);
    }

    #[test]
    fn bf16_input_keeps_its_dtype() {
        let x = sample(4 * 32, 3);
        let amax = codec::amax("x", &x).expect("finite");
        let t = tensor::<B, 2>(x, [4, 32]).cast(DType::BF16);
        let out = fake_quantize_value("x", t.clone(), amax).expect("quantizable");
        assert_eq!(out.dtype(), DType::BF16);
        let xs = t.cast(DType::F32).into_data().to_vec::<f32>().expect("f32");
        let want = codec::fake_quantize("x", &xs, &[4, 32], amax).expect("quantizable");
        let got = out
            .cast(DType::F32)
            .into_data()
            .to_vec::<f32>()
            .expect("f32");
        let want_bf16: Vec<f32> = want
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_f32())
            .collect();
        assert_eq!(got, want_bf16);
    }

    #[test]
    fn bad_shapes_and_amax_are_errors() {
        let t = tensor::<B, 2>(vec![0.5; 48], [2, 24]);
        let err = fake_quantize("layer.w", t, 1.0).unwrap_err();
        assert!(
            matches!(err, Error::NotBlockAligned { last: 24, .. }),
            "{err}"
        );
        let t = tensor::<B, 2>(vec![0.5; 32], [2, 16]);
        assert!(matches!(
            fake_quantize("layer.w", t, 0.0),
            Err(Error::InvalidAmax { .. })
        ));
    }

    #[test]
    fn ste_gradient_equals_unquantized_gradient() {
        // loss = sum((x · fq(W)ᵀ) ⊙ g) is linear in the weight, so dL/dW = gᵀ x with or without
        // quantization: the STE must reproduce the unquantized gradient exactly.
        let (batch, inp, out) = (5, 48, 7);
        let w = sample(out * inp, 21);
        let x = sample(batch * inp, 22);
        let g = sample(batch * out, 23);
        // amax below max|W|: clipped weights must still get their gradient (pass-through).
        let amax = codec::amax("w", &w).expect("finite") * 0.5;
        let run = |quantized: bool| {
            let wt = tensor::<AB, 2>(w.clone(), [out, inp]).require_grad();
            let xt = tensor::<AB, 2>(x.clone(), [batch, inp]);
            let gt = tensor::<AB, 2>(g.clone(), [batch, out]);
            let wq = if quantized {
                fake_quantize("w", wt.clone(), amax).expect("quantizable")
            } else {
                wt.clone()
            };
            let loss = (xt.matmul(wq.transpose()) * gt).sum();
            let grads = loss.backward();
            wt.grad(&grads)
                .expect("weight has a gradient")
                .into_data()
                .to_vec::<f32>()
                .expect("f32")
        };
        let with_quant = run(true);
        let without = run(false);
        assert_eq!(with_quant, without);
        assert!(with_quant.iter().any(|v| *v != 0.0));
    }

    #[test]
    fn ste_is_identity_even_where_clipped() {
        let w = sample(4 * 32, 5);
        let c = sample(4 * 32, 6);
        let amax = codec::amax("w", &w).expect("finite") * 0.1;
        let wt = tensor::<AB, 2>(w, [4, 32]).require_grad();
        let loss = (fake_quantize("w", wt.clone(), amax).expect("quantizable")
            * tensor::<AB, 2>(c.clone(), [4, 32]))
        .sum();
        let grad = wt.grad(&loss.backward()).expect("gradient");
        assert_eq!(grad.into_data().to_vec::<f32>().expect("f32"), c);
    }

    #[test]
    fn calibrator_tracks_max_and_merges() {
        let mut cal = AmaxCalibrator::<B>::new();
        assert_eq!(cal.amax("x").expect("nothing seen"), 0.0);
        assert!(matches!(
            cal.input_scale("x"),
            Err(Error::InvalidAmax { .. })
        ));
        cal.observe(&tensor::<B, 2>(vec![0.5, -3.0, 1.0, 2.0], [2, 2]));
        cal.observe(&tensor::<B, 2>(vec![0.5, 2.5, 1.0, -2.0], [2, 2]));
        assert_eq!(cal.amax("x").expect("finite"), 3.0);
        let mut other = AmaxCalibrator::new();
        other.observe(&tensor::<B, 1>(vec![-7.0, 1.0], [2]));
        cal.merge(&other);
        cal.merge(&AmaxCalibrator::new());
        assert_eq!(cal.amax("x").expect("finite"), 7.0);
        assert_eq!(
            cal.input_scale("x").expect("positive"),
            codec::input_scale("x", 7.0).expect("positive")
        );
        // A NaN is reported however large the rest is, and names the quantizer.
        cal.observe(&tensor::<B, 1>(vec![f32::NAN, 1.0], [2]));
        cal.observe(&tensor::<B, 1>(vec![9.0, 1.0], [2]));
        let err = cal.amax("x").unwrap_err();
        assert!(
            matches!(&err, Error::Tensor { name, message } if name == "x" && message.starts_with("NaN or infinite")),
            "{err}"
        );
        let mut inf = AmaxCalibrator::<B>::new();
        inf.observe(&tensor::<B, 1>(vec![f32::INFINITY, 1.0], [2]));
        assert!(inf.amax("x").is_err());
    }

    #[test]
    fn linear_matches_codec_reference() {
        let (batch, inp, out) = (3, 32, 5);
        let w = sample(out * inp, 31);
        let x = sample(batch * inp, 32);
        let bias = sample(out, 33);
        let amax = LinearAmax {
            weight: codec::amax("w", &w).expect("finite"),
            input: codec::amax("x", &x).expect("finite") * 0.8,
        };
        let y = linear::<B, 2>(
            "l",
            tensor(x.clone(), [batch, inp]),
            tensor(w.clone(), [out, inp]),
            Some(tensor(bias.clone(), [out])),
            amax,
        )
        .expect("valid layer");
        let xq = codec::fake_quantize("x", &x, &[batch, inp], amax.input).expect("quantizable");
        let wq = codec::fake_quantize("w", &w, &[out, inp], amax.weight).expect("quantizable");
        let want = tensor::<B, 2>(xq, [batch, inp])
            .matmul(tensor::<B, 2>(wq, [out, inp]).transpose())
            + tensor::<B, 1>(bias, [out]).unsqueeze();
        y.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::rel_abs(1e-5, 1e-5));
        let err = linear::<B, 2>(
            "l",
            tensor(x, [batch * 2, inp / 2]),
            tensor(w, [out, inp]),
            None,
            amax,
        )
        .unwrap_err();
        assert!(matches!(err, Error::Tensor { .. }), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn forward_matches_codec_on_random_blocks(
            data in proptest::collection::vec(
                prop_oneof![3 => (-24i32..8, -1.0f32..1.0).prop_map(|(e, m)| m * f32::powi(2.0, e)), 1 => Just(0.0f32)],
                64,
            ),
            grow in 0.05f32..20.0,
        ) {
            let max = codec::amax("x", &data).expect("finite");
            prop_assume!(max > 1.0e-20);
            let amax = max * grow;
            let want: Vec<u32> = codec::fake_quantize("x", &data, &[2, 32], amax).expect("quantizable").iter().map(|v| v.to_bits()).collect();
            let got = fake_quantize_value("x", tensor::<B, 2>(data, [2, 32]), amax).expect("quantizable");
            prop_assert_eq!(bits(got), want);
        }
    }
}
