//! Per-conversation checks. Each finding names its [`Check`] verbatim (`markdown`,
//! `verbose`, …), the message it was found in, and what was found.
//!
//! Text checks (`markdown`, `emoji`, `trailing_question`, `verbose`) look at assistant
//! replies with the leading think block removed; `think_prefix` looks at the raw reply.

use crate::profile::GateProfile;
use crate::text;
use qatflow_core::{Conversation, Nullable, Role};
use serde::Serialize;
use std::collections::HashSet;
use std::fmt;

/// The name of a per-conversation check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// The line does not parse as JSON (or is not UTF-8, or too long).
    InvalidJson,
    /// The JSON is not a valid conversation (unknown role, missing content, …).
    Schema,
    /// Markdown in an assistant reply.
    Markdown,
    /// An emoji in an assistant reply.
    Emoji,
    /// The final assistant reply ends with `?`.
    TrailingQuestion,
    /// An assistant reply has more sentences than allowed.
    Verbose,
    /// An assistant text reply does not start with the think prefix.
    ThinkPrefix,
    /// The system prompt is shorter than the profile's minimum.
    SystemPromptShort,
    /// A tool call has non-object arguments, an unknown tool name or no id.
    ToolCallMalformed,
    /// A tool call has no later `tool` message with its id.
    ToolResultMissing,
}

impl Check {
    /// Every check, in report order.
    pub const ALL: [Check; 10] = [
        Check::InvalidJson,
        Check::Schema,
        Check::Markdown,
        Check::Emoji,
        Check::TrailingQuestion,
        Check::Verbose,
        Check::ThinkPrefix,
        Check::SystemPromptShort,
        Check::ToolCallMalformed,
        Check::ToolResultMissing,
    ];

    /// The check's name as used in all output.
    pub fn name(self) -> &'static str {
        match self {
            Check::InvalidJson => "invalid_json",
            Check::Schema => "schema",
            Check::Markdown => "markdown",
            Check::Emoji => "emoji",
            Check::TrailingQuestion => "trailing_question",
            Check::Verbose => "verbose",
            Check::ThinkPrefix => "think_prefix",
            Check::SystemPromptShort => "system_prompt_short",
            Check::ToolCallMalformed => "tool_call_malformed",
            Check::ToolResultMissing => "tool_result_missing",
        }
    }

    /// The check with this name.
    pub fn from_name(name: &str) -> Option<Check> {
        Check::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One problem found in a conversation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// Which check found it.
    pub check: Check,
    /// 0-based index of the message, when the problem is in one message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<usize>,
    /// What was found, for humans.
    pub detail: String,
}

/// Counts the dataset gates need from one conversation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConversationStats {
    /// Assistant messages with text content.
    pub text_replies: u32,
    /// Of those, how many start with the think prefix.
    pub think_prefixed_replies: u32,
    /// Of those, how many have more sentences than allowed.
    pub verbose_replies: u32,
    /// Whether any assistant message calls a tool.
    pub has_tool_calls: bool,
    /// Length of the system prompt in characters (0 when there is none).
    pub system_prompt_chars: u64,
}

/// The checks' verdict on one conversation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConversationReport {
    /// Everything found, in message order.
    pub findings: Vec<Finding>,
    /// Counts for the dataset gates.
    pub stats: ConversationStats,
}

impl ConversationReport {
    /// The distinct checks that flagged this conversation, in report order.
    pub fn flags(&self) -> Vec<Check> {
        let mut flags: Vec<Check> = self.findings.iter().map(|f| f.check).collect();
        flags.sort();
        flags.dedup();
        flags
    }

    /// True when the conversation can be used at all (it parsed and its schema is valid).
    pub fn is_usable(&self) -> bool {
        !self
            .findings
            .iter()
            .any(|f| matches!(f.check, Check::InvalidJson | Check::Schema))
    }

    /// True when no check flagged anything.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    fn push(&mut self, check: Check, message: Option<usize>, detail: impl Into<String>) {
        self.findings.push(Finding {
            check,
            message,
            detail: detail.into(),
        });
    }
}

/// The checks, configured from a gate profile.
#[derive(Debug, Clone)]
pub struct Checker {
    think_prefix: String,
    max_sentences: usize,
    min_system_prompt_chars: Option<u64>,
    allowed_tools: Option<HashSet<String>>,
}

impl Checker {
    /// Configures the checks from a profile.
    pub fn new(profile: &GateProfile) -> Checker {
        let allowed = &profile.tools.allowed;
        Checker {
            think_prefix: profile.checks.think_prefix.clone(),
            max_sentences: profile.checks.max_sentences,
            min_system_prompt_chars: profile.gates.min_system_prompt_chars,
            allowed_tools: (!allowed.is_empty()).then(|| allowed.iter().cloned().collect()),
        }
    }

