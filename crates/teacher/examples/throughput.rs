//! Throughput benchmark: generation against a local OpenAI-compatible server that takes
//! 200 ms per response, at concurrency 1 and 8 (3 runs each, fresh database per run).
//! Prints JSON with the times and the median speed-up of concurrency 8 over 1.
//!
//! ```text
//! cargo run --release -p qatflow-teacher --example throughput
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use qatflow_core::NoProgress;
use qatflow_gates::GateProfile;
use qatflow_store::Store;
use qatflow_teacher::{
    run_generation, BackendConfig, CancellationToken, GenerateOptions, OpenAiConfig,
};
use std::time::{Duration, Instant};

const BATCHES: u64 = 24;
const PER_BATCH: usize = 10;

fn once(base: &str, concurrency: usize) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store");
    let mut o = GenerateOptions::new(
        BackendConfig::OpenAi(OpenAiConfig {
            base_url: base.to_string(),
            model: "bench".into(),
            api_key_env: None,
            ..OpenAiConfig::default()
        }),
        GateProfile::builtin("v4").expect("profile"),
    );
    o.category = Some("topic_switch".into());
    o.count = Some(BATCHES * PER_BATCH as u64);
    o.per_batch = PER_BATCH;
    o.concurrency = concurrency;
    o.timeout = Duration::from_secs(30);
    let t = Instant::now();
    let report =
        run_generation(&o, &store, &NoProgress, &CancellationToken::new()).expect("generation");
    let secs = t.elapsed().as_secs_f64();
    assert!(report.complete() && report.total_retries() == 0);
    assert_eq!(store.len() as u64, BATCHES * PER_BATCH as u64);
    secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let server = common::start(
        vec![],
        common::Step::ok(common::lines("req{n}", PER_BATCH)).delayed(Duration::from_millis(200)),
    );
    let base = server.openai_base();
    let mut c1 = Vec::new();
    let mut c8 = Vec::new();
    let mut ratios = Vec::new();
    for _ in 0..3 {
        let a = once(&base, 1);
        let b = once(&base, 8);
        ratios.push(a / b);
        c1.push(a);
        c8.push(b);
    }
    let conversations = (BATCHES * PER_BATCH as u64) as f64;
    let out = serde_json::json!({
        "server_latency_ms": 200,
        "batches": BATCHES,
        "per_batch": PER_BATCH,
        "concurrency_1_s": c1,
        "concurrency_8_s": c8,
        "conversations_per_s_c1": conversations / median(c1.clone()),
        "conversations_per_s_c8": conversations / median(c8.clone()),
        "speedup_runs": ratios,
        "speedup_median": median(ratios.clone()),
        "target": ">= 6",
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&out).expect("serializes")
    );
}
