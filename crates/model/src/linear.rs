//! [`QLinear`]: the one linear layer type of every projection NVFP4 quantizes (attention
//! q/k/v/o and MLP gate/up/down; never the LM head). It holds the optional fake
//! quantizers of `qatflow_nvfp4::fake_quant` (weight amax and input amax, both off by
//! default) and is the single place where a faster GEMM path plugs in. Fake quantization
//! goes through `qatflow_kernels::fake_quant`: the one-pass CubeCL kernel on CUDA, burn
//! tensor operations elsewhere, bit-identical values.

mod cache;
mod hook;

pub use cache::FakeQuantCache;
pub use hook::InputAmaxHook;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use qatflow_nvfp4::keys::{INPUT_QUANTIZER, WEIGHT_QUANTIZER};
use qatflow_nvfp4::QuantizerAmax;

/// Errors of configuring a layer's fake quantizers.
#[derive(Debug, thiserror::Error)]
pub enum QuantConfigError {
    /// The layer cannot be NVFP4-quantized (input width not a multiple of 16, or an amax
    /// without a usable global scale).
    #[error("layer `{layer}`: {source}")]
    Nvfp4 {
        /// The layer's Hugging Face module name.
        layer: String,
        /// The codec's error.
        source: qatflow_nvfp4::Error,
    },
}

/// A bias-free linear layer `y = x · Wᵀ` with `W` in Hugging Face layout `[out, in]`.
#[derive(Module, Debug)]
pub struct QLinear<B: Backend> {
    /// The weight `[out_features, in_features]`.
    pub weight: Param<Tensor<B, 2>>,
    /// Hugging Face module name (e.g. `model.layers.0.self_attn.q_proj`), for messages.
    pub name: String,
    /// The fake quantizers' amaxes (both sides off by default; `None` leaves a side
    /// unquantized: weight-only W4A16 sets only `weight`, an imported NVFP4 export whose
    /// weights are already dequantized only `input`).
    pub quant: QuantizerAmax,
}

impl<B: Backend> QLinear<B> {
    /// A layer with the given weight and no quantization.
    pub fn new(name: impl Into<String>, weight: Tensor<B, 2>) -> Self {
        QLinear {
            weight: Param::from_tensor(weight),
            name: name.into(),
            quant: QuantizerAmax::default(),
        }
    }

    /// `[out_features, in_features]`.
    pub fn dims(&self) -> [usize; 2] {
        self.weight.dims()
    }

    /// Turns the fake quantizers on (or off with [`QuantizerAmax::OFF`]), checking that the
    /// layer's shape and the amaxes are quantizable so that [`QLinear::forward`] cannot fail.
    pub fn set_fake_quant(&mut self, quant: QuantizerAmax) -> Result<(), QuantConfigError> {
        let err = |source| QuantConfigError::Nvfp4 {
            layer: self.name.clone(),
            source,
        };
        let [out, inp] = self.dims();
        for (side, amax) in [
            (WEIGHT_QUANTIZER, quant.weight),
            (INPUT_QUANTIZER, quant.input),
        ] {
            if let Some(amax) = amax {
                qatflow_nvfp4::codec::check_shape(
                    &format!("{}{side}", self.name),
                    &[out, inp],
                    out * inp,
                )
                .map_err(err)?;
                qatflow_nvfp4::codec::global_scale(&self.name, amax).map_err(err)?;
            }
        }
        self.quant = quant;
        Ok(())
    }

    /// Applies the layer to `[.., in_features]`, fake-quantizing the input and/or weight
    /// (straight-through gradients) when configured; inside a [`FakeQuantCache`] scope the
    /// weight's fake-quantized value is computed once and reused.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        hook::observe_input(&self.name, &x);
        let mut w = self.weight.val();
        let mut x = x;
        if let Some(amax) = self.quant.weight {
            let checked = "weight shape and amax were checked by set_fake_quant";
            let value = cache::cached(self.weight.id, || {
                qatflow_kernels::fake_quant::fake_quantize_value(
                    &self.name,
                    w.clone().detach(),
                    amax,
                )
                .expect(checked)
            });
            w = match value {
                Some(v) => qatflow_kernels::fake_quant::straight_through_value(w, v),
                None => {
                    qatflow_kernels::fake_quant::fake_quantize(&self.name, w, amax).expect(checked)
                }
            };
        }
        if let Some(amax) = self.quant.input {
            x = qatflow_kernels::fake_quant::fake_quantize(&self.name, x, amax)
                .expect("input width and amax were checked by set_fake_quant");
        }
        matmul_wt(x, w)
    }
}

