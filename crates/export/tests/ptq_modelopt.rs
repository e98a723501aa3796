//! `quantize` (PTQ) of the tiny Qwen3 with ModelOpt's calibration ids against ModelOpt
//! 0.47's own export of it: packed weights and scales byte-identical, input scales within
//! 2 %, same names/dtypes/shapes, configs equal apart from the producer version.

mod common;

use common::*;
use qatflow_core::NoProgress;
use qatflow_export::{quantize_hf, CancellationToken, ExportOptions};

#[test]
fn ptq_of_qwen3_tiny_matches_modelopt() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tiny_hf_dir(tmp.path());
    let out = tmp.path().join("nvfp4");
    let report = quantize_hf(
        &hf,
        &calib_ids(),
        &out,
        &ExportOptions::default(),
        &NoProgress,
        &NoProgress,
        &CancellationToken::new(),
    )
    .unwrap();
    assert_eq!(report.totals.quantized_linears, 14);

    let ours = tensors(&out.join("model.safetensors"));
    let want = tensors(&fixture("qwen3_tiny_nvfp4.safetensors"));
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
            let a = f32::from_le_bytes(b[..4].try_into().unwrap()) as f64;
            let w = f32::from_le_bytes(bytes[..4].try_into().unwrap()) as f64;
            let rel = (a - w).abs() / w;
            worst_input = worst_input.max(rel);
            assert!(rel <= 0.02, "{name}: input_scale {a} vs ModelOpt's {w}");
        } else {
            // Packed weights, weight_scale, weight_scale_2 and the BF16 tensors.
            assert!(b == bytes, "{name}: bytes differ from ModelOpt's export");
        }
    }
    println!("largest input_scale deviation from ModelOpt: {worst_input:.4}");

    assert_configs_match_modelopt(&out, &meta());
    // The tensor layout (header order) is the one ModelOpt's file has.
    let order = |p: &std::path::Path| {
        let bytes = std::fs::read(p).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        meta.offset_keys()
    };
    assert_eq!(
        order(&out.join("model.safetensors")),
        order(&fixture("qwen3_tiny_nvfp4.safetensors"))
    );
    let r = json(&out.join("export_report.json"));
    assert_eq!(r["source"]["kind"], "hf");
    assert_eq!(r["tensors"].as_array().unwrap().len(), 25);
    // PTQ's report says where its time went before the export.
    for phase in ["load_seconds", "calibrate_seconds"] {
        let s = r["source"]["calib_timing"][phase].as_f64();
        assert!(s.is_some_and(|s| s >= 0.0), "{phase}: {s:?}");
    }
}
