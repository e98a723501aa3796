//! ShardShipper: seals newly accepted conversations into shards and ships every shard the
//! receiver has not committed, resuming at the receiver's committed offset.
//!
//! One round at a time: a kick that arrives during a round schedules one more. Rounds also
//! run on a timer, so a peer that was down is retried. A round beats a [`Heartbeat`] as it
//! seals, queries, sends each chunk and commits; one that stops progressing for
//! `shipper.stall_timeout_ms` (a peer that stopped answering mid-stream) is aborted by the
//! watchdog and the shipper restarts; the next round resumes at the receiver's offset.
//!
//! The outbox marks a shard shipped only after the receiver answered its commit; a crash
//! before that re-sends from the receiver's offset and the commit is idempotent, so nothing
//! is lost or duplicated.
//!
//! Tracing: a round a generation kicked runs in the generation's trace. A round the timer
//! starts (a peer that was down, data left over) has its own trace, and each of its
//! `ship_shard` spans carries span links to the generations whose data waited for it, so a
//! conversation's generation, validation, shard and commit stay connected either way.

use super::blocking;
use crate::client::{AuthChannel, ShardsClient};
use crate::status::{Field, StatusBoard};
use crate::trace::actor_span_in;
use crate::watchdog::{self, Heartbeat};
use actix::prelude::*;
use opentelemetry::trace::{SpanContext, TraceContextExt};
use qatflow_proto::v1::{CommitShardRequest, QueryShardRequest, ShardChunk};
use qatflow_proto::MAX_CHUNK_BYTES;
use qatflow_shards::{Outbox, SealLimits, ShardMeta};
use qatflow_store::Store;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// What a shipper works with.
pub struct ShipperParts {
    /// The workstation's dataset store.
    pub store: Store,
    /// Its outbox.
    pub outbox: Outbox,
    /// When shards are sealed.
    pub limits: SealLimits,
    /// The receiver.
    pub client: ShardsClient<AuthChannel>,
    /// How often to look for work.
    pub poll: Duration,
    /// A round that makes no progress for this long is aborted and the shipper restarts.
    pub stall_timeout: Duration,
}

/// Ships shards; see the module docs.
pub struct ShardShipper {
    parts: Arc<ShipperParts>,
    board: StatusBoard,
    busy: bool,
    again: Option<bool>,
    idle_len: usize,
    heartbeat: Heartbeat,
    backoff: Option<Backoff>,
    parent: Option<tracing::Span>,
    /// Span contexts of the generations that kicked since data last shipped: the links of
    /// the next round's `ship_shard` spans.
    origins: Vec<SpanContext>,
}

/// Most generations a shipping round links to (the newest are kept).
const MAX_ORIGINS: usize = 32;

/// The OpenTelemetry context of `span`, when it is sampled into a trace.
fn span_context(span: &tracing::Span) -> Option<SpanContext> {
    let cx = span.context().span().span_context().clone();
    cx.is_valid().then_some(cx)
}

impl ShardShipper {
    /// A shipper over `parts`.
    pub fn new(parts: Arc<ShipperParts>, board: StatusBoard) -> ShardShipper {
        ShardShipper {
            parts,
            board,
            busy: false,
            again: None,
            idle_len: usize::MAX,
            heartbeat: Heartbeat::default(),
            backoff: None,
            parent: None,
            origins: Vec::new(),
        }
    }

    /// Keeps `contexts` (generations whose data is not shipped yet) for the next round's
    /// links, without repeats and at most [`MAX_ORIGINS`] of them.
    fn remember(&mut self, contexts: impl Iterator<Item = SpanContext>) {
        for cx in contexts {
            if !self.origins.contains(&cx) {
                self.origins.push(cx);
            }
        }
        let excess = self.origins.len().saturating_sub(MAX_ORIGINS);
        self.origins.drain(..excess);
    }
}

impl Actor for ShardShipper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.busy = false;
        self.board.set(Field::Shipper, "idle");
        watchdog::watch(
            ctx,
            self.board.name(),
            "ShardShipper",
            self.heartbeat.clone(),
            self.parts.stall_timeout,
        );
        ctx.run_interval(self.parts.poll, |act, ctx| {
            // A store that did not grow since the last tick is idle: seal what is left.
            let len = act.parts.store.len();
            let flush = len == act.idle_len;
            act.idle_len = len;
            ctx.notify(Kick {
                flush,
                parent: None,
            });
        });
        ctx.notify(Kick {
            flush: false,
            parent: None,
        });
    }
}

impl Supervised for ShardShipper {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.board.restarted();
    }
}

/// Seal and ship now; `flush` also seals a last, partial shard.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Kick {
    /// Seal a partial shard too (generation finished or idle).
    pub flush: bool,
    /// The span of the work that produced the data (the teacher's generation), so the
    /// shipping round, and through `traceparent` the receiver's commit, join its trace.
    pub parent: Option<tracing::Span>,
}

