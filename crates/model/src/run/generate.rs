//! Text generation with a key/value cache: greedy decoding or temperature + top-p
//! sampling from a seeded RNG, stopping at end-of-sequence / end-of-turn tokens or a
//! token budget. [`generate`] renders an OpenAI-format conversation with the model's chat
//! template and returns the assistant reply.

use std::ops::ControlFlow;

use serde_json::Value;

use crate::rng::SplitMix64;
use crate::run::lm::LanguageModel;
use crate::text::tokenizer::{Tokenizer, TokenizerError};

/// Errors of generation.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// Rendering or tokenizing the conversation, or decoding the reply, failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The prompt has no tokens.
    #[error("the prompt is empty; give at least one message")]
    EmptyPrompt,
    /// A prompt token is outside the model's vocabulary.
    #[error("prompt token {token} is outside the model's vocabulary of {vocab_size}; tokenizer and model do not match")]
    TokenOutOfRange {
        /// The token id.
        token: u32,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
}

/// Sampling and stopping settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: sample among the most likely tokens whose probabilities sum to
    /// at least `top_p` (`1.0` keeps all).
    pub top_p: f32,
    /// RNG seed (same seed, same model, same prompt: same reply).
    pub seed: u64,
    /// Extra stop tokens, besides the tokenizer's and config's end-of-sequence ids and
    /// `<|im_end|>`.
    pub stop_token_ids: Vec<u32>,
    /// Passed to the chat template (`enable_thinking`), where it has the switch.
    pub enable_thinking: Option<bool>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_token_ids: Vec::new(),
            enable_thinking: None,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
    /// The token callback asked to stop.
    Cancelled,
}

/// A generated reply.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    /// The reply text (special tokens and the stop token left out).
    pub text: String,
    /// Generated ids, the stop token included when there was one.
    pub token_ids: Vec<u32>,
    /// Length of the rendered prompt in tokens.
    pub prompt_tokens: usize,
    /// Why generation ended.
    pub finish_reason: FinishReason,
}

/// Picks the next token from logits: argmax when `temperature` is 0, else a draw from
/// the tempered softmax restricted to the top-p nucleus.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    rng: SplitMix64,
}

impl Sampler {
    /// A sampler with the settings of `options`.
    pub fn new(options: &GenerateOptions) -> Self {
        Sampler {
            temperature: options.temperature,
            top_p: options.top_p,
            rng: SplitMix64::new(options.seed),
        }
    }

    /// The next token of one position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0;
        if self.temperature <= 0.0 {
            return argmax as u32;
        }
        let max = logits[argmax] as f64;
        let t = self.temperature as f64;
        let mut probs: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (i, ((v as f64 - max) / t).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let mut kept = 0;
        let mut mass = 0.0;
        for p in &probs {
            mass += p.1 / total;
            kept += 1;
            if mass >= self.top_p as f64 {
                break;
            }
        }
        let probs = &probs[..kept];
        let kept_mass: f64 = probs.iter().map(|p| p.1).sum();
        let mut u = self.rng.next_f64() * kept_mass;
        for &(i, p) in probs {
            if u < p {
                return i as u32;
            }
            u -= p;
        }
        probs[kept - 1].0 as u32
    }
}

/// Generates after `prompt` until a token of `stop` or `max_new_tokens`; `on_token` sees
/// each generated token and may cancel. Returns the generated ids and why it ended.
pub fn generate_tokens<M: LanguageModel>(
    model: &M,
    prompt: &[u32],
    stop: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<(Vec<u32>, FinishReason), GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let vocab_size = model.config().vocab_size;
    if let Some(&token) = prompt.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(GenerateError::TokenOutOfRange { token, vocab_size });
    }
    let mut sampler = Sampler::new(options);
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    let mut logits = model.next_logits(prompt, &mut cache);
    while out.len() < options.max_new_tokens {
        let token = sampler.sample(&logits);
        out.push(token);
        if stop.contains(&token) {
            return Ok((out, FinishReason::Stop));
        }
        if on_token(token).is_break() {
            return Ok((out, FinishReason::Cancelled));
        }
        if out.len() == options.max_new_tokens {
            break;
        }
        logits = model.next_logits(&[token], &mut cache);
    }
    Ok((out, FinishReason::Length))
}

