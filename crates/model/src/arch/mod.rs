//! The architectures as burn modules: the dense decoders (Llama, Qwen3) and the Qwen3.5
//! hybrid with its Gated DeltaNet core, the layers they share (norms, MLP, attention, the
//! key/value cache, RoPE), the one [`model::CausalLm`] type over all of them, parameters
//! by Hugging Face name, and randomly initialized models of named configurations.

pub mod deltanet;
pub mod dense;
pub mod init;
pub mod layers;
pub mod model;
pub mod params;
pub mod qwen35;
pub mod rope;
