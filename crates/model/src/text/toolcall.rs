//! Qwen3.5's XML tool calls (what its chat template renders and the model writes; vLLM's
//! `qwen3_coder` parser reads the same):
//!
//! ```text
//! <tool_call>
//! <function=NAME>
//! <parameter=ARG>
//! VALUE
//! </parameter>
//! </function>
//! </tool_call>
//! ```
//!
//! [`parse_xml_tool_calls`] splits a reply into its text and its calls; a value becomes JSON
//! of the type the tool's schema gives the parameter (strings stay verbatim), or, without a
//! schema, JSON when it parses as JSON and a string otherwise.

use serde_json::{Map, Value};

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct XmlToolCall {
    /// The function name.
    pub name: String,
    /// The arguments object.
    pub arguments: Map<String, Value>,
}

/// A reply split into its text (outside the tool-call blocks, trimmed) and its calls.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedReply {
    /// The reply without its tool-call blocks.
    pub content: String,
    /// The calls in order.
    pub tool_calls: Vec<XmlToolCall>,
}

/// Errors of parsing a tool call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ToolCallError {
    /// A block is not closed or lacks its function tag.
    #[error("tool call {index}: {problem}; expected <tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>")]
    Malformed {
        /// Index of the call in the reply.
        index: usize,
        /// What is wrong.
        problem: String,
    },
}

/// The JSON type the schema of tool `name`'s parameter `arg` declares, from OpenAI-format
/// `tools` (`[{"type": "function", "function": {"name", "parameters": {"properties"}}}]`).
fn declared_type<'a>(tools: &'a [Value], name: &str, arg: &str) -> Option<&'a str> {
    tools
        .iter()
        .map(|t| t.get("function").unwrap_or(t))
        .find(|f| f.get("name").and_then(Value::as_str) == Some(name))?
        .get("parameters")?
        .get("properties")?
        .get(arg)?
        .get("type")?
        .as_str()
}

fn convert(raw: &str, declared: Option<&str>) -> Value {
    match declared {
        Some("string") => Value::String(raw.to_string()),
        Some("integer" | "number" | "boolean" | "object" | "array" | "null") | None => {
            serde_json::from_str(raw).unwrap_or_else(|_| match raw {
                "True" => Value::Bool(true),
                "False" => Value::Bool(false),
                "None" => Value::Null,
                _ => Value::String(raw.to_string()),
            })
        }
        Some(_) => Value::String(raw.to_string()),
    }
}

/// One newline at either end of a value belongs to the format, not the value.
fn strip_one_newline(s: &str) -> &str {
    let s = s.strip_prefix('\n').unwrap_or(s);
    s.strip_suffix('\n').unwrap_or(s)
}

/// Parses the body between `<tool_call>` and `</tool_call>`.
fn parse_call(body: &str, index: usize, tools: &[Value]) -> Result<XmlToolCall, ToolCallError> {
    let bad = |problem: &str| ToolCallError::Malformed {
        index,
        problem: problem.to_string(),
    };
    let start = body
        .find("<function=")
        .ok_or_else(|| bad("no <function=NAME> tag"))?;
    let rest = &body[start + "<function=".len()..];
    let close = rest
        .find('>')
        .ok_or_else(|| bad("<function= tag is not closed"))?;
    let name = rest[..close].trim().to_string();
    if name.is_empty() {
        return Err(bad("empty function name"));
    }
    let mut rest = &rest[close + 1..];
    let end = rest
        .find("</function>")
        .ok_or_else(|| bad("no </function>"))?;
    rest = &rest[..end];
    let mut arguments = Map::new();
    while let Some(p) = rest.find("<parameter=") {
        let after = &rest[p + "<parameter=".len()..];
        let close = after
            .find('>')
            .ok_or_else(|| bad("<parameter= tag is not closed"))?;
        let arg = after[..close].trim().to_string();
        let value_and_rest = &after[close + 1..];
        let end = value_and_rest
            .find("</parameter>")
            .ok_or_else(|| bad(&format!("parameter `{arg}` has no </parameter>")))?;
        let raw = strip_one_newline(&value_and_rest[..end]);
        let value = convert(raw, declared_type(tools, &name, &arg));
        arguments.insert(arg, value);
        rest = &value_and_rest[end + "</parameter>".len()..];
    }
    Ok(XmlToolCall { name, arguments })
}

