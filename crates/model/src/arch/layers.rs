//! Building blocks shared by the decoder architectures: RMSNorm, the SwiGLU MLP,
//! grouped-query attention with an additive mask, the key/value cache, and the embedding
//! lookup.

use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::config::ModelConfig;
use crate::io::weights::{LoadError, Weights};
use crate::linear::QLinear;

pub use qatflow_kernels::to_dtype;

/// RMSNorm as Llama and Qwen3 compute it: normalized in float32, cast back to the input
/// dtype, then multiplied by the weight.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// The per-channel gain `[dim]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// A norm with the given gain.
    pub fn new(weight: Tensor<B, 1>, eps: f64) -> Self {
        RmsNorm {
            weight: Param::from_tensor(weight),
            eps,
        }
    }

    /// Normalizes over the last dimension (on CUDA training backends one operation,
    /// `qatflow_kernels::norm`).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let (x, w) =
            match qatflow_kernels::norm::try_rms_norm(x, self.weight.val(), self.eps, false) {
                Ok(out) => return out,
                Err(inputs) => inputs,
            };
        let dtype = x.dtype();
        let xf = to_dtype(x, DType::F32);
        let mean_square = qatflow_kernels::reduce::mean_last(xf.clone().square());
        let normed = xf * mean_square.add_scalar(self.eps).sqrt().recip();
        to_dtype(normed, dtype) * w.unsqueeze()
    }
}

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `gate_proj`.
    pub gate_proj: QLinear<B>,
    /// `up_proj`.
    pub up_proj: QLinear<B>,
    /// `down_proj`.
    pub down_proj: QLinear<B>,
}

impl<B: Backend> Mlp<B> {
    /// Applies the MLP to `[batch, len, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

/// Keys and values of one layer, `[batch, kv_heads, capacity, head_dim]` each: positions
/// below the cache's length are filled, the rest are zeros that the attention mask hides.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    /// Cached keys (after RoPE).
    pub keys: Tensor<B, 4>,
    /// Cached values.
    pub values: Tensor<B, 4>,
}

/// Positions the cache grows by. Decoding keeps every tensor shape fixed until the cache
/// fills up, so the GPU backends reuse their compiled kernels and fusion plans instead of
/// meeting a new key length at every token.
pub const CACHE_CHUNK: usize = 256;

/// Key/value cache of a whole model for incremental decoding (all sequences of the batch
/// share one length).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerCache<B>>>,
    len: usize,
    capacity: usize,
}

/// One layer's view of a [`KvCache`] during a forward pass.
#[derive(Debug)]
pub struct CacheSlot<'a, B: Backend> {
    /// The layer's cached keys and values (`None` before the first forward).
    pub layer: &'a mut Option<LayerCache<B>>,
    /// Positions already cached (where the new keys go).
    pub past: usize,
    /// Key positions every layer holds during this forward (`KvCache::reserve`).
    pub capacity: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            len: 0,
            capacity: 0,
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position from `len` on (a no-op when `len` is not below the length),
    /// so a cache filled for one prompt serves another that shares its first `len` tokens:
    /// the next forward writes over the forgotten positions and the mask hides them until
    /// then.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes room for `n` more positions (growing by whole [`CACHE_CHUNK`]s) and returns the
    /// number of key positions the layers will hold, the width of the attention mask.
    pub(crate) fn reserve(&mut self, n: usize) -> usize {
        if self.len + n > self.capacity {
            self.capacity = (self.len + n).div_ceil(CACHE_CHUNK) * CACHE_CHUNK;
        }
        self.capacity
    }

    /// The cache of layer `i`, for a forward pass after [`KvCache::reserve`].
    pub(crate) fn layer_mut(&mut self, i: usize) -> CacheSlot<'_, B> {
        CacheSlot {
            layer: &mut self.layers[i],
            past: self.len,
            capacity: self.capacity,
        }
    }

    /// Records that `n` more positions were appended to every layer.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// Writes `k`/`v` `[batch, kv_heads, n, head_dim]` into a layer cache (when given) at its
