//! Running a loaded [`CausalLm`](crate::arch::model::CausalLm): generation, step-level
//! batched decoding, the packed CPU decoder of dense models, the [`lm::LanguageModel`]
//! interface both implement, evaluation (NLL, KL divergence) and ModelOpt's max
//! calibration.

pub mod batch;
pub mod calib;
pub mod cpu;
pub mod cuda;
pub mod eval;
pub mod generate;
pub mod lm;
