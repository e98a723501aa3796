//! The JSON report of a bench run, its summary table, and several reports side by side
//! (`qatflow bench --compare`), like the seeds' BF16 / PTQ / QAT tables.

use crate::checks::Finding;
use crate::client::ToolCallOut;
use crate::BenchError;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The `format` every report carries.
pub const REPORT_FORMAT: &str = "qatflow-bench/1";

/// One response to one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleReport {
    /// The prompt's id.
    pub prompt: String,
    /// Its category.
    pub category: String,
    /// Which repetition (0-based).
    pub run: u32,
    /// No finding of the category's checks, and no request error.
    pub passed: bool,
    /// The findings that failed it (of the category's checks).
    pub failures: Vec<Finding>,
    /// Every finding, also those the category does not count.
    pub findings: Vec<Finding>,
    /// The request's error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The content returned.
    pub content: String,
    /// Characters of separated reasoning.
    pub reasoning_chars: u64,
    /// Tool calls returned.
    pub tool_calls: Vec<ToolCallOut>,
    /// Milliseconds to the first content, reasoning or tool-call chunk.
    pub ttft_ms: Option<f64>,
    /// Milliseconds to the first content or tool-call chunk.
    pub ttft_output_ms: Option<f64>,
    /// Decode speed from the usage chunk, tokens/s.
    pub decode_tok_s: Option<f64>,
    /// Whole request, ms.
    pub total_ms: Option<f64>,
    /// Prompt tokens (usage).
    pub prompt_tokens: Option<u64>,
    /// Completion tokens (usage).
    pub completion_tokens: Option<u64>,
}

/// A category's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoryResult {
    /// The category.
    pub name: String,
    /// Samples that passed.
    pub passed: u64,
    /// Samples.
    pub total: u64,
    /// `passed / total` in percent.
    pub pass_pct: f64,
    /// The gate.
    pub min_pass_pct: f64,
    /// Whether the gate passed.
    pub gate_passed: bool,
}

/// Order statistics of one latency measure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// Values measured.
    pub n: u64,
    /// Median.
    pub p50: f64,
    /// 95th percentile (nearest rank).
    pub p95: f64,
    /// Mean.
    pub mean: f64,
}

impl Stat {
    /// Statistics of `values`; `None` when empty.
    pub fn of(values: &[f64]) -> Option<Stat> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let idx = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[idx.clamp(1, v.len()) - 1]
        };
        let p50 = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        Some(Stat {
            n: v.len() as u64,
            p50,
            p95: rank(95.0),
            mean: v.iter().sum::<f64>() / v.len() as f64,
        })
    }
}

/// Latency over all measured samples (warm-up requests excluded).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Time to the first content, reasoning or tool-call chunk, ms.
    pub ttft_ms: Option<Stat>,
    /// Time to the first content or tool-call chunk, ms.
    pub ttft_output_ms: Option<Stat>,
    /// Decode speed, tokens/s.
    pub decode_tok_s: Option<Stat>,
    /// Whole request, ms.
    pub total_ms: Option<Stat>,
}

/// One latency gate's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyGateResult {
    /// `ttft_p50_ms` or `decode_tok_s_p50`.
    pub name: String,
    /// The measured value (none when nothing was measured).
    pub value: Option<f64>,
    /// `<= X` or `>= X`.
    pub threshold: String,
    /// Whether it passed.
    pub passed: bool,
}

/// A bench run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// [`REPORT_FORMAT`].
    pub format: String,
    /// A name for this run in comparisons (`bf16`, `ptq`, `qat`).
    pub label: String,
    /// The endpoint's base URL.
    pub endpoint: String,
    /// The model name sent.
    pub model: String,
    /// The suite's name.
    pub suite: String,
    /// Where the suite was read from.
    pub suite_origin: String,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix: u64,
    /// Repetitions of each prompt.
    pub runs: u32,
    /// Warm-up requests sent before measuring.
    pub warmup: u32,
    /// Every measured sample.
    pub samples: Vec<SampleReport>,
    /// Per category, in suite order.
    pub categories: Vec<CategoryResult>,
    /// Latency statistics.
    pub latency: Latency,
    /// Latency gates.
    pub latency_gates: Vec<LatencyGateResult>,
    /// Requests that failed.
    pub errors: u64,
    /// Every category gate and every latency gate passed.
    pub passed: bool,
}

