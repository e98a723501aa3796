//! `qatflow generate` end to end with the offline teacher: stored counts, exit codes,
//! refusal to restart without --resume, and --validate-only.

use assert_cmd::Command;
use serde_json::Value;

fn qatflow(dir: &std::path::Path) -> Command {
    let mut c = Command::cargo_bin("qatflow").unwrap();
    c.current_dir(dir).env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    c
}

#[test]
fn offline_generation_stores_checks_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = [
        "generate",
        "--backend",
        "offline",
        "--count",
        "10",
        "--per-batch",
        "5",
    ];
    let out = qatflow(d).args(args).arg("--json").output().unwrap();
    // 9 categories x 10 conversations: every batch stored, but the v4 size gates fail.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["categories"].as_object().unwrap().len(), 9);
    assert_eq!(report["dataset"]["conversations"], 90);
    let failed: Vec<&str> = report["gates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["passed"] == false)
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["conversations", "tool_call_conversations"]);

    let again = qatflow(d).args(args).output().unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));

    let resumed = qatflow(d)
        .args(args)
        .args(["--resume", "--json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&resumed.stdout).unwrap();
    assert_eq!(
        report["dataset"]["conversations"], 90,
        "nothing generated twice"
    );

    let stats = qatflow(d)
        .args(["dataset", "stats", "--json"])
        .output()
        .unwrap();
    let stats: Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["conversations"], 90);
    assert_eq!(stats["by_category"]["honest_memory"]["total"], 10);

    let v = qatflow(d)
        .args(["generate", "--validate-only", "--json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(report["validate_only"], true);
    assert_eq!(report["dataset"]["conversations"], 90);
}

/// `--max-requests` caps each run: a run stops starting batches at the cap, keeps what it
/// stored and says how to go on; `--resume` makes at most as many more.
#[test]
fn the_request_cap_stops_a_run_and_resume_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = [
        "generate",
        "--backend",
        "offline",
        "--count",
        "10",
        "--per-batch",
        "5",
        "--concurrency",
        "1",
        "--max-requests",
        "3",
        "--json",
    ];
    let stored = |out: &std::process::Output| -> u64 {
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        report["dataset"]["conversations"].as_u64().unwrap()
    };
    let out = qatflow(d).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("request cap reached: 3 of --max-requests 3"),
        "{stderr}"
    );
    assert!(stderr.contains("run again with --resume"), "{stderr}");
    assert_eq!(stored(&out), 15, "3 requests of 5 conversations");
    let out = qatflow(d).args(args).arg("--resume").output().unwrap();
    assert_eq!(stored(&out), 30, "{}", String::from_utf8_lossy(&out.stderr));
    let out = qatflow(d)
        .args(&args[..9])
        .args(["--resume", "--json"])
        .output()
        .unwrap();
    assert_eq!(stored(&out), 90, "without a cap the rest is generated");
}
