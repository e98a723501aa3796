//! Shared set-up of the exporter tests: the tiny Qwen3 of the ModelOpt 0.47 fixtures as a
//! Hugging Face directory, its calibration ids, and a QAT-format checkpoint built from it.

#![allow(dead_code)]

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use qatflow_checkpoint::{CheckpointInfo, CheckpointWriter, TensorEntry};
use qatflow_core::NoProgress;
use qatflow_nvfp4::keys::{INPUT_AMAX, WEIGHT_AMAX};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/modelopt-0.47.0")
        .join(name)
}

pub fn meta() -> Value {
    serde_json::from_slice(&std::fs::read(fixture("qwen3_tiny_meta.json")).unwrap()).unwrap()
}

pub fn calib_ids() -> Vec<Vec<u32>> {
    serde_json::from_value(meta()["calib_ids"].clone()).unwrap()
}

/// `dir/tiny`: config.json, generation_config.json and the BF16 weights of the tiny Qwen3.
pub fn tiny_hf_dir(dir: &Path) -> PathBuf {
    let hf = dir.join("tiny");
    std::fs::create_dir_all(&hf).unwrap();
    let m = meta();
    std::fs::write(
        hf.join("config.json"),
        serde_json::to_vec_pretty(&m["source_config.json"]).unwrap(),
    )
    .unwrap();
    std::fs::write(
        hf.join("generation_config.json"),
        serde_json::to_vec_pretty(&m["export/generation_config.json"]).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        fixture("qwen3_tiny_bf16.safetensors"),
        hf.join("model.safetensors"),
    )
    .unwrap();
    hf
}

/// A checkpoint of the tiny model (F32 weights, calibrated amaxes) at `step` in `run`, as
/// the QAT trainer writes it.
pub fn tiny_checkpoint(run: &Path, hf: &Path, step: u64) -> CheckpointInfo {
    let amax = qatflow_export::ptq::calibrate_dir::<burn::backend::Flex>(
        hf,
        &calib_ids(),
        &NoProgress,
        &Default::default(),
    )
    .unwrap();
    let bytes = std::fs::read(hf.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<TensorEntry<'_>> = st
        .iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::BF16);
            let f32s: Vec<u8> = view
                .data()
                .chunks_exact(2)
                .flat_map(|c| {
                    half::bf16::from_le_bytes([c[0], c[1]])
                        .to_f32()
                        .to_le_bytes()
                })
                .collect();
            TensorEntry {
                name: name.to_owned(),
                dtype: Dtype::F32,
                shape: view.shape().to_vec(),
                data: Cow::Owned(f32s),
            }
        })
        .collect();
    let mut q = Vec::new();
    for (m, a) in &amax {
        q.push(TensorEntry::scalar_f32(
            format!("{m}{WEIGHT_AMAX}"),
            a.weight,
        ));
        q.push(TensorEntry::scalar_f32(format!("{m}{INPUT_AMAX}"), a.input));
    }
    let mut w = CheckpointWriter::create(run, step).unwrap();
    w.write_safetensors("model.safetensors", &tensors).unwrap();
    w.write_safetensors("quantizers.safetensors", &q).unwrap();
    w.write_json("trainer_state.json", &serde_json::json!({"step": step}))
        .unwrap();
    w.copy_model_files(hf).unwrap();
    w.commit("test").unwrap()
}

/// Every tensor of a safetensors file: name → (dtype, shape, bytes).
pub fn tensors(path: &Path) -> std::collections::BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(n, v)| {
            (
                n.to_owned(),
                (v.dtype(), v.shape().to_vec(), v.data().to_vec()),
            )
        })
        .collect()
}

/// A JSON file.
pub fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// `v` with ModelOpt's producer version blanked (top level, `quantization_config`, and the
/// VL wrapper's `text_config.quantization_config`).
pub fn without_version(mut v: Value) -> Value {
    for p in [
        "/producer/version",
        "/quantization_config/producer/version",
        "/text_config/quantization_config/producer/version",
    ] {
        if let Some(x) = v.pointer_mut(p) {
            *x = Value::Null;
        }
    }
    v
}

/// `out`'s `config.json` and `hf_quant_config.json` equal the fixture's (`meta`) apart from
/// the producer version, and its `generation_config.json` equals it exactly.
pub fn assert_configs_match_modelopt(out: &Path, meta: &Value) {
    for f in ["config.json", "hf_quant_config.json"] {
        assert_eq!(
            without_version(json(&out.join(f))),
            without_version(meta[&format!("export/{f}")].clone()),
            "{f}"
        );
    }
    assert_eq!(
        json(&out.join("generation_config.json")),
        meta["export/generation_config.json"]
    );
}
