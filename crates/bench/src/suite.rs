//! Behaviour suites: `config/bench/` holds `suite.toml` (request settings, latency gates)
//! and one TOML file per category (its checks, its gate and its prompts).
//!
//! A suite is read from a directory, or from the copy built into the binary when no
//! directory is given and `config/bench/` does not exist under the working directory (the
//! same rule as gate profiles and the teacher config). Unknown keys are errors, so a
//! misspelt gate never silently disappears.

use crate::BenchError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The default suite directory, relative to the working directory.
pub const DEFAULT_SUITE_DIR: &str = "config/bench";

/// The files of the shipped `config/bench/`, built into the binary: (file name, text).
pub const BUILTIN_FILES: [(&str, &str); 8] = [
    (
        "suite.toml",
        include_str!("../../../config/bench/suite.toml"),
    ),
    (
        "thinking_leak.toml",
        include_str!("../../../config/bench/thinking_leak.toml"),
    ),
    (
        "tool_calling.toml",
        include_str!("../../../config/bench/tool_calling.toml"),
    ),
    (
        "markdown.toml",
        include_str!("../../../config/bench/markdown.toml"),
    ),
    (
        "factual.toml",
        include_str!("../../../config/bench/factual.toml"),
    ),
    (
        "reasoning.toml",
        include_str!("../../../config/bench/reasoning.toml"),
    ),
    (
        "follow_up.toml",
        include_str!("../../../config/bench/follow_up.toml"),
    ),
    (
        "verbosity.toml",
        include_str!("../../../config/bench/verbosity.toml"),
    ),
];

/// The checks a category can count (names as in reports).
pub const CHECK_NAMES: [&str; 11] = [
    "think_leak",
    "empty_reply",
    "markdown",
    "emoji",
    "verbose",
    "trailing_question",
    "tool_call",
    "tool_call_malformed",
    "tool_call_in_text",
    "unexpected_tool_call",
    "answer",
];

/// Latency gates over all requests of a run; an absent gate is not checked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyGates {
    /// Median time to the first token (content, reasoning or tool call), at most, in ms.
    pub max_ttft_p50_ms: Option<f64>,
    /// Median decode speed from the usage chunk, at least, in tokens/s.
    pub min_decode_tok_s_p50: Option<f64>,
}

/// `suite.toml`: what every request of the suite is sent with.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteFile {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default = "v4")]
    profile: String,
    #[serde(default = "default_max_tokens")]
    max_tokens: u32,
    #[serde(default)]
    temperature: f64,
    seed: Option<u64>,
    #[serde(default)]
    enable_thinking: bool,
    #[serde(default)]
    latency: LatencyGates,
}

fn v4() -> String {
    "v4".into()
}

fn default_max_tokens() -> u32 {
    256
}

/// The `[category]` table of a category file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Category {
    /// Identifier used in reports.
    pub name: String,
    /// What the category measures.
    #[serde(default)]
    pub description: String,
    /// The checks whose findings fail a prompt of this category (see [`CHECK_NAMES`]).
    pub checks: Vec<String>,
    /// The category's gate: passed prompts, at least, in percent.
    pub min_pass_pct: f64,
}

/// A tool call of a history message, written compactly in the suite files.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryCall {
    /// The call's id, answered by a later `tool` message.
    pub id: String,
    /// The function name.
    pub name: String,
    /// The arguments, a JSON string.
    pub arguments: String,
}

/// A message before the prompt's final user turn.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryMessage {
    /// `user`, `assistant` or `tool`.
    pub role: String,
    /// Text content.
    pub content: Option<String>,
    /// Tool calls of an assistant message.
    #[serde(default)]
    pub tool_calls: Vec<HistoryCall>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

