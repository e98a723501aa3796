//! The Qwen3.5 hybrid decoder (`qwen3_5_text`; the language model of `qwen3_5`): layers
//! of a Gated DeltaNet (linear attention, [`GatedDeltaNet`]) or gated full attention
//! ([`GatedAttention`]: a sigmoid output gate folded into `q_proj`, (1 + w) q/k norms,
//! partial RoPE, GQA), each followed by the SwiGLU MLP; zero-centred (1 + w) RMSNorms.
//! Forward math: HF `models/qwen3_5/modeling_qwen3_5.py`. Tensors are read under
//! `model.` (text checkpoints) or `model.language_model.` (VL checkpoints); `mtp.*` and
//! `model.visual.*` are not read.
//!
//! In a [`KvCache`], a linear-attention layer's slot holds its recurrent state
//! `[batch, value_heads, key_dim, value_dim]` (float32) as `keys` and its convolution window
//! `[batch, 1, kernel − 1, conv_dim]` as `values`; full-attention layers hold keys and values.

// `GatedDeltaNet::A_log` keeps the checkpoint's tensor name, which parameter names (and so
// training checkpoints) are derived from; the module derive repeats it in generated code.
#![allow(non_snake_case)]

use burn::module::{Module, Param};
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};

use crate::arch::deltanet;
use crate::arch::layers::{self, to_dtype, CacheSlot, KvCache, LayerCache, Mlp};
use crate::arch::rope::{self, Rope};
use crate::config::{HybridConfig, LayerKind, ModelConfig};
use crate::io::weights::{LoadError, Weights};
use crate::linear::QLinear;

/// Tensor-name prefix of a text-only checkpoint (`Qwen3_5ForCausalLM`).
pub const TEXT_PREFIX: &str = "model";

/// Tensor-name prefix of the language model inside a VL checkpoint
/// (`Qwen3_5ForConditionalGeneration`).
pub const VL_PREFIX: &str = "model.language_model";

/// Qwen3.5's RMSNorm: normalized in float32 and scaled by `1 + w` (weight initialized to
/// zero), then cast to the input dtype.
#[derive(Module, Debug)]
pub struct OffsetRmsNorm<B: Backend> {
    /// The zero-centred gain `[dim]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square.
    pub eps: f64,
}

impl<B: Backend> OffsetRmsNorm<B> {
    /// A norm with the given (zero-centred) gain.
    pub fn new(weight: Tensor<B, 1>, eps: f64) -> Self {
        OffsetRmsNorm {
            weight: Param::from_tensor(weight),
            eps,
        }
    }

    /// Normalizes over the last dimension (on CUDA training backends one operation,
    /// `qatflow_kernels::norm`).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let (x, w) = match qatflow_kernels::norm::try_rms_norm(x, self.weight.val(), self.eps, true)
        {
            Ok(out) => return out,
            Err(inputs) => inputs,
        };
        let dtype = x.dtype();
        let xf = to_dtype(x, DType::F32);
        let mean_square = qatflow_kernels::reduce::mean_last(xf.clone().square());
        let normed = xf * mean_square.add_scalar(self.eps).sqrt().recip();
        let w: Tensor<B, D> = to_dtype(w, DType::F32).add_scalar(1.0).unsqueeze();
        to_dtype(normed * w, dtype)
    }
}

/// The Gated DeltaNet's output norm (`Qwen3_5RMSNormGated`): plain gain `w` (initialized to
/// one), `w · rmsnorm(x) · silu(z)`.
#[derive(Module, Debug)]
pub struct GatedRmsNorm<B: Backend> {
    /// The gain `[value_head_dim]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square.
    pub eps: f64,
}

impl<B: Backend> GatedRmsNorm<B> {
    /// Normalizes `x` over its last dimension and gates it with `silu(z)` (same shape).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>, z: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let xf = to_dtype(x, DType::F32);
        let mean_square = qatflow_kernels::reduce::mean_last(xf.clone().square());
        let normed = to_dtype(xf * mean_square.add_scalar(self.eps).sqrt().recip(), dtype);
        let w: Tensor<B, D> = to_dtype(self.weight.val(), dtype).unsqueeze();
        let scaled = to_dtype(normed * w, DType::F32);
        to_dtype(scaled * silu(to_dtype(z, DType::F32)), dtype)
    }
}

