//! Dataset-level gates: counts accumulated over every conversation of a dataset, compared
//! with a profile's thresholds, and [`validate`], which runs the whole pass over a JSONL
//! source.

use crate::checks::{Check, Checker, ConversationReport, Finding};
use crate::profile::GateProfile;
use qatflow_core::{JsonlError, JsonlReader, Progress};
use serde::Serialize;
use std::io::BufRead;

/// Counts over a dataset, fed one conversation report at a time.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DatasetStats {
    /// Non-blank lines seen.
    pub lines: u64,
    /// Conversations that parsed with a valid schema.
    pub conversations: u64,
    /// Usable conversations with at least one tool call.
    pub tool_call_conversations: u64,
    /// Assistant text replies in usable conversations.
    pub text_replies: u64,
    /// Of those, replies starting with the think prefix.
    pub think_prefixed_replies: u64,
    /// Of those, replies over the sentence limit.
    pub verbose_replies: u64,
    /// Usable conversations with no flag at all.
    pub clean_conversations: u64,
    /// Shortest system prompt among usable conversations, in characters.
    pub min_system_prompt_chars: Option<u64>,
    /// Conversations flagged by each check (every line, usable or not).
    pub flagged: std::collections::BTreeMap<Check, u64>,
}

impl DatasetStats {
    /// Adds one conversation's report.
    pub fn add(&mut self, report: &ConversationReport) {
        self.lines += 1;
        for check in report.flags() {
            *self.flagged.entry(check).or_default() += 1;
        }
        if !report.is_usable() {
            return;
        }
        let s = &report.stats;
        self.conversations += 1;
        self.tool_call_conversations += u64::from(s.has_tool_calls);
        self.text_replies += u64::from(s.text_replies);
        self.think_prefixed_replies += u64::from(s.think_prefixed_replies);
        self.verbose_replies += u64::from(s.verbose_replies);
        self.clean_conversations += u64::from(report.is_clean());
        self.min_system_prompt_chars = Some(
            self.min_system_prompt_chars
                .map_or(s.system_prompt_chars, |m| m.min(s.system_prompt_chars)),
        );
    }

    /// Conversations flagged by `check`.
    pub fn flagged(&self, check: Check) -> u64 {
        self.flagged.get(&check).copied().unwrap_or(0)
    }

    /// Evaluates the profile's thresholds, in a fixed order; absent thresholds are skipped.
    pub fn evaluate(&self, profile: &GateProfile) -> Vec<GateResult> {
        let g = &profile.gates;
        let pct = |num: u64, den: u64| {
            if den == 0 {
                0.0
            } else {
                100.0 * num as f64 / den as f64
            }
        };
        let mut out = Vec::new();
        let mut gate =
            |name: &'static str, value: f64, threshold: Option<f64>, op: Op, unit: Unit| {
                if let Some(threshold) = threshold {
                    let passed = match op {
                        Op::AtLeast => value >= threshold,
                        Op::AtMost => value <= threshold,
                    };
                    out.push(GateResult {
                        name,
                        value,
                        threshold,
                        op,
                        unit,
                        passed,
                    });
                }
            };
        let count = |v: Option<u64>| v.map(|v| v as f64);
        gate(
            "conversations",
            self.conversations as f64,
            count(g.min_conversations),
            Op::AtLeast,
            Unit::Count,
        );
        gate(
            "tool_call_conversations",
            self.tool_call_conversations as f64,
            count(g.min_tool_call_conversations),
            Op::AtLeast,
            Unit::Count,
        );
        gate(
            "think_prefix_pct",
            pct(self.think_prefixed_replies, self.text_replies),
            g.min_think_prefix_pct,
            Op::AtLeast,
            Unit::Percent,
        );
        gate(
            "markdown_conversations",
            self.flagged(Check::Markdown) as f64,
            count(g.max_markdown_conversations),
            Op::AtMost,
            Unit::Count,
        );
        gate(
            "trailing_question_pct",
            pct(self.flagged(Check::TrailingQuestion), self.conversations),
            g.max_trailing_question_pct,
            Op::AtMost,
            Unit::Percent,
        );
        gate(
            "verbose_reply_pct",
            pct(self.verbose_replies, self.text_replies),
            g.max_verbose_reply_pct,
            Op::AtMost,
            Unit::Percent,
        );
        gate(
            "emoji_conversations",
            self.flagged(Check::Emoji) as f64,
            count(g.max_emoji_conversations),
            Op::AtMost,
            Unit::Count,
        );
        gate(
            "system_prompt_min_chars",
            self.min_system_prompt_chars.unwrap_or(0) as f64,
            count(g.min_system_prompt_chars),
            Op::AtLeast,
            Unit::Chars,
        );
        out
    }
}

