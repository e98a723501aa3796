//! Starting a node: stores, actors and the gRPC server of the configured roles, inside an
//! actix System that runs on a multi-thread tokio runtime.

use crate::actors::exporter::{ExportPlan, ExporterActor};
use crate::actors::jobs::JobHub;
use crate::actors::receiver::ShardReceiver;
use crate::actors::serving::ServingSupervisor;
use crate::actors::shipper::{ShardShipper, ShipperParts};
use crate::actors::teacher::{generate_options, TeacherActor};
use crate::actors::trainer::TrainerActor;
use crate::actors::validator::ValidatorActor;
use crate::config::{check_bind, NodeConfig};
use crate::server::{Services, SparkView, WorkstationView};
use crate::status::StatusBoard;
use crate::{client, NodeError};
use actix::Supervisor;
use qatflow_proto::v1::JobKind;
use qatflow_shards::{Inbox, InboxLimits, Outbox, SealLimits};
use qatflow_store::Store;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::ClientTlsConfig;

/// How long a stopping node waits for open gRPC connections to close.
const SERVER_GRACE: Duration = Duration::from_secs(3);

/// A started node.
pub struct RunningNode {
    /// The address the gRPC server listens on (the configured one, with the real port when
    /// it was 0).
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    jobs: Option<JobHub>,
    grace: Duration,
}

impl RunningNode {
    /// Stops generation and the server, cancels training and export (training stops at
    /// its next micro-step and saves a checkpoint; an export process is killed) and waits
    /// for the server and for those jobs, the jobs for at most the config's
    /// `shutdown_timeout_s`. A job still running then is an error naming it.
    pub async fn stop(self) -> Result<(), NodeError> {
        self.shutdown.cancel();
        let left = match &self.jobs {
            Some(jobs) => {
                let ids = jobs.shut_down(&[JobKind::Train, JobKind::Export]);
                if !ids.is_empty() {
                    tracing::info!(jobs = ?ids, "stopping jobs");
                }
                jobs.wait_ended(&ids, self.grace).await
            }
            None => Vec::new(),
        };
        // A graceful shutdown waits for every open connection to close, and a peer's client
        // may keep its connection open: wait a little, then drop the rest.
        let mut server = self.server;
        match tokio::time::timeout(SERVER_GRACE, &mut server).await {
            Ok(joined) => joined
                .map_err(|e| NodeError::Runtime(format!("server task: {e}")))?
                .map_err(|e| NodeError::Runtime(format!("server: {e}")))?,
            Err(_) => {
                tracing::warn!(
                    "open connections did not close within {} s of the shutdown; closing them",
                    SERVER_GRACE.as_secs()
                );
                server.abort();
            }
        }
        if !left.is_empty() {
            return Err(NodeError::Runtime(format!(
                "jobs {left:?} did not stop within shutdown_timeout_s = {} s; exiting without them (a restart resumes from their last checkpoint)",
                self.grace.as_secs()
            )));
        }
        Ok(())
    }

    /// Waits until the server stops on its own (it does not, short of an error).
    pub async fn wait(&mut self) -> Result<(), NodeError> {
        (&mut self.server)
            .await
            .map_err(|e| NodeError::Runtime(format!("server task: {e}")))?
            .map_err(|e| NodeError::Runtime(format!("server: {e}")))
    }
}

