//! A fake vLLM for the serving supervisor's tests: `fake_vllm serve MODEL_DIR --port P
//! --served-model-name N [any other vLLM flag]` prints its command line, then serves
//! `/health`, `/v1/models` and streaming `/v1/chat/completions` on 127.0.0.1:P.
//!
//! Its behaviour comes from `MODEL_DIR/fake.json`:
//! - `answers`: `[{"contains": TEXT, "content": REPLY}]` or `{"contains": TEXT, "tool":
//!   [NAME, ARGUMENTS_JSON]}`; the first whose text the last user message contains answers
//!   (an empty `contains` matches everything);
//! - `crash_once_after_ms`: exit 1 this long after start, unless `MODEL_DIR/crashed`
//!   exists (it is created first, so the restarted server stays up);
//! - `stall_once_after`: after this many chat requests never send a token again (while
//!   `/health` stays 200, as a wedged vLLM engine does), unless `MODEL_DIR/stalled`
//!   exists (created when it stalls).

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
struct Fake {
    name: String,
    dir: PathBuf,
    config: Arc<Value>,
    requests: Arc<AtomicU64>,
    /// Chat requests after which this process stalls (none when it never does).
    stall_after: Option<u64>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("fake_vllm {}", args.join(" "));
    assert_eq!(
        args.first().map(String::as_str),
        Some("serve"),
        "usage: fake_vllm serve MODEL_DIR --port P"
    );
    let dir = PathBuf::from(&args[1]);
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let port: u16 = flag("--port")
        .expect("--port")
        .parse()
        .expect("a port number");
    let name = flag("--served-model-name").unwrap_or_else(|| dir.display().to_string());
    let config: Value = std::fs::read_to_string(dir.join("fake.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({}));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        if let Some(ms) = config["crash_once_after_ms"].as_u64() {
            let marker = dir.join("crashed");
            if !marker.exists() {
                std::fs::write(&marker, "").unwrap();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    println!("fake_vllm: crashing as told");
                    std::process::exit(1);
                });
            }
        }
        let stall_after = config["stall_once_after"]
            .as_u64()
            .filter(|_| !dir.join("stalled").exists());
        let fake = Fake {
            stall_after,
            name,
            dir,
            config: Arc::new(config),
            requests: Arc::new(AtomicU64::new(0)),
        };
        let app = Router::new()
            .route("/health", get(|| async { "" }))
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat))
            .with_state(fake);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        println!("fake_vllm: listening on port {port}");
        axum::serve(listener, app).await.unwrap();
    });
}

async fn models(State(f): State<Fake>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": f.name, "object": "model"}]}))
}

fn chunk(delta: Value, finish: Option<&str>) -> String {
    let c = json!({"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    format!("data: {c}\n\n")
}

async fn chat(State(f): State<Fake>, Json(req): Json<Value>) -> Response {
    let n = f.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let stall = f.stall_after.is_some_and(|after| n > after);
    if stall {
        std::fs::write(f.dir.join("stalled"), "").unwrap();
    }
    let user = req["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string();
    let answer = f.config["answers"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|x| user.contains(x["contains"].as_str().unwrap_or_default()))
                .cloned()
        })
        .unwrap_or_else(|| json!({"content": "Hello there."}));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(64);
    tokio::spawn(async move {
        let _ = tx.send(Ok(chunk(json!({"role": "assistant"}), None))).await;
        if stall {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        let mut tokens = 0u64;
        let mut parts = Vec::new();
        if let Some(text) = answer["content"].as_str() {
            parts.extend(text.split_inclusive(' ').map(|w| json!({"content": w})));
        }
        if let Some(tool) = answer["tool"].as_array() {
            parts.push(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": tool[0], "arguments": tool[1]}}]}),
            );
        }
        for p in parts {
            tokio::time::sleep(Duration::from_millis(2)).await;
            tokens += 1;
            if tx.send(Ok(chunk(p, None))).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(chunk(json!({}), Some("stop")))).await;
        let usage = json!({"id": "x", "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": tokens}});
        let _ = tx.send(Ok(format!("data: {usage}\n\n"))).await;
        let _ = tx.send(Ok("data: [DONE]\n\n".into())).await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap()
}
