//! TrainerActor: runs the QAT trainer on the GPU node's store in follow mode (it waits for
//! enough conversations, then takes in newly committed ones at epoch boundaries in store
//! order, recorded in its checkpoints), always resuming from the last valid checkpoint.
//! The run happens on a blocking thread; its events become job events and the status
//! board's training line. That a run was requested is recorded in the store's database
//! (tree `node_jobs`, key `train`) before it starts, so a node restarted after `kill -9`
//! resumes the run by itself.

use super::blocking;
use super::jobs::{Intent, JobError, JobHandle, JobHub};
use crate::status::StatusBoard;
use crate::trace::actor_span;
use actix::prelude::*;
use qatflow_proto::v1::{job_event, JobKind, JobState, Metric, Progress, TrainingStatus};
use qatflow_store::{Filter, Store, StoreError};
use qatflow_train::{Dataset, Follow, RunOptions, TrainConfig, TrainEvent, TrainSink};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::Instrument;

/// Runs training jobs.
pub struct TrainerActor {
    store: Store,
    config: TrainConfig,
    follow: Follow,
    auto_start: bool,
    jobs: JobHub,
    board: StatusBoard,
    current: Option<JobHandle>,
}

impl TrainerActor {
    /// A trainer of `config` on `store` (whose path replaces the config's data source).
    pub fn new(
        store: Store,
        mut config: TrainConfig,
        follow: Follow,
        auto_start: bool,
        jobs: JobHub,
        board: StatusBoard,
    ) -> TrainerActor {
        config.data.jsonl = None;
        config.data.store = Some(store.path().to_path_buf());
        TrainerActor {
            store,
            config,
            follow,
            auto_start,
            jobs,
            board,
            current: None,
        }
    }
}

/// The job record key of the training run's state (`running`, `finished`, `cancelled`).
const INTENT_KEY: &str = "train";

/// Why a training run stopped with an error.
#[derive(Debug, thiserror::Error)]
enum RunError {
    /// Recording the run's state failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The trainer failed.
    #[error(transparent)]
    Train(#[from] qatflow_train::TrainError),
}

impl Actor for TrainerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.current = None;
        if self.auto_start
            || Intent::new(&self.store, INTENT_KEY).get().as_deref() == Some("running")
        {
            ctx.notify(StartTraining);
        }
    }
}

impl Supervised for TrainerActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.board.restarted();
    }
}

/// Start (or resume) training; answers the job id.
#[derive(Message)]
#[rtype(result = "Result<String, JobError>")]
pub struct StartTraining;

/// Forwards trainer events to the job and the status board.
struct JobSink {
    job: JobHandle,
    board: StatusBoard,
    progress: Mutex<(Option<(Instant, u64)>, TrainingStatus)>,
}

impl TrainSink for JobSink {
    fn event(&self, event: &TrainEvent) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            TrainEvent::Started {
                total_steps,
                resumed_from,
                ..
            } => {
                p.1.state = match resumed_from {
                    Some(step) => format!("running, resumed from step {step}"),
                    None => "running".into(),
                };
                p.1.total_steps = *total_steps;
            }
            TrainEvent::Step {
                step,
                total_steps,
                loss,
                lr,
                ..
            } => {
                let (t0, s0) = *p.0.get_or_insert((Instant::now(), *step));
                let done = step.saturating_sub(s0);
                p.1.eta_s = if done > 0 {
                    let per_step = t0.elapsed().as_secs_f64() / done as f64;
                    (per_step * total_steps.saturating_sub(*step) as f64) as u64
                } else {
                    0
                };
                p.1.step = *step;
                p.1.total_steps = *total_steps;
                p.1.loss = *loss;
                self.job.emit(job_event::Event::Progress(Progress {
                    done: *step,
                    total: *total_steps,
                }));
                for (name, value) in [("loss", f64::from(*loss)), ("lr", *lr)] {
                    self.job.emit(job_event::Event::Metric(Metric {
                        name: name.into(),
                        value,
                        step: *step,
                    }));
                }
            }
            TrainEvent::Checkpoint { step, dir } => self.job.emit(job_event::Event::Message(
                format!("checkpoint at step {step}: {}", dir.display()),
            )),
            TrainEvent::Finished { steps } => {
                p.1.state = "finished".into();
                p.1.step = *steps;
                p.1.eta_s = 0;
            }
            TrainEvent::Message(m) => {
                if m.starts_with("waiting for data") {
                    p.1.state = m.clone();
                }
                self.job.emit(job_event::Event::Message(m.clone()));
            }
            TrainEvent::Calibrated { layers, samples } => self.job.emit(job_event::Event::Message(
                format!("calibrated {layers} quantized linears on {samples} samples"),
            )),
            TrainEvent::TeacherLoaded { dir, sft_weight } => {
                self.job.emit(job_event::Event::Message(format!(
                    "QAD teacher {} (SFT weight {sft_weight})",
                    dir.display()
                )))
            }
        }
        self.board.set_training(p.1.clone());
    }
}