/// A depthwise convolution's weight (`conv1d.weight`, `[channels, 1, kernel]`, no bias).
#[derive(Module, Debug)]
pub struct Conv1d<B: Backend> {
    /// The taps `[channels, 1, kernel]`.
    pub weight: Param<Tensor<B, 3>>,
}

/// A Gated DeltaNet layer (`linear_attn`).
#[derive(Module, Debug)]
pub struct GatedDeltaNet<B: Backend> {
    /// `in_proj_qkv` `[2·key_dim + value_dim, hidden]`, rows `[q | k | v]`.
    pub in_proj_qkv: QLinear<B>,
    /// `in_proj_z` `[value_dim, hidden]`: the output gate.
    pub in_proj_z: QLinear<B>,
    /// `in_proj_b` `[value_heads, hidden]`: write strength `β = sigmoid(b)` (not quantized).
    pub in_proj_b: QLinear<B>,
    /// `in_proj_a` `[value_heads, hidden]`: decay input (not quantized).
    pub in_proj_a: QLinear<B>,
    /// The depthwise causal convolution over the q/k/v channels.
    pub conv1d: Conv1d<B>,
    /// Per-head bias of the decay's softplus `[value_heads]`.
    pub dt_bias: Param<Tensor<B, 1>>,
    /// Per-head log decay rate `[value_heads]` (kept float32).
    pub A_log: Param<Tensor<B, 1>>,
    /// The gated output norm (per value head).
    pub norm: GatedRmsNorm<B>,
    /// `out_proj` `[hidden, value_dim]`.
    pub out_proj: QLinear<B>,
    /// Key (query/key) heads.
    pub num_k_heads: usize,
    /// Value heads (a multiple of the key heads).
    pub num_v_heads: usize,
    /// Width of a key head.
    pub head_k_dim: usize,
    /// Width of a value head.
    pub head_v_dim: usize,
}

/// Per-layer decode state read from (and written back to) a cache slot.
struct GdnState<B: Backend> {
    recurrent: Tensor<B, 4>,
    window: Option<Tensor<B, 3>>,
}

impl<B: Backend> GatedDeltaNet<B> {
    /// The layer over `x` `[batch, len, hidden]`. With a cache slot, the recurrent and
    /// convolution state continue from it and the new state is stored; a single new token
    /// takes the recurrent form, longer inputs the chunked one.
    pub fn forward(&self, x: Tensor<B, 3>, cache: Option<CacheSlot<'_, B>>) -> Tensor<B, 3> {
        let [batch, len, _] = x.dims();
        let dtype = x.dtype();
        let (hk, hv, dk, dv) = (
            self.num_k_heads,
            self.num_v_heads,
            self.head_k_dim,
            self.head_v_dim,
        );
        let (key_dim, value_dim) = (hk * dk, hv * dv);
        let kernel = self.conv1d.weight.dims()[2];
        let mut cache = cache;
        let previous = cache.as_mut().and_then(|slot| {
            slot.layer.take().map(|c| GdnState {
                recurrent: c.keys,
                window: (kernel > 1).then(|| {
                    let [_, _, h, ch] = c.values.dims();
                    c.values.reshape([batch, h, ch])
                }),
            })
        });
        let (state, window) = match previous {
            Some(s) => (Some(s.recurrent), s.window),
            None => (None, None),
        };

        let qkv = self.in_proj_qkv.forward(x.clone());
        let z = self.in_proj_z.forward(x.clone());
        let b = to_dtype(self.in_proj_b.forward(x.clone()), DType::F32);
        let a = to_dtype(self.in_proj_a.forward(x), DType::F32);
        let weight = to_dtype(self.conv1d.weight.val(), dtype);
        let (conv, window) = deltanet::causal_conv(qkv, weight, window);
        let qkv = silu(conv);

        let q = qkv
            .clone()
            .narrow(2, 0, key_dim)
            .reshape([batch, len, hk, dk]);
        let k = qkv
            .clone()
            .narrow(2, key_dim, key_dim)
            .reshape([batch, len, hk, dk]);
        let v = qkv
            .narrow(2, 2 * key_dim, value_dim)
            .reshape([batch, len, hv, dv]);
        let beta = sigmoid(b);
        let a_log: Tensor<B, 3> = to_dtype(self.A_log.val(), DType::F32).unsqueeze();
        let dt_bias: Tensor<B, 3> = to_dtype(self.dt_bias.val(), DType::F32).unsqueeze();
        let g = a_log.exp().neg() * deltanet::softplus(a + dt_bias);
        // Value head j reads key head j / (hv / hk) (HF `repeat_interleave`).
        let rep = hv / hk;
        let repeat = |t: Tensor<B, 4>| {
            if rep == 1 {
                t
            } else {
                t.unsqueeze_dim::<5>(3)
                    .expand([batch, len, hk, rep, dk])
                    .reshape([batch, len, hv, dk])
            }
        };
        let q =
            deltanet::l2norm(to_dtype(repeat(q), DType::F32)).mul_scalar((dk as f64).powf(-0.5));
        let k = deltanet::l2norm(to_dtype(repeat(k), DType::F32));
        let v = to_dtype(v, DType::F32);
        let heads_first = |t: Tensor<B, 4>| t.swap_dims(1, 2);
        let (q, k, v) = (heads_first(q), heads_first(k), heads_first(v));
        let (g, beta) = (g.swap_dims(1, 2), beta.swap_dims(1, 2));
        // The fused kernels on CUDA under the training engine; the tensor forms elsewhere.
        let (o, state) =
            match qatflow_kernels::deltanet::try_gated_delta_rule([q, k, v], [g, beta], state) {
                Ok(done) => done,
                Err(([q, k, v], [g, beta], state)) => {
                    if len == 1 && cache.is_some() {
                        deltanet::recurrent(q, k, v, g, beta, state)
                    } else {
                        deltanet::chunked(q, k, v, g, beta, state)
                    }
                }
            };
        if let Some(slot) = cache {
            let values = match window {
                Some(w) => {
                    let [_, h, ch] = w.dims();
                    w.reshape([batch, 1, h, ch])
                }
                // A kernel of 1 has no window; the slot still needs a tensor.
                None => state.clone(),
            };
            *slot.layer = Some(LayerCache {
                keys: state,
                values,
            });
        }
        let o = to_dtype(o.swap_dims(1, 2), dtype);
        let z = z.reshape([batch, len, hv, dv]);
        let o = self.norm.forward(o, z).reshape([batch, len, value_dim]);
        self.out_proj.forward(o)
    }
}

