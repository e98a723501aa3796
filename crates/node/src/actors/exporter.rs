//! ExporterActor: runs `qatflow export RUN_DIR --checkpoint latest-valid --out OUT --force`
//! as a separate process for an export job, streams its output lines as job events and
//! watches its exit. That an export was requested is recorded in the store's database
//! (tree `node_jobs`, key `export`) before it starts; a node restarted while it ran redoes
//! it from scratch (the export writes into a temporary directory and renames it into place
//! when complete, so a cut-off export leaves no output).

use super::jobs::{Intent, JobError, JobHandle, JobHub};
use super::serving::Promote;
use crate::status::{Field, StatusBoard};
use crate::trace::actor_span;
use actix::prelude::*;
use qatflow_proto::v1::{job_event, JobKind, JobState};
use qatflow_store::Store;
use std::path::PathBuf;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tracing::Instrument;

/// The job record key of the export's state.
const INTENT_KEY: &str = "export";

/// What the exporter runs.
#[derive(Debug, Clone)]
pub struct ExportPlan {
    /// The `qatflow` executable.
    pub program: PathBuf,
    /// The training run directory whose newest valid checkpoint is exported.
    pub run_dir: PathBuf,
    /// The output directory.
    pub out: PathBuf,
}

/// Runs export jobs.
pub struct ExporterActor {
    plan: ExportPlan,
    store: Store,
    jobs: JobHub,
    board: StatusBoard,
    current: Option<JobHandle>,
    on_finished: Option<Recipient<Promote>>,
}

impl ExporterActor {
    /// An exporter following `plan`, recording its intent in `store`'s database.
    pub fn new(plan: ExportPlan, store: Store, jobs: JobHub, board: StatusBoard) -> ExporterActor {
        ExporterActor {
            plan,
            store,
            jobs,
            board,
            current: None,
            on_finished: None,
        }
    }

    /// Sends every finished export to `serving` as a candidate (`[serving.promote]
    /// on_export`).
    pub fn promote_to(mut self, serving: Recipient<Promote>) -> ExporterActor {
        self.on_finished = Some(serving);
        self
    }

    fn set_intent(&self, state: &str) {
        if let Err(e) = Intent::new(&self.store, INTENT_KEY).set(state) {
            tracing::error!(
                actor = "ExporterActor",
                "cannot record the export state: {e}"
            );
        }
    }

    fn intent(&self) -> Option<String> {
        Intent::new(&self.store, INTENT_KEY).get()
    }
}

impl Actor for ExporterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.current = None;
        match self.intent().as_deref() {
            Some("running") => {
                self.board
                    .set(Field::Export, "redoing an interrupted export");
                ctx.notify(StartExport);
            }
            Some(state) => self.board.set(Field::Export, state.to_string()),
            None => self.board.set(Field::Export, "none"),
        }
    }
}

impl Supervised for ExporterActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.board.restarted();
    }
}

/// Start an export; answers the job id.
#[derive(Message)]
#[rtype(result = "Result<String, JobError>")]
pub struct StartExport;

/// The export process ended.
#[derive(Message)]
#[rtype(result = "()")]
struct Ended {
    job: String,
    state: JobState,
    text: String,
}

impl Handler<StartExport> for ExporterActor {
    type Result = Result<String, JobError>;

    fn handle(&mut self, _msg: StartExport, ctx: &mut Context<Self>) -> Self::Result {
        let span = actor_span(self.board.name(), "ExporterActor", "StartExport");
        if let Some(job) = &self.current {
            return Err(JobError::Busy {
                doing: "exporting",
                job: job.id.clone(),
            });
        }
        // Recorded before the process starts (a short sled write and flush).
        self.set_intent("running");
        let p = &self.plan;
        let mut child = Command::new(&p.program)
            .arg("export")
            .arg(&p.run_dir)
            .args(["--checkpoint", "latest-valid", "--force", "--out"])
            .arg(&p.out)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| JobError::Start(format!("cannot start {}: {e}", p.program.display())))?;
        let job = self.jobs.create(JobKind::Export);
        job.state(JobState::Running);
        self.board
            .set(Field::Export, format!("running (job {})", job.id));
        self.current = Some(job.clone());
        let me = ctx.address();
        let handle = job.clone();
        let out = p.out.clone();
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        tokio::spawn(
            async move {
                for pipe in [
                    stdout.map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                    stderr.map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                ]
                .into_iter()
                .flatten()
                {
                    let h = handle.clone();
                    tokio::spawn(async move {
                        let mut lines = BufReader::new(pipe).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            h.emit(job_event::Event::Message(line));
                        }
                    });
                }
                let (state, text) = tokio::select! {
                    status = child.wait() => match status {
                        Ok(s) if s.success() => (JobState::Finished, format!("finished {}", out.display())),
                        Ok(s) => (JobState::Failed, format!("failed: export {s}")),
                        Err(e) => (JobState::Failed, format!("failed: {e}")),
                    },
                    _ = handle.cancel.cancelled() => {
                        let _ = child.kill().await;
                        (JobState::Cancelled, "cancelled".to_string())
                    }
                };
                me.do_send(Ended {
                    job: handle.id.clone(),
                    state,
                    text,
                });
            }
            .instrument(span),
        );
        Ok(job.id)
    }
}

impl Handler<Ended> for ExporterActor {
    type Result = ();

    fn handle(&mut self, msg: Ended, _ctx: &mut Context<Self>) {
        // An export stopped by the node's shutdown stays `running`: the restarted node
        // runs it again.
        if msg.state == JobState::Cancelled && self.jobs.is_shutting_down() {
            tracing::info!(actor = "ExporterActor", job = %msg.job, "export process stopped for shutdown; it runs again when the node restarts");
        } else {
            self.set_intent(&msg.text);
        }
        if let Some(job) = self.current.take_if(|j| j.id == msg.job) {
            job.state(msg.state);
        }
        if let (JobState::Finished, Some(serving)) = (msg.state, &self.on_finished) {
            serving.do_send(Promote {
                candidate: Some(self.plan.out.clone()),
                take: true,
            });
        }
        self.board.set(Field::Export, msg.text);
    }
}