    /// Parses and checks one JSONL line. Returns the conversation when it parsed.
    pub fn check_line(&self, line: &str) -> (Option<Conversation>, ConversationReport) {
        match Conversation::from_json(line) {
            Ok(c) => {
                let report = self.check(&c);
                (Some(c), report)
            }
            Err(e) => {
                let mut report = ConversationReport::default();
                let check = match e.classify() {
                    serde_json::error::Category::Data => Check::Schema,
                    _ => Check::InvalidJson,
                };
                report.push(check, None, e.to_string());
                (None, report)
            }
        }
    }

    /// Runs every check on a parsed conversation.
    pub fn check(&self, c: &Conversation) -> ConversationReport {
        let mut r = ConversationReport::default();
        if c.messages.is_empty() {
            r.push(Check::Schema, None, "`messages` is empty");
            return r;
        }
        self.check_schema(c, &mut r);
        self.check_tools(c, &mut r);
        self.check_replies(c, &mut r);
        let chars = c.system_prompt().map_or(0, |p| p.chars().count() as u64);
        r.stats.system_prompt_chars = chars;
        if let Some(min) = self.min_system_prompt_chars {
            if chars < min {
                r.push(
                    Check::SystemPromptShort,
                    c.messages.iter().position(|m| m.role == Role::System),
                    format!(
                        "system prompt has {chars} characters, the profile needs at least {min}"
                    ),
                );
            }
        }
        r.findings.sort_by_key(|f| (f.message, f.check));
        r
    }

    fn check_schema(&self, c: &Conversation, r: &mut ConversationReport) {
        for (i, m) in c.messages.iter().enumerate() {
            let content_missing = !matches!(m.content, Nullable::Value(_));
            match &m.role {
                Role::Other(role) => r.push(
                    Check::Schema,
                    Some(i),
                    format!("unknown role `{role}` (expected system, user, assistant or tool)"),
                ),
                Role::Assistant if content_missing && !m.has_tool_calls() => r.push(
                    Check::Schema,
                    Some(i),
                    "assistant message has neither text content nor tool_calls",
                ),
                Role::System | Role::User | Role::Tool if content_missing => r.push(
                    Check::Schema,
                    Some(i),
                    format!("{} message without text content", m.role.as_str()),
                ),
                _ => {}
            }
            if m.role == Role::Tool && m.tool_call_id.as_deref().is_none_or(str::is_empty) {
                r.push(Check::Schema, Some(i), "tool message without tool_call_id");
            }
            if m.role != Role::Assistant && m.tool_calls.is_some() {
                r.push(
                    Check::Schema,
                    Some(i),
                    format!("tool_calls on a {} message", m.role.as_str()),
                );
            }
        }
        if !c.messages.iter().any(|m| m.role == Role::Assistant) {
            r.push(Check::Schema, None, "no assistant message");
        }
    }

    fn check_tools(&self, c: &Conversation, r: &mut ConversationReport) {
        for (i, m) in c.messages.iter().enumerate() {
            if m.role != Role::Assistant {
                continue;
            }
            for call in m.tool_calls.iter().flatten() {
                r.stats.has_tool_calls = true;
                let name = &call.function.name;
                let id = call.id.as_deref().filter(|id| !id.is_empty());
                if id.is_none() {
                    r.push(
                        Check::ToolCallMalformed,
                        Some(i),
                        format!("call of `{name}` has no id"),
                    );
                }
                if let Some(kind) = call.kind.as_deref().filter(|k| *k != "function") {
                    r.push(
                        Check::ToolCallMalformed,
                        Some(i),
                        format!("call of `{name}` has type `{kind}`, expected `function`"),
                    );
                }
                if let Some(allowed) = &self.allowed_tools {
                    if !allowed.contains(name) {
                        r.push(
                            Check::ToolCallMalformed,
                            Some(i),
                            format!("unknown tool `{name}`"),
                        );
                    }
                }
                match serde_json::from_str::<serde_json::Value>(&call.function.arguments) {
                    Ok(serde_json::Value::Object(_)) => {}
                    Ok(other) => r.push(
                        Check::ToolCallMalformed,
                        Some(i),
                        format!(
                            "arguments of `{name}` are JSON {}, not an object",
                            json_kind(&other)
                        ),
                    ),
                    Err(e) => r.push(
                        Check::ToolCallMalformed,
                        Some(i),
                        format!("arguments of `{name}` are not valid JSON: {e}"),
                    ),
                }
                if let Some(id) = id {
                    let answered = c.messages[i + 1..].iter().any(|later| {
                        later.role == Role::Tool && later.tool_call_id.as_deref() == Some(id)
                    });
                    if !answered {
                        r.push(
                            Check::ToolResultMissing,
                            Some(i),
                            format!(
                                "call `{id}` of `{name}` has no later tool message with its id"
                            ),
                        );
                    }
                }
            }
        }
    }

