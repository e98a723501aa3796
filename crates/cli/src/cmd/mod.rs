//! One module per subcommand.

pub mod bench;
pub mod bench_gates;
pub mod dataset;
pub mod demo;
pub mod export;
pub mod generate;
pub mod infer;
pub mod model;
pub mod node;
pub mod quant_check;
pub mod render_audit;
pub mod serve;
pub mod train;
pub mod validate;
