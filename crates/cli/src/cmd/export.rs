//! `qatflow export`, `qatflow quantize` and `qatflow bench-export`: NVFP4 exports in
//! ModelOpt's format from QAT checkpoints or (PTQ) Hugging Face models, and the exporter's
//! benchmark.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use qatflow_export::bench::{
    parameter_shapes, qwen3_0_6b_config, qwen3_1_7b_config, write_random_checkpoint,
};
use qatflow_export::{
    export_checkpoint, export_verified, latest_valid_checkpoint, quantize_hf_on,
    read_conversations, read_token_ids, CancellationToken, ExportError, ExportOptions,
    ExportReport, VlWrapper, PAUSE_ENV,
};

use crate::progress::Bar;
use qatflow_core::Device;

/// `--vl-wrapper`: whether a Qwen3.5 export gets vLLM's VL config wrapper.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum VlWrapperArg {
    /// Wrap when the source config's model_type is qwen3_5_text.
    #[default]
    Auto,
    /// Always wrap (an error for other model types).
    On,
    /// Never wrap: config.json exactly as ModelOpt writes it.
    Off,
}

impl From<VlWrapperArg> for VlWrapper {
    fn from(a: VlWrapperArg) -> Self {
        match a {
            VlWrapperArg::Auto => VlWrapper::Auto,
            VlWrapperArg::On => VlWrapper::On,
            VlWrapperArg::Off => VlWrapper::Off,
        }
    }
}

/// How `CHECKPOINT_DIR` is chosen.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum CheckpointPick {
    /// CHECKPOINT_DIR is a run directory: export its newest checkpoint that verifies.
    LatestValid,
}

/// Arguments of `qatflow export`.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// A checkpoint directory (`RUN_DIR/checkpoints/step-NNNNNNNN`), or a run directory
    /// with `--checkpoint latest-valid`.
    pub checkpoint_dir: PathBuf,
    /// Output directory (written as `.DIR.tmp-<pid>` next to it, renamed when complete).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output directory.
    #[arg(long)]
    pub force: bool,
    /// `latest-valid`: pick the newest checkpoint of the run that verifies.
    #[arg(long, value_enum)]
    pub checkpoint: Option<CheckpointPick>,
    /// Largest weight shard in bytes; above it the weights are split with
    /// model.safetensors.index.json (save_pretrained's 5 GB by default).
    #[arg(long, default_value_t = qatflow_export::writer::DEFAULT_MAX_SHARD_BYTES)]
    pub max_shard_bytes: u64,
    /// Print export_report.json to stdout instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Qwen3.5 (model_type qwen3_5_text): write config.json as the VL wrapper vLLM serves
    /// (model_type qwen3_5, Qwen3_5ForConditionalGeneration, the text config nested) and a
    /// preprocessor_config.json stub.
    #[arg(long, value_enum, default_value = "auto")]
    pub vl_wrapper: VlWrapperArg,
    /// Threads that quantize and copy tensors (0: every core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Arguments of `qatflow quantize`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("calibration").required(true).args(["calib", "calib_token_ids"])))]
pub struct QuantizeArgs {
    /// A Hugging Face model directory (config.json, safetensors, tokenizer for --calib).
    pub hf_dir: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Calibration conversations (OpenAI chat JSONL), rendered with the model's chat template.
    #[arg(long, value_name = "FILE.jsonl")]
    pub calib: Option<PathBuf>,
    /// Calibration token ids: a JSON array of token-id arrays (for models without tokenizer).
    #[arg(long, value_name = "FILE.json")]
    pub calib_token_ids: Option<PathBuf>,
    /// Use at most this many calibration samples (ModelOpt's default calibration size).
    #[arg(long, default_value_t = 512)]
    pub calib_samples: usize,
    /// Replace an existing output directory.
    #[arg(long)]
    pub force: bool,
    /// Print export_report.json to stdout instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Qwen3.5 (model_type qwen3_5_text): write the VL config wrapper and
    /// preprocessor_config.json stub vLLM needs (see `qatflow export --help`).
    #[arg(long, value_enum, default_value = "auto")]
    pub vl_wrapper: VlWrapperArg,
    /// Where calibration runs (f32 forward passes): cpu, cuda or cuda:N. The export after
    /// it runs on the CPU either way.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

/// Model configurations `bench-export` knows.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum BenchConfig {
    /// Qwen3-1.7B (28 layers, hidden 2048, vocabulary 151936, tied embeddings).
    #[value(name = "qwen3-1.7b")]
    Qwen3_1_7b,
    /// Qwen3-0.6B (28 layers, hidden 1024, vocabulary 151936, tied embeddings).
    #[value(name = "qwen3-0.6b")]
    Qwen3_0_6b,
}