impl HistoryMessage {
    /// The message in OpenAI chat format.
    pub fn to_openai(&self) -> serde_json::Value {
        let mut m = serde_json::json!({ "role": self.role, "content": self.content });
        if !self.tool_calls.is_empty() {
            m["tool_calls"] = self
                .tool_calls
                .iter()
                .map(|c| {
                    serde_json::json!({"id": c.id, "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments}})
                })
                .collect();
        }
        if let Some(id) = &self.tool_call_id {
            m["tool_call_id"] = id.clone().into();
        }
        m
    }
}

/// The tool call a prompt expects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedTool {
    /// Function name.
    pub name: String,
    /// Argument fields that must be present (besides the tool schema's own `required`).
    #[serde(default)]
    pub required: Vec<String>,
    /// Argument values that must contain these texts (case-insensitive).
    #[serde(default)]
    pub arguments: BTreeMap<String, String>,
}

/// One prompt of a category.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prompt {
    /// Unique id within the suite.
    pub id: String,
    /// The final user message (optional when `history` ends with a tool result).
    pub user: Option<String>,
    /// Messages between the system prompt and `user`.
    #[serde(default)]
    pub history: Vec<HistoryMessage>,
    /// The tool the model must call.
    pub expect_tool: Option<ExpectedTool>,
    /// Texts one of which the reply must contain as a whole word (case-insensitive).
    #[serde(default)]
    pub expect_answer: Vec<String>,
    /// Whether a tool call instead of a text answer is acceptable.
    #[serde(default)]
    pub allow_tools: bool,
    /// Overrides the suite's `max_tokens`.
    pub max_tokens: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct CategoryFile {
    category: Category,
    prompts: Vec<Prompt>,
}

/// A category with its prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct CategorySuite {
    /// The category.
    pub category: Category,
    /// Its prompts, in file order.
    pub prompts: Vec<Prompt>,
}

/// A behaviour suite.
#[derive(Debug, Clone, PartialEq)]
pub struct Suite {
    /// Where it was read from (a directory, or `built-in`).
    pub origin: String,
    /// Name shown in reports.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Gate profile of the shared check settings.
    pub profile: String,
    /// `max_tokens` of each request.
    pub max_tokens: u32,
    /// Sampling temperature.
    pub temperature: f64,
    /// Sampling seed, when set.
    pub seed: Option<u64>,
    /// `chat_template_kwargs.enable_thinking`.
    pub enable_thinking: bool,
    /// Latency gates.
    pub latency: LatencyGates,
    /// Categories, sorted by file name.
    pub categories: Vec<CategorySuite>,
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T, BenchError> {
    toml::from_str(text).map_err(|e| BenchError::Suite {
        origin: origin.to_string(),
        message: e.to_string().trim_end().replace('\n', " "),
    })
}

impl Suite {
    /// Builds a suite from `suite.toml`'s text and the category files' (name, text) pairs;
    /// `origin` names them in errors.
    pub fn from_texts(
        origin: &str,
        suite: &str,
        categories: &[(String, String)],
    ) -> Result<Suite, BenchError> {
        let file: SuiteFile = parse(suite, &format!("{origin}/suite.toml"))?;
        let mut cats = Vec::new();
        let mut sorted: Vec<&(String, String)> = categories.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, text) in sorted {
            let f: CategoryFile = parse(text, &format!("{origin}/{name}"))?;
            cats.push(CategorySuite {
                category: f.category,
                prompts: f.prompts,
            });
        }
        let suite = Suite {
            origin: origin.to_string(),
            name: file.name,
            description: file.description,
            profile: file.profile,
            max_tokens: file.max_tokens,
            temperature: file.temperature,
            seed: file.seed,
            enable_thinking: file.enable_thinking,
            latency: file.latency,
            categories: cats,
        };
        suite.check()?;
        Ok(suite)
    }

    /// The suite built into the binary.
    pub fn builtin() -> Suite {
        let cats: Vec<(String, String)> = BUILTIN_FILES[1..]
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        Suite::from_texts("built-in", BUILTIN_FILES[0].1, &cats)
            .expect("the shipped config/bench/ is valid")
    }