impl Report {
    /// Reads a report written by `qatflow bench --out`.
    pub fn load(path: &Path) -> Result<Report, BenchError> {
        let text = std::fs::read_to_string(path).map_err(|source| BenchError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let report: Report = serde_json::from_str(&text).map_err(|e| BenchError::Report {
            path: path.to_path_buf(),
            message: format!(
                "not a qatflow bench report ({e}); write one with `qatflow bench --out FILE`"
            ),
        })?;
        if report.format != REPORT_FORMAT {
            return Err(BenchError::Report {
                path: path.to_path_buf(),
                message: format!(
                    "report format {:?}, this qatflow reads {REPORT_FORMAT:?}",
                    report.format
                ),
            });
        }
        Ok(report)
    }

    /// Samples that passed, over all samples, in percent (0 without samples).
    pub fn pass_pct(&self) -> f64 {
        let total = self.samples.len();
        if total == 0 {
            return 0.0;
        }
        100.0 * self.samples.iter().filter(|s| s.passed).count() as f64 / total as f64
    }

    /// The category's result, if the run has it.
    pub fn category(&self, name: &str) -> Option<&CategoryResult> {
        self.categories.iter().find(|c| c.name == name)
    }

    /// The gates that failed, described.
    pub fn failed_gates(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .categories
            .iter()
            .filter(|c| !c.gate_passed)
            .map(|c| {
                format!(
                    "{} {}/{} ({:.0}% < {:.0}%)",
                    c.name, c.passed, c.total, c.pass_pct, c.min_pass_pct
                )
            })
            .collect();
        for g in self.latency_gates.iter().filter(|g| !g.passed) {
            out.push(match g.value {
                Some(v) => format!("{} {v:.1} (needs {})", g.name, g.threshold),
                None => format!("{} not measured (needs {})", g.name, g.threshold),
            });
        }
        out
    }

    /// One line for status screens: pass counts, latency medians, gates.
    pub fn summary(&self) -> String {
        let passed = self.samples.iter().filter(|s| s.passed).count();
        let ttft = self
            .latency
            .ttft_ms
            .map_or("-".into(), |s| format!("{:.0} ms", s.p50));
        let decode = self
            .latency
            .decode_tok_s
            .map_or("-".into(), |s| format!("{:.1} tok/s", s.p50));
        let gates = if self.passed {
            "gates passed".to_string()
        } else {
            format!("gates failed: {}", self.failed_gates().join(", "))
        };
        format!(
            "{passed}/{} passed, ttft p50 {ttft}, decode p50 {decode}, {gates}",
            self.samples.len()
        )
    }

    /// The summary table: one row per category, then latency and the verdict.
    pub fn table(&self) -> String {
        let mut rows: Vec<Vec<String>> = self
            .categories
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    format!("{}/{}", c.passed, c.total),
                    format!("{:.0}%", c.pass_pct),
                    format!(">= {:.0}%", c.min_pass_pct),
                    verdict(c.gate_passed).into(),
                ]
            })
            .collect();
        let stat = |s: Option<Stat>, unit: &str| {
            s.map_or("-".into(), |s| {
                format!("p50 {:.1} {unit}, p95 {:.1} {unit}", s.p50, s.p95)
            })
        };
        for g in &self.latency_gates {
            let (value, unit) = match g.name.as_str() {
                "decode_tok_s_p50" => (stat(self.latency.decode_tok_s, "tok/s"), "tok/s"),
                _ => (stat(self.latency.ttft_ms, "ms"), "ms"),
            };
            rows.push(vec![
                g.name.clone(),
                value,
                String::new(),
                format!("{} {unit}", g.threshold),
                verdict(g.passed).into(),
            ]);
        }
        let mut out = format!(
            "{} on {} ({}), suite {}, {} run(s)\n",
            self.model, self.endpoint, self.label, self.suite, self.runs
        );
        out.push_str(&table(
            &["category", "passed", "rate", "gate", "result"],
            &rows,
        ));
        out.push_str(&format!(
            "ttft (first output) {}\ntotal {}\n",
            stat(self.latency.ttft_output_ms, "ms"),
            stat(self.latency.total_ms, "ms")
        ));
        if self.errors > 0 {
            out.push_str(&format!("{} request(s) failed\n", self.errors));
        }
        out.push_str(if self.passed {
            "PASS: every gate passed\n"
        } else {
            "FAIL: a gate failed\n"
        });
        out
    }
}

fn verdict(passed: bool) -> &'static str {
    if passed {
        "pass"
    } else {
        "FAIL"
    }
}

/// Renders rows as left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = widths.get(i).copied().unwrap_or(0);
            s.push_str(&format!("{c:<pad$}  "));
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

/// Picks one measure out of a run's latency.
type LatencyOf = fn(&Latency) -> Option<Stat>;

/// Several reports side by side: a row per category (passed/total and rate), latency
/// medians and p95s, and the verdict; a column per report, headed by its label.
pub fn compare_table(reports: &[Report]) -> String {
    let mut header: Vec<String> = vec!["".into()];
    header.extend(reports.iter().map(|r| r.label.clone()));
    let mut categories: Vec<String> = Vec::new();
    for r in reports {
        for c in &r.categories {
            if !categories.contains(&c.name) {
                categories.push(c.name.clone());
            }
        }
    }
    let mut rows = Vec::new();
    for name in &categories {
        let mut row = vec![name.clone()];
        for r in reports {
            row.push(r.category(name).map_or("-".into(), |c| {
                format!(
                    "{}/{} ({:.0}%){}",
                    c.passed,
                    c.total,
                    c.pass_pct,
                    if c.gate_passed { "" } else { " FAIL" }
                )
            }));
        }
        rows.push(row);
    }
    let measures: [(&str, LatencyOf); 3] = [
        ("ttft ms", |l| l.ttft_ms),
        ("ttft output ms", |l| l.ttft_output_ms),
        ("decode tok/s", |l| l.decode_tok_s),
    ];
    for (name, get) in measures {
        let mut row = vec![format!("{name} p50/p95")];
        for r in reports {
            row.push(
                get(&r.latency).map_or("-".into(), |s| format!("{:.1} / {:.1}", s.p50, s.p95)),
            );
        }
        rows.push(row);
    }
    let mut row = vec!["errors".to_string()];
    row.extend(reports.iter().map(|r| r.errors.to_string()));
    rows.push(row);
    let mut row = vec!["gates".to_string()];
    row.extend(reports.iter().map(|r| verdict(r.passed).to_string()));
    rows.push(row);
    let mut row = vec!["model".to_string()];
    row.extend(reports.iter().map(|r| r.model.clone()));
    rows.push(row);
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    table(&header, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_statistics() {
        assert_eq!(Stat::of(&[]), None);
        let s = Stat::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.n, s.p50, s.p95, s.mean), (3, 3.0, 5.0, 3.0));
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Stat::of(&v).unwrap();
        assert_eq!((s.p50, s.p95), (50.5, 95.0));
        assert_eq!(Stat::of(&[2.0, 4.0]).unwrap().p50, 3.0);
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["a", "bb"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "a    bb\nxxx  y\n");
    }
}
