//! End-to-end tests of `qatflow export` and `qatflow quantize`: a SIGKILL in the middle of
//! writing leaves no output directory and a rerun succeeds; Ctrl-C (SIGINT) cancels cleanly
//! with exit status 130; a truncated checkpoint is reported by file name; `--checkpoint
//! latest-valid`; `--vl-wrapper on` is refused for a non-Qwen3.5 model; PTQ from
//! calibration token ids.

use assert_cmd::Command;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

fn qatflow(dir: &Path) -> Command {
    let mut c = Command::cargo_bin("qatflow").unwrap();
    c.current_dir(dir)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove(qatflow_export::PAUSE_ENV);
    c
}

fn tiny_config() -> Value {
    json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "dtype": "bfloat16"
    })
}

/// A run directory with a random-init checkpoint at `step`; returns the checkpoint dir.
fn checkpoint(run: &Path, step: u64) -> PathBuf {
    qatflow_export::bench::write_random_checkpoint(run, &tiny_config(), step, step + 1)
        .unwrap()
        .dir
}

fn temp_dirs(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[test]
fn a_killed_export_leaves_no_output_and_a_rerun_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(&tmp.path().join("run"), 10);
    let out = tmp.path().join("out");
    let mut child = paused_export(&ckpt, &out);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !out.exists(),
        "a killed export must not leave {}",
        out.display()
    );
    assert_eq!(
        temp_dirs(tmp.path()).len(),
        1,
        "the half-written temporary directory"
    );

    qatflow(tmp.path())
        .arg("export")
        .arg(&ckpt)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    assert!(out.join("model.safetensors").is_file());
    assert!(out.join("hf_quant_config.json").is_file());
    assert!(
        temp_dirs(tmp.path()).is_empty(),
        "{:?}",
        temp_dirs(tmp.path())
    );

    // A second export to the same place is refused with advice, and works with --force.
    let refused = qatflow(tmp.path())
        .arg("export")
        .arg(&ckpt)
        .arg("--out")
        .arg(&out)
        .assert()
        .code(2);
    let err = String::from_utf8_lossy(&refused.get_output().stderr).into_owned();
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    qatflow(tmp.path())
        .args(["export", "--force", "--out"])
        .arg(&out)
        .arg(&ckpt)
        .assert()
        .success();
}

/// Starts `qatflow export CKPT --out OUT` paused after 5 tensors; returns once it says so.
fn paused_export(ckpt: &Path, out: &Path) -> std::process::Child {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_qatflow"))
        .arg("export")
        .arg(ckpt)
        .arg("--out")
        .arg(out)
        .env(qatflow_export::PAUSE_ENV, "5")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("export paused after 5 tensors") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(120)).is_err() {
        child.kill().unwrap();
        panic!("the export never reached its pause point");
    }
    child
}

#[test]
fn ctrl_c_cancels_an_export_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(&tmp.path().join("run"), 4);
    let out = tmp.path().join("out");
    let mut child = paused_export(&ckpt, &out);
    assert_eq!(temp_dirs(tmp.path()).len(), 1, "the half-written output");
    // SAFETY: kill only sends a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status}");
    assert!(!out.exists());
    assert!(
        temp_dirs(tmp.path()).is_empty(),
        "{:?}",
        temp_dirs(tmp.path())
    );
}

#[test]
fn vl_wrapper_on_needs_a_qwen3_5_model() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(&tmp.path().join("run"), 1);
    let out = tmp.path().join("out");
    let refused = qatflow(tmp.path())
        .args(["export", "--vl-wrapper", "on", "--out"])
        .arg(&out)
        .arg(&ckpt)
        .assert()
        .code(2);
    let err = String::from_utf8_lossy(&refused.get_output().stderr).into_owned();
    assert!(
        err.contains("qwen3_5_text") && err.contains("--vl-wrapper"),
        "{err}"
    );
    assert!(!out.exists());
    // auto leaves a Qwen3 export as ModelOpt writes it.
    qatflow(tmp.path())
        .args(["export", "--out"])
        .arg(&out)
        .arg(&ckpt)
        .assert()
        .success();
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "qwen3");
    assert!(!out.join("preprocessor_config.json").exists());
}

