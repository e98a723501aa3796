//! Generated text → what the API returns, incrementally: [`StopMatcher`] cuts the text at
//! the request's stop strings, [`OutputParser`] splits it into reasoning (`<think>…</think>`,
//! returned when thinking is enabled, dropped otherwise), content and tool calls. Both hold
//! back only the few characters that could start a marker, so streaming and non-streaming
//! responses are the same text cut into different pieces.

use serde_json::Value;

use crate::toolcall::{Parsed, ToolCall, ToolCallFormat};

/// The longest suffix of `text` that is a proper prefix of `marker` (bytes to hold back).
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// Cuts generated text at the first occurrence of any stop string (the stop string is
/// not returned, as in OpenAI's API).
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    /// True once a stop string was seen; later text is ignored.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds a decoded delta; returns the text that is certainly before any stop string.
    pub fn push(&mut self, delta: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(delta);
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.held[..cut].to_string();
            self.held.clear();
            return out;
        }
        let hold = self
            .stops
            .iter()
            .map(|s| partial_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let out = self.held[..self.held.len() - hold].to_string();
        self.held.drain(..self.held.len() - hold);
        out
    }

    /// The held-back rest at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// A piece of parsed output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Thinking text (only when thinking is enabled).
    Reasoning(String),
    /// Reply text.
    Content(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Deciding whether the output opens with `<think>`.
    Start,
    /// Inside the think block.
    Think,
    /// Reply text.
    Content,
    /// From the first tool-call marker on: buffered until the end.
    Calls,
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// Splits generated text into reasoning, content and tool calls as it arrives.
#[derive(Debug, Clone)]
pub struct OutputParser {
    mode: Mode,
    thinking: bool,
    tools: Option<(ToolCallFormat, Vec<Value>)>,
    pending: String,
    think_buf: String,
    content_started: bool,
}

/// The end of a parse: the last pieces plus the tool calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finished {
    /// Pieces not yet returned by [`OutputParser::push`].
    pub pieces: Vec<Piece>,
    /// Well-formed tool calls.
    pub calls: Vec<ToolCall>,
    /// Tool-call blocks that did not parse (their text is in the content).
    pub malformed: usize,
}

impl OutputParser {
    /// A parser. `thinking`: think blocks become reasoning (else they are dropped);
    /// `prompt_opened_think`: the prompt already ends inside `<think>` (Qwen3.5's
    /// thinking prompt); `tools`: parse tool calls in this format, typed by these tool
    /// definitions.
    pub fn new(
        thinking: bool,
        prompt_opened_think: bool,
        tools: Option<(ToolCallFormat, Vec<Value>)>,
    ) -> Self {
        OutputParser {
            mode: if prompt_opened_think {
                Mode::Think
            } else {
                Mode::Start
            },
            thinking,
            tools,
            pending: String::new(),
            think_buf: String::new(),
            content_started: false,
        }
    }

