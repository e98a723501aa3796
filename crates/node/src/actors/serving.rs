//! ServingSupervisor: starts the configured serving command as a child process for a serve
//! job, streams its output lines as job events, and stops it when the job is cancelled.
//! (Health checks of a real inference server come with the serving issue.)
//!
//! The process writes its stdout and stderr to `serving.log` (not to a pipe, which would
//! break when the node dies) in its own process group, and its pid and start time
//! (`/proc/<pid>/stat`, in clock ticks since boot) are recorded in sled (tree `node_jobs`,
//! key `serve`). After a node restart the supervisor re-adopts the process when a process
//! with that pid and that start time is still running; otherwise it starts the command
//! anew. The record is removed when the job ends (cancelled, or the process exited).

use super::jobs::{JobHandle, JobHub};
use crate::status::{Field, StatusBoard};
use crate::trace::actor_span;
use actix::prelude::*;
use qatflow_proto::v1::{job_event, JobState};
use qatflow_store::Store;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};
use tokio::process::{Child, Command};
use tracing::Instrument;

const RECORD_TREE: &str = "node_jobs";
const RECORD_KEY: &[u8] = b"serve";
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

impl ServingRecord {
    /// The recorded serving process, if any.
    pub fn load(store: &Store) -> Result<Option<ServingRecord>, String> {
        let tree = store
            .db()
            .open_tree(RECORD_TREE)
            .map_err(|e| e.to_string())?;
        match tree.get(RECORD_KEY).map_err(|e| e.to_string())? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| format!("node_jobs/serve: {e}")),
            None => Ok(None),
        }
    }

    /// Records this process durably.
    pub fn save(&self, store: &Store) -> Result<(), String> {
        let tree = store
            .db()
            .open_tree(RECORD_TREE)
            .map_err(|e| e.to_string())?;
        let bytes = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        tree.insert(RECORD_KEY, bytes).map_err(|e| e.to_string())?;
        tree.flush().map(|_| ()).map_err(|e| e.to_string())
    }

    /// Removes the record durably.
    pub fn clear(store: &Store) -> Result<(), String> {
        let tree = store
            .db()
            .open_tree(RECORD_TREE)
            .map_err(|e| e.to_string())?;
        tree.remove(RECORD_KEY).map_err(|e| e.to_string())?;
        tree.flush().map(|_| ()).map_err(|e| e.to_string())
    }

    /// Whether this very process (same pid, same start time) is still running.
    pub fn is_running(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time)
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

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory effects; a pid that is gone gives ESRCH, ignored.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Supervises the serving process.
pub struct ServingSupervisor {
    command: Vec<String>,
    store: Store,
    log: PathBuf,
    jobs: JobHub,
    board: StatusBoard,
    current: Option<JobHandle>,
}

impl ServingSupervisor {
    /// A supervisor of `command` (program and arguments) that records its process in
    /// `store` and writes its output to `log`.
    pub fn new(
        command: Vec<String>,
        store: Store,
        log: PathBuf,
        jobs: JobHub,
        board: StatusBoard,
    ) -> ServingSupervisor {
        ServingSupervisor {
            command,
            store,
            log,
            jobs,
            board,
            current: None,
        }
    }

    /// Starts the command; answers the job id.
    fn spawn(&mut self, ctx: &mut Context<Self>) -> Result<String, String> {
        let Some((program, args)) = self.command.split_first() else {
            return Err(
                "no serving command configured: set [serving] command in the node config".into(),
            );
        };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: cannot open the serving log: {e}", self.log.display()))?;
        let from = out.metadata().map(|m| m.len()).unwrap_or(0);
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
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
        let record = process_start_time(pid).map(|start_time| ServingRecord { pid, start_time });
        if let Some(r) = record {
            if let Err(e) = r.save(&self.store) {
                tracing::warn!("cannot record the serving process {pid}: {e}; it will not be re-adopted after a restart");
            }
        }
        Ok(self.watch(ctx, Process::Child(child), pid, from, "started"))
    }

