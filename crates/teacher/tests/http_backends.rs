//! The OpenAI-compatible and Anthropic backends against a real local HTTP server: each
//! kind of teacher misbehaviour ends in the right stored dataset, with every retry counted
//! and logged.

mod common;

use common::{line, lines, start, Step};
use qatflow_core::{NoProgress, Role};
use qatflow_gates::GateProfile;
use qatflow_store::{Filter, Store, StoredConversation};
use qatflow_teacher::{
    run_generation, AnthropicConfig, BackendConfig, CancellationToken, GenerateOptions,
    GenerationReport, OpenAiConfig, TeacherConfig,
};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn openai(base: &str) -> BackendConfig {
    BackendConfig::OpenAi(OpenAiConfig {
        base_url: base.to_string(),
        model: "teacher-test".into(),
        api_key_env: None,
        input_usd_per_mtok: Some(2.0),
        output_usd_per_mtok: Some(10.0),
        ..OpenAiConfig::default()
    })
}

fn options(backend: BackendConfig, count: u64) -> GenerateOptions {
    let mut o = GenerateOptions::new(backend, GateProfile::builtin("v4").unwrap());
    o.category = Some("topic_switch".into());
    o.count = Some(count);
    o.per_batch = 3;
    o.concurrency = 2;
    o.max_retries = 3;
    o.backoff = Duration::from_millis(10);
    o.timeout = Duration::from_secs(1);
    o
}

fn run(opts: &GenerateOptions, store: &Store) -> GenerationReport {
    run_generation(opts, store, &NoProgress, &CancellationToken::new()).unwrap()
}

fn stored(store: &Store) -> Vec<StoredConversation> {
    store
        .iter(&Filter::default())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn user_texts(store: &Store) -> Vec<String> {
    let mut v: Vec<String> = stored(store)
        .iter()
        .map(|s| {
            let c = s.conversation().unwrap();
            c.messages
                .iter()
                .find(|m| m.role == Role::User)
                .unwrap()
                .content_str()
                .unwrap()
                .to_string()
        })
        .collect();
    v.sort();
    v
}

fn expected(prefix: &str, n: usize) -> Vec<String> {
    let mut v: Vec<String> = (0..n)
        .map(|i| format!("Tell me about {prefix}-{i}."))
        .collect();
    v.sort();
    v
}

/// Collects every tracing event of the process (tests run on many threads).
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || LogWriter(writer.clone()))
            .init();
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged(needle: &str) -> bool {
    String::from_utf8_lossy(&logs().lock().unwrap()).contains(needle)
}

#[test]
fn clean_jsonl_is_stored_with_the_production_prompt() {
    let server = start(vec![], Step::ok(lines("clean", 3)));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let report = run(&options(openai(&server.openai_base()), 3), &store);
    let cat = &report.categories["topic_switch"];
    assert_eq!(
        (cat.batches, cat.accepted, cat.rejected, cat.retries),
        (1, 3, 0, 0)
    );
    assert_eq!(user_texts(&store), expected("clean", 3));
    let production = TeacherConfig::builtin().production_prompt;
    for s in stored(&store) {
        let c = s.conversation().unwrap();
        assert_eq!(c.system_prompt(), Some(production.as_str()));
        assert_eq!(c.extra_str("category"), Some("topic_switch"));
        assert_eq!(c.extra_str("source"), Some("openai"));
        assert_eq!(s.record.source.as_deref(), Some("openai:topic_switch/0"));
        assert!(s.record.flags.is_empty());
    }
    // Usage and cost are recorded: 100 prompt + 50 completion tokens per request.
    assert_eq!(report.usage.requests, 1);
    assert_eq!(report.usage.input_tokens, 100);
    assert_eq!(report.usage.output_tokens, 50);
    let cost = report.usage.cost_usd.unwrap();
    assert!(
        (cost - (100.0 * 2.0 + 50.0 * 10.0) / 1e6).abs() < 1e-12,
        "{cost}"
    );
    // The request carried the short prompt and condensed tools, not the production prompt.
    let req = &server.requests()[0];
    assert_eq!(req["model"], "teacher-test");
    let prompt = req["messages"][1]["content"].as_str().unwrap();
    assert!(prompt.contains("set_timer(minutes, label?)"), "{prompt}");
    assert!(!prompt.contains(&production[..200]));
    assert!(prompt.len() < 3000);
}

