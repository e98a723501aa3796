//! Export of a Qwen3.5 (`qwen3_5_text`) checkpoint against ModelOpt 0.47's own export of the
//! tiny Qwen3.5 fixture: every tensor byte-identical (linear-attention projections quantized,
//! `conv1d` / `in_proj_a` / `in_proj_b` left in BF16), the same header order, and
//! `config.json` / `hf_quant_config.json` equal to ModelOpt's apart from the producer version
//! with `--vl-wrapper off`; with `auto` the same weights under vLLM's VL wrapper config and a
//! `preprocessor_config.json` stub. PTQ of it (calibrated by the model crate's Qwen3.5
//! forward) gives ModelOpt's weights and scales byte for byte, input scales within 2 %.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_configs_match_modelopt, fixture, json, tensors, without_version};
use qatflow_checkpoint::{CheckpointInfo, CheckpointWriter, TensorEntry};
use qatflow_core::NoProgress;
use qatflow_export::modelopt::{preprocessor_config, vl_wrapper_config};
use qatflow_export::{export_checkpoint, quantize_hf, CancellationToken, ExportOptions, VlWrapper};
use qatflow_nvfp4::keys::{INPUT_AMAX, WEIGHT_AMAX};
use qatflow_nvfp4::linears::quantized_module;
use serde_json::Value;

fn meta() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen35_tiny_meta.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn scalar(bytes: &[u8]) -> f32 {
    f32::from_le_bytes(bytes[..4].try_into().unwrap())
}

/// The amax whose global scale (`amax × fp32(1/2688)`) is exactly `scale`: the calibrated
/// input amax ModelOpt had, recovered from the `input_scale` it wrote.
fn amax_for_scale(scale: f32) -> f32 {
    let guess = scale * 2688.0;
    (-8i32..=8)
        .map(|d| f32::from_bits(guess.to_bits().wrapping_add_signed(d)))
        .find(|a| qatflow_nvfp4::input_scale("x", *a).unwrap() == scale)
        .unwrap_or_else(|| panic!("no amax gives input_scale {scale}"))
}

/// A QAT-format checkpoint of the tiny Qwen3.5: its BF16 weights, weight amax `max|W|` and
/// the input amaxes ModelOpt calibrated (the exporter applies the group rule itself).
fn qwen35_checkpoint(run: &Path) -> CheckpointInfo {
    let src = fixture("qwen35_tiny_bf16.safetensors");
    let weights = tensors(&src);
    let want = tensors(&fixture("qwen35_tiny_nvfp4.safetensors"));
    let mut q = Vec::new();
    for (name, (_, shape, bytes)) in &weights {
        let Some(module) = quantized_module(name, shape) else {
            continue;
        };
        let values: Vec<half::bf16> = bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
            .collect();
        let w = qatflow_nvfp4::codec::amax(name, &values).unwrap();
        let input = amax_for_scale(scalar(&want[&format!("{module}.input_scale")].2));
        q.push(TensorEntry::scalar_f32(format!("{module}{WEIGHT_AMAX}"), w));
        q.push(TensorEntry::scalar_f32(
            format!("{module}{INPUT_AMAX}"),
            input,
        ));
    }
    assert_eq!(q.len(), 2 * 25, "25 quantized linears");
    q.sort_by(|a, b| a.name.cmp(&b.name));
    let m = meta();
    let mut w = CheckpointWriter::create(run, 7).unwrap();
    w.copy_file(&src, "model.safetensors").unwrap();
    w.write_safetensors("quantizers.safetensors", &q).unwrap();
    w.write_bytes(
        "config.json",
        &serde_json::to_vec_pretty(&m["source_config.json"]).unwrap(),
    )
    .unwrap();
    w.write_bytes(
        "generation_config.json",
        &serde_json::to_vec_pretty(&m["export/generation_config.json"]).unwrap(),
    )
    .unwrap();
    w.commit("test").unwrap()
}

fn export(info: &CheckpointInfo, out: &Path, vl_wrapper: VlWrapper) {
    let options = ExportOptions {
        vl_wrapper,
        threads: 3,
        ..ExportOptions::default()
    };
    let report = export_checkpoint(
        &info.dir,
        out,
        &options,
        &NoProgress,
        &CancellationToken::new(),
    )
    .unwrap();
    assert_eq!(report.totals.quantized_linears, 25);
}

fn header_order(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.offset_keys()
}

#[test]
fn qwen35_export_matches_modelopt_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let info = qwen35_checkpoint(&tmp.path().join("run"));
    let out = tmp.path().join("plain");
    export(&info, &out, VlWrapper::Off);

    let ours = tensors(&out.join("model.safetensors"));
    let want = tensors(&fixture("qwen35_tiny_nvfp4.safetensors"));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "tensor names"
    );
    let differing: Vec<&String> = want.keys().filter(|n| ours[*n] != want[*n]).collect();
    assert!(
        differing.is_empty(),
        "differ from ModelOpt's export: {differing:?}"
    );
    assert_eq!(
        header_order(&out.join("model.safetensors")),
        header_order(&fixture("qwen35_tiny_nvfp4.safetensors"))
    );

    assert_configs_match_modelopt(&out, &meta());
    assert!(!out.join("preprocessor_config.json").exists());
}

