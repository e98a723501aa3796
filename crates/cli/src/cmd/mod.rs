//! One module per subcommand.

pub mod bench;
pub mod bench_gates;
pub mod dataset;
pub mod export;
pub mod generate;
pub mod infer;
pub mod model;
pub mod node;
pub mod quant_check;
pub mod train;
pub mod validate;
