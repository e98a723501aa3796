//! The offline teacher's phrase tables: what its conversations say (questions, answers, tool
//! queries and results, names). They live in `config/teacher/offline_phrases.toml`, compiled
//! into the binary, so the data can be read and edited apart from the generator's logic.

use serde::Deserialize;
use std::sync::OnceLock;

/// The tables, one field per pool of `config/teacher/offline_phrases.toml` (its comments say
/// what each row holds).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Phrases {
    pub openers: Vec<String>,
    pub topics: Vec<(String, String)>,
    pub leads: Vec<String>,
    pub quick_facts: Vec<(String, String)>,
    pub long_questions: Vec<(String, String)>,
    pub switches: Vec<(String, String)>,
    pub searches: Vec<(String, String, String, String)>,
    pub memory_queries: Vec<(String, String)>,
    pub memory_empty_replies: Vec<String>,
    pub memory_found: Vec<(String, String, String, String)>,
    pub saves: Vec<(String, String, String)>,
    pub feelings: Vec<(String, String)>,
    pub user_context: Vec<(String, String)>,
    pub greetings: Vec<(String, String)>,
    pub timer_minutes: Vec<u32>,
    pub reminders: Vec<String>,
    pub genres: Vec<String>,
    pub rooms: Vec<String>,
    pub light_states: Vec<(String, String, String)>,
    pub cities: Vec<String>,
}

const TEXT: &str = include_str!("../../../../config/teacher/offline_phrases.toml");

impl Phrases {
    /// Parses and checks the tables: every pool has a row, the first opener is empty (the
    /// request as it is), and every `{}` template has its placeholder.
    fn parse(text: &str) -> Result<Phrases, String> {
        let p: Phrases = toml::from_str(text).map_err(|e| e.to_string())?;
        let sizes = [
            ("openers", p.openers.len()),
            ("topics", p.topics.len()),
            ("leads", p.leads.len()),
            ("quick_facts", p.quick_facts.len()),
            ("long_questions", p.long_questions.len()),
            ("switches", p.switches.len()),
            ("searches", p.searches.len()),
            ("memory_queries", p.memory_queries.len()),
            ("memory_empty_replies", p.memory_empty_replies.len()),
            ("memory_found", p.memory_found.len()),
            ("saves", p.saves.len()),
            ("feelings", p.feelings.len()),
            ("user_context", p.user_context.len()),
            ("greetings", p.greetings.len()),
            ("timer_minutes", p.timer_minutes.len()),
            ("reminders", p.reminders.len()),
            ("genres", p.genres.len()),
            ("rooms", p.rooms.len()),
            ("light_states", p.light_states.len()),
            ("cities", p.cities.len()),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, n)| *n == 0) {
            return Err(format!("`{name}` is empty"));
        }
        if !p.openers[0].is_empty() {
            return Err("the first of `openers` must be \"\" (the request as it is)".into());
        }
        let templates = p
            .leads
            .iter()
            .chain(p.light_states.iter().flat_map(|(_, ask, said)| [ask, said]));
        if let Some(t) = templates.into_iter().find(|t| !t.contains("{}")) {
            return Err(format!("template {t:?} has no `{{}}` placeholder"));
        }
        Ok(p)
    }
}

/// The compiled-in tables (parsed once; a test checks that they parse).
pub(crate) fn phrases() -> &'static Phrases {
    static PHRASES: OnceLock<Phrases> = OnceLock::new();
    PHRASES.get_or_init(|| {
        Phrases::parse(TEXT).unwrap_or_else(|e| panic!("config/teacher/offline_phrases.toml: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compiled_in_tables_parse_and_hold_what_the_scenes_need() {
        let p = Phrases::parse(TEXT).unwrap();
        assert_eq!(p.openers[0], "");
        assert_eq!(p.topics.len(), 16);
        assert!(p.leads.iter().all(|l| l.contains("{}")));
    }

    /// The user prompts of every behaviour-suite file in `config/bench/`, lower-cased.
    fn bench_prompts() -> Vec<String> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/bench");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            let value: toml::Value = toml::from_str(&text).unwrap();
            for prompt in value
                .get("prompts")
                .and_then(|p| p.as_array())
                .into_iter()
                .flatten()
            {
                if let Some(user) = prompt.get("user").and_then(|u| u.as_str()) {
                    out.push(user.to_lowercase());
                }
            }
        }
        out
    }

    #[test]
    fn no_training_question_is_a_bench_prompt() {
        let p = Phrases::parse(TEXT).unwrap();
        let bench = bench_prompts();
        assert!(bench.len() >= 40, "read {} suite prompts", bench.len());
        let questions = p
            .quick_facts
            .iter()
            .chain(&p.long_questions)
            .chain(&p.switches)
            .chain(&p.feelings)
            .chain(&p.user_context)
            .map(|(q, _)| q);
        for q in questions {
            assert!(
                !bench.contains(&q.to_lowercase()),
                "{q:?} is a behaviour-suite prompt: the suite must measure held-out prompts"
            );
        }
    }

    #[test]
    fn broken_tables_are_named() {
        let err =
            Phrases::parse(&TEXT.replace("leads = [", "leads = [\"no placeholder\",")).unwrap_err();
        assert!(err.contains("no placeholder"), "{err}");
        let err =
            Phrases::parse(&TEXT.replace("cities = [", "cities = [] \nxcities = [")).unwrap_err();
        assert!(
            err.contains("unknown field") || err.contains("xcities"),
            "{err}"
        );
        let err = Phrases::parse(&TEXT.replace("openers = [\n  \"\",", "openers = [")).unwrap_err();
        assert!(err.contains("openers"), "{err}");
    }
}
