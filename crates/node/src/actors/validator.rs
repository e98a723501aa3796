//! ValidatorActor: the dataset gates over the workstation's store, after generation
//! (every conversation was already checked on arrival by the teacher library).

use super::blocking;
use crate::status::{Field, StatusBoard};
use crate::trace::actor_span_in;
use actix::prelude::*;
use qatflow_gates::GateProfile;
use qatflow_store::Store;
use tracing::Instrument;

/// Checks the stored dataset against a gate profile.
pub struct ValidatorActor {
    store: Store,
    profile: GateProfile,
    board: StatusBoard,
}

impl ValidatorActor {
    /// A validator of `store` against `profile`.
    pub fn new(store: Store, profile: GateProfile, board: StatusBoard) -> ValidatorActor {
        ValidatorActor {
            store,
            profile,
            board,
        }
    }
}

impl Actor for ValidatorActor {
    type Context = Context<Self>;
}

impl Supervised for ValidatorActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.board.restarted();
    }
}

/// Evaluate the dataset gates now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Validate {
    /// The span of the work that asked (the teacher's generation), so the validation
    /// joins its trace.
    pub parent: tracing::Span,
}

impl Handler<Validate> for ValidatorActor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: Validate, _ctx: &mut Context<Self>) -> Self::Result {
        let span = actor_span_in(&msg.parent, self.board.name(), "ValidatorActor", "Validate");
        let (store, profile) = (self.store.clone(), self.profile.clone());
        let work = blocking(move || qatflow_teacher::validate_store(&store, &profile, None))
            .instrument(span);
        Box::pin(work.into_actor(self).map(|result, act, ctx| match result {
            Ok(Ok((stats, gates))) => {
                let passed = gates.iter().filter(|g| g.passed).count();
                act.board.set(
                    Field::Validation,
                    format!(
                        "{passed}/{} gates pass ({}), {} conversations",
                        gates.len(),
                        act.profile.name,
                        stats.lines
                    ),
                );
            }
            Ok(Err(e)) => act.board.set(Field::Validation, format!("failed: {e}")),
            Err(panic) => {
                tracing::error!(actor = "ValidatorActor", "validation {panic}; restarting");
                ctx.stop();
            }
        }))
    }
}
