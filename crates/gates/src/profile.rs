//! Gate profiles: the dataset thresholds and check settings of `config/gates/*.toml`.
//!
//! A profile is named (`v4`) or given as a path. Names resolve to `config/gates/NAME.toml`
//! under the current directory when that file exists, else to the copy built into the
//! binary from the repository's `config/gates/`, so the shipped profiles work from any
//! directory. Unknown keys are errors (a misspelt threshold must not silently disable a
//! gate).

use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The empty think block that replies start with when thinking is off.
pub const DEFAULT_THINK_PREFIX: &str = "<think>\n</think>\n";

/// Profiles built into the binary: (name, TOML text).
pub const BUILTIN_PROFILES: &[(&str, &str)] = &[
    ("v3", include_str!("../../../config/gates/v3.toml")),
    ("v4", include_str!("../../../config/gates/v4.toml")),
];

/// Errors loading a profile.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Neither a file nor a built-in profile of that name exists.
    #[error("gate profile `{name}` not found: no file {tried} and no built-in profile of that name (built-in: {builtin}); pass a path to a .toml profile or one of the built-in names")]
    NotFound {
        /// The name asked for.
        name: String,
        /// The file looked for.
        tried: String,
        /// The built-in names.
        builtin: String,
    },
    /// The file cannot be read.
    #[error("{path}: cannot read gate profile: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown or mistyped keys.
    #[error("{origin}: invalid gate profile: {message}")]
    Parse {
        /// The file or built-in name.
        origin: String,
        /// The TOML error, with line and column.
        message: String,
    },
}

/// Dataset-level thresholds; an absent threshold is not checked.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Usable conversations, at least.
    pub min_conversations: Option<u64>,
    /// Conversations with at least one tool call, at least.
    pub min_tool_call_conversations: Option<u64>,
    /// Percentage of assistant text replies that start with the think prefix, at least.
    pub min_think_prefix_pct: Option<f64>,
    /// Conversations with markdown in a reply, at most.
    pub max_markdown_conversations: Option<u64>,
    /// Percentage of conversations whose final reply ends with `?`, at most.
    pub max_trailing_question_pct: Option<f64>,
    /// Percentage of assistant text replies with more than `max_sentences`, at most.
    pub max_verbose_reply_pct: Option<f64>,
    /// Conversations with an emoji in a reply, at most.
    pub max_emoji_conversations: Option<u64>,
    /// Shortest system prompt in the dataset, in characters, at least.
    pub min_system_prompt_chars: Option<u64>,
}

/// Settings of the per-conversation checks.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckSettings {
    /// The prefix every assistant text reply must start with (`think_prefix` check).
    pub think_prefix: String,
    /// Replies with more sentences than this are `verbose`.
    pub max_sentences: usize,
}

impl Default for CheckSettings {
    fn default() -> Self {
        CheckSettings {
            think_prefix: DEFAULT_THINK_PREFIX.to_string(),
            max_sentences: 2,
        }
    }
}

/// The tools a conversation may call.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ToolSettings {
    /// Allowed tool names; empty means any name is accepted.
    #[serde(default)]
    pub allowed: BTreeSet<String>,
}

/// A gate profile.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GateProfile {
    /// Profile name, shown in reports.
    pub name: String,
    /// What the profile is for.
    #[serde(default)]
    pub description: String,
    /// Dataset thresholds.
    #[serde(default)]
    pub gates: Thresholds,
    /// Per-conversation check settings.
    #[serde(default)]
    pub checks: CheckSettings,
    /// Allowed tools.
    #[serde(default)]
    pub tools: ToolSettings,
}

impl GateProfile {
    /// Parses a profile from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<GateProfile, ProfileError> {
        let profile: GateProfile = toml::from_str(text).map_err(|e| ProfileError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        if profile.checks.max_sentences == 0 {
            return Err(ProfileError::Parse {
                origin: origin.to_string(),
                message: "checks.max_sentences must be at least 1".into(),
            });
        }
        Ok(profile)
    }

    /// Loads a profile file.
    pub fn from_file(path: &Path) -> Result<GateProfile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        GateProfile::from_toml(&text, &path.display().to_string())
    }

    /// A built-in profile by name.
    pub fn builtin(name: &str) -> Option<GateProfile> {
        BUILTIN_PROFILES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(n, text)| GateProfile::from_toml(text, n).expect("built-in profiles are valid"))
    }

    /// Resolves a name or path as the module docs describe.
    pub fn resolve(name_or_path: &str) -> Result<GateProfile, ProfileError> {
        let as_path = Path::new(name_or_path);
        if name_or_path.ends_with(".toml") || name_or_path.contains('/') {
            return GateProfile::from_file(as_path);
        }
        let local = Path::new("config/gates").join(format!("{name_or_path}.toml"));
        if local.is_file() {
            return GateProfile::from_file(&local);
        }
        GateProfile::builtin(name_or_path).ok_or_else(|| ProfileError::NotFound {
            name: name_or_path.to_string(),
            tried: local.display().to_string(),
            builtin: BUILTIN_PROFILES
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Replaces the allowed tool list (the CLI's `--tools`).
    pub fn with_tools<I: IntoIterator<Item = String>>(mut self, tools: I) -> GateProfile {
        self.tools.allowed = tools.into_iter().filter(|t| !t.is_empty()).collect();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_parse_with_the_seed_thresholds() {
        let v4 = GateProfile::builtin("v4").unwrap();
        assert_eq!(v4.gates.min_conversations, Some(900));
        assert_eq!(v4.gates.min_tool_call_conversations, Some(300));
        assert_eq!(v4.gates.min_think_prefix_pct, Some(95.0));
        assert_eq!(v4.gates.max_markdown_conversations, Some(5));
        assert_eq!(v4.gates.max_trailing_question_pct, Some(5.0));
        assert_eq!(v4.gates.max_verbose_reply_pct, Some(5.0));
        assert_eq!(v4.gates.max_emoji_conversations, Some(0));
        assert_eq!(v4.gates.min_system_prompt_chars, Some(2500));
        assert_eq!(v4.checks.think_prefix, DEFAULT_THINK_PREFIX);
        assert!(v4.tools.allowed.contains("search_memory"));
        let v3 = GateProfile::builtin("v3").unwrap();
        assert_eq!(v3.gates.min_tool_call_conversations, Some(350));
        assert_eq!(v3.gates.max_markdown_conversations, Some(10));
        assert_eq!(v3.gates.max_emoji_conversations, None);
        assert_eq!(v3.gates.min_system_prompt_chars, None);
    }

    #[test]
    fn misspelt_keys_are_errors_with_a_location() {
        let err = GateProfile::from_toml("name = \"x\"\n[gates]\nmin_conversation = 3\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("x.toml: invalid gate profile"), "{err}");
        assert!(err.contains("min_conversation"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn unknown_names_list_the_builtins() {
        let err = GateProfile::resolve("v9").unwrap_err().to_string();
        assert!(err.contains("built-in: v3, v4"), "{err}");
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let err = GateProfile::resolve("/nonexistent/p.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/nonexistent/p.toml: cannot read"), "{err}");
    }
}