impl Handler<StartTraining> for TrainerActor {
    type Result = Result<String, JobError>;

    fn handle(&mut self, _msg: StartTraining, ctx: &mut Context<Self>) -> Self::Result {
        let span = actor_span(self.board.name(), "TrainerActor", "StartTraining");
        if let Some(job) = &self.current {
            return Err(JobError::Busy {
                doing: "training",
                job: job.id.clone(),
            });
        }
        let job = self.jobs.create(JobKind::Train);
        job.state(JobState::Running);
        self.current = Some(job.clone());
        let sink = JobSink {
            job: job.clone(),
            board: self.board.clone(),
            progress: Mutex::new((
                None,
                TrainingStatus {
                    state: "starting".into(),
                    ..TrainingStatus::default()
                },
            )),
        };
        self.board.set_training(TrainingStatus {
            state: "starting".into(),
            ..TrainingStatus::default()
        });
        let (config, follow, store, jobs) = (
            self.config.clone(),
            self.follow.clone(),
            self.store.clone(),
            self.jobs.clone(),
        );
        let cancel = job.cancel.clone();
        let work = blocking(move || -> Result<_, RunError> {
            Intent::new(&store, INTENT_KEY).set("running")?;
            let summary = qatflow_train::train(
                &config,
                Dataset::Store {
                    store: Arc::new(store.clone()),
                    filter: Filter::default(),
                },
                RunOptions {
                    resume: true,
                    follow: Some(follow),
                },
                &sink,
                &cancel,
            )?;
            let saved = summary
                .last_checkpoint
                .as_ref()
                .map_or("no checkpoint".to_string(), |d| d.display().to_string());
            if summary.cancelled && jobs.is_shutting_down() {
                // Stopped by the node's shutdown: the intent stays `running`, so the
                // restarted node resumes from this checkpoint.
                tracing::info!(
                    actor = "TrainerActor",
                    step = summary.steps,
                    "training stopped for shutdown at step {}; saved {saved}",
                    summary.steps
                );
            } else {
                Intent::new(&store, INTENT_KEY).set(if summary.cancelled {
                    "cancelled"
                } else {
                    "finished"
                })?;
            }
            Ok(summary)
        })
        .instrument(span);
        let handle = job.clone();
        ctx.spawn(work.into_actor(self).map(move |result, act, ctx| {
            act.current = None;
            let mut status = TrainingStatus::default();
            match result {
                Ok(Ok(summary)) => {
                    status.step = summary.steps;
                    status.total_steps = summary.steps;
                    status.loss = summary.final_loss.unwrap_or(0.0);
                    if summary.cancelled {
                        status.state = "cancelled".into();
                        handle.state(JobState::Cancelled);
                    } else {
                        status.state = "finished".into();
                        handle.state(JobState::Finished);
                    }
                    act.board.set_training(status);
                }
                Ok(Err(e)) => {
                    tracing::error!(actor = "TrainerActor", "training failed: {e}");
                    handle.emit(job_event::Event::Message(e.to_string()));
                    handle.state(JobState::Failed);
                    status.state = format!("failed: {e}");
                    act.board.set_training(status);
                }
                Err(panic) => {
                    tracing::error!(actor = "TrainerActor", "training {panic}; restarting");
                    handle.emit(job_event::Event::Message(format!("trainer {panic}")));
                    handle.state(JobState::Failed);
                    ctx.stop();
                }
            }
        }));
        Ok(job.id)
    }
}
