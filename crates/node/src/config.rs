//! The node's TOML configuration (`config/workstation.toml`, `config/spark.toml`,
//! `config/local.toml`) and the checks made before anything starts.

use crate::NodeError;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Which actors a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Teacher, Validator and ShardShipper: generates, checks and ships data.
    Workstation,
    /// ShardReceiver and ServingSupervisor: receives data, runs GPU jobs.
    Spark,
    /// Both roles in one process, shipping over loopback.
    All,
}

impl Role {
    /// The role's name as in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Workstation => "workstation",
            Role::Spark => "spark",
            Role::All => "all",
        }
    }

    /// Runs the workstation actors.
    pub fn generates(self) -> bool {
        matches!(self, Role::Workstation | Role::All)
    }

    /// Runs the GPU node actors.
    pub fn receives(self) -> bool {
        matches!(self, Role::Spark | Role::All)
    }
}

/// A node's whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Name shown in status and traces.
    pub name: String,
    /// Which actors run.
    pub role: Role,
    /// Where the node keeps its databases and shard files (relative paths are relative to
    /// the config file's directory).
    pub data_dir: PathBuf,
    /// The gRPC server.
    #[serde(default)]
    pub server: ServerConfig,
    /// The bearer token.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Optional (mutual) TLS of the server and of the client towards the peer.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Teacher generation (workstation).
    #[serde(default)]
    pub teacher: TeacherSection,
    /// Sealing and shipping (workstation).
    #[serde(default)]
    pub shipper: ShipperConfig,
    /// Receiving (spark).
    #[serde(default)]
    pub receiver: ReceiverConfig,
    /// The serving command (spark).
    #[serde(default)]
    pub serving: ServingConfig,
    /// Training (spark); no TrainerActor without it.
    pub trainer: Option<TrainerSection>,
    /// Export (spark); no ExporterActor without it.
    pub exporter: Option<ExporterSection>,
    /// On SIGTERM or Ctrl-C, how long to wait for training to save a checkpoint and for
    /// an export process to stop before the process exits anyway, in seconds.
    #[serde(default = "fifteen")]
    pub shutdown_timeout_s: u64,
}

fn fifteen() -> u64 {
    15
}

/// `[exporter]`: where the ExporterActor writes the NVFP4 export.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExporterSection {
    /// Output directory of the export.
    pub out: PathBuf,
    /// The training run directory to export from (default: the trainer's
    /// `run.output_dir`).
    pub run_dir: Option<PathBuf>,
    /// The `qatflow` executable (default: the running one).
    pub program: Option<PathBuf>,
}

/// `[trainer]`: the TrainerActor's run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerSection {
    /// The training recipe (`qatflow train`'s TOML); its data source is replaced by the
    /// node's store.
    pub config: PathBuf,
    /// Start training when the node starts (resuming the last valid checkpoint), instead
    /// of on a TRAIN job request.
    #[serde(default)]
    pub auto_start: bool,
    /// Start once the store holds this many conversations.
    #[serde(default = "one")]
    pub min_conversations: usize,
    /// How often to look for data, in milliseconds.
    #[serde(default = "thousand")]
    pub poll_ms: u64,
}

fn one() -> usize {
    1
}

fn thousand() -> u64 {
    1000
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on; loopback unless a token is configured.
    pub listen: SocketAddr,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7440)),
        }
    }
}

/// `[auth]`: where the bearer token comes from (the environment variable wins).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// File holding the token (surrounding whitespace ignored).
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the token.
    pub token_env: Option<String>,
}

/// `[tls]`: optional mutual TLS (PEM files). The server side is on when `server_cert` and
/// `server_key` are set, and requires client certificates when `client_ca` is set too; the
/// client side (towards `shipper.peer`, which then is `https://`) is on when `server_ca` is
/// set, and presents `client_cert`/`client_key` when they are set. The bearer token is
/// still required on top.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain.
    pub server_cert: Option<PathBuf>,
    /// The server's private key.
    pub server_key: Option<PathBuf>,
    /// CA that client certificates must be signed by; clients without one are refused.
    pub client_ca: Option<PathBuf>,
    /// The client's certificate chain, presented to the peer.
    pub client_cert: Option<PathBuf>,
    /// The client's private key.
    pub client_key: Option<PathBuf>,
    /// CA that the peer's server certificate must be signed by.
    pub server_ca: Option<PathBuf>,
    /// Name the peer's certificate must carry (default: the host of the peer URL).
    pub server_name: Option<String>,
}

