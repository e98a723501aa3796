//! `qatflow bench`: the behaviour suite against an OpenAI-compatible endpoint or a model
//! directory served by `qatflow serve`, and `--compare` of saved reports side by side.

use crate::progress::Bar;
use anyhow::{bail, Context};
use qatflow_bench::server::LocalServer;
use qatflow_bench::{compare_table, Client, Report, RunOptions, Setup, Suite};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Arguments of `qatflow bench`.
#[derive(clap::Args)]
pub struct Args {
    /// A model directory to serve with `qatflow serve MODEL_DIR --port 0` for the run
    /// (instead of --endpoint).
    #[arg(value_name = "MODEL_DIR", conflicts_with_all = ["endpoint", "compare"])]
    pub model_dir: Option<PathBuf>,
    /// An OpenAI-compatible server (`http://127.0.0.1:8000`, with or without `/v1`).
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// The model name to request (default: the first one the server lists).
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// Environment variable holding the endpoint's API key (sent as a bearer token).
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
    /// Suite directory (suite.toml and category files; default: config/bench or built-in).
    #[arg(long, value_name = "DIR")]
    pub suite: Option<PathBuf>,
    /// Only these categories (repeat or separate with commas).
    #[arg(long, value_delimiter = ',')]
    pub category: Vec<String>,
    /// Directory with the production system prompt and tools (default: config/teacher or
    /// built-in).
    #[arg(long, value_name = "DIR")]
    pub teacher_dir: Option<PathBuf>,
    /// Cap every request's max_tokens at N (the suite asks for 256; a smaller cap makes a
    /// slow CPU run shorter, and replies cut at the cap may fail length checks).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: Option<u32>,
    /// Measured repetitions of each prompt.
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// Unmeasured warm-up requests first.
    #[arg(long, default_value_t = 1)]
    pub warmup: u32,
    /// The run's name in comparisons (default: the model name).
    #[arg(long)]
    pub label: Option<String>,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Print the JSON report instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Seconds a response may go without a chunk before it counts as failed.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout: u64,
    /// Seconds a model directory's server may take to print its address.
    #[arg(long, default_value_t = 600)]
    pub serve_timeout: u64,
    /// Extra arguments for `qatflow serve` (repeat; e.g. --serve-arg=--weight-only).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub serve_arg: Vec<String>,
    /// Print saved reports side by side instead of running (e.g. bf16.json ptq.json
    /// qat.json).
    #[arg(long, num_args = 1.., value_name = "REPORT", conflicts_with = "endpoint")]
    pub compare: Vec<PathBuf>,
}

/// Runs `qatflow bench`: exit 0 when every gate passes, 1 when one fails.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if !a.compare.is_empty() {
        let reports = a
            .compare
            .iter()
            .map(|p| Report::load(p))
            .collect::<Result<Vec<_>, _>>()?;
        print!("{}", compare_table(&reports));
        return Ok(ExitCode::SUCCESS);
    }
    if a.endpoint.is_none() && a.model_dir.is_none() {
        bail!("nothing to benchmark: give a MODEL_DIR, --endpoint URL (with --model NAME), or --compare A.json B.json");
    }
    let mut suite = Suite::resolve(a.suite.as_deref())?.only(&a.category)?;
    if let Some(cap) = a.max_tokens {
        suite = suite.cap_max_tokens(cap);
    }
    let setup = Setup::resolve(&suite, a.teacher_dir.as_deref())?;
    let api_key = match &a.api_key_env {
        Some(var) => Some(std::env::var(var).with_context(|| {
            format!(
                "--api-key-env {var}: the variable is not set; export it or leave the option out"
            )
        })?),
        None => None,
    };
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    ctrlc::set_handler(move || on_signal.cancel()).context("cannot install the Ctrl-C handler")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(async {
        let server = match &a.model_dir {
            Some(dir) => {
                if !dir.is_dir() {
                    bail!("{}: not a model directory", dir.display());
                }
                let program = std::env::current_exe()
                    .context("cannot find the qatflow executable to run `qatflow serve`")?;
                let mut args = vec![
                    "serve".to_string(),
                    dir.display().to_string(),
                    "--port".into(),
                    "0".into(),
                ];
                args.extend(a.serve_arg.iter().cloned());
                eprintln!("starting qatflow serve {}", dir.display());
                Some(
                    LocalServer::start(&program, &args, Duration::from_secs(a.serve_timeout))
                        .await?,
                )
            }
            None => None,
        };
        let url = match (&server, &a.endpoint) {
            (Some(s), _) => s.url.clone(),
            (None, Some(e)) => e.clone(),
            (None, None) => unreachable!("checked above"),
        };
        let client = Client::new(&url, api_key)?;
        let model = match &a.model {
            Some(m) => m.clone(),
            None => client
                .models(Duration::from_secs(30))
                .await?
                .into_iter()
                .next()
                .with_context(|| format!("{url}/v1/models lists no model; pass --model NAME"))?,
        };
        let mut opts = RunOptions::new(a.label.as_deref().unwrap_or(&model), &model);
        opts.runs = a.runs;
        opts.warmup = a.warmup;
        opts.idle_timeout = Duration::from_secs(a.idle_timeout.max(1));
        let bar = Bar::items("bench", "requests");
        let result = qatflow_bench::run(&client, &suite, &setup, &opts, &bar, &cancel).await;
        bar.finish();
        if let Some(s) = server {
            s.stop(Duration::from_secs(10)).await;
        }
        Ok::<_, anyhow::Error>(result?)
    })?;
    if let Some(out) = &a.out {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(out, text + "\n")
            .with_context(|| format!("{}: cannot write the report", out.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
