//! `qatflow serve` as a child process, the way `qatflow bench` and the node's serving
//! supervisor start it: `--port 0`, the bound address read from stdout.

#[path = "../../serve/tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

/// Kills the child when the test ends, passed or not.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_prints_its_address_and_answers_chat_requests() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_model(dir.path(), &common::template("smollm2"));
    let mut child = Child(
        Command::new(assert_cmd::cargo::cargo_bin("qatflow"))
            .arg("serve")
            .arg(dir.path())
            .args([
                "--port",
                "0",
                "--served-model-name",
                "tiny",
                "--max-model-len",
                "512",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");
    let client = reqwest::Client::new();
    let health = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let models: Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["max_model_len"], 512);
    let reply: Value = client
        .post(format!("{base}/v1/chat/completions"))
        .json(
            &json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, "temperature": 0}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["object"], "chat.completion", "{reply}");
    assert!(reply["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
}

#[test]
fn serve_refuses_a_public_address_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_model(dir.path(), &common::template("smollm2"));
    let out = Command::new(assert_cmd::cargo::cargo_bin("qatflow"))
        .arg("serve")
        .arg(dir.path())
        .args(["--host", "0.0.0.0", "--port", "0"])
        .env_remove("QATFLOW_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--token"), "{stderr}");
}
