//! ServingSupervisor: runs the node's inference server for a serve job and, when asked,
//! benchmarks a candidate model beside it and promotes or rolls it back.
//!
//! With `[serving] engine` set (`vllm` or `embedded`) the command is rendered from the
//! config ([`ServingConfig::render`]) and supervised: a health ladder (process alive →
//! `/health` → `/v1/models` lists the model → a real smoke completion) must pass within
//! the startup timeout, and in service `/health` and a probe completion are checked every
//! interval (a probe that gets no token within `stall_timeout_ms` means the engine is
//! stalled: vLLM's `/health` stays 200 while a wedged engine hangs). A failure stops the
//! process group and restarts it after an exponential backoff; after `max_restarts`
//! restarts that never reached health the job fails. With only `command`, that command is
//! run as given and only its process is watched.
//!
//! Promotion ([`Promote`]): the candidate is served on `candidate_port`, must pass the
//! same ladder, and is benchmarked with the suite (`qatflow_bench`) together with the
//! serving model; it replaces the serving model only when it passes the suite's gates and
//! is not worse beyond the configured margins, and only once it is healthy on the serving
//! port (otherwise the previous model is served again). The serving model, its last bench
//! and the last candidate's verdict are kept in sled (`node_jobs/serving_state`) and shown
//! by `qatflow status`.
//!
//! The server writes its stdout and stderr to `serving.log` (not to a pipe, which would
//! break when the node dies) in its own process group, and its pid and start time
//! (`/proc/<pid>/stat`, in clock ticks since boot) are recorded in sled (tree `node_jobs`,
//! key `serve`). After a node restart the supervisor re-adopts the process when a process
//! with that pid and that start time is still running; otherwise it starts the command
//! anew. The record is removed when the process is stopped or has exited.

use super::jobs::{JobError, JobHandle, JobHub};
use crate::config::{Engine, ServingConfig};
use crate::status::{Field, StatusBoard};
use crate::trace::actor_span;
use actix::prelude::*;
use qatflow_bench::{Client, Report, RunOptions, Setup, Suite};
use qatflow_proto::v1::{job_event, JobKind, JobState};
use qatflow_store::{Store, StoreError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tracing::Instrument;

/// Job record keys of the serving process and of the serving state.
const RECORD_KEY: &str = "serve";
const STATE_KEY: &str = "serving_state";
/// How long a process has after SIGTERM before it gets SIGKILL.
const GRACE: Duration = Duration::from_secs(10);
/// How often an adopted process and the log are polled.
const POLL: Duration = Duration::from_millis(100);

/// The serving process as recorded in sled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServingRecord {
    /// Its process id.
    pub pid: u32,
    /// Its start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`), which
    /// tells it apart from a later process that reuses the pid.
    pub start_time: u64,
}

/// Errors of the serving supervisor's records in the store.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record does not decode (or encode) as JSON.
    #[error("node_jobs/{key}: {source}")]
    Json {
        /// The record's key.
        key: &'static str,
        /// The JSON error.
        source: serde_json::Error,
    },
}

fn get<T: DeserializeOwned>(store: &Store, key: &'static str) -> Result<Option<T>, RecordError> {
    store
        .jobs()?
        .get(key)?
        .map(|v| serde_json::from_slice(&v).map_err(|source| RecordError::Json { key, source }))
        .transpose()
}

fn put<T: Serialize>(
    store: &Store,
    key: &'static str,
    value: Option<&T>,
) -> Result<(), RecordError> {
    let bytes = value
        .map(|v| serde_json::to_vec(v).map_err(|source| RecordError::Json { key, source }))
        .transpose()?;
    Ok(store.jobs()?.set(key, bytes.as_deref())?)
}

impl ServingRecord {
    /// The recorded serving process, if any.
    pub fn load(store: &Store) -> Result<Option<ServingRecord>, RecordError> {
        get(store, RECORD_KEY)
    }

    /// Records this process durably.
    pub fn save(&self, store: &Store) -> Result<(), RecordError> {
        put(store, RECORD_KEY, Some(self))
    }

    /// Removes the record durably.
    pub fn clear(store: &Store) -> Result<(), RecordError> {
        put::<ServingRecord>(store, RECORD_KEY, None)
    }

    /// Whether this very process (same pid, same start time) is still running.
    pub fn is_running(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time)
    }
}

