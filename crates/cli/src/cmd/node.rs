//! `qatflow node` (run a node of the two-node system) and `qatflow status` (both nodes'
//! state on one screen).

use anyhow::Context;
use qatflow_node::status::{peer_state, PeerState};
use qatflow_node::NodeConfig;
use qatflow_proto::v1::StatusRequest;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `qatflow node`.
#[derive(clap::Args)]
pub struct NodeArgs {
    /// Node config (config/local.toml: both roles in one process; config/workstation.toml,
    /// config/spark.toml: one role each).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Arguments of `qatflow status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// Node to ask (repeatable); a workstation node also reports its GPU peer.
    #[arg(
        long = "node",
        value_name = "URL",
        default_value = "http://127.0.0.1:7440"
    )]
    pub nodes: Vec<String>,
    /// Environment variable holding the bearer token.
    #[arg(long, value_name = "VAR", default_value = "QATFLOW_TOKEN")]
    pub token_env: String,
    /// File holding the bearer token (used when the variable is unset).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// CA of the nodes' server certificates (PEM): talk TLS to `https://` nodes.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for nodes that require one; needs --tls-ca and --tls-key.
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The node's name and role as trace resource attributes (`node.name`, `node.role`,
/// `service.instance.id`), so the two nodes' spans are told apart in Jaeger; empty when
/// the config does not load (`run_node` then reports why).
pub fn resource_attributes(a: &NodeArgs) -> Vec<(String, String)> {
    match NodeConfig::from_file(&a.config) {
        Ok(c) => vec![
            ("node.name".into(), c.name.clone()),
            ("node.role".into(), c.role.as_str().into()),
            ("service.instance.id".into(), c.name),
        ],
        Err(_) => Vec::new(),
    }
}

/// Runs `qatflow node`.
pub fn run_node(a: NodeArgs) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::from_file(&a.config)?;
    qatflow_node::run(config)?;
    Ok(ExitCode::SUCCESS)
}

fn token(a: &StatusArgs) -> anyhow::Result<Option<String>> {
    if let Some(t) = std::env::var(&a.token_env)
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        return Ok(Some(t.trim().to_string()));
    }
    match &a.token_file {
        Some(f) => Ok(Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("{}: cannot read --token-file", f.display()))?
                .trim()
                .to_string(),
        )),
        None => Ok(None),
    }
}

