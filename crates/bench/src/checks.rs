//! The checks of one response. Markdown, emoji, sentence counting (`verbose`) and the
//! trailing question use the data gates' definitions (`qatflow_gates::text`, with the gate
//! profile's `max_sentences`), and tool calls are checked with the gates'
//! `tool_call_malformed` rule (known name, JSON-object arguments) plus the tool schema's
//! required fields. Checks that only a served response can fail:
//!
//! - `think_leak`: `<think>` or `</think>` in the content (thinking the server did not
//!   separate reaches the speech engine);
//! - `empty_reply`: neither text nor a tool call (all tokens spent thinking);
//! - `tool_call`: the expected tool was called with the required and expected arguments;
//! - `tool_call_in_text`: a call written into the content (`<tool_call>`, `<function=`)
//!   instead of the API's `tool_calls`;
//! - `unexpected_tool_call`: a tool call where a text answer was expected;
//! - `answer`: the reply contains one of the expected answers as a whole word.

use crate::client::Sample;
use crate::suite::Prompt;
use qatflow_gates::text;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One problem found in a response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// The check's name (see [`crate::suite::CHECK_NAMES`]).
    pub check: String,
    /// What was found.
    pub detail: String,
}

/// What the checks need besides the response.
#[derive(Debug, Clone)]
pub struct CheckContext {
    /// Replies with more sentences are `verbose`.
    pub max_sentences: usize,
    /// The tool set: name → JSON-schema parameters.
    pub tools: BTreeMap<String, serde_json::Value>,
}

fn finding(check: &str, detail: impl Into<String>) -> Finding {
    Finding {
        check: check.to_string(),
        detail: detail.into(),
    }
}

/// True when `needle` occurs in `hay` (case-insensitive) not inside a longer word or number.
pub fn contains_word(hay: &str, needle: &str) -> bool {
    let hay = hay.to_lowercase();
    let needle = needle.to_lowercase();
    if needle.is_empty() {
        return false;
    }
    let word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    let mut from = 0;
    while let Some(pos) = hay[from..].find(&needle) {
        let start = from + pos;
        let end = start + needle.len();
        let before = hay[..start].chars().next_back();
        let after = hay[end..].chars().next();
        // A decimal point followed by a digit continues a number (3.5 is not 3).
        let decimal_after = hay[end..].starts_with('.')
            && hay[end + 1..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit());
        let decimal_before = hay[..start].ends_with('.')
            && hay[..start - 1]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_digit());
        if !word(before) && !word(after) && !decimal_after && !decimal_before {
            return true;
        }
        from = start + hay[start..].chars().next().map_or(1, char::len_utf8);
    }
    false
}

