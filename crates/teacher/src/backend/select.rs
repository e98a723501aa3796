//! Choosing a backend from flat settings: [`BackendKind`] is the backend's name as the
//! CLI's `--backend` and the node's `teacher.backend` spell it, and [`BackendSettings`]
//! turns the name plus the flat options both give (model, base URL, API key variable,
//! seed, ...) into one [`BackendConfig`]. The one place that maps settings to a backend.

use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::{AnthropicConfig, BackendConfig, ClaudeCliConfig, OfflineConfig, OpenAiConfig};

/// A teacher backend by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum BackendKind {
    /// The Claude Code CLI (`claude -p`), prompt on stdin, from a fresh temporary directory.
    #[default]
    ClaudeCli,
    /// Any OpenAI-compatible /v1/chat/completions endpoint.
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
    /// A deterministic template generator: no network, for demos and tests.
    Offline,
}

impl BackendKind {
    /// Every backend, in the order help texts list them.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::ClaudeCli,
        BackendKind::Openai,
        BackendKind::Anthropic,
        BackendKind::Offline,
    ];

    /// The backend's name (`claude-cli`, `openai`, `anthropic`, `offline`).
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::ClaudeCli => "claude-cli",
            BackendKind::Openai => "openai",
            BackendKind::Anthropic => "anthropic",
            BackendKind::Offline => "offline",
        }
    }
}

/// A backend name that is none of [`BackendKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown teacher backend {0:?}; use offline, claude-cli, openai or anthropic")]
pub struct UnknownBackend(pub String);

impl FromStr for BackendKind {
    type Err = UnknownBackend;

    fn from_str(s: &str) -> Result<BackendKind, UnknownBackend> {
        BackendKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownBackend(s.to_string()))
    }
}

/// A backend and its options as flat settings; only the options of the chosen backend are
/// read, the others are ignored.
#[derive(Debug, Clone, Default)]
pub struct BackendSettings {
    /// Which backend.
    pub kind: BackendKind,
    /// Teacher model (claude-cli: the CLI's `--model`; openai, anthropic: the model name).
    pub model: Option<String>,
    /// claude-cli: the whole command line, replacing the default (and `model`).
    pub command: Option<String>,
    /// Base URL of the HTTP backends.
    pub base_url: Option<String>,
    /// Environment variable holding the HTTP backends' API key (openai: empty for none).
    pub api_key_env: Option<String>,
    /// Sampling temperature of the HTTP backends.
    pub temperature: Option<f32>,
    /// Completion token limit of the HTTP backends.
    pub max_tokens: Option<u32>,
    /// Seed of the offline backend.
    pub seed: u64,
    /// Simulated latency per batch of the offline backend, in milliseconds.
    pub delay_ms: u64,
}

impl BackendSettings {
    /// The options both HTTP backends take, over their defaults.
    fn http(
        &self,
        base_url: &mut String,
        model: &mut String,
        temperature: &mut f32,
        max_tokens: &mut u32,
    ) {
        if let Some(v) = &self.base_url {
            base_url.clone_from(v);
        }
        if let Some(v) = &self.model {
            model.clone_from(v);
        }
        if let Some(v) = self.temperature {
            *temperature = v;
        }
        if let Some(v) = self.max_tokens {
            *max_tokens = v;
        }
    }

    /// The backend these settings choose, with their options over the backend's defaults.
    /// Fails only on a `command` that is not a valid command line (the text says why).
    pub fn config(&self) -> Result<BackendConfig, String> {
        Ok(match self.kind {
            BackendKind::ClaudeCli => {
                BackendConfig::ClaudeCli(match (&self.command, &self.model) {
                    (Some(line), _) => ClaudeCliConfig::from_command_line(line)?,
                    (None, Some(model)) => ClaudeCliConfig::with_model(model),
                    (None, None) => ClaudeCliConfig::default(),
                })
            }
            BackendKind::Openai => {
                let mut c = OpenAiConfig::default();
                self.http(
                    &mut c.base_url,
                    &mut c.model,
                    &mut c.temperature,
                    &mut c.max_tokens,
                );
                if let Some(v) = &self.api_key_env {
                    c.api_key_env = Some(v.clone()).filter(|s| !s.is_empty());
                }
                BackendConfig::OpenAi(c)
            }
            BackendKind::Anthropic => {
                let mut c = AnthropicConfig::default();
                self.http(
                    &mut c.base_url,
                    &mut c.model,
                    &mut c.temperature,
                    &mut c.max_tokens,
                );
                if let Some(v) = &self.api_key_env {
                    c.api_key_env = v.clone();
                }
                BackendConfig::Anthropic(c)
            }
            BackendKind::Offline => BackendConfig::Offline(OfflineConfig {
                seed: self.seed,
                delay: Duration::from_millis(self.delay_ms),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in BackendKind::ALL {
            assert_eq!(k.name().parse(), Ok(k));
        }
        assert!("gpt".parse::<BackendKind>().is_err());
    }

    #[test]
    fn settings_choose_the_backend_and_its_options() {
        let s = BackendSettings {
            kind: BackendKind::Offline,
            seed: 7,
            delay_ms: 5,
            ..Default::default()
        };
        match s.config().unwrap() {
            BackendConfig::Offline(c) => {
                assert_eq!((c.seed, c.delay), (7, Duration::from_millis(5)))
            }
            other => panic!("{other:?}"),
        }
        let s = BackendSettings {
            kind: BackendKind::Openai,
            model: Some("m".into()),
            api_key_env: Some(String::new()),
            ..Default::default()
        };
        match s.config().unwrap() {
            BackendConfig::OpenAi(c) => assert_eq!((c.model.as_str(), c.api_key_env), ("m", None)),
            other => panic!("{other:?}"),
        }
    }
}
