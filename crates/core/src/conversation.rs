//! The conversation schema: OpenAI chat JSONL, one `{"messages": [...]}` object per line.
//!
//! Roles are `system`, `user`, `assistant` and `tool`. Assistant messages may carry
//! `tool_calls` (each `{"id", "type": "function", "function": {"name", "arguments"}}` where
//! `arguments` is a JSON *string*) with `content` null; `tool` messages carry
//! `tool_call_id`. Fields this schema does not know are kept in each type's `extra` map, in
//! their original order, and written back on serialization, so a round trip loses nothing.
//!
//! Parsing is deliberately lenient about *values* (an unknown role parses as
//! [`Role::Other`], a missing `content` as [`Nullable::Missing`]) so that the gates can name
//! every schema problem of a line instead of stopping at the first; it is strict about
//! *types* (a number where a string belongs is a parse error).

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use std::fmt;

/// A chat conversation: the messages and any other top-level fields of the line.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conversation {
    /// The messages in order.
    pub messages: Vec<Message>,
    /// Top-level fields other than `messages` (for example `category` or `source`).
    pub extra: Map<String, Value>,
}

/// The author of a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// The system prompt.
    System,
    /// The human side.
    User,
    /// The model's side: text replies and tool calls.
    Assistant,
    /// A tool's result, answering an assistant tool call.
    Tool,
    /// Any other role string; the gates flag it as a schema error.
    Other(String),
}

/// A field that can be absent, JSON `null`, or a value — three states that a round trip
/// must keep apart (`"content": null` on tool-call messages is meaningful).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Nullable<T> {
    /// The key is not present.
    #[default]
    Missing,
    /// The key is present with the value `null`.
    Null,
    /// The key is present with a value.
    Value(T),
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// The text; `null` on assistant messages that only call tools.
    pub content: Nullable<String>,
    /// Tool calls of an assistant message.
    pub tool_calls: Option<Vec<ToolCall>>,
    /// On `tool` messages: the id of the call this result answers.
    pub tool_call_id: Option<String>,
    /// Optional author name (OpenAI's `name` field).
    pub name: Option<String>,
    /// Fields this schema does not know, in their original order.
    pub extra: Map<String, Value>,
}

/// One tool call of an assistant message.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The call id that the `tool` result message refers to.
    pub id: Option<String>,
    /// The call type; OpenAI's format only has `"function"`.
    pub kind: Option<String>,
    /// The function called.
    pub function: FunctionCall,
    /// Fields this schema does not know, in their original order.
    pub extra: Map<String, Value>,
}

/// The function part of a tool call.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionCall {
    /// Tool name.
    pub name: String,
    /// Arguments as a JSON *string* (for example `"{\"query\": \"x\"}"`).
    pub arguments: String,
    /// Fields this schema does not know, in their original order.
    pub extra: Map<String, Value>,
}

impl Role {
    /// The role as written in JSON.
    pub fn as_str(&self) -> &str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Other(s) => s,
        }
    }

    fn from_string(s: String) -> Role {
        match s.as_str() {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            _ => Role::Other(s),
        }
    }
}

impl<T> Nullable<T> {
    /// The value, if present and not null.
    pub fn as_ref(&self) -> Option<&T> {
        match self {
            Nullable::Value(v) => Some(v),
            _ => None,
        }
    }

    /// True when the key is absent.
    pub fn is_missing(&self) -> bool {
        matches!(self, Nullable::Missing)
    }
}

impl Message {
    /// A message with only a role and text content.
    pub fn text(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: Nullable::Value(content.into()),
            tool_calls: None,
            tool_call_id: None,
            name: None,
            extra: Map::new(),
        }
    }

    /// The text content, if any.
    pub fn content_str(&self) -> Option<&str> {
        self.content.as_ref().map(String::as_str)
    }

    /// True for an assistant message with at least one tool call.
    pub fn has_tool_calls(&self) -> bool {
        self.tool_calls.as_ref().is_some_and(|c| !c.is_empty())
    }
}

