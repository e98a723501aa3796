//! The node's TOML configuration (`config/workstation.toml`, `config/spark.toml`,
//! `config/local.toml`) and the checks made before anything starts.

use crate::NodeError;
use qatflow_teacher::BackendKind;
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
    pub backend: BackendKind,
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
            backend: BackendKind::Offline,
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

/// `[serving]`: what the ServingSupervisor runs. With `engine` set (`vllm` or `embedded`)
/// the command is rendered from these fields and the server is supervised (health ladder,
/// restarts with backoff, promote/rollback); with only `command`, that command is run as
/// given and only its process is watched.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServingConfig {
    /// Program and arguments run as given (`["vllm", "serve", "models/export"]`), without
    /// health checks; ignored when `engine` is set.
    pub command: Vec<String>,
    /// `vllm` or `embedded` (`qatflow serve`); none runs `command`.
    pub engine: Option<Engine>,
    /// The model directory served (a promoted candidate replaces it; the node remembers).
    pub model: Option<PathBuf>,
    /// The executable: `vllm` (found on PATH) or the running qatflow by default.
    pub program: Option<PathBuf>,
    /// The model name clients request (vLLM's `--served-model-name`).
    pub served_model_name: String,
    /// Address the server listens on.
    pub host: String,
    /// Port of the serving model.
    pub port: u16,
    /// Port a candidate is served on while it is benchmarked.
    pub candidate_port: u16,
    /// Model family (`qwen3`, `qwen3_5`, `llama`); default: `model_type` of config.json.
    pub family: Option<String>,
    /// vLLM's `--tool-call-parser`; default by family (hermes; qwen3_coder for Qwen3.5).
    pub tool_call_parser: Option<String>,
    /// vLLM's `--max-model-len`.
    pub max_model_len: Option<u32>,
    /// vLLM's `--gpu-memory-utilization`.
    pub gpu_memory_utilization: Option<f64>,
    /// Arguments appended to the rendered command.
    pub extra_args: Vec<String>,
    /// Start serving when the node starts, instead of on a SERVE job.
    pub auto_start: bool,
    /// The health ladder and restarts.
    pub health: HealthConfig,
    /// Promote/rollback of candidates.
    pub promote: PromoteConfig,
}

impl Default for ServingConfig {
    fn default() -> ServingConfig {
        ServingConfig {
            command: Vec::new(),
            engine: None,
            model: None,
            program: None,
            served_model_name: "qatflow".into(),
            host: "127.0.0.1".into(),
            port: 8000,
            candidate_port: 8001,
            family: None,
            tool_call_parser: None,
            max_model_len: None,
            gpu_memory_utilization: None,
            extra_args: Vec::new(),
            auto_start: false,
            health: HealthConfig::default(),
            promote: PromoteConfig::default(),
        }
    }
}

/// The server a supervised `[serving]` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// vLLM's OpenAI server (`vllm serve`).
    Vllm,
    /// qatflow's own server (`qatflow serve`).
    Embedded,
}

/// `[serving.health]`: the ladder (process alive → `/health` → `/v1/models` lists the
/// model → a smoke completion) and stall detection in service.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// How long a starting server may take to pass the ladder, in seconds.
    pub startup_timeout_s: u64,
    /// Time between checks, in milliseconds.
    pub interval_ms: u64,
    /// Timeout of `/health` and `/v1/models`, in milliseconds.
    pub request_timeout_ms: u64,
    /// A probe completion with no token for this long means the engine is stalled.
    pub stall_timeout_ms: u64,
    /// Consecutive failed `/health` checks in service before a restart.
    pub failures_before_restart: u32,
    /// Restarts without reaching health before the supervisor gives up.
    pub max_restarts: u32,
    /// First wait before a restart, in milliseconds; doubles up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    /// Longest wait before a restart, in milliseconds.
    pub backoff_max_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            startup_timeout_s: 900,
            interval_ms: 5_000,
            request_timeout_ms: 5_000,
            stall_timeout_ms: 60_000,
            failures_before_restart: 3,
            max_restarts: 5,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 60_000,
        }
    }
}

/// `[serving.promote]`: a candidate export is served on `candidate_port`, benchmarked with
/// the suite next to the serving model, and promoted only when it passes the suite's gates
/// and is not worse beyond the margins.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromoteConfig {
    /// Suite directory (default: config/bench or built-in).
    pub suite: Option<PathBuf>,
    /// Only these categories of the suite.
    pub categories: Vec<String>,
    /// Directory of the production system prompt and tools (default: config/teacher or
    /// built-in).
    pub teacher_dir: Option<PathBuf>,
    /// Percentage points a pass rate may drop against the serving model.
    pub margin_pct: f64,
    /// Percent the median TTFT may grow (and decode speed shrink).
    pub latency_margin_pct: f64,
    /// Measured repetitions of each prompt.
    pub runs: u32,
    /// Longest wait for any chunk of a bench response, in milliseconds.
    pub idle_timeout_ms: u64,
    /// Benchmark every finished export as a candidate (needs `[exporter]`).
    pub on_export: bool,
    /// The candidate a PROMOTE job benchmarks (default: `[exporter] out`).
    pub candidate: Option<PathBuf>,
}