/// Arguments of `qatflow bench-export`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// The model configuration of the random-init checkpoint.
    #[arg(long, value_enum, default_value = "qwen3-1.7b")]
    pub config: BenchConfig,
    /// Export runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Directory for the temporary checkpoint and export (about 4 GB for Qwen3-1.7B;
    /// removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also write the JSON result to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Threads of each export (0: every core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// A token that Ctrl-C cancels; a second Ctrl-C exits at once (status 130).
fn ctrl_c_token() -> anyhow::Result<CancellationToken> {
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    ctrlc::set_handler(move || {
        if on_signal.is_cancelled() {
            std::process::exit(130);
        }
        eprintln!("\nqatflow: cancelling; the partial output is removed (Ctrl-C again to abort)");
        on_signal.cancel();
    })
    .context("installing the Ctrl-C handler")?;
    Ok(cancel)
}

/// What a cancelled export returns: exit status 130, as for SIGINT.
fn finish(
    report: Result<ExportReport, ExportError>,
    out: &Path,
    json: bool,
) -> anyhow::Result<ExitCode> {
    match report {
        Err(ExportError::Cancelled) => {
            eprintln!("qatflow: cancelled; {} was not written", out.display());
            Ok(ExitCode::from(130))
        }
        other => summarize(&other?, out, json),
    }
}

fn options(force: bool, max_shard_bytes: u64) -> anyhow::Result<ExportOptions> {
    let pause_after_tensors = match std::env::var(PAUSE_ENV) {
        Ok(v) => Some(
            v.parse()
                .with_context(|| format!("{PAUSE_ENV}={v:?} is not a number of tensors"))?,
        ),
        Err(_) => None,
    };
    Ok(ExportOptions {
        force,
        max_shard_bytes,
        pause_after_tensors,
        ..ExportOptions::default()
    })
}

fn summarize(report: &ExportReport, out: &Path, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let t = &report.totals;
    let step = report
        .source
        .step
        .map_or_else(String::new, |s| format!(" (step {s})"));
    println!(
        "exported {}{step} → {}: {} tensors, {} NVFP4 linears (mean rel. error {:.4}, max {:.4}), {:.1} MB of weights in {:.1} s",
        report.source.dir.display(),
        out.display(),
        t.tensors,
        t.quantized_linears,
        t.mean_rel_error_quantized,
        t.max_rel_error_quantized,
        t.weight_bytes as f64 / 1e6,
        t.seconds,
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `qatflow export`.
pub fn export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    if !a.checkpoint_dir.exists() {
        bail!(
            "{}: does not exist; pass a checkpoint directory (RUN_DIR/checkpoints/step-N) or a run directory with --checkpoint latest-valid",
            a.checkpoint_dir.display()
        );
    }
    if a.checkpoint.is_none()
        && !a.checkpoint_dir.join("manifest.json").exists()
        && a.checkpoint_dir.join("checkpoints").is_dir()
    {
        bail!(
            "{}: a run directory, not a checkpoint; add --checkpoint latest-valid to export its newest valid checkpoint, or pass one checkpoint directory ({}/checkpoints/step-N)",
            a.checkpoint_dir.display(),
            a.checkpoint_dir.display()
        );
    }
    let opts = ExportOptions {
        vl_wrapper: a.vl_wrapper.into(),
        threads: a.threads,
        ..options(a.force, a.max_shard_bytes)?
    };
    let cancel = ctrl_c_token()?;
    let bar = Bar::bytes("exporting");
    let _span = tracing::info_span!("export", source = %a.checkpoint_dir.display()).entered();
    let report = match a.checkpoint {
        Some(CheckpointPick::LatestValid) => {
            let info = latest_valid_checkpoint(&a.checkpoint_dir)?;
            tracing::info!(step = info.step, dir = %info.dir.display(), "exporting the newest valid checkpoint");
            export_verified(&info, &a.out, &opts, &bar, &cancel)
        }
        None => export_checkpoint(&a.checkpoint_dir, &a.out, &opts, &bar, &cancel),
    };
    bar.finish();
    finish(report, &a.out, a.json)
}

/// Runs `qatflow quantize`.
pub fn quantize(a: QuantizeArgs) -> anyhow::Result<ExitCode> {
    if a.calib_samples == 0 {
        bail!("--calib-samples must be at least 1");
    }
    let calib = match (&a.calib, &a.calib_token_ids) {
        (Some(path), _) => read_conversations(&a.hf_dir, path, a.calib_samples)?,
        (None, Some(path)) => read_token_ids(path, a.calib_samples)?,
        (None, None) => bail!("give --calib FILE.jsonl or --calib-token-ids FILE.json"),
    };
    let opts = ExportOptions {
        vl_wrapper: a.vl_wrapper.into(),
        ..options(a.force, qatflow_export::writer::DEFAULT_MAX_SHARD_BYTES)?
    };
    let cancel = ctrl_c_token()?;
    let calib_bar = Bar::items("calibrating", "sequences");
    let export_bar = Bar::bytes("exporting");
    let _span = tracing::info_span!("quantize", source = %a.hf_dir.display()).entered();
    let started = Instant::now();
    let report = on_inference_backend!(
        a.device,
        quantize_on(
            &a.hf_dir,
            &calib,
            &a.out,
            &opts,
            &calib_bar,
            &export_bar,
            &cancel
        )
    );
    calib_bar.finish();
    export_bar.finish();
    if let Ok(r) = &report {
        if let Some(t) = r.source.calib_timing {
            eprintln!(
                "quantize: {:.2} s in all: loading {:.2} s, calibration {:.2} s over {} sequences, export {:.2} s",
                started.elapsed().as_secs_f64(),
                t.load_seconds,
                t.calibrate_seconds,
                calib.len(),
                r.totals.seconds
            );
        }
    }
    finish(report, &a.out, a.json)
}

/// [`quantize_hf_on`] on backend `B` with the device last and by value (the shape
/// `on_inference_backend!` calls).
#[allow(clippy::too_many_arguments)]
fn quantize_on<B: burn::tensor::backend::Backend>(
    hf_dir: &Path,
    calib: &[Vec<u32>],
    out: &Path,
    opts: &ExportOptions,
    calib_bar: &Bar,
    export_bar: &Bar,
    cancel: &CancellationToken,
    device: B::Device,
) -> Result<ExportReport, ExportError> {
    quantize_hf_on::<B>(
        hf_dir, calib, out, opts, calib_bar, export_bar, cancel, &device,
    )
}

/// Largest resident set of any waited-for child process, in KiB (`getrusage`).
fn children_max_rss_kib() -> u64 {
    // SAFETY: getrusage only writes into the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    if rc == 0 {
        usage.ru_maxrss.max(0) as u64
    } else {
        0
    }
}

