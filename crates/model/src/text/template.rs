//! Hugging Face chat templates rendered with minijinja, byte-identical to transformers'
//! `apply_chat_template` (trim/lstrip blocks, pycompat methods, key order kept,
//! Python-compatible `tojson`, `raise_exception`).

use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, ErrorKind};
use serde_json::{Map, Value};

use crate::text::pyjson::{self, DumpOptions};

const TEMPLATE_NAME: &str = "chat";

/// Errors of loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template source does not parse under minijinja.
    #[error("chat template from {origin} does not compile: {source:#}")]
    Compile {
        /// Where the template came from (a file or "inline source").
        origin: String,
        /// minijinja's parse error.
        source: minijinja::Error,
    },
    /// Rendering failed (a `raise_exception` in the template, or a type error).
    #[error("rendering the chat template failed: {0:#}")]
    Render(#[source] minijinja::Error),
    /// A message is not in OpenAI chat format.
    #[error("message {index}: {problem} (expected OpenAI chat format: {{\"role\": \"system|user|assistant|tool\", \"content\": ...}})")]
    BadMessage {
        /// Index of the message in the conversation.
        index: usize,
        /// What is wrong with it.
        problem: String,
    },
    /// A model directory holds no usable chat template.
    #[error("{path}: {problem}")]
    Config {
        /// The file or directory looked at.
        path: PathBuf,
        /// What is missing or malformed.
        problem: String,
    },
    /// Reading a template file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A compiled chat template plus the special-token variables (`bos_token`, ...) that
/// transformers passes to every render.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    variables: Map<String, Value>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("variables", &self.variables)
            .finish()
    }
}

fn tojson(value: JValue, kwargs: Kwargs) -> Result<JValue, minijinja::Error> {
    let invalid = |msg: String| minijinja::Error::new(ErrorKind::InvalidOperation, msg);
    let mut options = DumpOptions::default();
    if let Some(indent) = kwargs.get::<Option<JValue>>("indent")? {
        if let Some(n) = indent.as_usize() {
            options.indent = Some(" ".repeat(n));
        } else if let Some(s) = indent.as_str() {
            options.indent = Some(s.to_string());
        } else if !indent.is_none() {
            return Err(invalid(format!(
                "tojson: indent must be an integer or string, got {indent}"
            )));
        }
        if options.indent.is_some() {
            options.item_separator = ",".into();
        }
    }
    if let Some(seps) = kwargs.get::<Option<Vec<String>>>("separators")? {
        let [item, key] = <[String; 2]>::try_from(seps)
            .map_err(|_| invalid("tojson: separators must be a pair of strings".into()))?;
        options.item_separator = item;
        options.key_separator = key;
    }
    if let Some(sort) = kwargs.get::<Option<bool>>("sort_keys")? {
        options.sort_keys = sort;
    }
    if let Some(ascii) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        options.ensure_ascii = ascii;
    }
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| invalid(format!("tojson: value is not JSON-serializable: {e}")))?;
    Ok(JValue::from_safe_string(pyjson::dumps(&json, &options)))
}

