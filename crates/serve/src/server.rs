//! The HTTP side: an axum router with `POST /v1/chat/completions` (JSON or server-sent
//! events), `GET /v1/models`, `GET /health` and `GET /metrics`, bearer-token checks, and the
//! translation of requests into prompts (chat template, tools, thinking switch) and of
//! generated tokens into OpenAI responses.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use burn::tensor::backend::Backend;
use qatflow_model::rng::SplitMix64;
use qatflow_model::template::normalize_messages;
use qatflow_model::{
    CausalLm, GenerateOptions, Generator, LoadOptions, ModelConfig, ModelFamily, Tokenizer,
};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::{ApiError, ChatRequest, Usage};
use crate::engine::{Engine, EngineConfig, Event, Finish, Job, SubmitError};
use crate::metrics::Metrics;
use crate::output::{OutputParser, Piece, StopMatcher};
use crate::toolcall::{ToolCall, ToolCallFormat};
use crate::ServeError;

/// How to load and serve a model directory.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// The name clients put in `model` (default: the directory's name).
    pub model_name: Option<String>,
    /// Context length in tokens (default: `max_position_embeddings` of config.json).
    pub max_model_len: Option<usize>,
    /// Batch and queue limits, prefix cache size.
    pub engine: EngineConfig,
    /// Tool-call format (default: the one the chat template writes).
    pub tool_format: Option<ToolCallFormat>,
    /// Precision and NVFP4 activation emulation.
    pub load: LoadOptions,
    /// Bearer token required on `/v1/*` and `/metrics` (`/health` stays open).
    pub token: Option<String>,
}

/// Refuses a bind address beyond loopback without a bearer token (the node's rule).
pub fn check_bind(addr: &SocketAddr, token: Option<&str>) -> Result<(), ServeError> {
    if addr.ip().is_loopback() || token.is_some_and(|t| !t.is_empty()) {
        Ok(())
    } else {
        Err(ServeError::NeedsToken(*addr))
    }
}

