//! Text detectors behind the per-reply checks: markdown, emoji, sentence counting and the
//! think block.
//!
//! All of them scan the text once, without regular expressions, because validation runs
//! over hundreds of thousands of conversations.

use crate::emoji_table::EMOJI_RANGES;

/// Removes a leading `<think>…</think>` block and the whitespace after it; text without a
/// leading think block is returned unchanged.
pub fn strip_think(text: &str) -> &str {
    let trimmed = text.trim_start();
    if let Some(rest) = trimmed.strip_prefix("<think>") {
        if let Some(end) = rest.find("</think>") {
            return rest[end + "</think>".len()..].trim_start();
        }
    }
    text
}

/// What kind of markdown a reply contains (the first found).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkdownKind {
    /// `**bold**` or `__bold__`.
    Emphasis,
    /// A line starting with `#`.
    Heading,
    /// A line starting with `- ` or `* `.
    Bullet,
    /// A line starting with `N. `.
    NumberedList,
    /// A backtick.
    Code,
    /// `[text](url)`.
    Link,
    /// A table row: a line starting with `|` that has another `|`.
    Table,
}

impl MarkdownKind {
    /// A short description for reports.
    pub fn describe(self) -> &'static str {
        match self {
            MarkdownKind::Emphasis => "** or __ emphasis",
            MarkdownKind::Heading => "a line starting with #",
            MarkdownKind::Bullet => "a bullet line (- or *)",
            MarkdownKind::NumberedList => "a numbered list line (N. )",
            MarkdownKind::Code => "a backtick",
            MarkdownKind::Link => "a [text](url) link",
            MarkdownKind::Table => "a table row",
        }
    }
}

/// Finds markdown in `text`, if any.
pub fn find_markdown(text: &str) -> Option<MarkdownKind> {
    if text.contains("**") || text.contains("__") {
        return Some(MarkdownKind::Emphasis);
    }
    if text.contains('`') {
        return Some(MarkdownKind::Code);
    }
    for line in text.lines() {
        let l = line.trim_start_matches([' ', '\t']);
        if l.starts_with('#') {
            return Some(MarkdownKind::Heading);
        }
        if l.starts_with("- ") || l.starts_with("* ") {
            return Some(MarkdownKind::Bullet);
        }
        let digits = l.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && l[digits..].starts_with(". ") {
            return Some(MarkdownKind::NumberedList);
        }
        if l.starts_with('|') && l[1..].contains('|') {
            return Some(MarkdownKind::Table);
        }
        if has_link(l) {
            return Some(MarkdownKind::Link);
        }
    }
    None
}

/// True when the line has `[text](target)` with non-empty text and target.
fn has_link(line: &str) -> bool {
    let b = line.as_bytes();
    let mut search = 0;
    while let Some(pos) = line[search..].find("](") {
        let mid = search + pos;
        let open = b[..mid].iter().rposition(|&c| c == b'[' || c == b']');
        let close = b[mid + 2..].iter().position(|&c| c == b')' || c == b' ');
        if let (Some(o), Some(c)) = (open, close) {
            if b[o] == b'[' && o + 1 < mid && c > 0 && b[mid + 2 + c] == b')' {
                return true;
            }
        }
        search = mid + 2;
    }
    false
}

/// The first emoji code point in `text` (Extended_Pictographic or Emoji_Presentation).
pub fn find_emoji(text: &str) -> Option<char> {
    text.chars().find(|&c| is_emoji(c))
}

