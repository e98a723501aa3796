//! `qatflow train`, `qatflow report` and `qatflow bench-train`: thin shells over
//! `qatflow-train` (configuration + flag overrides, a progress bar, Ctrl-C → checkpoint).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use burn::tensor::backend::AutodiffBackend;
use clap::Args as ClapArgs;
use indicatif::{ProgressBar, ProgressStyle};
use qatflow_train::bench::{bench_train_on, BenchOptions, BenchReport};
use qatflow_train::{
    on_training_backend, CancellationToken, Dataset, MomentPrecision, OptimPrecision, RunOptions,
    TrainConfig, TrainEvent, TrainSink, TrainingWork,
};

/// Arguments of `qatflow train`.
#[derive(ClapArgs)]
pub struct TrainArgs {
    /// The training recipe (TOML: [model], [data], [optim], [quant], [run]); see
    /// config/train/example.toml. Flags below override its values.
    #[arg(long, value_name = "FILE.toml")]
    config: PathBuf,
    /// Continue from the newest checkpoint in the output directory that verifies
    /// (corrupt newer ones are reported and skipped).
    #[arg(long)]
    resume: bool,
    /// Base model directory (model.base).
    #[arg(long, value_name = "DIR")]
    base: Option<PathBuf>,
    /// Train on a JSONL file (data.jsonl).
    #[arg(long, value_name = "FILE.jsonl", conflicts_with = "store")]
    data: Option<PathBuf>,
    /// Train on a dataset store (data.store).
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Only this category of the store (data.category).
    #[arg(long)]
    category: Option<String>,
    /// Passes over the data (optim.epochs).
    #[arg(long)]
    epochs: Option<u32>,
    /// Peak learning rate (optim.lr).
    #[arg(long)]
    lr: Option<f64>,
    /// Conversations per forward pass (optim.micro_batch).
    #[arg(long)]
    micro_batch: Option<usize>,
    /// Micro-batches per optimizer step (optim.grad_accum).
    #[arg(long)]
    grad_accum: Option<usize>,
    /// fp32 | bf16-kahan | bf16-stochastic | bf16-plain (optim.precision).
    #[arg(long, value_parser = parse_precision)]
    precision: Option<OptimPrecision>,
    /// fp32 | bf16: how Adam's moments are stored (optim.moments; bf16 halves the
    /// optimizer's memory).
    #[arg(long, value_parser = parse_moments)]
    moments: Option<MomentPrecision>,
    /// Longest sequence in tokens (data.max_seq_len).
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Calibration conversations (quant.calib_samples).
    #[arg(long)]
    calib_samples: Option<usize>,
    /// Plain fine-tuning without fake quantization (quant.enabled = false).
    #[arg(long)]
    no_quant: bool,
    /// Prefix replies lacking one with the empty think block (data.no_thinking).
    #[arg(long)]
    no_thinking: bool,
    /// cpu | cuda | cuda:N (run.device).
    #[arg(long)]
    device: Option<String>,
    /// Run directory (run.output_dir).
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Seed of data order and stochastic rounding (run.seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Checkpoint every N optimizer steps (run.checkpoint_every).
    #[arg(long, value_name = "N")]
    checkpoint_every: Option<u64>,
    /// Keep the newest N checkpoints (run.keep_checkpoints).
    #[arg(long, value_name = "N")]
    keep_checkpoints: Option<usize>,
    /// Stop after N optimizer steps (run.max_steps).
    #[arg(long, value_name = "N")]
    max_steps: Option<u64>,
    /// Print each event as a JSON line on stdout instead of drawing a progress bar.
    #[arg(long)]
    json: bool,
}

fn parse_precision(s: &str) -> Result<OptimPrecision, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
        format!("unknown precision {s:?}; use fp32, bf16-kahan, bf16-stochastic or bf16-plain")
    })
}

fn parse_moments(s: &str) -> Result<MomentPrecision, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("unknown moment precision {s:?}; use fp32 or bf16"))
}

impl TrainArgs {
    fn config(&self) -> anyhow::Result<TrainConfig> {
        let mut c = TrainConfig::from_file(&self.config)?;
        if let Some(v) = &self.base {
            c.model.base = v.clone();
        }
        if let Some(v) = &self.data {
            c.data.jsonl = Some(v.clone());
            c.data.store = None;
        }
        if let Some(v) = &self.store {
            c.data.store = Some(v.clone());
            c.data.jsonl = None;
        }
        if self.category.is_some() {
            c.data.category = self.category.clone();
        }
        macro_rules! set {
            ($($flag:ident => $($field:ident).+;)*) => {
                $(if let Some(v) = self.$flag.clone() { c.$($field).+ = v; })*
            };
        }
        set! {
            epochs => optim.epochs;
            lr => optim.lr;
            micro_batch => optim.micro_batch;
            grad_accum => optim.grad_accum;
            precision => optim.precision;
            moments => optim.moments;
            max_seq_len => data.max_seq_len;
            calib_samples => quant.calib_samples;
            device => run.device;
            output_dir => run.output_dir;
            seed => run.seed;
            checkpoint_every => run.checkpoint_every;
            keep_checkpoints => run.keep_checkpoints;
        }
        if self.max_steps.is_some() {
            c.run.max_steps = self.max_steps;
        }
        if self.no_quant {
            c.quant.enabled = false;
        }
        if self.no_thinking {
            c.data.no_thinking = true;
        }
        c.validate(std::path::Path::new("<command line>"))?;
        Ok(c)
    }
}