/// Everything a request handler needs: the worker, the tokenizer and template, limits,
/// metrics.
pub struct AppState {
    engine: Engine,
    tokenizer: Tokenizer,
    name: String,
    context_len: usize,
    vocab_size: usize,
    tool_format: ToolCallFormat,
    thinking_default: bool,
    stop_ids: Vec<u32>,
    metrics: Arc<Metrics>,
    token_digest: Option<[u8; 32]>,
    created: u64,
    counter: AtomicU64,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("name", &self.name)
            .field("context_len", &self.context_len)
            .field("tool_format", &self.tool_format)
            .finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl AppState {
    /// Loads the tokenizer and chat template of `dir` here and the model on the worker
    /// thread (on `device`).
    pub fn load<B: Backend>(
        dir: &Path,
        options: ServeOptions,
        device: B::Device,
    ) -> Result<Arc<AppState>, ServeError> {
        let config_path = dir.join("config.json");
        let config = ModelConfig::from_file(&config_path)?;
        let raw: Value = std::fs::read_to_string(&config_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let tokenizer = Tokenizer::from_dir(dir, ModelFamily::detect(&raw))?;
        let template = tokenizer.template().ok_or_else(|| ServeError::NoTemplate {
            dir: dir.to_path_buf(),
        })?;
        let generation_prompt = template.generation_prompt(None, None)?;
        let thinking_default = if generation_prompt.contains("<think>") {
            !generation_prompt.contains("</think>")
        } else {
            template.source().contains("enable_thinking")
        };
        let tool_format = options
            .tool_format
            .unwrap_or_else(|| ToolCallFormat::for_template(template.source()));
        let mut stop_ids: Vec<u32> = tokenizer.eos_token_ids().to_vec();
        stop_ids.extend(&config.eos_token_ids);
        stop_ids.extend(
            ["<|im_end|>", "<|endoftext|>"]
                .iter()
                .filter_map(|t| tokenizer.token_id(t)),
        );
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let name = options.model_name.clone().unwrap_or_else(|| {
            dir.canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| dir.display().to_string())
        });
        let metrics = Arc::new(Metrics::default());
        let model_dir = dir.to_path_buf();
        let load = options.load;
        let engine = Engine::start(
            move || {
                let model = CausalLm::<B>::load(&model_dir, load, &device)?;
                let (generator, declined) = Generator::choose(model);
                match declined {
                    Some(why) => tracing::info!(generator = generator.kind(), %why, "model loaded"),
                    None => tracing::info!(generator = generator.kind(), "model loaded"),
                }
                Ok(generator)
            },
            options.engine,
            metrics.clone(),
        )?;
        Ok(Arc::new(AppState {
            engine,
            tokenizer,
            name,
            context_len: options
                .max_model_len
                .unwrap_or(config.max_position_embeddings)
                .max(2),
            vocab_size: config.vocab_size,
            tool_format,
            thinking_default,
            stop_ids,
            metrics,
            token_digest: options
                .token
                .as_deref()
                .filter(|t| !t.is_empty())
                .map(|t| Sha256::digest(t.as_bytes()).into()),
            created: now_secs(),
            counter: AtomicU64::new(0),
        }))
    }

    /// The tool-call format replies are parsed in: `--tool-call-parser` if given, else the
    /// one the chat template writes (Qwen3.5's XML for Qwen3.5 models, Hermes otherwise).
    pub fn tool_format(&self) -> ToolCallFormat {
        self.tool_format
    }

    /// The served model's name.
    pub fn model_name(&self) -> &str {
        &self.name
    }

    /// The context length requests are checked against.
    pub fn context_len(&self) -> usize {
        self.context_len
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn new_id(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut rng = SplitMix64::new(nanos ^ n.rotate_left(32));
        format!(
            "{prefix}{:016x}{:08x}",
            rng.next_u64(),
            rng.next_u64() as u32
        )
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.token_digest else {
            return Ok(());
        };
        let unauthorized = |message: &str| {
            ApiError::bad_request(message, None)
                .with_status(StatusCode::UNAUTHORIZED, "authentication_error")
                .with_code("invalid_api_key")
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                unauthorized("missing bearer token: send the header `Authorization: Bearer <token>` with the server's token")
            })?;
        // Comparing digests keeps the comparison time independent of the token's content.
        let got: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if got
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            != 0
        {
            return Err(unauthorized(
                "wrong bearer token: use the token the server was started with",
            ));
        }
        Ok(())
    }
}

/// The router of a loaded model.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(32 << 20))
        .with_state(state)
}

/// Serves `state` on `listener` until `shutdown` completes, with Nagle's algorithm off on
/// every connection ([`low_latency`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(low_latency(listener), router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// `listener` with Nagle's algorithm off on every accepted connection: a streamed chunk is a
/// small write that follows the response head, and with Nagle on it waits for the client's
/// delayed ACK of the head (40 ms on Linux), which was the whole time to the first token on a
/// GPU.
fn low_latency(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = SocketAddr> {
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("could not turn Nagle's algorithm off on a connection: {e}");
        }
    })
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::bad_request(
        format!(
            "no route {uri}: this server offers POST /v1/chat/completions, GET /v1/models, GET /health and GET /metrics"
        ),
        None,
    )
    .with_status(StatusCode::NOT_FOUND, "invalid_request_error")
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = st.authorize(&headers) {
        st.metrics.errors.fetch_add(1, Ordering::Relaxed);
        return e.into_response();
    }
    Json(json!({"object": "list", "data": [{
        "id": st.name, "object": "model", "created": st.created, "owned_by": "qatflow",
        "root": st.name, "max_model_len": st.context_len,
    }]}))
    .into_response()
}