    fn call_markers(&self) -> &'static [&'static str] {
        match self.tools.as_ref().map(|t| t.0) {
            None => &[],
            Some(ToolCallFormat::Hermes) => &["<tool_call>"],
            Some(ToolCallFormat::QwenXml) => &["<tool_call>", "<function="],
        }
    }

    fn content(&mut self, text: &str, out: &mut Vec<Piece>) {
        let text = if self.content_started {
            text
        } else {
            text.trim_start()
        };
        if !text.is_empty() {
            self.content_started = true;
            out.push(Piece::Content(text.to_string()));
        }
    }

    /// Feeds decoded text; returns the pieces that are final.
    pub fn push(&mut self, delta: &str) -> Vec<Piece> {
        self.pending.push_str(delta);
        let mut out = Vec::new();
        loop {
            match self.mode {
                Mode::Start => {
                    let t = self.pending.trim_start();
                    if let Some(rest) = t.strip_prefix(THINK_OPEN) {
                        self.pending = rest.to_string();
                        self.mode = Mode::Think;
                    } else if THINK_OPEN.starts_with(t) {
                        return out;
                    } else {
                        self.mode = Mode::Content;
                    }
                }
                Mode::Think => match self.pending.find(THINK_CLOSE) {
                    Some(end) => {
                        let inside = self.pending[..end].to_string();
                        self.pending.drain(..end + THINK_CLOSE.len());
                        if self.thinking {
                            if !inside.is_empty() {
                                out.push(Piece::Reasoning(inside));
                            }
                        } else {
                            self.think_buf.clear();
                        }
                        self.mode = Mode::Content;
                    }
                    None => {
                        let hold = partial_suffix(&self.pending, THINK_CLOSE);
                        let ready: String =
                            self.pending.drain(..self.pending.len() - hold).collect();
                        if self.thinking {
                            if !ready.is_empty() {
                                out.push(Piece::Reasoning(ready));
                            }
                        } else {
                            self.think_buf.push_str(&ready);
                        }
                        return out;
                    }
                },
                Mode::Content => {
                    let markers = self.call_markers();
                    let found = markers.iter().filter_map(|m| self.pending.find(m)).min();
                    match found {
                        Some(at) => {
                            let before: String = self.pending.drain(..at).collect();
                            self.content(&before, &mut out);
                            self.mode = Mode::Calls;
                        }
                        None => {
                            let hold = markers
                                .iter()
                                .map(|m| partial_suffix(&self.pending, m))
                                .max()
                                .unwrap_or(0);
                            let ready: String =
                                self.pending.drain(..self.pending.len() - hold).collect();
                            self.content(&ready, &mut out);
                            return out;
                        }
                    }
                }
                Mode::Calls => return out,
            }
        }
    }

    /// Ends the parse: flushes held text and parses the buffered tool calls.
    pub fn finish(mut self) -> Finished {
        let mut fin = Finished::default();
        let pending = std::mem::take(&mut self.pending);
        match self.mode {
            Mode::Start => self.content(&pending, &mut fin.pieces),
            Mode::Think if self.thinking => {
                if !pending.is_empty() {
                    fin.pieces.push(Piece::Reasoning(pending));
                }
            }
            // Thinking off and the block never closed: it is all content (as vLLM does).
            Mode::Think => {
                let text = format!("{THINK_OPEN}{}{pending}", self.think_buf);
                self.content(&text, &mut fin.pieces);
            }
            Mode::Content => self.content(&pending, &mut fin.pieces),
            Mode::Calls => {
                let (format, tools) = self.tools.take().expect("calls mode needs tools");
                let Parsed {
                    content,
                    calls,
                    malformed,
                } = format.parse(&pending, Some(&tools));
                fin.calls = calls;
                fin.malformed = malformed;
                if !content.is_empty() {
                    let sep = if self.content_started { "\n" } else { "" };
                    self.content(&format!("{sep}{content}"), &mut fin.pieces);
                }
            }
        }
        fin
    }
}

