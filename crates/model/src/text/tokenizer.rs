//! Tokenizer of a Hugging Face model directory (`tokenizer.json` through the `tokenizers`
//! crate, plus `tokenizer_config.json`, `generation_config.json` and `config.json`),
//! with special-token id checks per model family and conversation encoding with
//! assistant masks.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::text::mask::{self, MaskError};
use crate::text::template::{token_string, ChatTemplate, TemplateError};

/// Model families whose special-token ids are known and checked at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// SmolLM2 (ChatML, GPT-2 style BPE, 49152 tokens).
    SmolLm2,
    /// Qwen3 dense models.
    Qwen3,
    /// Qwen3.5 models.
    Qwen35,
}

impl ModelFamily {
    /// Parses `smollm2`, `qwen3`, `qwen3.5` / `qwen3_5` (case-insensitive).
    pub fn from_name(name: &str) -> Option<ModelFamily> {
        match name.to_ascii_lowercase().as_str() {
            "smollm2" => Some(ModelFamily::SmolLm2),
            "qwen3" => Some(ModelFamily::Qwen3),
            "qwen3.5" | "qwen3_5" | "qwen35" => Some(ModelFamily::Qwen35),
            _ => None,
        }
    }

    /// Recognizes the family from a model's `config.json`: `model_type` `qwen3`,
    /// `qwen3_5` / `qwen3_5_text`, or `llama` with SmolLM2's 49152-token vocabulary.
    pub fn detect(config: &Value) -> Option<ModelFamily> {
        let vocab = config
            .get("vocab_size")
            .or_else(|| config.get("text_config")?.get("vocab_size"))
            .and_then(Value::as_u64);
        match config.get("model_type").and_then(Value::as_str)? {
            "qwen3" => Some(ModelFamily::Qwen3),
            "qwen3_5" | "qwen3_5_text" => Some(ModelFamily::Qwen35),
            "llama" if vocab == Some(49152) => Some(ModelFamily::SmolLm2),
            _ => None,
        }
    }

