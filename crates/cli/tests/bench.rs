//! `qatflow bench` end to end against a minimal OpenAI-compatible server on loopback (raw
//! HTTP on a thread): the table and exit status follow the suite's gates, `--out` writes the
//! JSON report, `--compare` prints reports side by side, and unusable input exits 2 with a
//! message that says what to do.

use assert_cmd::Command;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;

fn qatflow(dir: &Path) -> Command {
    let mut c = Command::cargo_bin("qatflow").unwrap();
    c.current_dir(dir).env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    c
}

/// Serves `/v1/models` (model `m`) and streaming chat completions that always answer
/// "It is Paris."; answers the base URL.
fn server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut length = 0;
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let (kind, text) = if request_line.contains("/v1/models") {
                (
                    "application/json",
                    json!({"data": [{"id": "m"}]}).to_string(),
                )
            } else {
                let chunk = |delta: Value| {
                    format!(
                        "data: {}\n\n",
                        json!({"choices": [{"index": 0, "delta": delta}]})
                    )
                };
                let usage =
                    json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}});
                let text = [
                    chunk(json!({"content": "It is "})),
                    chunk(json!({"content": "Paris"})),
                    chunk(json!({"content": "."})),
                    format!("data: {usage}\n\n"),
                    "data: [DONE]\n\n".into(),
                ]
                .concat();
                ("text/event-stream", text)
            };
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    url
}

fn suite(dir: &Path, answer: &str) -> String {
    let s = dir.join(format!("suite-{answer}"));
    std::fs::create_dir_all(&s).unwrap();
    std::fs::write(s.join("suite.toml"), "name = \"capitals\"\n").unwrap();
    std::fs::write(
        s.join("factual.toml"),
        format!(
            "[category]\nname = \"factual\"\nchecks = [\"answer\"]\nmin_pass_pct = 100\n\
             [[prompts]]\nid = \"capital\"\nuser = \"What is the capital?\"\nexpect_answer = [{answer:?}]\n"
        ),
    )
    .unwrap();
    s.display().to_string()
}

#[test]
fn bench_runs_the_suite_writes_reports_and_compares_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let url = server();
    let run = |answer: &str, label: &str| {
        qatflow(d)
            .args([
                "bench",
                "--endpoint",
                &url,
                "--suite",
                &suite(d, answer),
                "--label",
                label,
            ])
            .args(["--out", &format!("{label}.json")])
            .output()
            .unwrap()
    };
    let out = run("Paris", "qat");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("factual   1/1     100%"), "{stdout}");
    assert!(stdout.contains("PASS: every gate passed"), "{stdout}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("qat.json")).unwrap()).unwrap();
    assert_eq!(report["model"], "m", "the first listed model is used");
    assert_eq!(report["samples"][0]["content"], "It is Paris.");
    assert_eq!(report["samples"][0]["completion_tokens"], 3);

    let out = run("Tokyo", "ptq");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL: a gate failed"), "{stdout}");

    let out = qatflow(d)
        .args(["bench", "--compare", "qat.json", "ptq.json"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{table}");
    let header = table.lines().next().unwrap();
    assert!(header.contains("qat") && header.contains("ptq"), "{table}");
    assert!(
        table.contains("1/1 (100%)") && table.contains("0/1 (0%) FAIL"),
        "{table}"
    );
}

#[test]
fn unusable_bench_input_exits_2_and_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = qatflow(d).arg("bench").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("give a MODEL_DIR, --endpoint URL"), "{err}");

    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = qatflow(d)
        .args([
            "bench",
            "--endpoint",
            &format!("http://{closed}"),
            "--model",
            "m",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warm-up request failed") && err.contains(&closed.to_string()),
        "{err}"
    );

    std::fs::write(d.join("bad.json"), "{}").unwrap();
    let out = qatflow(d)
        .args(["bench", "--compare", "bad.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.json") && err.contains("qatflow bench --out"),
        "{err}"
    );
}