struct BarSink {
    bar: ProgressBar,
    json: bool,
    last: Mutex<Option<String>>,
}

impl TrainSink for BarSink {
    fn event(&self, event: &TrainEvent) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string(event).expect("events serialize")
            );
            return;
        }
        match event {
            TrainEvent::Started {
                total_steps,
                resumed_from,
                examples,
            } => {
                self.bar.set_length(*total_steps);
                self.bar.set_position(resumed_from.unwrap_or(0));
                self.bar.reset_eta();
                self.bar.println(format!(
                    "training on {examples} examples, {total_steps} steps"
                ));
            }
            TrainEvent::Calibrated { layers, samples } => self.bar.println(format!(
                "calibrated {layers} quantized linears on {samples} conversations"
            )),
            TrainEvent::TeacherLoaded { dir, sft_weight } => self.bar.println(format!(
                "QAD: distilling from {} (SFT weight {sft_weight})",
                dir.display()
            )),
            TrainEvent::Step {
                step,
                loss,
                lr,
                grad_norm,
                tokens_per_s,
                rss_bytes,
                epoch,
                ..
            } => {
                self.bar.set_position(*step);
                self.bar.set_message(format!(
                    "epoch {epoch} loss {loss:.4} lr {lr:.2e} gnorm {grad_norm:.3} {tokens_per_s:.0} tok/s mem {:.2} GiB",
                    *rss_bytes as f64 / (1u64 << 30) as f64
                ));
            }
            TrainEvent::Checkpoint { step, dir } => {
                *self.last.lock().expect("not poisoned") = Some(dir.display().to_string());
                self.bar
                    .println(format!("checkpoint step {step}: {}", dir.display()));
            }
            TrainEvent::Finished { steps } => self
                .bar
                .finish_with_message(format!("done after {steps} steps")),
            TrainEvent::Message(m) => self.bar.println(m),
        }
    }
}

