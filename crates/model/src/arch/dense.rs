//! The dense decoders, Llama (`LlamaForCausalLM`, which SmolLM2 uses) and Qwen3
//! (`Qwen3ForCausalLM`), as one implementation: pre-norm layers of grouped-query attention
//! with RoPE and a SwiGLU MLP, a final RMSNorm and an LM head (the embedding when
//! `tie_word_embeddings`). Qwen3 differs only by a per-head RMSNorm of queries and keys
//! (`q_norm`, `k_norm`, weight `[head_dim]`) before RoPE, with `head_dim` independent of
//! `hidden_size / heads`; here that is an optional part of the one attention block.
//! Forward math: HF `models/llama/modeling_llama.py` and `models/qwen3/modeling_qwen3.py`.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::arch::layers::{self, CacheSlot, KvCache, Mlp, RmsNorm};
use crate::arch::rope::{self, Rope};
use crate::config::{Architecture, ModelConfig};
use crate::io::weights::{LoadError, Weights};
use crate::linear::QLinear;

/// Self-attention: q/k/v projections, Qwen3's per-head q/k RMSNorm when present, RoPE,
/// grouped-query attention, o projection.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `q_proj` `[heads * head_dim, hidden]`.
    pub q_proj: QLinear<B>,
    /// `k_proj` `[kv_heads * head_dim, hidden]`.
    pub k_proj: QLinear<B>,
    /// `v_proj` `[kv_heads * head_dim, hidden]`.
    pub v_proj: QLinear<B>,
    /// `o_proj` `[hidden, heads * head_dim]`.
    pub o_proj: QLinear<B>,
    /// Per-head query norm (`q_norm`; Qwen3 only).
    pub q_norm: Option<RmsNorm<B>>,
    /// Per-head key norm (`k_norm`; Qwen3 only).
    pub k_norm: Option<RmsNorm<B>>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

/// `norm(x)` when there is a norm, else `x`.
fn maybe_norm<B: Backend, const D: usize>(
    norm: Option<&RmsNorm<B>>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    match norm {
        Some(n) => n.forward(x),
        None => x,
    }
}

impl<B: Backend> Attention<B> {
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
        let q = heads(self.q_proj.forward(x.clone()), self.num_heads);
        let q = maybe_norm(self.q_norm.as_ref(), q).swap_dims(1, 2);
        let k = heads(self.k_proj.forward(x.clone()), self.num_kv_heads);
        let k = maybe_norm(self.k_norm.as_ref(), k).swap_dims(1, 2);
        let v = heads(self.v_proj.forward(x), self.num_kv_heads).swap_dims(1, 2);
        let q = rope::apply(q, cos, sin);
        let k = rope::apply(k, cos, sin);
        let (k, v) = layers::update_cache(cache, k, v);
        self.o_proj.forward(layers::attention(q, k, v, mask))
    }

    /// Qwen3's per-head query and key norms applied to `q`, `k` `[.., heads, head_dim]`
    /// (unchanged for Llama).
    pub fn norm_qk<const D: usize>(
        &self,
        q: Tensor<B, D>,
        k: Tensor<B, D>,
    ) -> (Tensor<B, D>, Tensor<B, D>) {
        (
            maybe_norm(self.q_norm.as_ref(), q),
            maybe_norm(self.k_norm.as_ref(), k),
        )
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Self-attention.
    pub self_attn: Attention<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
    /// The SwiGLU MLP.
    pub mlp: Mlp<B>,
}