impl Handler<Kick> for ShardShipper {
    type Result = ();

    fn handle(&mut self, msg: Kick, ctx: &mut Context<Self>) {
        if let Some(parent) = &msg.parent {
            self.parent = Some(parent.clone());
            self.remember(span_context(parent).into_iter());
        }
        if self.busy {
            self.again = Some(self.again.unwrap_or(false) || msg.flush);
            return;
        }
        if self
            .backoff
            .as_ref()
            .is_some_and(|b| Instant::now() < b.until)
        {
            return;
        }
        self.busy = true;
        let hb = self.heartbeat.clone();
        // Created by the round only when it has shards to ship: an idle poll leaves no
        // trace.
        // Taken, not cloned: a span is exported only once every handle to it is dropped,
        // so keeping the generation's span here would keep its trace from ever closing.
        let span = (
            self.board.name().to_string(),
            self.parent.take().unwrap_or_else(tracing::Span::current),
        );
        let links = std::mem::take(&mut self.origins);
        let work = round(
            self.parts.clone(),
            self.board.clone(),
            msg.flush,
            hb.clone(),
            span,
            links.clone(),
        );
        let round = tokio::spawn(work);
        hb.start(round.abort_handle());
        ctx.spawn(round.into_actor(self).map(|result, act, ctx| {
            act.busy = false;
            act.heartbeat.finish();
            match result {
                Ok(Ok(shipped)) => {
                    act.backoff = None;
                    if shipped == 0 {
                        act.remember(links.into_iter());
                    }
                }
                Ok(Err(e)) if e.unauthorized => {
                    act.remember(links.into_iter());
                    // A wrong token does not fix itself: retry less and less often, and
                    // warn only when the wait grows.
                    let wait = act
                        .backoff
                        .as_ref()
                        .map_or(AUTH_BACKOFF_MIN, |b| (b.wait * 2).min(AUTH_BACKOFF_MAX));
                    if act.backoff.as_ref().is_none_or(|b| b.wait != wait) {
                        tracing::warn!(
                            actor = "ShardShipper",
                            "{}; the peer refuses this node's token, next try in {} s",
                            e.text,
                            wait.as_secs()
                        );
                    }
                    act.backoff = Some(Backoff {
                        until: Instant::now() + wait,
                        wait,
                    });
                    act.board.set(
                        Field::Shipper,
                        format!(
                            "unauthorized by the peer (check auth.token_* on both nodes): {}; next try in {} s",
                            e.text,
                            wait.as_secs()
                        ),
                    );
                }
                Ok(Err(e)) => {
                    act.remember(links.into_iter());
                    act.backoff = None;
                    tracing::warn!(actor = "ShardShipper", "{}; retrying", e.text);
                    act.board.set(Field::Shipper, format!("retrying: {}", e.text));
                }
                // Aborted by the watchdog, which already stopped the actor.
                Err(e) if e.is_cancelled() => return,
                Err(e) => {
                    tracing::error!(actor = "ShardShipper", "round failed: {e}; restarting");
                    ctx.stop();
                    return;
                }
            }
            if let Some(flush) = act.again.take() {
                ctx.notify(Kick {
                    flush,
                    parent: None,
                });
            }
        }));
    }
}

/// First wait after the peer refused the token.
const AUTH_BACKOFF_MIN: Duration = Duration::from_secs(5);
/// Longest wait between tries while the peer refuses the token.
const AUTH_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Rounds are skipped until `until` (the peer refused the token).
struct Backoff {
    until: Instant,
    wait: Duration,
}

/// Why a round failed.
struct RoundError {
    text: String,
    /// The peer refused the bearer token.
    unauthorized: bool,
}

impl From<String> for RoundError {
    fn from(text: String) -> RoundError {
        RoundError {
            text,
            unauthorized: false,
        }
    }
}

/// One round: seal, then ship every pending shard in order, inside a
/// `ShardShipper.Kick` span of node `span.0` (child of `span.1`) that exists only when
/// there is something to ship.
async fn round(
    parts: Arc<ShipperParts>,
    board: StatusBoard,
    flush: bool,
    hb: Heartbeat,
    span: (String, tracing::Span),
    links: Vec<SpanContext>,
) -> Result<usize, RoundError> {
    let p = parts.clone();
    blocking(move || p.outbox.seal(&p.store, &p.limits, flush))
        .await?
        .map_err(|e| e.to_string())?;
    hb.beat();
    let p = parts.clone();
    let pending = blocking(move || p.outbox.pending())
        .await?
        .map_err(|e| e.to_string())?;
    if pending.is_empty() {
        return Ok(0);
    }
    let shipped = pending.len();
    let kick = actor_span_in(&span.1, &span.0, "ShardShipper", "Kick");
    ship_all(parts, board, pending, hb, span.0, links)
        .instrument(kick)
        .await?;
    Ok(shipped)
}

