//! Turning a teacher's raw output into conversations, and preparing them for the store.
//!
//! Output is read line by line: markdown fences and prose lines are skipped, each line with
//! a conversation object is parsed on its own (one broken line does not lose the batch),
//! and output with no conversation at all is classified (empty, planning mode, other prose)
//! so the batch can be retried.

use qatflow_core::{Conversation, Message, Role};
use serde_json::Value;

/// A line that looked like a conversation but did not parse.
#[derive(Debug, Clone, PartialEq)]
pub struct BadLine {
    /// 1-based line number in the output.
    pub line: usize,
    /// The parse error.
    pub error: String,
    /// The line as the teacher wrote it.
    pub text: String,
}

/// The conversations found in one output.
#[derive(Debug, Clone, Default)]
pub struct ParsedOutput {
    /// Conversations, in output order.
    pub conversations: Vec<Conversation>,
    /// Lines that started a conversation object but did not parse.
    pub bad_lines: Vec<BadLine>,
}

/// Why an output holds no conversation; each is a reason to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputProblem {
    /// Nothing but white space.
    Empty,
    /// The teacher answered with a plan; the marker found.
    PlanningMode(String),
    /// Text, but no line with `{"messages"` that parsed.
    NoConversations,
}

impl std::fmt::Display for OutputProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutputProblem::Empty => f.write_str("empty output"),
            OutputProblem::PlanningMode(m) => write!(f, "planning-mode output ({m:?})"),
            OutputProblem::NoConversations => {
                f.write_str("no parsable {\"messages\" line in the output")
            }
        }
    }
}

/// Parses a teacher's output; `planning_markers` are the texts that mean planning mode.
pub fn parse_output(
    text: &str,
    planning_markers: &[String],
) -> Result<ParsedOutput, OutputProblem> {
    if text.trim().is_empty() {
        return Err(OutputProblem::Empty);
    }
    let mut out = ParsedOutput::default();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with("```") {
            continue;
        }
        let start = if line.starts_with('{') {
            Some(0)
        } else {
            line.find("{\"messages\"")
        };
        let Some(start) = start else { continue };
        let candidate = line[start..].trim_end_matches(',');
        match Conversation::from_json(candidate) {
            Ok(c) => out.conversations.push(c),
            Err(e) => out.bad_lines.push(BadLine {
                line: i + 1,
                error: e.to_string(),
                text: raw.to_string(),
            }),
        }
    }
    if out.conversations.is_empty() {
        if let Some(m) = planning_markers.iter().find(|m| text.contains(m.as_str())) {
            return Err(OutputProblem::PlanningMode(m.clone()));
        }
        return Err(OutputProblem::NoConversations);
    }
    Ok(out)
}

/// Replaces the conversation's system prompt with the production prompt (inserting a
/// system message first when there is none), and sets its `category` and `source` fields.
pub fn prepare(
    mut conversation: Conversation,
    production_prompt: &str,
    category: &str,
    source: &str,
) -> Conversation {
    match conversation
        .messages
        .iter_mut()
        .find(|m| m.role == Role::System)
    {
        Some(m) => m.content = qatflow_core::Nullable::Value(production_prompt.to_string()),
        None => conversation
            .messages
            .insert(0, Message::text(Role::System, production_prompt)),
    }
    conversation
        .extra
        .insert("category".into(), Value::String(category.to_string()));
    conversation
        .extra
        .insert("source".into(), Value::String(source.to_string()));
    conversation
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"messages":[{"role":"system","content":"short"},{"role":"user","content":"hi"},{"role":"assistant","content":"<think>\n</think>\nHello."}]}"#;

    fn markers() -> Vec<String> {
        vec!["Plan is ready".to_string()]
    }

    #[test]
    fn fences_prose_and_bad_lines() {
        let text = format!(
            "Here you go:\n```jsonl\n{LINE}\n{{\"messages\": [{{\"role\"\n  {LINE},\n```\n"
        );
        let p = parse_output(&text, &markers()).unwrap();
        assert_eq!(p.conversations.len(), 2);
        assert_eq!(p.bad_lines.len(), 1);
        assert_eq!(p.bad_lines[0].line, 4);
    }

    #[test]
    fn problems_are_classified() {
        assert_eq!(
            parse_output(" \n", &markers()).unwrap_err(),
            OutputProblem::Empty
        );
        assert_eq!(
            parse_output(
                "I wrote a plan.\nPlan is ready for your review.",
                &markers()
            )
            .unwrap_err(),
            OutputProblem::PlanningMode("Plan is ready".into())
        );
        assert_eq!(
            parse_output("Sure, here are some ideas.", &markers()).unwrap_err(),
            OutputProblem::NoConversations
        );
        assert_eq!(
            parse_output("{\"messages\": [", &markers()).unwrap_err(),
            OutputProblem::NoConversations
        );
    }

    #[test]
    fn prepare_injects_the_production_prompt() {
        let c = Conversation::from_json(LINE).unwrap();
        let p = prepare(c, "FULL PROMPT", "topic_switch", "offline");
        assert_eq!(p.system_prompt(), Some("FULL PROMPT"));
        assert_eq!(p.extra_str("category"), Some("topic_switch"));
        assert_eq!(p.extra_str("source"), Some("offline"));
        let no_sys = Conversation::from_json(
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"ok"}]}"#,
        )
        .unwrap();
        let p = prepare(no_sys, "FULL", "c", "s");
        assert_eq!(p.messages.len(), 3);
        assert_eq!(p.messages[0].role, Role::System);
    }
}
