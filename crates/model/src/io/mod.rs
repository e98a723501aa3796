//! Weights on disk: Hugging Face safetensors checkpoints read into burn tensors (NVFP4
//! exports dequantized), the GGUF reader, the GGUF → Hugging Face import, and fetching
//! real models.

pub mod fetch;
pub mod gguf;
pub mod import;
pub mod weights;