    /// Creates the job for process `pid` and watches it until it exits or is cancelled.
    fn watch(
        &mut self,
        ctx: &mut Context<Self>,
        process: Process,
        pid: u32,
        log_from: u64,
        how: &str,
    ) -> String {
        let job = self.jobs.create("serve");
        job.state(JobState::Running);
        self.board.set(
            Field::Serving,
            format!("running (pid {pid}, {how}, job {})", job.id),
        );
        self.current = Some(job.clone());
        let me = ctx.address();
        let (handle, log, store) = (job.clone(), self.log.clone(), self.store.clone());
        tokio::spawn(
            async move {
                let tail = tokio::spawn(tail(log, log_from, handle.clone()));
                let (state, text) = process.run(pid, &handle).await;
                // Let the tail pick up the last lines the process wrote.
                tokio::time::sleep(POLL * 2).await;
                tail.abort();
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
        job.id
    }
}

/// A serving process: our child, or one adopted after a restart.
enum Process {
    Child(Child),
    Adopted(ServingRecord),
}

impl Process {
    /// Waits until the process exits or the job is cancelled (then stops it: SIGTERM,
    /// SIGKILL after [`GRACE`]); answers the job's final state and a text.
    async fn run(self, pid: u32, job: &JobHandle) -> (JobState, String) {
        match self {
            Process::Child(mut child) => {
                tokio::select! {
                    status = child.wait() => match status {
                        Ok(s) if s.success() => (JobState::Finished, "exited 0".to_string()),
                        Ok(s) => (JobState::Failed, format!("exited {s}")),
                        Err(e) => (JobState::Failed, format!("wait failed: {e}")),
                    },
                    _ = job.cancel.cancelled() => {
                        signal(pid, libc::SIGTERM);
                        if tokio::time::timeout(GRACE, child.wait()).await.is_err() {
                            let _ = child.kill().await;
                        }
                        (JobState::Cancelled, "stopped".to_string())
                    }
                }
            }
            Process::Adopted(record) => {
                let gone = async {
                    while record.is_running() {
                        tokio::time::sleep(POLL).await;
                    }
                };
                tokio::select! {
                    _ = gone => (JobState::Failed, "exited (adopted: exit status unknown)".to_string()),
                    _ = job.cancel.cancelled() => {
                        signal(pid, libc::SIGTERM);
                        let gone = async {
                            while record.is_running() {
                                tokio::time::sleep(POLL).await;
                            }
                        };
                        if tokio::time::timeout(GRACE, gone).await.is_err() {
                            signal(pid, libc::SIGKILL);
                        }
                        (JobState::Cancelled, "stopped".to_string())
                    }
                }
            }
        }
    }
}

/// Streams the lines appended to `log` after byte `from` as job events.
async fn tail(log: PathBuf, from: u64, job: JobHandle) {
    let Ok(mut file) = tokio::fs::File::open(&log).await else {
        return;
    };
    if file.seek(std::io::SeekFrom::Start(from)).await.is_err() {
        return;
    }
    let mut lines = BufReader::new(file);
    let mut line = String::new();
    loop {
        match lines.read_line(&mut line).await {
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

impl Actor for ServingSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.current.is_some() {
            // An actor restart: the process and its watcher live on.
            return;
        }
        self.board.set(Field::Serving, "stopped");
        let record = match ServingRecord::load(&self.store) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot read the serving record: {e}; not re-adopting");
                None
            }
        };
        let Some(record) = record else {
            return;
        };
        if record.is_running() {
            tracing::info!(pid = record.pid, "re-adopting the running serving process");
            let from = log_len(&self.log);
            self.watch(ctx, Process::Adopted(record), record.pid, from, "adopted");
        } else {
            tracing::info!(
                pid = record.pid,
                "the recorded serving process is gone; starting the command anew"
            );
            if let Err(e) = self.spawn(ctx) {
                tracing::error!("{e}");
                self.board
                    .set(Field::Serving, format!("failed to restart: {e}"));
                if let Err(e) = ServingRecord::clear(&self.store) {
                    tracing::warn!("cannot clear the serving record: {e}");
                }
            }
        }
    }
}

impl Supervised for ServingSupervisor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.board.restarted();
    }
}

/// Start serving; answers the job id.
#[derive(Message)]
#[rtype(result = "Result<String, String>")]
pub struct StartServing;

/// The serving process ended.
#[derive(Message)]
#[rtype(result = "()")]
struct Exited {
    job: String,
    text: String,
}

impl Handler<StartServing> for ServingSupervisor {
    type Result = Result<String, String>;

    fn handle(&mut self, _msg: StartServing, ctx: &mut Context<Self>) -> Self::Result {
        let _span = actor_span(self.board.name(), "ServingSupervisor", "StartServing").entered();
        if let Some(job) = &self.current {
            return Err(format!(
                "already serving as job {}; cancel it first",
                job.id
            ));
        }
        self.spawn(ctx)
    }
}

impl Handler<Exited> for ServingSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Exited, _ctx: &mut Context<Self>) {
        if self.current.as_ref().is_some_and(|j| j.id == msg.job) {
            self.current = None;
        }
        self.board
            .set(Field::Serving, format!("{} (job {})", msg.text, msg.job));
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
