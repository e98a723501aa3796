//! The offline backend end to end: the full v4 run passes the v4 gate profile, and an
//! interrupted run (Ctrl-C in process, kill -9 of a separate process) resumed with
//! `resume` stores exactly the conversations of an uninterrupted run.

mod common;

use common::example_binary;
use qatflow_core::{ConversationId, NoProgress, Progress};
use qatflow_gates::GateProfile;
use qatflow_store::{Filter, Store};
use qatflow_teacher::{
    run_generation, BackendConfig, CancellationToken, GenerateOptions, Ledger, OfflineConfig,
    TeacherError,
};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

fn offline(seed: u64, delay_ms: u64) -> GenerateOptions {
    GenerateOptions::new(
        BackendConfig::Offline(OfflineConfig {
            seed,
            delay: Duration::from_millis(delay_ms),
        }),
        GateProfile::builtin("v4").unwrap(),
    )
}

fn ids(store: &Store) -> BTreeSet<ConversationId> {
    store
        .iter(&Filter::default())
        .map(|s| s.unwrap().id)
        .collect()
}

#[test]
fn the_full_offline_v4_run_passes_the_v4_profile() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let report = run_generation(
        &offline(42, 0),
        &store,
        &NoProgress,
        &CancellationToken::new(),
    )
    .unwrap();
    print!("{}", report.render());
    assert!(report.complete());
    assert_eq!(report.categories.len(), 9);
    assert_eq!(store.len(), 1000);
    assert_eq!(report.dataset.conversations, 1000);
    assert!(report.gates_passed(), "{}", report.render());
    assert_eq!(report.gates.len(), 8);
    for (name, c) in &report.categories {
        assert_eq!(c.rejected, 0, "{name}");
        assert_eq!(c.duplicates, 0, "{name}");
    }
    assert_eq!(report.categories["concise_voice"].accepted, 200);
    assert_eq!(report.categories["concise_voice"].planned_batches, 8);
    assert!(report.dataset.tool_call_conversations >= 300);
    for s in store.iter(&Filter::default()) {
        let c = s.unwrap().conversation().unwrap();
        assert_eq!(c.extra_str("source"), Some("offline"));
    }
    // Validate-only reads the same verdict back from the store.
    let mut v = offline(42, 0);
    v.validate_only = true;
    let again = run_generation(&v, &store, &NoProgress, &CancellationToken::new()).unwrap();
    assert_eq!(again.dataset, report.dataset);
    assert!(again.gates_passed());
    // Rerunning without --resume is refused; with it, nothing is left to do.
    let err = run_generation(
        &offline(42, 0),
        &store,
        &NoProgress,
        &CancellationToken::new(),
    )
    .unwrap_err();
    assert!(matches!(err, TeacherError::NotResuming { .. }), "{err}");
    let mut r = offline(42, 0);
    r.resume = true;
    let noop = run_generation(&r, &store, &NoProgress, &CancellationToken::new()).unwrap();
    assert_eq!(noop.categories.values().map(|c| c.batches).sum::<u64>(), 0);
    assert_eq!(noop.usage.requests, 0);
    assert_eq!(store.len(), 1000);
    // Another batch size would change the batch indexes: refused.
    r.per_batch = 10;
    let err = run_generation(&r, &store, &NoProgress, &CancellationToken::new()).unwrap_err();
    assert!(err.to_string().contains("--per-batch 25"), "{err}");
}

/// Cancels the run once `after` conversations are stored.
struct CancelAfter {
    done: AtomicU64,
    after: u64,
    token: CancellationToken,
}

impl Progress for CancelAfter {
    fn set_total(&self, _total: u64) {}
    fn advance(&self, n: u64) {
        if self.done.fetch_add(n, Ordering::SeqCst) + n >= self.after {
            self.token.cancel();
        }
    }
}