async fn metrics(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = st.authorize(&headers) {
        st.metrics.errors.fetch_add(1, Ordering::Relaxed);
        return e.into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    st.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let result = match st.authorize(&headers) {
        Ok(()) => start_chat(&st, &body),
        Err(e) => Err(e),
    };
    let (prepared, events) = match result {
        Ok(r) => r,
        Err(e) => {
            st.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return e.into_response();
        }
    };
    if prepared.stream {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
        tokio::spawn(stream_reply(st, prepared, events, tx));
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .expect("static headers are valid")
    } else {
        match full_reply(&st, prepared, events).await {
            Ok(v) => Json(v).into_response(),
            Err(e) => {
                st.metrics.errors.fetch_add(1, Ordering::Relaxed);
                e.into_response()
            }
        }
    }
}

/// A validated request, ready to generate.
struct Prepared {
    id: String,
    stream: bool,
    include_usage: bool,
    prompt_tokens: usize,
    parser: OutputParser,
    stop: StopMatcher,
}

fn bad(message: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::bad_request(message, Some(param))
}

/// Validates the request, renders and tokenizes the prompt and queues the job.
fn start_chat(
    st: &AppState,
    body: &[u8],
) -> Result<(Prepared, UnboundedReceiver<Event>), ApiError> {
    let req: ChatRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            format!("the request body is not a valid chat completion request: {e}; send JSON like {{\"model\": ..., \"messages\": [...]}}"),
            None,
        )
    })?;
    if req.model != st.name {
        return Err(ApiError::bad_request(
            format!(
                "The model `{}` does not exist; this server serves `{}` (see GET /v1/models)",
                req.model, st.name
            ),
            Some("model"),
        )
        .with_status(StatusCode::NOT_FOUND, "invalid_request_error")
        .with_code("model_not_found"));
    }
    if req.messages.is_empty() {
        return Err(bad(
            "`messages` is empty; send at least one message",
            "messages",
        ));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(bad("only `n` = 1 is supported", "n"));
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(
            format!("`temperature` must be between 0 and 2, got {temperature}"),
            "temperature",
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(
            format!("`top_p` must be in (0, 1], got {top_p}"),
            "top_p",
        ));
    }
    let tools = tools_for(&req)?;
    let kwargs = req.chat_template_kwargs.clone().unwrap_or_default();
    let enable_thinking = match kwargs.get("enable_thinking") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(other) => {
            return Err(bad(
                format!(
                    "`chat_template_kwargs.enable_thinking` must be true or false, got {other}"
                ),
                "chat_template_kwargs",
            ))
        }
    };
    let messages = normalize_messages(&req.messages).map_err(|e| bad(e.to_string(), "messages"))?;
    let template = st
        .tokenizer
        .template()
        .expect("AppState::load checked the template");
    let mut ctx = Map::new();
    for (k, v) in kwargs {
        if v.is_null() && k == "enable_thinking" {
            continue;
        }
        ctx.insert(k, v);
    }
    ctx.insert("messages".into(), Value::Array(messages));
    ctx.insert(
        "tools".into(),
        tools
            .as_ref()
            .map_or(Value::Null, |t| Value::Array(t.clone())),
    );
    ctx.insert("add_generation_prompt".into(), Value::Bool(true));
    let text = template.render_context(&Value::Object(ctx)).map_err(|e| {
        bad(
            format!("the chat template refused these messages: {e}"),
            "messages",
        )
    })?;
    let prompt = st.tokenizer.encode(&text).map_err(|e| {
        ApiError::bad_request(
            format!("tokenizing the prompt failed: {e}"),
            Some("messages"),
        )
    })?;
    if prompt.is_empty() {
        return Err(bad("the rendered prompt has no tokens", "messages"));
    }
    if let Some(&t) = prompt.iter().find(|&&t| t as usize >= st.vocab_size) {
        return Err(ApiError::bad_request(
            format!("prompt token {t} is outside the model's vocabulary of {}; the tokenizer does not match the model", st.vocab_size),
            Some("messages"),
        ).with_status(StatusCode::INTERNAL_SERVER_ERROR, "server_error"));
    }
    let room = st.context_len.saturating_sub(prompt.len());
    let requested = req.max_completion_tokens.or(req.max_tokens);
    if requested == Some(0) {
        return Err(bad("`max_tokens` must be at least 1", "max_tokens"));
    }
    let max_tokens = requested.unwrap_or(room);
    if prompt.len() + max_tokens > st.context_len || room == 0 {
        return Err(bad(
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the messages, {} in the completion). Please reduce the length of the messages or the completion.",
                st.context_len,
                prompt.len() + max_tokens.max(1),
                prompt.len(),
                max_tokens.max(1)
            ),
            "messages",
        )
        .with_code("context_length_exceeded"));
    }
    let thinking = enable_thinking.unwrap_or(st.thinking_default);
    let prompt_opened_think = text.trim_end().ends_with("<think>");
    let parser = OutputParser::new(
        thinking,
        prompt_opened_think,
        tools.map(|t| (st.tool_format, t)),
    );
    let stops = req.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > 4 {
        return Err(bad("at most 4 stop strings are allowed", "stop"));
    }
    let sampling = GenerateOptions {
        temperature,
        top_p,
        seed: req.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        }),
        ..GenerateOptions::default()
    };
    let prompt_tokens = prompt.len();
    let (job, events) = Job::new(prompt, max_tokens, sampling, st.stop_ids.clone());
    st.engine.submit(job).map_err(|e| match e {
        SubmitError::QueueFull(_) => ApiError::bad_request(e.to_string(), None)
            .with_status(StatusCode::TOO_MANY_REQUESTS, "server_overloaded")
            .with_code("queue_full"),
        SubmitError::WorkerGone => ApiError::bad_request(e.to_string(), None)
            .with_status(StatusCode::SERVICE_UNAVAILABLE, "server_error"),
    })?;
    Ok((
        Prepared {
            id: st.new_id("chatcmpl-"),
            stream: req.stream,
            include_usage: req.stream_options.is_some_and(|o| o.include_usage),
            prompt_tokens,
            parser,
            stop: StopMatcher::new(stops),
        },
        events,
    ))
}