/// Full attention with an output gate (`self_attn`): `q_proj` yields per head a query and a
/// gate (`[query | gate]`), (1 + w) q/k norms, RoPE on the first `rotary_dim` dimensions,
/// grouped-query attention, `o_proj(attn · sigmoid(gate))`.
#[derive(Module, Debug)]
pub struct GatedAttention<B: Backend> {
    /// `q_proj` `[heads · head_dim · (2 if gated else 1), hidden]`.
    pub q_proj: QLinear<B>,
    /// `k_proj` `[kv_heads · head_dim, hidden]`.
    pub k_proj: QLinear<B>,
    /// `v_proj` `[kv_heads · head_dim, hidden]`.
    pub v_proj: QLinear<B>,
    /// `o_proj` `[hidden, heads · head_dim]`.
    pub o_proj: QLinear<B>,
    /// Per-head query norm.
    pub q_norm: OffsetRmsNorm<B>,
    /// Per-head key norm.
    pub k_norm: OffsetRmsNorm<B>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Rotated dimensions of a head.
    pub rotary_dim: usize,
    /// `q_proj` carries the output gate.
    pub gated: bool,
}

/// RoPE on the first `cos.dims()[1]` dimensions of `x` `[batch, heads, len, head_dim]`.
fn partial_rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let r = cos.dims()[1];
    if r == d {
        return rope::apply(x, cos, sin);
    }
    let rotated = rope::apply(x.clone().narrow(3, 0, r), cos, sin);
    Tensor::cat(vec![rotated, x.narrow(3, r, d - r)], 3)
}