/// Parses a whole text at once: (reasoning, content, finished parse).
pub fn parse_all(
    mut parser: OutputParser,
    text: &str,
) -> (Option<String>, String, Vec<ToolCall>, usize) {
    let mut pieces = parser.push(text);
    let fin = parser.finish();
    pieces.extend(fin.pieces);
    let (mut reasoning, mut content) = (None::<String>, String::new());
    for p in pieces {
        match p {
            Piece::Reasoning(r) => reasoning.get_or_insert_with(String::new).push_str(&r),
            Piece::Content(c) => content.push_str(&c),
        }
    }
    (reasoning, content, fin.calls, fin.malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn tools() -> Option<(ToolCallFormat, Vec<Value>)> {
        Some((
            ToolCallFormat::Hermes,
            vec![json!({"type": "function",
            "function": {"name": "web_search", "parameters": {"type": "object"}}})],
        ))
    }

    const CALL: &str =
        "<tool_call>\n{\"name\": \"web_search\", \"arguments\": {\"query\": \"NVDA\"}}\n</tool_call>";

    #[test]
    fn think_blocks_become_reasoning_or_vanish() {
        let text = "<think>\nThe user wants a number.\n</think>\n\nIt is 4.";
        let (r, c, _, _) = parse_all(OutputParser::new(true, false, None), text);
        assert_eq!(r.as_deref(), Some("\nThe user wants a number.\n"));
        assert_eq!(c, "It is 4.");
        let (r, c, _, _) = parse_all(OutputParser::new(false, false, None), text);
        assert_eq!((r, c.as_str()), (None, "It is 4."));
        // The empty block QAT-trained models open every reply with.
        let (r, c, _, _) = parse_all(
            OutputParser::new(false, false, None),
            "<think>\n</think>\nHi.",
        );
        assert_eq!((r, c.as_str()), (None, "Hi."));
        // Qwen3.5's thinking prompt already opened the block.
        let (r, c, _, _) = parse_all(OutputParser::new(true, true, None), "why\n</think>\n\nok");
        assert_eq!((r.as_deref(), c.as_str()), (Some("why\n"), "ok"));
        // Never closed: reasoning when enabled, content (a visible leak) when not.
        let (r, c, _, _) = parse_all(OutputParser::new(true, false, None), "<think>abc");
        assert_eq!((r.as_deref(), c.as_str()), (Some("abc"), ""));
        let (r, c, _, _) = parse_all(OutputParser::new(false, false, None), "<think>abc");
        assert_eq!((r, c.as_str()), (None, "<think>abc"));
        // Text that merely starts like the tag is content.
        let (_, c, _, _) = parse_all(OutputParser::new(true, false, None), "<thin");
        assert_eq!(c, "<thin");
    }

    #[test]
    fn tool_calls_are_split_from_content() {
        let text = format!("<think>\n</think>\nChecking.\n{CALL}");
        let (r, c, calls, bad) = parse_all(OutputParser::new(false, false, tools()), &text);
        assert_eq!((r, c.as_str(), bad), (None, "Checking.\n", 0));
        assert_eq!(calls[0].name, "web_search");
        assert_eq!(calls[0].arguments, r#"{"query":"NVDA"}"#);
        // Without tools in the request, a call is plain text.
        let (_, c, calls, _) = parse_all(OutputParser::new(false, false, None), CALL);
        assert!(calls.is_empty());
        assert_eq!(c, CALL);
        // A malformed call stays in the content.
        let (_, c, calls, bad) = parse_all(
            OutputParser::new(false, false, tools()),
            "<tool_call>{nope</tool_call>",
        );
        assert_eq!(
            (calls.len(), bad, c.as_str()),
            (0, 1, "<tool_call>{nope</tool_call>")
        );
    }

    #[test]
    fn stop_strings_cut_across_deltas() {
        let mut m = StopMatcher::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(m.push("Hello\n"), "Hello");
        assert_eq!(m.push("world"), "\nworld");
        assert_eq!(m.push(" E"), " ");
        assert_eq!(m.push("NDx"), "");
        assert!(m.stopped());
        assert_eq!(m.push("more"), "");
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("café"), "caf");
        assert_eq!(m.finish(), "é");
    }

    proptest! {
        /// Streaming in any cut gives the same result as parsing the whole text.
        #[test]
        fn any_split_gives_the_same_parse(
            pre in "[a-z <>/]{0,12}", body in "[a-z \n]{0,20}", post in "[a-z .]{0,20}",
            think in any::<bool>(), thinking in any::<bool>(), call in any::<bool>(),
            cuts in proptest::collection::vec(0usize..120, 0..6),
        ) {
            let mut text = pre.clone();
            if think { text = format!("<think>{body}</think>\n{text}"); }
            text.push_str(&post);
            if call { text.push_str(CALL); }
            let whole = parse_all(OutputParser::new(thinking, false, tools()), &text);
            let mut parser = OutputParser::new(thinking, false, tools());
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            bounds.push(0);
            bounds.push(text.len());
            bounds.sort_unstable();
            let mut pieces = Vec::new();
            for w in bounds.windows(2) {
                pieces.extend(parser.push(&text[w[0]..w[1]]));
            }
            let fin = parser.finish();
            pieces.extend(fin.pieces);
            let mut reasoning = None::<String>;
            let mut content = String::new();
            for p in pieces {
                match p {
                    Piece::Reasoning(r) => reasoning.get_or_insert_with(String::new).push_str(&r),
                    Piece::Content(c) => content.push_str(&c),
                }
            }
            prop_assert_eq!((reasoning, content, fin.calls, fin.malformed), whole);
        }

        #[test]
        fn stop_matching_is_split_invariant(text in "[ab\n]{0,40}", cut in 0usize..40) {
            let stops = vec!["ab\n".to_string()];
            let want = text.find("ab\n").map_or(text.as_str(), |i| &text[..i]).to_string();
            let cut = cut.min(text.len());
            let mut m = StopMatcher::new(stops);
            let mut got = m.push(&text[..cut]);
            got.push_str(&m.push(&text[cut..]));
            if !m.stopped() { got.push_str(&m.finish()); }
            prop_assert_eq!(got, want);
        }
    }
}
