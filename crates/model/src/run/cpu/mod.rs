//! [`CpuDecoder`]: generation of the dense architectures (Llama/SmolLM2, Qwen3) on the CPU
//! without burn's per-operation tensors. Decoding a token is memory-bound: every weight is
//! read once per step. Here weights are packed once at load (BF16 where lossless, so half
//! the bytes of float32), the q/k/v projections and the MLP's gate/up projections are one
//! matrix each, activations are plain float32 slices, and each projection is one
//! multi-threaded pass over its weight for every row of the step. The arithmetic is the
//! burn float32 forward's (`crate::arch::dense`): same formulas in float32, including NVFP4
//! activation emulation (fake-quantized linear inputs) and fake-quantized weights; only the
//! order of float32 sums differs.

pub(crate) mod kernels;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use qatflow_nvfp4::codec;
use rayon::prelude::*;

use crate::arch::dense::Dense;
use crate::arch::layers::RmsNorm;
use crate::arch::model::CausalLm;
use crate::arch::rope::Rope;
use crate::config::ModelConfig;
use crate::linear::QLinear;
use kernels::Matrix;

/// Why a model cannot run on the [`CpuDecoder`] (it then runs on burn).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuDecoderError {
    /// Only the dense architectures are packed (Qwen3.5's DeltaNet layers are not).
    #[error("the CPU decoder runs the dense architectures (Llama, Qwen3), not {0}")]
    Architecture(String),
    /// The model was loaded in a precision other than float32, whose results the decoder's
    /// float32 arithmetic would not reproduce.
    #[error("the CPU decoder reproduces float32 models; this one was loaded as {0:?}")]
    Precision(DType),
    /// A fake quantizer's amax has no NVFP4 global scale.
    #[error("layer `{layer}`: {message}")]
    Quantizer {
        /// The linear's Hugging Face name.
        layer: String,
        /// What is wrong.
        message: String,
    },
}

/// A linear layer packed for the CPU: its weight (fake-quantized once when the layer
/// quantizes weights) and the NVFP4 global scale of its input when it emulates NVFP4
/// activations.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) weight: Matrix,
    pub(crate) input_scale_2: Option<f32>,
}

impl Linear {
    /// Packs the rows of `parts` (linears reading the same input, all with the same input
    /// quantizer) into one matrix.
    fn pack<B: Backend>(parts: &[&QLinear<B>]) -> Result<Linear, CpuDecoderError> {
        let err = |layer: &QLinear<B>, e: qatflow_nvfp4::Error| CpuDecoderError::Quantizer {
            layer: layer.name.clone(),
            message: e.to_string(),
        };
        let cols = parts[0].dims()[1];
        let mut data = Vec::new();
        let mut rows = 0;
        for l in parts {
            let [out, inp] = l.dims();
            let w = to_f32(l.weight.val());
            let w = match l.quant.weight {
                Some(amax) => {
                    codec::fake_quantize(&l.name, &w, &[out, inp], amax).map_err(|e| err(l, e))?
                }
                None => w,
            };
            data.extend(w);
            rows += out;
        }
        let input_scale_2 = parts[0]
            .quant
            .input
            .map(|amax| codec::global_scale(&parts[0].name, amax).map_err(|e| err(parts[0], e)))
            .transpose()?;
        Ok(Linear {
            weight: Matrix::new(data, rows, cols),
            input_scale_2,
        })
    }

    /// `x · Wᵀ` for `n` rows, the input fake-quantized first when the layer emulates NVFP4
    /// activations.
    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        match self.input_scale_2 {
            None => self.weight.matmul_t(x, n),
            Some(scale_2) => {
                let mut q = x.to_vec();
                for block in q.chunks_exact_mut(codec::BLOCK_SIZE) {
                    let block: &mut [f32; codec::BLOCK_SIZE] =
                        block.try_into().expect("chunks of BLOCK_SIZE");
                    codec::fake_quantize_block(block, scale_2);
                }
                self.weight.matmul_t(&q, n)
            }
        }
    }
}