impl<B: Backend> GatedAttention<B> {
    /// Attention over `x` `[batch, len, hidden]`; `rope` holds the `cos`/`sin` tables of the
    /// new positions (`None` when no dimension is rotated).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: Option<&(Tensor<B, 2>, Tensor<B, 2>)>,
        mask: Option<&Tensor<B, 4>>,
        cache: Option<CacheSlot<'_, B>>,
    ) -> Tensor<B, 3> {
        let [batch, len, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let projected = self.q_proj.forward(x.clone());
        let (q, gate) = if self.gated {
            let qg = projected.reshape([batch, len, nh, 2 * hd]);
            let gate = qg.clone().narrow(3, hd, hd).reshape([batch, len, nh * hd]);
            (qg.narrow(3, 0, hd), Some(gate))
        } else {
            (projected.reshape([batch, len, nh, hd]), None)
        };
        let q = self.q_norm.forward(q).swap_dims(1, 2);
        let k = self
            .k_norm
            .forward(
                self.k_proj
                    .forward(x.clone())
                    .reshape([batch, len, nkv, hd]),
            )
            .swap_dims(1, 2);
        let v = self
            .v_proj
            .forward(x)
            .reshape([batch, len, nkv, hd])
            .swap_dims(1, 2);
        let (q, k) = match rope {
            Some((cos, sin)) => (partial_rope(q, cos, sin), partial_rope(k, cos, sin)),
            None => (q, k),
        };
        let (k, v) = layers::update_cache(cache, k, v);
        let o = layers::attention(q, k, v, mask);
        let o = match gate {
            Some(g) => o * sigmoid(g),
            None => o,
        };
        self.o_proj.forward(o)
    }
}

/// One pre-norm decoder layer: exactly one of `linear_attn` / `self_attn` is present.
#[derive(Module, Debug)]
pub struct Qwen35Layer<B: Backend> {
    /// Norm before the mixer.
    pub input_layernorm: OffsetRmsNorm<B>,
    /// The Gated DeltaNet of a `linear_attention` layer.
    pub linear_attn: Option<GatedDeltaNet<B>>,
    /// The gated attention of a `full_attention` layer.
    pub self_attn: Option<GatedAttention<B>>,
    /// Norm before the MLP.
    pub post_attention_layernorm: OffsetRmsNorm<B>,
    /// The SwiGLU MLP.
    pub mlp: Mlp<B>,
}

impl<B: Backend> Qwen35Layer<B> {
    /// `x + mixer(norm(x))`, then `h + mlp(norm(h))`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: Option<&(Tensor<B, 2>, Tensor<B, 2>)>,
        mask: Option<&Tensor<B, 4>>,
        cache: Option<CacheSlot<'_, B>>,
    ) -> Tensor<B, 3> {
        let normed = self.input_layernorm.forward(x.clone());
        let mixed = match (&self.linear_attn, &self.self_attn) {
            (Some(gdn), _) => gdn.forward(normed, cache),
            (None, Some(attn)) => attn.forward(normed, rope, mask, cache),
            (None, None) => unreachable!("every Qwen3.5 layer is loaded with a mixer"),
        };
        let h = x + mixed;
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }

    /// The quantizable linears of this layer (mixer projections, then the MLP's).
    pub fn linears_mut(&mut self) -> Vec<&mut QLinear<B>> {
        let mut out = Vec::new();
        if let Some(l) = self.linear_attn.as_mut() {
            out.extend([&mut l.in_proj_qkv, &mut l.in_proj_z, &mut l.out_proj]);
        }
        if let Some(a) = self.self_attn.as_mut() {
            out.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
        }
        let m = &mut self.mlp;
        out.extend([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]);
        out
    }
}

/// The whole Qwen3.5 causal language model (text part).
#[derive(Module, Debug)]
pub struct Qwen35<B: Backend> {
    /// `{prefix}.embed_tokens.weight` `[vocab, hidden]`.
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// The decoder layers.
    pub layers: Vec<Qwen35Layer<B>>,
    /// `{prefix}.norm`.
    pub norm: OffsetRmsNorm<B>,
    /// `lm_head.weight` `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    /// Rotary frequencies of the rotated dimensions.
    pub rope: Rope,
    /// Hyperparameters.
    pub config: ModelConfig,
}

fn hybrid(config: &ModelConfig) -> &HybridConfig {
    config
        .hybrid
        .as_ref()
        .expect("a Qwen3.5 ModelConfig carries its hybrid settings")
}

