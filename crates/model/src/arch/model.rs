//! [`CausalLm`]: the architectures behind one type, loaded from a Hugging Face directory
//! (BF16/F32 safetensors or a ModelOpt NVFP4 export) in a precision chosen at load time.

use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};

use crate::arch::dense::{self, Dense};
use crate::arch::layers::KvCache;
use crate::arch::qwen35::{self, Qwen35};
use crate::config::{Architecture, ModelConfig};
use crate::io::weights::{Checkpoint, LoadError, Precision, Weights};
use crate::linear::{matmul_wt, QLinear};
use crate::text::tokenizer::{ModelFamily, Tokenizer};

/// How to load a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Parameter (and activation) precision.
    pub precision: Precision,
    /// For NVFP4 exports: also fake-quantize each linear's input with its exported
    /// `input_scale` (W4A4, what Blackwell serves); `false` gives weight-only W4A16.
    pub emulate_nvfp4_activations: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            precision: Precision::F32,
            emulate_nvfp4_activations: true,
        }
    }
}

/// A decoder-only causal language model of any supported architecture.
#[derive(Module, Debug)]
pub enum CausalLm<B: Backend> {
    /// Llama / SmolLM2.
    Llama(Dense<B>),
    /// Dense Qwen3.
    Qwen3(Dense<B>),
    /// Qwen3.5 with text-checkpoint tensor names (`model.layers.…`).
    Qwen35(Qwen35<B>),
    /// Qwen3.5 read from a VL checkpoint (`model.language_model.layers.…`); its parameters
    /// keep those names.
    Qwen35Vl(Qwen35<B>),
}

impl<B: Backend> CausalLm<B> {
    /// Loads `dir/config.json` and the directory's safetensors.
    pub fn load(dir: &Path, options: LoadOptions, device: &B::Device) -> Result<Self, LoadError> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_checkpoint(&config, &ckpt, options, device)
    }

    /// Builds a model of `config` from an opened checkpoint, after checking every tensor.
    pub fn from_checkpoint(
        config: &ModelConfig,
        ckpt: &Checkpoint,
        options: LoadOptions,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let prefix = qwen35::checkpoint_prefix(ckpt);
        if config.architecture == Architecture::Qwen35 {
            ckpt.check_tensors(&qwen35::expected_tensors(config, prefix))?;
        } else {
            ckpt.check_tensors(&dense::expected_tensors(config))?;
        }
        let w = Weights::new(
            ckpt,
            options.precision,
            options.emulate_nvfp4_activations,
            device,
        );
        Ok(match config.architecture {
            Architecture::Llama => CausalLm::Llama(Dense::load(config, &w)?),
            Architecture::Qwen3 => CausalLm::Qwen3(Dense::load(config, &w)?),
            Architecture::Qwen35 if prefix == qwen35::VL_PREFIX => {
                CausalLm::Qwen35Vl(Qwen35::load(config, &w, prefix)?)
            }
            Architecture::Qwen35 => CausalLm::Qwen35(Qwen35::load(config, &w, prefix)?),
        })
    }

    /// Hyperparameters.
    pub fn config(&self) -> &ModelConfig {
        match self {
            CausalLm::Llama(m) => &m.config,
            CausalLm::Qwen3(m) => &m.config,
            CausalLm::Qwen35(m) | CausalLm::Qwen35Vl(m) => &m.config,
        }
    }

    /// The embedding matrix `[vocab, hidden]`.
    pub fn embed_weight(&self) -> Tensor<B, 2> {
        match self {
            CausalLm::Llama(m) => m.embed_tokens.val(),
            CausalLm::Qwen3(m) => m.embed_tokens.val(),
            CausalLm::Qwen35(m) | CausalLm::Qwen35Vl(m) => m.embed_tokens.val(),
        }
    }

    /// The LM head `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head_weight(&self) -> Tensor<B, 2> {
        let head = match self {
            CausalLm::Llama(m) => m.lm_head.as_ref(),
            CausalLm::Qwen3(m) => m.lm_head.as_ref(),
            CausalLm::Qwen35(m) | CausalLm::Qwen35Vl(m) => m.lm_head.as_ref(),
        };
        head.map_or_else(|| self.embed_weight(), |p| p.val())
    }

    /// Parameter dtype.
    pub fn dtype(&self) -> DType {
        self.embed_weight().dtype()
    }

    /// The device the parameters live on.
    pub fn device(&self) -> B::Device {
        self.embed_weight().device()
    }

    /// An empty key/value cache for [`CausalLm::forward_hidden`].
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.config().num_layers)
    }

    /// Final hidden states `[batch, len, hidden]` of `ids` `[batch, len]`: the training
    /// forward with `lengths` (per-sequence unpadded lengths, right padding, causal mask)
    /// and no cache, or the inference forward with a `cache` (positions continue after
    /// the cached ones).
    pub fn forward_hidden(
        &self,
        ids: Tensor<B, 2, Int>,
        lengths: Option<&[usize]>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        match self {
            CausalLm::Llama(m) => m.forward_hidden(ids, lengths, cache, &mut |_, x| x),
            CausalLm::Qwen3(m) => m.forward_hidden(ids, lengths, cache, &mut |_, x| x),
            CausalLm::Qwen35(m) | CausalLm::Qwen35Vl(m) => {
                m.forward_hidden(ids, lengths, cache, &mut |_, x| x)
            }
        }
    }

    /// The training forward of [`CausalLm::forward_hidden`] (no cache) with `boundary(i, x)`
    /// applied to the input of block `i` (the embedding's output for `i = 0`) and, for
    /// `i` = the layer count, to the final norm's input: a trainer that detaches there
    /// gets one autodiff graph a block (the embedding, each block, the final norm and what
    /// follows it), each differentiated on its own.
    pub fn forward_hidden_split(
        &self,
        ids: Tensor<B, 2, Int>,
        lengths: Option<&[usize]>,
        boundary: &mut dyn FnMut(usize, Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        match self {
            CausalLm::Llama(m) => m.forward_hidden(ids, lengths, None, boundary),
            CausalLm::Qwen3(m) => m.forward_hidden(ids, lengths, None, boundary),
            CausalLm::Qwen35(m) | CausalLm::Qwen35Vl(m) => {
                m.forward_hidden(ids, lengths, None, boundary)
            }
        }
    }

    /// Hugging Face names of the parameters read in more than one place of the forward:
    /// the embedding when the LM head is tied to it, else none.
    pub fn shared_params(&self) -> Vec<String> {
        let (tied, prefix) = match self {
            CausalLm::Llama(m) | CausalLm::Qwen3(m) => (m.lm_head.is_none(), "model"),
            CausalLm::Qwen35(m) => (m.lm_head.is_none(), "model"),
            CausalLm::Qwen35Vl(m) => (m.lm_head.is_none(), qwen35::VL_PREFIX),
        };
        if tied {
            vec![format!("{prefix}.embed_tokens.weight")]
        } else {
            Vec::new()
        }
    }

    /// Logits of hidden states `[.., hidden]` → `[.., vocab]`, in the parameter dtype.
    pub fn logits<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        matmul_wt(hidden, self.lm_head_weight())
    }

    /// Logits `[batch, len, vocab]` of a padded batch (avoid for big vocabularies and long
    /// inputs: evaluation and training compute logits in chunks from
    /// [`CausalLm::forward_hidden`]).
    pub fn forward(&self, ids: Tensor<B, 2, Int>, lengths: Option<&[usize]>) -> Tensor<B, 3> {
        self.logits(self.forward_hidden(ids, lengths, None))
    }

    /// Every NVFP4-quantizable linear (q, k, v, o, gate, up, down of each layer; in Qwen3.5's
    /// linear-attention layers `in_proj_qkv`, `in_proj_z` and `out_proj` instead of q/k/v/o,
    /// never `in_proj_a`, `in_proj_b` or `conv1d`).
    pub fn linears_mut(&mut self) -> Vec<&mut QLinear<B>> {
        let mut out = Vec::new();
        macro_rules! collect {
            ($layers:expr) => {
                for l in $layers.iter_mut() {
                    let a = &mut l.self_attn;
                    out.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
                    let m = &mut l.mlp;
                    out.extend([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]);
                }
            };
        }
        match self {
            CausalLm::Llama(m) => collect!(m.layers),
            CausalLm::Qwen3(m) => collect!(m.layers),
            CausalLm::Qwen35(m) | CausalLm::Qwen35Vl(m) => {
                for l in m.layers.iter_mut() {
                    out.extend(l.linears_mut());
                }
            }
        }
        out
    }
}

