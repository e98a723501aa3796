//! `qatflow chat` and `qatflow eval nll | kld | decode`: run a model directory (Hugging Face, or an
//! NVFP4 export) on the CPU (`flex`) or a CUDA GPU.

use anyhow::{bail, Context};
use burn::tensor::backend::Backend;
use qatflow_core::{Device, JsonlReader};
use qatflow_model::eval::{eval_kld_many, EvalOptions};
use qatflow_model::{
    eval_decode, eval_nll, generate_with_tools, load_with_tokenizer, CausalLm, DecodeReport,
    GenerateOptions, Generator, LoadOptions, Precision, Tokenizer,
};
use qatflow_serve::ToolCallFormat;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Model loading options shared by chat and eval.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Parameter precision: f32 or bf16 (default: f32 on cpu, bf16 on cuda).
    #[arg(long, value_parser = ["f32", "bf16"])]
    pub precision: Option<String>,
    /// For NVFP4 exports: weight-only (W4A16) instead of the default W4A4 emulation.
    #[arg(long)]
    pub weight_only: bool,
}

impl ModelArgs {
    /// The load options these flags ask for.
    pub fn options(&self) -> LoadOptions {
        let precision = match (self.precision.as_deref(), self.device) {
            (Some("bf16"), _) | (None, Device::Cuda(_)) => Precision::Bf16,
            _ => Precision::F32,
        };
        LoadOptions {
            precision,
            emulate_nvfp4_activations: !self.weight_only,
        }
    }
}

/// Arguments of `qatflow chat`.
#[derive(clap::Args)]
pub struct ChatArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
    pub model_dir: PathBuf,
    /// The user message.
    pub message: String,
    /// A system prompt (text, or @FILE to read it from a file).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Pass enable_thinking to templates that have the switch (Qwen3, Qwen3.5).
    #[arg(long)]
    pub enable_thinking: Option<bool>,
    /// OpenAI-format tool definitions (a JSON array in this file) rendered into the prompt.
    /// The reply is then printed as JSON {"content", "tool_calls", "tool_format"}, its tool
    /// calls parsed in the format the chat template writes: Qwen3.5's XML (`qwen3_coder`)
    /// for Qwen3.5 models, Hermes JSON (`hermes`) for Qwen3 and SmolLM2.
    #[arg(long, value_name = "FILE")]
    pub tools: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The `eval` subcommands.