impl Conversation {
    /// Parses one JSONL line.
    pub fn from_json(line: &str) -> Result<Conversation, serde_json::Error> {
        serde_json::from_str(line)
    }

    /// Serializes to one compact JSON line (no trailing newline). Known fields come in the
    /// order of the seeds' JSONL (`role`, `tool_call_id`, `content`, `tool_calls`, `name`),
    /// followed by the preserved unknown fields in their original order.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a Conversation always serializes")
    }

    /// The system prompt: the content of the first `system` message.
    pub fn system_prompt(&self) -> Option<&str> {
        self.messages
            .iter()
            .find(|m| m.role == Role::System)
            .and_then(Message::content_str)
    }

    /// True when any assistant message carries tool calls.
    pub fn has_tool_calls(&self) -> bool {
        self.messages
            .iter()
            .any(|m| m.role == Role::Assistant && m.has_tool_calls())
    }

    /// A string field of `extra` (for example `category`), if present.
    pub fn extra_str(&self, key: &str) -> Option<&str> {
        self.extra.get(key).and_then(Value::as_str)
    }
}

// ---- serialization -------------------------------------------------------------------

fn write_extra<M: SerializeMap>(map: &mut M, extra: &Map<String, Value>) -> Result<(), M::Error> {
    for (k, v) in extra {
        map.serialize_entry(k, v)?;
    }
    Ok(())
}

impl Serialize for Role {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl Serialize for Conversation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1 + self.extra.len()))?;
        map.serialize_entry("messages", &self.messages)?;
        write_extra(&mut map, &self.extra)?;
        map.end()
    }
}

impl Serialize for Message {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("role", &self.role)?;
        if let Some(id) = &self.tool_call_id {
            map.serialize_entry("tool_call_id", id)?;
        }
        match &self.content {
            Nullable::Missing => {}
            Nullable::Null => map.serialize_entry("content", &())?,
            Nullable::Value(c) => map.serialize_entry("content", c)?,
        }
        if let Some(calls) = &self.tool_calls {
            map.serialize_entry("tool_calls", calls)?;
        }
        if let Some(name) = &self.name {
            map.serialize_entry("name", name)?;
        }
        write_extra(&mut map, &self.extra)?;
        map.end()
    }
}

impl Serialize for ToolCall {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        if let Some(id) = &self.id {
            map.serialize_entry("id", id)?;
        }
        if let Some(kind) = &self.kind {
            map.serialize_entry("type", kind)?;
        }
        map.serialize_entry("function", &self.function)?;
        write_extra(&mut map, &self.extra)?;
        map.end()
    }
}

impl Serialize for FunctionCall {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2 + self.extra.len()))?;
        map.serialize_entry("name", &self.name)?;
        map.serialize_entry("arguments", &self.arguments)?;
        write_extra(&mut map, &self.extra)?;
        map.end()
    }
}

// ---- deserialization -----------------------------------------------------------------
//
// Hand-written visitors instead of `#[serde(flatten)]`: flatten buffers every field before
// matching, which halves validation throughput on long system prompts.

/// Deserializes `T` or `null` into a present [`Nullable`].
struct NullableSeed<T>(std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> de::DeserializeSeed<'de> for NullableSeed<T> {
    type Value = Nullable<T>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Ok(match Option::<T>::deserialize(d)? {
            Some(v) => Nullable::Value(v),
            None => Nullable::Null,
        })
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Role::from_string(String::deserialize(d)?))
    }
}

/// A JSON object type read key by key: each of its [`FIELDS`](Object::FIELDS) at most once
/// (a repeated one is an error), every other key kept in order in its `extra` map.
trait Object: Sized {
    /// What the parser expected, for its error message.
    const EXPECTING: &'static str;
    /// The keys the type reads itself.
    const FIELDS: &'static [&'static str];
    /// The fields read so far.
    type Partial: Default;
    /// Reads the value of `key` (one of [`Object::FIELDS`]) into `partial`.
    fn read<'de, A: MapAccess<'de>>(
        partial: &mut Self::Partial,
        key: &str,
        a: &mut A,
    ) -> Result<(), A::Error>;
    /// The object, or the error of a missing required field.
    fn finish<E: de::Error>(partial: Self::Partial, extra: Map<String, Value>) -> Result<Self, E>;
}

