//! A generation run: plan the missing batches, generate them concurrently with retries,
//! parse, inject the production prompt, check every conversation against the gate
//! profile, store accepted and rejected conversations with the batch ledger, and report.
//!
//! The CLI's `qatflow generate` maps its flags onto [`GenerateOptions`]:
//!
//! | flag | field |
//! |---|---|
//! | `--backend claude-cli\|openai\|anthropic\|offline` | [`GenerateOptions::backend`] (a [`BackendConfig`] variant) |
//! | `--model M` | `ClaudeCliConfig::with_model(M)`, `OpenAiConfig::model`, `AnthropicConfig::model` |
//! | `--teacher-command "..."` | `ClaudeCliConfig::from_command_line(..)` |
//! | `--base-url U`, `--api-key-env V`, `--temperature T`, `--max-tokens N` | the HTTP configs' fields |
//! | `--seed S`, `--offline-delay-ms D` | `OfflineConfig { seed, delay }` |
//! | `--teacher-dir DIR` | [`GenerateOptions::teacher_dir`] (default: `config/teacher`, else built in) |
//! | `--profile v4` | [`GenerateOptions::profile`] (`GateProfile::resolve`) |
//! | `--category C` | [`GenerateOptions::category`] |
//! | `--count N` | [`GenerateOptions::count`] |
//! | `--per-batch N` (25) | [`GenerateOptions::per_batch`] |
//! | `--concurrency N` (4) | [`GenerateOptions::concurrency`] |
//! | `--retries N` (3) | [`GenerateOptions::max_retries`] |
//! | `--max-cost-usd X` | [`GenerateOptions::max_cost_usd`] |
//! | `--timeout SECS` (600) | [`GenerateOptions::timeout`] |
//! | `--resume` | [`GenerateOptions::resume`] |
//! | `--validate-only` | [`GenerateOptions::validate_only`] |
//!
//! Ctrl-C maps onto the [`CancellationToken`]: batches in flight are abandoned (a child
//! process is killed), stored batches stay stored, and `--resume` generates the rest.

use crate::backend::{Backend, BackendConfig, BatchRequest, Usage};
use crate::config::{Category, TeacherConfig};
use crate::error::{BackendError, TeacherError};
use crate::ledger::{Ledger, LedgerEntry, PendingBatch, PendingItem, RawRejected};
use crate::parse::{parse_output, prepare, OutputProblem, ParsedOutput};
use qatflow_core::Progress;
use qatflow_gates::{Checker, DatasetStats, GateProfile, GateResult};
use qatflow_store::{Filter, Store};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
pub use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Receives [`GenerationEvent`]s as they happen.
pub type EventSink = Arc<dyn Fn(&GenerationEvent) + Send + Sync>;

/// Something that happened during a run, for actors and live displays.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum GenerationEvent {
    /// A batch cut off by a crash was finished from its write-ahead record.
    Recovered {
        /// Category.
        category: String,
        /// Batch index.
        index: u64,
    },
    /// A batch was stored and recorded in the ledger.
    BatchStored {
        /// Category.
        category: String,
        /// Batch index.
        index: u64,
        /// Its counts.
        entry: LedgerEntry,
    },
    /// An attempt failed and will be retried.
    Retry(RetryRecord),
    /// A batch failed after all its attempts.
    BatchFailed(FailedBatch),
}