impl<B: Backend> DecoderLayer<B> {
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

/// A whole dense causal language model (Llama or Qwen3).
#[derive(Module, Debug)]
pub struct Dense<B: Backend> {
    /// `model.embed_tokens.weight` `[vocab, hidden]`.
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// The decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// `model.norm`.
    pub norm: RmsNorm<B>,
    /// `lm_head.weight` `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    /// Rotary embedding frequencies.
    pub rope: Rope,
    /// Hyperparameters.
    pub config: ModelConfig,
}

/// Whether `config`'s attention has Qwen3's per-head q/k norms.
fn has_qk_norm(config: &ModelConfig) -> bool {
    config.architecture == Architecture::Qwen3
}

impl<B: Backend> Dense<B> {
    /// Builds the model from Hugging Face tensors (q/k norms read for Qwen3).
    pub fn load(config: &ModelConfig, w: &Weights<'_, B>) -> Result<Self, LoadError> {
        let (h, hd) = (config.hidden_size, config.head_dim);
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            let norm = |name: &str, width: usize| -> Result<RmsNorm<B>, LoadError> {
                Ok(RmsNorm::new(
                    w.tensor(&format!("{p}.{name}.weight"), [width])?,
                    config.rms_norm_eps,
                ))
            };
            let qk_norm = |name: &str| -> Result<Option<RmsNorm<B>>, LoadError> {
                has_qk_norm(config)
                    .then(|| norm(&format!("self_attn.{name}"), hd))
                    .transpose()
            };
            let linear = |name: &str, out: usize, inp: usize| {
                w.linear(&format!("{p}.self_attn.{name}"), out, inp)
            };
            layers.push(DecoderLayer {
                input_layernorm: norm("input_layernorm", h)?,
                self_attn: Attention {
                    q_proj: linear("q_proj", config.num_heads * hd, h)?,
                    k_proj: linear("k_proj", config.num_kv_heads * hd, h)?,
                    v_proj: linear("v_proj", config.num_kv_heads * hd, h)?,
                    o_proj: linear("o_proj", h, config.num_heads * hd)?,
                    q_norm: qk_norm("q_norm")?,
                    k_norm: qk_norm("k_norm")?,
                    num_heads: config.num_heads,
                    num_kv_heads: config.num_kv_heads,
                    head_dim: hd,
                },
                post_attention_layernorm: norm("post_attention_layernorm", h)?,
                mlp: layers::load_mlp(w, &p, config)?,
            });
        }
        let (embed_tokens, norm, lm_head) = layers::load_ends(w, config)?;
        Ok(Dense {
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
    /// are appended. `boundary(i, x)` sees the input of block `i` (the embedding's output
    /// for `i = 0`; the final norm's input for `i` = the layer count) and returns what the
    /// block reads ([`crate::CausalLm::forward_hidden_split`]).
    pub fn forward_hidden(
        &self,
        ids: Tensor<B, 2, Int>,
        lengths: Option<&[usize]>,
        mut cache: Option<&mut KvCache<B>>,
        boundary: &mut dyn FnMut(usize, Tensor<B, 3>) -> Tensor<B, 3>,
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
            let x_in = qatflow_kernels::recompute::block_input(boundary(i, x));
            x = layer.forward(x_in, &cos, &sin, mask.as_ref(), slot);
        }
        if let Some(c) = cache {
            c.advance(len);
        }
        self.norm.forward(boundary(self.layers.len(), x))
    }
}

/// Every tensor a dense (Llama or Qwen3) configuration needs: `(name, shape,
/// is_quantizable_linear)`; linears are named without the `.weight` suffix.
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>, bool)> {
    let (h, hd, i) = (
        config.hidden_size,
        config.head_dim,
        config.intermediate_size,
    );
    let (q, kv) = (config.num_heads * hd, config.num_kv_heads * hd);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![config.vocab_size, h],
        false,
    )];
    for l in 0..config.num_layers {
        let p = format!("model.layers.{l}");
        for (n, shape) in [("input_layernorm", h), ("post_attention_layernorm", h)] {
            out.push((format!("{p}.{n}.weight"), vec![shape], false));
        }
        if has_qk_norm(config) {
            for n in ["q_norm", "k_norm"] {
                out.push((format!("{p}.self_attn.{n}.weight"), vec![hd], false));
            }
        }
        for (n, shape) in [
            ("self_attn.q_proj", [q, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, q]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            let quantized = config.architecture.nvfp4_linears().quantizes(n);
            out.push((format!("{p}.{n}"), shape.to_vec(), quantized));
        }
    }
    out.push(("model.norm.weight".into(), vec![h], false));
    if !config.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![config.vocab_size, h], false));
    }
    out
}