/// Starts the roles of `config`. Call it inside an actix System on a multi-thread tokio
/// runtime (as [`run`] does).
pub async fn start(config: &NodeConfig) -> Result<RunningNode, NodeError> {
    let token = config.token()?;
    check_bind(config.server.listen, token.as_deref())?;
    let server_tls = crate::tls::server(&config.tls)?;
    let client_tls = crate::tls::client(&config.tls)?;
    let tls_error = |e: tonic::transport::Error| {
        let cause = std::error::Error::source(&e).map_or(e.to_string(), |c| c.to_string());
        NodeError::Config {
            path: config.tls.server_cert.clone().unwrap_or_default(),
            message: format!(
                "tls.server_cert/tls.server_key/tls.client_ca: TLS setup failed ({cause}); \
                 does tls.server_key belong to the certificate?"
            ),
        }
    };
    // Checked before anything starts, so a bad pair never leaves actors running.
    if let Some(tls) = &server_tls {
        tonic::transport::Server::builder()
            .tls_config(tls.clone())
            .map_err(tls_error)?;
    }
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| NodeError::Bind {
            listen: config.server.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| NodeError::Bind {
        listen: config.server.listen,
        source,
    })?;
    let shutdown = CancellationToken::new();
    let role = config.role;
    let spark = if role.receives() {
        Some(start_spark(config)?)
    } else {
        None
    };
    let (workstation, peer) = if role.generates() {
        let (w, peer) = start_workstation(config, addr, token.as_deref(), client_tls, &shutdown)?;
        (Some(w), peer)
    } else {
        (None, None)
    };
    let node_jobs = spark.as_ref().map(|s| s.jobs.clone());
    let services = Services {
        name: config.name.clone(),
        role: role.as_str().into(),
        workstation,
        spark,
        peer,
    };

    let router = services
        .router(token.as_deref(), server_tls)
        .map_err(tls_error)?;
    let stop = shutdown.clone();
    let server = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.cancelled_owned(),
            )
            .await
    });
    tracing::info!(node = %config.name, role = role.as_str(), %addr, "node serving");
    Ok(RunningNode {
        addr,
        shutdown,
        server,
        jobs: node_jobs,
        grace: Duration::from_secs(config.shutdown_timeout_s),
    })
}

/// The GPU node's half: its store and inbox, the receiver, the serving supervisor, and the
/// trainer and exporter when configured.
fn start_spark(config: &NodeConfig) -> Result<SparkView, NodeError> {
    let dir = config.data_dir.join("spark");
    let store = Store::open(dir.join("db"))?;
    let limits = InboxLimits {
        max_shard_bytes: config.receiver.max_shard_bytes,
        max_decoded_bytes: config.receiver.max_decoded_bytes,
        ..InboxLimits::default()
    };
    let profile = qatflow_gates::GateProfile::resolve(&config.receiver.profile).map_err(|e| {
        NodeError::Config {
            path: config.data_dir.clone(),
            message: format!("receiver.profile: {e}"),
        }
    })?;
    let checker = qatflow_gates::Checker::new(&profile);
    let inbox = Inbox::open(&store, &dir.join("inbox"), limits, checker)?;
    let board = StatusBoard::new(&config.name, "spark");
    let jobs = JobHub::default();
    let receiver = {
        let (inbox, store, board) = (inbox.clone(), store.clone(), board.clone());
        Supervisor::start(move |_| ShardReceiver::new(inbox, store, board))
    };
    let serving = {
        let (command, store, log, jobs, board) = (
            config.serving.clone(),
            store.clone(),
            dir.join("serving.log"),
            jobs.clone(),
            board.clone(),
        );
        Supervisor::start(move |_| ServingSupervisor::new(command, store, log, jobs, board))
    };
    let mut train_run_dir = None;
    let trainer = match &config.trainer {
        Some(t) => {
            let train_config = qatflow_train::TrainConfig::from_file(&t.config).map_err(|e| {
                NodeError::Config {
                    path: t.config.clone(),
                    message: format!("trainer.config: {e}"),
                }
            })?;
            train_run_dir = Some(train_config.run.output_dir.clone());
            let follow = qatflow_train::Follow {
                min_conversations: t.min_conversations,
                poll: Duration::from_millis(t.poll_ms.max(10)),
            };
            let (store, jobs, board, auto) =
                (store.clone(), jobs.clone(), board.clone(), t.auto_start);
            Some(Supervisor::start(move |_| {
                TrainerActor::new(store, train_config, follow, auto, jobs, board)
            }))
        }
        None => None,
    };
    let exporter = match &config.exporter {
        Some(e) => {
            let run_dir = e
                .run_dir
                .clone()
                .or(train_run_dir)
                .ok_or_else(|| NodeError::Config {
                    path: config.data_dir.clone(),
                    message: "exporter.run_dir is required without a [trainer] section".into(),
                })?;
            let program = match &e.program {
                Some(p) => p.clone(),
                None => std::env::current_exe().map_err(|e| {
                    NodeError::Runtime(format!("cannot find the qatflow executable: {e}"))
                })?,
            };
            let plan = ExportPlan {
                program,
                run_dir,
                out: e.out.clone(),
            };
            let (store, jobs, board) = (store.clone(), jobs.clone(), board.clone());
            let promote = config
                .serving
                .promote
                .on_export
                .then(|| serving.clone().recipient());
            Some(Supervisor::start(move |_| {
                let exporter = ExporterActor::new(plan, store, jobs, board);
                match promote.clone() {
                    Some(to) => exporter.promote_to(to),
                    None => exporter,
                }
            }))
        }
        None => None,
    };
    Ok(SparkView {
        store,
        inbox,
        board,
        receiver,
        serving,
        trainer,
        exporter,
        jobs,
    })
}