#[derive(clap::Subcommand)]
pub enum EvalCommand {
    /// Mean negative log-likelihood and perplexity of a model on token sequences.
    ///
    /// Prints {"mean_nll", "perplexity", "sequences": [{"tokens", "mean_nll"}, ...]}: each
    /// sequence's mean NLL over its predicted positions 1..n, in input order.
    Nll {
        /// Model directory.
        model_dir: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// KL divergence of `other`'s next-token distributions from `base`'s (mean, p99) and
    /// top-1 agreement: what quantization did to a model; also both models' NLL (as `eval
    /// nll` computes it) from the same forward passes. With several `--other`, the base
    /// model runs once for all of them (all are loaded at once) and the JSON holds one
    /// report per `--other`, keyed by the path as given.
    Kld {
        /// The reference model directory.
        #[arg(long)]
        base: PathBuf,
        /// The model compared with it (for example its NVFP4 export); repeat to compare
        /// several.
        #[arg(long, required = true)]
        other: Vec<PathBuf>,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Incremental decoding against the full forward, on the chosen device: each sequence's
    /// first `--prefill` tokens in one call, then one token at a time through the cache
    /// (attention's key/value cache, Gated DeltaNet's recurrent and convolution state).
    ///
    /// Prints {"prefill", "max_abs_diff", "sequences": [{"tokens", "max_abs_diff"}, ...]}:
    /// the largest |Δ| between a decoded logit and the full forward's. Exits 1 when it is
    /// above `--tolerance`. Meant for short sequences (it holds each sequence's logits).
    Decode {
        /// Model directory.
        model_dir: PathBuf,
        /// Tokens given in the first call.
        #[arg(long, default_value_t = 16)]
        prefill: usize,
        /// Largest |Δlogit| accepted. Measured on the tiny Qwen3.5 fixture: about 2e-6 in F32
        /// on the CPU, 1e-3 in F32 on an H100 and 2e-2 in BF16; a broken cache is off by whole
        /// logits.
        #[arg(long, default_value_t = 0.05)]
        tolerance: f64,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        model: ModelArgs,
    },
}

/// Evaluation data: conversations or token ids.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct DataArgs {
    /// Chat JSONL; each conversation is rendered with the model's chat template.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// A JSON array of token-id arrays.
    #[arg(long)]
    pub token_ids: Option<PathBuf>,
}

/// Loads a model for evaluation, with its tokenizer only when conversations are to be
/// rendered (`--token-ids` needs no `tokenizer.json`).
fn load_for_eval<B: Backend>(
    dir: &Path,
    data: &DataArgs,
    m: &ModelArgs,
    device: &B::Device,
) -> anyhow::Result<(CausalLm<B>, Option<Tokenizer>)> {
    if data.token_ids.is_some() {
        let model = CausalLm::load(dir, m.options(), device)
            .with_context(|| format!("loading the model in {}", dir.display()))?;
        return Ok((model, None));
    }
    let (model, tokenizer) = load_with_tokenizer::<B>(dir, m.options(), device)?;
    Ok((model, Some(tokenizer)))
}

fn read_sequences(data: &DataArgs, tokenizer: Option<&Tokenizer>) -> anyhow::Result<Vec<Vec<u32>>> {
    if let Some(path) = &data.token_ids {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let seqs: Vec<Vec<u32>> = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected a JSON array of token-id arrays",
                path.display()
            )
        })?;
        return Ok(seqs);
    }
    let path = data
        .data
        .as_ref()
        .expect("clap requires --data or --token-ids");
    let tokenizer = tokenizer.expect("load_for_eval loads a tokenizer for --data");
    let mut seqs = Vec::new();
    for line in JsonlReader::open(path)? {
        let line = line?;
        let text = line
            .text
            .map_err(|p| anyhow::anyhow!("{}:{}: {p}", path.display(), line.number))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}:{}: invalid JSON", path.display(), line.number))?;
        let messages = value["messages"].as_array().cloned().ok_or_else(|| {
            anyhow::anyhow!("{}:{}: no \"messages\" array", path.display(), line.number)
        })?;
        let enc = tokenizer
            .encode_conversation(&messages, None, None)
            .with_context(|| format!("{}:{}", path.display(), line.number))?;
        seqs.push(enc.ids);
    }
    if seqs.is_empty() {
        bail!("{}: no conversations", path.display());
    }
    Ok(seqs)
}

fn read_tools(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--tools {}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "--tools {}: expected a JSON array of OpenAI tool definitions ({{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"}}}})",
            path.display()
        )
    })
}

fn chat_on<B: Backend>(a: &ChatArgs, device: B::Device) -> anyhow::Result<String> {
    let (model, tokenizer) = load_with_tokenizer::<B>(&a.model_dir, a.model.options(), &device)?;
    let mut messages = Vec::new();
    if let Some(system) = &a.system {
        let text = match system.strip_prefix('@') {
            Some(file) => std::fs::read_to_string(file)
                .with_context(|| format!("--system @{file}: cannot read"))?,
            None => system.clone(),
        };
        messages.push(json!({"role": "system", "content": text}));
    }
    messages.push(json!({"role": "user", "content": a.message}));
    let tools = a.tools.as_deref().map(read_tools).transpose()?;
    let options = GenerateOptions {
        max_new_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        enable_thinking: a.enable_thinking,
        ..Default::default()
    };
    let reply = generate_with_tools(
        &Generator::new(model),
        &tokenizer,
        &messages,
        tools.as_deref(),
        &options,
        |_| std::ops::ControlFlow::Continue(()),
    )?;
    let Some(tools) = tools else {
        return Ok(reply.text);
    };
    let template = tokenizer
        .template()
        .context("--tools needs a chat template in the model directory")?;
    let format = ToolCallFormat::for_template(template.source());
    let parsed = format.parse(&reply.text, Some(&tools));
    let calls: Vec<Value> = parsed
        .calls
        .iter()
        .map(|c| json!({"name": c.name, "arguments": c.arguments}))
        .collect();
    let format_name = match format {
        ToolCallFormat::Hermes => "hermes",
        ToolCallFormat::QwenXml => "qwen3_coder",
    };
    Ok(
        json!({"content": parsed.content, "tool_calls": calls, "tool_format": format_name})
            .to_string(),
    )
}

