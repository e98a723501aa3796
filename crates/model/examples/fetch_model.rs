//! Fetches a known model into a Hugging Face directory:
//! `cargo run -p qatflow-model --example fetch_model -- smollm2-135m-instruct OUT_DIR`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, out] = args.as_slice() else {
        eprintln!("usage: fetch_model MODEL_NAME OUT_DIR   (models: smollm2-135m-instruct)");
        return ExitCode::from(2);
    };
    match qatflow_model::fetch_model(name, &PathBuf::from(out)) {
        Ok(summary) => {
            println!(
                "{}: {} tensors, {} layers, hidden {}",
                summary.out_dir.display(),
                summary.tensors.len(),
                summary.params.num_layers,
                summary.params.hidden
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