/// Options of a run; see the module docs for the CLI flags.
#[derive(Clone)]
pub struct GenerateOptions {
    /// The teacher backend.
    pub backend: BackendConfig,
    /// Directory with categories.toml, tools.toml, generation.toml, system_prompt.txt.
    pub teacher_dir: Option<PathBuf>,
    /// The gate profile conversations are checked against.
    pub profile: GateProfile,
    /// Only this category.
    pub category: Option<String>,
    /// Conversations per category, instead of each category's `count`.
    pub count: Option<u64>,
    /// Scales the selected categories' counts (after `count`) so that they sum to at least
    /// this many conversations, keeping their mix (each count rounded up).
    pub total: Option<u64>,
    /// Conversations asked for per batch.
    pub per_batch: usize,
    /// Batches in flight at once.
    pub concurrency: usize,
    /// Retries per batch after the first attempt.
    pub max_retries: u32,
    /// Delay before the first retry; doubled for each further one, lengthened to a 429,
    /// 503 or 529 answer's `Retry-After`, and at most 300 s.
    pub backoff: Duration,
    /// Limit of one attempt (the child process is killed, the request dropped).
    pub timeout: Duration,
    /// Continue a run: generate only batches missing from the ledger.
    pub resume: bool,
    /// Only validate what is stored against the profile.
    pub validate_only: bool,
    /// Start no new batch once the reported cost reaches this many US dollars.
    pub max_cost_usd: Option<f64>,
    /// Make at most this many teacher requests (every attempt counts) in this run: an
    /// attempt past the cap is not made, its batch is left for a later `--resume`.
    pub max_requests: Option<u64>,
    /// Make no further request once the reported input + output tokens of this run reach
    /// this many (`--max-total-tokens`).
    pub max_tokens: Option<u64>,
    /// Live events, if wanted.
    pub events: Option<EventSink>,
}

impl std::fmt::Debug for GenerateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerateOptions")
            .field("backend", &self.backend)
            .field("teacher_dir", &self.teacher_dir)
            .field("profile", &self.profile.name)
            .field("category", &self.category)
            .field("count", &self.count)
            .field("total", &self.total)
            .field("per_batch", &self.per_batch)
            .field("concurrency", &self.concurrency)
            .field("max_retries", &self.max_retries)
            .field("backoff", &self.backoff)
            .field("timeout", &self.timeout)
            .field("resume", &self.resume)
            .field("validate_only", &self.validate_only)
            .field("max_cost_usd", &self.max_cost_usd)
            .field("max_requests", &self.max_requests)
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

impl GenerateOptions {
    /// The defaults of the seeds' v4 script: 25 per batch, 4 in flight, 3 retries from
    /// 3 s, 600 s per attempt.
    pub fn new(backend: BackendConfig, profile: GateProfile) -> GenerateOptions {
        GenerateOptions {
            backend,
            teacher_dir: None,
            profile,
            category: None,
            count: None,
            total: None,
            per_batch: 25,
            concurrency: 4,
            max_retries: 3,
            backoff: Duration::from_secs(3),
            timeout: Duration::from_secs(600),
            resume: false,
            validate_only: false,
            max_cost_usd: None,
            max_requests: None,
            max_tokens: None,
            events: None,
        }
    }
}

/// One failed attempt that was retried.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryRecord {
    /// Category.
    pub category: String,
    /// Batch index.
    pub index: u64,
    /// The failed attempt, 1-based.
    pub attempt: u32,
    /// Short kind: `empty`, `planning_mode`, `no_conversations`, `http_429`, `timeout`, …
    pub kind: String,
    /// What happened, ending in the wait the server asked for (`Retry-After`) if it did.
    pub reason: String,
}

/// A batch that failed after all attempts (generated again by `--resume`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailedBatch {
    /// Category.
    pub category: String,
    /// Batch index.
    pub index: u64,
    /// The last attempt's problem.
    pub reason: String,
}

/// Per-category results of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CategoryReport {
    /// Batches the category has in all.
    pub planned_batches: u64,
    /// Of those, finished before this run.
    pub already_done: u64,
    /// Batches stored by this run.
    pub batches: u64,
    /// Conversations stored without flags.
    pub accepted: u64,
    /// Conversations stored with flags (rejected).
    pub rejected: u64,
    /// Conversations already stored with the same content.
    pub duplicates: u64,
    /// Output lines that did not parse.
    pub unparsed_lines: u64,
    /// Conversations asked for but not in the answers (a teacher writing fewer lines).
    pub missing: u64,
    /// Retried attempts.
    pub retries: u64,
    /// Batches that failed after all attempts.
    pub failed_batches: u64,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationReport {
    /// Backend name.
    pub backend: String,
    /// True for `--validate-only`.
    pub validate_only: bool,
    /// Per category, by name.
    pub categories: BTreeMap<String, CategoryReport>,
    /// Tokens and cost the backend reported.
    pub usage: Usage,
    /// Every retried attempt.
    pub retries: Vec<RetryRecord>,
    /// Batches that failed after all attempts.
    pub failed_batches: Vec<FailedBatch>,
    /// Batches finished from write-ahead records of an interrupted run.
    pub recovered_batches: u64,
    /// True when the run was cancelled before every batch was done.
    pub cancelled: bool,
    /// True when the run stopped at a spend cap (`max_cost_usd`, `max_requests` or
    /// `max_tokens`).
    pub cost_cap_reached: bool,
    /// Which cap stopped the run, and at what spend (empty when none did).
    pub cap: String,
    /// What the store's ledger has recorded as spent over every run, this one included.
    pub total_usage: Usage,
    /// Wall time in seconds.
    pub elapsed_s: f64,
    /// Gate profile name.
    pub profile: String,
    /// Counts over every stored conversation (all categories, accepted and rejected).
    pub dataset: DatasetStats,
    /// The profile's dataset gates on those counts.
    pub gates: Vec<GateResult>,
}