/// The tools to render and parse, after checking them against `tool_choice`.
fn tools_for(req: &ChatRequest) -> Result<Option<Vec<Value>>, ApiError> {
    let Some(tools) = req.tools.as_ref().filter(|t| !t.is_empty()) else {
        if let Some(choice) = &req.tool_choice {
            if choice != "none" && choice != "auto" {
                return Err(bad(
                    "`tool_choice` needs `tools`: give the tool definitions",
                    "tool_choice",
                ));
            }
        }
        return Ok(None);
    };
    let mut names = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let name = t
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str);
        match (t.get("type").and_then(Value::as_str), name) {
            (Some("function"), Some(name)) => names.push(name),
            _ => {
                return Err(bad(
                    format!("tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": ...}}}}"),
                    "tools",
                ))
            }
        }
    }
    match &req.tool_choice {
        None => Ok(Some(tools.clone())),
        Some(Value::String(s)) if s == "none" => Ok(None),
        Some(Value::String(s)) if s == "auto" || s == "required" => Ok(Some(tools.clone())),
        Some(choice) => {
            let named = choice
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match named {
                Some(n) if names.contains(&n) => Ok(Some(tools.clone())),
                Some(n) => Err(bad(
                    format!("`tool_choice` names `{n}`, which is not among `tools` ({})", names.join(", ")),
                    "tool_choice",
                )),
                None => Err(bad(
                    format!("`tool_choice` must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {choice}"),
                    "tool_choice",
                )),
            }
        }
    }
}

/// Turns token ids into text as they come, holding back incomplete UTF-8 sequences.
struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    fn new() -> Self {
        Detokenizer {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    fn decode(tok: &Tokenizer, ids: &[u32]) -> String {
        tok.decode(ids, true).unwrap_or_default()
    }

    fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let before = Self::decode(tok, &self.ids[self.prefix..self.read]);
        let now = Self::decode(tok, &self.ids[self.prefix..]);
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            if let Some(delta) = now.get(before.len()..) {
                let delta = delta.to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                return delta;
            }
        }
        String::new()
    }

    fn finish(&mut self, tok: &Tokenizer) -> String {
        let before = Self::decode(tok, &self.ids[self.prefix..self.read]);
        let now = Self::decode(tok, &self.ids[self.prefix..]);
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        now.get(before.len()..).unwrap_or_default().to_string()
    }
}