#[test]
fn qwen35_export_gets_the_vl_wrapper_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let info = qwen35_checkpoint(&tmp.path().join("run"));
    let plain = tmp.path().join("plain");
    export(&info, &plain, VlWrapper::Off);
    let wrapped = tmp.path().join("wrapped");
    export(&info, &wrapped, VlWrapper::Auto);

    let config = json(&wrapped.join("config.json"));
    assert_eq!(config, vl_wrapper_config(json(&plain.join("config.json"))));
    assert_eq!(config["model_type"], "qwen3_5");
    assert_eq!(config["text_config"]["model_type"], "qwen3_5_text");
    assert_eq!(
        without_version(config["text_config"].clone()),
        without_version(meta()["export/config.json"].clone())
    );
    assert_eq!(
        json(&wrapped.join("preprocessor_config.json")),
        preprocessor_config()
    );
    // The weights and hf_quant_config.json do not change.
    assert_eq!(
        std::fs::read(wrapped.join("model.safetensors")).unwrap(),
        std::fs::read(plain.join("model.safetensors")).unwrap()
    );
    assert_eq!(
        json(&wrapped.join("hf_quant_config.json")),
        json(&plain.join("hf_quant_config.json"))
    );
    let report = json(&wrapped.join("export_report.json"));
    let listed = report["output_files"].as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|f| f["name"] == "preprocessor_config.json"),
        "{listed:?}"
    );
}

/// `dir/hf`: the tiny Qwen3.5 as a Hugging Face directory.
fn qwen35_hf_dir(dir: &Path) -> PathBuf {
    let hf = dir.join("hf");
    std::fs::create_dir(&hf).unwrap();
    std::fs::copy(
        fixture("qwen35_tiny_bf16.safetensors"),
        hf.join("model.safetensors"),
    )
    .unwrap();
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
    hf
}

#[test]
fn ptq_of_qwen35_matches_modelopt() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = qwen35_hf_dir(tmp.path());
    let calib: Vec<Vec<u32>> = serde_json::from_value(meta()["ids"].clone()).unwrap();
    let out = tmp.path().join("out");
    let report = quantize_hf(
        &hf,
        &calib,
        &out,
        &ExportOptions {
            vl_wrapper: VlWrapper::Off,
            ..ExportOptions::default()
        },
        &NoProgress,
        &NoProgress,
        &CancellationToken::new(),
    )
    .unwrap();
    assert_eq!(report.totals.quantized_linears, 25);
    let ours = tensors(&out.join("model.safetensors"));
    let want = tensors(&fixture("qwen35_tiny_nvfp4.safetensors"));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "tensor names"
    );
    let mut worst_input = 0f64;
    for (name, (dtype, shape, bytes)) in &want {
        let (d, s, b) = &ours[name];
        assert_eq!((d, s), (dtype, shape), "{name}: dtype/shape");
        if name.ends_with(".input_scale") {
            let a = scalar(b) as f64;
            let w = scalar(bytes) as f64;
            let rel = (a - w).abs() / w;
            worst_input = worst_input.max(rel);
            assert!(rel <= 0.02, "{name}: input_scale {a} vs ModelOpt's {w}");
        } else {
            // Packed weights, weight_scale, weight_scale_2 and the BF16 tensors.
            assert!(b == bytes, "{name}: bytes differ from ModelOpt's export");
        }
    }
    println!("largest input_scale deviation from ModelOpt: {worst_input:.5}");
    assert_eq!(
        header_order(&out.join("model.safetensors")),
        header_order(&fixture("qwen35_tiny_nvfp4.safetensors"))
    );
    assert_configs_match_modelopt(&out, &meta());
}

#[test]
fn exported_qwen35_evaluates_close_to_the_bf16_model() {
    // Both layouts vLLM may get (text config, VL wrapper) load back into the model crate's
    // Qwen3.5 and give an NLL close to the BF16 source's.
    let tmp = tempfile::tempdir().unwrap();
    let info = qwen35_checkpoint(&tmp.path().join("run"));
    let ids: Vec<Vec<u32>> = serde_json::from_value(meta()["ids"].clone()).unwrap();
    let hf = qwen35_hf_dir(tmp.path());
    let options = qatflow_model::LoadOptions::default();
    let device = Default::default();
    let bf16 = qatflow_model::CausalLm::<burn::backend::Flex>::load(&hf, options, &device).unwrap();
    let reference = qatflow_model::eval_nll(&bf16, ids.clone())
        .unwrap()
        .mean_nll;
    for (label, wrapper) in [("plain", VlWrapper::Off), ("wrapped", VlWrapper::Auto)] {
        let out = tmp.path().join(label);
        export(&info, &out, wrapper);
        let model =
            qatflow_model::CausalLm::<burn::backend::Flex>::load(&out, options, &device).unwrap();
        let nll = qatflow_model::eval_nll(&model, ids.clone())
            .unwrap()
            .mean_nll;
        println!("{label} export: NLL {nll:.5} (W4A4 emulated), BF16 model {reference:.5}");
        assert!(
            nll.is_finite() && (nll - reference).abs() < 0.05,
            "{label}: {nll}"
        );
    }
}
