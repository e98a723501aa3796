//! One module per subcommand.

pub mod bench_gates;
pub mod dataset;
pub mod generate;
pub mod infer;
pub mod model;
pub mod quant_check;
pub mod validate;
