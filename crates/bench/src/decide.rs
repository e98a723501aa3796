//! The promotion rule of the serving supervisor: a candidate replaces the serving model
//! only when it passes every gate of the suite and is not worse than the serving model
//! beyond the configured margins (per category, overall, TTFT and decode speed).

use crate::report::Report;
use serde::{Deserialize, Serialize};

/// How much worse than the serving model a candidate may be.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Margins {
    /// Percentage points a category's (or the overall) pass rate may drop.
    pub pass_pct: f64,
    /// Percent by which the median TTFT may grow and the median decode speed may shrink.
    pub latency_pct: f64,
}

impl Default for Margins {
    fn default() -> Margins {
        Margins {
            pass_pct: 5.0,
            latency_pct: 20.0,
        }
    }
}

/// The verdict on a candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Replace the serving model.
    pub promote: bool,
    /// Why not (empty when promoted).
    pub reasons: Vec<String>,
}

/// Decides whether `candidate` replaces the model whose report is `current` (`None` when
/// nothing serves yet: then the gates alone decide).
pub fn decide(current: Option<&Report>, candidate: &Report, m: &Margins) -> Decision {
    let mut reasons: Vec<String> = candidate
        .failed_gates()
        .into_iter()
        .map(|g| format!("gate failed: {g}"))
        .collect();
    if let Some(cur) = current {
        for c in &candidate.categories {
            if let Some(old) = cur.category(&c.name) {
                if c.pass_pct + m.pass_pct < old.pass_pct {
                    reasons.push(format!(
                        "{}: {:.0}% passed, the serving model {:.0}% (margin {} points)",
                        c.name, c.pass_pct, old.pass_pct, m.pass_pct
                    ));
                }
            }
        }
        let (new, old) = (candidate.pass_pct(), cur.pass_pct());
        if new + m.pass_pct < old {
            reasons.push(format!(
                "overall: {new:.0}% passed, the serving model {old:.0}% (margin {} points)",
                m.pass_pct
            ));
        }
        let grow = 1.0 + m.latency_pct / 100.0;
        if let (Some(new), Some(old)) = (candidate.latency.ttft_ms, cur.latency.ttft_ms) {
            if new.p50 > old.p50 * grow {
                reasons.push(format!(
                    "ttft p50 {:.1} ms, the serving model {:.1} ms (margin {}%)",
                    new.p50, old.p50, m.latency_pct
                ));
            }
        }
        if let (Some(new), Some(old)) = (candidate.latency.decode_tok_s, cur.latency.decode_tok_s) {
            if new.p50 * grow < old.p50 {
                reasons.push(format!(
                    "decode p50 {:.1} tok/s, the serving model {:.1} tok/s (margin {}%)",
                    new.p50, old.p50, m.latency_pct
                ));
            }
        }
    }
    Decision {
        promote: reasons.is_empty(),
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{CategoryResult, Latency, Stat, REPORT_FORMAT};

    fn report(pcts: &[(&str, u64, u64)], ttft: f64, decode: f64) -> Report {
        let categories = pcts
            .iter()
            .map(|&(n, passed, total)| CategoryResult {
                name: n.into(),
                passed,
                total,
                pass_pct: 100.0 * passed as f64 / total as f64,
                min_pass_pct: 50.0,
                gate_passed: 2 * passed >= total,
            })
            .collect::<Vec<_>>();
        let stat = |v| {
            Some(Stat {
                n: 1,
                p50: v,
                p95: v,
                mean: v,
            })
        };
        Report {
            format: REPORT_FORMAT.into(),
            label: "x".into(),
            endpoint: "http://h".into(),
            model: "m".into(),
            suite: "s".into(),
            suite_origin: "o".into(),
            started_unix: 0,
            runs: 1,
            warmup: 0,
            samples: vec![],
            passed: categories.iter().all(|c| c.gate_passed),
            categories,
            latency: Latency {
                ttft_ms: stat(ttft),
                decode_tok_s: stat(decode),
                ..Latency::default()
            },
            latency_gates: vec![],
            errors: 0,
        }
    }

    #[test]
    fn better_or_equal_within_margins_is_promoted() {
        let m = Margins::default();
        let cur = report(&[("tools", 6, 10)], 100.0, 30.0);
        assert!(decide(Some(&cur), &report(&[("tools", 9, 10)], 110.0, 27.0), &m).promote);
        assert!(decide(None, &report(&[("tools", 5, 10)], 900.0, 1.0), &m).promote);
    }

    #[test]
    fn worse_candidates_are_rejected_with_reasons() {
        let m = Margins::default();
        let cur = report(&[("tools", 9, 10)], 100.0, 30.0);
        let d = decide(Some(&cur), &report(&[("tools", 7, 10)], 100.0, 30.0), &m);
        assert!(!d.promote);
        assert!(
            d.reasons[0].starts_with("tools: 70% passed, the serving model 90%"),
            "{d:?}"
        );
        let d = decide(Some(&cur), &report(&[("tools", 9, 10)], 130.0, 20.0), &m);
        assert_eq!(d.reasons.len(), 2, "{d:?}");
        let d = decide(None, &report(&[("tools", 4, 10)], 1.0, 100.0), &m);
        assert!(d.reasons[0].starts_with("gate failed: tools 4/10"), "{d:?}");
    }
}