/// True for an Extended_Pictographic or Emoji_Presentation code point.
pub fn is_emoji(c: char) -> bool {
    let cp = c as u32;
    if cp < 0xA9 {
        return false;
    }
    EMOJI_RANGES
        .binary_search_by(|&(lo, hi)| {
            if hi < cp {
                std::cmp::Ordering::Less
            } else if lo > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// Counts sentences: a run of `.`, `!` or `?` (with closing quotes or brackets after it)
/// followed by white space or the end ends a sentence that has some text. A `.` between
/// two digits (142.50, 10.0) is part of a number, a `1.` or `12.` standing alone before
/// more text is a numbered-list marker ("1. Charge the pack. 2. Mount the props." is two
/// sentences), and text after the last terminator is one more sentence.
pub fn count_sentences(text: &str) -> usize {
    let b = text.as_bytes();
    let mut count = 0;
    let mut has_text = false;
    // Digits seen since the last sentence end, when nothing else was: a `1.` or `12.`
    // followed by more text is a list marker, not a sentence.
    let mut marker_digits = Some(0usize);
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'.'
            && marker_digits.is_some_and(|n| (1..=2).contains(&n))
            && b.get(i + 1).is_some_and(u8::is_ascii_whitespace)
            && b[i + 1..].iter().any(|c| !c.is_ascii_whitespace())
        {
            has_text = false;
            marker_digits = Some(0);
            i += 1;
            continue;
        }
        marker_digits = match marker_digits {
            Some(n) if c.is_ascii_digit() => Some(n + 1),
            Some(n) if c.is_ascii_whitespace() => Some(n).filter(|&n| n == 0),
            _ => None,
        };
        if matches!(c, b'.' | b'!' | b'?') {
            let decimal = c == b'.'
                && i > 0
                && b[i - 1].is_ascii_digit()
                && b.get(i + 1).is_some_and(u8::is_ascii_digit);
            if decimal {
                has_text = true;
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < b.len() && matches!(b[j], b'.' | b'!' | b'?' | b'"' | b'\'' | b')' | b']') {
                j += 1;
            }
            let ends =
                j == b.len() || b[j].is_ascii_whitespace() || closes_with_unicode_quote(&text[j..]);
            if ends {
                if has_text {
                    count += 1;
                    has_text = false;
                }
                marker_digits = Some(0);
            } else {
                has_text = true;
            }
            i = j;
            continue;
        }
        if !c.is_ascii_whitespace() {
            has_text = true;
        }
        i += 1;
    }
    count + usize::from(has_text)
}

/// True when `rest` starts with a closing curly quote followed by white space or the end.
fn closes_with_unicode_quote(rest: &str) -> bool {
    let mut chars = rest.chars();
    matches!(chars.next(), Some('\u{201D}' | '\u{2019}'))
        && chars.next().is_none_or(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strips_only_a_leading_think_block() {
        assert_eq!(strip_think("<think>\n</think>\nHello."), "Hello.");
        assert_eq!(strip_think("<think>plan it</think>  Hi"), "Hi");
        assert_eq!(strip_think("Hi <think></think>"), "Hi <think></think>");
        assert_eq!(strip_think("<think>unclosed"), "<think>unclosed");
    }

    #[test]
    fn markdown_positive_cases() {
        let cases = [
            ("This is **bold**.", MarkdownKind::Emphasis),
            ("Some __under__ text", MarkdownKind::Emphasis),
            ("# Title\nBody", MarkdownKind::Heading),
            ("Intro\n  ## Sub", MarkdownKind::Heading),
            ("Items:\n- one\n- two", MarkdownKind::Bullet),
            ("* starred", MarkdownKind::Bullet),
            ("Steps:\n1. Boil\n2. Pour", MarkdownKind::NumberedList),
            ("12. twelfth", MarkdownKind::NumberedList),
            ("Run `ls` now", MarkdownKind::Code),
            ("See [the docs](https://x.org) today", MarkdownKind::Link),
            ("| a | b |\n|---|---|", MarkdownKind::Table),
        ];
        for (text, kind) in cases {
            assert_eq!(find_markdown(text), Some(kind), "{text:?}");
        }
    }

    #[test]
    fn markdown_negative_cases() {
        for text in [
            "It's 3 - 2 = 1, simple.",
            "Rates rose 2.5% in 2024. Prices are up.",
            "Use a star * for multiplication.",
            "I said [hello] (twice).",
            "Pipes | in the middle | are fine",
            "Version 1.5 shipped",
            "Call me at 10. Thanks!",
            "A hash # in the middle.",
        ] {
            assert_eq!(find_markdown(text), None, "{text:?}");
        }
    }

    #[test]
    fn emoji_detection() {
        assert_eq!(find_emoji("Great job \u{1F600}!"), Some('\u{1F600}'));
        assert_eq!(find_emoji("Sun \u{2600} today"), Some('\u{2600}'));
        assert_eq!(find_emoji("\u{2764}\u{FE0F} love"), Some('\u{2764}'));
        assert_eq!(
            find_emoji("Namaskara, ಹೇಗಿದ್ದೀರಾ? Café naïve – “quotes” 100%"),
            None
        );
        assert_eq!(
            find_emoji("digits 1 2 # * are not emoji by themselves"),
            None
        );
    }

    #[test]
    fn sentence_counting_and_the_decimal_rule() {
        assert_eq!(count_sentences("NVIDIA is at $142.50, up 2.3% today."), 1);
        assert_eq!(count_sentences("It costs 10.0 dollars. That's cheap."), 2);
        assert_eq!(count_sentences("One. Two! Three?"), 3);
        assert_eq!(count_sentences("One. Two! Three"), 3);
        assert_eq!(count_sentences("Wait... really?! Yes."), 3);
        assert_eq!(count_sentences("He said \"go.\" Then left."), 2);
        assert_eq!(count_sentences("She said “done.” Fine."), 2);
        assert_eq!(count_sentences("Pi is 3.14159 and e is 2.71828"), 1);
        assert_eq!(count_sentences("example.com is a site. ok"), 2);
        assert_eq!(count_sentences(""), 0);
        assert_eq!(count_sentences("   "), 0);
        assert_eq!(count_sentences("..."), 0);
    }

    #[test]
    fn numbered_list_markers_are_not_sentences() {
        assert_eq!(
            count_sentences("1. Charge the pack. 2. Mount the props."),
            2
        );
        assert_eq!(count_sentences("Steps: 1. Charge. 2. Mount. 3. Fly."), 4);
        assert_eq!(count_sentences("It was 1999. Then it ended."), 2);
        assert_eq!(count_sentences("I have 3. You have 2."), 2);
        assert_eq!(count_sentences("42."), 1);
        assert_eq!(count_sentences("The answer is 42. Really."), 2);
        assert_eq!(count_sentences("Version 2.5 ships today."), 1);
    }

    proptest! {
        /// Joining n sentences made of words and decimal numbers counts n.
        #[test]
        fn counts_generated_sentences(
            sentences in prop::collection::vec(
                (prop::collection::vec("[a-zA-Z]{1,8}|[0-9]{1,3}\\.[0-9]{1,2}", 1..6), "[.!?]"),
                0..6,
            )
        ) {
            let text: Vec<String> = sentences
                .iter()
                .map(|(words, end)| format!("{}{}", words.join(" "), end))
                .collect();
            prop_assert_eq!(count_sentences(&text.join(" ")), sentences.len());
        }

        /// The detectors never panic on arbitrary text.
        #[test]
        fn detectors_never_panic(s in "(?s).{0,200}") {
            let _ = find_markdown(&s);
            let _ = find_emoji(&s);
            let _ = count_sentences(&s);
            let _ = strip_think(&s);
        }
    }
}