/// The state of one reply while tokens arrive.
struct Reply {
    detok: Detokenizer,
    received: usize,
    cached: usize,
    finish: Option<(Finish, usize)>,
}

/// What one worker event means for the reply.
enum Step {
    Pieces(Vec<Piece>),
    End,
}

impl Reply {
    fn new() -> Self {
        Reply {
            detok: Detokenizer::new(),
            received: 0,
            cached: 0,
            finish: None,
        }
    }

    /// Applies the next event; `None` from the channel means the worker went away.
    fn on_event(
        &mut self,
        st: &AppState,
        p: &mut Prepared,
        event: Option<Event>,
    ) -> Result<Step, ApiError> {
        let server_error = |m: String| {
            ApiError::bad_request(m, None)
                .with_status(StatusCode::INTERNAL_SERVER_ERROR, "server_error")
        };
        match event {
            Some(Event::Started { cached }) => {
                self.cached = cached;
                Ok(Step::Pieces(Vec::new()))
            }
            Some(Event::Token(id)) => {
                self.received += 1;
                let text = self.detok.push(&st.tokenizer, id);
                let kept = p.stop.push(&text);
                let pieces = p.parser.push(&kept);
                if p.stop.stopped() {
                    self.finish = Some((Finish::Stop, self.received));
                    Ok(Step::Pieces(pieces))
                } else {
                    Ok(Step::Pieces(pieces))
                }
            }
            Some(Event::Done { finish, generated }) => {
                let text = self.detok.finish(&st.tokenizer);
                let mut kept = p.stop.push(&text);
                if !p.stop.stopped() {
                    kept.push_str(&p.stop.finish());
                }
                self.finish = Some((finish, generated));
                Ok(Step::Pieces(p.parser.push(&kept)))
            }
            Some(Event::Error(m)) => Err(server_error(m)),
            None => Err(server_error(
                "the model worker stopped before the reply was complete; restart the server".into(),
            )),
        }
        .map(|step| {
            let idle = matches!(&step, Step::Pieces(v) if v.is_empty());
            if idle && self.finish.is_some() {
                Step::End
            } else {
                step
            }
        })
    }

    fn usage(&self, p: &Prepared) -> Usage {
        let completion = self.finish.map_or(self.received, |f| f.1);
        Usage {
            prompt_tokens: p.prompt_tokens,
            completion_tokens: completion,
            total_tokens: p.prompt_tokens + completion,
        }
    }

    fn finish_reason(&self, calls: &[ToolCall]) -> &'static str {
        if !calls.is_empty() {
            return "tool_calls";
        }
        match self.finish {
            Some((Finish::Length, _)) => "length",
            _ => "stop",
        }
    }
}

fn tool_calls_json(st: &AppState, calls: &[ToolCall], with_index: bool) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({"id": st.new_id("call_"), "type": "function",
                "function": {"name": c.name, "arguments": c.arguments}});
            if with_index {
                v["index"] = json!(i);
            }
            v
        })
        .collect()
}

