//! `qatflow-bench` against a fake OpenAI-compatible server over loopback: the built-in suite
//! passes a well-behaved model and fails a PTQ-like one category by category, latency comes
//! from the stream's timing and usage chunk, a stalled response fails its prompt without
//! hanging the run, and a model directory's server is found by its `listening on` line.

mod common;

use common::{last_text, Reply};
use qatflow_bench::server::LocalServer;
use qatflow_bench::{compare_table, BenchError, Client, RunOptions, Setup, Suite};
use qatflow_core::NoProgress;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Per final prompt text: the tool call (name, JSON arguments) and the answer expected.
type Expected = BTreeMap<String, (Option<(String, String)>, Option<String>)>;

/// What each prompt's final text expects, from the suite itself.
fn expectations(suite: &Suite) -> Expected {
    let mut out = BTreeMap::new();
    for c in &suite.categories {
        for p in &c.prompts {
            let key = match &p.user {
                Some(u) => u.clone(),
                None => p.history.last().and_then(|m| m.content.clone()).unwrap(),
            };
            let tool = p.expect_tool.as_ref().map(|t| {
                let mut args = serde_json::Map::new();
                for f in &t.required {
                    args.insert(f.clone(), json!("x"));
                }
                for (k, v) in &t.arguments {
                    args.insert(k.clone(), json!(format!("the {v}")));
                }
                (t.name.clone(), Value::Object(args).to_string())
            });
            out.insert(key, (tool, p.expect_answer.first().cloned()));
        }
    }
    out
}

fn good(exp: &Expected, req: &Value) -> Reply {
    let (tool, answer) = exp.get(&last_text(req)).cloned().unwrap_or_default();
    match (tool, answer) {
        (Some(call), _) => Reply {
            tool_call: Some(call),
            ..Reply::default()
        },
        (None, Some(a)) => Reply {
            content: format!("It is {a}."),
            ..Reply::default()
        },
        (None, None) => Reply {
            content: "Sure, that sounds good.".into(),
            ..Reply::default()
        },
    }
}