/// Direction of a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Op {
    /// The value must be at least the threshold.
    #[serde(rename = ">=")]
    AtLeast,
    /// The value must be at most the threshold.
    #[serde(rename = "<=")]
    AtMost,
}

impl Op {
    /// `>=` or `<=`.
    pub fn symbol(self) -> &'static str {
        match self {
            Op::AtLeast => ">=",
            Op::AtMost => "<=",
        }
    }
}

/// What a gate's value counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// A number of conversations.
    Count,
    /// A percentage.
    Percent,
    /// A number of characters.
    Chars,
}

/// One dataset gate's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateResult {
    /// Gate name (`conversations`, `think_prefix_pct`, …).
    pub name: &'static str,
    /// The dataset's value.
    pub value: f64,
    /// The profile's threshold.
    pub threshold: f64,
    /// How value and threshold compare.
    pub op: Op,
    /// What the value counts.
    pub unit: Unit,
    /// Whether the gate passed.
    pub passed: bool,
}

impl GateResult {
    /// The value formatted for its unit.
    pub fn format_value(&self, v: f64) -> String {
        match self.unit {
            Unit::Percent => format!("{v:.1}%"),
            _ => format!("{v:.0}"),
        }
    }
}

/// The findings of one flagged line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlaggedLine {
    /// 1-based line number.
    pub line: usize,
    /// Distinct checks that flagged it, in report order.
    pub flags: Vec<Check>,
    /// Every finding, with details.
    pub findings: Vec<Finding>,
}

/// The result of validating a dataset.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    /// Profile name.
    pub profile: String,
    /// Dataset counts.
    pub stats: DatasetStats,
    /// Gate outcomes.
    pub gates: Vec<GateResult>,
    /// Every line with at least one flag, in file order.
    pub flagged_lines: Vec<FlaggedLine>,
}

impl ValidationReport {
    /// True when every gate passed.
    pub fn passed(&self) -> bool {
        self.gates.iter().all(|g| g.passed)
    }

    /// The `n` lines with the most distinct flags (ties: earlier lines first).
    pub fn worst_offenders(&self, n: usize) -> Vec<&FlaggedLine> {
        let mut lines: Vec<&FlaggedLine> = self.flagged_lines.iter().collect();
        lines.sort_by(|a, b| b.flags.len().cmp(&a.flags.len()).then(a.line.cmp(&b.line)));
        lines.truncate(n);
        lines
    }
}