/// The stop tokens of a model and tokenizer: end-of-sequence ids of the tokenizer and
/// config, `<|im_end|>` and `<|endoftext|>` when the vocabulary has them, and `extra`.
pub fn stop_tokens<M: LanguageModel>(model: &M, tokenizer: &Tokenizer, extra: &[u32]) -> Vec<u32> {
    let mut stop: Vec<u32> = tokenizer.eos_token_ids().to_vec();
    stop.extend(&model.config().eos_token_ids);
    stop.extend(
        ["<|im_end|>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| tokenizer.token_id(t)),
    );
    stop.extend(extra);
    stop.sort_unstable();
    stop.dedup();
    stop
}

/// Answers an OpenAI-format conversation (`[{"role": ..., "content": ...}, ...]`) with
/// the model's chat template, calling `on_token` for each generated token (progress and
/// cancellation).
pub fn generate_with<M: LanguageModel>(
    model: &M,
    tokenizer: &Tokenizer,
    messages: &[Value],
    options: &GenerateOptions,
    on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Reply, GenerateError> {
    generate_with_tools(model, tokenizer, messages, None, options, on_token)
}

/// [`generate_with`] with OpenAI-format tool definitions rendered into the prompt by the
/// chat template (the reply text keeps the tool calls the model writes; parse them in
/// the template's format).
pub fn generate_with_tools<M: LanguageModel>(
    model: &M,
    tokenizer: &Tokenizer,
    messages: &[Value],
    tools: Option<&[Value]>,
    options: &GenerateOptions,
    on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Reply, GenerateError> {
    let prompt = tokenizer.encode_prompt(messages, tools, options.enable_thinking)?;
    let stop = stop_tokens(model, tokenizer, &options.stop_token_ids);
    let (token_ids, finish_reason) = generate_tokens(model, &prompt, &stop, options, on_token)?;
    let body = match finish_reason {
        FinishReason::Stop => &token_ids[..token_ids.len() - 1],
        _ => &token_ids[..],
    };
    Ok(Reply {
        text: tokenizer.decode(body, true)?,
        prompt_tokens: prompt.len(),
        token_ids,
        finish_reason,
    })
}

/// [`generate_with`] without a callback.
pub fn generate<M: LanguageModel>(
    model: &M,
    tokenizer: &Tokenizer,
    messages: &[Value],
    options: &GenerateOptions,
) -> Result<Reply, GenerateError> {
    generate_with(model, tokenizer, messages, options, |_| {
        ControlFlow::Continue(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(&GenerateOptions::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn tiny_top_p_is_greedy_and_seeds_repeat() {
        let logits = [0.5, 2.0, 1.9, -3.0];
        let mut s = Sampler::new(&GenerateOptions {
            temperature: 1.0,
            top_p: 1e-6,
            ..Default::default()
        });
        assert!((0..20).all(|_| s.sample(&logits) == 1));
        let draw = |seed| {
            let mut s = Sampler::new(&GenerateOptions {
                temperature: 1.0,
                seed,
                ..Default::default()
            });
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let d = draw(7);
        assert!(d.contains(&0) && d.contains(&1) && d.contains(&2));
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // p ≈ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps the first two tokens only.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(&GenerateOptions {
            temperature: 1.0,
            top_p: 0.8,
            seed: 3,
            ..Default::default()
        });
        let draws: Vec<u32> = (0..500).map(|_| s.sample(&logits)).collect();
        assert!(draws.iter().all(|&t| t < 2));
        assert!(draws.contains(&1));
    }
}
