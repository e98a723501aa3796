//! The teacher's data: categories, tools, generation prompts and the production system
//! prompt, read from a directory (`config/teacher/`) so that users add or edit categories
//! without touching code.
//!
//! A directory is read whole: `categories.toml`, `tools.toml`, `generation.toml` and
//! `system_prompt.txt`. [`TeacherConfig::resolve`] uses `config/teacher/` under the current
//! directory when it exists, else the copy built into the binary from the repository.
//! Unknown keys are errors, so a misspelt field never silently drops an instruction.

use crate::error::TeacherError;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The files of the shipped `config/teacher/`, built into the binary: (file name, text).
pub const BUILTIN_FILES: [(&str, &str); 4] = [
    (
        "categories.toml",
        include_str!("../../../config/teacher/categories.toml"),
    ),
    (
        "tools.toml",
        include_str!("../../../config/teacher/tools.toml"),
    ),
    (
        "generation.toml",
        include_str!("../../../config/teacher/generation.toml"),
    ),
    (
        "system_prompt.txt",
        include_str!("../../../config/teacher/system_prompt.txt"),
    ),
];

/// The default teacher config directory, relative to the working directory.
pub const DEFAULT_TEACHER_DIR: &str = "config/teacher";

/// A WRONG/CORRECT reply pair shown to the teacher.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExamplePair {
    /// A reply showing the failure the category trains away.
    pub wrong: String,
    /// The reply that should be given instead.
    pub correct: String,
}

/// One category of conversations.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Category {
    /// Identifier, stored as the conversation's `category`.
    pub name: String,
    /// Conversations to generate.
    pub count: u64,
    /// The behaviour this category teaches.
    pub purpose: String,
    /// What the teacher must write.
    pub instructions: String,
    /// WRONG/CORRECT example pairs.
    #[serde(default)]
    pub examples: Vec<ExamplePair>,
    /// Scene sequences for the offline backend (see `categories.toml`).
    #[serde(default)]
    pub offline: Vec<Vec<String>>,
}

/// One tool the assistant may call.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    /// Function name.
    pub name: String,
    /// What it does.
    pub description: String,
    /// JSON-schema parameters (OpenAI function format).
    pub parameters: serde_json::Value,
}