/// Validates every line of a JSONL source against a profile. `progress` advances by the
/// number of bytes of each line read.
pub fn validate<R: BufRead>(
    reader: JsonlReader<R>,
    profile: &GateProfile,
    progress: &dyn Progress,
) -> Result<ValidationReport, JsonlError> {
    let checker = Checker::new(profile);
    let mut stats = DatasetStats::default();
    let mut flagged_lines = Vec::new();
    for line in reader {
        let line = line?;
        let report = match &line.text {
            Ok(text) => {
                progress.advance(text.len() as u64 + 1);
                checker.check_line(text).1
            }
            Err(problem) => ConversationReport {
                findings: vec![Finding {
                    check: Check::InvalidJson,
                    message: None,
                    detail: problem.to_string(),
                }],
                ..Default::default()
            },
        };
        stats.add(&report);
        if !report.findings.is_empty() {
            flagged_lines.push(FlaggedLine {
                line: line.number,
                flags: report.flags(),
                findings: report.findings,
            });
        }
    }
    let gates = stats.evaluate(profile);
    Ok(ValidationReport {
        profile: profile.name.clone(),
        stats,
        gates,
        flagged_lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qatflow_core::NoProgress;
    use std::io::Cursor;

    fn line(reply: &str, tool: bool) -> String {
        let sys = "S".repeat(2600);
        let mut messages = vec![
            serde_json::json!({"role": "system", "content": sys}),
            serde_json::json!({"role": "user", "content": "hi"}),
        ];
        if tool {
            messages.push(serde_json::json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "web_search", "arguments": "{\"query\": \"x\"}"}}]}));
            messages.push(
                serde_json::json!({"role": "tool", "tool_call_id": "c1", "content": "result"}),
            );
        }
        messages.push(serde_json::json!({"role": "assistant", "content": format!("<think>\n</think>\n{reply}")}));
        serde_json::json!({ "messages": messages }).to_string()
    }

    fn run(text: &str, profile: &GateProfile) -> ValidationReport {
        validate(
            JsonlReader::new(Cursor::new(text.as_bytes().to_vec()), "t.jsonl"),
            profile,
            &NoProgress,
        )
        .unwrap()
    }

    fn small_v4() -> GateProfile {
        let mut p = GateProfile::builtin("v4").unwrap();
        p.gates.min_conversations = Some(10);
        p.gates.min_tool_call_conversations = Some(3);
        p
    }

    #[test]
    fn a_good_dataset_passes_every_gate() {
        let mut text = String::new();
        for i in 0..20 {
            text.push_str(&line(&format!("Answer number {i}."), i % 3 == 0));
            text.push('\n');
        }
        let r = run(&text, &small_v4());
        assert_eq!(r.stats.conversations, 20);
        assert_eq!(r.stats.tool_call_conversations, 7);
        assert_eq!(r.gates.len(), 8);
        assert!(r.passed(), "{:?}", r.gates);
        assert!(r.flagged_lines.is_empty());
    }

    #[test]
    fn each_failing_gate_is_reported_with_its_lines() {
        let mut lines: Vec<String> = (0..20)
            .map(|i| line(&format!("Fine {i}."), i < 4))
            .collect();
        lines[2] = line("Nice \u{1F600}.", false);
        lines[5] = line("**Bold** move.", false);
        lines[7] = line("Okay?", false);
        lines[9] = "{\"messages\": [".into();
        let r = run(&lines.join("\n"), &small_v4());
        let failed: Vec<&str> = r
            .gates
            .iter()
            .filter(|g| !g.passed)
            .map(|g| g.name)
            .collect();
        // 1 of 19 usable conversations ends with "?" = 5.3% > 5%; one emoji > 0.
        assert_eq!(failed, ["trailing_question_pct", "emoji_conversations"]);
        let flagged: Vec<(usize, Vec<Check>)> = r
            .flagged_lines
            .iter()
            .map(|l| (l.line, l.flags.clone()))
            .collect();
        assert_eq!(
            flagged,
            vec![
                (3, vec![Check::Emoji]),
                (6, vec![Check::Markdown]),
                (8, vec![Check::TrailingQuestion]),
                (10, vec![Check::InvalidJson]),
            ]
        );
        assert_eq!(r.stats.conversations, 19);
        assert_eq!(r.stats.lines, 20);
    }

    #[test]
    fn thresholds_compare_inclusively() {
        let mut p = small_v4();
        p.gates.min_conversations = Some(20);
        p.gates.min_tool_call_conversations = Some(20);
        let text: Vec<String> = (0..20).map(|i| line(&format!("Ok {i}."), false)).collect();
        let r = run(&text.join("\n"), &p);
        let g = |n: &str| r.gates.iter().find(|g| g.name == n).unwrap().clone();
        assert!(g("conversations").passed);
        assert!(!g("tool_call_conversations").passed);
        assert_eq!(g("think_prefix_pct").value, 100.0);
        assert_eq!(g("system_prompt_min_chars").value, 2600.0);
    }

    #[test]
    fn worst_offenders_rank_by_flag_count() {
        let lines = [
            line("Fine.", false),
            line("**A** \u{1F600}. B. C?", false),
            line("One. Two. Three.", false),
        ];
        let r = run(&lines.join("\n"), &small_v4());
        let worst: Vec<usize> = r.worst_offenders(2).iter().map(|l| l.line).collect();
        assert_eq!(worst, [2, 3]);
    }
}
