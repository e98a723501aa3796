//! Test support: a tiny random Llama with a byte-level BPE tokenizer and a chat template,
//! served in-process on a loopback port.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use qatflow_serve::{AppState, EngineConfig, ServeOptions};
use serde_json::{json, Value};

/// GPT-2's `bytes_to_unicode` table: byte → printable char.
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// Vocabulary size of the tiny model: three control tokens and the 256 bytes.
pub const VOCAB: usize = 259;

/// Path of a chat template fixture (`smollm2`, `qwen3`, `qwen3_5_think`, ...).
pub fn template(name: &str) -> String {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/templates"
    );
    std::fs::read_to_string(format!("{dir}/{name}.jinja")).unwrap()
}

/// Writes a tiny two-layer Llama (random weights, seed 11, untied head) with a byte-level tokenizer
/// (`<|endoftext|>` 0, `<|im_start|>` 1, `<|im_end|>` 2, bytes 3..259) and `template`.
pub fn tiny_model(dir: &Path, template: &str) {
    let mut config = qatflow_model::init::named_config("tiny-llama").unwrap();
    config["vocab_size"] = json!(VOCAB);
    // A tied head makes a random model repeat its last input token forever.
    config["tie_word_embeddings"] = json!(false);
    qatflow_model::init::write_random_model(&config, 11, safetensors::Dtype::F32, dir).unwrap();
    sharpen(&dir.join("model.safetensors"));
    let mut vocab = serde_json::Map::new();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    for (i, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(i + 3));
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let tc = json!({"chat_template": template, "eos_token": "<|im_end|>",
                    "bos_token": null, "pad_token": "<|endoftext|>"});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

/// Sets the final norm's gain to 10 so the random model's logits are far apart (greedy
/// choices then never hinge on float rounding: batched and single-sequence decoding round
/// differently), and zeroes the LM head rows of the three control tokens so the model
/// never ends a reply early.
fn sharpen(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let range = |name: &str| {
        let offsets = &header[name]["data_offsets"];
        (
            8 + n + offsets[0].as_u64().unwrap() as usize,
            8 + n + offsets[1].as_u64().unwrap() as usize,
        )
    };
    let (a, b) = range("model.norm.weight");
    for chunk in bytes[a..b].chunks_mut(4) {
        chunk.copy_from_slice(&10f32.to_le_bytes());
    }
    let (a, b) = range("lm_head.weight");
    let row = (b - a) / VOCAB;
    bytes[a..a + 3 * row].fill(0);
    std::fs::write(path, bytes).unwrap();
}

/// A server running in this test's runtime.
pub struct TestServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The state (for the model name).
    pub state: Arc<AppState>,
    /// An HTTP client.
    pub client: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Options with a small context so that overlong requests are cheap to make.
pub fn options() -> ServeOptions {
    ServeOptions {
        model_name: Some("tiny".into()),
        max_model_len: Some(1024),
        engine: EngineConfig {
            max_batch: 16,
            queue_capacity: 64,
            prefix_cache_entries: 4,
            min_prefix_tokens: 16,
        },
        ..ServeOptions::default()
    }
}

/// Loads `dir` and serves it on an ephemeral loopback port.
pub async fn start(dir: &Path, options: ServeOptions) -> TestServer {
    let dir = dir.to_path_buf();
    let state = tokio::task::spawn_blocking(move || {
        AppState::load::<burn::backend::Flex>(&dir, options, Default::default())
    })
    .await
    .unwrap()
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let s = state.clone();
    tokio::spawn(async move {
        qatflow_serve::serve(listener, s, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    TestServer {
        base: format!("http://{addr}"),
        state,
        client: reqwest::Client::new(),
        shutdown: Some(tx),
    }
}

impl TestServer {
    /// POSTs a chat completion body; returns status and body text.
    pub async fn post(&self, body: &Value) -> (u16, String) {
        let r = self
            .client
            .post(format!("{}/v1/chat/completions", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// POSTs a non-streaming request that must succeed and returns its JSON.
    pub async fn complete(&self, body: &Value) -> Value {
        let (status, text) = self.post(body).await;
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }
}

/// The `data:` payloads of an SSE body, `[DONE]` last.
pub fn sse_events(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "an SSE body ends with a blank line: {body:?}"
    );
    body.split("\n\n")
        .filter(|b| !b.is_empty())
        .map(|b| {
            b.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data line: {b:?}"))
                .to_string()
        })
        .collect()
}

/// Asserts `v` is a JSON object whose keys are exactly `keys` (order free).
pub fn assert_keys(v: &Value, keys: &[&str]) {
    let mut got: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    got.sort_unstable();
    let mut want = keys.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "keys of {v}");
}