impl TlsConfig {
    fn check(&self, role: Role) -> Result<(), String> {
        let pair = |a: &Option<PathBuf>, b: &Option<PathBuf>, what: &str| {
            if a.is_some() != b.is_some() {
                Err(format!("{what} must be set together"))
            } else {
                Ok(())
            }
        };
        pair(
            &self.server_cert,
            &self.server_key,
            "tls.server_cert and tls.server_key",
        )?;
        pair(
            &self.client_cert,
            &self.client_key,
            "tls.client_cert and tls.client_key",
        )?;
        if self.client_ca.is_some() && self.server_cert.is_none() {
            return Err("tls.client_ca needs tls.server_cert and tls.server_key".into());
        }
        if self.client_cert.is_some() && self.server_ca.is_none() {
            return Err(
                "tls.client_cert needs tls.server_ca (the CA of the peer's certificate)".into(),
            );
        }
        if role == Role::All && self.server_cert.is_some() {
            if self.server_ca.is_none() {
                return Err("role all ships to its own TLS server: set tls.server_ca too".into());
            }
            if self.client_ca.is_some() && self.client_cert.is_none() {
                return Err("role all ships to its own server, which requires client certificates: set tls.client_cert and tls.client_key too".into());
            }
        }
        Ok(())
    }
}

/// `[teacher]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TeacherSection {
    /// Generate at start-up (resuming whatever an earlier run left).
    pub enabled: bool,
    /// `offline`, `claude-cli`, `openai` or `anthropic`.
    pub backend: String,
    /// Teacher model (claude-cli, openai, anthropic).
    pub model: Option<String>,
    /// Base URL of the HTTP backends.
    pub base_url: Option<String>,
    /// Environment variable holding the HTTP backends' API key.
    pub api_key_env: Option<String>,
    /// Seed of the offline backend.
    pub seed: u64,
    /// Simulated latency per batch of the offline backend, in milliseconds.
    pub delay_ms: u64,
    /// Directory of categories.toml and friends (default: config/teacher or built-in).
    pub teacher_dir: Option<PathBuf>,
    /// Gate profile each conversation is checked against.
    pub profile: String,
    /// Only this category.
    pub category: Option<String>,
    /// Conversations per category instead of each category's count.
    pub count: Option<u64>,
    /// Conversations per batch.
    pub per_batch: usize,
    /// Batches in flight.
    pub concurrency: usize,
    /// Make at most this many teacher requests per node run (every attempt counts).
    pub max_requests: Option<u64>,
    /// Make no further teacher request once a node run's reported input + output tokens
    /// reach this many.
    pub max_total_tokens: Option<u64>,
}

impl Default for TeacherSection {
    fn default() -> TeacherSection {
        TeacherSection {
            enabled: true,
            backend: "offline".into(),
            model: None,
            base_url: None,
            api_key_env: None,
            seed: 0,
            delay_ms: 0,
            teacher_dir: None,
            profile: "v4".into(),
            category: None,
            count: None,
            per_batch: 25,
            concurrency: 2,
            max_requests: None,
            max_total_tokens: None,
        }
    }
}

/// `[shipper]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShipperConfig {
    /// The GPU node's URL (`http://127.0.0.1:7441`); in role `all` the node's own server
    /// when absent.
    pub peer: Option<String>,
    /// Seal a shard at this many conversations.
    pub max_conversations: usize,
    /// Seal a shard at about this many uncompressed bytes.
    pub max_bytes: usize,
    /// How often the shipper looks for work, in milliseconds.
    pub poll_ms: u64,
    /// A shipping round that makes no progress (no chunk sent, no answer) for this many
    /// milliseconds is aborted and the shipper restarts.
    pub stall_timeout_ms: u64,
}

impl Default for ShipperConfig {
    fn default() -> ShipperConfig {
        ShipperConfig {
            peer: None,
            max_conversations: 200,
            max_bytes: 8 << 20,
            poll_ms: 500,
            stall_timeout_ms: 120_000,
        }
    }
}

