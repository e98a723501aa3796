//! The tonic services: `Node` (health, info, status), `Shards` (resumable upload into the
//! ShardReceiver) and `Jobs` (serving through the ServingSupervisor). Every RPC runs in a
//! span whose parent is the caller's (from `traceparent`); the bearer token is checked by
//! [`ServerAuth`] before any handler runs; shard ids are validated and chunk sizes bounded
//! before anything reaches the receiver.

use crate::actors::blocking;
use crate::actors::exporter::{ExporterActor, StartExport};
use crate::actors::jobs::{JobError, JobHub};
use crate::actors::receiver::{Append, Commit, Query, ReceiveError, ShardReceiver, Sync};
use crate::actors::serving::{Promote, ServingSupervisor, StartServing};
use crate::actors::trainer::{StartTraining, TrainerActor};
use crate::auth::ServerAuth;
use crate::client::{AuthChannel, NodeClient};
use crate::status::StatusBoard;
use crate::trace::rpc_span;
use actix::dev::ToEnvelope;
use actix::{Actor, Addr, Handler, MailboxError, Message};
use qatflow_proto::v1::jobs_server::{Jobs, JobsServer};
use qatflow_proto::v1::node_server::{Node, NodeServer};
use qatflow_proto::v1::shards_server::{Shards, ShardsServer};
use qatflow_proto::v1::*;
use qatflow_proto::{MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES};
use qatflow_shards::{Inbox, Outbox, ShardError, ShardId};
use qatflow_store::Store;
use std::pin::Pin;
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::Router;
use tonic::transport::ServerTlsConfig;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// The workstation half of a node, as the status call sees it.
#[derive(Clone)]
pub struct WorkstationView {
    /// Its store.
    pub store: Store,
    /// Its outbox.
    pub outbox: Outbox,
    /// Its status board.
    pub board: StatusBoard,
}

/// The spark half of a node.
#[derive(Clone)]
pub struct SparkView {
    /// Its store.
    pub store: Store,
    /// Its inbox.
    pub inbox: Inbox,
    /// Its status board.
    pub board: StatusBoard,
    /// The receiver actor.
    pub receiver: Addr<ShardReceiver>,
    /// The serving actor.
    pub serving: Addr<ServingSupervisor>,
    /// The trainer actor, when the node has a `[trainer]` section.
    pub trainer: Option<Addr<TrainerActor>>,
    /// The exporter actor, when the node has an `[exporter]` section.
    pub exporter: Option<Addr<ExporterActor>>,
    /// The node's jobs.
    pub jobs: JobHub,
}

/// Everything the services need.
#[derive(Clone)]
pub struct Services {
    /// Node name.
    pub name: String,
    /// Role name.
    pub role: String,
    /// The workstation half, if this node runs it.
    pub workstation: Option<WorkstationView>,
    /// The spark half, if this node runs it.
    pub spark: Option<SparkView>,
    /// The peer to ask for its status (workstation role).
    pub peer: Option<NodeClient<AuthChannel>>,
}

/// How long the `Status` call waits for the peer's status.
const PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn mailbox(e: MailboxError) -> Status {
    Status::unavailable(format!("the shard receiver is restarting ({e}); retry"))
}

fn receive_status(e: ReceiveError) -> Status {
    match e {
        ReceiveError::Panicked(_) => Status::unavailable(e.to_string()),
        ReceiveError::Shard(s) => shard_status(s),
    }
}

/// Metadata key on the answer about a shard the receiver rejected for good: the sender
/// stops retrying it (see [`is_rejection`]).
pub const REJECTED_HEADER: &str = "qatflow-shard-rejected";

/// True when `status` says the receiver rejected the shard for good.
pub fn is_rejection(status: &Status) -> bool {
    status.metadata().get(REJECTED_HEADER).is_some()
}

fn rejection(text: String) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(
        REJECTED_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    Status::with_metadata(tonic::Code::FailedPrecondition, text, metadata)
}