/// Linears reading the same input, their outputs side by side: one packed matrix for each
/// run of linears with the same input quantizer (one in every checkpoint qatflow or
/// ModelOpt writes, whose q/k/v and gate/up share the input amax).
#[derive(Debug, Clone)]
pub(crate) struct Fused {
    pub(crate) parts: Vec<Linear>,
}

impl Fused {
    fn pack<B: Backend>(linears: &[&QLinear<B>]) -> Result<Fused, CpuDecoderError> {
        let parts = linears
            .chunk_by(|a, b| a.quant.input.map(f32::to_bits) == b.quant.input.map(f32::to_bits))
            .map(Linear::pack)
            .collect::<Result<_, _>>()?;
        Ok(Fused { parts })
    }

    /// Output features of all parts.
    pub(crate) fn rows(&self) -> usize {
        self.parts.iter().map(|p| p.weight.rows()).sum()
    }

    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        if let [one] = &self.parts[..] {
            return one.forward(x, n);
        }
        let outs: Vec<Vec<f32>> = self.parts.iter().map(|p| p.forward(x, n)).collect();
        (0..n)
            .flat_map(|r| {
                outs.iter().flat_map(move |o| {
                    let w = o.len() / n;
                    o[r * w..(r + 1) * w].iter().copied()
                })
            })
            .collect()
    }
}

/// One decoder layer, packed.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) input_norm: Vec<f32>,
    pub(crate) qkv: Fused,
    pub(crate) q_norm: Option<Vec<f32>>,
    pub(crate) k_norm: Option<Vec<f32>>,
    pub(crate) o: Linear,
    pub(crate) post_norm: Vec<f32>,
    pub(crate) gate_up: Fused,
    pub(crate) down: Linear,
}

/// The keys and values of one sequence: per layer and key/value head (layer-major),
/// `[positions, head_dim]`, so that a head's attention reads one contiguous run
/// each, growing with the sequence.
#[derive(Debug, Clone, Default)]
pub struct CpuCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

impl CpuCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position from `len` on (no-op when `len` is not below the length).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
                t.truncate(t.len() / self.len * len);
            }
            self.len = len;
        }
    }
}

/// A dense model packed for fast CPU generation (see the module header).
#[derive(Debug, Clone)]
pub struct CpuDecoder {
    pub(crate) config: ModelConfig,
    pub(crate) embed: Matrix,
    pub(crate) lm_head: Option<Matrix>,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Vec<f32>,
    pub(crate) eps: f32,
    pub(crate) rope: Rope,
}

/// Most positions one attention piece covers: long contexts split into pieces that run in
/// parallel even for a single token (one piece per key/value head would leave cores idle).
const ATTENTION_CHUNK: usize = 128;

/// The decoder's own rayon pool, one thread per core. A forward runs inside it, so the
/// thread that runs the layers is a worker that shares each projection's rows with the
/// others; calling in from outside would hand over and wait once per projection (two
/// context switches each, ~120 projections per token).
fn pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("qatflow-cpu-decoder-{i}"))
            .build()
            .expect("starting the CPU decoder's threads")
    })
}

/// A tensor's values as float32.
fn to_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to float32")
}

fn norm_weight<B: Backend>(n: &RmsNorm<B>) -> Vec<f32> {
    to_f32(n.weight.val())
}

impl CpuDecoder {
    /// Packs a loaded dense model (float32 precision).
    pub fn new<B: Backend>(model: &CausalLm<B>) -> Result<CpuDecoder, CpuDecoderError> {
        let dtype = model.dtype();
        if dtype != DType::F32 {
            return Err(CpuDecoderError::Precision(dtype));
        }
        Self::pack(model)
    }