/// `[receiver]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReceiverConfig {
    /// Largest shard accepted, in bytes.
    pub max_shard_bytes: u64,
    /// Largest decompressed shard accepted, in bytes (decoding also stops at 1000× the
    /// compressed size).
    pub max_decoded_bytes: u64,
    /// Gate profile every received conversation is checked against (built-in name,
    /// `config/gates/NAME.toml` or a path); its flags are stored, so training's clean-only
    /// data means what the receiver's gates say, whatever the sender claimed.
    pub profile: String,
}

impl Default for ReceiverConfig {
    fn default() -> ReceiverConfig {
        ReceiverConfig {
            max_shard_bytes: 64 << 20,
            max_decoded_bytes: 256 << 20,
            profile: "v4".into(),
        }
    }
}

/// `[serving]`: the command the ServingSupervisor starts for a serve job.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServingConfig {
    /// Program and arguments (`["vllm", "serve", "models/export"]`); none disables serving.
    pub command: Vec<String>,
}

impl NodeConfig {
    /// Reads and checks a config file; relative paths become relative to its directory.
    pub fn from_file(path: &Path) -> Result<NodeConfig, NodeError> {
        let text = std::fs::read_to_string(path).map_err(|e| NodeError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut config = NodeConfig::from_toml(&text).map_err(|message| NodeError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        rebase(&mut config.data_dir);
        if let Some(p) = config.auth.token_file.as_mut() {
            rebase(p);
        }
        let tls = &mut config.tls;
        for p in [
            &mut tls.server_cert,
            &mut tls.server_key,
            &mut tls.client_ca,
            &mut tls.client_cert,
            &mut tls.client_key,
            &mut tls.server_ca,
        ]
        .into_iter()
        .flatten()
        {
            rebase(p);
        }
        if let Some(p) = config.teacher.teacher_dir.as_mut() {
            rebase(p);
        }
        if let Some(t) = config.trainer.as_mut() {
            rebase(&mut t.config);
        }
        if let Some(e) = config.exporter.as_mut() {
            rebase(&mut e.out);
            if let Some(p) = e.run_dir.as_mut() {
                rebase(p);
            }
        }
        Ok(config)
    }

    /// Parses and checks TOML text.
    pub fn from_toml(text: &str) -> Result<NodeConfig, String> {
        let config: NodeConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if config.shipper.max_conversations == 0 || config.shipper.max_bytes == 0 {
            return Err(
                "shipper.max_conversations and shipper.max_bytes must be at least 1".into(),
            );
        }
        if config.shipper.stall_timeout_ms == 0 {
            return Err("shipper.stall_timeout_ms must be at least 1".into());
        }
        if config.teacher.per_batch == 0 || config.teacher.concurrency == 0 {
            return Err("teacher.per_batch and teacher.concurrency must be at least 1".into());
        }
        if config.role == Role::Workstation && config.shipper.peer.is_none() {
            return Err("shipper.peer is required for role workstation (the GPU node's URL, e.g. http://127.0.0.1:7441)".into());
        }
        config.tls.check(config.role)?;
        if let Some(peer) = &config.shipper.peer {
            let https = peer.starts_with("https://");
            if https != config.tls.server_ca.is_some() {
                return Err(format!(
                    "shipper.peer is {peer}: use https:// with tls.server_ca and http:// without it"
                ));
            }
        }
        Ok(config)
    }

    /// The bearer token, if one is configured: the environment variable when set and
    /// non-empty, else the file. A configured source that yields nothing (`token_env`
    /// naming an unset or empty variable and no `token_file`, an empty file) is an
    /// error: a node never falls back to no authentication silently.
    pub fn token(&self) -> Result<Option<String>, NodeError> {
        if let Some(var) = &self.auth.token_env {
            if let Some(t) = std::env::var(var).ok().filter(|t| !t.trim().is_empty()) {
                return Ok(Some(t.trim().to_string()));
            }
            if self.auth.token_file.is_none() {
                return Err(NodeError::EmptyTokenEnv { var: var.clone() });
            }
        }
        match &self.auth.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| NodeError::Config {
                    path: path.clone(),
                    message: format!("cannot read auth.token_file: {e}"),
                })?;
                let t = text.trim();
                if t.is_empty() {
                    return Err(NodeError::Config {
                        path: path.clone(),
                        message: "auth.token_file is empty; write a random token into it".into(),
                    });
                }
                Ok(Some(t.to_string()))
            }
            None => Ok(None),
        }
    }

    /// The peer the shipper talks to.
    pub fn peer_url(&self) -> String {
        self.shipper
            .peer
            .clone()
            .unwrap_or_else(|| format!("{}://{}", self.scheme(), self.server.listen))
    }

    /// `https` when the server has TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.server_cert.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// Refuses a non-loopback listen address without a token.
