//! [`LanguageModel`]: what generation and the server need of a model (a key/value cache,
//! the logits after some tokens, a batched decoding step), implemented by burn's
//! [`CausalLm`] on any backend and by the packed [`CpuDecoder`]; [`Generator`] picks the
//! CPU decoder where it applies (a float32 dense model on burn's CPU backend).

use std::any::TypeId;

use burn::backend::Flex;
use burn::tensor::backend::Backend;

use crate::arch::layers::KvCache;
use crate::arch::model::CausalLm;
use crate::config::ModelConfig;
use crate::run::cpu::{CpuCache, CpuDecoder};
use crate::run::cuda::{CudaCache, CudaDecoder};

/// A model that generates text token by token.
pub trait LanguageModel {
    /// The key/value cache of one sequence.
    type Cache: Clone;

    /// Hyperparameters.
    fn config(&self) -> &ModelConfig;

    /// An empty cache.
    fn new_cache(&self) -> Self::Cache;

    /// Positions held by `cache`.
    fn cache_len(cache: &Self::Cache) -> usize;

    /// Forgets the positions of `cache` from `len` on.
    fn truncate_cache(cache: &mut Self::Cache, len: usize);

    /// Runs `ids` after `cache` (appending their keys and values) and returns the float32
    /// logits of the last position.
    fn next_logits(&self, ids: &[u32], cache: &mut Self::Cache) -> Vec<f32>;

    /// One token for each of several sequences; returns each one's float32 logits.
    fn decode_step(&self, tokens: &[u32], caches: &mut [&mut Self::Cache]) -> Vec<Vec<f32>>;
}

impl<B: Backend> LanguageModel for CausalLm<B> {
    type Cache = KvCache<B>;

    fn config(&self) -> &ModelConfig {
        CausalLm::config(self)
    }

    fn new_cache(&self) -> KvCache<B> {
        CausalLm::new_cache(self)
    }

    fn cache_len(cache: &KvCache<B>) -> usize {
        cache.len()
    }

    fn truncate_cache(cache: &mut KvCache<B>, len: usize) {
        cache.truncate(len);
    }

    fn next_logits(&self, ids: &[u32], cache: &mut KvCache<B>) -> Vec<f32> {
        crate::run::batch::next_logits(self, ids, cache)
    }

    fn decode_step(&self, tokens: &[u32], caches: &mut [&mut KvCache<B>]) -> Vec<Vec<f32>> {
        crate::run::batch::decode_step(self, tokens, caches)
    }
}

impl LanguageModel for CudaDecoder {
    type Cache = CudaCache;

    fn config(&self) -> &ModelConfig {
        CudaDecoder::config(self)
    }

    fn new_cache(&self) -> CudaCache {
        CudaDecoder::new_cache(self)
    }

    fn cache_len(cache: &CudaCache) -> usize {
        cache.len()
    }

    fn truncate_cache(cache: &mut CudaCache, len: usize) {
        cache.truncate(len)
    }

    fn next_logits(&self, ids: &[u32], cache: &mut CudaCache) -> Vec<f32> {
        CudaDecoder::next_logits(self, ids, cache)
    }

    fn decode_step(&self, tokens: &[u32], caches: &mut [&mut CudaCache]) -> Vec<Vec<f32>> {
        CudaDecoder::decode_step(self, tokens, caches)
    }
}

impl LanguageModel for CpuDecoder {
    type Cache = CpuCache;

    fn config(&self) -> &ModelConfig {
        CpuDecoder::config(self)
    }

    fn new_cache(&self) -> CpuCache {
        CpuDecoder::new_cache(self)
    }

    fn cache_len(cache: &CpuCache) -> usize {
        cache.len()
    }

    fn truncate_cache(cache: &mut CpuCache, len: usize) {
        cache.truncate(len);
    }

    fn next_logits(&self, ids: &[u32], cache: &mut CpuCache) -> Vec<f32> {
        CpuDecoder::next_logits(self, ids, cache)
    }

