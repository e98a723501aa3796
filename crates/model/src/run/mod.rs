//! Running a loaded [`CausalLm`](crate::arch::model::CausalLm): generation, step-level
//! batched decoding, evaluation (NLL, KL divergence) and ModelOpt's max calibration.

pub mod batch;
pub mod calib;
pub mod eval;
pub mod generate;