/// Ships `pending` in order, then reports the shipper idle (with the rejected shards).
async fn ship_all(
    parts: Arc<ShipperParts>,
    board: StatusBoard,
    pending: Vec<ShardMeta>,
    hb: Heartbeat,
    node: String,
    links: Vec<SpanContext>,
) -> Result<(), RoundError> {
    for meta in pending {
        hb.beat();
        board.set(Field::Shipper, format!("shipping {}", meta.id));
        let span = tracing::info_span!(
            "ship_shard",
            node.name = %node,
            shard.id = %meta.id,
            shard.size = meta.size
        );
        for cx in &links {
            span.add_link(cx.clone());
        }
        ship(&parts, &meta, &hb).instrument(span).await?;
    }
    let p = parts.clone();
    let rejected = blocking(move || p.outbox.rejected())
        .await?
        .map_err(|e| e.to_string())?;
    match rejected.last().and_then(|m| m.rejected.as_ref()) {
        None => board.set(Field::Shipper, "idle"),
        Some(last) => board.set(
            Field::Shipper,
            format!(
                "idle; {} shard(s) rejected by the receiver, last: {last}",
                rejected.len()
            ),
        ),
    }
    Ok(())
}

/// Ships one shard: query the committed offset, upload the rest, commit, record. Answers
/// the receiver's reason when it rejected the shard for good (recorded in the outbox).
async fn ship(
    parts: &Arc<ShipperParts>,
    meta: &ShardMeta,
    hb: &Heartbeat,
) -> Result<Option<String>, RoundError> {
    let mut client = parts.client.clone();
    let id = meta.id.to_string();
    let rpc = |what: &str, s: tonic::Status| format!("{what} of shard {id}: {}", s.message());
    match ship_rpcs(parts, meta, hb, &mut client, &id).await {
        Err(Failure::Rpc(_, s)) if crate::server::is_rejection(&s) => {
            // Rejected for good: recorded, so no round retries it.
            let reason = s.message().to_string();
            tracing::error!(shard = %meta.id, "{reason}");
            let (p, shard, r) = (parts.clone(), meta.id.clone(), reason.clone());
            blocking(move || p.outbox.mark_rejected(&shard, &r))
                .await?
                .map_err(|e| e.to_string())?;
            return Ok(Some(reason));
        }
        Err(Failure::Rpc(what, s)) => {
            return Err(RoundError {
                unauthorized: s.code() == tonic::Code::Unauthenticated,
                text: rpc(what, s),
            })
        }
        Err(Failure::Other(e)) => return Err(e.into()),
        Ok(()) => {}
    }
    let (p, shard) = (parts.clone(), meta.id.clone());
    blocking(move || p.outbox.mark_shipped(&shard))
        .await?
        .map_err(|e| e.to_string())?;
    Ok(None)
}

/// Why shipping one shard stopped.
enum Failure {
    /// An RPC (named) failed.
    Rpc(&'static str, tonic::Status),
    /// Something local failed.
    Other(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Failure {
        Failure::Other(e)
    }
}

/// The RPCs of shipping one shard: query, upload the rest, commit.
async fn ship_rpcs(
    parts: &Arc<ShipperParts>,
    meta: &ShardMeta,
    hb: &Heartbeat,
    client: &mut ShardsClient<AuthChannel>,
    id: &str,
) -> Result<(), Failure> {
    let rpc = |what: &'static str| move |s: tonic::Status| Failure::Rpc(what, s);
    let q = client
        .query_shard(QueryShardRequest {
            shard_id: id.to_string(),
        })
        .await
        .map_err(rpc("query"))?
        .into_inner();
    hb.beat();
    if !q.committed {
        if q.committed_offset < meta.size {
            let (p, m) = (parts.clone(), meta.clone());
            let bytes = blocking(move || p.outbox.read(&m))
                .await?
                .map_err(|e| e.to_string())?;
            let start = q.committed_offset as usize;
            let chunks: Vec<ShardChunk> = bytes[start..]
                .chunks(MAX_CHUNK_BYTES)
                .enumerate()
                .map(|(i, data)| ShardChunk {
                    shard_id: id.to_string(),
                    offset: (start + i * MAX_CHUNK_BYTES) as u64,
                    data: data.to_vec(),
                    total_size: meta.size,
                })
                .collect();
            // Each chunk tonic takes from the stream is progress.
            let beat = hb.clone();
            let chunks = tokio_stream::iter(chunks).map(move |c| {
                beat.beat();
                c
            });
            client.upload_shard(chunks).await.map_err(rpc("upload"))?;
        }
        client
            .commit_shard(CommitShardRequest {
                shard_id: id.to_string(),
                size: meta.size,
            })
            .await
            .map_err(rpc("commit"))?;
        hb.beat();
    }
    Ok(())
}