    fn decode_step(&self, tokens: &[u32], caches: &mut [&mut CpuCache]) -> Vec<Vec<f32>> {
        CpuDecoder::decode_step(self, tokens, caches)
    }
}

/// A loaded model ready to generate: the packed [`CpuDecoder`] when the model is a float32
/// dense model on burn's CPU backend ([`Flex`]), the [`CudaDecoder`] for a dense model on a
/// CUDA device, burn's forward otherwise (or when [`DECODER_ENV`] says `burn`).
#[derive(Debug)]
pub enum Generator<B: Backend> {
    /// burn's forward (Qwen3.5, BF16 on the CPU, or a fast decoder declined).
    Burn(Box<CausalLm<B>>),
    /// The packed CPU decoder.
    Cpu(Box<CpuDecoder>),
    /// The CUDA decoder.
    Cuda(Box<CudaDecoder>),
}

/// Environment variable: `burn` keeps generation on burn's forward (no CPU or CUDA decoder).
pub const DECODER_ENV: &str = "QATFLOW_DECODER";

/// A [`Generator`]'s cache.
#[derive(Debug, Clone)]
pub enum GeneratorCache<B: Backend> {
    /// burn's cache.
    Burn(KvCache<B>),
    /// The CPU decoder's cache.
    Cpu(CpuCache),
    /// The CUDA decoder's cache.
    Cuda(CudaCache),
}

impl<B: Backend> Generator<B> {
    /// The CPU decoder for a float32 dense model on [`Flex`], the CUDA decoder for a dense
    /// model on a CUDA device, else `model` itself; `QATFLOW_DECODER=burn` ([`DECODER_ENV`])
    /// keeps `model`.
    pub fn new(model: CausalLm<B>) -> Generator<B> {
        Self::choose(model).0
    }

    /// As [`Generator::new`], with the reason a fast decoder was not taken (`None` when one
    /// was, or when none exists for the backend).
    pub fn choose(model: CausalLm<B>) -> (Generator<B>, Option<String>) {
        if std::env::var(DECODER_ENV).is_ok_and(|v| v == "burn") {
            return (Generator::Burn(Box::new(model)), None);
        }
        if TypeId::of::<B>() == TypeId::of::<Flex>() {
            return match CpuDecoder::new(&model) {
                Ok(cpu) => (Generator::Cpu(Box::new(cpu)), None),
                Err(e) => (Generator::Burn(Box::new(model)), Some(e.to_string())),
            };
        }
        match qatflow_kernels::gemm::cuda_index::<B>(&model.device()) {
            Some(ordinal) => match CudaDecoder::new(&model, ordinal) {
                Ok(gpu) => (Generator::Cuda(Box::new(gpu)), None),
                Err(e) => (Generator::Burn(Box::new(model)), Some(e.to_string())),
            },
            None => (Generator::Burn(Box::new(model)), None),
        }
    }

    /// Which implementation runs: `"cpu-decoder"`, `"cuda-decoder"` or `"burn"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Generator::Burn(_) => "burn",
            Generator::Cpu(_) => "cpu-decoder",
            Generator::Cuda(_) => "cuda-decoder",
        }
    }
}

/// Panics on a cache of the other implementation: a generator only makes its own.
fn mismatch() -> ! {
    panic!("a cache of one generator implementation was passed to the other")
}

impl<B: Backend> LanguageModel for Generator<B> {
    type Cache = GeneratorCache<B>;

    fn config(&self) -> &ModelConfig {
        match self {
            Generator::Burn(m) => m.config(),
            Generator::Cpu(m) => m.config(),
            Generator::Cuda(m) => m.config(),
        }
    }

    fn new_cache(&self) -> GeneratorCache<B> {
        match self {
            Generator::Burn(m) => GeneratorCache::Burn(m.new_cache()),
            Generator::Cpu(m) => GeneratorCache::Cpu(m.new_cache()),
            Generator::Cuda(m) => GeneratorCache::Cuda(m.new_cache()),
        }
    }