    fn check_replies(&self, c: &Conversation, r: &mut ConversationReport) {
        let mut last_reply: Option<(usize, &str)> = None;
        for (i, m) in c.messages.iter().enumerate() {
            if m.role != Role::Assistant {
                continue;
            }
            let Some(raw) = m.content_str().filter(|t| !t.trim().is_empty()) else {
                continue;
            };
            r.stats.text_replies += 1;
            if raw.starts_with(&self.think_prefix) {
                r.stats.think_prefixed_replies += 1;
            } else {
                r.push(
                    Check::ThinkPrefix,
                    Some(i),
                    format!("reply does not start with {:?}", self.think_prefix),
                );
            }
            let reply = text::strip_think(raw);
            if let Some(kind) = text::find_markdown(reply) {
                r.push(
                    Check::Markdown,
                    Some(i),
                    format!("markdown: {}", kind.describe()),
                );
            }
            if let Some(e) = text::find_emoji(reply) {
                r.push(
                    Check::Emoji,
                    Some(i),
                    format!("emoji {e} (U+{:04X})", e as u32),
                );
            }
            let sentences = text::count_sentences(reply);
            if sentences > self.max_sentences {
                r.stats.verbose_replies += 1;
                r.push(
                    Check::Verbose,
                    Some(i),
                    format!(
                        "{sentences} sentences, at most {} allowed",
                        self.max_sentences
                    ),
                );
            }
            last_reply = Some((i, reply));
        }
        if let Some((i, reply)) = last_reply {
            if reply.trim_end().ends_with('?') {
                r.push(
                    Check::TrailingQuestion,
                    Some(i),
                    "final reply ends with `?`",
                );
            }
        }
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PREFIX: &str = "<think>\n</think>\n";

    fn profile() -> GateProfile {
        let mut p = GateProfile::builtin("v4").unwrap();
        p.gates.min_system_prompt_chars = Some(20);
        p
    }

    fn sys() -> serde_json::Value {
        json!({"role": "system", "content": "You are Ada, a voice assistant."})
    }

    fn reply(text: &str) -> serde_json::Value {
        json!({"role": "assistant", "content": format!("{PREFIX}{text}")})
    }

    fn conv(messages: Vec<serde_json::Value>) -> String {
        json!({ "messages": messages }).to_string()
    }

    fn flags_of(line: &str) -> Vec<&'static str> {
        let (_, report) = Checker::new(&profile()).check_line(line);
        report.flags().into_iter().map(Check::name).collect()
    }

    fn clean(text: &str) -> String {
        conv(vec![
            sys(),
            json!({"role": "user", "content": "hi"}),
            reply(text),
        ])
    }