/// Every tensor a configuration needs, under the text checkpoint's names: `(name, shape,
/// is_quantizable_linear)`; linears are named without the `.weight` suffix.
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>, bool)> {
    if config.architecture == Architecture::Qwen35 {
        qwen35::expected_tensors(config, qwen35::TEXT_PREFIX)
    } else {
        dense::expected_tensors(config)
    }
}

/// Loads the tokenizer and the model of a directory, checking the tokenizer against the
/// model (vocabulary size, and the special-token ids of a recognized family) first.
pub fn load_with_tokenizer<B: Backend>(
    dir: &Path,
    options: LoadOptions,
    device: &B::Device,
) -> Result<(CausalLm<B>, Tokenizer), LoadError> {
    let config_path = dir.join("config.json");
    let config = ModelConfig::from_file(&config_path)?;
    let raw: serde_json::Value = std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let tokenizer = Tokenizer::from_dir(dir, ModelFamily::detect(&raw))?;
    let ckpt = Checkpoint::open(dir)?;
    let model = CausalLm::from_checkpoint(&config, &ckpt, options, device)?;
    Ok((model, tokenizer))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use burn::backend::Flex;

    use super::*;
    use crate::arch::init::{random_init, tiny_config};

    /// The model's quantized linears are exactly what `qatflow_nvfp4::linears` lists for its
    /// architecture, and its shared-input groups are siblings that exist in every layer.
    #[test]
    fn linears_follow_the_nvfp4_table() {
        for arch in [
            Architecture::Llama,
            Architecture::Qwen3,
            Architecture::Qwen35,
        ] {
            let config = tiny_config(arch, 64);
            let table = arch.nvfp4_linears();
            let mut model = random_init::<Flex>(&config, 3, &Default::default());
            let names: Vec<String> = model.linears_mut().iter().map(|l| l.name.clone()).collect();
            let leaves: BTreeSet<&str> = names
                .iter()
                .map(|n| n.rsplit('.').next().unwrap_or(n))
                .collect();
            let want: BTreeSet<&str> = table.quantized.iter().copied().collect();
            assert_eq!(leaves, want, "{arch:?}");
            let expected: BTreeSet<String> = expected_tensors(&config)
                .into_iter()
                .filter(|(_, _, quantized)| *quantized)
                .map(|(n, _, _)| n)
                .collect();
            assert_eq!(names.iter().cloned().collect::<BTreeSet<_>>(), expected);
            for name in &names {
                for sibling in qatflow_nvfp4::linears::shared_input_group(name) {
                    assert!(names.contains(&sibling), "{arch:?}: {name} -> {sibling}");
                }
            }
        }
    }
}
