//! Nothing a conversation says may vanish in rendering.
//!
//! Two halves:
//! - [`hermes_fallback`] rewrites a conversation for a chat template that does not render
//!   tool calls or a tool list itself (SmolLM2's renders only `content`): assistant tool calls
//!   become Hermes `<tool_call>{"name": ..., "arguments": ...}</tool_call>` text in the
//!   assistant turn (the form the server's parser reads back), and the tool list becomes a
//!   Hermes `<tools>` block in the system message. Tool results keep their `tool` turn.
//! - [`audit_render`] checks one render against the conversation: every assistant message's
//!   reply text and every tool call (name and argument keys) must lie inside that message's
//!   loss-masked span, and every tool result must appear in the rendered context. A template
//!   that drops any of them is an error naming the message, never a silent loss.

use std::ops::Range;

use serde_json::{Map, Value};

use crate::text::pyjson::{self, DumpOptions};

/// A conversation part the render dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("message {message} ({role}): {what} does not appear in the rendered {place}; the chat template drops it, so the model would never see or learn it (use a template that renders it, or let qatflow's Hermes fallback render tool calls)")]
pub struct Vanished {
    /// Index of the message in the conversation.
    pub message: usize,
    /// Its role.
    pub role: String,
    /// What is missing (e.g. `the reply text "..."`, `tool call 0's name "web_search"`).
    pub what: String,
    /// Where it should have been (`loss-masked assistant turn` or `conversation`).
    pub place: &'static str,
}

