//! Round trip, corruption detection (truncated, flipped byte, missing file, missing
//! manifest), latest-valid selection, pruning and stale temporary directories.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use qatflow_checkpoint::manifest::CheckpointManifest;
use qatflow_checkpoint::{
    latest_valid, list, prune, verify, CheckpointError, CheckpointWriter, Manifest, TensorEntry,
    MANIFEST,
};
use safetensors::{Dtype, SafeTensors};

fn write_step(run: &Path, step: u64) -> PathBuf {
    let mut w = CheckpointWriter::create(run, step).unwrap();
    assert!(w.dir().starts_with(run.join("checkpoints")));
    let weights: Vec<u8> = (0..64u32)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    w.write_safetensors(
        "model.safetensors",
        &[
            TensorEntry {
                name: "model.layers.0.self_attn.q_proj.weight".into(),
                dtype: Dtype::F32,
                shape: vec![4, 16],
                data: Cow::Borrowed(&weights),
            },
            TensorEntry {
                name: "model.norm.weight".into(),
                dtype: Dtype::BF16,
                shape: vec![2],
                data: Cow::Owned(vec![0x80, 0x3f, 0x00, 0x40]),
            },
        ],
    )
    .unwrap();
    w.write_safetensors(
        "quantizers.safetensors",
        &[
            TensorEntry::scalar_f32(
                "model.layers.0.self_attn.q_proj.weight_quantizer._amax",
                31.5,
            ),
            TensorEntry::scalar_f32("model.layers.0.self_attn.q_proj.input_quantizer._amax", 2.0),
        ],
    )
    .unwrap();
    w.write_json("trainer_state.json", &serde_json::json!({"step": step}))
        .unwrap();
    w.write_bytes("config.json", b"{\"model_type\": \"qwen3\"}")
        .unwrap();
    let info = w.commit("cafe").unwrap();
    assert_eq!(info.step, step);
    info.dir
}

