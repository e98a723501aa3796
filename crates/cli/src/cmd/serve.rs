//! `qatflow serve MODEL_DIR`: the embedded OpenAI-compatible server (`qatflow_serve`) on a
//! model directory. Prints `listening on http://ADDR` on stdout once the model is loaded
//! and the port is bound (one line, for supervisors that start it with `--port 0`).

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use burn::tensor::backend::Backend;
use qatflow_serve::{AppState, EngineConfig, ServeOptions, ToolCallFormat};

use super::infer::ModelArgs;

/// Arguments of `qatflow serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model directory: Hugging Face (BF16/F32 safetensors) or an NVFP4 export, with
    /// tokenizer.json and a chat template.
    pub model_dir: PathBuf,
    /// Address to listen on; anything but loopback needs --token.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0 picks a free one; the bound address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Bearer token required on /v1/* and /metrics (/health stays open).
    #[arg(long, env = "QATFLOW_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Model name clients send in `model` (default: the directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Context length in tokens (default: max_position_embeddings of config.json).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Most requests waiting beyond those being decoded (more get HTTP 429).
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Prompt KV caches kept for prefix reuse (0 turns the prefix cache off).
    #[arg(long, default_value_t = 4)]
    pub prefix_cache: usize,
    /// Tool-call format: hermes or qwen3_coder (default: what the chat template writes).
    #[arg(long, value_parser = ["hermes", "qwen3_coder"])]
    pub tool_call_parser: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
}

fn serve_on<B: Backend>(a: &ServeArgs, device: B::Device) -> anyhow::Result<()> {
    let addr = SocketAddr::new(a.host, a.port);
    qatflow_serve::check_bind(&addr, a.token.as_deref())?;
    let options = ServeOptions {
        model_name: a.served_model_name.clone(),
        max_model_len: a.max_model_len,
        engine: EngineConfig {
            max_batch: a.max_batch.max(1),
            queue_capacity: a.max_queue.max(1),
            prefix_cache_entries: a.prefix_cache,
            ..EngineConfig::default()
        },
        tool_format: a
            .tool_call_parser
            .as_deref()
            .and_then(ToolCallFormat::from_name),
        load: a.model.options(),
        token: a.token.clone(),
    };
    let state = AppState::load::<B>(&a.model_dir, options, device)
        .with_context(|| format!("loading {}", a.model_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}; pick another --port"))?;
        let bound = listener.local_addr()?;
        tracing::info!(model = state.model_name(), %bound, "serving");
        let mut stdout = std::io::stdout();
        writeln!(stdout, "listening on http://{bound}")?;
        stdout.flush()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut tx = Some(tx);
        // Ctrl-C finishes the requests in flight, then exits.
        let _ = ctrlc::set_handler(move || {
            if let Some(tx) = tx.take() {
                let _ = tx.send(());
            }
        });
        qatflow_serve::serve(listener, state, async {
            let _ = rx.await;
        })
        .await
        .context("serving")
    })
}

/// Runs `qatflow serve`.
pub fn run(a: ServeArgs) -> anyhow::Result<ExitCode> {
    on_inference_backend!(unfused a.model.device, serve_on(&a))?;
    Ok(ExitCode::SUCCESS)
}