struct ObjectVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: Object> Visitor<'de> for ObjectVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<T, A::Error> {
        let mut partial = T::Partial::default();
        let mut seen = vec![false; T::FIELDS.len()];
        let mut extra = Map::new();
        while let Some(key) = a.next_key::<String>()? {
            match T::FIELDS.iter().position(|f| *f == key) {
                Some(i) => {
                    if std::mem::replace(&mut seen[i], true) {
                        return Err(de::Error::duplicate_field(T::FIELDS[i]));
                    }
                    T::read(&mut partial, &key, &mut a)?;
                }
                None => {
                    let v = a.next_value()?;
                    extra.insert(key, v);
                }
            }
        }
        T::finish(partial, extra)
    }
}

/// Deserializes an [`Object`] type from a map.
fn deserialize_object<'de, T: Object, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    d.deserialize_map(ObjectVisitor::<T>(std::marker::PhantomData))
}

fn required<T, E: de::Error>(value: Option<T>, field: &'static str) -> Result<T, E> {
    value.ok_or_else(|| de::Error::missing_field(field))
}

impl Object for Conversation {
    const EXPECTING: &'static str = "a conversation object {\"messages\": [...]}";
    const FIELDS: &'static [&'static str] = &["messages"];
    type Partial = Option<Vec<Message>>;
    fn read<'de, A: MapAccess<'de>>(
        p: &mut Self::Partial,
        _: &str,
        a: &mut A,
    ) -> Result<(), A::Error> {
        *p = Some(a.next_value()?);
        Ok(())
    }
    fn finish<E: de::Error>(p: Self::Partial, extra: Map<String, Value>) -> Result<Self, E> {
        Ok(Conversation {
            messages: required(p, "messages")?,
            extra,
        })
    }
}

impl Object for Message {
    const EXPECTING: &'static str = "a message object {\"role\": ..., \"content\": ...}";
    const FIELDS: &'static [&'static str] =
        &["role", "content", "tool_calls", "tool_call_id", "name"];
    type Partial = (
        Option<Role>,
        Nullable<String>,
        Option<Vec<ToolCall>>,
        Option<String>,
        Option<String>,
    );
    fn read<'de, A: MapAccess<'de>>(
        p: &mut Self::Partial,
        key: &str,
        a: &mut A,
    ) -> Result<(), A::Error> {
        match key {
            "role" => p.0 = Some(a.next_value()?),
            "content" => p.1 = a.next_value_seed(NullableSeed(Default::default()))?,
            "tool_calls" => p.2 = Some(a.next_value()?),
            "tool_call_id" => p.3 = Some(a.next_value()?),
            _ => p.4 = Some(a.next_value()?),
        }
        Ok(())
    }
    fn finish<E: de::Error>(p: Self::Partial, extra: Map<String, Value>) -> Result<Self, E> {
        Ok(Message {
            role: required(p.0, "role")?,
            content: p.1,
            tool_calls: p.2,
            tool_call_id: p.3,
            name: p.4,
            extra,
        })
    }
}

impl Object for ToolCall {
    const EXPECTING: &'static str =
        "a tool call {\"id\", \"type\", \"function\": {\"name\", \"arguments\"}}";
    const FIELDS: &'static [&'static str] = &["id", "type", "function"];
    type Partial = (Option<String>, Option<String>, Option<FunctionCall>);
    fn read<'de, A: MapAccess<'de>>(
        p: &mut Self::Partial,
        key: &str,
        a: &mut A,
    ) -> Result<(), A::Error> {
        match key {
            "id" => p.0 = Some(a.next_value()?),
            "type" => p.1 = Some(a.next_value()?),
            _ => p.2 = Some(a.next_value()?),
        }
        Ok(())
    }
    fn finish<E: de::Error>(p: Self::Partial, extra: Map<String, Value>) -> Result<Self, E> {
        Ok(ToolCall {
            id: p.0,
            kind: p.1,
            function: required(p.2, "function")?,
            extra,
        })
    }
}

