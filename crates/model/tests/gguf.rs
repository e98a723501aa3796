//! GGUF parsing, dequantization, Q/K unpermutation and import, on small GGUF files
//! written by the test itself.

mod common;

use common::*;
use proptest::prelude::*;
use qatflow_model::gguf::{
    dequantize, unpermute_qk, GgmlType, Gguf, GgufError, GgufFile, MetaValue, TensorInfo,
};
use qatflow_model::import::{import_gguf, ImportError};
use qatflow_model::{ModelFamily, Tokenizer};
use safetensors::SafeTensors;

fn one_tensor_file(name: &str, dims: &[u64], ty: u32, vals: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (data, back) = encode(vals, ty);
    let bytes = write_gguf(
        &[("general.architecture", Meta::Str("llama".into()))],
        &[Tensor {
            name: name.into(),
            dims: dims.to_vec(),
            ty,
            data,
        }],
    );
    (bytes, back)
}

#[test]
fn each_dtype_dequantizes_to_what_was_encoded() {
    let dir = tempfile::tempdir().unwrap();
    for ty in [F32, F16, BF16, Q8_0, Q4_0, Q4_1] {
        let vals = values(64 * 3, ty as u64);
        let (bytes, back) = one_tensor_file("w", &[64, 3], ty, &vals);
        let path = dir.path().join(format!("t{ty}.gguf"));
        std::fs::write(&path, &bytes).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.gguf.tensors[0].shape(), vec![3, 64]);
        assert_eq!(
            file.gguf
                .get("general.architecture")
                .and_then(MetaValue::as_str),
            Some("llama")
        );
        let got = file.dequantize("w").unwrap();
        assert_eq!(got, back, "type {ty}");
        let max_err = got
            .iter()
            .zip(&vals)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let bound = match ty {
            F32 => 0.0,
            F16 | BF16 => 0.004,
            Q8_0 => 0.006,
            _ => 0.14,
        };
        assert!(max_err <= bound, "type {ty}: max error {max_err} > {bound}");
    }
}

#[test]
fn hand_built_blocks_decode_per_llama_cpp_layout() {
    let info = |ty: u32| TensorInfo {
        name: "b".into(),
        dims: vec![32],
        ggml_type: GgmlType(ty),
        offset: 0,
    };
    // Q4_0: d = 0.5, byte j holds element j (low nibble) and j + 16 (high nibble).
    let mut q4_0 = half::f16::from_f32(0.5).to_le_bytes().to_vec();
    q4_0.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let got = dequantize(&info(Q4_0), &q4_0).unwrap();
    let want: Vec<f32> = (0..16)
        .map(|j| (j as f32 - 8.0) * 0.5)
        .chain((0..16).map(|j| ((15 - j) as f32 - 8.0) * 0.5))
        .collect();
    assert_eq!(got, want);
    // Q4_1: d = 2, m = -1.
    let mut q4_1 = half::f16::from_f32(2.0).to_le_bytes().to_vec();
    q4_1.extend(half::f16::from_f32(-1.0).to_le_bytes());
    q4_1.extend((0..16u8).map(|j| j | (j << 4)));
    let got = dequantize(&info(Q4_1), &q4_1).unwrap();
    assert_eq!(got[3], 5.0);
    assert_eq!(got[16 + 15], 29.0);
    // Q8_0: d = 0.25, q = -128..
    let mut q8 = half::f16::from_f32(0.25).to_le_bytes().to_vec();
    q8.extend((0..32).map(|j| (j as i8 - 16) as u8));
    let got = dequantize(&info(Q8_0), &q8).unwrap();
    assert_eq!(got[0], -4.0);
    assert_eq!(got[31], 3.75);
}