    /// Reads `suite.toml` and every other `*.toml` of `dir`.
    pub fn from_dir(dir: &Path) -> Result<Suite, BenchError> {
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p).map_err(|source| BenchError::Read { path: p, source })
        };
        let suite = read(dir.join("suite.toml"))?;
        let entries = std::fs::read_dir(dir).map_err(|source| BenchError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut cats = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|source| BenchError::Read {
                    path: dir.to_path_buf(),
                    source,
                })?
                .path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.ends_with(".toml") && name != "suite.toml" {
                cats.push((name, read(path)?));
            }
        }
        Suite::from_texts(&dir.display().to_string(), &suite, &cats)
    }

    /// `dir` when given; else `config/bench/` under the working directory when it holds a
    /// `suite.toml`, else the built-in suite.
    pub fn resolve(dir: Option<&Path>) -> Result<Suite, BenchError> {
        match dir {
            Some(d) => Suite::from_dir(d),
            None => {
                let local = Path::new(DEFAULT_SUITE_DIR);
                if local.join("suite.toml").is_file() {
                    Suite::from_dir(local)
                } else {
                    Ok(Suite::builtin())
                }
            }
        }
    }

    /// Keeps only the named categories; unknown names are an error.
    pub fn only(mut self, names: &[String]) -> Result<Suite, BenchError> {
        if names.is_empty() {
            return Ok(self);
        }
        let known: Vec<String> = self
            .categories
            .iter()
            .map(|c| c.category.name.clone())
            .collect();
        for n in names {
            if !known.contains(n) {
                return Err(BenchError::Suite {
                    origin: self.origin.clone(),
                    message: format!("no category `{n}`; the suite has: {}", known.join(", ")),
                });
            }
        }
        self.categories.retain(|c| names.contains(&c.category.name));
        Ok(self)
    }

    /// Caps every request's `max_tokens` (the suite's and each prompt's override) at `cap`.
    pub fn cap_max_tokens(mut self, cap: u32) -> Suite {
        self.max_tokens = self.max_tokens.min(cap);
        for p in self
            .categories
            .iter_mut()
            .flat_map(|c| c.prompts.iter_mut())
        {
            p.max_tokens = p.max_tokens.map(|m| m.min(cap));
        }
        self
    }

    /// Number of prompts over all categories.
    pub fn prompt_count(&self) -> usize {
        self.categories.iter().map(|c| c.prompts.len()).sum()
    }

    fn check(&self) -> Result<(), BenchError> {
        let bad = |message: String| BenchError::Suite {
            origin: self.origin.clone(),
            message,
        };
        if self.categories.is_empty() {
            return Err(bad(
                "no category files next to suite.toml (each *.toml holds [category] and [[prompts]])"
                    .into(),
            ));
        }
        let mut ids = BTreeSet::new();
        let mut names = BTreeSet::new();
        for c in &self.categories {
            let cat = &c.category;
            if !names.insert(cat.name.as_str()) {
                return Err(bad(format!("category `{}` is defined twice", cat.name)));
            }
            if !(0.0..=100.0).contains(&cat.min_pass_pct) {
                return Err(bad(format!(
                    "category `{}`: min_pass_pct {} is not a percentage (0 to 100)",
                    cat.name, cat.min_pass_pct
                )));
            }
            if cat.checks.is_empty() {
                return Err(bad(format!("category `{}` has no checks", cat.name)));
            }
            for check in &cat.checks {
                if !CHECK_NAMES.contains(&check.as_str()) {
                    return Err(bad(format!(
                        "category `{}`: unknown check `{check}` (known: {})",
                        cat.name,
                        CHECK_NAMES.join(", ")
                    )));
                }
            }
            if c.prompts.is_empty() {
                return Err(bad(format!("category `{}` has no prompts", cat.name)));
            }
            for p in &c.prompts {
                if !ids.insert(p.id.as_str()) {
                    return Err(bad(format!("prompt id `{}` is used twice", p.id)));
                }
                if p.user.is_none() && p.history.is_empty() {
                    return Err(bad(format!(
                        "prompt `{}` has neither `user` nor `history`",
                        p.id
                    )));
                }
                for m in &p.history {
                    if !matches!(m.role.as_str(), "user" | "assistant" | "tool") {
                        return Err(bad(format!(
                            "prompt `{}`: history role `{}` (expected user, assistant or tool)",
                            p.id, m.role
                        )));
                    }
                }
                let needs = |check: &str| cat.checks.iter().any(|c| c == check);
                if needs("answer") && p.expect_answer.is_empty() {
                    return Err(bad(format!(
                        "prompt `{}` is in category `{}`, which checks `answer`, but has no expect_answer",
                        p.id, cat.name
                    )));
                }
                if needs("tool_call") && p.expect_tool.is_none() {
                    return Err(bad(format!(
                        "prompt `{}` is in category `{}`, which checks `tool_call`, but has no expect_tool",
                        p.id, cat.name
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_suite_parses_with_the_seeds_gates() {
        let s = Suite::builtin();
        let names: Vec<&str> = s
            .categories
            .iter()
            .map(|c| c.category.name.as_str())
            .collect();
        for n in [
            "thinking_leak",
            "tool_calling",
            "markdown",
            "factual",
            "reasoning",
            "follow_up",
            "verbosity",
        ] {
            assert!(names.contains(&n), "{n} in {names:?}");
        }
        let gate = |n: &str| {
            s.categories
                .iter()
                .find(|c| c.category.name == n)
                .unwrap()
                .category
                .min_pass_pct
        };
        assert_eq!(gate("thinking_leak"), 100.0);
        assert_eq!(gate("tool_calling"), 60.0);
        assert_eq!(gate("markdown"), 80.0);
        assert_eq!(s.latency.max_ttft_p50_ms, Some(120.0));
        assert_eq!(s.latency.min_decode_tok_s_p50, Some(25.0));
        assert!(s.prompt_count() >= 50, "{}", s.prompt_count());
        let from_dir =
            Suite::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/bench"))
                .unwrap();
        assert_eq!(from_dir.categories, s.categories);
    }

    #[test]
    fn mistakes_in_suite_files_are_named() {
        let suite = "name = \"t\"\n";
        let cat = |body: &str| vec![("c.toml".to_string(), body.to_string())];
        let ok = "[category]\nname = \"c\"\nchecks = [\"markdown\"]\nmin_pass_pct = 50\n[[prompts]]\nid = \"a\"\nuser = \"hi\"\n";
        Suite::from_texts("t", suite, &cat(ok)).unwrap();
        let err = Suite::from_texts("t", suite, &cat(&ok.replace("markdown", "markdwn")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown check `markdwn`"), "{err}");
        let err = Suite::from_texts("t", suite, &cat(&ok.replace("markdown", "answer")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no expect_answer"), "{err}");
        let err = Suite::from_texts("t", suite, &cat(&ok.replace("user = \"hi\"", "")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("neither `user` nor `history`"), "{err}");
        let err = Suite::from_texts("t", &format!("{suite}colour = 1\n"), &cat(ok))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("colour") && err.contains("t/suite.toml"),
            "{err}"
        );
        let err = Suite::from_texts("t", suite, &[]).unwrap_err().to_string();
        assert!(err.contains("no category files"), "{err}");
        let s = Suite::from_texts("t", suite, &cat(ok)).unwrap();
        let err = s.clone().only(&["nope".into()]).unwrap_err().to_string();
        assert!(err.contains("no category `nope`"), "{err}");
        assert_eq!(s.only(&["c".into()]).unwrap().prompt_count(), 1);
    }

    #[test]
    fn a_max_tokens_cap_lowers_the_suite_and_every_override() {
        let cat = "[category]\nname = \"c\"\nchecks = [\"markdown\"]\nmin_pass_pct = 50\n\
                   [[prompts]]\nid = \"a\"\nuser = \"hi\"\nmax_tokens = 512\n\
                   [[prompts]]\nid = \"b\"\nuser = \"hi\"\nmax_tokens = 16\n\
                   [[prompts]]\nid = \"c\"\nuser = \"hi\"\n";
        let s = Suite::from_texts(
            "t",
            "name = \"t\"\nmax_tokens = 256\n",
            &[("c.toml".into(), cat.into())],
        )
        .unwrap()
        .cap_max_tokens(64);
        assert_eq!(s.max_tokens, 64);
        let overrides: Vec<Option<u32>> = s.categories[0]
            .prompts
            .iter()
            .map(|p| p.max_tokens)
            .collect();
        assert_eq!(overrides, vec![Some(64), Some(16), None]);
    }
}