/// Every tensor a Qwen3.5 configuration needs under `prefix` (`model` or
/// `model.language_model`): `(name, shape, is_quantizable_linear)`, quantizable linears named
/// without `.weight` (as [`crate::io::weights::expected_tensors`] lists them).
pub fn expected_tensors(config: &ModelConfig, prefix: &str) -> Vec<(String, Vec<usize>, bool)> {
    let h = hybrid(config);
    let (hid, hd, inter) = (
        config.hidden_size,
        config.head_dim,
        config.intermediate_size,
    );
    let q_rows = config.num_heads * hd * if h.attn_output_gate { 2 } else { 1 };
    let kv = config.num_kv_heads * hd;
    let hv = h.linear_num_value_heads;
    let mut out = vec![(
        format!("{prefix}.embed_tokens.weight"),
        vec![config.vocab_size, hid],
        false,
    )];
    // Quantized linears are named without `.weight`; every other tensor with it.
    let linears = config.architecture.nvfp4_linears();
    for (l, kind) in h.layer_types.iter().enumerate() {
        let p = format!("{prefix}.layers.{l}");
        let mut push = |n: &str, shape: Vec<usize>| {
            out.push((format!("{p}.{n}"), shape, linears.quantizes(n)));
        };
        push("input_layernorm.weight", vec![hid]);
        match kind {
            LayerKind::LinearAttention => {
                push("linear_attn.in_proj_qkv", vec![h.conv_dim(), hid]);
                push("linear_attn.in_proj_z", vec![h.value_dim(), hid]);
                push("linear_attn.in_proj_b.weight", vec![hv, hid]);
                push("linear_attn.in_proj_a.weight", vec![hv, hid]);
                push(
                    "linear_attn.conv1d.weight",
                    vec![h.conv_dim(), 1, h.linear_conv_kernel_dim],
                );
                push("linear_attn.dt_bias", vec![hv]);
                push("linear_attn.A_log", vec![hv]);
                push("linear_attn.norm.weight", vec![h.linear_value_head_dim]);
                push("linear_attn.out_proj", vec![hid, h.value_dim()]);
            }
            LayerKind::FullAttention => {
                push("self_attn.q_proj", vec![q_rows, hid]);
                push("self_attn.k_proj", vec![kv, hid]);
                push("self_attn.v_proj", vec![kv, hid]);
                push("self_attn.o_proj", vec![hid, config.num_heads * hd]);
                push("self_attn.q_norm.weight", vec![hd]);
                push("self_attn.k_norm.weight", vec![hd]);
            }
        }
        push("post_attention_layernorm.weight", vec![hid]);
        push("mlp.gate_proj", vec![inter, hid]);
        push("mlp.up_proj", vec![inter, hid]);
        push("mlp.down_proj", vec![hid, inter]);
    }
    out.push((format!("{prefix}.norm.weight"), vec![hid], false));
    if !config.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![config.vocab_size, hid], false));
    }
    out
}

/// True for the zero-centred (1 + w) norm weights among Qwen3.5's tensor names (what a
/// random initialization sets to zero; the gated norm `linear_attn.norm` is not one).
pub fn is_offset_norm(name: &str) -> bool {
    name.ends_with("layernorm.weight")
        || name.ends_with("self_attn.q_norm.weight")
        || name.ends_with("self_attn.k_norm.weight")
        || (name.ends_with(".norm.weight") && !name.contains(".layers."))
}

/// The tensor-name prefix of a checkpoint's language model: [`VL_PREFIX`] when it holds
/// `model.language_model.embed_tokens.weight`, else [`TEXT_PREFIX`].
pub fn checkpoint_prefix(ckpt: &crate::io::weights::Checkpoint) -> &'static str {
    if ckpt
        .info(&format!("{VL_PREFIX}.embed_tokens.weight"))
        .is_some()
    {
        VL_PREFIX
    } else {
        TEXT_PREFIX
    }
}

