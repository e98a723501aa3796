//! Test support: a GGUF writer, reference quantizers (llama.cpp's `quantize_row_*_ref`),
//! llama.cpp's Q/K permutation and a tiny byte-level BPE vocabulary.
#![allow(dead_code)]

use half::{bf16, f16};

/// A metadata value to write.
#[derive(Clone, Debug)]
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArr(Vec<String>),
    I32Arr(Vec<i32>),
}

/// A tensor to write: ggml dims (ne0 first), ggml type id, raw data.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Serializes a GGUF v3 file with 32-byte alignment.
pub fn write_gguf(meta: &[(&str, Meta)], tensors: &[Tensor]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        match v {
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::Bool(x) => {
                out.extend(7u32.to_le_bytes());
                out.push(*x as u8);
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Meta::StrArr(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for s in items {
                    put_str(&mut out, s);
                }
            }
            Meta::I32Arr(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for x in items {
                    out.extend(x.to_le_bytes());
                }
            }
        }
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        offsets.push(offset);
        offset = (offset + t.data.len() as u64).div_ceil(32) * 32;
    }
    for (t, off) in tensors.iter().zip(&offsets) {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.ty.to_le_bytes());
        out.extend(off.to_le_bytes());
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    let base = out.len();
    for (t, off) in tensors.iter().zip(&offsets) {
        out.resize(base + *off as usize, 0);
        out.extend(&t.data);
    }
    out
}

pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q4_0: u32 = 2;
pub const Q4_1: u32 = 3;
pub const Q8_0: u32 = 8;
pub const BF16: u32 = 30;

/// Encodes values as `ty` and returns (raw data, the values the data decodes to).
pub fn encode(values: &[f32], ty: u32) -> (Vec<u8>, Vec<f32>) {
    match ty {
        F32 => (
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            values.to_vec(),
        ),
        F16 => (
            values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        ),
        BF16 => (
            values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        ),
        Q8_0 => quantize_q8_0(values),
        Q4_0 => quantize_q4_0(values),
        Q4_1 => quantize_q4_1(values),
        _ => panic!("no encoder for type {ty}"),
    }
}

/// llama.cpp `quantize_row_q8_0_ref`.
pub fn quantize_q8_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mut data, mut back) = (Vec::new(), Vec::new());
    for block in x.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let dh = f16::from_f32(d);
        data.extend(dh.to_le_bytes());
        for &v in block {
            let q = (v * id).round() as i8;
            data.push(q as u8);
            back.push(q as f32 * dh.to_f32());
        }
    }
    (data, back)
}

/// llama.cpp `quantize_row_q4_0_ref`.
pub fn quantize_q4_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mut data, mut back) = (Vec::new(), Vec::new());
    for block in x.chunks(32) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in block {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let dh = f16::from_f32(d);
        data.extend(dh.to_le_bytes());
        let q: Vec<u8> = block
            .iter()
            .map(|&v| ((v * id + 8.5) as i8).clamp(0, 15) as u8)
            .collect();
        for j in 0..16 {
            data.push(q[j] | (q[j + 16] << 4));
        }
        back.extend(q.iter().map(|&q| (q as f32 - 8.0) * dh.to_f32()));
    }
    (data, back)
}

/// llama.cpp `quantize_row_q4_1_ref`.
pub fn quantize_q4_1(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mut data, mut back) = (Vec::new(), Vec::new());
    for block in x.chunks(32) {
        let min = block.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let max = block.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (dh, mh) = (f16::from_f32(d), f16::from_f32(min));
        data.extend(dh.to_le_bytes());
        data.extend(mh.to_le_bytes());
        let q: Vec<u8> = block
            .iter()
            .map(|&v| (((v - min) * id + 0.5) as u8).min(15))
            .collect();
        for j in 0..16 {
            data.push(q[j] | (q[j + 16] << 4));
        }
        back.extend(q.iter().map(|&q| q as f32 * dh.to_f32() + mh.to_f32()));
    }
    (data, back)
}