    /// The special tokens and ids every tokenizer of the family must have.
    pub fn special_tokens(self) -> &'static [(&'static str, u32)] {
        match self {
            ModelFamily::SmolLm2 => &[("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)],
            ModelFamily::Qwen3 => &[
                ("<|endoftext|>", 151643),
                ("<|im_start|>", 151644),
                ("<|im_end|>", 151645),
                ("<tool_call>", 151657),
                ("</tool_call>", 151658),
                ("<think>", 151667),
                ("</think>", 151668),
            ],
            ModelFamily::Qwen35 => &[
                ("<|endoftext|>", 248044),
                ("<|im_start|>", 248045),
                ("<|im_end|>", 248046),
                ("<tool_call>", 248058),
                ("</tool_call>", 248059),
                ("<think>", 248068),
                ("</think>", 248069),
            ],
        }
    }
}

/// Errors of loading a tokenizer or encoding with it.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.json` could not be read or parsed.
    #[error("loading tokenizer {path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// The error of the `tokenizers` crate.
        message: String,
    },
    /// A JSON config file is unreadable or malformed.
    #[error("{path}: {problem}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A special token has another id than the model family requires (the `tokenizers`
    /// crate silently renumbers added tokens), or is not a single added token.
    #[error("{family:?} tokenizer: {token:?} should be token id {expected} but {found}; the tokenizer.json does not belong to this model family or is damaged")]
    SpecialToken {
        /// The family checked.
        family: ModelFamily,
        /// The token text.
        token: String,
        /// The id it must have.
        expected: u32,
        /// What was found instead.
        found: String,
    },
    /// The tokenizer has ids the model's embedding cannot hold.
    #[error("tokenizer's largest token id is {max_id}, but config.json vocab_size is {vocab_size}; tokenizer and model do not match")]
    VocabSize {
        /// Largest token id of the tokenizer.
        max_id: u32,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// Encoding or decoding failed inside the `tokenizers` crate.
    #[error("tokenizing failed: {0}")]
    Encode(String),
    /// The model directory has no chat template but a conversation was encoded.
    #[error("no chat template loaded (tokenizer_config.json chat_template or chat_template.jinja); cannot encode conversations")]
    NoTemplate,
    /// Rendering the conversation failed.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The assistant mask could not be computed.
    #[error(transparent)]
    Mask(#[from] MaskError),
    /// The render dropped part of the conversation (see [`crate::text::audit`]).
    #[error(transparent)]
    Audit(#[from] crate::text::audit::Vanished),
}

/// A conversation rendered once and tokenized, with its per-token assistant mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedConversation {
    /// The rendered text.
    pub text: String,
    /// Token ids of `text` (no special tokens added around it).
    pub ids: Vec<u32>,
    /// Per token: true when the model generates it (the loss applies), see [`crate::text::mask`].
    pub assistant_mask: Vec<bool>,
}

/// A tokenizer with its chat template and generation settings.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    eos_token_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("template", &self.template)
            .field("eos_token_ids", &self.eos_token_ids)
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    if !path.exists() {
        return Ok(None);
    }
    let err = |problem: String| TokenizerError::Config {
        path: path.to_path_buf(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| err(format!("not valid JSON: {e}")))
}

fn ids_of(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .into_iter()
            .collect(),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` of a model directory, its chat template (if any), the eos
    /// ids of `generation_config.json` (else `tokenizer_config.json`'s `eos_token`), and
    /// checks the vocabulary against `config.json`'s `vocab_size` (also under
    /// `text_config`) and, when `family` is given, the special-token ids.
    pub fn from_dir(dir: &Path, family: Option<ModelFamily>) -> Result<Tokenizer, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| TokenizerError::Load {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let has_template = read_json(&dir.join("tokenizer_config.json"))?
            .is_some_and(|c| !c.get("chat_template").is_none_or(Value::is_null))
            || dir.join("chat_template.jinja").exists();
        let template = if has_template {
            Some(ChatTemplate::from_model_dir(dir)?)
        } else {
            None
        };
        let config = read_json(&dir.join("config.json"))?;
        let vocab_size = config.as_ref().and_then(|c| {
            c.get("vocab_size")
                .or_else(|| c.get("text_config")?.get("vocab_size"))
                .and_then(Value::as_u64)
                .map(|v| v as usize)
        });
        let mut eos = ids_of(
            read_json(&dir.join("generation_config.json"))?
                .as_ref()
                .and_then(|g| g.get("eos_token_id")),
        );
        if eos.is_empty() {
            let tc = read_json(&dir.join("tokenizer_config.json"))?;
            if let Some(id) = token_string(tc.as_ref().and_then(|c| c.get("eos_token")))
                .and_then(|t| inner.token_to_id(&t))
            {
                eos.push(id);
            }
        }
        Tokenizer::from_parts(inner, template, eos, vocab_size, family)
    }

    /// Builds a tokenizer from loaded parts and runs the same checks as [`Tokenizer::from_dir`].
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        template: Option<ChatTemplate>,
        eos_token_ids: Vec<u32>,
        vocab_size: Option<usize>,
        family: Option<ModelFamily>,
    ) -> Result<Tokenizer, TokenizerError> {
        let tokenizer = Tokenizer {
            inner,
            template,
            eos_token_ids,
        };
        if let Some(vocab_size) = vocab_size {
            let max_id = tokenizer
                .inner
                .get_vocab(true)
                .into_values()
                .max()
                .unwrap_or(0);
            if max_id as usize >= vocab_size {
                return Err(TokenizerError::VocabSize { max_id, vocab_size });
            }
        }
        if let Some(family) = family {
            tokenizer.check_special_tokens(family)?;
        }
        Ok(tokenizer)
    }

    /// Checks that every special token of `family` has its id and encodes as that one
    /// token.
    pub fn check_special_tokens(&self, family: ModelFamily) -> Result<(), TokenizerError> {
        for &(token, expected) in family.special_tokens() {
            let err = |found: String| TokenizerError::SpecialToken {
                family,
                token: token.to_string(),
                expected,
                found,
            };
            match self.inner.token_to_id(token) {
                Some(id) if id == expected => {}
                Some(id) => return Err(err(format!("has id {id}"))),
                None => return Err(err("is not in the vocabulary".into())),
            }
            let ids = self.encode(token)?;
            if ids != [expected] {
                return Err(err(format!(
                    "encodes as {ids:?} (not registered as an added token)"
                )));
            }
        }
        Ok(())
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The chat template, if the model directory has one.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// Ids that end generation (from `generation_config.json` or `eos_token`).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Id of a token string.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text without adding special tokens (chat text already holds them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Decodes ids, optionally dropping special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    fn template_or_err(&self) -> Result<&ChatTemplate, TokenizerError> {
        self.template.as_ref().ok_or(TokenizerError::NoTemplate)
    }

    /// Renders a whole OpenAI-format conversation once (`add_generation_prompt=false`),
    /// tokenizes it with byte offsets and marks the tokens the model generates (reply
    /// text, tool calls, `<|im_end|>`) under the same `tools` / `enable_thinking`.
    /// Tool calls and tools a template cannot render are written in Hermes form
    /// ([`ChatTemplate::lossless`]), and the render is audited: a message part that is not
    /// in it (or, for an assistant, not in its loss-masked span) is an error.
    pub fn encode_conversation(
        &self,
        messages: &[Value],
        tools: Option<&[Value]>,
        enable_thinking: Option<bool>,
    ) -> Result<EncodedConversation, TokenizerError> {
        let template = self.template_or_err()?;
        let (prepared, tools) = template.lossless(messages, tools);
        let text = template.render(&prepared, tools, false, enable_thinking)?;
        let generation_prompt = template.generation_prompt(tools, enable_thinking)?;
        let turns = messages
            .iter()
            .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
            .count();
        let spans = mask::assistant_spans(&text, &generation_prompt, turns, false)?;
        crate::text::audit::audit_render(messages, &text, &spans)?;
        let encoding = self
            .inner
            .encode(text.as_str(), false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let assistant_mask = mask::token_mask(encoding.get_offsets(), &spans);
        Ok(EncodedConversation {
            ids: encoding.get_ids().to_vec(),
            assistant_mask,
            text,
        })
    }

    /// Renders the conversation with the generation prompt and tokenizes it: the input
    /// for serving the next assistant turn (with the same Hermes fallback as
    /// [`Tokenizer::encode_conversation`]).
    pub fn encode_prompt(
        &self,
        messages: &[Value],
        tools: Option<&[Value]>,
        enable_thinking: Option<bool>,
    ) -> Result<Vec<u32>, TokenizerError> {
        let template = self.template_or_err()?;
        let (prepared, tools) = template.lossless(messages, tools);
        let text = template.render(&prepared, tools, true, enable_thinking)?;
        self.encode(&text)
    }
}