fn shard_status(e: ShardError) -> Status {
    let text = e.to_string();
    match e {
        ShardError::Rejected { .. } => rejection(text),
        ShardError::InvalidId { .. } | ShardError::TooLarge { .. } | ShardError::Format { .. } => {
            Status::invalid_argument(text)
        }
        ShardError::OffsetMismatch { .. } => Status::failed_precondition(text),
        ShardError::Checksum { .. } => Status::data_loss(text),
        _ => Status::internal(text),
    }
}

fn parse_id(id: &str) -> Result<ShardId, Status> {
    ShardId::parse(id).map_err(shard_status)
}

impl Services {
    fn spark(&self) -> Result<&SparkView, Status> {
        self.spark.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "node {} has role {}: it does not receive shards or run jobs",
                self.name, self.role
            ))
        })
    }

    async fn own_status(&self) -> Result<Vec<NodeStatus>, Status> {
        let mut out = Vec::new();
        let suffix = |part: &str| {
            if self.role == "all" {
                format!("{}/{part}", self.name)
            } else {
                self.name.clone()
            }
        };
        if let Some(ws) = self.workstation.clone() {
            let mut s = ws.board.snapshot();
            s.name = suffix("workstation");
            s.role = "workstation".into();
            let counts = blocking(move || -> Result<_, String> {
                let stats = ws.store.stats().map_err(|e| e.to_string())?;
                let (sealed, shipped) = ws.outbox.counts().map_err(|e| e.to_string())?;
                Ok((stats.conversations, stats.clean, sealed, shipped))
            })
            .await
            .and_then(|r| r)
            .map_err(Status::internal)?;
            (
                s.stored_conversations,
                s.accepted_conversations,
                s.shards_sealed,
                s.shards_shipped,
            ) = counts;
            out.push(s);
        }
        if let Some(sp) = self.spark.clone() {
            let mut s = sp.board.snapshot();
            s.name = suffix("spark");
            s.role = "spark".into();
            let counts = blocking(move || -> Result<_, String> {
                let stats = sp.store.stats().map_err(|e| e.to_string())?;
                Ok((stats.conversations, stats.clean, sp.inbox.committed_count()))
            })
            .await
            .and_then(|r| r)
            .map_err(Status::internal)?;
            (
                s.stored_conversations,
                s.accepted_conversations,
                s.shards_committed,
            ) = counts;
            out.push(s);
        }
        Ok(out)
    }

    /// The router with the three services behind the token check and the size limits,
    /// serving TLS when `tls` is given.
    pub fn router(
        self,
        token: Option<&str>,
        tls: Option<ServerTlsConfig>,
    ) -> Result<Router, tonic::transport::Error> {
        let auth = ServerAuth::new(token);
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls)?;
        }
        Ok(server
            .add_service(InterceptedService::new(
                NodeServer::new(self.clone()),
                auth.clone(),
            ))
            .add_service(InterceptedService::new(
                ShardsServer::new(self.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
                auth.clone(),
            ))
            .add_service(InterceptedService::new(JobsServer::new(self), auth)))
    }
}

#[tonic::async_trait]
impl Node for Services {
    async fn health(&self, r: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let _span = rpc_span(&self.name, "Node/Health", r.metadata()).entered();
        Ok(Response::new(HealthResponse {
            status: "ok".into(),
        }))
    }

    async fn info(&self, r: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let _span = rpc_span(&self.name, "Node/Info", r.metadata()).entered();
        Ok(Response::new(InfoResponse {
            role: self.role.clone(),
            name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            max_chunk_bytes: MAX_CHUNK_BYTES as u64,
            max_shard_bytes: self
                .spark
                .as_ref()
                .map_or(0, |s| s.inbox.limits().max_shard_bytes),
        }))
    }