/// llama.cpp `convert_hf_to_gguf.py::permute` of a row-major `[rows, cols]` matrix.
pub fn permute_qk(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let mut out = vec![0f32; w.len()];
    // reshape(n_head, 2, hd/2, cols).swapaxes(1, 2): out[h, i, j] = w[h, j, i]
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let dst = h * hd + i * 2 + j;
                let src = h * hd + j * (hd / 2) + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// GPT-2's `bytes_to_unicode` table: byte → printable char.
pub fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// A tiny ChatML vocabulary: the three SmolLM2 control tokens (ids 0, 1, 2), the 256
/// byte tokens, and merges building "He", "ll", "llo".
pub fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut types = vec![3, 3, 3];
    for c in byte_chars() {
        tokens.push(c.to_string());
        types.push(1);
    }
    for t in ["He", "ll", "llo"] {
        tokens.push(t.to_string());
        types.push(1);
    }
    let merges = ["H e", "l l", "ll o"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    (tokens, types, merges)
}

/// Metadata of a tiny-vocabulary GGUF tokenizer with a chat template.
pub fn tokenizer_meta(template: &str) -> Vec<(&'static str, Meta)> {
    let (tokens, types, merges) = tiny_vocab();
    vec![
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("smollm".into())),
        ("tokenizer.ggml.tokens", Meta::StrArr(tokens)),
        ("tokenizer.ggml.token_type", Meta::I32Arr(types)),
        ("tokenizer.ggml.merges", Meta::StrArr(merges)),
        ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Meta::U32(0)),
        ("tokenizer.ggml.padding_token_id", Meta::U32(2)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(false)),
        ("tokenizer.chat_template", Meta::Str(template.into())),
    ]
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// An empty directory `name` under cargo's per-target scratch folder (`CARGO_TARGET_TMPDIR`),
/// for an import a whole test binary shares. A static `TempDir` is never dropped, so each
/// run would leave its copy (a 259 MB model) behind; this folder is reused instead.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    dir
}

/// Path of the shared template fixtures.
pub fn fixtures() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/templates")
}

/// The assistant-mask texts each golden conversation must give (`enable_thinking` unset
/// unless the case name says otherwise), per template.
pub fn expected_mask_texts(template: &str, case: &str) -> Vec<&'static str> {
    const CALL_JSON: &str = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n</tool_call><|im_end|>";
    const CALL_XML: &str = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>";
    const F_XML: &str = "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call><|im_end|>";
    match (template, case) {
        (_, "simple_gen_default" | "simple_gen_nothink" | "simple_gen_think" | "tools_gen_nothink") => vec![],
        ("smollm2", "sft_pair") => vec!["Hello there!<|im_end|>"],
        ("smollm2", "sft_pair_reasoning") => vec!["4<|im_end|>"],
        ("smollm2", "multiturn_history_think") => {
            vec!["<think>\nr1\n</think>\n\nA1<|im_end|>", "<think>\nr2\n</think>\n\nA2<|im_end|>"]
        }
        // SmolLM2's template renders only `content`: tool calls come through qatflow's
        // Hermes fallback instead of vanishing (an empty turn would teach silence).
        ("smollm2", "tools_call_and_response") => vec![CALL_JSON, "It is 21C.<|im_end|>"],
        ("smollm2", "qwen35_string_args") => {
            vec!["<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call><|im_end|>"]
        }
        ("qwen3", "sft_pair") => vec!["<think>\n\n</think>\n\nHello there!<|im_end|>"],
        ("qwen3", "sft_pair_reasoning") => vec!["<think>\nsimple add\n</think>\n\n4<|im_end|>"],
        ("qwen3" | "qwen3_5_nothink", "multiturn_history_think") => {
            vec!["A1<|im_end|>", "<think>\nr2\n</think>\n\nA2<|im_end|>"]
        }
        ("qwen3", "tools_call_and_response") => vec![CALL_JSON, "<think>\n\n</think>\n\nIt is 21C.<|im_end|>"],
        ("qwen3", "qwen35_string_args") => {
            vec!["<think>\n\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call><|im_end|>"]
        }
        // Thinking on: the prompt ends with "<think>\n"; the model writes the rest.
        ("qwen3_5_think", "sft_pair") => vec!["\n</think>\n\nHello there!<|im_end|>"],
        ("qwen3_5_think", "sft_pair_reasoning") => vec!["simple add\n</think>\n\n4<|im_end|>"],
        ("qwen3_5_think", "multiturn_history_think") => vec!["A1<|im_end|>", "r2\n</think>\n\nA2<|im_end|>"],
        ("qwen3_5_think", "tools_call_and_response") => vec![
            "\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>",
            "\n</think>\n\nIt is 21C.<|im_end|>",
        ],
        ("qwen3_5_think", "qwen35_string_args") => {
            vec!["\n</think>\n\n<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call><|im_end|>"]
        }
        // Thinking off by default: the empty think block is part of the prompt.
        ("qwen3_5_nothink", "sft_pair") => vec!["Hello there!<|im_end|>"],
        ("qwen3_5_nothink", "sft_pair_reasoning") => vec!["<think>\nsimple add\n</think>\n\n4<|im_end|>"],
        ("qwen3_5_nothink", "tools_call_and_response") => vec![CALL_XML, "It is 21C.<|im_end|>"],
        ("qwen3_5_nothink", "qwen35_string_args") => vec![F_XML],
        other => panic!("no expectation for {other:?}"),
    }
}

