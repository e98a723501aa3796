//! ServingSupervisor: starts the configured serving command as a child process for a serve
//! job, streams its output lines as job events, and stops it when the job is cancelled.
//! (Health checks of a real inference server come with the serving issue.)

use super::jobs::{JobHandle, JobHub};
use crate::status::{Field, StatusBoard};
use crate::trace::actor_span;
use actix::prelude::*;
use qatflow_proto::v1::{job_event, JobState};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tracing::Instrument;

/// Supervises the serving process.
pub struct ServingSupervisor {
    command: Vec<String>,
    jobs: JobHub,
    board: StatusBoard,
    current: Option<JobHandle>,
}

impl ServingSupervisor {
    /// A supervisor of `command` (program and arguments).
    pub fn new(command: Vec<String>, jobs: JobHub, board: StatusBoard) -> ServingSupervisor {
        ServingSupervisor {
            command,
            jobs,
            board,
            current: None,
        }
    }
}

impl Actor for ServingSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        self.board.set(Field::Serving, "stopped");
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
        let Some((program, args)) = self.command.split_first() else {
            return Err(
                "no serving command configured: set [serving] command in the node config".into(),
            );
        };
        if let Some(job) = &self.current {
            return Err(format!(
                "already serving as job {}; cancel it first",
                job.id
            ));
        }
        let mut child = Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start serving command {program:?}: {e}"))?;
        let job = self.jobs.create("serve");
        job.state(JobState::Running);
        self.board.set(
            Field::Serving,
            format!("running (pid {}, job {})", child.id().unwrap_or(0), job.id),
        );
        self.current = Some(job.clone());
        let stdout = child.stdout.take();
        let me = ctx.address();
        let handle = job.clone();
        tokio::spawn(
            async move {
                if let Some(out) = stdout {
                    let mut lines = BufReader::new(out).lines();
                    let h = handle.clone();
                    tokio::spawn(async move {
                        while let Ok(Some(line)) = lines.next_line().await {
                            h.emit(job_event::Event::Message(line));
                        }
                    });
                }
                let (state, text) = tokio::select! {
                    status = child.wait() => match status {
                        Ok(s) if s.success() => (JobState::Finished, "exited 0".to_string()),
                        Ok(s) => (JobState::Failed, format!("exited {s}")),
                        Err(e) => (JobState::Failed, format!("wait failed: {e}")),
                    },
                    _ = handle.cancel.cancelled() => {
                        let _ = child.kill().await;
                        (JobState::Cancelled, "stopped".to_string())
                    }
                };
                handle.state(state);
                me.do_send(Exited {
                    job: handle.id.clone(),
                    text,
                });
            }
            .instrument(tracing::info_span!("serving_process")),
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
        self.board
            .set(Field::Serving, format!("{} (job {})", msg.text, msg.job));
    }
}