impl GenerationReport {
    /// True when every dataset gate passed.
    pub fn gates_passed(&self) -> bool {
        self.gates.iter().all(|g| g.passed)
    }

    /// True when every planned batch is stored (nothing failed, nothing cancelled).
    pub fn complete(&self) -> bool {
        !self.cancelled && !self.cost_cap_reached && self.failed_batches.is_empty()
    }

    /// Total retried attempts.
    pub fn total_retries(&self) -> u64 {
        self.retries.len() as u64
    }

    /// A plain-text table of categories and gates, for the CLI.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if !self.validate_only {
            let _ = writeln!(
                s,
                "{:<24} {:>7} {:>8} {:>8} {:>5} {:>5} {:>7} {:>7} {:>6}",
                "category",
                "batches",
                "accepted",
                "rejected",
                "dups",
                "bad",
                "missing",
                "retries",
                "failed"
            );
            for (name, c) in &self.categories {
                let _ = writeln!(
                    s,
                    "{:<24} {:>3}/{:<3} {:>8} {:>8} {:>5} {:>5} {:>7} {:>7} {:>6}",
                    name,
                    c.already_done + c.batches,
                    c.planned_batches,
                    c.accepted,
                    c.rejected,
                    c.duplicates,
                    c.unparsed_lines,
                    c.missing,
                    c.retries,
                    c.failed_batches
                );
            }
            let cost = self
                .usage
                .cost_usd
                .map_or("n/a".to_string(), |c| format!("${c:.4}"));
            let _ = writeln!(
                s,
                "backend {}: {} requests, {} input tokens, {} output tokens, cost {}, {:.1} s{}",
                self.backend,
                self.usage.requests,
                self.usage.input_tokens,
                self.usage.output_tokens,
                cost,
                self.elapsed_s,
                if self.cancelled {
                    " (cancelled)".to_string()
                } else if self.cost_cap_reached {
                    format!(" (stopped: {})", self.cap)
                } else {
                    String::new()
                }
            );
            let _ = writeln!(
                s,
                "spent on this store so far: {} requests, {} input tokens, {} output tokens",
                self.total_usage.requests,
                self.total_usage.input_tokens,
                self.total_usage.output_tokens
            );
        }
        let _ = writeln!(
            s,
            "dataset gates ({}, {} stored conversations):",
            self.profile, self.dataset.lines
        );
        for g in &self.gates {
            let _ = writeln!(
                s,
                "  {:<26} {:>10} {} {:<10} {}",
                g.name,
                g.format_value(g.value),
                g.op.symbol(),
                g.format_value(g.threshold),
                if g.passed { "PASS" } else { "FAIL" }
            );
        }
        s
    }
}

/// Counts and gates over the stored conversations (one category, or all).
pub fn validate_store(
    store: &Store,
    profile: &GateProfile,
    category: Option<&str>,
) -> Result<(DatasetStats, Vec<GateResult>), TeacherError> {
    let checker = Checker::new(profile);
    let mut stats = DatasetStats::default();
    let filter = Filter {
        category: category.map(str::to_string),
        ..Filter::default()
    };
    for item in store.iter(&filter) {
        let stored = item?;
        let (_, report) = checker.check_line(&stored.record.conversation);
        stats.add(&report);
    }
    let gates = stats.evaluate(profile);
    Ok((stats, gates))
}