fn raise_exception(message: String) -> Result<JValue, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// Reads a special-token entry of `tokenizer_config.json` (a string or `{"content": ...}`).
pub(crate) fn token_string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// Compiles a template source with transformers' settings.
    pub fn new(source: impl Into<String>) -> Result<Self, TemplateError> {
        Self::compile(source.into(), "inline source".into())
    }

    fn compile(source: String, origin: String) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|source| TemplateError::Compile {
                origin: origin.clone(),
                source,
            })?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|source| TemplateError::Compile { origin, source })?;
        Ok(ChatTemplate {
            env,
            source,
            variables: Map::new(),
        })
    }

    /// Reads a template file (e.g. `chat_template.jinja`).
    pub fn from_file(path: &Path) -> Result<Self, TemplateError> {
        let source = std::fs::read_to_string(path).map_err(|source| TemplateError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::compile(source, path.display().to_string())
    }

    /// Loads the template of a Hugging Face model directory: `chat_template` of
    /// `tokenizer_config.json` (a string, or a list of `{name, template}` where `default`
    /// is taken), else `chat_template.jinja`; special tokens become template variables.
    pub fn from_model_dir(dir: &Path) -> Result<Self, TemplateError> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<Value> = if config_path.exists() {
            let text =
                std::fs::read_to_string(&config_path).map_err(|source| TemplateError::Io {
                    path: config_path.clone(),
                    source,
                })?;
            Some(
                serde_json::from_str(&text).map_err(|e| TemplateError::Config {
                    path: config_path.clone(),
                    problem: format!("not valid JSON: {e}"),
                })?,
            )
        } else {
            None
        };
        let inline = match config.as_ref().and_then(|c| c.get("chat_template")) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => {
                let default = list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
                match default
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                {
                    Some(s) => Some(s.to_string()),
                    None => {
                        return Err(TemplateError::Config {
                            path: config_path,
                            problem: "chat_template is a list without a \"default\" entry".into(),
                        })
                    }
                }
            }
            Some(other) => {
                return Err(TemplateError::Config {
                    path: config_path,
                    problem: format!("chat_template must be a string or a list, got {other}"),
                })
            }
        };
        let jinja_path = dir.join("chat_template.jinja");
        let mut template = match inline {
            Some(source) => Self::compile(source, config_path.display().to_string())?,
            None if jinja_path.exists() => Self::from_file(&jinja_path)?,
            None => {
                return Err(TemplateError::Config {
                    path: dir.to_path_buf(),
                    problem: "no chat template: neither tokenizer_config.json[\"chat_template\"] nor chat_template.jinja exists".into(),
                })
            }
        };
        if let Some(config) = &config {
            for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
                if let Some(token) = token_string(config.get(key)) {
                    template.set_variable(key, Value::String(token));
                }
            }
        }
        Ok(template)
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Which parts of the tool protocol the template renders by itself.
    pub fn tool_support(&self) -> crate::text::audit::ToolSupport {
        crate::text::audit::ToolSupport::of_source(&self.source)
    }

    /// The messages and tools to render so that nothing is lost: unchanged for a template
    /// that renders tool calls and tools, else with the Hermes fallback of
    /// [`crate::text::audit::hermes_fallback`] (tools then travel in the system message, so the
    /// returned tools are `None`). [`ChatTemplate::render`] itself stays byte-identical to
    /// transformers.
    pub fn lossless<'t>(
        &self,
        messages: &[Value],
        tools: Option<&'t [Value]>,
    ) -> (Vec<Value>, Option<&'t [Value]>) {
        let support = self.tool_support();
        let messages = crate::text::audit::hermes_fallback(messages, tools, support);
        (messages, if support.tools { tools } else { None })
    }

    /// Sets a variable passed to every render (transformers passes `bos_token`, ...).
    pub fn set_variable(&mut self, name: &str, value: Value) {
        self.variables.insert(name.to_string(), value);
    }

    /// Renders an OpenAI-format conversation like `apply_chat_template(messages,
    /// tools=tools, add_generation_prompt=..., enable_thinking=...)`. Tool-call
    /// `arguments` given as JSON strings are parsed to objects first, and a missing or
    /// null `content` becomes `""`. `enable_thinking: None` leaves the variable undefined.
    pub fn render(
        &self,
        messages: &[Value],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> Result<String, TemplateError> {
        let messages = normalize_messages(messages)?;
        let mut ctx = Map::new();
        ctx.insert("messages".into(), Value::Array(messages));
        ctx.insert(
            "tools".into(),
            tools.map_or(Value::Null, |t| Value::Array(t.to_vec())),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        if let Some(flag) = enable_thinking {
            ctx.insert("enable_thinking".into(), Value::Bool(flag));
        }
        self.render_context(&Value::Object(ctx))
    }

    /// Renders with a raw context object (no message normalization); variables set on
    /// the template are added unless the context defines them.
    pub fn render_context(&self, context: &Value) -> Result<String, TemplateError> {
        let mut ctx = self.variables.clone();
        if let Value::Object(map) = context {
            for (k, v) in map {
                ctx.insert(k.clone(), v.clone());
            }
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(TemplateError::Render)?;
        template
            .render(JValue::from(minijinja::value::Serde(&ctx)))
            .map_err(TemplateError::Render)
    }

    /// What the template appends for `add_generation_prompt=true` under these settings,
    /// e.g. `"<|im_start|>assistant\n"` or, for Qwen3 with `enable_thinking=false`,
    /// `"<|im_start|>assistant\n<think>\n\n</think>\n\n"`.
    pub fn generation_prompt(
        &self,
        tools: Option<&[Value]>,
        enable_thinking: Option<bool>,
    ) -> Result<String, TemplateError> {
        let probe = [serde_json::json!({"role": "user", "content": "x"})];
        let without = self.render(&probe, tools, false, enable_thinking)?;
        let with = self.render(&probe, tools, true, enable_thinking)?;
        match with.strip_prefix(&without) {
            Some(suffix) => Ok(suffix.to_string()),
            None => Err(TemplateError::Render(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "the render with add_generation_prompt=true does not extend the render without it; cannot tell the generation prompt",
            ))),
        }
    }
}

/// Checks OpenAI-format messages and converts them to what templates expect: string
/// tool-call `arguments` parsed to JSON values, missing/null `content` set to `""`.
pub fn normalize_messages(messages: &[Value]) -> Result<Vec<Value>, TemplateError> {
    let bad = |index: usize, problem: String| TemplateError::BadMessage { index, problem };
    let mut out = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let Some(obj) = message.as_object() else {
            return Err(bad(index, format!("not a JSON object: {message}")));
        };
        let mut obj = obj.clone();
        let role = match obj.get("role") {
            Some(Value::String(r)) => r.clone(),
            Some(other) => {
                return Err(bad(
                    index,
                    format!("\"role\" must be a string, got {other}"),
                ))
            }
            None => return Err(bad(index, "missing \"role\"".into())),
        };
        if !matches!(role.as_str(), "system" | "user" | "assistant" | "tool") {
            return Err(bad(index, format!("unknown role {role:?}")));
        }
        match obj.get("content") {
            None | Some(Value::Null) => {
                obj.insert("content".into(), Value::String(String::new()));
            }
            Some(Value::String(_)) | Some(Value::Array(_)) => {}
            Some(other) => {
                return Err(bad(
                    index,
                    format!("\"content\" must be a string, a list of parts or null, got {other}"),
                ))
            }
        }
        if let Some(calls) = obj.get_mut("tool_calls") {
            if role != "assistant" {
                return Err(bad(index, format!("\"tool_calls\" on a {role} message")));
            }
            match calls {
                Value::Null => {}
                Value::Array(calls) => {
                    for (ci, call) in calls.iter_mut().enumerate() {
                        parse_arguments(call)
                            .map_err(|p| bad(index, format!("tool_calls[{ci}]: {p}")))?;
                    }
                }
                other => {
                    return Err(bad(
                        index,
                        format!("\"tool_calls\" must be a list, got {other}"),
                    ))
                }
            }
        }
        out.push(Value::Object(obj));
    }
    Ok(out)
}