impl Default for PromoteConfig {
    fn default() -> PromoteConfig {
        PromoteConfig {
            suite: None,
            categories: Vec::new(),
            teacher_dir: None,
            margin_pct: 5.0,
            latency_margin_pct: 20.0,
            runs: 1,
            idle_timeout_ms: 60_000,
            on_export: false,
            candidate: None,
        }
    }
}

/// A model directory's `config.json` facts that decide the serving flags.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelFacts {
    /// `model_type` (of `text_config` for a VL wrapper).
    pub family: Option<String>,
    /// NVFP4 weights (`hf_quant_config.json` or a modelopt `quantization_config`).
    pub nvfp4: bool,
    /// Qwen3.5's VL wrapper config (`text_config` inside a `qwen3_5` config).
    pub vl_wrapper: bool,
}

impl ModelFacts {
    /// Reads `dir/config.json` and `dir/hf_quant_config.json`; a missing or unreadable
    /// config gives no facts (the server itself reports what is wrong with the model).
    pub fn read(dir: &Path) -> ModelFacts {
        let config: serde_json::Value = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let text = config.get("text_config").filter(|t| t.is_object());
        let family = text
            .and_then(|t| t["model_type"].as_str())
            .or_else(|| config["model_type"].as_str())
            .map(|f| f.trim_end_matches("_text").to_string());
        let nvfp4 = dir.join("hf_quant_config.json").is_file()
            || config["quantization_config"]["quant_method"] == "modelopt";
        ModelFacts {
            family,
            nvfp4,
            vl_wrapper: text.is_some() && config["model_type"] == "qwen3_5",
        }
    }
}

impl ServingConfig {
    /// The command serving `model` on `port`: rendered for `engine`, or `command` as given.
    pub fn render(&self, model: &Path, port: u16) -> Vec<String> {
        let Some(engine) = self.engine else {
            return self.command.clone();
        };
        let facts = ModelFacts::read(model);
        let family = self.family.clone().or(facts.family);
        let model = model.display().to_string();
        let mut cmd = match engine {
            Engine::Vllm => {
                let program = self
                    .program
                    .as_ref()
                    .map_or("vllm".into(), |p| p.display().to_string());
                let mut c = vec![
                    program,
                    "serve".into(),
                    model,
                    "--served-model-name".into(),
                    self.served_model_name.clone(),
                    "--host".into(),
                    self.host.clone(),
                    "--port".into(),
                    port.to_string(),
                ];
                if facts.nvfp4 {
                    c.extend(["--quantization".into(), "modelopt_fp4".into()]);
                }
                let qwen = family.as_deref().is_some_and(|f| f.starts_with("qwen3"));
                if qwen {
                    c.extend(["--reasoning-parser".into(), "qwen3".into()]);
                }
                let parser = self.tool_call_parser.clone().unwrap_or_else(|| {
                    match family.as_deref() {
                        Some("qwen3_5") => "qwen3_coder",
                        _ => "hermes",
                    }
                    .into()
                });
                c.extend([
                    "--enable-auto-tool-choice".into(),
                    "--tool-call-parser".into(),
                    parser,
                ]);
                if let Some(n) = self.max_model_len {
                    c.extend(["--max-model-len".into(), n.to_string()]);
                }
                if let Some(u) = self.gpu_memory_utilization {
                    c.extend(["--gpu-memory-utilization".into(), u.to_string()]);
                }
                if facts.vl_wrapper {
                    c.push("--language-model-only".into());
                }
                c
            }
            Engine::Embedded => {
                let program = self.program.as_ref().map_or_else(
                    || {
                        std::env::current_exe()
                            .map_or("qatflow".into(), |p| p.display().to_string())
                    },
                    |p| p.display().to_string(),
                );
                vec![
                    program,
                    "serve".into(),
                    model,
                    "--port".into(),
                    port.to_string(),
                ]
            }
        };
        cmd.extend(self.extra_args.iter().cloned());
        cmd
    }

    /// The base URL of a server of this config on `port`.
    pub fn url(&self, port: u16) -> String {
        let host = if self.host == "0.0.0.0" || self.host == "::" {
            "127.0.0.1"
        } else {
            self.host.as_str()
        };
        format!("http://{host}:{port}")
    }

