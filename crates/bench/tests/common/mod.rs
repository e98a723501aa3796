//! A fake OpenAI-compatible server on 127.0.0.1:0 for the bench tests: streaming chat
//! completions (SSE, `data: [DONE]`, a usage chunk when `stream_options.include_usage`),
//! `/v1/models` and `/health`. What it answers is decided per request by a closure.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// What the fake model answers to one request.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// Text content, streamed one word per chunk.
    pub content: String,
    /// Reasoning, streamed first in `reasoning_content`.
    pub reasoning: String,
    /// A tool call: (name, JSON arguments), streamed in two argument fragments.
    pub tool_call: Option<(String, String)>,
    /// Delay before the first token.
    pub first_delay: Duration,
    /// Delay between chunks.
    pub step: Duration,
    /// Never send a token (the connection stays open).
    pub stall: bool,
}

type Respond = Arc<dyn Fn(&Value) -> Reply + Send + Sync>;

#[derive(Clone)]
struct Fake {
    model: String,
    respond: Respond,
    requests: Arc<Mutex<Vec<Value>>>,
}

/// A running fake server.
pub struct FakeServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Every chat request body received.
    pub requests: Arc<Mutex<Vec<Value>>>,
}

/// The last user message of a request, or the last tool result when the history ends with
/// one.
pub fn last_text(request: &Value) -> String {
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user" || m["role"] == "tool")
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Starts the fake on the current tokio runtime.
pub async fn start(
    model: &str,
    respond: impl Fn(&Value) -> Reply + Send + Sync + 'static,
) -> FakeServer {
    let requests = Arc::new(Mutex::new(Vec::new()));
    let fake = Fake {
        model: model.to_string(),
        respond: Arc::new(respond),
        requests: requests.clone(),
    };
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    FakeServer { url, requests }
}

async fn models(State(f): State<Fake>) -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": f.model, "object": "model", "owned_by": "test"}]}),
    )
}

fn chunk(model: &str, delta: Value, finish: Option<&str>) -> String {
    let c = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    format!("data: {c}\n\n")
}

async fn chat(State(f): State<Fake>, Json(req): Json<Value>) -> Response {
    f.requests.lock().unwrap().push(req.clone());
    if req["model"] != json!(f.model) {
        let body = json!({"error": {"message": format!("The model `{}` does not exist.", req["model"]), "type": "NotFoundError", "code": 404}});
        return (StatusCode::NOT_FOUND, Json(body)).into_response();
    }
    let reply = (f.respond)(&req);
    let usage = req["stream_options"]["include_usage"] == json!(true);
    let (tx, rx) = mpsc::channel::<Result<String, std::io::Error>>(64);
    let model = f.model.clone();
    tokio::spawn(async move {
        let _ = tx
            .send(Ok(chunk(
                &model,
                json!({"role": "assistant", "content": ""}),
                None,
            )))
            .await;
        if reply.stall {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        tokio::time::sleep(reply.first_delay).await;
        let mut tokens = 0u64;
        let mut parts: Vec<Value> = Vec::new();
        if !reply.reasoning.is_empty() {
            parts.push(json!({"reasoning_content": reply.reasoning}));
        }
        for w in reply.content.split_inclusive(' ') {
            parts.push(json!({"content": w}));
        }
        if let Some((name, args)) = &reply.tool_call {
            let (a, b) = args.split_at(args.len() / 2);
            parts.push(json!({"tool_calls": [{"index": 0, "id": "call_0", "type": "function", "function": {"name": name, "arguments": a}}]}));
            parts.push(json!({"tool_calls": [{"index": 0, "function": {"arguments": b}}]}));
        }
        for (i, p) in parts.into_iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(reply.step).await;
            }
            tokens += 1;
            if tx.send(Ok(chunk(&model, p, None))).await.is_err() {
                return;
            }
        }
        let finish = if reply.tool_call.is_some() {
            "tool_calls"
        } else {
            "stop"
        };
        let _ = tx.send(Ok(chunk(&model, json!({}), Some(finish)))).await;
        if usage {
            let u = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
                "usage": {"prompt_tokens": 100, "completion_tokens": tokens, "total_tokens": 100 + tokens}});
            let _ = tx.send(Ok(format!("data: {u}\n\n"))).await;
        }
        let _ = tx.send(Ok("data: [DONE]\n\n".into())).await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .unwrap()
}