/// Runs `qatflow bench-export`: writes a random-init checkpoint, exports it `--runs` times
/// in child processes (`qatflow export`), and prints wall times and peak memory as JSON.
pub fn bench(a: BenchArgs) -> anyhow::Result<ExitCode> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let (name, config) = match a.config {
        BenchConfig::Qwen3_1_7b => ("qwen3-1.7b", qwen3_1_7b_config()),
        BenchConfig::Qwen3_0_6b => ("qwen3-0.6b", qwen3_0_6b_config()),
    };
    let parameters: usize = parameter_shapes(&config)?
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let tmp = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            tempfile::tempdir_in(d)
        }
        None => tempfile::tempdir(),
    }
    .context("creating the benchmark's temporary directory")?;
    let run = tmp.path().join("run");
    eprintln!("writing a random-init {name} checkpoint ({parameters} parameters)...");
    let t0 = Instant::now();
    let info = write_random_checkpoint(&run, &config, 1, 0x5EED)?;
    let write_s = t0.elapsed().as_secs_f64();
    let checkpoint_bytes: u64 = info.files.iter().map(|f| f.size).sum();
    let exe = std::env::current_exe().context("locating the qatflow binary")?;
    let out = tmp.path().join("export");
    let mut times = Vec::new();
    for i in 0..a.runs {
        eprintln!("export run {}/{}...", i + 1, a.runs);
        let t = Instant::now();
        let status = std::process::Command::new(&exe)
            .arg("export")
            .arg(&info.dir)
            .arg("--out")
            .arg(&out)
            .arg("--force")
            .arg("--threads")
            .arg(a.threads.to_string())
            .env_remove(PAUSE_ENV)
            .stdout(std::process::Stdio::null())
            .status()
            .context("running qatflow export")?;
        times.push(t.elapsed().as_secs_f64());
        if !status.success() {
            bail!("qatflow export failed ({status})");
        }
    }
    let report: ExportReport = serde_json::from_slice(
        &std::fs::read(out.join("export_report.json")).context("reading export_report.json")?,
    )?;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let result = serde_json::json!({
        "config": name,
        "parameters": parameters,
        "checkpoint_bytes": checkpoint_bytes,
        "checkpoint_write_s": write_s,
        "export_weight_bytes": report.totals.weight_bytes,
        "quantized_linears": report.totals.quantized_linears,
        "runs_s": times,
        "median_s": sorted[sorted.len() / 2],
        "peak_rss_mib": children_max_rss_kib() as f64 / 1024.0,
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "threads": a.threads,
        "note": "wall time of a whole `qatflow export` process: checkpoint verification (sha256 of every file, on its own thread while the export runs), quantization, writing, fsync, read-back and rename; threads 0 = every core",
    });
    let text = serde_json::to_string_pretty(&result)?;
    println!("{text}");
    if let Some(path) = &a.out {
        std::fs::write(path, format!("{text}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