/// Runs `qatflow chat`.
pub fn chat(a: ChatArgs) -> anyhow::Result<ExitCode> {
    let _span = tracing::info_span!("chat", model = %a.model_dir.display()).entered();
    let reply = on_inference_backend!(a.model.device, chat_on(&a))?;
    println!("{reply}");
    Ok(ExitCode::SUCCESS)
}

fn nll_on<B: Backend>(
    dir: &Path,
    data: &DataArgs,
    m: &ModelArgs,
    device: B::Device,
) -> anyhow::Result<Value> {
    let (model, tokenizer) = load_for_eval::<B>(dir, data, m, &device)?;
    let seqs = read_sequences(data, tokenizer.as_ref())?;
    Ok(serde_json::to_value(eval_nll(&model, seqs)?)?)
}

fn kld_on<B: Backend>(
    base: &Path,
    others: &[PathBuf],
    data: &DataArgs,
    m: &ModelArgs,
    device: B::Device,
) -> anyhow::Result<Value> {
    let (base_model, tokenizer) = load_for_eval::<B>(base, data, m, &device)?;
    let other_models = others
        .iter()
        .map(|o| Ok(load_for_eval::<B>(o, data, m, &device)?.0))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let seqs = read_sequences(data, tokenizer.as_ref())?;
    let refs: Vec<&CausalLm<B>> = other_models.iter().collect();
    let mut reports = eval_kld_many(&base_model, &refs, seqs, &EvalOptions::default())?;
    if reports.len() == 1 {
        return Ok(serde_json::to_value(reports.remove(0))?);
    }
    let keyed: serde_json::Map<String, Value> = others
        .iter()
        .zip(reports)
        .map(|(o, r)| Ok((o.display().to_string(), serde_json::to_value(r)?)))
        .collect::<anyhow::Result<_>>()?;
    Ok(Value::Object(keyed))
}

fn decode_on<B: Backend>(
    dir: &Path,
    prefill: usize,
    data: &DataArgs,
    m: &ModelArgs,
    device: B::Device,
) -> anyhow::Result<DecodeReport> {
    let (model, tokenizer) = load_for_eval::<B>(dir, data, m, &device)?;
    let seqs = read_sequences(data, tokenizer.as_ref())?;
    Ok(eval_decode(&model, seqs, prefill)?)
}

/// Runs `eval decode`: prints the report, exits 1 above the tolerance.
fn decode(
    dir: &Path,
    prefill: usize,
    tolerance: f64,
    data: &DataArgs,
    model: &ModelArgs,
) -> anyhow::Result<ExitCode> {
    let report = on_inference_backend!(model.device, decode_on(dir, prefill, data, model))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if report.max_abs_diff > tolerance {
        eprintln!(
            "decoding differs from the full forward by {:e} (tolerance {tolerance:e})",
            report.max_abs_diff
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs an `eval` subcommand and prints its JSON.
pub fn eval(cmd: EvalCommand) -> anyhow::Result<ExitCode> {
    let out = match &cmd {
        EvalCommand::Nll {
            model_dir,
            data,
            model,
        } => on_inference_backend!(model.device, nll_on(model_dir, data, model))?,
        EvalCommand::Kld {
            base,
            other,
            data,
            model,
        } => on_inference_backend!(model.device, kld_on(base, other, data, model))?,
        EvalCommand::Decode {
            model_dir,
            prefill,
            tolerance,
            data,
            model,
        } => return decode(model_dir, *prefill, *tolerance, data, model),
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}
