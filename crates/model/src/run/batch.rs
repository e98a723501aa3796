//! burn's forward for generation: [`next_logits`] (prefill, or one token, after a
//! [`KvCache`]) and step-level batched decoding for a server, one forward that advances many
//! sequences by one token each, every sequence with its own cache (and so its own length).
//! The projections, norms and MLPs run once over all sequences as one matrix; only RoPE
//! positions and attention are per sequence. Architectures without a batched step here
//! run each sequence on its own ([`decode_step`] does that transparently).

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::arch::dense::Dense;
use crate::arch::layers::{self, to_dtype, KvCache};
use crate::arch::model::CausalLm;
use crate::arch::rope;

/// Runs `ids` through the model with `cache` and returns the float32 logits of the last
/// position.
pub fn next_logits<B: Backend>(
    model: &CausalLm<B>,
    ids: &[u32],
    cache: &mut KvCache<B>,
) -> Vec<f32> {
    let device = model.device();
    let n = ids.len();
    let data: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(data, [1, n]), &device);
    let hidden = model.forward_hidden(input, None, Some(cache));
    let last = hidden.narrow(1, n - 1, 1);
    to_dtype(model.logits(last), DType::F32)
        .into_data()
        .iter::<f32>()
        .collect()
}

/// The dense model whose layers the batched step runs; `None` for architectures that
/// decode one sequence at a time.
fn dense<B: Backend>(model: &CausalLm<B>) -> Option<&Dense<B>> {
    match model {
        CausalLm::Llama(m) | CausalLm::Qwen3(m) => Some(m),
        CausalLm::Qwen35(_) | CausalLm::Qwen35Vl(_) => None,
    }
}