/// The workstation's half: its store and outbox, the shipper (to the peer, or to this
/// node's own server for role `all`), the validator and, when enabled, the teacher; plus
/// the status client of the peer for role `workstation`.
fn start_workstation(
    config: &NodeConfig,
    addr: SocketAddr,
    token: Option<&str>,
    client_tls: Option<ClientTlsConfig>,
    shutdown: &CancellationToken,
) -> Result<
    (
        WorkstationView,
        Option<client::NodeClient<client::AuthChannel>>,
    ),
    NodeError,
> {
    let role = config.role;
    let dir = config.data_dir.join("workstation");
    let store = Store::open(dir.join("db"))?;
    let outbox = Outbox::open(&store, &dir.join("outbox"))?;
    let board = StatusBoard::new(&config.name, "workstation");
    let peer_url = match role {
        crate::Role::All => format!("{}://{addr}", config.scheme()),
        _ => config.peer_url(),
    };
    let parts = Arc::new(ShipperParts {
        store: store.clone(),
        outbox: outbox.clone(),
        limits: SealLimits {
            max_conversations: config.shipper.max_conversations,
            max_bytes: config.shipper.max_bytes,
        },
        client: client::ShardsClient::new(client::secure_channel(
            &peer_url,
            token,
            client_tls.clone(),
        )?),
        poll: Duration::from_millis(config.shipper.poll_ms.max(10)),
        stall_timeout: Duration::from_millis(config.shipper.stall_timeout_ms),
    });
    let shipper = {
        let board = board.clone();
        Supervisor::start(move |_| ShardShipper::new(parts.clone(), board.clone()))
    };
    let options = generate_options(&config.teacher)?;
    let validator = {
        let (store, profile, board) = (store.clone(), options.profile.clone(), board.clone());
        Supervisor::start(move |_| {
            ValidatorActor::new(store.clone(), profile.clone(), board.clone())
        })
    };
    if config.teacher.enabled {
        let (store, shipper, board, cancel) = (
            store.clone(),
            shipper.clone(),
            board.clone(),
            shutdown.clone(),
        );
        Supervisor::start(move |_| {
            TeacherActor::new(
                store.clone(),
                options.clone(),
                shipper.clone(),
                validator.clone(),
                board.clone(),
                cancel.clone(),
            )
        });
    } else {
        board.set(crate::status::Field::Teacher, "disabled");
    }
    let peer = match role {
        crate::Role::Workstation => Some(client::NodeClient::new(client::secure_channel(
            &peer_url, token, client_tls,
        )?)),
        _ => None,
    };
    Ok((
        WorkstationView {
            store,
            outbox,
            board,
        },
        peer,
    ))
}

/// An actix System on a multi-thread tokio runtime, never a single-threaded one: the OTLP
/// exporter and blocking library calls need real threads. `worker_threads` defaults to the
/// number of cores.
pub fn system(worker_threads: Option<usize>) -> actix::SystemRunner {
    actix::System::with_tokio_rt(move || {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = worker_threads {
            builder.worker_threads(n);
        }
        builder
            .enable_all()
            .thread_name("qatflow-node")
            .build()
            .expect("a tokio runtime starts")
    })
}

/// Runs a node until Ctrl-C or SIGTERM on a [`system`]; then stops it (see
/// [`RunningNode::stop`]) and returns within about `shutdown_timeout_s`: blocking work
/// still running then (a training step that never reaches its next check) is abandoned,
/// not waited for.
pub fn run(config: NodeConfig) -> Result<(), NodeError> {
    let system = system(None);
    let result = system.block_on(async move {
        let mut node = start(&config).await?;
        eprintln!(
            "qatflow node {} ({}) listening on {}",
            config.name,
            config.role.as_str(),
            node.addr
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| NodeError::Runtime(format!("cannot watch SIGTERM: {e}")))?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            r = node.wait() => return r,
        }
        tracing::info!("shutting down");
        node.stop().await
    });
    // Dropping the runtime would wait for every blocking task, however long it runs;
    // after a shutdown every task that matters has ended or was given its time.
    std::mem::forget(system);
    result
}