impl Object for FunctionCall {
    const EXPECTING: &'static str =
        "a function object {\"name\": ..., \"arguments\": \"<JSON string>\"}";
    const FIELDS: &'static [&'static str] = &["name", "arguments"];
    type Partial = (Option<String>, Option<String>);
    fn read<'de, A: MapAccess<'de>>(
        p: &mut Self::Partial,
        key: &str,
        a: &mut A,
    ) -> Result<(), A::Error> {
        match key {
            "name" => p.0 = Some(a.next_value()?),
            _ => p.1 = Some(a.next_value()?),
        }
        Ok(())
    }
    fn finish<E: de::Error>(p: Self::Partial, extra: Map<String, Value>) -> Result<Self, E> {
        Ok(FunctionCall {
            name: required(p.0, "name")?,
            arguments: required(p.1, "arguments")?,
            extra,
        })
    }
}

macro_rules! deserialize_as_object {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                deserialize_object(d)
            }
        }
    )*};
}

deserialize_as_object!(Conversation, Message, ToolCall, FunctionCall);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TOOL_LINE: &str = r#"{"messages":[{"role":"system","content":"You are Ada."},{"role":"user","content":"Search for NVIDIA stock price"},{"role":"assistant","content":null,"tool_calls":[{"id":"call_001","type":"function","function":{"name":"web_search","arguments":"{\"query\": \"NVIDIA stock price\"}"}}]},{"role":"tool","tool_call_id":"call_001","content":"NVIDIA is at $142.50."},{"role":"assistant","content":"<think>\n</think>\nNVIDIA is at $142.50, up 2.3% today."}]}"#;

    #[test]
    fn parses_tool_call_conversation_and_round_trips_bytes() {
        let c = Conversation::from_json(TOOL_LINE).unwrap();
        assert_eq!(c.messages.len(), 5);
        assert_eq!(c.messages[2].content, Nullable::Null);
        let call = &c.messages[2].tool_calls.as_ref().unwrap()[0];
        assert_eq!(call.id.as_deref(), Some("call_001"));
        assert_eq!(call.function.name, "web_search");
        assert_eq!(
            call.function.arguments,
            "{\"query\": \"NVIDIA stock price\"}"
        );
        assert_eq!(c.messages[3].tool_call_id.as_deref(), Some("call_001"));
        assert!(c.has_tool_calls());
        assert_eq!(c.system_prompt(), Some("You are Ada."));
        assert_eq!(c.to_json(), TOOL_LINE);
    }

    #[test]
    fn unknown_fields_survive_a_round_trip_at_every_level() {
        let line = r#"{"messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}","strict":true},"index":0}],"weight":0.5}],"category":"topic_switch","source":{"backend":"offline","batch":3}}"#;
        let c = Conversation::from_json(line).unwrap();
        assert_eq!(c.extra_str("category"), Some("topic_switch"));
        assert_eq!(c.messages[0].extra["weight"], serde_json::json!(0.5));
        let call = &c.messages[0].tool_calls.as_ref().unwrap()[0];
        assert_eq!(call.extra["index"], serde_json::json!(0));
        assert_eq!(call.function.extra["strict"], serde_json::json!(true));
        assert_eq!(c.to_json(), line);
    }

    #[test]
    fn missing_and_null_content_stay_distinct() {
        let c = Conversation::from_json(
            r#"{"messages":[{"role":"user"},{"role":"user","content":null}]}"#,
        )
        .unwrap();
        assert_eq!(c.messages[0].content, Nullable::Missing);
        assert_eq!(c.messages[1].content, Nullable::Null);
        assert_eq!(
            c.to_json(),
            r#"{"messages":[{"role":"user"},{"role":"user","content":null}]}"#
        );
    }

    #[test]
    fn unknown_role_parses_as_other() {
        let c =
            Conversation::from_json(r#"{"messages":[{"role":"narrator","content":"x"}]}"#).unwrap();
        assert_eq!(c.messages[0].role, Role::Other("narrator".into()));
        assert_eq!(c.messages[0].role.as_str(), "narrator");
    }

    #[test]
    fn type_errors_and_missing_keys_are_errors() {
        for bad in [
            r#"{"conversation":[]}"#,
            r#"{"messages":{}}"#,
            r#"{"messages":[{"content":"no role"}]}"#,
            r#"{"messages":[{"role":"user","content":42}]}"#,
            r#"{"messages":[{"role":"assistant","tool_calls":[{"id":"x"}]}]}"#,
            r#"{"messages":[{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":{}}}]}]}"#,
            r#"{"messages":[],"messages":[]}"#,
            r#"[1,2]"#,
        ] {
            assert!(Conversation::from_json(bad).is_err(), "accepted: {bad}");
        }
    }

    fn json_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        json_leaf().prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec(("[a-z]{1,6}", inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn extra(reserved: &'static [&'static str]) -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::vec(("x_[a-z]{1,6}", json_value()), 0..3).prop_map(move |kv| {
            kv.into_iter()
                .filter(|(k, _)| !reserved.contains(&k.as_str()))
                .collect()
        })
    }

    fn tool_call() -> impl Strategy<Value = ToolCall> {
        (
            proptest::option::of("call_[a-z0-9]{1,8}"),
            proptest::option::of(Just("function".to_string())),
            "[a-z_]{1,12}",
            ".{0,20}",
            extra(&[]),
            extra(&[]),
        )
            .prop_map(|(id, kind, name, arguments, fx, x)| ToolCall {
                id,
                kind,
                function: FunctionCall {
                    name,
                    arguments,
                    extra: fx,
                },
                extra: x,
            })
    }

    fn message() -> impl Strategy<Value = Message> {
        (
            prop_oneof![
                Just(Role::System),
                Just(Role::User),
                Just(Role::Assistant),
                Just(Role::Tool),
                "[a-z]{1,8}".prop_map(Role::from_string),
            ],
            prop_oneof![
                Just(Nullable::Missing),
                Just(Nullable::Null),
                "(?s).{0,60}".prop_map(Nullable::Value),
            ],
            proptest::option::of(prop::collection::vec(tool_call(), 0..3)),
            proptest::option::of("call_[a-z0-9]{1,8}"),
            proptest::option::of("[a-z]{1,8}"),
            extra(&[]),
        )
            .prop_map(
                |(role, content, tool_calls, tool_call_id, name, extra)| Message {
                    role,
                    content,
                    tool_calls,
                    tool_call_id,
                    name,
                    extra,
                },
            )
    }

    fn conversation() -> impl Strategy<Value = Conversation> {
        (prop::collection::vec(message(), 0..6), extra(&[]))
            .prop_map(|(messages, extra)| Conversation { messages, extra })
    }

    proptest! {
        /// Serializing a generated conversation and parsing it back gives the same
        /// conversation, and serializing again gives the same bytes.
        #[test]
        fn serialize_parse_is_identity(c in conversation()) {
            let line = c.to_json();
            let back = Conversation::from_json(&line).unwrap();
            prop_assert_eq!(&back, &c);
            prop_assert_eq!(back.to_json(), line);
        }

        /// Parsing any generated line and serializing it gives the same JSON value.
        #[test]
        fn parse_serialize_keeps_the_json_value(c in conversation()) {
            let original: Value = serde_json::to_value(&c).unwrap();
            let text = serde_json::to_string_pretty(&original).unwrap();
            let reparsed = Conversation::from_json(&text).unwrap();
            prop_assert_eq!(serde_json::to_value(&reparsed).unwrap(), original);
        }
    }
}