#[test]
fn a_truncated_checkpoint_is_reported_with_its_file_name() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let older = checkpoint(&run, 1);
    let newest = checkpoint(&run, 2);
    let model = newest.join("model.safetensors");
    let len = std::fs::metadata(&model).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap();
    f.set_len(len - 100).unwrap();
    drop(f);

    let out = tmp.path().join("out");
    let failed = qatflow(tmp.path())
        .arg("export")
        .arg(&newest)
        .arg("--out")
        .arg(&out)
        .assert()
        .code(2);
    let err = String::from_utf8_lossy(&failed.get_output().stderr).into_owned();
    assert!(
        err.contains("step-00000002/model.safetensors") && err.contains("bytes"),
        "{err}"
    );
    assert!(!out.exists());

    // latest-valid skips it (with a warning naming it) and exports step 1.
    let ok = qatflow(tmp.path())
        .args(["export", "--checkpoint", "latest-valid", "--json", "--out"])
        .arg(&out)
        .arg(&run)
        .assert()
        .success();
    let report: Value = serde_json::from_slice(&ok.get_output().stdout).unwrap();
    assert_eq!(report["source"]["step"], 1);
    assert_eq!(report["source"]["dir"], json!(older));
    let err = String::from_utf8_lossy(&ok.get_output().stderr).into_owned();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn quantize_from_calibration_token_ids() {
    let fixtures =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/modelopt-0.47.0");
    let meta: Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("qwen3_tiny_meta.json")).unwrap())
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("tiny");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(
        hf.join("config.json"),
        meta["source_config.json"].to_string(),
    )
    .unwrap();
    std::fs::copy(
        fixtures.join("qwen3_tiny_bf16.safetensors"),
        hf.join("model.safetensors"),
    )
    .unwrap();
    let ids = tmp.path().join("ids.json");
    std::fs::write(&ids, meta["calib_ids"].to_string()).unwrap();
    let out = tmp.path().join("nvfp4");
    qatflow(tmp.path())
        .arg("quantize")
        .arg(&hf)
        .arg("--out")
        .arg(&out)
        .arg("--calib-token-ids")
        .arg(&ids)
        .assert()
        .success();
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["quant_algo"], "NVFP4");
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("export_report.json")).unwrap()).unwrap();
    assert_eq!(report["source"]["calib_sequences"], 4);
    assert_eq!(report["totals"]["quantized_linears"], 14);

    // Calibration data is required.
    qatflow(tmp.path())
        .arg("quantize")
        .arg(&hf)
        .arg("--out")
        .arg(tmp.path().join("x"))
        .assert()
        .code(2);
}

/// A checkpoint whose `config.json` says one size while its tensors have another (with a
/// manifest that matches the changed file) is refused before anything is written; a
/// missing checkpoint directory is called missing.
#[test]
fn a_checkpoint_whose_config_disagrees_with_its_tensors_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(&tmp.path().join("run"), 10);
    let mut config = tiny_config();
    config["hidden_size"] = json!(128);
    let config_path = ckpt.join("config.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let size = std::fs::metadata(&config_path).unwrap().len();
    let sum = std::process::Command::new("sha256sum")
        .arg(&config_path)
        .output()
        .unwrap();
    let sha = String::from_utf8(sum.stdout).unwrap()[..64].to_string();
    let manifest_path = ckpt.join("manifest.json");
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let mut found = false;
    for entry in manifest["files"].as_array_mut().unwrap() {
        if entry["name"] == json!("config.json") {
            entry["sha256"] = json!(sha);
            entry["size"] = json!(size);
            found = true;
        }
    }
    assert!(found, "{manifest}");
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();

    let out_dir = tmp.path().join("out");
    let out = qatflow(tmp.path())
        .arg("export")
        .arg(&ckpt)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("but hidden_size is 128"), "{stderr}");
    assert!(!out_dir.exists(), "nothing written");

    let out = qatflow(tmp.path())
        .args(["export", "nonexist", "--out", "o"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("nonexist: does not exist"), "{stderr}");
}