/// Feeds `tokens[i]` to the sequence of `caches[i]` (one token each, appended to its
/// cache) and returns each sequence's float32 next-token logits. Equivalent to
/// [`next_logits`] on every sequence alone, up to float rounding.
///
/// # Panics
/// When `tokens` and `caches` differ in length.
pub fn decode_step<B: Backend>(
    model: &CausalLm<B>,
    tokens: &[u32],
    caches: &mut [&mut KvCache<B>],
) -> Vec<Vec<f32>> {
    assert_eq!(tokens.len(), caches.len(), "one token per cache");
    let n = tokens.len();
    if n == 0 {
        return Vec::new();
    }
    let Some(dense) = dense(model) else {
        return tokens
            .iter()
            .zip(caches.iter_mut())
            .map(|(&t, c)| next_logits(model, &[t], c))
            .collect();
    };
    let config = model.config();
    let (heads, kv_heads, hd) = (config.num_heads, config.num_kv_heads, config.head_dim);
    let weight = model.embed_weight();
    let device = weight.device();
    let dtype = weight.dtype();
    // The sequences stand in the length dimension of one batch row: [1, n, hidden].
    let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
    let mut x = layers::embed(weight, ids);
    let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut masks = Vec::with_capacity(n);
    for c in caches.iter_mut() {
        let past = c.len();
        let (co, si) = dense.rope.tables::<B>(past, 1, dtype, &device);
        cos.push(co);
        sin.push(si);
        let keys = c.reserve(1);
        masks.push(layers::attention_mask::<B>(1, 1, past, keys, None, &device));
    }
    let (cos, sin) = (Tensor::cat(cos, 0), Tensor::cat(sin, 0));
    for (li, layer) in dense.layers.iter().enumerate() {
        let attn = &layer.self_attn;
        let h = layer.input_layernorm.forward(x.clone());
        let split = |t: Tensor<B, 3>, count: usize| t.reshape([1, n, count, hd]);
        let (q, k) = attn.norm_qk(
            split(attn.q_proj.forward(h.clone()), heads),
            split(attn.k_proj.forward(h.clone()), kv_heads),
        );
        let v = split(attn.v_proj.forward(h), kv_heads).swap_dims(1, 2);
        let q = rope::apply(q.swap_dims(1, 2), &cos, &sin);
        let k = rope::apply(k.swap_dims(1, 2), &cos, &sin);
        let mut outs = Vec::with_capacity(n);
        for (i, cache) in caches.iter_mut().enumerate() {
            let (keys, values) = layers::update_cache(
                Some(cache.layer_mut(li)),
                k.clone().narrow(2, i, 1),
                v.clone().narrow(2, i, 1),
            );
            outs.push(layers::attention(
                q.clone().narrow(2, i, 1),
                keys,
                values,
                masks[i].as_ref(),
            ));
        }
        let x1 = x + attn.o_proj.forward(Tensor::cat(outs, 1));
        x = x1.clone()
            + layer
                .mlp
                .forward(layer.post_attention_layernorm.forward(x1));
    }
    for c in caches.iter_mut() {
        c.advance(1);
    }
    let logits = to_dtype(model.logits(dense.norm.forward(x)), DType::F32);
    let vocab = logits.dims()[2];
    let flat: Vec<f32> = logits.into_data().iter::<f32>().collect();
    flat.chunks(vocab).map(<[f32]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::init::write_random_model;
    use crate::arch::model::LoadOptions;
    use crate::config::Architecture;
    use crate::io::weights::Precision;
    use burn::backend::Flex;

    type B = Flex;

    fn tiny(arch: Architecture, dir: &std::path::Path) -> CausalLm<B> {
        let name = if arch == Architecture::Llama {
            "tiny-llama"
        } else {
            "tiny-qwen3"
        };
        let mut json = crate::arch::init::named_config(name).unwrap();
        json["vocab_size"] = 96.into();
        write_random_model(&json, 7, safetensors::Dtype::F32, dir).unwrap();
        CausalLm::load(
            dir,
            LoadOptions {
                precision: Precision::F32,
                emulate_nvfp4_activations: true,
            },
            &Default::default(),
        )
        .unwrap()
    }

    /// Sequences of different lengths (one past a cache chunk), one of them resumed from a
    /// truncated copy of another's cache, decode in a batch exactly as they do alone.
    #[test]
    fn a_batched_step_matches_single_sequence_decoding() {
        for arch in [Architecture::Llama, Architecture::Qwen3] {
            let dir = tempfile::tempdir().unwrap();
            let model = tiny(arch, dir.path());
            let prompts: Vec<Vec<u32>> = vec![
                (0..5).collect(),
                (0..layers::CACHE_CHUNK as u32 + 3)
                    .map(|i| i % 90)
                    .collect(),
                vec![9],
            ];
            let mut solo: Vec<KvCache<B>> = Vec::new();
            let mut batched: Vec<KvCache<B>> = Vec::new();
            for p in &prompts {
                let mut c = model.new_cache();
                next_logits(&model, p, &mut c);
                solo.push(c.clone());
                batched.push(c);
            }
            // A fourth sequence shares the first 3 tokens of the first prompt.
            let mut shared = batched[0].clone();
            shared.truncate(3);
            next_logits(&model, &[40, 41], &mut shared);
            let mut fresh = model.new_cache();
            next_logits(&model, &[0, 1, 2, 40, 41], &mut fresh);
            solo.push(fresh);
            batched.push(shared);
            for step in 0..3u32 {
                let tokens: Vec<u32> = (0..4).map(|i| 10 + i * 7 + step).collect();
                let mut refs: Vec<&mut KvCache<B>> = batched.iter_mut().collect();
                let got = decode_step(&model, &tokens, &mut refs);
                for (i, t) in tokens.iter().enumerate() {
                    let want = next_logits(&model, &[*t], &mut solo[i]);
                    let diff = got[i]
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(diff < 1e-4, "{arch:?} step {step} seq {i}: max diff {diff}");
                    assert_eq!(batched[i].len(), solo[i].len());
                }
            }
        }
    }
}
