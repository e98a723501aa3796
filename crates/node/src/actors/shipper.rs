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

use super::blocking;
use crate::client::{AuthChannel, ShardsClient};
use crate::status::{Field, StatusBoard};
use crate::trace::actor_span;
use crate::watchdog::{self, Heartbeat};
use actix::prelude::*;
use qatflow_proto::v1::{CommitShardRequest, QueryShardRequest, ShardChunk};
use qatflow_proto::MAX_CHUNK_BYTES;
use qatflow_shards::{Outbox, SealLimits, ShardMeta};
use qatflow_store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use tracing::Instrument;

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
        }
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
            ctx.notify(Kick { flush });
        });
        ctx.notify(Kick { flush: false });
    }
}

impl Supervised for ShardShipper {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.board.restarted();
    }
}

/// Seal and ship now; `flush` also seals a last, partial shard.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Kick {
    /// Seal a partial shard too (generation finished or idle).
    pub flush: bool,
}

impl Handler<Kick> for ShardShipper {
    type Result = ();

    fn handle(&mut self, msg: Kick, ctx: &mut Context<Self>) {
        if self.busy {
            self.again = Some(self.again.unwrap_or(false) || msg.flush);
            return;
        }
        self.busy = true;
        let span = actor_span(self.board.name(), "ShardShipper", "Kick");
        let hb = self.heartbeat.clone();
        let work = round(
            self.parts.clone(),
            self.board.clone(),
            msg.flush,
            hb.clone(),
        )
        .instrument(span);
        let round = tokio::spawn(work);
        hb.start(round.abort_handle());
        ctx.spawn(round.into_actor(self).map(|result, act, ctx| {
            act.busy = false;
            act.heartbeat.finish();
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(actor = "ShardShipper", "{e}; retrying");
                    act.board.set(Field::Shipper, format!("retrying: {e}"));
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
                ctx.notify(Kick { flush });
            }
        }));
    }
}

/// One round: seal, then ship every pending shard in order.
async fn round(
    parts: Arc<ShipperParts>,
    board: StatusBoard,
    flush: bool,
    hb: Heartbeat,
) -> Result<(), String> {
    let p = parts.clone();
    blocking(move || p.outbox.seal(&p.store, &p.limits, flush))
        .await?
        .map_err(|e| e.to_string())?;
    hb.beat();
    let p = parts.clone();
    let pending = blocking(move || p.outbox.pending())
        .await?
        .map_err(|e| e.to_string())?;
    for meta in pending {
        hb.beat();
        board.set(Field::Shipper, format!("shipping {}", meta.id));
        let span = tracing::info_span!("ship_shard", shard.id = %meta.id, shard.size = meta.size);
        ship(&parts, &meta, &hb).instrument(span).await?;
    }
    board.set(Field::Shipper, "idle");
    Ok(())
}

/// Ships one shard: query the committed offset, upload the rest, commit, record.
async fn ship(parts: &Arc<ShipperParts>, meta: &ShardMeta, hb: &Heartbeat) -> Result<(), String> {
    let mut client = parts.client.clone();
    let id = meta.id.to_string();
    let rpc = |what: &str, s: tonic::Status| format!("{what} of shard {id}: {}", s.message());
    let q = client
        .query_shard(QueryShardRequest {
            shard_id: id.clone(),
        })
        .await
        .map_err(|s| rpc("query", s))?
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
                    shard_id: id.clone(),
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
            client
                .upload_shard(chunks)
                .await
                .map_err(|s| rpc("upload", s))?;
        }
        client
            .commit_shard(CommitShardRequest {
                shard_id: id.clone(),
                size: meta.size,
            })
            .await
            .map_err(|s| rpc("commit", s))?;
        hb.beat();
    }
    let (p, shard) = (parts.clone(), meta.id.clone());
    blocking(move || p.outbox.mark_shipped(&shard))
        .await?
        .map_err(|e| e.to_string())
}