/// Runs `qatflow train`.
pub fn train(a: TrainArgs) -> anyhow::Result<ExitCode> {
    let config = a.config()?;
    super::kernel_cache();
    let dataset = match (&config.data.jsonl, &config.data.store) {
        (Some(p), _) => Dataset::Jsonl(p.clone()),
        (None, Some(p)) => Dataset::Store {
            store: Arc::new(
                qatflow_store::Store::open(p)
                    .with_context(|| format!("opening dataset store {}", p.display()))?,
            ),
            filter: qatflow_store::Filter {
                category: config.data.category.clone(),
                clean_only: config.data.clean_only,
                flag: None,
            },
        },
        (None, None) => unreachable!("validate requires a data source"),
    };
    let cancel = CancellationToken::new();
    {
        let cancel = cancel.clone();
        ctrlc::set_handler(move || {
            eprintln!("\nqatflow: stopping after saving a checkpoint (Ctrl-C again to abort)");
            if cancel.is_cancelled() {
                std::process::exit(130);
            }
            cancel.cancel();
        })
        .context("installing the Ctrl-C handler")?;
    }
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  ETA {eta}  {msg}")
            .expect("valid template"),
    );
    let sink = BarSink {
        bar,
        json: a.json,
        last: Mutex::new(None),
    };
    let summary = qatflow_train::train(
        &config,
        dataset,
        RunOptions {
            resume: a.resume,
            follow: None,
        },
        &sink,
        &cancel,
    )?;
    sink.bar.finish_and_clear();
    let last = summary
        .last_checkpoint
        .as_ref()
        .map_or_else(|| "none".to_string(), |p| p.display().to_string());
    if summary.cancelled {
        eprintln!(
            "stopped at step {}; checkpoint {last}; continue with --resume",
            summary.steps
        );
        return Ok(ExitCode::from(130));
    }
    if !a.json {
        println!(
            "trained {} steps, final loss {}; checkpoint {last}; plots: qatflow report {}",
            summary.steps,
            summary
                .final_loss
                .map_or_else(|| "n/a".into(), |l| format!("{l:.4}")),
            summary.run_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `qatflow report`.
#[derive(ClapArgs)]
pub struct ReportArgs {
    /// A run directory (run.output_dir of `qatflow train`).
    run_dir: PathBuf,
}

/// Runs `qatflow report`.
pub fn report(a: ReportArgs) -> anyhow::Result<ExitCode> {
    let r = qatflow_train::report::report(&a.run_dir)?;
    println!("{}", r.summary());
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `qatflow bench-train`.
#[derive(ClapArgs)]
pub struct BenchTrainArgs {
    /// Named model configuration (random init): the shapes of real models (qwen3-8b,
    /// qwen3.5-9b, …) and tiny ones for tests (`qatflow model init --help` describes them).
    #[arg(
        long,
        default_value = "smollm2-135m",
        value_parser = clap::builder::PossibleValuesParser::new(qatflow_model::init::NAMED_CONFIGS)
    )]
    model: String,
    /// Tokens per sequence (batch 1).
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// fp32 | bf16-kahan | bf16-stochastic | bf16-plain.
    #[arg(long, default_value = "fp32", value_parser = parse_precision)]
    precision: OptimPrecision,
    /// fp32 | bf16: how Adam's moments are stored.
    #[arg(long, default_value = "fp32", value_parser = parse_moments)]
    moments: MomentPrecision,
    /// cpu | cuda | cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Recompute activations in backward (GPU only; default on).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    gradient_checkpointing: bool,
    /// Write the JSON report here as well as to stdout.
    #[arg(long, value_name = "FILE.json")]
    out: Option<PathBuf>,
    /// What to run: `both` (plain, then QAT, in one process), `plain` or `qat` (one
    /// process each gives each its own peak-memory figure).
    #[arg(long, default_value = "both", value_parser = ["both", "plain", "qat"])]
    mode: String,
    /// Learning rate of every step (a larger one makes the per-step losses of two runs,
    /// e.g. `QATFLOW_GEMM=cublaslt` against `QATFLOW_GEMM=burn`, move enough to compare).
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    /// Micro-batches a step (gradient accumulation; each the same sequence).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    micro_batches: u64,
    /// Fake-quantize each weight once a step and reuse it in every micro-batch and
    /// recompute (`optim.cache_fake_quant`; costs 2 bytes a quantized parameter).
    #[arg(long)]
    fake_quant_cache: bool,
    /// Clip the global gradient norm to this (`optim.grad_clip`; 0 disables).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Update each block's parameters during backward (`optim.update_during_backward`):
    /// the whole model's gradients never exist at once. Needs `--micro-batches 1` and
    /// `--grad-clip 0`.
    #[arg(long)]
    update_during_backward: bool,
}

fn bench_one(a: &BenchTrainArgs, quant: bool) -> anyhow::Result<BenchReport> {
    let options = BenchOptions {
        config: a.model.clone(),
        seq_len: a.seq_len,
        steps: a.steps,
        warmup: a.warmup,
        precision: a.precision,
        moments: a.moments,
        quant,
        lr: a.lr,
        micro_batches: a.micro_batches as usize,
        cache_fake_quant: a.fake_quant_cache,
        grad_clip: a.grad_clip,
        update_during_backward: a.update_during_backward,
    };
    if a.update_during_backward && (a.micro_batches != 1 || a.grad_clip != 0.0) {
        anyhow::bail!(
            "--update-during-backward updates each block before the next block's gradients \
             exist: it needs --micro-batches 1 and --grad-clip 0 (got --micro-batches {} \
             --grad-clip {})",
            a.micro_batches,
            a.grad_clip
        );
    }
    if !(a.grad_clip.is_finite() && a.grad_clip >= 0.0) {
        anyhow::bail!(
            "--grad-clip must be >= 0 (0 disables clipping), got {}",
            a.grad_clip
        );
    }
    let spec = qatflow_train::config::parse_device(&a.device).map_err(anyhow::Error::msg)?;
    struct Bench<'a>(&'a BenchOptions);
    impl TrainingWork for Bench<'_> {
        type Output = Result<BenchReport, qatflow_train::TrainError>;
        fn run<B: AutodiffBackend>(self, device: &B::Device, name: &str) -> Self::Output {
            bench_train_on::<B>(self.0, device, name)
        }
    }
    Ok(on_training_backend(
        spec,
        a.gradient_checkpointing,
        Bench(&options),
    )?)
}

/// Runs `qatflow bench-train`: plain fine-tuning and QAT side by side in one process (or
/// one of them, `--mode`).
pub fn bench_train(a: BenchTrainArgs) -> anyhow::Result<ExitCode> {
    super::kernel_cache();
    let plain = (a.mode != "qat")
        .then(|| bench_one(&a, false))
        .transpose()?;
    let qat = (a.mode != "plain")
        .then(|| bench_one(&a, true))
        .transpose()?;
    let ratio = match (&plain, &qat) {
        (Some(p), Some(q)) => Some(q.median_step_s / p.median_step_s),
        _ => None,
    };
    let out = serde_json::json!({
        "plain": plain,
        "qat": qat,
        "qat_over_plain_step_time": ratio,
        "gradient_checkpointing": a.gradient_checkpointing,
    });
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    if let Some(p) = &a.out {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