/// Runs [`generate`] on a new multi-threaded runtime. Call it from synchronous code (the
/// CLI); async callers (actors) call [`generate`] directly, since a runtime cannot be
/// started inside another.
pub fn run_generation(
    opts: &GenerateOptions,
    store: &Store,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<GenerationReport, TeacherError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(TeacherError::Runtime)?;
    runtime.block_on(generate(opts, store, progress, cancel))
}

struct BatchResult {
    category: String,
    index: u64,
    size: usize,
    attempts: u32,
    usage: Usage,
    retries: Vec<RetryRecord>,
    outcome: Outcome,
}

enum Outcome {
    Parsed(ParsedOutput),
    Failed(String),
    /// A spend cap forbade the next request (why); the batch is left for a resume.
    Capped(String),
    Fatal(BackendError),
    Cancelled,
}

fn retry_kind(e: &BackendError) -> String {
    match e {
        BackendError::Http { status, .. } => format!("http_{status}"),
        BackendError::Timeout(_) => "timeout".into(),
        BackendError::Transport(_) => "transport".into(),
        BackendError::BadResponse(_) => "bad_response".into(),
        BackendError::Process { .. } => "process".into(),
        BackendError::Fatal(_) => "fatal".into(),
    }
}

fn problem_kind(p: &OutputProblem) -> &'static str {
    match p {
        OutputProblem::Empty => "empty",
        OutputProblem::PlanningMode(_) => "planning_mode",
        OutputProblem::NoConversations => "no_conversations",
    }
}

/// The longest wait before a retry, whatever the backoff or the server asks for.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// The wait after failed attempt `attempt` (0-based): the backoff doubled per attempt, or
/// longer when the server asked for it (`Retry-After`), at most [`MAX_RETRY_DELAY`].
fn retry_delay(backoff: Duration, attempt: u32, asked: Option<Duration>) -> Duration {
    backoff
        .saturating_mul(1 << attempt.min(16))
        .max(asked.unwrap_or(Duration::ZERO))
        .min(MAX_RETRY_DELAY)
}

struct RetryPolicy {
    max_retries: u32,
    backoff: Duration,
    timeout: Duration,
}

/// A run's spend caps, shared by its batch tasks: requests are reserved before they are
/// made, so the request cap holds exactly however many batches are in flight.
#[derive(Debug, Default)]
struct Budget {
    max_requests: Option<u64>,
    max_tokens: Option<u64>,
    requests: AtomicU64,
    tokens: AtomicU64,
}