#[test]
fn unsupported_types_and_bad_files_are_errors() {
    // Q4_K (type 12) is recognised by name but not dequantized.
    let bytes = write_gguf(
        &[],
        &[Tensor {
            name: "blk.0.ffn_up.weight".into(),
            dims: vec![256],
            ty: 12,
            data: vec![0; 144],
        }],
    );
    let g = Gguf::parse(&bytes).unwrap();
    let err = dequantize(
        &g.tensors[0],
        &bytes[g.tensor_range(&g.tensors[0], bytes.len()).unwrap()],
    )
    .unwrap_err();
    assert!(matches!(err, GgufError::UnsupportedType { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("blk.0.ffn_up.weight") && msg.contains("Q4_K"),
        "{msg}"
    );

    assert!(matches!(
        Gguf::parse(b"GGML\x03\0\0\0"),
        Err(GgufError::BadMagic { .. })
    ));
    assert!(matches!(
        Gguf::parse(b"GG"),
        Err(GgufError::BadMagic { .. })
    ));
    let (good, _) = one_tensor_file("w", &[32, 2], Q8_0, &values(64, 1));
    assert!(matches!(
        Gguf::parse(&good[..good.len() - 1]),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
    assert!(matches!(
        Gguf::parse(&good[..40]),
        Err(GgufError::Truncated { .. })
    ));
    let mut v1 = good.clone();
    v1[4] = 1;
    assert!(matches!(
        Gguf::parse(&v1),
        Err(GgufError::UnsupportedVersion(1))
    ));
    // Q8_0 rows must be whole blocks.
    let bad = write_gguf(
        &[],
        &[Tensor {
            name: "odd".into(),
            dims: vec![31],
            ty: Q8_0,
            data: vec![0; 34],
        }],
    );
    assert!(matches!(Gguf::parse(&bad), Err(GgufError::Invalid { .. })));
}

#[test]
fn unpermute_inverts_llama_cpp_permute() {
    let (rows, cols, heads) = (24, 5, 3);
    let w = values(rows * cols, 7);
    let permuted = permute_qk(&w, rows, cols, heads);
    assert_ne!(permuted, w);
    assert_eq!(unpermute_qk(&permuted, rows, cols, heads, "q").unwrap(), w);
    // head_dim 8: GGUF row 1 of head 0 is HF row 4 (the second rotary half).
    assert_eq!(permuted[cols..2 * cols], w[4 * cols..5 * cols]);
    assert!(unpermute_qk(&permuted, rows, cols, 5, "q").is_err());
}

const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const FFN: usize = 64;
const LAYERS: usize = 2;

/// A tiny Llama GGUF; returns the file and the expected HF tensors (name → values).
/// (HF name, shape, values) of an expected tensor.
type Expected = (String, Vec<usize>, Vec<f32>);

fn tiny_llama(template: &str) -> (Vec<u8>, Vec<Expected>) {
    let (tokens, _, _) = tiny_vocab();
    let vocab = tokens.len();
    let mut meta = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.block_count", Meta::U32(LAYERS as u32)),
        ("llama.context_length", Meta::U32(128)),
        ("llama.embedding_length", Meta::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Meta::U32(FFN as u32)),
        ("llama.attention.head_count", Meta::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Meta::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", Meta::F32(100000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("llama.vocab_size", Meta::U32(vocab as u32)),
    ];
    meta.extend(tokenizer_meta(template));
    let mut tensors = Vec::new();
    let mut expected = Vec::new();
    let mut seed = 0;
    let mut add = |gguf: &str, hf: &str, shape: Vec<usize>, ty: u32, perm: Option<usize>| {
        seed += 1;
        let n: usize = shape.iter().product();
        // Exactly representable values for F32/F16 so permutation checks are exact.
        let hf_vals: Vec<f32> = values(n, seed)
            .iter()
            .map(|v| (v * 64.0).round() / 64.0)
            .collect();
        let stored = match perm {
            Some(h) => permute_qk(&hf_vals, shape[0], shape[1], h),
            None => hf_vals.clone(),
        };
        let (data, back) = encode(&stored, ty);
        let back = match perm {
            Some(h) => unpermute_reference(&back, shape[0], shape[1], h),
            None => back,
        };
        tensors.push(Tensor {
            name: gguf.into(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ty,
            data,
        });
        if matches!(ty, F32 | F16) {
            assert_eq!(back, hf_vals);
        }
        expected.push((hf.to_string(), shape, back));
    };
    add(
        "token_embd.weight",
        "model.embed_tokens.weight",
        vec![vocab, HIDDEN],
        Q8_0,
        None,
    );
    for l in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let b = |s: &str| format!("blk.{l}.{s}");
        add(
            &b("attn_norm.weight"),
            &p("input_layernorm.weight"),
            vec![HIDDEN],
            F32,
            None,
        );
        add(
            &b("attn_q.weight"),
            &p("self_attn.q_proj.weight"),
            vec![HEADS * HEAD_DIM, HIDDEN],
            F32,
            Some(HEADS),
        );
        add(
            &b("attn_k.weight"),
            &p("self_attn.k_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            F16,
            Some(KV_HEADS),
        );
        add(
            &b("attn_v.weight"),
            &p("self_attn.v_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            Q4_1,
            None,
        );
        add(
            &b("attn_output.weight"),
            &p("self_attn.o_proj.weight"),
            vec![HIDDEN, HEADS * HEAD_DIM],
            BF16,
            None,
        );
        add(
            &b("ffn_gate.weight"),
            &p("mlp.gate_proj.weight"),
            vec![FFN, HIDDEN],
            Q4_0,
            None,
        );
        add(
            &b("ffn_up.weight"),
            &p("mlp.up_proj.weight"),
            vec![FFN, HIDDEN],
            Q8_0,
            None,
        );
        add(
            &b("ffn_down.weight"),
            &p("mlp.down_proj.weight"),
            vec![HIDDEN, FFN],
            Q4_1,
            None,
        );
        add(
            &b("ffn_norm.weight"),
            &p("post_attention_layernorm.weight"),
            vec![HIDDEN],
            F32,
            None,
        );
    }
    add(
        "output_norm.weight",
        "model.norm.weight",
        vec![HIDDEN],
        F32,
        None,
    );
    (write_gguf(&meta, &tensors), expected)
}

/// Reference inverse of `permute_qk`, written independently of the library.
fn unpermute_reference(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    let hd = rows / n_head;
    for r in 0..rows {
        let (h, within) = (r / hd, r % hd);
        let (i, j) = (within / 2, within % 2);
        let hf = h * hd + j * (hd / 2) + i;
        out[hf * cols..(hf + 1) * cols].copy_from_slice(&w[r * cols..(r + 1) * cols]);
    }
    out
}

#[test]
fn import_writes_hf_directory_with_unpermuted_bf16_tensors() {
    let template = std::fs::read_to_string(fixtures().join("smollm2.jinja")).unwrap();
    let (bytes, expected) = tiny_llama(&template);
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    std::fs::write(&gguf, &bytes).unwrap();
    let out = dir.path().join("hf");
    let summary = import_gguf(&gguf, &out).unwrap();
    assert_eq!(summary.params.num_layers, LAYERS);
    assert_eq!(summary.params.head_dim, HEAD_DIM);
    assert!(summary.params.tie_word_embeddings);
    assert_eq!(summary.tensors.len(), expected.len());

    let st_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    assert_eq!(st.len(), expected.len());
    for (name, shape, vals) in &expected {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::BF16, "{name}");
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        let got: Vec<f32> = t
            .data()
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let want: Vec<f32> = vals
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(got, want, "{name}");
    }

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("model.safetensors"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["num_key_value_heads"], KV_HEADS);
    assert_eq!(config["rope_theta"], 100000.0);
    assert_eq!(config["rms_norm_eps"], 1e-5);
    assert_eq!(config["vocab_size"], 262);
    assert_eq!(config["eos_token_id"], 2);

    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["chat_template"], template.as_str());

    let tok = Tokenizer::from_dir(&out, Some(ModelFamily::SmolLm2)).unwrap();
    assert_eq!(tok.eos_token_ids(), [2]);
    let he = tok.token_id("He").unwrap();
    let llo = tok.token_id("llo").unwrap();
    let ids = tok.encode("<|im_start|>Hello<|im_end|>").unwrap();
    assert_eq!(ids, [1, he, llo, 2]);
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "<|im_start|>Hello<|im_end|>"
    );
    assert_eq!(tok.decode(&ids, true).unwrap(), "Hello");
    let err = Tokenizer::from_dir(&out, Some(ModelFamily::Qwen3)).unwrap_err();
    assert!(err.to_string().contains("151643"), "{err}");
}

#[test]
fn import_rejects_wrong_architecture_shapes_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = one_tensor_file("w", &[32], F32, &values(32, 3));
    let mut bytes_arch = bytes.clone();
    let pos = bytes_arch.windows(5).position(|w| w == b"llama").unwrap();
    bytes_arch[pos..pos + 5].copy_from_slice(b"qwen3");
    let p = dir.path().join("a.gguf");
    std::fs::write(&p, &bytes_arch).unwrap();
    let err = import_gguf(&p, &dir.path().join("o")).unwrap_err();
    assert!(
        matches!(err, ImportError::UnsupportedArchitecture { .. }),
        "{err}"
    );

    let template = "x";
    let (mut good, _) = tiny_llama(template);
    // Rename one tensor to something without an HF equivalent (same length).
    let pos = good
        .windows(17)
        .position(|w| w == b"output_norm.weigh")
        .unwrap();
    good[pos..pos + 6].copy_from_slice(b"rope_x");
    let p = dir.path().join("b.gguf");
    std::fs::write(&p, &good).unwrap();
    let err = import_gguf(&p, &dir.path().join("o")).unwrap_err();
    assert!(err.to_string().contains("rope_x_norm.weight"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parser_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Gguf::parse(&bytes);
        let mut with_header = b"GGUF\x03\0\0\0".to_vec();
        with_header.extend(&bytes);
        let _ = Gguf::parse(&with_header);
    }

    #[test]
    fn parser_never_panics_on_corrupted_files(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cut in any::<prop::sample::Index>()) {
        let (good, _) = one_tensor_file("blk.0.attn_q.weight", &[32, 2], Q4_1, &values(64, 9));
        let mut bytes = good.clone();
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        let cut = cut.index(bytes.len() + 1);
        for input in [&bytes[..], &bytes[..cut], &good[..cut]] {
            if let Ok(g) = Gguf::parse(input) {
                for t in &g.tensors {
                    if let Ok(range) = g.tensor_range(t, input.len()) {
                        let _ = dequantize(t, &input[range]);
                    }
                }
            }
        }
    }

    #[test]
    fn q8_0_round_trip(vals in proptest::collection::vec(-100f32..100f32, 32..=96)) {
        let n = vals.len() / 32 * 32;
        let vals = &vals[..n];
        let (data, back) = quantize_q8_0(vals);
        let t = TensorInfo { name: "x".into(), dims: vec![n as u64], ggml_type: GgmlType::Q8_0, offset: 0 };
        let got = dequantize(&t, &data).unwrap();
        prop_assert_eq!(&got, &back);
        for (block, got) in vals.chunks(32).zip(got.chunks(32)) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in block.iter().zip(got) {
                prop_assert!((x - y).abs() <= amax * (0.5 / 127.0 + 1e-3) + 1e-6, "{} vs {}", x, y);
            }
        }
    }

    #[test]
    fn q4_round_trips(vals in proptest::collection::vec(-10f32..10f32, 32..=96)) {
        let n = vals.len() / 32 * 32;
        let vals = &vals[..n];
        for (ty, (data, back)) in [(GgmlType::Q4_0, quantize_q4_0(vals)), (GgmlType::Q4_1, quantize_q4_1(vals))] {
            let t = TensorInfo { name: "x".into(), dims: vec![n as u64], ggml_type: ty, offset: 0 };
            let got = dequantize(&t, &data).unwrap();
            prop_assert_eq!(&got, &back);
            for (block, got) in vals.chunks(32).zip(got.chunks(32)) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let bound = if ty == GgmlType::Q4_0 { amax / 8.0 } else { amax / 15.0 } + amax * 0.01 + 1e-5;
                for (x, y) in block.iter().zip(got) {
                    prop_assert!((x - y).abs() <= bound, "{:?}: {} vs {} (bound {})", ty, x, y, bound);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Corrupting the header and metadata of a whole model never panics the importer.
    #[test]
    fn import_never_panics_on_corrupted_headers(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)
    ) {
        let (mut bytes, _) = tiny_llama("t");
        let header_len = Gguf::parse(&bytes).unwrap().data_offset;
        for (i, b) in flips {
            let i = i.index(header_len);
            bytes[i] = b;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let _ = import_gguf(&path, &dir.path().join("out"));
    }
}