    fn tool_conv(call: serde_json::Value, answered_id: Option<&str>) -> String {
        let mut m = vec![
            sys(),
            json!({"role": "user", "content": "weather?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [call]}),
        ];
        if let Some(id) = answered_id {
            m.push(json!({"role": "tool", "tool_call_id": id, "content": "22 C"}));
        }
        m.push(reply("It is 22 degrees."));
        conv(m)
    }

    fn call(id: &str, name: &str, args: &str) -> serde_json::Value {
        json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
    }

    #[test]
    fn a_clean_conversation_has_no_flags() {
        assert!(flags_of(&clean("Water is H2O. It boils at 100.0 degrees.")).is_empty());
        let ok = tool_conv(call("c1", "get_weather", r#"{"city": "Pune"}"#), Some("c1"));
        assert!(flags_of(&ok).is_empty());
        let (_, r) = Checker::new(&profile()).check_line(&ok);
        assert!(r.stats.has_tool_calls);
        assert_eq!(r.stats.text_replies, 1);
        assert_eq!(r.stats.think_prefixed_replies, 1);
    }

    #[test]
    fn invalid_json() {
        assert_eq!(
            flags_of(r#"{"messages": [{"role": "user""#),
            ["invalid_json"]
        );
        assert_eq!(flags_of("not json"), ["invalid_json"]);
    }

    #[test]
    fn schema() {
        assert_eq!(flags_of(r#"{"messages": []}"#), ["schema"]);
        assert_eq!(flags_of(r#"{"msgs": []}"#), ["schema"]);
        assert_eq!(
            flags_of(r#"{"messages": [{"role": "user", "content": 5}]}"#),
            ["schema"]
        );
        let unknown_role = conv(vec![
            sys(),
            json!({"role": "narrator", "content": "x"}),
            reply("Hi."),
        ]);
        assert_eq!(flags_of(&unknown_role), ["schema"]);
        let missing = conv(vec![sys(), json!({"role": "user"}), reply("Hi.")]);
        assert_eq!(flags_of(&missing), ["schema"]);
        let tool_no_id = conv(vec![
            sys(),
            json!({"role": "tool", "content": "x"}),
            reply("Hi."),
        ]);
        assert_eq!(flags_of(&tool_no_id), ["schema"]);
        let no_assistant = conv(vec![sys(), json!({"role": "user", "content": "x"})]);
        assert_eq!(flags_of(&no_assistant), ["schema"]);
        let empty_assistant = conv(vec![sys(), json!({"role": "assistant", "content": null})]);
        assert_eq!(flags_of(&empty_assistant), ["schema"]);
    }

    #[test]
    fn markdown() {
        assert_eq!(flags_of(&clean("Here is **bold** news.")), ["markdown"]);
        assert_eq!(flags_of(&clean("Steps:\n1. Boil water.")), ["markdown"]);
        assert!(flags_of(&clean("Prices rose 2.5 - 3 percent.")).is_empty());
    }

    #[test]
    fn emoji() {
        assert_eq!(flags_of(&clean("Great news \u{1F389}.")), ["emoji"]);
        assert!(flags_of(&clean("Great news, Namaskara.")).is_empty());
    }

    #[test]
    fn trailing_question() {
        assert_eq!(
            flags_of(&clean("Done. Anything else?")),
            ["trailing_question"]
        );
        // Only the final reply counts.
        let earlier_question = conv(vec![
            sys(),
            json!({"role": "user", "content": "a"}),
            reply("Which city?"),
            json!({"role": "user", "content": "Pune"}),
            reply("It is sunny in Pune."),
        ]);
        assert!(flags_of(&earlier_question).is_empty());
    }

    #[test]
    fn verbose_and_the_decimal_rule() {
        assert_eq!(flags_of(&clean("One. Two. Three.")), ["verbose"]);
        assert!(flags_of(&clean(
            "NVIDIA is at $142.50, up 2.3% today. Volume is 10.0 million."
        ))
        .is_empty());
    }

    #[test]
    fn think_prefix() {
        let no_prefix = conv(vec![
            sys(),
            json!({"role": "user", "content": "a"}),
            json!({"role": "assistant", "content": "Hello."}),
        ]);
        assert_eq!(flags_of(&no_prefix), ["think_prefix"]);
        // Text checks ignore the think block: markdown inside it is not flagged.
        let thinking = conv(vec![
            sys(),
            json!({"role": "user", "content": "a"}),
            json!({"role": "assistant", "content": "<think>\n**plan**\n</think>\nHello."}),
        ]);
        assert_eq!(flags_of(&thinking), ["think_prefix"]);
    }

    #[test]
    fn system_prompt_short() {
        let short = conv(vec![
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "user", "content": "a"}),
            reply("Ok."),
        ]);
        assert_eq!(flags_of(&short), ["system_prompt_short"]);
        let none = conv(vec![json!({"role": "user", "content": "a"}), reply("Ok.")]);
        assert_eq!(flags_of(&none), ["system_prompt_short"]);
    }

    #[test]
    fn tool_call_malformed() {
        for bad in [
            call("c1", "get_weather", r#"["Pune"]"#),
            call("c1", "get_weather", r#"{"city": "Pune""#),
            call("c1", "launch_rockets", "{}"),
            json!({"id": "c1", "type": "retrieval", "function": {"name": "get_weather", "arguments": "{}"}}),
        ] {
            assert_eq!(
                flags_of(&tool_conv(bad.clone(), Some("c1"))),
                ["tool_call_malformed"],
                "{bad}"
            );
        }
        let no_id =
            json!({"type": "function", "function": {"name": "get_weather", "arguments": "{}"}});
        assert_eq!(flags_of(&tool_conv(no_id, None)), ["tool_call_malformed"]);
    }

    #[test]
    fn tool_result_missing() {
        let c = tool_conv(call("c1", "get_weather", "{}"), None);
        assert_eq!(flags_of(&c), ["tool_result_missing"]);
        let wrong_id = tool_conv(call("c1", "get_weather", "{}"), Some("c2"));
        assert_eq!(flags_of(&wrong_id), ["tool_result_missing"]);
    }

    #[test]
    fn check_names_round_trip() {
        for c in Check::ALL {
            assert_eq!(Check::from_name(c.name()), Some(c));
            assert_eq!(serde_json::to_value(c).unwrap(), json!(c.name()));
        }
    }
}