#[test]
fn cancel_then_resume_equals_an_uninterrupted_run() {
    let mut opts = offline(5, 5);
    opts.per_batch = 10;
    opts.concurrency = 3;
    opts.category = Some("topic_switch".into());
    let full_dir = tempfile::tempdir().unwrap();
    let full = Store::open(full_dir.path()).unwrap();
    run_generation(&opts, &full, &NoProgress, &CancellationToken::new()).unwrap();
    assert_eq!(full.len(), 150);

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let token = CancellationToken::new();
    let progress = CancelAfter {
        done: AtomicU64::new(0),
        after: 40,
        token: token.clone(),
    };
    let first = run_generation(&opts, &store, &progress, &token).unwrap();
    assert!(first.cancelled);
    let stored_first = store.len();
    assert!((40..150).contains(&stored_first), "{stored_first}");
    opts.resume = true;
    let second = run_generation(&opts, &store, &NoProgress, &CancellationToken::new()).unwrap();
    assert!(second.complete());
    let c = &second.categories["topic_switch"];
    assert_eq!(c.already_done + c.batches, 15);
    assert_eq!(c.duplicates, 0);
    assert_eq!(ids(&store), ids(&full));
    let ledger = Ledger::open(&store).unwrap();
    assert_eq!(
        ledger.finished("topic_switch").unwrap(),
        (0..15).collect::<Vec<_>>()
    );
}

fn run_example(db: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(example_binary())
        .args([
            "--db",
            db.to_str().unwrap(),
            "--seed",
            "9",
            "--per-batch",
            "5",
        ])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn kill_9_then_resume_equals_an_uninterrupted_run() {
    let full_dir = tempfile::tempdir().unwrap();
    let out = run_example(full_dir.path(), &["--concurrency", "4"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(example_binary())
        .args([
            "--db",
            dir.path().to_str().unwrap(),
            "--seed",
            "9",
            "--per-batch",
            "5",
        ])
        .args(["--concurrency", "4", "--delay-ms", "40"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stored = 0;
    while stored < 60 {
        let line = lines
            .next()
            .expect("the run ended before it was killed")
            .unwrap();
        assert!(
            !line.starts_with("report"),
            "the run finished before the kill"
        );
        stored += usize::from(line.starts_with("stored "));
    }
    // SIGKILL, mid-run: no chance to clean up.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let status = child.wait().unwrap();
    assert!(!status.success());

    {
        let store = Store::open(dir.path()).unwrap();
        let ledger = Ledger::open(&store).unwrap();
        let done: usize = qatflow_teacher::TeacherConfig::builtin()
            .category_names()
            .iter()
            .map(|c| ledger.finished(c).unwrap().len())
            .sum();
        assert!(
            (60..200).contains(&done),
            "{done} batches finished before the kill"
        );
    }
    let out = run_example(dir.path(), &["--concurrency", "3", "--resume"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(
        text.lines()
            .find_map(|l| l.strip_prefix("report "))
            .expect("a report line"),
    )
    .unwrap();
    assert_eq!(report["cancelled"], false);
    assert!(report["failed_batches"].as_array().unwrap().is_empty());
    let dups: u64 = report["categories"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["duplicates"].as_u64().unwrap())
        .sum();
    assert_eq!(dups, 0, "a batch was generated twice");
    assert_eq!(report["gates"].as_array().unwrap().len(), 8);

    let full = Store::open(full_dir.path()).unwrap();
    let resumed = Store::open(dir.path()).unwrap();
    assert_eq!(full.len(), 1000);
    assert_eq!(ids(&resumed), ids(&full));
    assert_eq!(resumed.len(), 1000);
    let ledger = Ledger::open(&resumed).unwrap();
    for c in &qatflow_teacher::TeacherConfig::builtin().categories {
        let expected: Vec<u64> = (0..c.count.div_ceil(5)).collect();
        assert_eq!(ledger.finished(&c.name).unwrap(), expected, "{}", c.name);
    }
}
