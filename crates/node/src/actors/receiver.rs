//! ShardReceiver: owns the GPU node's inbox and dataset store; the `Shards` service sends
//! it one message per query, chunk, end of stream and commit.

use super::blocking;
use crate::status::StatusBoard;
use crate::trace::actor_span_in;
use actix::prelude::*;
use qatflow_shards::{CommitOutcome, Inbox, QueryState, ShardError, ShardId};
use qatflow_store::Store;
use tracing::Instrument;

/// Why a receiver message failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The shard library refused or failed.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// The library code panicked; the actor restarts.
    #[error("the shard receiver {0}; it restarts, retry the call")]
    Panicked(String),
}

/// Receives shards; see the module docs.
pub struct ShardReceiver {
    inbox: Inbox,
    store: Store,
    board: StatusBoard,
}

impl ShardReceiver {
    /// A receiver importing into `store` through `inbox`.
    pub fn new(inbox: Inbox, store: Store, board: StatusBoard) -> ShardReceiver {
        ShardReceiver {
            inbox,
            store,
            board,
        }
    }

    fn run<T: Send + 'static>(
        &self,
        parent: &tracing::Span,
        message: &'static str,
        f: impl FnOnce(Inbox, Store) -> Result<T, ShardError> + Send + 'static,
    ) -> ResponseActFuture<Self, Result<T, ReceiveError>> {
        let span = actor_span_in(parent, self.board.name(), "ShardReceiver", message);
        let (inbox, store) = (self.inbox.clone(), self.store.clone());
        let work = blocking(move || f(inbox, store)).instrument(span.clone());
        Box::pin(
            work.into_actor(self)
                .map(move |result, _act, ctx| match result {
                    Ok(r) => r.map_err(ReceiveError::from),
                    Err(panic) => {
                        // Logged inside the message's span, so the trace records the failure too.
                        span.in_scope(|| {
                            tracing::error!(actor = "ShardReceiver", "{panic}; restarting")
                        });
                        ctx.stop();
                        Err(ReceiveError::Panicked(panic))
                    }
                }),
        )
    }
}

impl Actor for ShardReceiver {
    type Context = Context<Self>;
}

impl Supervised for ShardReceiver {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.board.restarted();
    }
}

/// How much of a shard is held.
#[derive(Message)]
#[rtype(result = "Result<QueryState, ReceiveError>")]
pub struct Query {
    /// The shard.
    pub id: ShardId,
    /// The sender's span.
    pub parent: tracing::Span,
}

/// Append a chunk.
#[derive(Message)]
#[rtype(result = "Result<u64, ReceiveError>")]
pub struct Append {
    /// The shard.
    pub id: ShardId,
    /// Where the chunk starts.
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
    /// The shard's whole size.
    pub total_size: u64,
    /// The sender's span.
    pub parent: tracing::Span,
}

/// Make the received bytes of a shard durable (end of an upload stream).
#[derive(Message)]
#[rtype(result = "Result<(), ReceiveError>")]
pub struct Sync {
    /// The shard.
    pub id: ShardId,
    /// The sender's span.
    pub parent: tracing::Span,
}

/// Verify, commit and import a shard.
#[derive(Message)]
#[rtype(result = "Result<CommitOutcome, ReceiveError>")]
pub struct Commit {
    /// The shard.
    pub id: ShardId,
    /// Its whole size.
    pub size: u64,
    /// The sender's span.
    pub parent: tracing::Span,
}

/// Test hook (debug builds only): panics inside the receiver's blocking work, as a bug in
/// the shard library would, so tests can watch the failure being logged in the actor's
/// span and the supervisor restarting the actor.
#[cfg(debug_assertions)]
#[derive(Message)]
#[rtype(result = "Result<(), ReceiveError>")]
pub struct InjectPanic {
    /// The sender's span.
    pub parent: tracing::Span,
}

#[cfg(debug_assertions)]
impl Handler<InjectPanic> for ShardReceiver {
    type Result = ResponseActFuture<Self, Result<(), ReceiveError>>;
    fn handle(&mut self, msg: InjectPanic, _ctx: &mut Context<Self>) -> Self::Result {
        self.run(
            &msg.parent,
            "InjectPanic",
            |_, _| -> Result<(), ShardError> { panic!("injected panic (test hook)") },
        )
    }
}

impl Handler<Query> for ShardReceiver {
    type Result = ResponseActFuture<Self, Result<QueryState, ReceiveError>>;
    fn handle(&mut self, msg: Query, _ctx: &mut Context<Self>) -> Self::Result {
        self.run(&msg.parent.clone(), "Query", move |inbox, _| {
            inbox.query(&msg.id)
        })
    }
}

impl Handler<Append> for ShardReceiver {
    type Result = ResponseActFuture<Self, Result<u64, ReceiveError>>;
    fn handle(&mut self, msg: Append, _ctx: &mut Context<Self>) -> Self::Result {
        self.run(&msg.parent.clone(), "Append", move |inbox, _| {
            inbox.append(&msg.id, msg.offset, &msg.data, msg.total_size)
        })
    }
}

impl Handler<Sync> for ShardReceiver {
    type Result = ResponseActFuture<Self, Result<(), ReceiveError>>;
    fn handle(&mut self, msg: Sync, _ctx: &mut Context<Self>) -> Self::Result {
        self.run(&msg.parent.clone(), "Sync", move |inbox, _| {
            inbox.sync(&msg.id)
        })
    }
}

impl Handler<Commit> for ShardReceiver {
    type Result = ResponseActFuture<Self, Result<CommitOutcome, ReceiveError>>;
    fn handle(&mut self, msg: Commit, _ctx: &mut Context<Self>) -> Self::Result {
        self.run(&msg.parent.clone(), "Commit", move |inbox, store| {
            let outcome = inbox.commit(&store, &msg.id, msg.size)?;
            tracing::info!(
                shard = %msg.id,
                imported = outcome.imported,
                duplicates = outcome.duplicates,
                already = outcome.already_committed,
                "shard committed"
            );
            Ok(outcome)
        })
    }
}