fn parse_arguments(call: &mut Value) -> Result<(), String> {
    let Some(call) = call.as_object_mut() else {
        return Err(format!("not a JSON object: {call}"));
    };
    let target = match call.get_mut("function") {
        Some(Value::Object(f)) => f,
        Some(other) => return Err(format!("\"function\" must be an object, got {other}")),
        None => call,
    };
    if let Some(Value::String(text)) = target.get("arguments") {
        let parsed: Value = serde_json::from_str(text)
            .map_err(|e| format!("\"arguments\" is not valid JSON ({e}): {text:?}"))?;
        target.insert("arguments".into(), parsed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn string_arguments_are_parsed_to_objects() {
        let msgs = normalize_messages(&[json!({"role": "assistant", "content": null,
            "tool_calls": [{"id": "c", "type": "function",
                "function": {"name": "f", "arguments": "{\"b\": 1, \"a\": [true]}"}}]})])
        .unwrap();
        assert_eq!(msgs[0]["content"], json!(""));
        let args = &msgs[0]["tool_calls"][0]["function"]["arguments"];
        assert_eq!(args, &json!({"b": 1, "a": [true]}));
        let keys: Vec<&String> = args.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["b", "a"], "key order kept");
    }

    #[test]
    fn bad_messages_are_errors_naming_the_message() {
        let err = normalize_messages(&[
            json!({"role": "user", "content": "x"}),
            json!({"content": "y"}),
        ])
        .unwrap_err();
        assert!(
            matches!(err, TemplateError::BadMessage { index: 1, .. }),
            "{err}"
        );
        let err = normalize_messages(&[json!({"role": "assistant", "content": "",
            "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]})])
        .unwrap_err();
        assert!(err.to_string().contains("tool_calls[0]"), "{err}");
        let err = normalize_messages(&[json!({"role": "robot", "content": "x"})]).unwrap_err();
        assert!(err.to_string().contains("unknown role"), "{err}");
    }

    #[test]
    fn raise_exception_and_tojson_kwargs() {
        let t = ChatTemplate::new("{{ raise_exception('no ' + what) }}").unwrap();
        let err = t.render_context(&json!({"what": "way"})).unwrap_err();
        assert!(err.to_string().contains("no way"), "{err}");
        let t = ChatTemplate::new(
            "{{ x | tojson(indent=2, sort_keys=true) }}|{{ x | tojson(separators=[',', ':']) }}",
        )
        .unwrap();
        let out = t
            .render_context(&json!({"x": {"b": 1.5, "a": "<&>"}}))
            .unwrap();
        assert_eq!(
            out,
            "{\n  \"a\": \"<&>\",\n  \"b\": 1.5\n}|{\"b\":1.5,\"a\":\"<&>\"}"
        );
        assert!(ChatTemplate::new("{% generation %}x{% endgeneration %}").is_err());
    }
}
