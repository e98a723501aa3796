//! qatflow-model: decoder architectures as burn modules (Llama/SmolLM2, dense Qwen3, the
//! Qwen3.5 Gated DeltaNet hybrid), Hugging Face and NVFP4 checkpoint loading, generation
//! and evaluation, plus tokenizers, Hugging Face chat templates, assistant-only loss masks,
//! GGUF import and model fetching.
//!
//! By topic, each folder importing only those below it:
//! - [`run`]: generation, batched decoding, evaluation and calibration of a loaded model;
//! - [`arch`]: the architectures, their shared layers, the one [`CausalLm`] type, parameters
//!   by Hugging Face name and randomly initialized models;
//! - [`io`]: weights on disk (safetensors, GGUF, the GGUF import, fetching);
//! - [`text`]: tokenizers, chat templates, loss masks and the render audit;
//! - [`linear`] (the quantizable linear layer and its input hook) and [`config`] at the
//!   bottom; [`rng`] is `qatflow_core`'s generator.

pub mod arch;
pub mod config;
pub mod io;
pub mod linear;
pub mod run;
pub mod text;

// The flat module paths of before the folders, for the crates that use them.
pub use arch::{deltanet, dense, init, layers, model, params, qwen35, rope};
pub use io::{fetch, gguf, import, qwen35_tokenizer, tiktoken, weights};
/// The seedable generator, where the crates that use it found it (`qatflow_core::rng`).
pub use qatflow_core::rng;
pub use run::{batch, calib, cpu, cuda, eval, generate, lm};
pub use text::{audit, mask, pyjson, template, tokenizer, toolcall};

pub use arch::layers::{CacheSlot, KvCache};
pub use arch::model::{expected_tensors, load_with_tokenizer, CausalLm, LoadOptions};
pub use config::{Architecture, ConfigError, HybridConfig, LayerKind, ModelConfig};
pub use io::fetch::{cached_smollm2, fetch_model, fetch_smollm2, FetchError};
pub use io::import::{import_gguf, ImportError, ImportSummary};
pub use io::qwen35_tokenizer::fetch_tokenizer;
pub use io::weights::{Checkpoint, LoadError, Precision};
pub use linear::QLinear;
pub use run::calib::{apply_group_rule, calibrate_inputs, weight_amax, CalibError};
pub use run::cpu::{CpuCache, CpuDecoder};
pub use run::cuda::{CudaCache, CudaDecoder};
pub use run::eval::{
    eval_decode, eval_kld, eval_nll, DecodeReport, EvalError, KldReport, NllReport,
};
pub use run::generate::{generate, generate_with_tools, GenerateError, GenerateOptions, Reply};
pub use run::lm::{Generator, GeneratorCache, LanguageModel};
pub use text::template::{ChatTemplate, TemplateError};
pub use text::tokenizer::{EncodedConversation, ModelFamily, Tokenizer, TokenizerError};