/// `x · wᵀ` for `x` `[.., in]` and `w` `[out, in]`: the GEMM every [`QLinear`] and the LM
/// head run.
///
/// The leading dimensions are flattened into one 2-D GEMM against the transposed view of
/// `w` (a broadcast batched matmul makes CPU backends copy the whole weight every call).
/// On CUDA with BF16 operands the GEMM and its backward go through cuBLASLt
/// (`qatflow_kernels::gemm`); elsewhere it is burn's `matmul`.
pub fn matmul_wt<B: Backend, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 2>) -> Tensor<B, D> {
    let mut dims = x.dims();
    let inp = dims[D - 1];
    let rows = dims[..D - 1].iter().product();
    dims[D - 1] = w.dims()[0];
    qatflow_kernels::gemm::matmul_xwt(x.reshape([rows, inp]), w).reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;
    use qatflow_nvfp4::{fake_quant, LinearAmax};

    type B = Flex;

    fn layer(out: usize, inp: usize) -> QLinear<B> {
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 7) % 13) as f32 - 6.0)
            .collect();
        QLinear::new(
            "l",
            Tensor::from_data(TensorData::new(w, [out, inp]), &Default::default()),
        )
    }

    #[test]
    fn forward_is_x_times_w_transposed() {
        let l = layer(2, 3);
        let x = Tensor::<B, 2>::from_data(
            TensorData::new(vec![1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0], [2, 3]),
            &Default::default(),
        );
        let y = l.forward(x).into_data().to_vec::<f32>().unwrap();
        let w = l.weight.val().into_data().to_vec::<f32>().unwrap();
        assert_eq!(y, vec![w[0], w[3], w[2], w[5]]);
    }

    #[test]
    fn fake_quant_matches_nvfp4_linear() {
        let mut l = layer(4, 32);
        let x_data: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let x = Tensor::<B, 2>::from_data(TensorData::new(x_data, [2, 32]), &Default::default());
        let amax = LinearAmax {
            weight: 6.0,
            input: 0.9,
        };
        l.set_fake_quant(amax.into()).unwrap();
        let want = fake_quant::linear("l", x.clone(), l.weight.val(), None, amax).unwrap();
        let got = l.forward(x).into_data().to_vec::<f32>().unwrap();
        // Same quantized operands; the GEMMs may sum in another order.
        for (g, w) in got.iter().zip(want.into_data().to_vec::<f32>().unwrap()) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
        }
    }

    /// Inside a cache scope the weight is fake-quantized once for any number of forwards,
    /// and outputs and gradients are those of the uncached layer bit for bit.
    #[test]
    fn the_fake_quant_cache_reuses_one_value_with_the_same_results() {
        type A = burn::backend::Autodiff<Flex>;
        let run = |cached: bool| {
            let w: Vec<f32> = (0..4 * 32).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let mut l = QLinear::<A>::new(
                "l",
                Tensor::from_data(TensorData::new(w, [4, 32]), &Default::default()),
            );
            l.set_fake_quant(QuantizerAmax {
                weight: Some(6.0),
                input: None,
            })
            .unwrap();
            let scope = cached.then(FakeQuantCache::begin);
            let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
            let x = Tensor::<A, 2>::from_data(TensorData::new(x, [2, 32]), &Default::default());
            let (y1, y2) = (l.forward(x.clone()), l.forward(x * 2.0));
            if let Some(s) = &scope {
                assert_eq!(s.len(), 1, "one weight, fake-quantized once");
            }
            let grads = (y1.clone() * y2.clone()).sum().backward();
            let g = l.weight.grad(&grads).unwrap();
            drop(scope);
            let v = |t: Tensor<A, 2>| t.into_data().to_vec::<f32>().unwrap();
            (v(y1), v(y2), g.into_data().to_vec::<f32>().unwrap())
        };
        assert_eq!(run(true), run(false));
        let scope = FakeQuantCache::begin();
        assert!(scope.is_empty(), "a new scope starts empty");
    }

    #[test]
    fn unquantizable_layers_are_refused() {
        let mut l = layer(4, 24);
        let err = l
            .set_fake_quant(QuantizerAmax {
                weight: Some(1.0),
                input: None,
            })
            .unwrap_err();
        assert!(err.to_string().contains("multiple of 16"), "{err}");
        let mut l = layer(4, 32);
        assert!(l
            .set_fake_quant(QuantizerAmax {
                weight: None,
                input: Some(0.0),
            })
            .is_err());
        assert!(l.quant.is_off());
    }
}
