//! Tool calls parsed out of generated text, in the two formats qatflow's model families
//! emit: Hermes (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, Qwen3 and
//! SmolLM2-style templates; vLLM's `hermes` parser) and Qwen3.5's XML
//! (`<tool_call><function=NAME><parameter=P>VALUE</parameter></function></tool_call>`;
//! vLLM's `qwen3_coder` parser). A call that does not parse stays in the text and is
//! counted as malformed.

use serde_json::{Map, Value};

/// One parsed tool call.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    /// The function name.
    pub name: String,
    /// The arguments as a JSON object text (what OpenAI's `function.arguments` carries).
    pub arguments: String,
}

/// What a parser made of a generated text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The text outside well-formed calls (malformed calls stay in it), trimmed.
    pub content: String,
    /// The well-formed calls, in order.
    pub calls: Vec<ToolCall>,
    /// How many call blocks did not parse (left in `content`).
    pub malformed: usize,
}

/// Which tool-call format a model family writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolCallFormat {
    /// `<tool_call>{json}</tool_call>` (Qwen3, SmolLM2; vLLM `hermes`).
    Hermes,
    /// `<function=NAME><parameter=P>…</parameter></function>` (Qwen3.5; vLLM `qwen3_coder`).
    QwenXml,
}

impl ToolCallFormat {
    /// Parses `hermes` or `qwen3_coder` / `qwen_xml` (vLLM's parser names and ours).
    pub fn from_name(name: &str) -> Option<ToolCallFormat> {
        match name {
            "hermes" => Some(ToolCallFormat::Hermes),
            "qwen3_coder" | "qwen_xml" | "qwen3_xml" => Some(ToolCallFormat::QwenXml),
            _ => None,
        }
    }

    /// The format a chat template renders tool calls in: Qwen3.5's XML when the template
    /// writes `<function=`, Hermes otherwise.
    pub fn for_template(template_source: &str) -> ToolCallFormat {
        if template_source.contains("<function=") {
            ToolCallFormat::QwenXml
        } else {
            ToolCallFormat::Hermes
        }
    }

    /// Parses `text` in this format; `tools` (OpenAI tool definitions) type the XML
    /// parameters.
    pub fn parse(self, text: &str, tools: Option<&[Value]>) -> Parsed {
        match self {
            ToolCallFormat::Hermes => parse_hermes(text),
            ToolCallFormat::QwenXml => parse_qwen_xml(text, tools),
        }
    }
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Splits `text` into alternating plain text and `<tool_call>` blocks: each block's body
/// (without the tags) and its full source text. An unterminated block runs to the end.
fn blocks(text: &str) -> (Vec<&str>, Vec<(&str, &str)>) {
    let mut plain = Vec::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        plain.push(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        match after.find(CLOSE) {
            Some(end) => {
                calls.push((
                    &after[..end],
                    &rest[start..start + OPEN.len() + end + CLOSE.len()],
                ));
                rest = &after[end + CLOSE.len()..];
            }
            None => {
                calls.push((after, &rest[start..]));
                rest = "";
            }
        }
    }
    plain.push(rest);
    (plain, calls)
}

/// Joins plain text and the source of malformed blocks back into the content.
fn assemble(plain: Vec<&str>, kept: Vec<Option<&str>>) -> String {
    let mut out = String::new();
    for (i, p) in plain.iter().enumerate() {
        out.push_str(p);
        if let Some(Some(src)) = kept.get(i) {
            out.push_str(src);
        }
    }
    out.trim().to_string()
}

/// Parses Hermes tool calls: every `<tool_call>…</tool_call>` whose body is a JSON
/// object with a string `name` and an object `arguments` (or `parameters`) becomes a
/// call; any other block stays in the content and counts as malformed.
pub fn parse_hermes(text: &str) -> Parsed {
    let (plain, raw) = blocks(text);
    let mut calls = Vec::new();
    let mut kept = Vec::new();
    let mut malformed = 0;
    for (body, src) in raw {
        match hermes_call(body) {
            Some(call) => {
                calls.push(call);
                kept.push(None);
            }
            None => {
                malformed += 1;
                kept.push(Some(src));
            }
        }
    }
    Parsed {
        content: assemble(plain, kept),
        calls,
        malformed,
    }
}

fn hermes_call(body: &str) -> Option<ToolCall> {
    let value: Value = serde_json::from_str(body.trim()).ok()?;
    let obj = value.as_object()?;
    let name = obj.get("name")?.as_str()?.trim();
    if name.is_empty() {
        return None;
    }
    let arguments = match obj.get("arguments").or_else(|| obj.get("parameters")) {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v.clone(),
        // Some models write the arguments as a JSON string, as OpenAI transmits them.
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s).ok()? {
            v @ Value::Object(_) => v,
            _ => return None,
        },
        Some(_) => return None,
    };
    Some(ToolCall {
        name: name.to_string(),
        arguments: arguments.to_string(),
    })
}

