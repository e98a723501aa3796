//! Text around the model: the tokenizer of a model directory, Hugging Face chat templates
//! with Python-exact `tojson`, assistant-only loss masks, the render audit with its Hermes
//! fallback, and Qwen3.5's XML tool calls.

pub mod audit;
pub mod mask;
pub mod pyjson;
pub mod template;
pub mod tokenizer;
pub mod toolcall;