/// Knowledge kept, manners lost: the seeds' PTQ model.
fn ptq_like(exp: &Expected, req: &Value) -> Reply {
    let (tool, answer) = exp.get(&last_text(req)).cloned().unwrap_or_default();
    match (tool, answer) {
        (Some((name, args)), _) => Reply {
            content: format!(
                "<tool_call>{{\"name\": \"{name}\", \"arguments\": {args}}}</tool_call>"
            ),
            ..Reply::default()
        },
        (None, Some(a)) => Reply {
            content: format!("It is {a}."),
            ..Reply::default()
        },
        (None, None) => Reply {
            content: "<think>\nhmm\n</think>\n**Sure**. One. Two. Three. Anything else?".into(),
            ..Reply::default()
        },
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_builtin_suite_passes_good_manners_and_fails_ptq_manners() {
    let suite = Suite::builtin();
    let mut no_latency = suite.clone();
    no_latency.latency = Default::default();
    let setup = Setup::resolve(&suite, None).unwrap();
    let exp = expectations(&suite);
    runtime().block_on(async {
        let e1 = exp.clone();
        let qat = common::start("qat", move |r| good(&e1, r)).await;
        let e2 = exp.clone();
        let ptq = common::start("ptq", move |r| ptq_like(&e2, r)).await;
        let cancel = CancellationToken::new();
        let mut reports = Vec::new();
        for (server, model) in [(&qat, "qat"), (&ptq, "ptq")] {
            let client = Client::new(&format!("{}/v1", server.url), None).unwrap();
            assert_eq!(
                client.models(Duration::from_secs(5)).await.unwrap(),
                [model]
            );
            client.health(Duration::from_secs(5)).await.unwrap();
            let opts = RunOptions::new(model, model);
            let r = qatflow_bench::run(&client, &no_latency, &setup, &opts, &NoProgress, &cancel)
                .await
                .unwrap();
            reports.push(r);
        }
        let (q, p) = (&reports[0], &reports[1]);
        assert!(q.passed, "{}", q.table());
        assert_eq!(q.samples.len(), suite.prompt_count());
        assert!(q.samples.iter().all(|s| s.passed), "{}", q.table());
        assert!(!p.passed);
        let pct = |name: &str| p.category(name).unwrap().pass_pct;
        for failed in [
            "thinking_leak",
            "tool_calling",
            "markdown",
            "follow_up",
            "verbosity",
        ] {
            assert_eq!(pct(failed), 0.0, "{failed}: {}", p.table());
        }
        assert_eq!(pct("factual"), 100.0, "knowledge is kept");
        assert_eq!(pct("reasoning"), 100.0);
        let tool = p
            .samples
            .iter()
            .find(|s| s.prompt == "tool-weather")
            .unwrap();
        let failed: Vec<&str> = tool.failures.iter().map(|f| f.check.as_str()).collect();
        assert_eq!(failed, ["tool_call_in_text", "tool_call"], "{tool:?}");

        // Every request carried the production prompt, the tools and usage streaming.
        let req = qat.requests.lock().unwrap()[0].clone();
        assert_eq!(req["messages"][0]["role"], "system");
        assert_eq!(req["messages"][0]["content"], json!(setup.system_prompt));
        assert_eq!(req["tools"].as_array().unwrap().len(), setup.tools.len());
        assert_eq!(req["stream"], true);
        assert_eq!(req["stream_options"]["include_usage"], true);
        assert_eq!(req["chat_template_kwargs"]["enable_thinking"], false);
        // One warm-up request, then every prompt once.
        assert_eq!(qat.requests.lock().unwrap().len(), suite.prompt_count() + 1);

        let table = compare_table(&reports);
        assert!(table.lines().next().unwrap().contains("qat"), "{table}");
        assert!(table.contains("tool_calling"), "{table}");
        assert!(
            table.contains("10/10 (100%)") && table.contains("0/10 (0%) FAIL"),
            "{table}"
        );

        // A report survives its JSON round trip and loads for --compare.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qat.json");
        std::fs::write(&path, serde_json::to_string_pretty(q).unwrap()).unwrap();
        assert_eq!(&qatflow_bench::Report::load(&path).unwrap(), q);
        std::fs::write(&path, "{}").unwrap();
        let err = qatflow_bench::Report::load(&path).unwrap_err().to_string();
        assert!(err.contains("not a qatflow bench report"), "{err}");
    });
}

fn one_prompt_suite(user: &[&str]) -> Suite {
    let mut cat = String::from(
        "[category]\nname = \"c\"\nchecks = [\"markdown\", \"empty_reply\"]\nmin_pass_pct = 100\n",
    );
    for (i, u) in user.iter().enumerate() {
        cat.push_str(&format!("[[prompts]]\nid = \"p{i}\"\nuser = {u:?}\n"));
    }
    Suite::from_texts(
        "test",
        "name = \"t\"\n[latency]\nmax_ttft_p50_ms = 10000\nmin_decode_tok_s_p50 = 1\n",
        &[("c.toml".into(), cat)],
    )
    .unwrap()
}

#[test]
fn latency_comes_from_the_stream_and_the_usage_chunk() {
    let suite = one_prompt_suite(&["hello"]);
    let setup = Setup::resolve(&suite, None).unwrap();
    runtime().block_on(async {
        let server = common::start("m", |_| Reply {
            content: "one two three four five".into(),
            first_delay: Duration::from_millis(80),
            step: Duration::from_millis(20),
            ..Reply::default()
        })
        .await;
        let client = Client::new(&server.url, None).unwrap();
        let mut opts = RunOptions::new("m", "m");
        opts.runs = 3;
        opts.warmup = 0;
        let r = qatflow_bench::run(
            &client,
            &suite,
            &setup,
            &opts,
            &NoProgress,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(r.passed, "{}", r.table());
        assert_eq!(r.samples.len(), 3);
        let ttft = r.latency.ttft_ms.unwrap();
        assert_eq!(ttft.n, 3);
        assert!(ttft.p50 >= 80.0, "{ttft:?}");
        // 5 tokens: 4 after the first, at least 20 ms apart.
        let decode = r.latency.decode_tok_s.unwrap();
        assert!(
            decode.p50 <= 4.0 / 0.080 + 1e-9 && decode.p50 > 5.0,
            "{decode:?}"
        );
        let s = &r.samples[0];
        assert_eq!(s.completion_tokens, Some(5));
        assert_eq!(s.ttft_ms, s.ttft_output_ms);
        assert!(r.table().contains("decode_tok_s_p50"), "{}", r.table());
    });
}

#[test]
fn a_stalled_response_fails_its_prompt_without_hanging_the_run() {
    let suite = one_prompt_suite(&["fine", "stall"]);
    let setup = Setup::resolve(&suite, None).unwrap();
    runtime().block_on(async {
        let server = common::start("m", |req| Reply {
            content: "Done.".into(),
            stall: last_text(req) == "stall",
            ..Reply::default()
        })
        .await;
        let client = Client::new(&server.url, None).unwrap();
        let mut opts = RunOptions::new("m", "m");
        opts.warmup = 0;
        opts.idle_timeout = Duration::from_millis(300);
        let start = std::time::Instant::now();
        let r = qatflow_bench::run(
            &client,
            &suite,
            &setup,
            &opts,
            &NoProgress,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(r.errors, 1);
        assert!(!r.passed);
        let err = r.samples[1].error.as_deref().unwrap();
        assert!(err.contains("stalled: no data for 300 ms"), "{err}");
        assert!(r.samples[0].passed);
        assert_eq!(r.category("c").unwrap().passed, 1);
    });
}

#[test]
fn an_unknown_model_or_cancellation_stops_the_run_with_a_clear_error() {
    let suite = one_prompt_suite(&["hi"]);
    let setup = Setup::resolve(&suite, None).unwrap();
    runtime().block_on(async {
        let server = common::start("m", |_| Reply::default()).await;
        let client = Client::new(&server.url, None).unwrap();
        let opts = RunOptions::new("x", "other");
        let err = qatflow_bench::run(
            &client,
            &suite,
            &setup,
            &opts,
            &NoProgress,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("warm-up request failed") && err.contains("404"),
            "{err}"
        );
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = qatflow_bench::run(
            &client,
            &suite,
            &setup,
            &RunOptions::new("m", "m"),
            &NoProgress,
            &cancel,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, BenchError::Cancelled), "{err}");
    });
}

#[test]
fn a_model_directory_server_is_found_by_its_listening_line() {
    runtime().block_on(async {
        let sh = std::path::Path::new("sh");
        let args = |script: &str| vec!["-c".to_string(), script.to_string()];
        let s = LocalServer::start(
            sh,
            &args("echo loading weights; echo listening on http://127.0.0.1:4321/; sleep 30"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(s.url, "http://127.0.0.1:4321");
        s.stop(Duration::from_secs(5)).await;
        let err = LocalServer::start(sh, &args("echo no model; exit 3"), Duration::from_secs(10))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("without printing `listening on URL`"), "{err}");
        let err = LocalServer::start(sh, &args("sleep 30"), Duration::from_millis(200))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("within 200 ms"), "{err}");
    });
}