/// Parses Qwen3.5's XML tool calls. Each `<tool_call>` block must hold one
/// `<function=NAME>…</function>` with `<parameter=P>VALUE</parameter>` entries; bare
/// `<function=…>` blocks outside `<tool_call>` are accepted too (as vLLM's `qwen3_coder`
/// does). Values are typed by the tool's JSON schema when `tools` names the function
/// (`string` stays text; numbers, booleans, objects and arrays are parsed as JSON), and
/// without a schema a value that parses as JSON is taken as such. A block that does not
/// parse stays in the content and counts as malformed.
pub fn parse_qwen_xml(text: &str, tools: Option<&[Value]>) -> Parsed {
    let wrapped = if text.contains(OPEN) {
        text.to_string()
    } else {
        wrap_bare_functions(text)
    };
    let (plain, raw) = blocks(&wrapped);
    let mut calls = Vec::new();
    let mut kept = Vec::new();
    let mut malformed = 0;
    for (body, src) in raw {
        match xml_call(body, tools) {
            Some(call) => {
                calls.push(call);
                kept.push(None);
            }
            None => {
                malformed += 1;
                kept.push(Some(src));
            }
        }
    }
    Parsed {
        content: assemble(plain, kept),
        calls,
        malformed,
    }
}

/// Wraps each bare `<function=…>…</function>` in `<tool_call>` tags.
fn wrap_bare_functions(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("<function=") {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let end = after
            .find("</function>")
            .map_or(after.len(), |e| e + "</function>".len());
        out.push_str(OPEN);
        out.push_str(&after[..end]);
        out.push_str(CLOSE);
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn xml_call(body: &str, tools: Option<&[Value]>) -> Option<ToolCall> {
    let body = body.trim();
    let inner = body.strip_prefix("<function=")?;
    let name_end = inner.find('>')?;
    let name = inner[..name_end].trim();
    if name.is_empty() || name.contains('<') || name.contains('\n') {
        return None;
    }
    let inner = &inner[name_end + 1..];
    let inner = inner.trim_end().strip_suffix("</function>")?;
    let schema = tools.and_then(|t| parameter_schema(t, name));
    let mut args = Map::new();
    let mut rest = inner;
    loop {
        let trimmed = rest.trim_start();
        if trimmed.is_empty() {
            break;
        }
        let p = trimmed.strip_prefix("<parameter=")?;
        let key_end = p.find('>')?;
        let key = p[..key_end].trim();
        if key.is_empty() || key.contains('<') {
            return None;
        }
        let after = &p[key_end + 1..];
        let value_end = after.find("</parameter>")?;
        let raw = strip_one_newline(&after[..value_end]);
        let ty = schema
            .and_then(|s| s.get(key))
            .and_then(|s| s.get("type"))
            .and_then(Value::as_str);
        args.insert(key.to_string(), typed_value(raw, ty));
        rest = &after[value_end + "</parameter>".len()..];
    }
    Some(ToolCall {
        name: name.to_string(),
        arguments: Value::Object(args).to_string(),
    })
}

/// The template writes `\nVALUE\n` between the parameter tags: drop one newline each side.
fn strip_one_newline(s: &str) -> &str {
    let s = s.strip_prefix('\n').unwrap_or(s);
    s.strip_suffix('\n').unwrap_or(s)
}

/// The `properties` of the named function's `parameters` schema.
fn parameter_schema<'a>(tools: &'a [Value], name: &str) -> Option<&'a Map<String, Value>> {
    tools.iter().find_map(|t| {
        let f = t.get("function").unwrap_or(t);
        (f.get("name")?.as_str()? == name)
            .then(|| f.get("parameters")?.get("properties")?.as_object())
            .flatten()
    })
}