fn flip_byte(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

#[test]
fn round_trip_and_index() {
    let run = tempfile::tempdir().unwrap();
    let dir = write_step(run.path(), 7);
    assert_eq!(dir, run.path().join("checkpoints/step-00000007"));
    let info = verify(&dir).unwrap();
    assert_eq!(info.config_hash, "cafe");
    let names: Vec<&str> = info.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.safetensors",
            "quantizers.safetensors",
            "trainer_state.json",
            "config.json"
        ]
    );
    let bytes = std::fs::read(dir.join("quantizers.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let amax = st
        .tensor("model.layers.0.self_attn.q_proj.weight_quantizer._amax")
        .unwrap();
    assert_eq!(amax.shape(), &[] as &[usize]);
    assert_eq!(amax.data(), 31.5f32.to_le_bytes());
    // No temporary directory is left behind, and the sled index has the checkpoint.
    let leftovers: Vec<_> = std::fs::read_dir(run.path().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["step-00000007"]);
    let index = CheckpointManifest::open(run.path().join("manifest.sled")).unwrap();
    let rec = index.get(7).unwrap().expect("recorded");
    assert_eq!(rec.files, info.files);
    // The same step is not written twice.
    drop(index);
    assert!(matches!(
        CheckpointWriter::create(run.path(), 7),
        Err(CheckpointError::Exists { .. })
    ));
}

#[test]
fn each_corruption_is_detected_and_names_the_file() {
    let run = tempfile::tempdir().unwrap();
    let dir = write_step(run.path(), 1);
    let model = dir.join("model.safetensors");

    let original = std::fs::read(&model).unwrap();
    std::fs::write(&model, &original[..original.len() - 3]).unwrap();
    let err = verify(&dir).unwrap_err();
    assert!(matches!(err, CheckpointError::SizeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    std::fs::write(&model, &original).unwrap();
    verify(&dir).unwrap();
    flip_byte(&model, original.len() - 1);
    let err = verify(&dir).unwrap_err();
    assert!(
        matches!(err, CheckpointError::ChecksumMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    std::fs::write(&model, &original).unwrap();
    std::fs::remove_file(dir.join("trainer_state.json")).unwrap();
    let err = verify(&dir).unwrap_err();
    assert!(matches!(err, CheckpointError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("trainer_state.json"), "{err}");

    std::fs::remove_file(dir.join(MANIFEST)).unwrap();
    let err = verify(&dir).unwrap_err();
    assert!(matches!(err, CheckpointError::NoManifest { .. }), "{err}");
    assert!(err.to_string().contains("step-00000001"), "{err}");
}

#[test]
fn truncated_safetensors_with_a_matching_manifest_is_caught_by_its_header() {
    // A writer bug (or a manifest rewritten by hand) must not let a short file through.
    let run = tempfile::tempdir().unwrap();
    let dir = write_step(run.path(), 2);
    let model = dir.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() - 8]).unwrap();
    let mut m: Manifest =
        serde_json::from_slice(&std::fs::read(dir.join(MANIFEST)).unwrap()).unwrap();
    let (sha, size) = qatflow_checkpoint::sha256_file(&model).unwrap();
    let entry = m
        .files
        .iter_mut()
        .find(|f| f.name == "model.safetensors")
        .unwrap();
    entry.sha256 = sha;
    entry.size = size;
    std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
    let err = verify(&dir).unwrap_err();
    assert!(
        matches!(err, CheckpointError::BadSafetensors { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn latest_valid_skips_a_corrupted_newest_checkpoint() {
    let run = tempfile::tempdir().unwrap();
    for step in [10, 20, 30] {
        write_step(run.path(), step);
    }
    let newest = list(run.path()).unwrap();
    assert_eq!(
        newest
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
        ["step-00000030", "step-00000020", "step-00000010"]
    );
    flip_byte(&newest[0].join("quantizers.safetensors"), 20);
    let (info, skipped) = latest_valid(run.path()).unwrap().expect("one is valid");
    assert_eq!(info.step, 20);
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].dir, newest[0]);
    assert!(skipped[0]
        .reason
        .to_string()
        .contains("quantizers.safetensors"));

    let empty = tempfile::tempdir().unwrap();
    assert!(latest_valid(empty.path()).unwrap().is_none());
}

#[test]
fn prune_keeps_the_newest_valid_ones() {
    let run = tempfile::tempdir().unwrap();
    for step in [1, 2, 3, 4] {
        write_step(run.path(), step);
    }
    // The newest is corrupt: it is left for inspection and never counts as kept.
    let newest = run.path().join("checkpoints/step-00000004");
    std::fs::remove_file(newest.join(MANIFEST)).unwrap();
    let deleted = prune(run.path(), 2).unwrap();
    assert_eq!(deleted.len(), 1);
    assert!(deleted[0].ends_with("step-00000001"));
    let left: Vec<_> = list(run.path()).unwrap();
    assert_eq!(left.len(), 3);
    // keep = 0 still keeps the newest valid one.
    prune(run.path(), 0).unwrap();
    let (info, _) = latest_valid(run.path()).unwrap().unwrap();
    assert_eq!(info.step, 3);
    let index = CheckpointManifest::open(run.path().join("manifest.sled")).unwrap();
    let steps: Vec<u64> = index.list().unwrap().iter().map(|r| r.step).collect();
    assert_eq!(steps, [3, 4]);
}

#[test]
fn stale_temp_dirs_of_dead_writers_are_removed() {
    let run = tempfile::tempdir().unwrap();
    let parent = run.path().join("checkpoints");
    std::fs::create_dir_all(&parent).unwrap();
    // A pid that cannot be alive (above the kernel's pid_max limit of 2^22).
    let dead = parent.join(".tmp-step-00000005-99999999");
    std::fs::create_dir(&dead).unwrap();
    std::fs::write(dead.join("model.safetensors"), b"partial").unwrap();
    // A live writer's directory (this process) is left alone.
    let live = parent.join(format!(".tmp-step-00000009-{}", std::process::id()));
    std::fs::create_dir(&live).unwrap();
    let w = CheckpointWriter::create(run.path(), 6).unwrap();
    assert!(!dead.exists());
    assert!(live.exists());
    assert!(w.dir().exists());
    // An uncommitted writer is never listed as a checkpoint.
    assert!(list(run.path()).unwrap().is_empty());
}

#[test]
fn bad_file_names_are_refused() {
    let run = tempfile::tempdir().unwrap();
    let mut w = CheckpointWriter::create(run.path(), 1).unwrap();
    for name in ["../x", MANIFEST, "", "a/b"] {
        assert!(matches!(
            w.write_bytes(name, b"x"),
            Err(CheckpointError::InvalidFileName { .. })
        ));
    }
    w.write_bytes("a", b"x").unwrap();
    assert!(matches!(
        w.write_bytes("a", b"y"),
        Err(CheckpointError::DuplicateFile { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn manifest_round_trips(
        step in 0u64..u64::MAX / 2,
        hash in "[0-9a-f]{0,64}",
        files in proptest::collection::btree_map("[a-z_]{1,12}\\.(json|bin)", proptest::collection::vec(any::<u8>(), 0..64), 0..5),
    ) {
        let run = tempfile::tempdir().unwrap();
        let mut w = CheckpointWriter::create(run.path(), step).unwrap();
        for (name, bytes) in &files {
            w.write_bytes(name, bytes).unwrap();
        }
        let info = w.commit(&hash).unwrap();
        let back = verify(&info.dir).unwrap();
        prop_assert_eq!(&back, &info);
        prop_assert_eq!(back.step, step);
        prop_assert_eq!(back.files.len(), files.len());
        for (entry, (name, bytes)) in back.files.iter().zip(&files) {
            prop_assert_eq!(&entry.name, name);
            prop_assert_eq!(entry.size, bytes.len() as u64);
        }
    }
}
