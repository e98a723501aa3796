//! `qatflow quant-check`: what NVFP4 round-tripping costs each weight of a checkpoint.

use crate::output::table;
use qatflow_nvfp4::quant_check;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `qatflow quant-check`.
#[derive(clap::Args)]
pub struct Args {
    /// A .safetensors file; every 2-D F32/BF16/F16 tensor whose last dimension is a
    /// multiple of 16 is quantized to NVFP4 (amax = max|W|) and dequantized.
    pub file: PathBuf,
    /// Print {"tensors": [{"name", "shape", "rel_error", "sqnr_db"}, ...]} instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let report = {
        let _span = tracing::info_span!("quant_check", file = %a.file.display()).entered();
        quant_check(&a.file)?
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    if report.tensors.is_empty() {
        println!(
            "{}: no 2-D float tensor with a last dimension divisible by 16",
            a.file.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = report
        .tensors
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                format!("{:?}", t.shape),
                format!("{:.4}", t.rel_error),
                t.sqnr_db
                    .map_or_else(|| "exact".to_string(), |db| format!("{db:.2}")),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["tensor", "shape", "rel_error", "sqnr_db"], &rows)
    );
    Ok(ExitCode::SUCCESS)
}