#[test]
fn fenced_output_is_unwrapped() {
    let fenced = format!(
        "Here are the conversations:\n```jsonl\n{}\n```\n",
        lines("fenced", 3)
    );
    let server = start(vec![], Step::ok(fenced));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let report = run(&options(openai(&server.openai_base()), 3), &store);
    assert_eq!(report.total_retries(), 0);
    assert_eq!(user_texts(&store), expected("fenced", 3));
}

#[test]
fn planning_mode_prose_is_retried_and_logged() {
    let _ = logs();
    let server = start(
        vec![Step::ok(
            "I'll plan this out first.\n\nPlan is ready for your review. Shall I proceed?",
        )],
        Step::ok(lines("planned", 3)),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let report = run(&options(openai(&server.openai_base()), 3), &store);
    assert_eq!(report.retries.len(), 1);
    assert_eq!(report.retries[0].kind, "planning_mode");
    assert_eq!(report.categories["topic_switch"].retries, 1);
    assert_eq!(user_texts(&store), expected("planned", 3));
    assert_eq!(server.requests().len(), 2);
    assert!(logged("planning-mode output"), "the retry was not logged");
}

#[test]
fn half_a_line_loses_only_that_line() {
    let full = lines("half", 2);
    let broken = line("half-2");
    let text = format!("{full}\n{}", &broken[..broken.len() / 2]);
    let server = start(vec![], Step::ok(text));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let report = run(&options(openai(&server.openai_base()), 3), &store);
    let cat = &report.categories["topic_switch"];
    assert_eq!((cat.accepted, cat.unparsed_lines, cat.retries), (2, 1, 0));
    assert_eq!(cat.missing, 1);
    assert_eq!(user_texts(&store), expected("half", 2));
    // The broken line is kept verbatim as rejected (invalid_json), with its batch.
    let raw = qatflow_teacher::Ledger::open(&store)
        .unwrap()
        .raw_rejected()
        .unwrap();
    assert_eq!(raw.len(), 1, "{raw:?}");
    assert_eq!(raw[0].text, &broken[..broken.len() / 2]);
    assert_eq!(raw[0].check, "invalid_json");
    assert_eq!(
        (raw[0].category.as_str(), raw[0].batch, raw[0].line),
        ("topic_switch", 0, 3)
    );
    assert!(
        raw[0].source.ends_with("topic_switch/0"),
        "{}",
        raw[0].source
    );
}

/// The spend caps: no request past `max_requests`, and the spend is in the ledger.
#[test]
fn the_request_cap_stops_a_run_and_the_spend_is_recorded() {
    let server = start(vec![], Step::ok(lines("cap", 3)));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut opts = options(openai(&server.openai_base()), 30);
    opts.max_requests = Some(2);
    let report = run(&opts, &store);
    assert_eq!(server.requests().len(), 2, "no request past the cap");
    assert!(report.cost_cap_reached);
    assert!(report.cap.contains("--max-requests 2"), "{}", report.cap);
    assert!(!report.complete());
    assert_eq!(report.total_usage.requests, 2);
    let ledger = qatflow_teacher::Ledger::open(&store).unwrap();
    assert_eq!(ledger.spend().unwrap().requests, 2);

    // A resume with a token cap: stops once the reported tokens reach it.
    let mut opts = options(openai(&server.openai_base()), 30);
    opts.resume = true;
    opts.max_tokens = Some(1);
    let report = run(&opts, &store);
    assert!(
        report.cap.contains("--max-total-tokens 1"),
        "{}",
        report.cap
    );
    assert!(
        server.requests().len() <= 2 + 2,
        "{}",
        server.requests().len()
    );
    assert_eq!(
        ledger.spend().unwrap().requests,
        server.requests().len() as u64
    );
}

#[test]
fn http_429_then_success_is_retried_with_backoff() {
    let _ = logs();
    let server = start(
        vec![Step::status(429), Step::status(503)],
        Step::ok(lines("rate", 3)),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let report = run(&options(openai(&server.openai_base()), 3), &store);
    let kinds: Vec<&str> = report.retries.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["http_429", "http_503"]);
    assert_eq!(report.retries[1].attempt, 2);
    assert_eq!(
        report.usage.requests, 1,
        "failed HTTP calls report no usage"
    );
    assert_eq!(user_texts(&store), expected("rate", 3));
    assert!(logged("HTTP 429"), "the 429 retry was not logged");
}

/// The gap between the server's first and second request.
fn first_gap(server: &common::TestServer) -> Duration {
    let arrivals = server.arrivals();
    assert!(arrivals.len() >= 2, "{} requests", arrivals.len());
    arrivals[1] - arrivals[0]
}

/// `t` as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = era * 400 + yoe + u64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{weekday}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        months[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[test]
fn the_http_date_helper_writes_imf_fixdate() {
    let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
    assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
    let leap = UNIX_EPOCH + Duration::from_secs(1_835_481_599);
    assert_eq!(http_date(leap), "Tue, 29 Feb 2028 23:59:59 GMT");
}

#[test]
fn a_429_retry_after_in_seconds_outlasts_a_short_backoff() {
    let _ = logs();
    let server = start(
        vec![Step::status(429).header("Retry-After", "1")],
        Step::ok(lines("patient", 3)),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let opts = options(openai(&server.openai_base()), 3);
    assert_eq!(opts.backoff, Duration::from_millis(10));
    let report = run(&opts, &store);
    let gap = first_gap(&server);
    assert!(
        gap >= Duration::from_secs(1) && gap < Duration::from_secs(3),
        "the retry came {gap:?} after the 429 with Retry-After: 1"
    );
    assert_eq!(report.retries.len(), 1);
    assert_eq!(report.retries[0].kind, "http_429");
    assert!(
        report.retries[0]
            .reason
            .contains("the server asked to retry after 1s (Retry-After)"),
        "{}",
        report.retries[0].reason
    );
    assert!(
        logged("the server asked to retry after 1s (Retry-After); retrying in 1s"),
        "the Retry-After wait was not logged"
    );
    assert_eq!(user_texts(&store), expected("patient", 3));
}

#[test]
fn a_503_retry_after_http_date_is_honoured() {
    // A date 3 s ahead (whole seconds): the wait is more than 2 s minus the time in transit.
    let at = SystemTime::now() + Duration::from_secs(3);
    let server = start(
        vec![Step::status(503).header("Retry-After", &http_date(at))],
        Step::ok(lines("dated", 3)),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let report = run(&options(openai(&server.openai_base()), 3), &store);
    let gap = first_gap(&server);
    assert!(
        gap >= Duration::from_millis(1500) && gap < Duration::from_secs(5),
        "the retry came {gap:?} after a 503 asking to wait until {}",
        http_date(at)
    );
    assert_eq!(report.retries[0].kind, "http_503");
    assert!(report.retries[0].reason.contains("(Retry-After)"));
    assert_eq!(user_texts(&store), expected("dated", 3));
}

#[test]
fn an_anthropic_529_retry_after_is_honoured() {
    std::env::set_var("QATFLOW_TEST_ANTHROPIC_KEY", "sk-test-123");
    let server = start(
        vec![Step::status(529).header("Retry-After", "1")],
        Step::ok(lines("overloaded", 3)),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let backend = BackendConfig::Anthropic(AnthropicConfig {
        base_url: server.base(),
        api_key_env: "QATFLOW_TEST_ANTHROPIC_KEY".into(),
        ..AnthropicConfig::default()
    });
    let report = run(&options(backend, 3), &store);
    let gap = first_gap(&server);
    assert!(gap >= Duration::from_secs(1), "{gap:?}");
    assert_eq!(report.retries[0].kind, "http_529");
    assert!(report.retries[0].reason.contains("(Retry-After)"));
    assert_eq!(user_texts(&store), expected("overloaded", 3));
}

#[test]
fn a_garbage_retry_after_falls_back_to_the_backoff() {
    let server = start(
        vec![
            Step::status(429).header("Retry-After", "soon, maybe"),
            Step::status(503).header("Retry-After", "Sun, 32 Foo 1994 99:00:00 GMT"),
        ],
        Step::ok(lines("ignored", 3)),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let report = run(&options(openai(&server.openai_base()), 3), &store);
    let gap = first_gap(&server);
    assert!(
        gap < Duration::from_millis(900),
        "a garbage Retry-After delayed the retry by {gap:?}"
    );
    let kinds: Vec<&str> = report.retries.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["http_429", "http_503"]);
    for r in &report.retries {
        assert!(!r.reason.contains("Retry-After"), "{}", r.reason);
    }
    assert!(report.complete());
    assert_eq!(user_texts(&store), expected("ignored", 3));
}

#[test]
fn a_stall_longer_than_the_timeout_is_abandoned_and_retried() {
    // The server stalls 30 s on the first request; the 1 s per-batch timeout abandons it.
    let stall = Duration::from_secs(30);
    let server = start(
        vec![Step::ok(lines("stalled", 3)).delayed(stall)],
        Step::ok(lines("fresh", 3)),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let t = Instant::now();
    let report = run(&options(openai(&server.openai_base()), 3), &store);
    let generation = t.elapsed();
    assert!(
        generation >= Duration::from_secs(1) && generation < Duration::from_secs(5),
        "generation took {generation:?}: the 1 s timeout should cut the 30 s stall"
    );
    assert_eq!(report.retries.len(), 1);
    assert_eq!(report.retries[0].kind, "timeout");
    assert_eq!(report.retries[0].attempt, 1);
    assert!(report.complete());
    assert_eq!(server.requests().len(), 2);
    assert_eq!(user_texts(&store), expected("fresh", 3));
    // The stalled handler is still sleeping; stopping the server must not wait for it.
    let t = Instant::now();
    drop(server);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "stopping the server waited {:?} for the stalled handler",
        t.elapsed()
    );
}

#[test]
fn empty_output_is_retried_and_exhausted_retries_fail_the_batch_until_resume() {
    let server = start(vec![Step::ok("")], Step::status(500));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut opts = options(openai(&server.openai_base()), 3);
    opts.max_retries = 2;
    let report = run(&opts, &store);
    let kinds: Vec<&str> = report.retries.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["empty", "http_500"]);
    assert_eq!(report.failed_batches.len(), 1);
    assert!(report.failed_batches[0].reason.contains("HTTP 500"));
    assert!(!report.complete());
    assert!(store.is_empty());
    // A healthy teacher and --resume generate exactly the failed batch.
    let good = start(vec![], Step::ok(lines("resumed", 3)));
    let mut opts = options(openai(&good.openai_base()), 3);
    opts.resume = true;
    let report = run(&opts, &store);
    assert!(report.complete());
    assert_eq!(report.categories["topic_switch"].batches, 1);
    assert_eq!(user_texts(&store), expected("resumed", 3));
}

#[test]
fn flagged_conversations_are_stored_as_rejected() {
    let bad = serde_json::json!({"messages": [
        {"role": "system", "content": "short"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>\n</think>\n**Hello** there, shall we talk?"},
    ]})
    .to_string();
    let server = start(vec![], Step::ok(format!("{}\n{bad}", lines("ok", 2))));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let report = run(&options(openai(&server.openai_base()), 3), &store);
    let cat = &report.categories["topic_switch"];
    assert_eq!((cat.accepted, cat.rejected), (2, 1));
    let rejected: Vec<_> = stored(&store)
        .into_iter()
        .filter(|s| !s.record.flags.is_empty())
        .collect();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].record.flags, ["markdown", "trailing_question"]);
    assert_eq!(store.stats().unwrap().clean, 2);
}

#[test]
fn batches_split_and_run_concurrently_without_gaps() {
    // 7 conversations in batches of 3: sizes 3, 3, 1; every request gets 3 lines with
    // distinct tags, so each batch stores what its answer held.
    let script: Vec<Step> = (0..3)
        .map(|b| Step::ok(lines(&format!("b{b}"), 3)))
        .collect();
    let server = start(script, Step::status(500));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let report = run(&options(openai(&server.openai_base()), 7), &store);
    let cat = &report.categories["topic_switch"];
    assert_eq!((cat.planned_batches, cat.batches), (3, 3));
    assert_eq!(store.len(), 9);
    let prompts: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r["messages"][1]["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        prompts.iter().filter(|p| p.starts_with("Write 3 ")).count(),
        2
    );
    assert_eq!(
        prompts.iter().filter(|p| p.starts_with("Write 1 ")).count(),
        1
    );
}

#[test]
fn anthropic_messages_api_with_key_and_usage() {
    std::env::set_var("QATFLOW_TEST_ANTHROPIC_KEY", "sk-test-123");
    let server = start(vec![Step::status(529)], Step::ok(lines("claude", 3)));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let backend = BackendConfig::Anthropic(AnthropicConfig {
        base_url: server.base(),
        model: "claude-test".into(),
        api_key_env: "QATFLOW_TEST_ANTHROPIC_KEY".into(),
        ..AnthropicConfig::default()
    });
    let report = run(&options(backend, 3), &store);
    assert_eq!(report.retries.len(), 1);
    assert_eq!(report.retries[0].kind, "http_529");
    assert!(
        !report.retries[0].reason.contains("Retry-After"),
        "{:?}",
        report.retries[0]
    );
    assert_eq!(
        (report.usage.input_tokens, report.usage.output_tokens),
        (70, 30)
    );
    assert_eq!(report.usage.cost_usd, None);
    assert_eq!(user_texts(&store), expected("claude", 3));
    let headers = server.headers();
    assert_eq!(headers[1]["x-api-key"], "sk-test-123");
    assert_eq!(headers[1]["anthropic-version"], "2023-06-01");
    let req = &server.requests()[1];
    assert_eq!(req["model"], "claude-test");
    assert!(req["system"]
        .as_str()
        .unwrap()
        .contains("JSONL data generator"));
    for s in stored(&store) {
        assert_eq!(
            s.conversation().unwrap().extra_str("source"),
            Some("anthropic")
        );
    }
}

#[test]
fn a_missing_key_or_401_stops_the_run_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let backend = BackendConfig::Anthropic(AnthropicConfig {
        api_key_env: "QATFLOW_TEST_UNSET_KEY_VAR".into(),
        ..AnthropicConfig::default()
    });
    let err = run_generation(
        &options(backend, 3),
        &store,
        &NoProgress,
        &CancellationToken::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("QATFLOW_TEST_UNSET_KEY_VAR is not set"),
        "{err}"
    );
    let server = start(vec![], Step::status(401));
    let err = run_generation(
        &options(openai(&server.openai_base()), 3),
        &store,
        &NoProgress,
        &CancellationToken::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("HTTP 401") && err.contains("check the API key"),
        "{err}"
    );
    assert_eq!(server.requests().len(), 1, "a 401 is not retried");
}

#[test]
fn the_cost_cap_stops_new_batches_and_resume_finishes() {
    // Each answer costs 100 * $2/M + 50 * $10/M = $0.0007; the cap is reached by the 2nd.
    let server = start(vec![], Step::ok(lines("paid{n}", 3)));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut opts = options(openai(&server.openai_base()), 12);
    opts.concurrency = 1;
    opts.max_cost_usd = Some(0.001);
    let report = run(&opts, &store);
    assert!(report.cost_cap_reached && !report.complete());
    assert_eq!(report.categories["topic_switch"].batches, 2);
    assert_eq!(store.len(), 6);
    opts.max_cost_usd = None;
    opts.resume = true;
    let report = run(&opts, &store);
    assert!(report.complete());
    assert_eq!(report.categories["topic_switch"].already_done, 2);
    assert_eq!(report.categories["topic_switch"].batches, 2);
    assert_eq!(store.len(), 12);
}
