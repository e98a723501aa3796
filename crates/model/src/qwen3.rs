//! The dense Qwen3 decoder (`Qwen3ForCausalLM`): Llama's layout plus a per-head RMSNorm
//! of queries and keys (`q_norm`, `k_norm`, weight `[head_dim]`) before RoPE, with
//! `head_dim` independent of `hidden_size / heads`. Forward math: HF
//! `models/qwen3/modeling_qwen3.py`.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::config::ModelConfig;
use crate::layers::{self, CacheSlot, KvCache, Mlp, RmsNorm};
use crate::linear::QLinear;
use crate::rope::{self, Rope};
use crate::weights::{LoadError, Weights};

/// Qwen3 self-attention: q/k/v projections, per-head q/k RMSNorm, RoPE, grouped-query
/// attention, o projection.
#[derive(Module, Debug)]
pub struct Qwen3Attention<B: Backend> {
    /// `q_proj` `[heads * head_dim, hidden]`.
    pub q_proj: QLinear<B>,
    /// `k_proj` `[kv_heads * head_dim, hidden]`.
    pub k_proj: QLinear<B>,
    /// `v_proj` `[kv_heads * head_dim, hidden]`.
    pub v_proj: QLinear<B>,
    /// `o_proj` `[hidden, heads * head_dim]`.
    pub o_proj: QLinear<B>,
    /// Per-head query norm (`q_norm`).
    pub q_norm: RmsNorm<B>,
    /// Per-head key norm (`k_norm`).
    pub k_norm: RmsNorm<B>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

impl<B: Backend> Qwen3Attention<B> {
    /// Attention over `x` `[batch, len, hidden]`; `cos`/`sin` cover the new positions,
    /// `cache` (when given) holds the earlier ones and receives the new keys/values.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 2>,
        sin: &Tensor<B, 2>,
        mask: Option<&Tensor<B, 4>>,
        cache: Option<CacheSlot<'_, B>>,
    ) -> Tensor<B, 3> {
        let [batch, len, _] = x.dims();
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([batch, len, n, self.head_dim]);
        let q = self
            .q_norm
            .forward(heads(self.q_proj.forward(x.clone()), self.num_heads))
            .swap_dims(1, 2);
        let k = self
            .k_norm
            .forward(heads(self.k_proj.forward(x.clone()), self.num_kv_heads))
            .swap_dims(1, 2);
        let v = heads(self.v_proj.forward(x), self.num_kv_heads).swap_dims(1, 2);
        let q = rope::apply(q, cos, sin);
        let k = rope::apply(k, cos, sin);
        let (k, v) = layers::update_cache(cache, k, v);
        self.o_proj.forward(layers::attention(q, k, v, mask))
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct Qwen3Layer<B: Backend> {
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Self-attention.
    pub self_attn: Qwen3Attention<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
    /// The SwiGLU MLP.
    pub mlp: Mlp<B>,
}

impl<B: Backend> Qwen3Layer<B> {
    /// `x + attn(norm(x))`, then `h + mlp(norm(h))`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 2>,
        sin: &Tensor<B, 2>,
        mask: Option<&Tensor<B, 4>>,
        cache: Option<CacheSlot<'_, B>>,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), cos, sin, mask, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// The whole Qwen3 causal language model.
#[derive(Module, Debug)]
pub struct Qwen3<B: Backend> {
    /// `model.embed_tokens.weight` `[vocab, hidden]`.
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// The decoder layers.
    pub layers: Vec<Qwen3Layer<B>>,
    /// `model.norm`.
    pub norm: RmsNorm<B>,
    /// `lm_head.weight` `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    /// Rotary embedding frequencies.
    pub rope: Rope,
    /// Hyperparameters.
    pub config: ModelConfig,
}

impl<B: Backend> Qwen3<B> {
    /// Builds the model from Hugging Face tensors.
    pub fn load(config: &ModelConfig, w: &Weights<'_, B>) -> Result<Self, LoadError> {
        let (h, hd) = (config.hidden_size, config.head_dim);
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            let norm = |w: &Weights<'_, B>, n: &str| -> Result<RmsNorm<B>, LoadError> {
                Ok(RmsNorm::new(
                    w.tensor(&format!("{p}.{n}.weight"), [h])?,
                    config.rms_norm_eps,
                ))
            };
            layers.push(Qwen3Layer {
                input_layernorm: norm(w, "input_layernorm")?,
                self_attn: Qwen3Attention {
                    q_proj: w.linear(&format!("{p}.self_attn.q_proj"), config.num_heads * hd, h)?,
                    k_proj: w.linear(
                        &format!("{p}.self_attn.k_proj"),
                        config.num_kv_heads * hd,
                        h,
                    )?,
                    v_proj: w.linear(
                        &format!("{p}.self_attn.v_proj"),
                        config.num_kv_heads * hd,
                        h,
                    )?,
                    o_proj: w.linear(&format!("{p}.self_attn.o_proj"), h, config.num_heads * hd)?,
                    q_norm: RmsNorm::new(
                        w.tensor(&format!("{p}.self_attn.q_norm.weight"), [hd])?,
                        config.rms_norm_eps,
                    ),
                    k_norm: RmsNorm::new(
                        w.tensor(&format!("{p}.self_attn.k_norm.weight"), [hd])?,
                        config.rms_norm_eps,
                    ),
                    num_heads: config.num_heads,
                    num_kv_heads: config.num_kv_heads,
                    head_dim: hd,
                },
                post_attention_layernorm: norm(w, "post_attention_layernorm")?,
                mlp: layers::load_mlp(w, &p, config)?,
            });
        }
        let (embed_tokens, norm, lm_head) = layers::load_ends(w, config)?;
        Ok(Qwen3 {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(&config.rope, hd),
            config: config.clone(),
        })
    }

    /// Final hidden states `[batch, len, hidden]` (after `model.norm`) of `ids`
    /// `[batch, len]`. `lengths` gives each sequence's unpadded length (right padding);
    /// with a `cache`, positions continue after the cached ones and the new keys/values
    /// are appended.
    pub fn forward_hidden(
        &self,
        ids: Tensor<B, 2, Int>,
        lengths: Option<&[usize]>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let [batch, len] = ids.dims();
        let past = cache.as_ref().map_or(0, |c| c.len());
        let weight = self.embed_tokens.val();
        let device = weight.device();
        let (cos, sin) = self.rope.tables(past, len, weight.dtype(), &device);
        let keys = cache.as_deref_mut().map_or(past + len, |c| c.reserve(len));
        let mask = layers::attention_mask::<B>(batch, len, past, keys, lengths, &device);
        let mut x = layers::embed(weight, ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| c.layer_mut(i));
            let x_in = qatflow_kernels::recompute::block_input(x);
            x = layer.forward(x_in, &cos, &sin, mask.as_ref(), slot);
        }
        if let Some(c) = cache {
            c.advance(len);
        }
        self.norm.forward(x)
    }
}