    async fn status(&self, r: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let span = rpc_span(&self.name, "Node/Status", r.metadata());
        let include_peer = r.into_inner().include_peer;
        async move {
            let mut nodes = self.own_status().await?;
            let mut peer_error = String::new();
            if let (true, Some(peer)) = (include_peer, self.peer.clone()) {
                let mut peer = peer;
                let asked = tokio::time::timeout(
                    PEER_TIMEOUT,
                    peer.status(StatusRequest {
                        include_peer: false,
                    }),
                )
                .await;
                match asked {
                    Ok(Ok(resp)) => nodes.extend(resp.into_inner().nodes),
                    Ok(Err(s)) if s.code() == tonic::Code::Unauthenticated => {
                        peer_error = format!("unauthorized: {}", s.message())
                    }
                    Ok(Err(s)) => peer_error = format!("unreachable: {}", s.message()),
                    Err(_) => {
                        peer_error =
                            format!("unreachable: no answer within {} s", PEER_TIMEOUT.as_secs())
                    }
                }
            }
            Ok(Response::new(StatusResponse { nodes, peer_error }))
        }
        .instrument(span)
        .await
    }
}

#[tonic::async_trait]
impl Shards for Services {
    async fn query_shard(
        &self,
        r: Request<QueryShardRequest>,
    ) -> Result<Response<QueryShardResponse>, Status> {
        let span = rpc_span(&self.name, "Shards/QueryShard", r.metadata());
        let spark = self.spark()?;
        let id = parse_id(&r.into_inner().shard_id)?;
        let id_text = id.to_string();
        let q = spark
            .receiver
            .send(Query {
                id,
                parent: span.clone(),
            })
            .instrument(span)
            .await
            .map_err(mailbox)?
            .map_err(receive_status)?;
        if let Some(reason) = q.rejected {
            return Err(shard_status(ShardError::Rejected {
                id: id_text,
                reason,
            }));
        }
        Ok(Response::new(QueryShardResponse {
            committed_offset: q.committed_offset,
            committed: q.committed,
        }))
    }

