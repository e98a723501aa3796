//! TeacherActor: runs teacher generation (always resuming from the store's batch ledger),
//! nudging the shipper after every stored batch and the validator at the end.

use super::blocking;
use super::shipper::{Kick, ShardShipper};
use super::validator::{Validate, ValidatorActor};
use crate::config::TeacherSection;
use crate::status::{Field, StatusBoard};
use crate::trace::actor_span;
use crate::NodeError;
use actix::prelude::*;
use qatflow_gates::GateProfile;
use qatflow_store::Store;
use qatflow_teacher::{BackendSettings, CancellationToken, GenerateOptions, GenerationEvent};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tracing::Instrument;

/// Builds the generation options of a `[teacher]` section (resume always on).
pub fn generate_options(t: &TeacherSection) -> Result<GenerateOptions, NodeError> {
    let backend = BackendSettings {
        kind: t.backend,
        model: t.model.clone(),
        base_url: t.base_url.clone(),
        api_key_env: t.api_key_env.clone(),
        seed: t.seed,
        delay_ms: t.delay_ms,
        ..BackendSettings::default()
    }
    .config()
    .map_err(NodeError::Teacher)?;
    let profile = GateProfile::resolve(&t.profile)
        .map_err(|e| NodeError::Teacher(format!("teacher.profile: {e}")))?;
    let mut opts = GenerateOptions::new(backend, profile);
    opts.teacher_dir = t.teacher_dir.clone();
    opts.category = t.category.clone();
    opts.count = t.count;
    opts.per_batch = t.per_batch;
    opts.concurrency = t.concurrency;
    opts.max_requests = t.max_requests;
    opts.max_tokens = t.max_total_tokens;
    opts.resume = true;
    Ok(opts)
}

/// Generates conversations into the workstation's store.
pub struct TeacherActor {
    store: Store,
    options: GenerateOptions,
    shipper: Addr<ShardShipper>,
    validator: Addr<ValidatorActor>,
    board: StatusBoard,
    cancel: CancellationToken,
}

impl TeacherActor {
    /// A teacher writing into `store`.
    pub fn new(
        store: Store,
        options: GenerateOptions,
        shipper: Addr<ShardShipper>,
        validator: Addr<ValidatorActor>,
        board: StatusBoard,
        cancel: CancellationToken,
    ) -> TeacherActor {
        TeacherActor {
            store,
            options,
            shipper,
            validator,
            board,
            cancel,
        }
    }
}

impl Actor for TeacherActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.notify(Generate);
    }
}

impl Supervised for TeacherActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.board.restarted();
    }
}

/// Generate whatever the ledger lacks.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Generate;

impl Handler<Generate> for TeacherActor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _msg: Generate, _ctx: &mut Context<Self>) -> Self::Result {
        let span = actor_span(self.board.name(), "TeacherActor", "Generate");
        self.board.set(Field::Teacher, "generating");
        let mut options = self.options.clone();
        let batches = Arc::new(AtomicU64::new(0));
        let (shipper, board, seen) = (self.shipper.clone(), self.board.clone(), batches.clone());
        let in_generation = span.clone();
        let ledger = qatflow_teacher::Ledger::open(&self.store).ok();
        options.events = Some(Arc::new(move |e: &GenerationEvent| {
            if let GenerationEvent::BatchStored { .. } = e {
                let n = seen.fetch_add(1, Ordering::Relaxed) + 1;
                let spent = ledger
                    .as_ref()
                    .and_then(|l| l.spend().ok())
                    .map(|u| {
                        format!(
                            "; spent {} requests, {} tokens in all",
                            u.requests,
                            u.input_tokens + u.output_tokens
                        )
                    })
                    .unwrap_or_default();
                board.set(
                    Field::Teacher,
                    format!("generating: {n} batches stored{spent}"),
                );
                shipper.do_send(Kick {
                    flush: false,
                    parent: Some(in_generation.clone()),
                });
            }
        }));
        let (store, cancel) = (self.store.clone(), self.cancel.clone());
        let generation = span.clone();
        let inside = span.clone();
        let work = blocking(move || {
            // The library's logs and spans belong to this generation's trace.
            let _entered = inside.enter();
            qatflow_teacher::run_generation(&options, &store, &qatflow_core::NoProgress, &cancel)
        })
        .instrument(span);
        Box::pin(work.into_actor(self).map(move |result, act, ctx| {
            let after = |flush| Kick {
                flush,
                parent: Some(generation.clone()),
            };
            match result {
                Ok(Ok(report)) => {
                    let (accepted, rejected) = report
                        .categories
                        .values()
                        .fold((0, 0), |(a, r), c| (a + c.accepted, r + c.rejected));
                    let state = if report.cancelled {
                        "cancelled".to_string()
                    } else if report.cost_cap_reached {
                        format!("stopped ({})", report.cap)
                    } else if report.complete() {
                        "finished".to_string()
                    } else {
                        "incomplete".to_string()
                    };
                    let spent = report.total_usage;
                    act.board.set(
                        Field::Teacher,
                        format!(
                            "{state}: {accepted} accepted, {rejected} rejected this run, {} failed batches; spent {} requests, {} tokens in all",
                            report.failed_batches.len(),
                            spent.requests,
                            spent.input_tokens + spent.output_tokens
                        ),
                    );
                    act.validator.do_send(Validate {
                        parent: generation.clone(),
                    });
                    act.shipper.do_send(after(true));
                }
                Ok(Err(e)) => {
                    tracing::error!(actor = "TeacherActor", "generation failed: {e}");
                    act.board.set(Field::Teacher, format!("failed: {e}"));
                    act.shipper.do_send(after(true));
                }
                Err(panic) => {
                    tracing::error!(actor = "TeacherActor", "generation {panic}; restarting");
                    ctx.stop();
                }
            }
        }))
    }
}