/// What the supervisor remembers about models across restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServingState {
    /// The model served (a promoted candidate); `[serving] model` when none.
    pub model: Option<PathBuf>,
    /// The serving model's last bench, one line.
    pub bench: String,
    /// The last candidate and its verdict, one line.
    pub candidate: String,
}

impl ServingState {
    /// The stored state (default when none).
    pub fn load(store: &Store) -> Result<ServingState, RecordError> {
        Ok(get(store, STATE_KEY)?.unwrap_or_default())
    }

    /// Stores the state durably.
    pub fn save(&self, store: &Store) -> Result<(), RecordError> {
        put(store, STATE_KEY, Some(self))
    }
}

/// The start time of live process `pid` (clock ticks since boot), or `None` when there is
/// no such process or it has exited (a zombie).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field 22 (starttime) is fields[19].
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Signals the process and its process group (servers run in their own group, so vLLM's
/// engine workers get the signal too).
fn signal(pid: u32, sig: libc::c_int) {
    if pid == 0 {
        return;
    }
    // SAFETY: kill(2) has no memory effects; a pid or group that is gone gives ESRCH,
    // ignored.
    unsafe {
        libc::kill(-(pid as libc::pid_t), sig);
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// A serving process: our child, or one adopted after a restart.
enum Process {
    Child(Child),
    Adopted(ServingRecord),
}

impl Process {
    /// Waits until the process exits; describes how.
    async fn exited(&mut self) -> String {
        match self {
            Process::Child(child) => match child.wait().await {
                Ok(s) if s.success() => "exited 0".to_string(),
                Ok(s) => format!("exited {s}"),
                Err(e) => format!("wait failed: {e}"),
            },
            Process::Adopted(record) => {
                while record.is_running() {
                    tokio::time::sleep(POLL).await;
                }
                "exited (adopted: exit status unknown)".to_string()
            }
        }
    }

    /// Stops the process: SIGTERM to its group, SIGKILL after [`GRACE`].
    async fn stop(&mut self, pid: u32) {
        signal(pid, libc::SIGTERM);
        if tokio::time::timeout(GRACE, self.exited()).await.is_err() {
            signal(pid, libc::SIGKILL);
            let _ = tokio::time::timeout(GRACE, self.exited()).await;
        }
    }
}

/// Starts `command` with its output appended to `log`, in its own process group; answers
/// the child, its pid and the log length before it started.
fn spawn_command(command: &[String], log: &Path) -> Result<(Child, u32, u64), String> {
    let Some((program, args)) = command.split_first() else {
        return Err(
            "no serving command configured: set [serving] engine and model, or command, in the node config".into(),
        );
    };
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: cannot open the serving log: {e}", log.display()))?;
    let from = out.metadata().map(|m| m.len()).unwrap_or(0);
    let err = out
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: a Ctrl-C meant for the node does not reach it.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start serving command {program:?}: {e}"))?;
    let pid = child.id().unwrap_or(0);
    Ok((child, pid, from))
}

/// The serving model's health as the serve loop sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    /// No server, or it is starting.
    Starting,
    /// Passed the ladder serving this model, requested under this name.
    Ready {
        /// The model directory.
        model: PathBuf,
        /// The name requests use.
        name: String,
    },
    /// Failed; restarting or given up.
    Down(String),
}

/// Everything the serve loop and promotions share.
#[derive(Clone)]
struct Ctx {
    config: Arc<ServingConfig>,
    store: Store,
    log: PathBuf,
    board: StatusBoard,
    model: watch::Sender<PathBuf>,
    health: watch::Sender<Health>,
}

impl Ctx {
    fn client(&self, port: u16) -> Result<Client, String> {
        Client::new(&self.config.url(port), None).map_err(|e| e.to_string())
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.config.health.interval_ms)
    }

    /// Updates the stored state and the status board.
    fn update_state(&self, f: impl FnOnce(&mut ServingState)) {
        let mut state = ServingState::load(&self.store).unwrap_or_else(|e| {
            tracing::warn!("cannot read the serving state: {e}; starting it afresh");
            ServingState::default()
        });
        f(&mut state);
        if let Err(e) = state.save(&self.store) {
            tracing::warn!("cannot store the serving state: {e}");
        }
        self.board.set(Field::ServingBench, state.bench.clone());
        self.board.set(Field::Candidate, state.candidate.clone());
    }
}

/// The smoke and probe request: a real completion of a few tokens.
fn smoke_body(name: &str) -> serde_json::Value {
    serde_json::json!({
        "model": name,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "temperature": 0.0,
    })
}

/// Runs the ladder up to a smoke completion; answers the model name requests use.
async fn ladder(
    ctx: &Ctx,
    client: &Client,
    pid: u32,
    stage: impl Fn(&str),
) -> Result<String, String> {
    let h = &ctx.config.health;
    let deadline = Instant::now() + Duration::from_secs(h.startup_timeout_s);
    let timeout = Duration::from_millis(h.request_timeout_ms);
    let poll = ctx.interval().min(Duration::from_secs(1));
    let past = |what: &str, last: &str| {
        format!(
            "{what} within {} s (pid {pid}); last answer: {last}",
            h.startup_timeout_s
        )
    };
    stage("waiting for /health");
    loop {
        match client.health(timeout).await {
            Ok(()) => break,
            Err(e) if Instant::now() >= deadline => {
                return Err(past("no healthy /health", &e.to_string()))
            }
            Err(_) => tokio::time::sleep(poll).await,
        }
    }
    let want = match ctx.config.engine {
        Some(Engine::Vllm) => Some(ctx.config.served_model_name.clone()),
        _ => None,
    };
    stage("waiting for /v1/models to list the model");
    let name = loop {
        let last = match client.models(timeout).await {
            Ok(list) => {
                let found = match &want {
                    Some(w) => list.iter().find(|m| *m == w).cloned(),
                    None => list.first().cloned(),
                };
                if let Some(n) = found {
                    break n;
                }
                format!("lists {list:?}")
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            let what = match &want {
                Some(w) => format!("/v1/models did not list `{w}`"),
                None => "/v1/models listed no model".to_string(),
            };
            return Err(past(&what, &last));
        }
        tokio::time::sleep(poll).await;
    };
    stage("waiting for a smoke completion");
    let stall = Duration::from_millis(h.stall_timeout_ms);
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(stall);
    let sample = client
        .chat_stream(&smoke_body(&name), stall, left)
        .await
        .map_err(|e| format!("the smoke completion failed: {e}"))?;
    if sample.content.is_empty() && sample.reasoning.is_empty() && sample.tool_calls.is_empty() {
        return Err("the smoke completion returned no token".into());
    }
    Ok(name)
}

/// Watches a healthy server until it fails; answers why.
async fn in_service(ctx: &Ctx, client: &Client, name: &str) -> String {
    let h = &ctx.config.health;
    let timeout = Duration::from_millis(h.request_timeout_ms);
    let stall = Duration::from_millis(h.stall_timeout_ms);
    let mut failed = 0;
    loop {
        tokio::time::sleep(ctx.interval()).await;
        match client.health(timeout).await {
            Ok(()) => failed = 0,
            Err(e) => {
                failed += 1;
                if failed >= h.failures_before_restart.max(1) {
                    return format!("/health failed {failed} times in a row: {e}");
                }
                continue;
            }
        }
        if let Err(e) = client
            .chat_stream(&smoke_body(name), stall, stall * 2)
            .await
        {
            return format!("stalled: a probe completion failed: {e}");
        }
    }
}

/// How one round of the serve loop ended.
enum Outcome {
    Failed(String),
    Cancelled,
    Switch,
}

/// The supervised serve job: start (or adopt), ladder, watch, restart with backoff.
async fn supervise(
    ctx: Ctx,
    mut adopted: Option<ServingRecord>,
    job: JobHandle,
) -> (JobState, String) {
    let h = ctx.config.health.clone();
    let mut model_rx = ctx.model.subscribe();
    let mut restarts = 0u32;
    let mut backoff = Duration::from_millis(h.backoff_initial_ms);
    let client = match ctx.client(ctx.config.port) {
        Ok(c) => c,
        Err(e) => return (JobState::Failed, e),
    };
    loop {
        let model = model_rx.borrow_and_update().clone();
        let shown = model.display().to_string();
        let round_stop = tokio_util::sync::CancellationToken::new();
        let (mut process, pid, how) = match adopted.take() {
            Some(r) => {
                let from = log_len(&ctx.log);
                tokio::spawn(tail(ctx.log.clone(), from, job.clone(), round_stop.clone()));
                (Process::Adopted(r), r.pid, "adopted")
            }
            None => {
                let command = ctx.config.render(&model, ctx.config.port);
                match spawn_command(&command, &ctx.log) {
                    Ok((child, pid, from)) => {
                        if let Some(start_time) = process_start_time(pid) {
                            if let Err(e) = (ServingRecord { pid, start_time }).save(&ctx.store) {
                                tracing::warn!("cannot record the serving process {pid}: {e}; it will not be re-adopted after a restart");
                            }
                        }
                        tokio::spawn(tail(ctx.log.clone(), from, job.clone(), round_stop.clone()));
                        job.emit(job_event::Event::Message(format!(
                            "started: {}",
                            command.join(" ")
                        )));
                        (Process::Child(child), pid, "started")
                    }
                    Err(e) => {
                        ctx.board.set(Field::Serving, format!("failed: {e}"));
                        let _ = ctx.health.send_replace(Health::Down(e.clone()));
                        return (JobState::Failed, e);
                    }
                }
            }
        };
        let _ = ctx.health.send_replace(Health::Starting);
        let mut healthy = false;
        let round = async {
            let board = ctx.board.clone();
            let stage = |s: &str| {
                board.set(
                    Field::Serving,
                    format!("starting {shown} (pid {pid}, {how}, job {}): {s}", job.id),
                )
            };
            let started = Instant::now();
            let name = ladder(&ctx, &client, pid, stage).await?;
            healthy = true;
            ctx.board.set(
                Field::Serving,
                format!(
                    "serving {name} from {shown} at {} (pid {pid}, {how}, healthy after {:.1} s, job {})",
                    client.base(),
                    started.elapsed().as_secs_f64(),
                    job.id
                ),
            );
            let _ = ctx.health.send_replace(Health::Ready {
                model: model.clone(),
                name: name.clone(),
            });
            Err::<(), String>(in_service(&ctx, &client, &name).await)
        };
        let outcome = tokio::select! {
            r = round => Outcome::Failed(r.err().unwrap_or_default()),
            e = process.exited() => Outcome::Failed(e),
            _ = job.cancel.cancelled() => Outcome::Cancelled,
            _ = model_rx.changed() => Outcome::Switch,
        };
        process.stop(pid).await;
        // Let the tail pick up the last lines the process wrote.
        tokio::time::sleep(POLL * 2).await;
        round_stop.cancel();
        if let Err(e) = ServingRecord::clear(&ctx.store) {
            tracing::warn!("cannot clear the serving record: {e}");
        }
        let reason = match outcome {
            Outcome::Cancelled => {
                let _ = ctx.health.send_replace(Health::Down("stopped".into()));
                return (JobState::Cancelled, "stopped".into());
            }
            Outcome::Switch => {
                job.emit(job_event::Event::Message(format!(
                    "switching from {shown} to {}",
                    model_rx.borrow().display()
                )));
                restarts = 0;
                backoff = Duration::from_millis(h.backoff_initial_ms);
                continue;
            }
            Outcome::Failed(reason) => reason,
        };
        tracing::warn!(pid, "serving failed: {reason}");
        let _ = ctx.health.send_replace(Health::Down(reason.clone()));
        if healthy {
            restarts = 0;
            backoff = Duration::from_millis(h.backoff_initial_ms);
        }
        restarts += 1;
        if restarts > h.max_restarts {
            let text = format!(
                "failed: {reason}; gave up after {} restarts without reaching health (job {})",
                h.max_restarts, job.id
            );
            ctx.board.set(Field::Serving, text.clone());
            return (JobState::Failed, text);
        }
        let text = format!(
            "restarting in {:.1} s (restart {restarts} of {}) after: {reason} (job {})",
            backoff.as_secs_f64(),
            h.max_restarts,
            job.id
        );
        ctx.board.set(Field::Serving, text.clone());
        job.emit(job_event::Event::Message(text));
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = job.cancel.cancelled() => return (JobState::Cancelled, "stopped".into()),
            _ = model_rx.changed() => {}
        }
        backoff = (backoff * 2).min(Duration::from_millis(h.backoff_max_ms));
    }
}

/// The unsupervised job of a plain `command`: runs until it exits or is cancelled.
async fn run_command(mut process: Process, pid: u32, job: &JobHandle) -> (JobState, String) {
    tokio::select! {
        e = process.exited() => {
            let ok = e == "exited 0";
            (if ok { JobState::Finished } else { JobState::Failed }, e)
        }
        _ = job.cancel.cancelled() => {
            process.stop(pid).await;
            (JobState::Cancelled, "stopped".to_string())
        }
    }
}

/// Streams the lines appended to `log` after byte `from` as job events until `stop`.
async fn tail(log: PathBuf, from: u64, job: JobHandle, stop: tokio_util::sync::CancellationToken) {
    let Ok(mut file) = tokio::fs::File::open(&log).await else {
        return;
    };
    if file.seek(std::io::SeekFrom::Start(from)).await.is_err() {
        return;
    }
    let mut lines = BufReader::new(file);
    let mut line = String::new();
    loop {
        let read = tokio::select! {
            r = lines.read_line(&mut line) => r,
            _ = stop.cancelled() => return,
        };
        match read {
            Ok(0) => tokio::time::sleep(POLL).await,
            Ok(_) if line.ends_with('\n') => {
                job.emit(job_event::Event::Message(line.trim_end().to_string()));
                line.clear();
            }
            // A line still being written: keep what came and read on.
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Benchmarks the serving model and `candidate` and promotes or rolls back; answers the
/// job's end state and a text.
async fn promote(
    ctx: Ctx,
    candidate: PathBuf,
    take: bool,
    job: JobHandle,
    serving_job: bool,
) -> (JobState, String) {
    let cand = candidate.display().to_string();
    let say = |text: String| {
        job.emit(job_event::Event::Message(text.clone()));
        ctx.board.set(Field::Candidate, text);
    };
    let p = &ctx.config.promote;
    let suite = match Suite::resolve(p.suite.as_deref()).and_then(|s| s.only(&p.categories)) {
        Ok(s) => s,
        Err(e) => return fail(&ctx, &cand, format!("the bench suite: {e}")),
    };
    let setup = match Setup::resolve(&suite, p.teacher_dir.as_deref()) {
        Ok(s) => s,
        Err(e) => return fail(&ctx, &cand, e.to_string()),
    };
    let current = ctx.health.borrow().clone();
    // The candidate on the side port, through the same ladder.
    say(format!(
        "{cand}: starting on port {}",
        ctx.config.candidate_port
    ));
    let log = ctx.log.with_file_name("candidate.log");
    let command = ctx.config.render(&candidate, ctx.config.candidate_port);
    let (child, pid, _) = match spawn_command(&command, &log) {
        Ok(c) => c,
        Err(e) => return fail(&ctx, &cand, e),
    };
    let mut process = Process::Child(child);
    let client = match ctx.client(ctx.config.candidate_port) {
        Ok(c) => c,
        Err(e) => return fail(&ctx, &cand, e),
    };
    let stage = |s: &str| ctx.board.set(Field::Candidate, format!("{cand}: {s}"));
    let ready = tokio::select! {
        r = ladder(&ctx, &client, pid, stage) => r,
        e = process.exited() => Err(format!("the candidate server {e}")),
        _ = job.cancel.cancelled() => Err("cancelled".into()),
    };
    let name = match ready {
        Ok(n) => n,
        Err(e) => {
            process.stop(pid).await;
            return rolled_back(&ctx, &cand, format!("it never became healthy: {e}"), None);
        }
    };
    let bench = |client: Client, model: String, label: &'static str| {
        let mut opts = RunOptions::new(label, &model);
        opts.runs = p.runs;
        opts.idle_timeout = Duration::from_millis(p.idle_timeout_ms);
        bench_model(
            client,
            suite.clone(),
            setup.clone(),
            opts,
            job.cancel.clone(),
        )
    };
    let serving_report = match &current {
        Health::Ready { name, .. } => {
            say(format!("{cand}: benchmarking the serving model"));
            match ctx.client(ctx.config.port) {
                Ok(c) => match bench(c, name.clone(), "serving").await {
                    Ok(r) => Some(r),
                    Err(e) => {
                        process.stop(pid).await;
                        return fail(
                            &ctx,
                            &cand,
                            format!("the serving model's bench failed: {e}"),
                        );
                    }
                },
                Err(e) => return fail(&ctx, &cand, e),
            }
        }
        _ => None,
    };
    say(format!("{cand}: benchmarking the candidate"));
    let candidate_report = bench(client, name, "candidate").await;
    process.stop(pid).await;
    let candidate_report = match candidate_report {
        Ok(r) => r,
        Err(e) => {
            return rolled_back(
                &ctx,
                &cand,
                format!("its bench failed: {e}"),
                serving_report.as_ref(),
            )
        }
    };
    let margins = qatflow_bench::Margins {
        pass_pct: p.margin_pct,
        latency_pct: p.latency_margin_pct,
    };
    let decision = qatflow_bench::decide(serving_report.as_ref(), &candidate_report, &margins);
    job.emit(job_event::Event::Message(format!(
        "candidate: {}",
        candidate_report.summary()
    )));
    if let Some(r) = &serving_report {
        job.emit(job_event::Event::Message(format!(
            "serving: {}",
            r.summary()
        )));
    }
    if !decision.promote {
        let why = format!(
            "{}; candidate {}",
            decision.reasons.join("; "),
            candidate_report.summary()
        );
        return rolled_back(&ctx, &cand, why, serving_report.as_ref());
    }
    // Serve the candidate on the serving port; go back when it does not become healthy.
    let candidate = if take {
        settle(&ctx, &candidate)
    } else {
        candidate
    };
    let previous = ctx.model.borrow().clone();
    if !serving_job {
        ctx.model.send_replace(candidate.clone());
        let text = format!(
            "{cand}: promoted (nothing is serving; a serve job serves it): {}",
            candidate_report.summary()
        );
        ctx.update_state(|s| {
            s.model = Some(candidate.clone());
            s.bench = candidate_report.summary();
            s.candidate = text.clone();
        });
        return (JobState::Finished, text);
    }
    say(format!("{cand}: passed; switching the serving port to it"));
    let mut health = ctx.health.subscribe();
    health.borrow_and_update();
    ctx.model.send_replace(candidate.clone());
    let startup = Duration::from_secs(ctx.config.health.startup_timeout_s) + GRACE * 2;
    let outcome = tokio::time::timeout(startup, async {
        loop {
            if health.changed().await.is_err() {
                return Err("the serve job ended".to_string());
            }
            match health.borrow_and_update().clone() {
                Health::Ready { model, .. } if model == candidate => return Ok(()),
                Health::Down(e) => return Err(e),
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("it did not become healthy in time".into()));
    match outcome {
        Ok(()) => {
            let text = format!("{cand}: promoted: {}", candidate_report.summary());
            ctx.update_state(|s| {
                s.model = Some(candidate.clone());
                s.bench = candidate_report.summary();
                s.candidate = text.clone();
            });
            (JobState::Finished, text)
        }
        Err(e) => {
            ctx.model.send_replace(previous);
            rolled_back(
                &ctx,
                &cand,
                format!("it failed on the serving port ({e}); the previous model serves again"),
                serving_report.as_ref(),
            )
        }
    }
}

/// One bench run of a model for a promotion.
async fn bench_model(
    client: Client,
    suite: Suite,
    setup: Setup,
    opts: RunOptions,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<Report, qatflow_bench::BenchError> {
    let progress = qatflow_core::NoProgress;
    qatflow_bench::run(&client, &suite, &setup, &opts, &progress, &cancel).await
}

/// Moves a promoted export into `models/` next to the serving log, named after it and the
/// time, so the next export cannot replace what is served; keeps it in place (with a
/// warning) when it cannot be moved.
fn settle(ctx: &Ctx, candidate: &Path) -> PathBuf {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = candidate
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    let models = ctx.log.with_file_name("models");
    let to = models.join(format!("{name}-{unix}"));
    match std::fs::create_dir_all(&models).and_then(|_| std::fs::rename(candidate, &to)) {
        Ok(()) => to,
        Err(e) => {
            tracing::warn!(
                "cannot move {} to {}: {e}; serving it in place",
                candidate.display(),
                to.display()
            );
            candidate.to_path_buf()
        }
    }
}

fn rolled_back(ctx: &Ctx, cand: &str, why: String, serving: Option<&Report>) -> (JobState, String) {
    let text = format!("{cand}: rolled back: {why}");
    ctx.update_state(|s| {
        if let Some(r) = serving {
            s.bench = r.summary();
        }
        s.candidate = text.clone();
    });
    (JobState::Finished, text)
}

fn fail(ctx: &Ctx, cand: &str, why: String) -> (JobState, String) {
    let text = format!("{cand}: not benchmarked: {why}");
    ctx.update_state(|s| s.candidate = text.clone());
    (JobState::Failed, text)
}

/// Supervises the serving process.
pub struct ServingSupervisor {
    ctx: Ctx,
    jobs: JobHub,
    current: Option<JobHandle>,
    promoting: Option<JobHandle>,
}

impl ServingSupervisor {
    /// A supervisor of `config`'s server that records its process in `store` and writes
    /// its output to `log`.
    pub fn new(
        config: ServingConfig,
        store: Store,
        log: PathBuf,
        jobs: JobHub,
        board: StatusBoard,
    ) -> ServingSupervisor {
        let state = ServingState::load(&store).unwrap_or_else(|e| {
            tracing::warn!("cannot read the serving state: {e}");
            ServingState::default()
        });
        board.set(Field::ServingBench, state.bench.clone());
        board.set(Field::Candidate, state.candidate.clone());
        let model = state
            .model
            .or_else(|| config.model.clone())
            .unwrap_or_default();
        ServingSupervisor {
            ctx: Ctx {
                config: Arc::new(config),
                store,
                log,
                board,
                model: watch::Sender::new(model),
                health: watch::Sender::new(Health::Down("not started".into())),
            },
            jobs,
            current: None,
            promoting: None,
        }
    }

    fn supervised(&self) -> bool {
        self.ctx.config.engine.is_some()
    }

    /// Starts serving (or watches an adopted process); answers the job id.
    fn start(
        &mut self,
        ctx: &mut Context<Self>,
        adopted: Option<ServingRecord>,
    ) -> Result<String, JobError> {
        let job = self.jobs.create(JobKind::Serve);
        let me = ctx.address();
        let handle = job.clone();
        if self.supervised() {
            job.state(JobState::Running);
            self.ctx
                .board
                .set(Field::Serving, format!("starting (job {})", job.id));
            let c = self.ctx.clone();
            self.current = Some(job.clone());
            tokio::spawn(
                async move {
                    let (state, text) = supervise(c, adopted, handle.clone()).await;
                    handle.state(state);
                    me.do_send(Exited {
                        job: handle.id.clone(),
                        text,
                    });
                }
                .instrument(tracing::info_span!("serving")),
            );
            return Ok(job.id);
        }
        let (process, pid, from, how) = match adopted {
            Some(r) => (
                Process::Adopted(r),
                r.pid,
                log_len(&self.ctx.log),
                "adopted",
            ),
            None => {
                let (child, pid, from) =
                    match spawn_command(&self.ctx.config.command, &self.ctx.log) {
                        Ok(c) => c,
                        Err(e) => {
                            job.state(JobState::Failed);
                            return Err(JobError::Start(e));
                        }
                    };
                if let Some(start_time) = process_start_time(pid) {
                    if let Err(e) = (ServingRecord { pid, start_time }).save(&self.ctx.store) {
                        tracing::warn!("cannot record the serving process {pid}: {e}; it will not be re-adopted after a restart");
                    }
                }
                (Process::Child(child), pid, from, "started")
            }
        };
        job.state(JobState::Running);
        self.ctx.board.set(
            Field::Serving,
            format!("running (pid {pid}, {how}, job {})", job.id),
        );
        self.current = Some(job.clone());
        let (log, store) = (self.ctx.log.clone(), self.ctx.store.clone());
        tokio::spawn(
            async move {
                let stop = tokio_util::sync::CancellationToken::new();
                let tail = tokio::spawn(tail(log, from, handle.clone(), stop.clone()));
                let (state, text) = run_command(process, pid, &handle).await;
                // Let the tail pick up the last lines the process wrote.
                tokio::time::sleep(POLL * 2).await;
                stop.cancel();
                let _ = tail.await;
                if let Err(e) = ServingRecord::clear(&store) {
                    tracing::warn!("cannot clear the serving record: {e}");
                }
                handle.state(state);
                me.do_send(Exited {
                    job: handle.id.clone(),
                    text,
                });
            }
            .instrument(tracing::info_span!("serving_process", pid)),
        );
        Ok(job.id)
    }
}

impl Actor for ServingSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.current.is_some() {
            // An actor restart: the process and its watcher live on.
            return;
        }
        self.ctx.board.set(Field::Serving, "stopped");
        let record = match ServingRecord::load(&self.ctx.store) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot read the serving record: {e}; not re-adopting");
                None
            }
        };
        let adopted = match record {
            Some(r) if r.is_running() => {
                tracing::info!(pid = r.pid, "re-adopting the running serving process");
                Some(r)
            }
            Some(r) => {
                tracing::info!(
                    pid = r.pid,
                    "the recorded serving process is gone; starting the command anew"
                );
                if let Err(e) = ServingRecord::clear(&self.ctx.store) {
                    tracing::warn!("cannot clear the serving record: {e}");
                }
                None
            }
            None if self.ctx.config.auto_start && self.supervised() => None,
            None => return,
        };
        if let Err(e) = self.start(ctx, adopted) {
            tracing::error!("{e}");
            self.ctx
                .board
                .set(Field::Serving, format!("failed to restart: {e}"));
        }
    }
}

impl Supervised for ServingSupervisor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.ctx.board.restarted();
    }
}

/// Start serving; answers the job id.
#[derive(Message)]
#[rtype(result = "Result<String, JobError>")]
pub struct StartServing;

/// Benchmark a candidate model directory beside the serving model and promote it or roll
/// it back; answers the job id (`promote-N`), whose last message and the status say why.
#[derive(Message)]
#[rtype(result = "Result<String, JobError>")]
pub struct Promote {
    /// The candidate model directory; `None` for `[serving.promote] candidate` (by
    /// default the exporter's output directory).
    pub candidate: Option<PathBuf>,
    /// Move the candidate into the node's `models/` directory before it is served on the
    /// serving port (for exports, whose directory the next export replaces).
    pub take: bool,
}

/// The serving process ended.
#[derive(Message)]
#[rtype(result = "()")]
struct Exited {
    job: String,
    text: String,
}

/// A promotion ended.
#[derive(Message)]
#[rtype(result = "()")]
struct Promoted {
    job: String,
}

impl Handler<StartServing> for ServingSupervisor {
    type Result = Result<String, JobError>;

    fn handle(&mut self, _msg: StartServing, ctx: &mut Context<Self>) -> Self::Result {
        let _span =
            actor_span(self.ctx.board.name(), "ServingSupervisor", "StartServing").entered();
        if let Some(job) = &self.current {
            return Err(JobError::Busy {
                doing: "serving",
                job: job.id.clone(),
            });
        }
        self.start(ctx, None)
    }
}

impl Handler<Promote> for ServingSupervisor {
    type Result = Result<String, JobError>;

    fn handle(&mut self, msg: Promote, ctx: &mut Context<Self>) -> Self::Result {
        let _span = actor_span(self.ctx.board.name(), "ServingSupervisor", "Promote").entered();
        if !self.supervised() {
            return Err(JobError::Precondition("promotion needs a supervised server: set [serving] engine and model in the node config".into()));
        }
        if let Some(job) = &self.promoting {
            return Err(JobError::Promoting {
                job: job.id.clone(),
            });
        }
        let Some(candidate) = msg
            .candidate
            .or_else(|| self.ctx.config.promote.candidate.clone())
        else {
            return Err(JobError::Precondition(
                "no candidate: set [serving.promote] candidate or an [exporter] section".into(),
            ));
        };
        if !candidate.join("config.json").is_file() {
            return Err(JobError::Precondition(format!(
                "{}: not a model directory (no config.json); export a checkpoint first",
                candidate.display()
            )));
        }
        let job = self.jobs.create(JobKind::Promote);
        job.state(JobState::Running);
        self.promoting = Some(job.clone());
        let (c, me, handle) = (self.ctx.clone(), ctx.address(), job.clone());
        let serving_job = self.current.is_some();
        tokio::spawn(
            async move {
                let (state, text) =
                    promote(c, candidate, msg.take, handle.clone(), serving_job).await;
                handle.emit(job_event::Event::Message(text));
                handle.state(state);
                me.do_send(Promoted {
                    job: handle.id.clone(),
                });
            }
            .instrument(tracing::info_span!("promote")),
        );
        Ok(job.id)
    }
}

impl Handler<Exited> for ServingSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Exited, _ctx: &mut Context<Self>) {
        if self.current.as_ref().is_some_and(|j| j.id == msg.job) {
            self.current = None;
        }
        self.ctx
            .board
            .set(Field::Serving, format!("{} (job {})", msg.text, msg.job));
    }
}

impl Handler<Promoted> for ServingSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Promoted, _ctx: &mut Context<Self>) {
        if self.promoting.as_ref().is_some_and(|j| j.id == msg.job) {
            self.promoting = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_times_identify_live_processes() {
        let me = std::process::id();
        let t = process_start_time(me).expect("this process is alive");
        assert!(ServingRecord {
            pid: me,
            start_time: t
        }
        .is_running());
        assert!(!ServingRecord {
            pid: me,
            start_time: t + 1
        }
        .is_running());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(process_start_time(pid), None, "a reaped process is gone");
    }
}