    /// Packs a loaded dense model of any precision (its weights read as float32; the CUDA
    /// decoder uploads them from here).
    pub(crate) fn pack<B: Backend>(model: &CausalLm<B>) -> Result<CpuDecoder, CpuDecoderError> {
        let dense: &Dense<B> = match model {
            CausalLm::Llama(m) | CausalLm::Qwen3(m) => m,
            CausalLm::Qwen35(_) | CausalLm::Qwen35Vl(_) => {
                return Err(CpuDecoderError::Architecture("Qwen3.5".into()))
            }
        };
        let config = model.config().clone();
        let mut layers = Vec::with_capacity(dense.layers.len());
        for l in &dense.layers {
            let a = &l.self_attn;
            let m = &l.mlp;
            layers.push(Layer {
                input_norm: norm_weight(&l.input_layernorm),
                qkv: Fused::pack(&[&a.q_proj, &a.k_proj, &a.v_proj])?,
                q_norm: a.q_norm.as_ref().map(norm_weight),
                k_norm: a.k_norm.as_ref().map(norm_weight),
                o: Linear::pack(&[&a.o_proj])?,
                post_norm: norm_weight(&l.post_attention_layernorm),
                gate_up: Fused::pack(&[&m.gate_proj, &m.up_proj])?,
                down: Linear::pack(&[&m.down_proj])?,
            });
        }
        let [vocab, hidden] = dense.embed_tokens.dims();
        let embed = Matrix::new(to_f32(dense.embed_tokens.val()), vocab, hidden);
        let lm_head = dense
            .lm_head
            .as_ref()
            .map(|w| Matrix::new(to_f32(w.val()), vocab, hidden));
        Ok(CpuDecoder {
            norm: norm_weight(&dense.norm),
            eps: dense.norm.eps as f32,
            rope: Rope::new(&config.rope, config.head_dim),
            config,
            embed,
            lm_head,
            layers,
        })
    }

    /// Hyperparameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// An empty cache.
    pub fn new_cache(&self) -> CpuCache {
        CpuCache {
            keys: vec![Vec::new(); self.layers.len() * self.config.num_kv_heads],
            values: vec![Vec::new(); self.layers.len() * self.config.num_kv_heads],
            len: 0,
        }
    }

    /// Runs `ids` after the positions in `cache` (appending theirs) and returns the logits
    /// of the last one.
    pub fn next_logits(&self, ids: &[u32], cache: &mut CpuCache) -> Vec<f32> {
        let seq = vec![0; ids.len()];
        pool()
            .install(|| self.forward(ids, &seq, &mut [cache], true))
            .pop()
            .expect("at least one token")
    }

    /// One decoding step of several sequences: `tokens[i]` after `caches[i]`; returns each
    /// sequence's logits.
    pub fn decode_step(&self, tokens: &[u32], caches: &mut [&mut CpuCache]) -> Vec<Vec<f32>> {
        assert_eq!(tokens.len(), caches.len(), "one token per cache");
        let seq: Vec<usize> = (0..tokens.len()).collect();
        pool().install(|| self.forward(tokens, &seq, caches, false))
    }