impl ToolSpec {
    /// The condensed form used in prompts: `name(required, optional?)`.
    pub fn condensed(&self) -> String {
        let required: BTreeSet<&str> = self.parameters["required"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let params: Vec<String> = self.parameters["properties"]
            .as_object()
            .map(|props| {
                props
                    .keys()
                    .map(|k| {
                        if required.contains(k.as_str()) {
                            k.clone()
                        } else {
                            format!("{k}?")
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        format!("{}({})", self.name, params.join(", "))
    }
}

/// How generation prompts are built (`generation.toml`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSettings {
    /// The system message the teacher writes into each conversation (replaced afterwards).
    pub short_system_prompt: String,
    /// Instructions for the teacher itself.
    pub generator_system_prompt: String,
    /// Text meaning the teacher answered with a plan instead of data.
    #[serde(default)]
    pub planning_markers: Vec<String>,
    /// The per-batch prompt with `{placeholders}`.
    pub prompt_template: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CategoriesFile {
    categories: Vec<Category>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolsFile {
    tools: Vec<ToolSpec>,
}

/// Everything the teacher reads from `config/teacher/`.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherConfig {
    /// Where it was read from (a directory, or `built-in`).
    pub origin: String,
    /// Categories in file order.
    pub categories: Vec<Category>,
    /// The tool set.
    pub tools: Vec<ToolSpec>,
    /// Prompt settings.
    pub generation: GenerationSettings,
    /// The full production system prompt that replaces the short one.
    pub production_prompt: String,
}

fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T, TeacherError> {
    toml::from_str(text).map_err(|e| TeacherError::Config {
        origin: origin.to_string(),
        message: e.to_string().trim_end().replace('\n', " "),
    })
}

impl TeacherConfig {
    /// Builds a config from the four files' texts; `origin` names them in errors.
    pub fn from_texts(
        origin: &str,
        categories: &str,
        tools: &str,
        generation: &str,
        system_prompt: &str,
    ) -> Result<TeacherConfig, TeacherError> {
        let cats: CategoriesFile = parse_toml(categories, &format!("{origin}/categories.toml"))?;
        let tools: ToolsFile = parse_toml(tools, &format!("{origin}/tools.toml"))?;
        let generation: GenerationSettings =
            parse_toml(generation, &format!("{origin}/generation.toml"))?;
        let config = TeacherConfig {
            origin: origin.to_string(),
            categories: cats.categories,
            tools: tools.tools,
            generation,
            production_prompt: system_prompt.trim_end_matches('\n').to_string(),
        };
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), TeacherError> {
        let bad = |file: &str, message: String| TeacherError::Config {
            origin: format!("{}/{file}", self.origin),
            message,
        };
        let mut seen = BTreeSet::new();
        for c in &self.categories {
            let ok_name = !c.name.is_empty()
                && c.name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
            if !ok_name {
                return Err(bad(
                    "categories.toml",
                    format!(
                        "category name {:?} must be non-empty ASCII letters, digits, _ or -",
                        c.name
                    ),
                ));
            }
            if !seen.insert(c.name.as_str()) {
                return Err(bad(
                    "categories.toml",
                    format!("category `{}` is defined twice", c.name),
                ));
            }
            if c.count == 0 {
                return Err(bad(
                    "categories.toml",
                    format!("category `{}` has count 0", c.name),
                ));
            }
        }
        if self.categories.is_empty() {
            return Err(bad("categories.toml", "no [[categories]] defined".into()));
        }
        let mut tools = BTreeSet::new();
        for t in &self.tools {
            if !t.parameters.is_object() {
                return Err(bad(
                    "tools.toml",
                    format!("tool `{}`: parameters must be a table", t.name),
                ));
            }
            if !tools.insert(t.name.as_str()) {
                return Err(bad(
                    "tools.toml",
                    format!("tool `{}` is defined twice", t.name),
                ));
            }
        }
        if self.production_prompt.trim().is_empty() {
            return Err(bad("system_prompt.txt", "the file is empty".into()));
        }
        Ok(())
    }

    /// The config built into the binary.
    pub fn builtin() -> TeacherConfig {
        let [c, t, g, s] = BUILTIN_FILES.map(|(_, text)| text);
        TeacherConfig::from_texts("built-in", c, t, g, s).expect("the built-in config is valid")
    }

    /// Reads the four files of a directory.
    pub fn from_dir(dir: &Path) -> Result<TeacherConfig, TeacherError> {
        let read = |name: &str| -> Result<String, TeacherError> {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TeacherError::Read { path, source })
        };
        TeacherConfig::from_texts(
            &dir.display().to_string(),
            &read("categories.toml")?,
            &read("tools.toml")?,
            &read("generation.toml")?,
            &read("system_prompt.txt")?,
        )
    }

    /// `dir` when given; else `config/teacher/` under the current directory when it has a
    /// `categories.toml`; else the built-in copy.
    pub fn resolve(dir: Option<&Path>) -> Result<TeacherConfig, TeacherError> {
        match dir {
            Some(d) => TeacherConfig::from_dir(d),
            None => {
                let local = PathBuf::from(DEFAULT_TEACHER_DIR);
                if local.join("categories.toml").is_file() {
                    TeacherConfig::from_dir(&local)
                } else {
                    Ok(TeacherConfig::builtin())
                }
            }
        }
    }

    /// The category with this name.
    pub fn category(&self, name: &str) -> Result<&Category, TeacherError> {
        self.categories
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| TeacherError::UnknownCategory {
                name: name.to_string(),
                known: self.category_names().join(", "),
            })
    }

    /// Category names in file order.
    pub fn category_names(&self) -> Vec<&str> {
        self.categories.iter().map(|c| c.name.as_str()).collect()
    }

    /// The condensed tool list for prompts: `a(x), b(y?)`.
    pub fn condensed_tools(&self) -> String {
        self.tools
            .iter()
            .map(ToolSpec::condensed)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The generation prompt of one batch.
    pub fn batch_prompt(&self, category: &Category, count: usize, batch: &str) -> String {
        let examples = category
            .examples
            .iter()
            .map(|e| format!("WRONG: {}\nCORRECT: {}", e.wrong, e.correct))
            .collect::<Vec<_>>()
            .join("\n");
        let vars = [
            ("{count}", count.to_string()),
            ("{category}", category.name.clone()),
            ("{purpose}", category.purpose.clone()),
            ("{instructions}", category.instructions.clone()),
            ("{examples}", examples),
            ("{tools}", self.condensed_tools()),
            (
                "{system_prompt}",
                self.generation.short_system_prompt.clone(),
            ),
            ("{batch}", batch.to_string()),
        ];
        let mut out = self.generation.prompt_template.trim().to_string();
        for (key, value) in vars {
            out = out.replace(key, &value);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_config_has_the_v4_categories_and_tools() {
        let c = TeacherConfig::builtin();
        let counts: Vec<(&str, u64)> = c
            .categories
            .iter()
            .map(|c| (c.name.as_str(), c.count))
            .collect();
        assert_eq!(
            counts,
            [
                ("topic_switch", 150),
                ("direct_action", 150),
                ("concise_voice", 200),
                ("honest_memory", 100),
                ("no_emoji_no_markdown", 100),
                ("no_followup_questions", 100),
                ("user_context", 100),
                ("cultural_greetings", 50),
                ("tool_result_responses", 50),
            ]
        );
        let profile = qatflow_gates::GateProfile::builtin("v4").unwrap();
        let names: BTreeSet<String> = c.tools.iter().map(|t| t.name.clone()).collect();
        assert_eq!(names, profile.tools.allowed);
        assert!(c.production_prompt.chars().count() >= 2500);
        assert!(c.categories.iter().all(|c| !c.examples.is_empty()));
    }

    #[test]
    fn prompts_stay_short_and_condensed() {
        let c = TeacherConfig::builtin();
        for cat in &c.categories {
            let p = c.batch_prompt(cat, 25, "0");
            assert!(p.len() < 3000, "{}: {} chars", cat.name, p.len());
            assert!(p.contains("set_reminder(text, time)"), "{p}");
            assert!(!p.contains("\"properties\""), "{p}");
            assert!(!p.contains("{count}") && !p.contains("{tools}"));
            assert!(p.contains("{\"messages\": [...]}"));
        }
        assert!(c.generation.short_system_prompt.len() < 1000);
    }

    #[test]
    fn misspelt_and_duplicate_entries_are_errors() {
        let [cats, tools, gen, sys] = BUILTIN_FILES.map(|(_, t)| t);
        let bad = cats.replacen("purpose =", "porpose =", 1);
        let err = TeacherConfig::from_texts("x", &bad, tools, gen, sys)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("x/categories.toml: invalid teacher config"),
            "{err}"
        );
        assert!(err.contains("porpose"), "{err}");
        let dup = format!("{cats}\n[[categories]]\nname = \"topic_switch\"\ncount = 1\npurpose = \"p\"\ninstructions = \"i\"\n");
        let err = TeacherConfig::from_texts("x", &dup, tools, gen, sys)
            .unwrap_err()
            .to_string();
        assert!(err.contains("defined twice"), "{err}");
    }

    #[test]
    fn a_new_category_is_data_only() {
        let [cats, tools, gen, sys] = BUILTIN_FILES.map(|(_, t)| t);
        let more = format!("{cats}\n[[categories]]\nname = \"bedtime\"\ncount = 10\npurpose = \"Calm replies at night.\"\ninstructions = \"Late-night chats.\"\noffline = [[\"feeling\"]]\n");
        let c = TeacherConfig::from_texts("x", &more, tools, gen, sys).unwrap();
        let p = c.batch_prompt(c.category("bedtime").unwrap(), 5, "3");
        assert!(p.contains("Calm replies at night."));
        assert!(c
            .category("nope")
            .unwrap_err()
            .to_string()
            .contains("bedtime"));
    }
}