/// Runs every check on `sample`, the response to `prompt`.
pub fn check(prompt: &Prompt, sample: &Sample, ctx: &CheckContext) -> Vec<Finding> {
    let mut out = Vec::new();
    let content = sample.content.as_str();
    for tag in ["<think>", "</think>"] {
        if content.contains(tag) {
            out.push(finding("think_leak", format!("{tag} in the content")));
            break;
        }
    }
    // The text a listener hears: a leaked think block is already counted above.
    let reply = text::strip_think(content).trim();
    if reply.is_empty() && sample.tool_calls.is_empty() {
        let why = if sample.reasoning.is_empty() {
            "no content and no tool call".to_string()
        } else {
            format!(
                "no content and no tool call, {} characters of reasoning",
                sample.reasoning.chars().count()
            )
        };
        out.push(finding("empty_reply", why));
    }
    if let Some(kind) = text::find_markdown(reply) {
        out.push(finding(
            "markdown",
            format!("markdown: {}", kind.describe()),
        ));
    }
    if let Some(e) = text::find_emoji(reply) {
        out.push(finding("emoji", format!("emoji {e} (U+{:04X})", e as u32)));
    }
    let sentences = text::count_sentences(reply);
    if sentences > ctx.max_sentences {
        out.push(finding(
            "verbose",
            format!(
                "{sentences} sentences, at most {} allowed",
                ctx.max_sentences
            ),
        ));
    }
    if reply.ends_with('?') {
        out.push(finding("trailing_question", "reply ends with `?`"));
    }
    for marker in ["<tool_call>", "<function=", "\"arguments\":"] {
        if content.contains(marker) {
            out.push(finding(
                "tool_call_in_text",
                format!("{marker} in the content instead of tool_calls"),
            ));
            break;
        }
    }
    let mut parsed = Vec::new();
    for call in &sample.tool_calls {
        let args = match serde_json::from_str::<serde_json::Value>(&call.arguments) {
            Ok(serde_json::Value::Object(m)) => Some(m),
            Ok(other) => {
                out.push(finding(
                    "tool_call_malformed",
                    format!(
                        "arguments of `{}` are not a JSON object: {other}",
                        call.name
                    ),
                ));
                None
            }
            Err(e) => {
                out.push(finding(
                    "tool_call_malformed",
                    format!(
                        "arguments of `{}` are not valid JSON ({e}): {}",
                        call.name, call.arguments
                    ),
                ));
                None
            }
        };
        match ctx.tools.get(&call.name) {
            None => out.push(finding(
                "tool_call_malformed",
                format!("unknown tool `{}`", call.name),
            )),
            Some(schema) => {
                if let Some(args) = &args {
                    for field in schema["required"].as_array().into_iter().flatten() {
                        let field = field.as_str().unwrap_or_default();
                        if !args.contains_key(field) {
                            out.push(finding(
                                "tool_call_malformed",
                                format!(
                                    "call of `{}` lacks required argument `{field}`",
                                    call.name
                                ),
                            ));
                        }
                    }
                }
            }
        }
        parsed.push((call, args));
    }
    match &prompt.expect_tool {
        Some(expected) => {
            let hit = parsed.iter().find(|(c, _)| c.name == expected.name);
            match hit {
                None => {
                    let got: Vec<&str> =
                        sample.tool_calls.iter().map(|c| c.name.as_str()).collect();
                    out.push(finding(
                        "tool_call",
                        if got.is_empty() {
                            format!("no call of `{}`", expected.name)
                        } else {
                            format!("called {} instead of `{}`", got.join(", "), expected.name)
                        },
                    ));
                }
                Some((_, None)) => out.push(finding(
                    "tool_call",
                    format!("`{}` called with unusable arguments", expected.name),
                )),
                Some((_, Some(args))) => {
                    for field in &expected.required {
                        if !args.contains_key(field) {
                            out.push(finding(
                                "tool_call",
                                format!("`{}` called without `{field}`", expected.name),
                            ));
                        }
                    }
                    for (field, want) in &expected.arguments {
                        let got = match args.get(field) {
                            Some(serde_json::Value::String(s)) => s.clone(),
                            Some(other) => other.to_string(),
                            None => continue,
                        };
                        if !got.to_lowercase().contains(&want.to_lowercase()) {
                            out.push(finding(
                                "tool_call",
                                format!(
                                    "`{}` argument `{field}` is {got:?}, expected it to contain {want:?}",
                                    expected.name
                                ),
                            ));
                        }
                    }
                }
            }
        }
        None if !prompt.allow_tools && !sample.tool_calls.is_empty() => {
            let names: Vec<&str> = sample.tool_calls.iter().map(|c| c.name.as_str()).collect();
            out.push(finding(
                "unexpected_tool_call",
                format!(
                    "called {} where a text answer was expected",
                    names.join(", ")
                ),
            ));
        }
        None => {}
    }
    if !prompt.expect_answer.is_empty()
        && !prompt.expect_answer.iter().any(|a| contains_word(reply, a))
    {
        out.push(finding(
            "answer",
            format!("none of {:?} in the reply", prompt.expect_answer),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ToolCallOut;
    use crate::suite::ExpectedTool;
    use proptest::prelude::*;
    use serde_json::json;

    fn ctx() -> CheckContext {
        let mut tools = BTreeMap::new();
        tools.insert(
            "get_weather".to_string(),
            json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        );
        CheckContext {
            max_sentences: 2,
            tools,
        }
    }

    fn prompt() -> Prompt {
        Prompt {
            id: "p".into(),
            user: Some("q".into()),
            history: vec![],
            expect_tool: None,
            expect_answer: vec![],
            allow_tools: false,
            max_tokens: None,
        }
    }

    fn said(text: &str) -> Sample {
        Sample {
            content: text.into(),
            ..Sample::default()
        }
    }

    fn names(f: &[Finding]) -> Vec<&str> {
        f.iter().map(|f| f.check.as_str()).collect()
    }

    #[test]
    fn text_checks_use_the_gate_definitions() {
        assert!(check(&prompt(), &said("Tokyo is the capital."), &ctx()).is_empty());
        let f = check(
            &prompt(),
            &said("<think>\nlet me see</think>\n**Tokyo**. One. Two. Is that all?"),
            &ctx(),
        );
        assert_eq!(
            names(&f),
            ["think_leak", "markdown", "verbose", "trailing_question"]
        );
        assert_eq!(
            names(&check(&prompt(), &said("Hi \u{1F600}."), &ctx())),
            ["emoji"]
        );
        // 142.50 does not end a sentence (the gates' decimal rule).
        assert!(check(&prompt(), &said("It is at $142.50 now. Up 2.3%."), &ctx()).is_empty());
        let empty = Sample {
            reasoning: "thinking".into(),
            ..Sample::default()
        };
        let f = check(&prompt(), &empty, &ctx());
        assert_eq!(names(&f), ["empty_reply"]);
        assert!(f[0].detail.contains("8 characters of reasoning"), "{f:?}");
    }

    #[test]
    fn tool_calls_are_validated() {
        let mut p = prompt();
        p.expect_tool = Some(ExpectedTool {
            name: "get_weather".into(),
            required: vec!["city".into()],
            arguments: [("city".to_string(), "pune".to_string())].into(),
        });
        let call = |name: &str, args: &str| Sample {
            tool_calls: vec![ToolCallOut {
                id: "c".into(),
                name: name.into(),
                arguments: args.into(),
            }],
            ..Sample::default()
        };
        assert!(check(&p, &call("get_weather", r#"{"city": "Pune"}"#), &ctx()).is_empty());
        let f = check(&p, &call("get_weather", r#"{"city": "Delhi"}"#), &ctx());
        assert_eq!(names(&f), ["tool_call"]);
        assert!(f[0].detail.contains("\"Delhi\""), "{f:?}");
        let f = check(&p, &call("get_weather", "{city: Pune"), &ctx());
        assert_eq!(names(&f), ["tool_call_malformed", "tool_call"]);
        let f = check(&p, &call("get_weather", "{}"), &ctx());
        assert_eq!(names(&f), ["tool_call_malformed", "tool_call"]);
        let f = check(&p, &call("fly", "{}"), &ctx());
        assert_eq!(names(&f), ["tool_call_malformed", "tool_call"]);
        assert!(f[1].detail.contains("called fly instead"), "{f:?}");
        let f = check(
            &p,
            &said("<tool_call>{\"name\": \"get_weather\", \"arguments\": {}}</tool_call>"),
            &ctx(),
        );
        assert_eq!(names(&f), ["tool_call_in_text", "tool_call"]);
        let f = check(
            &prompt(),
            &call("get_weather", r#"{"city": "Pune"}"#),
            &ctx(),
        );
        assert_eq!(names(&f), ["unexpected_tool_call"]);
    }

    #[test]
    fn answers_match_whole_words() {
        assert!(contains_word("It's Tokyo.", "tokyo"));
        assert!(contains_word("You have 3 left.", "3"));
        assert!(!contains_word("You have 30 left.", "3"));
        assert!(!contains_word("It is 3.5 now.", "3"));
        assert!(!contains_word("It is 1.3 now.", "3"));
        assert!(contains_word("That's 3.", "3"));
        assert!(contains_word("forty-eight", "forty-eight"));
        assert!(!contains_word("Parisian", "paris"));
        let mut p = prompt();
        p.expect_answer = vec!["48".into(), "forty-eight".into()];
        assert!(check(&p, &said("It's forty-eight."), &ctx()).is_empty());
        assert_eq!(names(&check(&p, &said("It's 480."), &ctx())), ["answer"]);
    }

    proptest! {
        /// A word is always found in a text made of it between spaces, never inside a
        /// longer word.
        #[test]
        fn word_matching(w in "[a-z0-9]{1,6}", pre in "[a-z ]{0,5}", post in "[a-z ]{0,5}") {
            let spaced = format!("{pre} {w} {post}");
            prop_assert!(contains_word(&spaced, &w));
            let glued = format!("x{w}x");
            prop_assert!(!contains_word(&glued, &w));
        }
    }
}
