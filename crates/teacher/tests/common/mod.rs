//! Test helpers: a scripted teacher server on 127.0.0.1:0 speaking the OpenAI
//! chat-completions and Anthropic Messages protocols, and canned teacher output.
//!
//! The server runs on its own thread and runtime. Dropping the [`TestServer`] stops it at
//! once: the runtime is shut down without waiting, so a handler still stalling (a scripted
//! delay longer than the client's timeout) is dropped instead of delaying the test.

#![allow(dead_code)]

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Step {
    /// HTTP status.
    pub status: u16,
    /// Delay before answering.
    pub delay: Duration,
    /// The completion text.
    pub content: String,
    /// Extra response headers (such as `Retry-After`).
    pub headers: Vec<(String, String)>,
}

impl Step {
    pub fn ok(content: impl Into<String>) -> Step {
        Step {
            status: 200,
            delay: Duration::ZERO,
            content: content.into(),
            headers: Vec::new(),
        }
    }
    pub fn status(status: u16) -> Step {
        Step {
            status,
            delay: Duration::ZERO,
            content: String::new(),
            headers: Vec::new(),
        }
    }
    pub fn delayed(mut self, d: Duration) -> Step {
        self.delay = d;
        self
    }
    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Step {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
    fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in &self.headers {
            map.insert(
                HeaderName::try_from(name.as_str()).unwrap(),
                HeaderValue::try_from(value.as_str()).unwrap(),
            );
        }
        map
    }
}

struct Shared {
    script: Mutex<VecDeque<Step>>,
    fallback: Step,
    requests: Mutex<Vec<Value>>,
    headers: Mutex<Vec<HeaderMap>>,
    arrivals: Mutex<Vec<Instant>>,
}

/// A running scripted server; dropping it stops the server without waiting for handlers.
pub struct TestServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl TestServer {
    /// `http://127.0.0.1:PORT/v1`.
    pub fn openai_base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// Request bodies received so far.
    pub fn requests(&self) -> Vec<Value> {
        self.shared.requests.lock().unwrap().clone()
    }
    /// Request headers received so far.
    pub fn headers(&self) -> Vec<HeaderMap> {
        self.shared.headers.lock().unwrap().clone()
    }
    /// When each request arrived, in order.
    pub fn arrivals(&self) -> Vec<Instant> {
        self.shared.arrivals.lock().unwrap().clone()
    }
}

async fn answer(shared: &Shared, headers: HeaderMap, body: Value) -> Step {
    shared.arrivals.lock().unwrap().push(Instant::now());
    let n = {
        let mut requests = shared.requests.lock().unwrap();
        requests.push(body);
        requests.len()
    };
    shared.headers.lock().unwrap().push(headers);
    let mut step = shared
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| shared.fallback.clone());
    step.content = step.content.replace("{n}", &n.to_string());
    if !step.delay.is_zero() {
        tokio::time::sleep(step.delay).await;
    }
    step
}

async fn openai(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, HeaderMap, Json<Value>) {
    let step = answer(&shared, headers, body).await;
    let status = StatusCode::from_u16(step.status).unwrap();
    if step.status != 200 {
        return (
            status,
            step.header_map(),
            Json(json!({"error": {"message": "scripted failure"}})),
        );
    }
    (
        status,
        step.header_map(),
        Json(json!({
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": step.content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
        })),
    )
}

async fn anthropic(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, HeaderMap, Json<Value>) {
    let step = answer(&shared, headers, body).await;
    let status = StatusCode::from_u16(step.status).unwrap();
    if step.status != 200 {
        return (status, step.header_map(), Json(json!({"type": "error"})));
    }
    (
        status,
        step.header_map(),
        Json(json!({
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": step.content}],
            "usage": {"input_tokens": 70, "output_tokens": 30},
        })),
    )
}

/// Starts a server on 127.0.0.1:0 (on its own thread and runtime) that answers with
/// `script` in order, then with `fallback` forever; `{n}` in an answer becomes the
/// request's number (1-based), so answers can differ.
pub fn start(script: Vec<Step>, fallback: Step) -> TestServer {
    let shared = Arc::new(Shared {
        script: Mutex::new(script.into()),
        fallback,
        requests: Mutex::new(Vec::new()),
        headers: Mutex::new(Vec::new()),
        arrivals: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(openai))
        .route("/v1/messages", post(anthropic))
        .with_state(shared.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            tokio::select! {
                served = axum::serve(listener, app) => served.unwrap(),
                _ = stopped => {}
            }
        });
        // Connection tasks (and a stalling handler in one) are dropped, not awaited.
        rt.shutdown_background();
    });
    let addr = rx.recv().unwrap();
    TestServer {
        addr,
        shared,
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// One clean conversation line (short system prompt, as a teacher writes it).
pub fn line(tag: &str) -> String {
    json!({"messages": [
        {"role": "system", "content": "You are Mira."},
        {"role": "user", "content": format!("Tell me about {tag}.")},
        {"role": "assistant", "content": format!("<think>\n</think>\nHere is one fact about {tag}.")},
    ]})
    .to_string()
}

/// `n` clean lines tagged `prefix-i`, newline-separated.
pub fn lines(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| line(&format!("{prefix}-{i}")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `generate` example, built by `cargo test` beside the test binaries.
pub fn example_binary() -> std::path::PathBuf {
    // target/<profile>/deps/<test> → target/<profile>/examples/generate
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join("generate");
    assert!(
        path.is_file(),
        "{} is missing: `cargo test` builds examples, run the tests through cargo",
        path.display()
    );
    path
}