    fn check(&self) -> Result<(), String> {
        if self.engine.is_some() {
            if self.model.is_none() {
                return Err(
                    "serving.model is required with serving.engine (the model directory to serve)"
                        .into(),
                );
            }
            if self.port == self.candidate_port {
                return Err(format!(
                    "serving.port and serving.candidate_port are both {}: a candidate needs its own port",
                    self.port
                ));
            }
        }
        let h = &self.health;
        if h.interval_ms == 0 || h.request_timeout_ms == 0 || h.stall_timeout_ms == 0 {
            return Err("serving.health intervals and timeouts must be at least 1 ms".into());
        }
        if self.promote.runs == 0 {
            return Err("serving.promote.runs must be at least 1".into());
        }
        Ok(())
    }
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
        let serving = &mut config.serving;
        for p in [
            &mut serving.model,
            &mut serving.promote.candidate,
            &mut serving.promote.suite,
            &mut serving.promote.teacher_dir,
        ]
        .into_iter()
        .flatten()
        {
            rebase(p);
        }
        if let Some(e) = config.exporter.as_mut() {
            rebase(&mut e.out);
            if config.serving.promote.candidate.is_none() {
                config.serving.promote.candidate = Some(e.out.clone());
            }
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
        config.serving.check()?;
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

    fn model_dir(config: serde_json::Value, nvfp4: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        if nvfp4 {
            std::fs::write(dir.path().join("hf_quant_config.json"), "{}").unwrap();
        }
        dir
    }

    #[test]
    fn the_vllm_command_follows_the_model_family() {
        let c = NodeConfig::from_toml(&format!(
            "{MINIMAL}[serving]\nengine = \"vllm\"\nmodel = \"m\"\nmax_model_len = 32768\n\
             gpu_memory_utilization = 0.15\nextra_args = [\"--enforce-eager\"]\n"
        ))
        .unwrap()
        .serving;
        let qwen35 = model_dir(
            serde_json::json!({"model_type": "qwen3_5", "text_config": {"model_type": "qwen3_5_text"}}),
            true,
        );
        let cmd = c.render(qwen35.path(), 8001).join(" ");
        let want = format!(
            "vllm serve {} --served-model-name qatflow --host 127.0.0.1 --port 8001 \
             --quantization modelopt_fp4 --reasoning-parser qwen3 --enable-auto-tool-choice \
             --tool-call-parser qwen3_coder --max-model-len 32768 --gpu-memory-utilization 0.15 \
             --language-model-only --enforce-eager",
            qwen35.path().display()
        );
        assert_eq!(cmd, want);
        let qwen3 = model_dir(serde_json::json!({"model_type": "qwen3"}), false);
        let cmd = c.render(qwen3.path(), 8000).join(" ");
        assert!(
            cmd.contains(
                "--reasoning-parser qwen3 --enable-auto-tool-choice --tool-call-parser hermes"
            ),
            "{cmd}"
        );
        assert!(
            !cmd.contains("modelopt_fp4") && !cmd.contains("--language-model-only"),
            "{cmd}"
        );
        let llama = model_dir(serde_json::json!({"model_type": "llama"}), true);
        let cmd = c.render(llama.path(), 8000).join(" ");
        assert!(!cmd.contains("--reasoning-parser"), "{cmd}");
        assert!(
            cmd.contains("--quantization modelopt_fp4") && cmd.contains("hermes"),
            "{cmd}"
        );
        assert_eq!(c.url(8000), "http://127.0.0.1:8000");
    }

    #[test]
    fn serving_mistakes_are_named() {
        let err =
            NodeConfig::from_toml(&format!("{MINIMAL}[serving]\nengine = \"vllm\"\n")).unwrap_err();
        assert!(err.contains("serving.model is required"), "{err}");
        let err = NodeConfig::from_toml(&format!(
            "{MINIMAL}[serving]\nengine = \"vllm\"\nmodel = \"m\"\ncandidate_port = 8000\n"
        ))
        .unwrap_err();
        assert!(err.contains("own port"), "{err}");
        let err =
            NodeConfig::from_toml(&format!("{MINIMAL}[serving]\nengine = \"tgi\"\n")).unwrap_err();
        assert!(err.contains("tgi"), "{err}");
        let c = NodeConfig::from_toml(&format!(
            "{MINIMAL}[serving]\ncommand = [\"sleep\", \"1\"]\n"
        ))
        .unwrap();
        assert_eq!(c.serving.render(Path::new("ignored"), 1), ["sleep", "1"]);
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