/// True when the template source uses the identifier `name` (not as part of a longer
/// identifier): `tools` is not found in `tool_calls`, nor in `has_tools`.
fn uses_identifier(source: &str, name: &str) -> bool {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    source.match_indices(name).any(|(i, _)| {
        let before = source[..i].chars().next_back();
        let after = source[i + name.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

/// What a template renders of the tool protocol by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolSupport {
    /// The template reads assistant `tool_calls`.
    pub tool_calls: bool,
    /// The template reads the `tools` list.
    pub tools: bool,
}

impl ToolSupport {
    /// Reads a template's source.
    pub fn of_source(source: &str) -> Self {
        ToolSupport {
            tool_calls: uses_identifier(source, "tool_calls"),
            tools: uses_identifier(source, "tools"),
        }
    }
}

/// One tool call in the Hermes form Qwen3's template writes:
/// `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`.
pub fn hermes_call(name: &str, arguments: &Value) -> String {
    let options = DumpOptions::default();
    format!(
        "<tool_call>\n{{\"name\": {}, \"arguments\": {}}}\n</tool_call>",
        pyjson::dumps(&Value::String(name.to_string()), &options),
        pyjson::dumps(arguments, &options)
    )
}

/// The system-prompt block that lists tools in Hermes form (Qwen3's wording).
pub fn hermes_tools_block(tools: &[Value]) -> String {
    let options = DumpOptions::default();
    let mut out = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for tool in tools {
        out.push('\n');
        out.push_str(&pyjson::dumps(tool, &options));
    }
    out.push_str("\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>");
    out
}

/// The name and arguments (parsed when given as a JSON string) of a tool call in OpenAI
/// form (`{"function": {"name", "arguments"}}`) or flat (`{"name", "arguments"}`).
fn call_parts(call: &Value) -> (String, Value) {
    let f = call.get("function").unwrap_or(call);
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let arguments = match f.get("arguments") {
        Some(Value::String(text)) => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
        }
        Some(v) => v.clone(),
        None => Value::Object(Map::new()),
    };
    (name, arguments)
}

/// The text of a `content` field: a string, or the `text` of a list of parts.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// Rewrites `messages` (and returns the tools to pass on) so that a template lacking
/// `support` still shows everything: see the module docs. Messages a template handles are
/// returned unchanged.
pub fn hermes_fallback(
    messages: &[Value],
    tools: Option<&[Value]>,
    support: ToolSupport,
) -> Vec<Value> {
    let mut out: Vec<Value> = messages.to_vec();
    if !support.tool_calls {
        for m in out.iter_mut() {
            let Some(obj) = m.as_object_mut() else {
                continue;
            };
            let calls = match obj.get("tool_calls") {
                Some(Value::Array(calls)) if !calls.is_empty() => calls.clone(),
                _ => continue,
            };
            let mut text = content_text(obj.get("content"));
            for call in &calls {
                if !text.is_empty() {
                    text.push('\n');
                }
                let (name, arguments) = call_parts(call);
                text.push_str(&hermes_call(&name, &arguments));
            }
            obj.insert("content".into(), Value::String(text));
            obj.remove("tool_calls");
        }
    }
    if !support.tools {
        if let Some(tools) = tools.filter(|t| !t.is_empty()) {
            let block = hermes_tools_block(tools);
            match out.first_mut().and_then(Value::as_object_mut) {
                Some(first) if first.get("role").and_then(Value::as_str) == Some("system") => {
                    let text = content_text(first.get("content"));
                    let joined = if text.is_empty() {
                        block
                    } else {
                        format!("{text}\n\n{block}")
                    };
                    first.insert("content".into(), Value::String(joined));
                }
                _ => out.insert(0, serde_json::json!({"role": "system", "content": block})),
            }
        }
    }
    out
}

/// The reply text of an assistant message as a reader sees it: without a leading
/// `<think>...</think>` block, trimmed (templates drop earlier turns' reasoning and trim).
fn visible_reply(content: &str) -> &str {
    match content.rfind("</think>") {
        Some(i) => content[i + "</think>".len()..].trim(),
        None => content.trim(),
    }
}

/// True when `value` (a JSON string) appears in `text` raw or JSON-escaped (as
/// `tojson` writes it, with or without `ensure_ascii`).
fn string_appears(text: &str, value: &str) -> bool {
    let v = Value::String(value.to_string());
    let escaped = |ensure_ascii| {
        let quoted = pyjson::dumps(
            &v,
            &DumpOptions {
                ensure_ascii,
                ..DumpOptions::default()
            },
        );
        quoted[1..quoted.len() - 1].to_string()
    };
    text.contains(value) || text.contains(&escaped(false)) || text.contains(&escaped(true))
}

/// Checks that `rendered` (with `spans`, one loss-masked byte range per assistant message in
/// order) holds everything `messages` says; see the module docs.
pub fn audit_render(
    messages: &[Value],
    rendered: &str,
    spans: &[Range<usize>],
) -> Result<(), Vanished> {
    let mut turn = 0;
    for (index, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        let missing = |what: String, place| Vanished {
            message: index,
            role: role.to_string(),
            what,
            place,
        };
        match role {
            "assistant" => {
                let span = spans.get(turn).cloned().unwrap_or(0..0);
                turn += 1;
                let text = &rendered[span];
                let place = "loss-masked assistant turn";
                let content = content_text(m.get("content"));
                let reply = visible_reply(&content);
                if !reply.is_empty() && !text.contains(reply) {
                    return Err(missing(format!("the reply text {:?}", clip(reply)), place));
                }
                let calls = m.get("tool_calls").and_then(Value::as_array);
                for (ci, call) in calls.into_iter().flatten().enumerate() {
                    let (name, arguments) = call_parts(call);
                    if !name.is_empty() && !text.contains(&name) {
                        return Err(missing(format!("tool call {ci}'s name {name:?}"), place));
                    }
                    for (key, value) in arguments.as_object().into_iter().flatten() {
                        if !text.contains(key.as_str()) {
                            return Err(missing(
                                format!("tool call {ci}'s argument {key:?}"),
                                place,
                            ));
                        }
                        if let Value::String(v) = value {
                            if !string_appears(text, v) {
                                return Err(missing(
                                    format!(
                                        "tool call {ci}'s argument {key:?} value {:?}",
                                        clip(v)
                                    ),
                                    place,
                                ));
                            }
                        }
                    }
                }
            }
            "tool" => {
                let content = content_text(m.get("content"));
                let result = content.trim();
                if !result.is_empty() && !rendered.contains(result) {
                    return Err(missing(
                        format!("the tool result {:?}", clip(result)),
                        "conversation",
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The first 60 characters of `s`, for messages.
fn clip(s: &str) -> String {
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conversation() -> Vec<Value> {
        vec![
            json!({"role": "system", "content": "You are terse."}),
            json!({"role": "user", "content": "Set a timer for five minutes."}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "set_timer", "arguments": "{\"minutes\": 5, \"label\": \"tea\"}"}}]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "Timer set for 5 minutes."}),
            json!({"role": "assistant", "content": "<think>\n</think>\nDone, five minutes."}),
        ]
    }

    #[test]
    fn identifiers_are_matched_whole() {
        let s = ToolSupport::of_source("{% for m in messages %}{{ m.content }}{% endfor %}");
        assert_eq!(
            s,
            ToolSupport {
                tool_calls: false,
                tools: false
            }
        );
        let s = ToolSupport::of_source("{% if message.tool_calls %}{% endif %}{{ has_tools_x }}");
        assert!(s.tool_calls && !s.tools);
        assert!(ToolSupport::of_source("{% if tools %}").tools);
    }

    #[test]
    fn fallback_renders_calls_as_hermes_and_tools_into_the_system_prompt() {
        let tools = [json!({"type": "function", "function": {"name": "set_timer"}})];
        let out = hermes_fallback(
            &conversation(),
            Some(&tools),
            ToolSupport {
                tool_calls: false,
                tools: false,
            },
        );
        assert_eq!(
            out[2]["content"],
            "<tool_call>\n{\"name\": \"set_timer\", \"arguments\": {\"minutes\": 5, \"label\": \"tea\"}}\n</tool_call>"
        );
        assert!(out[2].get("tool_calls").is_none());
        let system = out[0]["content"].as_str().unwrap();
        assert!(system.starts_with("You are terse.\n\n# Tools"), "{system}");
        assert!(
            system.contains("{\"type\": \"function\", \"function\": {\"name\": \"set_timer\"}}")
        );
        assert_eq!(out[3], conversation()[3], "tool results keep their turn");
        // A template that renders both gets the conversation unchanged.
        let same = hermes_fallback(
            &conversation(),
            Some(&tools),
            ToolSupport {
                tool_calls: true,
                tools: true,
            },
        );
        assert_eq!(same, conversation());
    }

    #[test]
    fn content_and_calls_are_joined_with_a_newline() {
        let m = [
            json!({"role": "assistant", "content": "Checking.", "tool_calls": [
            {"function": {"name": "a", "arguments": {}}}, {"function": {"name": "b", "arguments": "{}"}}]}),
        ];
        let out = hermes_fallback(
            &m,
            None,
            ToolSupport {
                tool_calls: false,
                tools: true,
            },
        );
        assert_eq!(
            out[0]["content"],
            "Checking.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>"
        );
    }

    /// Renders like SmolLM2's template: `<|im_start|>role\ncontent<|im_end|>\n` per message.
    fn chatml(messages: &[Value]) -> (String, Vec<Range<usize>>) {
        let mut out = String::new();
        let mut spans = Vec::new();
        for m in messages {
            let role = m["role"].as_str().unwrap();
            out.push_str(&format!("<|im_start|>{role}\n"));
            let start = out.len();
            out.push_str(m["content"].as_str().unwrap_or_default());
            out.push_str("<|im_end|>");
            if role == "assistant" {
                spans.push(start..out.len());
            }
            out.push('\n');
        }
        (out, spans)
    }

    #[test]
    fn audit_catches_a_dropped_tool_call_and_passes_the_fallback() {
        let conv = conversation();
        let (dropped, spans) = chatml(&conv);
        let err = audit_render(&conv, &dropped, &spans).unwrap_err();
        assert_eq!(err.message, 2);
        assert!(err.what.contains("set_timer"), "{err}");
        assert!(err.to_string().contains("message 2 (assistant)"), "{err}");
        let fixed = hermes_fallback(
            &conv,
            None,
            ToolSupport {
                tool_calls: false,
                tools: false,
            },
        );
        let (rendered, spans) = chatml(&fixed);
        audit_render(&conv, &rendered, &spans).unwrap();
    }

    #[test]
    fn audit_names_a_dropped_reply_and_tool_result() {
        let conv = conversation();
        let (rendered, spans) = chatml(&conv[..2]);
        let mut short = conv[..2].to_vec();
        short.push(json!({"role": "assistant", "content": "Five minutes."}));
        let err = audit_render(&short, &rendered, &spans).unwrap_err();
        assert_eq!((err.message, err.what.contains("Five minutes.")), (2, true));
        let mut with_tool = conv[..2].to_vec();
        with_tool.push(json!({"role": "tool", "content": "42 degrees"}));
        let err = audit_render(&with_tool, &rendered, &spans).unwrap_err();
        assert_eq!((err.message, err.place), (2, "conversation"));
    }

    #[test]
    fn reasoning_of_earlier_turns_may_be_dropped_but_not_the_reply() {
        let conv = vec![
            json!({"role": "user", "content": "q"}),
            json!({"role": "assistant", "content": "<think>long reasoning</think>\n\nThe answer."}),
        ];
        let rendered =
            "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nThe answer.<|im_end|>\n";
        let start = rendered.find("The answer").unwrap();
        let reply = start..rendered.len() - 1;
        audit_render(&conv, rendered, std::slice::from_ref(&reply)).unwrap();
        // The reply outside the span (e.g. a mask off by a turn) is caught.
        let before = 0..start;
        assert!(audit_render(&conv, rendered, std::slice::from_ref(&before)).is_err());
    }

    #[test]
    fn escaped_string_arguments_are_found() {
        let conv = vec![json!({"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "say", "arguments": {"text": "He said \"hi\" — ok"}}}]})];
        let text = hermes_call("say", &json!({"text": "He said \"hi\" — ok"}));
        let all = 0..text.len();
        audit_render(&conv, &text, std::slice::from_ref(&all)).unwrap();
    }
}
