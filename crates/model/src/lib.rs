//! qatflow-model: decoder architectures as burn modules (Llama/SmolLM2, dense Qwen3, the
//! Qwen3.5 Gated DeltaNet hybrid),
//! Hugging Face and NVFP4 checkpoint loading, generation and evaluation, plus tokenizers,
//! Hugging Face chat templates, assistant-only loss masks, GGUF import and model fetching.

#![warn(missing_docs)]

pub mod audit;
pub mod batch;
pub mod calib;
pub mod config;
pub mod deltanet;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod import;
pub mod init;
pub mod layers;
pub mod linear;
pub mod llama;
pub mod mask;
pub mod model;
pub mod params;
pub mod pyjson;
pub mod qwen3;
pub mod qwen35;
pub mod rng;
pub mod rope;
pub mod template;
pub mod tokenizer;
pub mod toolcall;
pub mod weights;

pub use calib::{apply_group_rule, calibrate_inputs, weight_amax, CalibError};
pub use config::{Architecture, ConfigError, HybridConfig, LayerKind, ModelConfig};
pub use eval::{eval_kld, eval_nll, EvalError, KldReport, NllReport};
pub use fetch::{cached_smollm2, fetch_model, fetch_smollm2, FetchError};
pub use generate::{generate, GenerateError, GenerateOptions, Reply};
pub use import::{import_gguf, ImportError, ImportSummary};
pub use layers::{CacheSlot, KvCache};
pub use linear::{FakeQuant, QLinear};
pub use model::{load_with_tokenizer, CausalLm, LoadOptions};
pub use template::{ChatTemplate, TemplateError};
pub use tokenizer::{EncodedConversation, ModelFamily, Tokenizer, TokenizerError};
pub use weights::{Checkpoint, LoadError, Precision};