impl Budget {
    /// Reserves one request; the reason when a cap forbids it.
    fn reserve(&self) -> Result<(), String> {
        if let Some(max) = self.max_tokens {
            let spent = self.tokens.load(Ordering::SeqCst);
            if spent >= max {
                return Err(format!(
                    "token cap reached: {spent} of --max-total-tokens {max} tokens spent"
                ));
            }
        }
        if let Some(max) = self.max_requests {
            let n = self.requests.fetch_add(1, Ordering::SeqCst);
            if n >= max {
                self.requests.fetch_sub(1, Ordering::SeqCst);
                return Err(format!(
                    "request cap reached: {n} of --max-requests {max} requests made"
                ));
            }
        } else {
            self.requests.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Records the tokens an answer reported.
    fn spent(&self, usage: &Usage) {
        self.tokens
            .fetch_add(usage.input_tokens + usage.output_tokens, Ordering::SeqCst);
    }
}

async fn run_batch(
    backend: Arc<dyn Backend>,
    mut request: BatchRequest,
    policy: Arc<RetryPolicy>,
    budget: Arc<Budget>,
    markers: Arc<Vec<String>>,
    cancel: CancellationToken,
    events: Option<EventSink>,
) -> BatchResult {
    let mut result = BatchResult {
        category: request.category.clone(),
        index: request.index,
        size: request.size,
        attempts: 0,
        usage: Usage::default(),
        retries: Vec::new(),
        outcome: Outcome::Cancelled,
    };
    for attempt in 0..=policy.max_retries {
        if let Err(cap) = budget.reserve() {
            result.outcome = Outcome::Capped(cap);
            return result;
        }
        request.attempt = attempt;
        result.attempts = attempt + 1;
        let call = tokio::time::timeout(policy.timeout, backend.generate(&request));
        let answer = tokio::select! {
            _ = cancel.cancelled() => return result,
            a = call => a,
        };
        let mut asked = None;
        let (kind, reason) = match answer {
            Err(_) => {
                let e = BackendError::Timeout(policy.timeout);
                (retry_kind(&e), e.to_string())
            }
            Ok(Err(e)) if !e.is_retryable() => {
                result.outcome = Outcome::Fatal(e);
                return result;
            }
            Ok(Err(e)) => {
                asked = e.retry_after();
                let mut reason = e.to_string();
                if let Some(wait) = asked {
                    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                    let _ = write!(
                        reason,
                        "; the server asked to retry after {:?} (Retry-After)",
                        Duration::from_millis(ms)
                    );
                }
                (retry_kind(&e), reason)
            }
            Ok(Ok(out)) => {
                result.usage.add(&out.usage);
                budget.spent(&out.usage);
                match parse_output(&out.text, &markers) {
                    Ok(parsed) => {
                        result.outcome = Outcome::Parsed(parsed);
                        return result;
                    }
                    Err(p) => (problem_kind(&p).to_string(), p.to_string()),
                }
            }
        };
        if attempt == policy.max_retries {
            result.outcome = Outcome::Failed(format!(
                "{reason} (after {} attempts)",
                policy.max_retries + 1
            ));
            return result;
        }
        let delay = retry_delay(policy.backoff, attempt, asked);
        warn!(
            category = %request.category,
            batch = request.index,
            attempt = attempt + 1,
            kind = %kind,
            "teacher batch attempt failed: {reason}; retrying in {delay:?}"
        );
        let record = RetryRecord {
            category: request.category.clone(),
            index: request.index,
            attempt: attempt + 1,
            kind,
            reason,
        };
        if let Some(sink) = &events {
            sink(&GenerationEvent::Retry(record.clone()));
        }
        result.retries.push(record);
        tokio::select! {
            _ = cancel.cancelled() => return result,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    result
}

/// The categories a run of `opts` generates, with the counts it aims for (`category`,
/// `count` and `total` applied).
pub fn selected_categories(
    teacher: &TeacherConfig,
    opts: &GenerateOptions,
) -> Result<Vec<Category>, TeacherError> {
    let mut cats: Vec<Category> = match &opts.category {
        Some(name) => vec![teacher.category(name)?.clone()],
        None => teacher.categories.clone(),
    };
    if let Some(n) = opts.count {
        for c in &mut cats {
            c.count = n;
        }
    }
    if let Some(total) = opts.total {
        scale_counts(&mut cats, total);
    }
    Ok(cats)
}

/// Scales the counts of `cats` so they sum to at least `total`, keeping their mix: each
/// count becomes `⌈count × total / sum⌉`.
fn scale_counts(cats: &mut [Category], total: u64) {
    let sum: u64 = cats.iter().map(|c| c.count).sum();
    if sum == 0 {
        return;
    }
    for c in cats {
        c.count = (c.count as u128 * total as u128).div_ceil(sum as u128) as u64;
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TeacherError> + Send + 'static,
) -> Result<T, TeacherError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TeacherError::Task(format!("a store task failed: {e}")))?
}

/// Runs generation (or validation) as the module docs describe.
pub async fn generate(
    opts: &GenerateOptions,
    store: &Store,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<GenerationReport, TeacherError> {
    let started = Instant::now();
    if opts.per_batch == 0 || opts.concurrency == 0 {
        return Err(TeacherError::Options(
            "--per-batch and --concurrency must be at least 1".into(),
        ));
    }
    let teacher = TeacherConfig::resolve(opts.teacher_dir.as_deref())?;
    let categories = selected_categories(&teacher, opts)?;
    let mut report = GenerationReport {
        backend: opts.backend.name().to_string(),
        validate_only: opts.validate_only,
        categories: BTreeMap::new(),
        usage: Usage::default(),
        retries: Vec::new(),
        failed_batches: Vec::new(),
        recovered_batches: 0,
        cancelled: false,
        cost_cap_reached: false,
        cap: String::new(),
        total_usage: Usage::default(),
        elapsed_s: 0.0,
        profile: opts.profile.name.clone(),
        dataset: DatasetStats::default(),
        gates: Vec::new(),
    };
    if !opts.validate_only {
        generate_batches(
            opts,
            store,
            progress,
            cancel,
            &teacher,
            &categories,
            &mut report,
        )
        .await?;
    }
    let (s, p) = (store.clone(), opts.profile.clone());
    let only = if opts.validate_only {
        opts.category.clone()
    } else {
        None
    };
    let (dataset, gates) = blocking(move || validate_store(&s, &p, only.as_deref())).await?;
    report.dataset = dataset;
    report.gates = gates;
    report.elapsed_s = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn generate_batches(
    opts: &GenerateOptions,
    store: &Store,
    progress: &dyn Progress,
    cancel: &CancellationToken,
    teacher: &TeacherConfig,
    categories: &[Category],
    report: &mut GenerationReport,
) -> Result<(), TeacherError> {
    let ledger = Ledger::open(store)?;
    let (l, s) = (ledger.clone(), store.clone());
    let recovered = blocking(move || l.recover(&s)).await?;
    for (category, index) in &recovered {
        info!(category = %category, batch = index, "finished a batch cut off by an earlier run");
        if let Some(sink) = &opts.events {
            sink(&GenerationEvent::Recovered {
                category: category.clone(),
                index: *index,
            });
        }
    }
    report.recovered_batches = recovered.len() as u64;

    let jobs = plan_batches(opts, teacher, categories, &ledger, report)?;
    progress.set_total(jobs.iter().map(|j| j.size as u64).sum());
    if jobs.is_empty() {
        return Ok(());
    }
    let backend = opts.backend.build(teacher, opts.timeout)?;
    let backend_name = backend.name().to_string();
    let policy = Arc::new(RetryPolicy {
        max_retries: opts.max_retries,
        backoff: opts.backoff,
        timeout: opts.timeout,
    });
    let markers = Arc::new(teacher.generation.planning_markers.clone());
    let budget = Arc::new(Budget {
        max_requests: opts.max_requests,
        max_tokens: opts.max_tokens,
        ..Budget::default()
    });
    let checker = Checker::new(&opts.profile);
    let mut queue = jobs.into_iter();
    let mut set: JoinSet<BatchResult> = JoinSet::new();
    loop {
        while set.len() < opts.concurrency && !cancel.is_cancelled() && !report.cost_cap_reached {
            let Some(request) = queue.next() else { break };
            set.spawn(run_batch(
                backend.clone(),
                request,
                policy.clone(),
                budget.clone(),
                markers.clone(),
                cancel.clone(),
                opts.events.clone(),
            ));
        }
        let joined = tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            j = set.join_next() => j,
        };
        let Some(joined) = joined else {
            if cancel.is_cancelled() {
                report.cancelled = true;
                set.abort_all();
                while set.join_next().await.is_some() {}
            }
            break;
        };
        let result = joined.map_err(|e| TeacherError::Task(format!("a batch task failed: {e}")))?;
        report
            .categories
            .entry(result.category.clone())
            .or_default()
            .retries += result.retries.len() as u64;
        report.usage.add(&result.usage);
        let (l, spend) = (ledger.clone(), result.usage);
        report.total_usage = blocking(move || l.add_spend(&spend)).await?;
        if let (Some(cap), Some(cost)) = (opts.max_cost_usd, report.usage.cost_usd) {
            if cost >= cap && !report.cost_cap_reached {
                warn!(
                    "reported cost ${cost:.4} reached the cap of ${cap:.4}: starting no new batch"
                );
                report.cost_cap_reached = true;
                report.cap = format!("cost cap reached: ${cost:.4} of --max-cost-usd ${cap:.4}");
            }
        }
        report.retries.extend(result.retries);
        match result.outcome {
            Outcome::Parsed(parsed) => {
                let stored = Stored {
                    category: result.category.clone(),
                    index: result.index,
                    size: result.size,
                    attempts: result.attempts,
                };
                let ctx = StoreCtx {
                    opts,
                    store,
                    progress,
                    teacher,
                    ledger: &ledger,
                    checker: &checker,
                    backend_name: &backend_name,
                };
                store_parsed(&ctx, stored, parsed, report).await?;
            }
            Outcome::Failed(reason) => {
                warn!(category = %result.category, batch = result.index, "teacher batch failed: {reason}");
                report
                    .categories
                    .entry(result.category.clone())
                    .or_default()
                    .failed_batches += 1;
                let failed = FailedBatch {
                    category: result.category,
                    index: result.index,
                    reason,
                };
                if let Some(sink) = &opts.events {
                    sink(&GenerationEvent::BatchFailed(failed.clone()));
                }
                report.failed_batches.push(failed);
            }
            Outcome::Fatal(e) => {
                set.abort_all();
                while set.join_next().await.is_some() {}
                return Err(TeacherError::Backend {
                    backend: backend_name,
                    message: format!(
                        "{e} (batch {}/{}; batches stored so far stay stored, fix the problem and rerun with --resume)",
                        result.category, result.index
                    ),
                });
            }
            Outcome::Capped(cap) => {
                if !report.cost_cap_reached {
                    warn!("{cap}: starting no new batch; rerun with --resume to go on");
                    report.cost_cap_reached = true;
                    report.cap = cap;
                }
            }
            Outcome::Cancelled => report.cancelled = true,
        }
    }
    Ok(())
}

/// The batches still to generate, category by category, after checking each category's
/// ledger against this run (same batch size; `--resume` when some are finished) and
/// recording the plan.
fn plan_batches(
    opts: &GenerateOptions,
    teacher: &TeacherConfig,
    categories: &[Category],
    ledger: &Ledger,
    report: &mut GenerationReport,
) -> Result<Vec<BatchRequest>, TeacherError> {
    let per_batch = opts.per_batch as u64;
    let mut jobs = Vec::new();
    for cat in categories {
        let finished = ledger.finished(&cat.name)?;
        match ledger.plan(&cat.name)? {
            Some(p) if p != per_batch && !finished.is_empty() => {
                return Err(TeacherError::PlanMismatch {
                    category: cat.name.clone(),
                    ledger: p,
                    asked: per_batch,
                })
            }
            _ => {}
        }
        if !opts.resume && !finished.is_empty() {
            return Err(TeacherError::NotResuming {
                category: cat.name.clone(),
                batches: finished.len() as u64,
            });
        }
        ledger.set_plan(&cat.name, per_batch)?;
        let batches = cat.count.div_ceil(per_batch);
        let entry = report.categories.entry(cat.name.clone()).or_default();
        entry.planned_batches = batches;
        for index in 0..batches {
            if finished.binary_search(&index).is_ok() {
                entry.already_done += 1;
                continue;
            }
            let first_item = index * per_batch;
            let size = per_batch.min(cat.count - first_item) as usize;
            let batch_name = format!("{}/{index}", cat.name);
            jobs.push(BatchRequest {
                category: cat.name.clone(),
                index,
                first_item,
                size,
                generator_system_prompt: teacher.generation.generator_system_prompt.clone(),
                prompt: teacher.batch_prompt(cat, size, &batch_name),
                attempt: 0,
            });
        }
    }
    Ok(jobs)
}

/// A parsed batch's identity.
struct Stored {
    category: String,
    index: u64,
    size: usize,
    attempts: u32,
}

/// What storing a parsed batch needs of the run.
struct StoreCtx<'a> {
    opts: &'a GenerateOptions,
    store: &'a Store,
    progress: &'a dyn Progress,
    teacher: &'a TeacherConfig,
    ledger: &'a Ledger,
    checker: &'a Checker,
    backend_name: &'a str,
}

/// Checks every conversation of a parsed batch against the gates and stores the batch
/// (with its unparsed lines) in one ledger commit, then counts and reports it.
async fn store_parsed(
    ctx: &StoreCtx<'_>,
    result: Stored,
    parsed: ParsedOutput,
    report: &mut GenerationReport,
) -> Result<(), TeacherError> {
    let StoreCtx {
        opts,
        store,
        progress,
        teacher,
        ledger,
        checker,
        backend_name,
    } = *ctx;
    let source = format!("{backend_name}:{}/{}", result.category, result.index);
    let mut batch = PendingBatch {
        category: result.category.clone(),
        entry: LedgerEntry {
            unparsed_lines: parsed.bad_lines.len() as u64,
            attempts: result.attempts,
            source,
            ..LedgerEntry::default()
        },
        items: Vec::new(),
        raw_rejected: parsed
            .bad_lines
            .iter()
            .map(|b| RawRejected {
                category: result.category.clone(),
                batch: result.index,
                line: b.line,
                check: "invalid_json".into(),
                error: b.error.clone(),
                text: b.text.clone(),
                source: String::new(),
            })
            .collect(),
    };
    let short = result.size.saturating_sub(parsed.conversations.len()) as u64;
    if short > 0 {
        warn!(category = %result.category, batch = result.index,
            "the teacher wrote {} of {} conversations", parsed.conversations.len(), result.size);
    }
    for bad in &parsed.bad_lines {
        warn!(category = %result.category, batch = result.index, line = bad.line,
            "teacher output line does not parse: {}", bad.error);
    }
    for c in parsed.conversations {
        let c = prepare(
            c,
            &teacher.production_prompt,
            &result.category,
            backend_name,
        );
        let flags: Vec<String> = checker
            .check(&c)
            .flags()
            .into_iter()
            .map(|f| f.name().to_string())
            .collect();
        if flags.is_empty() {
            batch.entry.accepted += 1;
        } else {
            batch.entry.rejected += 1;
        }
        batch.items.push(PendingItem {
            conversation: c.to_json(),
            flags,
        });
    }
    let (l, s, index) = (ledger.clone(), store.clone(), result.index);
    let entry = blocking(move || l.commit(&s, index, batch)).await?;
    let cat = report
        .categories
        .entry(result.category.clone())
        .or_default();
    cat.batches += 1;
    cat.accepted += entry.accepted;
    cat.rejected += entry.rejected;
    cat.duplicates += entry.duplicates;
    cat.unparsed_lines += entry.unparsed_lines;
    cat.missing += short;
    progress.advance(result.size as u64);
    progress.message(&format!(
        "{}: {} accepted, {} rejected",
        result.category, cat.accepted, cat.rejected
    ));
    if let Some(sink) = &opts.events {
        sink(&GenerationEvent::BatchStored {
            category: result.category.clone(),
            index: result.index,
            entry,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_total_scales_every_category_and_keeps_the_mix() {
        let teacher = TeacherConfig::resolve(None).unwrap();
        let before = teacher.categories.clone();
        let sum: u64 = before.iter().map(|c| c.count).sum();
        for total in [12, sum, sum + 32, 3 * sum] {
            let mut cats = before.clone();
            scale_counts(&mut cats, total);
            let got: u64 = cats.iter().map(|c| c.count).sum();
            assert!(
                got >= total && got < total + cats.len() as u64,
                "{total} → {got}"
            );
            for (a, b) in before.iter().zip(&cats) {
                let share = b.count as f64 / total as f64 - a.count as f64 / sum as f64;
                assert!(
                    share.abs() <= 1.0 / total as f64 + 1e-12,
                    "{}: {share}",
                    a.name
                );
            }
        }
    }

    #[test]
    fn retry_delay_is_the_longer_of_backoff_and_retry_after_capped() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        assert_eq!(retry_delay(ms(10), 0, None), ms(10));
        assert_eq!(retry_delay(ms(10), 2, None), ms(40));
        assert_eq!(retry_delay(ms(10), 0, Some(s(1))), s(1));
        assert_eq!(retry_delay(s(8), 1, Some(s(1))), s(16));
        assert_eq!(retry_delay(ms(10), 0, Some(s(3600))), MAX_RETRY_DELAY);
        assert_eq!(retry_delay(s(3), 16, None), MAX_RETRY_DELAY);
        assert_eq!(
            retry_delay(ms(10), 0, Some(Duration::from_secs(u64::MAX))),
            MAX_RETRY_DELAY
        );
    }
}