/// next `n` positions and returns the keys and values to attend over: the whole cache
/// (`capacity` positions, unused ones zero) with a cache, `k` and `v` themselves without.
pub fn update_cache<B: Backend>(
    cache: Option<CacheSlot<'_, B>>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let Some(CacheSlot {
        layer,
        past,
        capacity,
    }) = cache
    else {
        return (k, v);
    };
    let [batch, kv_heads, n, head_dim] = k.dims();
    let grow = |t: Option<Tensor<B, 4>>, like: &Tensor<B, 4>| {
        let held = t.as_ref().map_or(0, |t| t.dims()[2]);
        let zeros = || {
            Tensor::zeros(
                [batch, kv_heads, capacity - held, head_dim],
                (&like.device(), like.dtype()),
            )
        };
        match t {
            Some(t) if held >= capacity => t,
            Some(t) => Tensor::cat(vec![t, zeros()], 2),
            None => zeros(),
        }
    };
    let (keys, values) = layer.take().map(|old| (old.keys, old.values)).unzip();
    let (keys, values) = (grow(keys, &k), grow(values, &v));
    let at = [0..batch, 0..kv_heads, past..past + n, 0..head_dim];
    let keys = keys.slice_assign(at.clone(), k);
    let values = values.slice_assign(at, v);
    *layer = Some(LayerCache {
        keys: keys.clone(),
        values: values.clone(),
    });
    (keys, values)
}

/// Additive attention mask `[batch, 1, len, keys]` in float32: query `i` (absolute position
/// `past + i`) sees key `j` when `j <= past + i` and `j < lengths[b]` (right padding); key
/// positions from `past + len` to `keys` (unused cache capacity) are hidden. `None` when
/// nothing is masked (a single new token, no padding, no unused capacity).
pub fn attention_mask<B: Backend>(
    batch: usize,
    len: usize,
    past: usize,
    keys: usize,
    lengths: Option<&[usize]>,
    device: &B::Device,
) -> Option<Tensor<B, 4>> {
    let total = past + len;
    let padded = lengths.is_some_and(|l| l.iter().any(|&n| n < total));
    if len == 1 && !padded && keys == total {
        return None;
    }
    let mut mask = vec![0f32; batch * len * keys];
    for b in 0..batch {
        let valid = lengths.map_or(total, |l| l[b].min(total));
        for i in 0..len {
            let row = &mut mask[(b * len + i) * keys..(b * len + i + 1) * keys];
            for (j, m) in row.iter_mut().enumerate() {
                if j > past + i || j >= valid {
                    *m = f32::NEG_INFINITY;
                }
            }
        }
    }
    Some(Tensor::from_data(
        TensorData::new(mask, [batch, 1, len, keys]),
        (device, DType::F32),
    ))
}

/// Scaled dot-product attention with grouped-query heads.
///
/// `q` is `[batch, heads, len, head_dim]`, `k`/`v` are `[batch, kv_heads, keys, head_dim]`;
/// query head `h` reads key/value head `h / (heads / kv_heads)` (HF `repeat_kv`). Scores
/// are computed in the activation dtype, softmax in float32 with the additive `mask`, and
/// the probabilities cast back before multiplying by `v`. Returns `[batch, len, heads *
/// head_dim]`. Under autodiff on CUDA with BF16 activations this is
/// `qatflow_kernels::attention` (scores recomputed in backward, GEMMs through cuBLASLt).
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4>>,
) -> Tensor<B, 3> {
    let [batch, heads, len, head_dim] = q.dims();
    let [_, kv_heads, keys, _] = k.dims();
    let rep = heads / kv_heads;
    let dtype = q.dtype();
    // Training on CUDA: one operation that recomputes the scores in backward.
    let (q, k, v) = match qatflow_kernels::attention::try_attention(q, k, v, mask) {
        Ok(out) => return out.swap_dims(1, 2).reshape([batch, len, heads * head_dim]),
        Err(qkv) => qkv,
    };
    // Query heads of one KV head are adjacent: fold them into the row dimension so the
    // shared keys are never copied.
    let q = q.reshape([batch, kv_heads, rep * len, head_dim]);
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar((head_dim as f64).powf(-0.5));
    let scores = to_dtype(scores.reshape([batch, heads, len, keys]), DType::F32);
    let scores = match mask {
        Some(m) => scores + m.clone(),
        None => scores,
    };
    let probs = to_dtype(softmax(scores, 3), dtype).reshape([batch, kv_heads, rep * len, keys]);
    probs
        .matmul(v)
        .reshape([batch, heads, len, head_dim])
        .swap_dims(1, 2)
        .reshape([batch, len, heads * head_dim])
}

/// Looks up rows of `weight` `[vocab, hidden]` for `ids` `[batch, len]`.
pub fn embed<B: Backend>(weight: Tensor<B, 2>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let [batch, len] = ids.dims();
    let hidden = weight.dims()[1];
    weight
        .select(0, ids.reshape([batch * len]))
        .reshape([batch, len, hidden])
}

/// Loads `{prefix}.mlp.{gate,up,down}_proj`.
pub fn load_mlp<B: Backend>(
    w: &Weights<'_, B>,
    prefix: &str,
    config: &ModelConfig,
) -> Result<Mlp<B>, LoadError> {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    Ok(Mlp {
        gate_proj: w.linear(&format!("{prefix}.mlp.gate_proj"), i, h)?,
        up_proj: w.linear(&format!("{prefix}.mlp.up_proj"), i, h)?,
        down_proj: w.linear(&format!("{prefix}.mlp.down_proj"), h, i)?,
    })
}