    fn cache_len(cache: &GeneratorCache<B>) -> usize {
        match cache {
            GeneratorCache::Burn(c) => c.len(),
            GeneratorCache::Cpu(c) => c.len(),
            GeneratorCache::Cuda(c) => c.len(),
        }
    }

    fn truncate_cache(cache: &mut GeneratorCache<B>, len: usize) {
        match cache {
            GeneratorCache::Burn(c) => c.truncate(len),
            GeneratorCache::Cpu(c) => c.truncate(len),
            GeneratorCache::Cuda(c) => c.truncate(len),
        }
    }

    fn next_logits(&self, ids: &[u32], cache: &mut GeneratorCache<B>) -> Vec<f32> {
        match (self, cache) {
            (Generator::Burn(m), GeneratorCache::Burn(c)) => m.next_logits(ids, c),
            (Generator::Cpu(m), GeneratorCache::Cpu(c)) => m.next_logits(ids, c),
            (Generator::Cuda(m), GeneratorCache::Cuda(c)) => m.next_logits(ids, c),
            _ => mismatch(),
        }
    }

    fn decode_step(&self, tokens: &[u32], caches: &mut [&mut GeneratorCache<B>]) -> Vec<Vec<f32>> {
        match self {
            Generator::Burn(m) => {
                let mut inner: Vec<&mut KvCache<B>> = caches
                    .iter_mut()
                    .map(|c| match &mut **c {
                        GeneratorCache::Burn(c) => c,
                        _ => mismatch(),
                    })
                    .collect();
                LanguageModel::decode_step(&**m, tokens, &mut inner)
            }
            Generator::Cpu(m) => {
                let mut inner: Vec<&mut CpuCache> = caches
                    .iter_mut()
                    .map(|c| match &mut **c {
                        GeneratorCache::Cpu(c) => c,
                        _ => mismatch(),
                    })
                    .collect();
                m.decode_step(tokens, &mut inner)
            }
            Generator::Cuda(m) => {
                let mut inner: Vec<&mut CudaCache> = caches
                    .iter_mut()
                    .map(|c| match &mut **c {
                        GeneratorCache::Cuda(c) => c,
                        _ => mismatch(),
                    })
                    .collect();
                m.decode_step(tokens, &mut inner)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::init::{named_config, write_random_model};
    use crate::arch::model::LoadOptions;
    use crate::io::weights::Precision;

    fn load(precision: Precision, dir: &std::path::Path) -> CausalLm<Flex> {
        let mut json = named_config("tiny-llama").unwrap();
        json["vocab_size"] = 96.into();
        write_random_model(&json, 5, safetensors::Dtype::BF16, dir).unwrap();
        let options = LoadOptions {
            precision,
            emulate_nvfp4_activations: false,
        };
        CausalLm::load(dir, options, &Default::default()).unwrap()
    }

    /// Twelve greedy tokens after a fixed prompt.
    fn greedy(model: &impl LanguageModel) -> (Vec<u32>, crate::run::generate::FinishReason) {
        let options = crate::GenerateOptions {
            max_new_tokens: 12,
            ..Default::default()
        };
        crate::run::generate::generate_tokens(model, &[3, 14, 15, 92, 65], &[], &options, |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap()
    }

    #[test]
    fn the_cpu_decoder_runs_float32_models_only_and_greedy_text_agrees() {
        let dir = tempfile::tempdir().unwrap();
        let burn = load(Precision::F32, dir.path());
        let reference = greedy(&burn);
        let fast = Generator::new(burn);
        assert_eq!(fast.kind(), "cpu-decoder");
        assert_eq!(greedy(&fast), reference);
        assert_eq!(
            Generator::new(load(Precision::Bf16, dir.path())).kind(),
            "burn"
        );
    }
}
