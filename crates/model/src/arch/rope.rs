//! Rotary position embedding as transformers computes it (`rotate_half`, non-interleaved
//! halves): inverse frequencies in float32, `cos`/`sin` of `position × inv_freq` in
//! float32, cast to the activation dtype, then `x·cos + rotate_half(x)·sin`.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use crate::config::{RopeConfig, RopeScaling};

/// Inverse frequencies of one head (`head_dim / 2` of them), scaling applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// The inverse frequencies for `head_dim` under `config` (HF
    /// `_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`,
    /// `_compute_llama3_parameters`).
    pub fn new(config: &RopeConfig, head_dim: usize) -> Rope {
        let base: Vec<f64> = (0..head_dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / head_dim as f32;
                1.0 / (config.theta as f32).powf(exponent) as f64
            })
            .collect();
        let scaled: Vec<f64> = match config.scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        Rope {
            inv_freq: scaled.into_iter().map(|f| f as f32).collect(),
        }
    }

    /// `cos` and `sin` rows `[head_dim]` of each of `positions`, one after another, in
    /// float32 (the halves repeated, as `rotate_half` pairs them).
    pub fn cos_sin(&self, positions: impl IntoIterator<Item = usize>) -> (Vec<f32>, Vec<f32>) {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in positions {
            let angles: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        (cos, sin)
    }

    /// `cos` and `sin` tables `[len, head_dim]` for positions `offset..offset + len`,
    /// computed in float32 and created in `dtype` on `device`.
    pub fn tables<B: Backend>(
        &self,
        offset: usize,
        len: usize,
        dtype: DType,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let half = self.inv_freq.len();
        let (cos, sin) = self.cos_sin(offset..offset + len);
        let make = |v: Vec<f32>| {
            let t = Tensor::<B, 2>::from_data(
                TensorData::new(v, [len, half * 2]),
                (device, DType::F32),
            );
            crate::arch::layers::to_dtype(t, dtype)
        };
        (make(cos), make(sin))
    }
}

/// Applies the rotation to `x` `[batch, heads, len, head_dim]` with tables from
/// [`Rope::tables`] of the same `len`.
pub fn apply<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let cos: Tensor<B, 4> = cos.clone().unsqueeze();
    let sin: Tensor<B, 4> = sin.clone().unsqueeze();
    x * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn default_frequencies_follow_theta() {
        let rope = Rope::new(
            &RopeConfig {
                theta: 10000.0,
                scaling: RopeScaling::None,
            },
            8,
        );
        let want = [1.0, 0.1, 0.01, 0.001];
        for (got, want) in rope.inv_freq.iter().zip(want) {
            assert!(
                (got - want).abs() < 1e-6 * want.max(1e-3),
                "{got} vs {want}"
            );
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let config = RopeConfig {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let plain = Rope::new(
            &RopeConfig {
                theta: 500000.0,
                scaling: RopeScaling::None,
            },
            128,
        );
        let scaled = Rope::new(&config, 128);
        assert_eq!(scaled.inv_freq[0], plain.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        assert!((scaled.inv_freq[last] - plain.inv_freq[last] / 8.0).abs() < 1e-12);
    }

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let rope = Rope::new(
            &RopeConfig {
                theta: 10000.0,
                scaling: RopeScaling::None,
            },
            4,
        );
        let device = Default::default();
        let x = Tensor::<Flex, 4>::from_data(
            TensorData::new(
                vec![1.0f32, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0],
                [1, 1, 2, 4],
            ),
            &device,
        );
        let (cos, sin) = rope.tables::<Flex>(0, 2, DType::F32, &device);
        let y = apply(x, &cos, &sin).into_data().to_vec::<f32>().unwrap();
        assert_eq!(&y[..4], &[1.0, 2.0, 3.0, 4.0]);
        let norm: f32 = y[4..].iter().map(|v| v * v).sum();
        assert!((norm - 30.0).abs() < 1e-4);
        // Pair (x0, x2) rotates by angle 1 (position 1, inv_freq 1).
        let (c, s) = (1f32.cos(), 1f32.sin());
        assert!((y[4] - (1.0 * c - 3.0 * s)).abs() < 1e-6);
        assert!((y[6] - (3.0 * c + 1.0 * s)).abs() < 1e-6);
    }
}