/// The embedding, the final norm and the LM head (`None` when tied to the embedding).
pub type Ends<B> = (Param<Tensor<B, 2>>, RmsNorm<B>, Option<Param<Tensor<B, 2>>>);

/// Loads `model.embed_tokens`, `model.norm` and (unless tied) `lm_head`.
pub fn load_ends<B: Backend>(
    w: &Weights<'_, B>,
    config: &ModelConfig,
) -> Result<Ends<B>, LoadError> {
    let (v, h) = (config.vocab_size, config.hidden_size);
    let embed = Param::from_tensor(w.tensor("model.embed_tokens.weight", [v, h])?);
    let norm = RmsNorm::new(w.tensor("model.norm.weight", [h])?, config.rms_norm_eps);
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(Param::from_tensor(w.tensor("lm_head.weight", [v, h])?))
    };
    Ok((embed, norm, lm_head))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    type B = Flex;

    fn t<const D: usize>(v: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    #[test]
    fn rms_norm_matches_formula() {
        let norm = RmsNorm::new(t(vec![1.0, 2.0], [2]), 0.0);
        let y = norm.forward(t(vec![3.0, 4.0], [1, 2]));
        let rms = (12.5f32).sqrt();
        let want = [3.0 / rms, 8.0 / rms];
        let got = y.into_data().to_vec::<f32>().unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6);
        }
    }

    #[test]
    fn mask_is_causal_and_respects_lengths() {
        let m = attention_mask::<B>(2, 3, 0, 3, Some(&[3, 2]), &Default::default()).unwrap();
        let v = m.into_data().to_vec::<f32>().unwrap();
        let allowed: Vec<bool> = v.iter().map(|x| *x == 0.0).collect();
        #[rustfmt::skip]
        let want = [
            true, false, false,  true, true, false,  true, true, true,
            true, false, false,  true, true, false,  true, true, false,
        ];
        assert_eq!(allowed, want);
        assert!(attention_mask::<B>(1, 1, 5, 6, None, &Default::default()).is_none());
        // Unused cache capacity is hidden even from a single new token.
        let m = attention_mask::<B>(1, 1, 2, 5, None, &Default::default()).unwrap();
        let v = m.into_data().to_vec::<f32>().unwrap();
        assert_eq!(v[..3], [0.0; 3]);
        assert!(v[3..].iter().all(|x| *x == f32::NEG_INFINITY));
    }

    #[test]
    fn cache_grows_by_chunks_and_keeps_what_was_written() {
        let mut cache = KvCache::<B>::new(1);
        let steps = CACHE_CHUNK + 44;
        let mut widths = Vec::new();
        for p in 0..steps {
            // Prefill of 3 positions, then one position per step.
            let n = if p == 0 { 3 } else { 1 };
            if p > 0 && p < 3 {
                continue;
            }
            let width = cache.reserve(n);
            let k = t((0..n).map(|i| (p + i) as f32).collect(), [1, 1, n, 1]);
            let (keys, values) = update_cache(Some(cache.layer_mut(0)), k.clone(), k * -1.0);
            cache.advance(n);
            assert_eq!(keys.dims(), [1, 1, width, 1]);
            let got = keys.into_data().to_vec::<f32>().unwrap();
            let want: Vec<f32> = (0..width)
                .map(|j| if j < cache.len() { j as f32 } else { 0.0 })
                .collect();
            assert_eq!(got, want, "after {} positions", cache.len());
            let got = values.into_data().to_vec::<f32>().unwrap();
            assert_eq!(got[cache.len() - 1], -((cache.len() - 1) as f32));
            widths.push(width);
        }
        assert_eq!(cache.len(), steps);
        assert_eq!(widths.first(), Some(&CACHE_CHUNK));
        assert_eq!(widths.last(), Some(&(2 * CACHE_CHUNK)));
        assert_eq!(
            widths.iter().filter(|w| **w == CACHE_CHUNK).count(),
            CACHE_CHUNK - 2
        );
    }

    #[test]
    fn grouped_heads_read_their_kv_head() {
        // Two query heads share one KV head: with identical queries both see the same
        // keys, so their outputs are equal; a single key gives back its value exactly.
        let q = t(vec![1.0, 0.0, 1.0, 0.0], [1, 2, 1, 2]);
        let k = t(vec![0.5, 0.5], [1, 1, 1, 2]);
        let v = t(vec![3.0, -1.0], [1, 1, 1, 2]);
        let out = attention(q, k, v, None)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(out, vec![3.0, -1.0, 3.0, -1.0]);
    }
}
