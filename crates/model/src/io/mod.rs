//! Weights on disk: Hugging Face safetensors checkpoints read into burn tensors (NVFP4
//! exports dequantized), the GGUF reader, the GGUF → Hugging Face import, fetching
//! real models, and Qwen3.5's tokenizer built from a tiktoken file.

pub mod fetch;
pub mod gguf;
pub mod import;
pub mod qwen35_tokenizer;
pub mod tiktoken;
pub mod weights;