/// Decodes each run of consecutive masked tokens.
pub fn mask_runs(tok: &qatflow_model::Tokenizer, ids: &[u32], mask: &[bool]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut current = Vec::new();
    for (&id, &m) in ids.iter().zip(mask) {
        if m {
            current.push(id);
        } else if !current.is_empty() {
            runs.push(tok.decode(&current, false).unwrap());
            current.clear();
        }
    }
    if !current.is_empty() {
        runs.push(tok.decode(&current, false).unwrap());
    }
    runs
}

pub const TEMPLATES: [&str; 4] = ["qwen3", "qwen3_5_think", "qwen3_5_nothink", "smollm2"];

/// Checks every golden conversation under every template: the render equals the jinja2
/// golden (where jinja2 rendered), ids decode back to the render, and the masked runs
/// are exactly the expected generated texts, each ending in `<|im_end|>` (id `eos`)
/// followed by an unmasked token.
pub fn check_golden_masks(inner: &tokenizers::Tokenizer, eos: u32) {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("template_cases.json")).unwrap(),
    )
    .unwrap();
    let goldens: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("template_renderings_jinja2.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for name in TEMPLATES {
        let template =
            qatflow_model::ChatTemplate::from_file(&fixtures().join(format!("{name}.jinja")))
                .unwrap();
        let tok = qatflow_model::Tokenizer::from_parts(
            inner.clone(),
            Some(template),
            vec![eos],
            None,
            None,
        )
        .unwrap();
        for case in cases.as_array().unwrap() {
            let case_name = case["name"].as_str().unwrap();
            let messages = case["messages"].as_array().unwrap();
            let tools = case
                .get("tools")
                .and_then(serde_json::Value::as_array)
                .map(Vec::as_slice);
            let thinking = case
                .get("enable_thinking")
                .and_then(serde_json::Value::as_bool);
            let enc = tok.encode_conversation(messages, tools, thinking).unwrap();
            let template = tok.template().unwrap();
            let plain = template.render(messages, tools, false, thinking).unwrap();
            let golden = goldens[format!("{name}/{case_name}")].as_str().unwrap();
            if !golden.starts_with("ERROR") && !case["add_generation_prompt"].as_bool().unwrap() {
                assert_eq!(plain, golden, "{name}/{case_name}");
            }
            // Training renders exactly what transformers renders unless the template would
            // drop tool calls or tools.
            let (lossless, _) = template.lossless(messages, tools);
            if lossless.as_slice() == messages
                && tools.is_none_or(|_| template.tool_support().tools)
            {
                assert_eq!(enc.text, plain, "{name}/{case_name}");
            } else {
                assert_ne!(enc.text, plain, "{name}/{case_name}");
            }
            assert_eq!(enc.ids.len(), enc.assistant_mask.len());
            assert_eq!(
                tok.decode(&enc.ids, false).unwrap(),
                enc.text,
                "{name}/{case_name}"
            );
            let runs = mask_runs(&tok, &enc.ids, &enc.assistant_mask);
            assert_eq!(
                runs,
                expected_mask_texts(name, case_name),
                "{name}/{case_name}"
            );
            for (i, (&id, &m)) in enc.ids.iter().zip(&enc.assistant_mask).enumerate() {
                if m && enc.assistant_mask.get(i + 1) != Some(&true) {
                    assert_eq!(
                        id, eos,
                        "{name}/{case_name}: a masked run ends with <|im_end|>"
                    );
                    assert_eq!(
                        enc.assistant_mask.get(i + 1),
                        Some(&false),
                        "the newline after <|im_end|> is not trained"
                    );
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 36);
}

/// Renders one case of `templates/template_cases.json` the way the golden file was made:
/// the case object (its `name` removed, `tools` null when absent) is the raw context.
pub fn render_case(
    template: &qatflow_model::ChatTemplate,
    case: &serde_json::Value,
) -> Result<String, qatflow_model::TemplateError> {
    let mut ctx = case.as_object().expect("a case is an object").clone();
    ctx.remove("name");
    ctx.entry("tools").or_insert(serde_json::Value::Null);
    template.render_context(&serde_json::Value::Object(ctx))
}
