//! `qatflow generate`: teacher-written conversations, checked on arrival and stored.

use crate::cmd::dataset::DbArg;
use crate::cmd::validate::load_profile;
use anyhow::{bail, Context};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use qatflow_store::Store;
use qatflow_teacher::{
    run_generation, AnthropicConfig, BackendConfig, CancellationToken, ClaudeCliConfig,
    GenerateOptions, GenerationEvent, OfflineConfig, OpenAiConfig, TeacherConfig,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Which teacher writes the conversations.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum BackendKind {
    /// The Claude Code CLI (`claude -p`), prompt on stdin, from a fresh temporary directory.
    ClaudeCli,
    /// Any OpenAI-compatible /v1/chat/completions endpoint.
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
    /// A deterministic template generator: no network, for demos and tests.
    Offline,
}

/// Arguments of `qatflow generate`.
#[derive(clap::Args)]
pub struct Args {
    /// Teacher backend.
    #[arg(long, value_enum, default_value = "claude-cli")]
    pub backend: BackendKind,
    /// Teacher model (claude-cli: --model of the CLI; openai/anthropic: the model name).
    #[arg(long)]
    pub model: Option<String>,
    /// The full claude-cli command line, replacing the default
    /// `claude -p --model opus --output-format text --permission-mode default --append-system-prompt ...`.
    #[arg(long, value_name = "COMMAND")]
    pub teacher_command: Option<String>,
    /// Base URL of the HTTP backend (openai: up to and including /v1).
    #[arg(long)]
    pub base_url: Option<String>,
    /// Environment variable that holds the API key (openai: OPENAI_API_KEY, anthropic: ANTHROPIC_API_KEY).
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
    /// Sampling temperature of the HTTP backends.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Completion token limit of the HTTP backends.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Seed of the offline backend.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Simulated latency per batch of the offline backend, in milliseconds.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub offline_delay_ms: u64,
    /// Directory with categories.toml, tools.toml, generation.toml and system_prompt.txt
    /// (default: config/teacher, else the built-in copy).
    #[arg(long, value_name = "DIR")]
    pub teacher_dir: Option<PathBuf>,
    /// Gate profile every conversation is checked against.
    #[arg(long, default_value = "v4")]
    pub profile: String,
    /// Only this category.
    #[arg(long)]
    pub category: Option<String>,
    /// Conversations per category, instead of each category's count.
    #[arg(long)]
    pub count: Option<u64>,
    /// Conversations asked for per batch.
    #[arg(long, default_value_t = 25)]
    pub per_batch: usize,
    /// Batches in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Retries per batch (empty output, planning-mode text, HTTP 429/5xx, timeouts).
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// Limit of one teacher call, in seconds.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub timeout: u64,
    /// Stop starting batches once the reported cost reaches this many US dollars.
    #[arg(long, value_name = "USD")]
    pub max_cost_usd: Option<f64>,
    /// Continue an interrupted run: generate exactly the batches the ledger lacks.
    #[arg(long)]
    pub resume: bool,
    /// Validate what is stored against the profile; generate nothing.
    #[arg(long)]
    pub validate_only: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub db: DbArg,
}

fn backend(a: &Args) -> anyhow::Result<BackendConfig> {
    Ok(match a.backend {
        BackendKind::ClaudeCli => {
            let mut c = match &a.teacher_command {
                Some(cmd) => ClaudeCliConfig::from_command_line(cmd)
                    .map_err(|e| anyhow::anyhow!("--teacher-command: {e}"))?,
                None => ClaudeCliConfig::default(),
            };
            if let (Some(model), None) = (&a.model, &a.teacher_command) {
                c = ClaudeCliConfig::with_model(model);
            }
            BackendConfig::ClaudeCli(c)
        }
        BackendKind::Openai => {
            let mut c = OpenAiConfig::default();
            if let Some(v) = &a.base_url {
                c.base_url = v.clone();
            }
            if let Some(v) = &a.model {
                c.model = v.clone();
            }
            if let Some(v) = &a.api_key_env {
                c.api_key_env = Some(v.clone()).filter(|s| !s.is_empty());
            }
            if let Some(v) = a.temperature {
                c.temperature = v;
            }
            if let Some(v) = a.max_tokens {
                c.max_tokens = v;
            }
            BackendConfig::OpenAi(c)
        }
        BackendKind::Anthropic => {
            let mut c = AnthropicConfig::default();
            if let Some(v) = &a.base_url {
                c.base_url = v.clone();
            }
            if let Some(v) = &a.model {
                c.model = v.clone();
            }
            if let Some(v) = &a.api_key_env {
                c.api_key_env = v.clone();
            }
            if let Some(v) = a.temperature {
                c.temperature = v;
            }
            if let Some(v) = a.max_tokens {
                c.max_tokens = v;
            }
            BackendConfig::Anthropic(c)
        }
        BackendKind::Offline => BackendConfig::Offline(OfflineConfig {
            seed: a.seed,
            delay: Duration::from_millis(a.offline_delay_ms),
        }),
    })
}

/// Per-category progress bars fed by generation events.
struct CategoryBars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, (ProgressBar, u64, u64)>>,
    targets: HashMap<String, u64>,
}

