//! qatflow-model: tokenizers, Hugging Face chat templates, assistant-only loss masks,
//! GGUF import and model fetching (the non-neural half of the model crate).

#![warn(missing_docs)]

pub mod fetch;
pub mod gguf;
pub mod import;
pub mod mask;
pub mod pyjson;
pub mod template;
pub mod tokenizer;

pub use fetch::{fetch_model, fetch_smollm2, FetchError};
pub use import::{import_gguf, ImportError, ImportSummary};
pub use template::{ChatTemplate, TemplateError};
pub use tokenizer::{EncodedConversation, ModelFamily, Tokenizer, TokenizerError};