fn typed_value(raw: &str, ty: Option<&str>) -> Value {
    match ty {
        Some("string") => Value::String(raw.to_string()),
        Some("boolean") => match raw.trim() {
            "true" | "True" => Value::Bool(true),
            "false" | "False" => Value::Bool(false),
            _ => Value::String(raw.to_string()),
        },
        _ => match raw.trim() {
            // The template writes Python's `None`, `True`, `False` for untyped values.
            "None" | "null" => Value::Null,
            "True" => Value::Bool(true),
            "False" => Value::Bool(false),
            t => serde_json::from_str(t).unwrap_or_else(|_| Value::String(raw.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// What the Qwen3 template renders for a call (the golden text of
    /// `tests/fixtures/templates`, `tools_call_and_response`).
    const HERMES_GOLDEN: &str = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n</tool_call>";
    /// What the Qwen3.5 template renders for the same call.
    const XML_GOLDEN: &str = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>";

    fn weather_tools() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string"}, "days": {"type": "integer"}}}}}),
        ]
    }

    #[test]
    fn hermes_golden_call_parses() {
        let p = parse_hermes(HERMES_GOLDEN);
        assert_eq!(p.content, "");
        assert_eq!(p.malformed, 0);
        assert_eq!(
            p.calls,
            [ToolCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris","days":2}"#.into()
            }]
        );
    }

    #[test]
    fn hermes_keeps_text_and_counts_malformed_calls() {
        let text = format!(
            "Let me check.\n{HERMES_GOLDEN}\n<tool_call>\n{{\"name\": \"x\", \"arguments\": {{oops}}\n</tool_call>"
        );
        let p = parse_hermes(&text);
        assert_eq!(p.calls.len(), 1);
        assert_eq!(p.malformed, 1);
        assert!(p.content.starts_with("Let me check."), "{}", p.content);
        assert!(p.content.contains("{oops}"), "{}", p.content);
        // An unterminated call is malformed unless its body is complete JSON.
        let p = parse_hermes("<tool_call>{\"name\": \"f\", \"arguments\": {}}");
        assert_eq!((p.calls.len(), p.malformed), (1, 0));
        let p = parse_hermes("<tool_call>{\"name\": \"f\", \"argu");
        assert_eq!((p.calls.len(), p.malformed), (0, 1));
        assert_eq!(p.content, "<tool_call>{\"name\": \"f\", \"argu");
        // String arguments (OpenAI wire style) are accepted; arrays are not.
        let p = parse_hermes(r#"<tool_call>{"name": "f", "arguments": "{\"a\": 1}"}</tool_call>"#);
        assert_eq!(p.calls[0].arguments, r#"{"a":1}"#);
        let p = parse_hermes(r#"<tool_call>{"name": "f", "arguments": [1]}</tool_call>"#);
        assert_eq!(p.malformed, 1);
    }

    #[test]
    fn xml_golden_call_parses_with_and_without_schema() {
        let tools = weather_tools();
        for tools in [Some(tools.as_slice()), None] {
            let p = parse_qwen_xml(XML_GOLDEN, tools);
            assert_eq!(p.malformed, 0);
            assert_eq!(p.content, "");
            assert_eq!(p.calls[0].name, "get_weather");
            assert_eq!(p.calls[0].arguments, r#"{"city":"Paris","days":2}"#);
        }
        // A string-typed parameter that looks like a number stays a string.
        let text = "<tool_call>\n<function=get_weather>\n<parameter=city>\n42\n</parameter>\n</function>\n</tool_call>";
        let p = parse_qwen_xml(text, Some(&weather_tools()));
        assert_eq!(p.calls[0].arguments, r#"{"city":"42"}"#);
        let p = parse_qwen_xml(text, None);
        assert_eq!(p.calls[0].arguments, r#"{"city":42}"#);
    }

    #[test]
    fn xml_bare_functions_malformed_blocks_and_multiline_values() {
        let p = parse_qwen_xml(
            "Sure.\n<function=note>\n<parameter=text>\nline 1\nline 2\n</parameter>\n</function>",
            None,
        );
        assert_eq!(p.content, "Sure.");
        assert_eq!(p.calls[0].arguments, r#"{"text":"line 1\nline 2"}"#);
        let bad = "<tool_call>\n<function=f>\n<parameter=a>\n1\n</function>\n</tool_call>";
        let p = parse_qwen_xml(&format!("{XML_GOLDEN}\n{bad}"), None);
        assert_eq!((p.calls.len(), p.malformed), (1, 1));
        assert_eq!(p.content, bad);
        let p = parse_qwen_xml("<tool_call>{\"name\": \"f\"}</tool_call>", None);
        assert_eq!(p.malformed, 1, "Hermes JSON is not the XML format");
    }

    #[test]
    fn format_follows_the_template() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/templates"
        );
        let read = |n: &str| std::fs::read_to_string(format!("{dir}/{n}.jinja")).unwrap();
        assert_eq!(
            ToolCallFormat::for_template(&read("qwen3")),
            ToolCallFormat::Hermes
        );
        assert_eq!(
            ToolCallFormat::for_template(&read("smollm2")),
            ToolCallFormat::Hermes
        );
        for n in ["qwen3_5_think", "qwen3_5_nothink"] {
            assert_eq!(
                ToolCallFormat::for_template(&read(n)),
                ToolCallFormat::QwenXml
            );
        }
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z_][a-z0-9_]{0,12}"
    }

    fn args() -> impl Strategy<Value = Map<String, Value>> {
        let leaf = prop_oneof![
            any::<i32>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            "[a-zA-Z ,.]{1,20}".prop_map(Value::from),
        ];
        proptest::collection::btree_map("[a-z]{1,8}", leaf, 0..4)
            .prop_map(|m| m.into_iter().collect())
    }

    /// Renders a call the way the Qwen3.5 template does.
    fn render_xml(name: &str, args: &Map<String, Value>) -> String {
        let mut s = format!("<tool_call>\n<function={name}>\n");
        for (k, v) in args {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Bool(true) => "True".into(),
                Value::Bool(false) => "False".into(),
                other => other.to_string(),
            };
            s.push_str(&format!("<parameter={k}>\n{v}\n</parameter>\n"));
        }
        s + "</function>\n</tool_call>"
    }

    proptest! {
        #[test]
        fn hermes_round_trips(pre in "[a-zA-Z .]{0,30}", name in name(), args in args()) {
            let call = json!({"name": name, "arguments": args});
            let text = format!("{pre}\n<tool_call>\n{call}\n</tool_call>");
            let p = parse_hermes(&text);
            prop_assert_eq!(p.malformed, 0);
            prop_assert_eq!(p.content, pre.trim());
            prop_assert_eq!(p.calls.len(), 1);
            let got: Value = serde_json::from_str(&p.calls[0].arguments).unwrap();
            prop_assert_eq!(got, Value::Object(args));
            prop_assert_eq!(&p.calls[0].name, &name);
        }

        #[test]
        fn xml_round_trips_with_a_schema(name in name(), args in args()) {
            let properties: Map<String, Value> = args.iter().map(|(k, v)| {
                let ty = match v { Value::String(_) => "string", Value::Bool(_) => "boolean", _ => "integer" };
                (k.clone(), json!({"type": ty}))
            }).collect();
            let tools = [json!({"type": "function", "function": {"name": name,
                "parameters": {"type": "object", "properties": properties}}})];
            let p = parse_qwen_xml(&render_xml(&name, &args), Some(&tools));
            prop_assert_eq!(p.malformed, 0);
            prop_assert_eq!(p.calls.len(), 1);
            let got: Value = serde_json::from_str(&p.calls[0].arguments).unwrap();
            prop_assert_eq!(got, Value::Object(args));
        }

        #[test]
        fn text_without_calls_is_content(text in "[^<]{0,80}") {
            for p in [parse_hermes(&text), parse_qwen_xml(&text, None)] {
                prop_assert!(p.calls.is_empty());
                prop_assert_eq!(p.malformed, 0);
                prop_assert_eq!(p.content.as_str(), text.trim());
            }
        }

        #[test]
        fn arbitrary_text_never_panics_and_loses_nothing(text in ".{0,120}", cut in 0usize..200) {
            // Truncated calls (a generation cut at max_tokens) are kept as text.
            let golden = format!("{HERMES_GOLDEN}{XML_GOLDEN}{text}");
            let cut = golden.char_indices().map(|(i, _)| i).nth(cut).unwrap_or(golden.len());
            for p in [parse_hermes(&golden[..cut]), parse_qwen_xml(&golden[..cut], None)] {
                if p.calls.is_empty() && p.malformed == 0 {
                    prop_assert_eq!(p.content.as_str(), golden[..cut].trim());
                }
            }
            let _ = parse_hermes(&text);
            let _ = parse_qwen_xml(&text, None);
        }
    }
}