impl CategoryBars {
    fn on_event(&self, e: &GenerationEvent) {
        match e {
            GenerationEvent::BatchStored {
                category, entry, ..
            } => {
                let mut bars = self.bars.lock().expect("progress lock");
                let (bar, accepted, rejected) = bars.entry(category.clone()).or_insert_with(|| {
                    let bar = self.multi.add(ProgressBar::new(
                        self.targets.get(category).copied().unwrap_or(0),
                    ));
                    bar.set_style(
                        ProgressStyle::with_template("{prefix:<24} [{bar:25}] {pos}/{len} {msg}")
                            .expect("valid template")
                            .progress_chars("=> "),
                    );
                    bar.set_prefix(category.clone());
                    (bar, 0, 0)
                });
                *accepted += entry.accepted;
                *rejected += entry.rejected;
                bar.inc(entry.accepted + entry.rejected + entry.duplicates);
                bar.set_message(format!("{accepted} accepted, {rejected} rejected"));
            }
            GenerationEvent::Retry(r) => {
                let _ = self.multi.println(format!("retry: {r:?}"));
            }
            GenerationEvent::BatchFailed(f) => {
                let _ = self.multi.println(format!("batch failed: {f:?}"));
            }
            GenerationEvent::Recovered { category, index } => {
                let _ = self.multi.println(format!(
                    "recovered batch {category}/{index} from an interrupted run"
                ));
            }
        }
    }
}

/// Runs the command.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if a.per_batch == 0 || a.concurrency == 0 {
        bail!("--per-batch and --concurrency must be at least 1");
    }
    let profile = load_profile(&a.profile, None)?;
    let teacher = TeacherConfig::resolve(a.teacher_dir.as_deref())?;
    let targets: HashMap<String, u64> = teacher
        .category_names()
        .into_iter()
        .filter_map(|n| teacher.category(n).ok())
        .map(|c| (c.name.clone(), a.count.unwrap_or(c.count)))
        .collect();
    let store = Store::open(&a.db.db)?;
    let bars = Arc::new(CategoryBars {
        multi: MultiProgress::new(),
        bars: Mutex::new(HashMap::new()),
        targets,
    });
    let mut opts = GenerateOptions::new(backend(&a)?, profile);
    opts.teacher_dir = a.teacher_dir.clone();
    opts.category = a.category.clone();
    opts.count = a.count;
    opts.per_batch = a.per_batch;
    opts.concurrency = a.concurrency;
    opts.max_retries = a.retries;
    opts.timeout = Duration::from_secs(a.timeout);
    opts.resume = a.resume;
    opts.validate_only = a.validate_only;
    opts.max_cost_usd = a.max_cost_usd;
    let sink = bars.clone();
    opts.events = Some(Arc::new(move |e: &GenerationEvent| sink.on_event(e)));

    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    ctrlc::set_handler(move || on_signal.cancel()).context("cannot install the Ctrl-C handler")?;

    let report = {
        let _span = tracing::info_span!("generate", backend = ?opts.backend).entered();
        run_generation(&opts, &store, &qatflow_core::NoProgress, &cancel)?
    };
    for (_, (bar, _, _)) in bars.bars.lock().expect("progress lock").drain() {
        bar.finish();
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    if report.cancelled {
        eprintln!(
            "cancelled: stored batches are kept; run again with --resume to generate the rest"
        );
    }
    Ok(if report.complete() && report.gates_passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