    /// The forward of rows `ids`, row `r` belonging to the sequence of `caches[seq[r]]`
    /// (a sequence's rows in order). Returns the logits of every row, or of the last row
    /// only when `last_only`.
    fn forward(
        &self,
        ids: &[u32],
        seq: &[usize],
        caches: &mut [&mut CpuCache],
        last_only: bool,
    ) -> Vec<Vec<f32>> {
        let c = &self.config;
        let (hidden, hd) = (c.hidden_size, c.head_dim);
        let (heads, kv_heads) = (c.num_heads, c.num_kv_heads);
        let (q_width, kv_width) = (heads * hd, kv_heads * hd);
        let n = ids.len();
        assert!(n > 0, "no tokens");
        // Each row's position: after its cache and the sequence's earlier rows.
        let mut next: Vec<usize> = caches.iter().map(|c| c.len).collect();
        let positions: Vec<usize> = seq
            .iter()
            .map(|&s| {
                next[s] += 1;
                next[s] - 1
            })
            .collect();
        let (cos, sin) = self.rope.cos_sin(positions.iter().copied());
        let mut x: Vec<f32> = ids
            .iter()
            .flat_map(|&t| self.embed.row(t as usize))
            .collect();
        let scale = (hd as f32).powf(-0.5);
        for (li, layer) in self.layers.iter().enumerate() {
            let mut h = x.clone();
            kernels::rms_norm(&mut h, &layer.input_norm, self.eps);
            // Rows of `[q | k | v]`; q and k normed (Qwen3) and rotated in place.
            let mut qkv = layer.qkv.forward(&h, n);
            let width = layer.qkv.rows();
            for (r, row) in qkv.chunks_exact_mut(width).enumerate() {
                let (qr, kv) = row.split_at_mut(q_width);
                let (kr, vr) = kv.split_at_mut(kv_width);
                if let Some(w) = &layer.q_norm {
                    kernels::rms_norm(qr, w, self.eps);
                }
                if let Some(w) = &layer.k_norm {
                    kernels::rms_norm(kr, w, self.eps);
                }
                let (co, si) = (&cos[r * hd..(r + 1) * hd], &sin[r * hd..(r + 1) * hd]);
                rope(qr, co, si);
                rope(kr, co, si);
                let cache = &mut caches[seq[r]];
                for (kvh, (k, v)) in kr.chunks_exact(hd).zip(vr.chunks_exact(hd)).enumerate() {
                    cache.keys[li * kv_heads + kvh].extend_from_slice(k);
                    cache.values[li * kv_heads + kvh].extend_from_slice(v);
                }
            }
            // Attention in pieces that run side by side: each row with each key/value
            // head (the query heads sharing it, adjacent, read its keys together), over
            // runs of at most ATTENTION_CHUNK positions up to the row's own (causal),
            // joined into one softmax afterwards.
            let group = heads / kv_heads * hd;
            let (mut pieces, mut per_group) = (Vec::new(), Vec::new());
            for (r, position) in positions.iter().enumerate() {
                let visible = position + 1;
                for kvh in 0..kv_heads {
                    let starts = (0..visible).step_by(ATTENTION_CHUNK);
                    per_group.push(starts.len());
                    for start in starts {
                        pieces.push((r, kvh, start..visible.min(start + ATTENTION_CHUNK)));
                    }
                }
            }
            let caches_ro: Vec<&CpuCache> = caches.iter().map(|c| &**c).collect();
            let partials: Vec<kernels::Partial> = pieces
                .par_iter()
                .map(|(r, kvh, range)| {
                    let cache = caches_ro[seq[*r]];
                    let at = r * width + kvh * group;
                    let kv = kernels::KvView {
                        keys: &cache.keys[li * kv_heads + kvh],
                        values: &cache.values[li * kv_heads + kvh],
                        head_dim: hd,
                    };
                    kernels::attend(&qkv[at..at + group], kv, range.clone(), scale)
                })
                .collect();
            let mut attn = vec![0f32; n * q_width];
            let mut first = 0;
            for (out, count) in attn.chunks_exact_mut(group).zip(per_group) {
                kernels::merge(&partials[first..first + count], out);
                first += count;
            }
            let o = layer.o.forward(&attn, n);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let mut h = x.clone();
            kernels::rms_norm(&mut h, &layer.post_norm, self.eps);
            let gate_up = layer.gate_up.forward(&h, n);
            let act = kernels::swiglu(&gate_up, layer.down.weight.cols());
            let down = layer.down.forward(&act, n);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        for (cache, end) in caches.iter_mut().zip(next) {
            cache.len = end;
        }
        let rows: Vec<usize> = if last_only {
            vec![n - 1]
        } else {
            (0..n).collect()
        };
        let mut h: Vec<f32> = rows
            .iter()
            .flat_map(|&r| x[r * hidden..(r + 1) * hidden].iter().copied())
            .collect();
        kernels::rms_norm(&mut h, &self.norm, self.eps);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = head.matmul_t(&h, rows.len());
        logits
            .chunks_exact(head.rows())
            .map(<[f32]>::to_vec)
            .collect()
    }
}

/// Rotates each head of `x` (`[heads * head_dim]`) in place: `x·cos + rotate_half(x)·sin`.
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let d = cos.len();
    for head in x.chunks_exact_mut(d) {
        let (x1, x2) = head.split_at_mut(d / 2);
        for i in 0..d / 2 {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * cos[i] + (-b) * sin[i];
            x2[i] = b * cos[i + d / 2] + a * sin[i + d / 2];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::init::{named_config, write_random_model};
    use crate::arch::model::LoadOptions;
    use crate::io::weights::Precision;
    use crate::run::batch::{decode_step, next_logits};
    use burn::backend::Flex;
    use qatflow_nvfp4::QuantizerAmax;

    type B = Flex;

    fn load(name: &str, dir: &std::path::Path, emulate: bool) -> CausalLm<B> {
        let mut json = named_config(name).unwrap();
        json["vocab_size"] = 96.into();
        write_random_model(&json, 11, safetensors::Dtype::BF16, dir).unwrap();
        CausalLm::load(
            dir,
            LoadOptions {
                precision: Precision::F32,
                emulate_nvfp4_activations: emulate,
            },
            &Default::default(),
        )
        .unwrap()
    }

    fn assert_close(fast: &[f32], reference: &[f32]) {
        assert_eq!(fast.len(), reference.len());
        let worst = fast
            .iter()
            .zip(reference)
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .fold(0f32, f32::max);
        assert!(worst < 2e-4, "largest relative difference {worst}");
    }

    /// Prefill, decoding, a batched step and a truncated cache against burn's forward.
    fn check_against_burn(model: &CausalLm<B>) {
        let fast = CpuDecoder::new(model).unwrap();
        // Longer than ATTENTION_CHUNK: attention runs in several pieces.
        let prompt: Vec<u32> = (0..150).map(|i| (i * 7 % 90) as u32).collect();
        let mut slow_cache = model.new_cache();
        let mut fast_cache = fast.new_cache();
        assert_close(
            &fast.next_logits(&prompt, &mut fast_cache),
            &next_logits(model, &prompt, &mut slow_cache),
        );
        for t in [5u32, 61, 2] {
            assert_close(
                &fast.next_logits(&[t], &mut fast_cache),
                &next_logits(model, &[t], &mut slow_cache),
            );
        }
        assert_eq!(fast_cache.len(), 153);
        let mut other_fast = fast_cache.clone();
        other_fast.truncate(10);
        let mut other_slow = slow_cache.clone();
        other_slow.truncate(10);
        let mut fast_caches = [&mut fast_cache, &mut other_fast];
        let mut slow_caches = [&mut slow_cache, &mut other_slow];
        let fast_step = fast.decode_step(&[8, 9], &mut fast_caches);
        let slow_step = decode_step(model, &[8, 9], &mut slow_caches);
        for (f, s) in fast_step.iter().zip(&slow_step) {
            assert_close(f, s);
        }
        assert_eq!((fast_cache.len(), other_fast.len()), (154, 11));
    }

    #[test]
    fn llama_and_qwen3_match_the_burn_forward() {
        for name in ["tiny-llama", "tiny-qwen3"] {
            let dir = tempfile::tempdir().unwrap();
            check_against_burn(&load(name, dir.path(), false));
        }
    }

    #[test]
    fn nvfp4_emulation_matches_the_burn_forward() {
        // Shared input amaxes (what exports have: q/k/v fused into one matrix) and one per
        // linear (q, k and v stay three matrices).
        for (shared, parts) in [(true, 1), (false, 3)] {
            let dir = tempfile::tempdir().unwrap();
            let mut model = load("tiny-qwen3", dir.path(), true);
            for (i, linear) in model.linears_mut().into_iter().enumerate() {
                let amax = QuantizerAmax {
                    weight: Some(0.5 + i as f32 * 0.01),
                    input: Some(if shared { 4.0 } else { 4.0 + i as f32 }),
                };
                linear.set_fake_quant(amax).unwrap();
            }
            let fast = CpuDecoder::new(&model).unwrap();
            assert_eq!(fast.layers[0].qkv.parts.len(), parts);
            assert!(matches!(
                fast.layers[0].qkv.parts[0].weight,
                Matrix::F32 { .. }
            ));
            check_against_burn(&model);
        }
    }

    #[test]
    fn other_precisions_and_architectures_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut json = named_config("tiny-qwen3").unwrap();
        json["vocab_size"] = 96.into();
        write_random_model(&json, 3, safetensors::Dtype::BF16, dir.path()).unwrap();
        let bf16 = CausalLm::<B>::load(
            dir.path(),
            LoadOptions {
                precision: Precision::Bf16,
                emulate_nvfp4_activations: false,
            },
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            CpuDecoder::new(&bf16).unwrap_err(),
            CpuDecoderError::Precision(DType::BF16)
        );
    }
}