    async fn upload_shard(
        &self,
        r: Request<Streaming<ShardChunk>>,
    ) -> Result<Response<UploadShardResponse>, Status> {
        let span = rpc_span(&self.name, "Shards/UploadShard", r.metadata());
        let spark = self.spark()?.clone();
        let mut stream = r.into_inner();
        async move {
            let mut shard: Option<ShardId> = None;
            let mut committed = 0u64;
            let result = async {
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk?;
                    let id = parse_id(&chunk.shard_id)?;
                    if shard.as_ref().is_some_and(|s| *s != id) {
                        return Err(Status::invalid_argument(format!(
                            "chunk of shard {id} in an upload of shard {}; one stream carries one shard",
                            shard.as_ref().map(ShardId::to_string).unwrap_or_default()
                        )));
                    }
                    if chunk.data.len() > MAX_CHUNK_BYTES {
                        return Err(Status::invalid_argument(format!(
                            "chunk of {} bytes exceeds the limit of {MAX_CHUNK_BYTES} bytes",
                            chunk.data.len()
                        )));
                    }
                    shard = Some(id.clone());
                    committed = spark
                        .receiver
                        .send(Append {
                            id,
                            offset: chunk.offset,
                            data: chunk.data,
                            total_size: chunk.total_size,
                            parent: tracing::Span::current(),
                        })
                        .await
                        .map_err(mailbox)?
                        .map_err(receive_status)?;
                }
                Ok(())
            }
            .await;
            // Whatever arrived before an error is kept: the sender resumes from there.
            if let Some(id) = shard {
                spark
                    .receiver
                    .send(Sync {
                        id,
                        parent: tracing::Span::current(),
                    })
                    .await
                    .map_err(mailbox)?
                    .map_err(receive_status)?;
            }
            result?;
            Ok(Response::new(UploadShardResponse {
                committed_offset: committed,
            }))
        }
        .instrument(span)
        .await
    }

    async fn commit_shard(
        &self,
        r: Request<CommitShardRequest>,
    ) -> Result<Response<CommitShardResponse>, Status> {
        let span = rpc_span(&self.name, "Shards/CommitShard", r.metadata());
        let spark = self.spark()?;
        let req = r.into_inner();
        let id = parse_id(&req.shard_id)?;
        let out = spark
            .receiver
            .send(Commit {
                id,
                size: req.size,
                parent: span.clone(),
            })
            .instrument(span)
            .await
            .map_err(mailbox)?
            .map_err(receive_status)?;
        Ok(Response::new(CommitShardResponse {
            imported: out.imported,
            duplicates: out.duplicates,
            already_committed: out.already_committed,
        }))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

/// Sends a start message to the actor that runs the job (`missing` answers when the node
/// has no such actor) and answers the job id; `who` names the actor in a retry hint.
async fn start<A, M>(
    actor: Option<Addr<A>>,
    missing: &str,
    who: &str,
    msg: M,
    span: tracing::Span,
) -> Result<Response<StartJobResponse>, Status>
where
    A: Actor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: Message<Result = Result<String, JobError>> + Send + 'static,
{
    let actor = actor.ok_or_else(|| Status::failed_precondition(missing))?;
    let id = actor
        .send(msg)
        .instrument(span)
        .await
        .map_err(|e| Status::unavailable(format!("{who} is restarting ({e}); retry")))?
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    Ok(Response::new(StartJobResponse { job_id: id }))
}

#[tonic::async_trait]
impl Jobs for Services {
    async fn start_job(
        &self,
        r: Request<StartJobRequest>,
    ) -> Result<Response<StartJobResponse>, Status> {
        let span = rpc_span(&self.name, "Jobs/StartJob", r.metadata());
        let spark = self.spark()?;
        let kind = r.into_inner().kind;
        let serving = || Some(spark.serving.clone());
        match JobKind::try_from(kind) {
            Ok(JobKind::Serve) => start(serving(), "", "the serving supervisor", StartServing, span).await,
            Ok(JobKind::Train) => {
                start(
                    spark.trainer.clone(),
                    "this node has no [trainer] section in its config; add one with the training recipe",
                    "the trainer",
                    StartTraining,
                    span,
                )
                .await
            }
            Ok(JobKind::Export) => {
                start(
                    spark.exporter.clone(),
                    "this node has no [exporter] section in its config; add one with the output directory",
                    "the exporter",
                    StartExport,
                    span,
                )
                .await
            }
            Ok(JobKind::Promote) => {
                let promote = Promote {
                    candidate: None,
                    take: true,
                };
                start(serving(), "", "the serving supervisor", promote, span).await
            }
            _ => Err(Status::invalid_argument(format!(
                "unknown job kind {kind}; use TRAIN, EXPORT, SERVE or PROMOTE"
            ))),
        }
    }

    async fn cancel_job(
        &self,
        r: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let _span = rpc_span(&self.name, "Jobs/CancelJob", r.metadata()).entered();
        let spark = self.spark()?;
        Ok(Response::new(CancelJobResponse {
            cancelled: spark.jobs.cancel(&r.into_inner().job_id),
        }))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        r: Request<WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let _span = rpc_span(&self.name, "Jobs/WatchJob", r.metadata()).entered();
        let spark = self.spark()?;
        let id = r.into_inner().job_id;
        let (history, live) = spark
            .jobs
            .watch(&id)
            .ok_or_else(|| Status::not_found(format!("no job {id:?} on this node")))?;
        let past = tokio_stream::iter(history.into_iter().map(Ok));
        let stream: EventStream = match live {
            Some(mut rx) => {
                // Forward live events until the job ends, then close the stream.
                let (tx, out) = tokio::sync::mpsc::channel(64);
                tokio::spawn(async move {
                    while let Ok(e) = rx.recv().await {
                        let ended = matches!(
                            e.event,
                            Some(job_event::Event::State(s)) if s != JobState::Running as i32
                        );
                        if tx.send(Ok(e)).await.is_err() || ended {
                            break;
                        }
                    }
                });
                Box::pin(past.chain(tokio_stream::wrappers::ReceiverStream::new(out)))
            }
            None => Box::pin(past),
        };
        Ok(Response::new(stream))
    }
}