async fn full_reply(
    st: &AppState,
    mut p: Prepared,
    mut events: UnboundedReceiver<Event>,
) -> Result<Value, ApiError> {
    let mut reply = Reply::new();
    let mut reasoning: Option<String> = None;
    let mut content = String::new();
    let mut absorb = |pieces: Vec<Piece>| {
        for piece in pieces {
            match piece {
                Piece::Reasoning(r) => reasoning.get_or_insert_with(String::new).push_str(&r),
                Piece::Content(c) => content.push_str(&c),
            }
        }
    };
    loop {
        let event = events.recv().await;
        match reply.on_event(st, &mut p, event)? {
            Step::Pieces(pieces) => absorb(pieces),
            Step::End => break,
        }
        if reply.finish.is_some() {
            break;
        }
    }
    drop(events);
    let fin = p.parser.clone().finish();
    absorb(fin.pieces);
    st.metrics
        .tool_calls_malformed
        .fetch_add(fin.malformed as u64, Ordering::Relaxed);
    let mut message = json!({"role": "assistant"});
    let content = if fin.calls.is_empty() {
        Value::String(content)
    } else {
        let t = content.trim_end();
        if t.is_empty() {
            Value::Null
        } else {
            Value::String(t.to_string())
        }
    };
    message["content"] = content;
    if let Some(r) = reasoning {
        message["reasoning_content"] = json!(r);
        message["reasoning"] = json!(r);
    }
    if !fin.calls.is_empty() {
        message["tool_calls"] = json!(tool_calls_json(st, &fin.calls, false));
    }
    Ok(json!({
        "id": p.id, "object": "chat.completion", "created": now_secs(), "model": st.name,
        "choices": [{"index": 0, "message": message, "logprobs": null,
                     "finish_reason": reply.finish_reason(&fin.calls)}],
        "usage": reply.usage(&p).to_json(reply.cached),
    }))
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

async fn stream_reply(
    st: Arc<AppState>,
    mut p: Prepared,
    mut events: UnboundedReceiver<Event>,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>,
) {
    let created = now_secs();
    let id = p.id.clone();
    let chunk = |delta: Value, finish: Option<&str>, include_usage: bool| {
        let mut v = json!({"id": id, "object": "chat.completion.chunk", "created": created,
            "model": st.name, "choices": [{"index": 0, "delta": delta, "logprobs": null,
            "finish_reason": finish}]});
        if include_usage {
            v["usage"] = Value::Null;
        }
        sse(&v)
    };
    let include_usage = p.include_usage;
    if tx
        .send(Ok(chunk(
            json!({"role": "assistant", "content": ""}),
            None,
            include_usage,
        )))
        .await
        .is_err()
    {
        return;
    }
    let mut reply = Reply::new();
    loop {
        let event = events.recv().await;
        let step = match reply.on_event(&st, &mut p, event) {
            Ok(s) => s,
            Err(e) => {
                st.metrics.errors.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(Ok(sse(&e.body()))).await;
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
                return;
            }
        };
        let pieces = match step {
            Step::Pieces(pieces) => pieces,
            Step::End => Vec::new(),
        };
        for piece in pieces {
            let delta = match piece {
                Piece::Reasoning(r) => json!({"reasoning_content": r, "reasoning": r}),
                Piece::Content(c) => json!({"content": c}),
            };
            if tx
                .send(Ok(chunk(delta, None, include_usage)))
                .await
                .is_err()
            {
                return;
            }
        }
        if reply.finish.is_some() {
            break;
        }
    }
    drop(events);
    let fin = p.parser.clone().finish();
    st.metrics
        .tool_calls_malformed
        .fetch_add(fin.malformed as u64, Ordering::Relaxed);
    let mut out = Vec::new();
    for piece in fin.pieces {
        let delta = match piece {
            Piece::Reasoning(r) => json!({"reasoning_content": r, "reasoning": r}),
            Piece::Content(c) => json!({"content": c}),
        };
        out.push(chunk(delta, None, include_usage));
    }
    for call in tool_calls_json(&st, &fin.calls, true) {
        out.push(chunk(json!({"tool_calls": [call]}), None, include_usage));
    }
    out.push(chunk(
        json!({}),
        Some(reply.finish_reason(&fin.calls)),
        include_usage,
    ));
    if include_usage {
        out.push(sse(&json!({"id": id, "object": "chat.completion.chunk",
            "created": created, "model": st.name, "choices": [],
            "usage": reply.usage(&p).to_json(reply.cached)})));
    }
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    for b in out {
        if tx.send(Ok(b)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::serve::Listener;

    use super::low_latency;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(tokio::net::TcpStream::connect(addr));
        let (io, _) = low_latency(listener).accept().await;
        assert!(
            io.nodelay().unwrap(),
            "an accepted connection kept Nagle's algorithm"
        );
        client.await.unwrap().unwrap();
    }
}