/// Runs `qatflow status`; exit 1 when a node does not answer or a node's peer is
/// unreachable or refuses its token.
pub fn run_status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let token = token(&a)?;
    // Checked like a node config's [tls] section: errors name the file and the field.
    let tls = qatflow_node::tls::client(&qatflow_node::config::TlsConfig {
        server_ca: a.tls_ca.clone(),
        client_cert: a.tls_cert.clone(),
        client_key: a.tls_key.clone(),
        ..Default::default()
    })
    .context("--tls-ca/--tls-cert/--tls-key")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")?;
    // The channels spawn their workers on creation: inside the runtime.
    let _runtime = runtime.enter();
    let mut all = Vec::new();
    let mut failed = false;
    for url in &a.nodes {
        let mut client = qatflow_node::client::NodeClient::new(
            qatflow_node::client::secure_channel(url, token.as_deref(), tls.clone())?,
        );
        let reply = runtime.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                client.status(StatusRequest { include_peer: true }),
            )
            .await
        });
        match reply {
            Ok(Ok(r)) => all.push(r.into_inner()),
            Ok(Err(s)) => {
                failed = true;
                // A TLS refusal is only "transport error" at the top: show the causes.
                let mut text = format!("{url}: {}: {}", s.code(), s.message());
                let mut cause = std::error::Error::source(&s);
                while let Some(c) = cause {
                    text.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                if std::error::Error::source(&s).is_some()
                    && a.tls_ca.is_some()
                    && a.tls_cert.is_none()
                {
                    text.push_str(
                        " (a node that requires client certificates closes the connection: \
                         pass --tls-cert and --tls-key)",
                    );
                }
                eprintln!("{text}");
            }
            Err(_) => {
                failed = true;
                eprintln!("{url}: no answer within 10 s");
            }
        }
    }
    let peers: Vec<Option<PeerState>> = all
        .iter()
        .map(|r| peer_state(&r.nodes, &r.peer_error))
        .collect();
    failed |= peers
        .iter()
        .any(|p| p.as_ref().is_some_and(|p| *p != PeerState::Up));
    if a.json {
        let nodes: Vec<serde_json::Value> = all
            .iter()
            .zip(&peers)
            .flat_map(|(r, peer)| {
                r.nodes
                    .iter()
                    .enumerate()
                    .map(move |(i, n)| (n, peer.as_ref().filter(|_| i == 0)))
            })
            .map(|(n, peer)| {
                let mut v = serde_json::json!({
                    "name": n.name, "role": n.role, "uptime_s": n.uptime_s,
                    "stored_conversations": n.stored_conversations,
                    "accepted_conversations": n.accepted_conversations,
                    "teacher": n.teacher, "validation": n.validation,
                    "shards_sealed": n.shards_sealed, "shards_shipped": n.shards_shipped,
                    "shards_committed": n.shards_committed, "shipper": n.shipper,
                    "training": n.training.as_ref().map(|t| serde_json::json!({
                        "state": t.state, "step": t.step, "total_steps": t.total_steps,
                        "loss": t.loss, "eta_s": t.eta_s})),
                    "export": n.export, "serving": n.serving,
                    "actor_restarts": n.actor_restarts,
                });
                // The asked node's link to its peer, on the asked node's entry.
                if let Some(p) = peer {
                    v["peer"] = serde_json::json!({"state": p.name(), "error": p.error()});
                }
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&nodes)?);
    } else {
        for r in &all {
            print!("{}", qatflow_node::status::render(&r.nodes, &r.peer_error));
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Arguments of `qatflow bench-shards`.
#[derive(clap::Args)]
pub struct BenchShardsArgs {
    /// Dataset size in MB (uncompressed JSONL).
    #[arg(long, default_value_t = 256)]
    pub mb: u64,
    /// Shard size in MB (uncompressed).
    #[arg(long, default_value_t = 8)]
    pub shard_mb: u64,
    /// Directory for the dataset, its copy and the receiving node (a temporary directory
    /// inside it, removed afterwards); the disk under test.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `qatflow bench-shards`.
pub fn run_bench_shards(a: BenchShardsArgs) -> anyhow::Result<ExitCode> {
    if a.mb == 0 || a.shard_mb == 0 {
        anyhow::bail!("--mb and --shard-mb must be at least 1");
    }
    let dir = tempfile::Builder::new()
        .prefix("qatflow-bench-shards-")
        .tempdir_in(&a.dir)
        .with_context(|| format!("{}: cannot create a temporary directory", a.dir.display()))?;
    let system = qatflow_node::system(None);
    let r = system.block_on(qatflow_node::bench::shard_throughput(
        dir.path(),
        a.mb,
        a.shard_mb,
    ))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "dataset {:.1} MB ({} conversations) in {} shards of {:.1} MB compressed in total",
            r.dataset_bytes as f64 / 1e6,
            r.conversations,
            r.shards,
            r.shard_bytes as f64 / 1e6
        );
        println!(
            "seal (zstd + sha256)                 {:>8.1} MB/s",
            r.seal_mb_s
        );
        println!(
            "upload over loopback gRPC            {:>8.1} MB/s",
            r.upload_mb_s
        );
        println!(
            "ship (query, upload, verify, import) {:>8.1} MB/s",
            r.ship_mb_s
        );
        println!(
            "plain file copy                      {:>8.1} MB/s",
            r.copy_mb_s
        );
    }
    Ok(ExitCode::SUCCESS)
}