/// Splits `text` into its content and its XML tool calls; `tools` (OpenAI-format tool
/// definitions, may be empty) give the parameter types.
pub fn parse_xml_tool_calls(text: &str, tools: &[Value]) -> Result<ParsedReply, ToolCallError> {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("<tool_call>") {
        content.push_str(&rest[..start]);
        let body = &rest[start + "<tool_call>".len()..];
        let end = body
            .find("</tool_call>")
            .ok_or_else(|| ToolCallError::Malformed {
                index: calls.len(),
                problem: "no </tool_call>".into(),
            })?;
        calls.push(parse_call(&body[..end], calls.len(), tools)?);
        rest = &body[end + "</tool_call>".len()..];
    }
    content.push_str(rest);
    Ok(ParsedReply {
        content: content.trim().to_string(),
        tool_calls: calls,
    })
}

/// Renders calls the way Qwen3.5's chat template does (objects and arrays as JSON, every
/// other value as its string form), for round trips and tests.
pub fn render_xml_tool_calls(calls: &[XmlToolCall]) -> String {
    let mut out = String::new();
    for (i, call) in calls.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("<tool_call>\n<function={}>\n", call.name));
        for (arg, value) in &call.arguments {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!("<parameter={arg}>\n{text}\n</parameter>\n"));
        }
        out.push_str("</function>\n</tool_call>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn tools() -> Vec<Value> {
        vec![json!({"type": "function", "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string"}, "days": {"type": "integer"},
                "zip": {"type": "string"}
            }}
        }})]
    }

    #[test]
    fn parses_the_templates_format_with_schema_types() {
        let text = "Let me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n<parameter=zip>\n75001\n</parameter>\n</function>\n</tool_call>";
        let r = parse_xml_tool_calls(text, &tools()).unwrap();
        assert_eq!(r.content, "Let me check.");
        assert_eq!(r.tool_calls.len(), 1);
        let c = &r.tool_calls[0];
        assert_eq!(c.name, "get_weather");
        assert_eq!(
            Value::Object(c.arguments.clone()),
            json!({"city": "Paris", "days": 2, "zip": "75001"})
        );
    }

    #[test]
    fn without_a_schema_json_values_are_parsed() {
        let text = "<tool_call>\n<function=f>\n<parameter=a>\n{\"x\": [1, 2]}\n</parameter>\n<parameter=b>\ntwo\nlines\n</parameter>\n<parameter=c>\nTrue\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=g>\n</function>\n</tool_call>";
        let r = parse_xml_tool_calls(text, &[]).unwrap();
        assert_eq!(r.content, "");
        assert_eq!(
            Value::Object(r.tool_calls[0].arguments.clone()),
            json!({"a": {"x": [1, 2]}, "b": "two\nlines", "c": true})
        );
        assert_eq!(r.tool_calls[1].name, "g");
        assert!(r.tool_calls[1].arguments.is_empty());
    }

    #[test]
    fn malformed_calls_say_what_is_missing() {
        let err = parse_xml_tool_calls("<tool_call>\n<function=f>\n", &[]).unwrap_err();
        assert!(err.to_string().contains("no </tool_call>"), "{err}");
        let err = parse_xml_tool_calls(
            "<tool_call>\n<parameter=a>\n1\n</parameter>\n</tool_call>",
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("<function=NAME>"), "{err}");
        assert!(parse_xml_tool_calls("plain answer", &[])
            .unwrap()
            .tool_calls
            .is_empty());
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            "[a-zA-Z][a-zA-Z0-9 ,.!?]{0,20}".prop_map(Value::String),
            any::<i32>().prop_map(|i| json!(i)),
            any::<bool>().prop_map(Value::Bool),
            prop::collection::vec(any::<i16>(), 0..4).prop_map(|v| json!(v)),
        ]
    }

    proptest! {
        #[test]
        fn render_then_parse_round_trips(
            calls in prop::collection::vec(
                ("[a-z_]{1,12}", prop::collection::btree_map("[a-z_]{1,8}", value(), 0..4)),
                1..4,
            ),
            prefix in "[A-Za-z .]{0,30}",
        ) {
            let calls: Vec<XmlToolCall> = calls
                .into_iter()
                .map(|(name, args)| XmlToolCall { name, arguments: args.into_iter().collect() })
                .collect();
            let text = format!("{prefix}\n\n{}", render_xml_tool_calls(&calls));
            let parsed = parse_xml_tool_calls(&text, &[]).unwrap();
            prop_assert_eq!(parsed.content, prefix.trim().to_string());
            // Without a schema, strings that look like JSON come back as JSON: compare with
            // that rule applied.
            let want: Vec<XmlToolCall> = calls
                .iter()
                .map(|c| XmlToolCall {
                    name: c.name.clone(),
                    arguments: c
                        .arguments
                        .iter()
                        .map(|(k, v)| {
                            let v = match v {
                                Value::String(s) => convert(s, None),
                                other => other.clone(),
                            };
                            (k.clone(), v)
                        })
                        .collect(),
                })
                .collect();
            prop_assert_eq!(parsed.tool_calls, want);
        }
    }
}