impl<B: Backend> Qwen35<B> {
    /// Builds the model from Hugging Face tensors named under `prefix`.
    pub fn load(config: &ModelConfig, w: &Weights<'_, B>, prefix: &str) -> Result<Self, LoadError> {
        let h = hybrid(config);
        let (hid, hd) = (config.hidden_size, config.head_dim);
        let eps = config.rms_norm_eps;
        let hv = h.linear_num_value_heads;
        let norm = |name: &str, dim: usize| -> Result<OffsetRmsNorm<B>, LoadError> {
            Ok(OffsetRmsNorm::new(w.tensor(name, [dim])?, eps))
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for (i, kind) in h.layer_types.iter().enumerate() {
            let p = format!("{prefix}.layers.{i}");
            let (linear_attn, self_attn) = match kind {
                LayerKind::LinearAttention => {
                    let a = format!("{p}.linear_attn");
                    let gdn = GatedDeltaNet {
                        in_proj_qkv: w.linear(&format!("{a}.in_proj_qkv"), h.conv_dim(), hid)?,
                        in_proj_z: w.linear(&format!("{a}.in_proj_z"), h.value_dim(), hid)?,
                        in_proj_b: w.linear(&format!("{a}.in_proj_b"), hv, hid)?,
                        in_proj_a: w.linear(&format!("{a}.in_proj_a"), hv, hid)?,
                        conv1d: Conv1d {
                            weight: Param::from_tensor(w.tensor(
                                &format!("{a}.conv1d.weight"),
                                [h.conv_dim(), 1, h.linear_conv_kernel_dim],
                            )?),
                        },
                        dt_bias: Param::from_tensor(w.tensor(&format!("{a}.dt_bias"), [hv])?),
                        A_log: Param::from_tensor(w.tensor_f32(&format!("{a}.A_log"), [hv])?),
                        norm: GatedRmsNorm {
                            weight: Param::from_tensor(
                                w.tensor(&format!("{a}.norm.weight"), [h.linear_value_head_dim])?,
                            ),
                            eps,
                        },
                        out_proj: w.linear(&format!("{a}.out_proj"), hid, h.value_dim())?,
                        num_k_heads: h.linear_num_key_heads,
                        num_v_heads: hv,
                        head_k_dim: h.linear_key_head_dim,
                        head_v_dim: h.linear_value_head_dim,
                    };
                    (Some(gdn), None)
                }
                LayerKind::FullAttention => {
                    let a = format!("{p}.self_attn");
                    let gate = if h.attn_output_gate { 2 } else { 1 };
                    let kv = config.num_kv_heads * hd;
                    let attn = GatedAttention {
                        q_proj: w.linear(
                            &format!("{a}.q_proj"),
                            config.num_heads * hd * gate,
                            hid,
                        )?,
                        k_proj: w.linear(&format!("{a}.k_proj"), kv, hid)?,
                        v_proj: w.linear(&format!("{a}.v_proj"), kv, hid)?,
                        o_proj: w.linear(&format!("{a}.o_proj"), hid, config.num_heads * hd)?,
                        q_norm: norm(&format!("{a}.q_norm.weight"), hd)?,
                        k_norm: norm(&format!("{a}.k_norm.weight"), hd)?,
                        num_heads: config.num_heads,
                        num_kv_heads: config.num_kv_heads,
                        head_dim: hd,
                        rotary_dim: h.rotary_dim,
                        gated: h.attn_output_gate,
                    };
                    (None, Some(attn))
                }
            };
            layers.push(Qwen35Layer {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"), hid)?,
                linear_attn,
                self_attn,
                post_attention_layernorm: norm(
                    &format!("{p}.post_attention_layernorm.weight"),
                    hid,
                )?,
                mlp: layers::load_mlp(w, &p, config)?,
            });
        }
        let (v, hid) = (config.vocab_size, config.hidden_size);
        let embed_tokens =
            Param::from_tensor(w.tensor(&format!("{prefix}.embed_tokens.weight"), [v, hid])?);
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(Param::from_tensor(w.tensor("lm_head.weight", [v, hid])?))
        };
        Ok(Qwen35 {
            embed_tokens,
            layers,
            norm: norm(&format!("{prefix}.norm.weight"), hid)?,
            lm_head,
            rope: Rope::new(&config.rope, h.rotary_dim),
            config: config.clone(),
        })
    }

    /// Final hidden states `[batch, len, hidden]` (after the final norm) of `ids`
    /// `[batch, len]`. `lengths` gives each sequence's unpadded length (right padding; the
    /// outputs of padding positions are meaningless); with a `cache`, positions continue
    /// after the cached ones and every layer's state is carried (all sequences of a cached
    /// batch must be unpadded: the linear-attention state would absorb padding).
    /// `boundary(i, x)` sees the input of block `i` (the embedding's output for `i = 0`;
    /// the final norm's input for `i` = the layer count) and returns what the block reads
    /// ([`crate::CausalLm::forward_hidden_split`]).
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
        let rotary = hybrid(&self.config).rotary_dim;
        let tables = (rotary > 0).then(|| self.rope.tables(past, len, weight.dtype(), &device));
        let keys = cache.as_deref_mut().map_or(past + len, |c| c.reserve(len));
        let mask = layers::attention_mask::<B>(batch, len, past, keys, lengths, &device);
        let mut x = layers::embed(weight, ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| c.layer_mut(i));
            let x_in = qatflow_kernels::recompute::block_input(boundary(i, x));
            x = layer.forward(x_in, tables.as_ref(), mask.as_ref(), slot);
        }
        if let Some(c) = cache {
            c.advance(len);
        }
        self.norm.forward(boundary(self.layers.len(), x))
    }
}