pub fn check_bind(listen: SocketAddr, token: Option<&str>) -> Result<(), NodeError> {
    if !listen.ip().is_loopback() && token.is_none() {
        return Err(NodeError::InsecureBind { listen });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "name = \"n\"\nrole = \"all\"\ndata_dir = \"d\"\n";

    #[test]
    fn defaults_bind_loopback() {
        let c = NodeConfig::from_toml(MINIMAL).unwrap();
        assert!(c.server.listen.ip().is_loopback());
        assert_eq!(c.peer_url(), "http://127.0.0.1:7440");
        assert!(c.token().unwrap().is_none());
    }

    #[test]
    fn a_public_bind_needs_a_token() {
        let public: SocketAddr = "0.0.0.0:7440".parse().unwrap();
        let err = check_bind(public, None).unwrap_err().to_string();
        assert!(err.contains("without a token"), "{err}");
        check_bind(public, Some("t")).unwrap();
        check_bind("127.0.0.1:1".parse().unwrap(), None).unwrap();
    }

    #[test]
    fn unknown_fields_and_missing_peer_are_errors() {
        let err = NodeConfig::from_toml(&format!("{MINIMAL}colour = 1\n")).unwrap_err();
        assert!(err.contains("colour"), "{err}");
        let err = NodeConfig::from_toml("name = \"n\"\nrole = \"workstation\"\ndata_dir = \"d\"\n")
            .unwrap_err();
        assert!(err.contains("shipper.peer"), "{err}");
    }

    #[test]
    fn tls_fields_are_checked_together() {
        let with = |tls: &str| NodeConfig::from_toml(&format!("{MINIMAL}[tls]\n{tls}"));
        let err = with("server_cert = \"c.pem\"\n").unwrap_err();
        assert!(err.contains("tls.server_key"), "{err}");
        let err = with("server_cert = \"c\"\nserver_key = \"k\"\n").unwrap_err();
        assert!(err.contains("tls.server_ca"), "{err}");
        let c = with("server_cert = \"c\"\nserver_key = \"k\"\nserver_ca = \"ca\"\n").unwrap();
        assert_eq!(c.peer_url(), "https://127.0.0.1:7440");
        let err = NodeConfig::from_toml(
            "name = \"n\"\nrole = \"workstation\"\ndata_dir = \"d\"\n[shipper]\npeer = \"http://h:1\"\n[tls]\nserver_ca = \"ca\"\n",
        )
        .unwrap_err();
        assert!(err.contains("https://"), "{err}");
    }

    #[test]
    fn token_from_file_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  secret\n").unwrap();
        let mut c = NodeConfig::from_toml(MINIMAL).unwrap();
        c.auth.token_file = Some(file.clone());
        assert_eq!(c.token().unwrap().as_deref(), Some("secret"));
        c.auth.token_env = Some("QATFLOW_NODE_TEST_TOKEN_UNSET".into());
        assert_eq!(c.token().unwrap().as_deref(), Some("secret"));
        std::fs::write(&file, "\n").unwrap();
        assert!(c.token().unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn an_unset_token_variable_is_an_error_naming_it() {
        let mut c = NodeConfig::from_toml(MINIMAL).unwrap();
        c.auth.token_env = Some("QATFLOW_NODE_TEST_TOKEN_NEVER_SET".into());
        let err = c.token().unwrap_err().to_string();
        assert!(
            err.contains("QATFLOW_NODE_TEST_TOKEN_NEVER_SET") && err.contains("empty"),
            "{err}"
        );
    }

    #[test]
    fn shipped_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        for name in ["workstation.toml", "spark.toml", "local.toml"] {
            NodeConfig::from_file(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
