//! Server metrics in the Prometheus text format (`GET /metrics`): request and error
//! counters, time-to-first-token and per-token latency histograms, token counters, the
//! queue depth and the number of sequences being decoded.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// A Prometheus histogram with fixed upper bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    /// An empty histogram with these bucket upper bounds (ascending; `+Inf` is implied).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            state: Mutex::new((vec![0; bounds.len()], 0.0, 0)),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in self.bounds.iter().enumerate() {
            if value <= *b {
                s.0[i] += 1;
            }
        }
        s.1 += value;
        s.2 += 1;
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).2
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&s.0) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", s.2);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", s.1, s.2);
    }
}

const TTFT_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const TOKEN_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.033, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Every metric of one server.
#[derive(Debug)]
pub struct Metrics {
    /// Chat completion requests received.
    pub requests: AtomicU64,
    /// Requests answered with an error status.
    pub errors: AtomicU64,
    /// Prompt tokens processed.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub prefix_cache_hit_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Tool-call blocks that did not parse (left in the content).
    pub tool_calls_malformed: AtomicU64,
    /// Requests waiting for the model worker.
    pub queue_depth: AtomicUsize,
    /// Sequences being decoded.
    pub active_sequences: AtomicUsize,
    /// Seconds from a request's arrival to its first generated token.
    pub ttft: Histogram,
    /// Seconds between consecutive generated tokens of a sequence.
    pub token_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            prefix_cache_hit_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            tool_calls_malformed: AtomicU64::new(0),
            queue_depth: AtomicUsize::new(0),
            active_sequences: AtomicUsize::new(0),
            ttft: Histogram::new(TTFT_BOUNDS),
            token_latency: Histogram::new(TOKEN_BOUNDS),
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, u64); 6] = [
            (
                "qatflow_serve_requests_total",
                "Chat completion requests received.",
                self.requests.load(Ordering::Relaxed),
            ),
            (
                "qatflow_serve_errors_total",
                "Requests answered with an error status.",
                self.errors.load(Ordering::Relaxed),
            ),
            (
                "qatflow_serve_prompt_tokens_total",
                "Prompt tokens processed.",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "qatflow_serve_prefix_cache_hit_tokens_total",
                "Prompt tokens served from the prefix cache.",
                self.prefix_cache_hit_tokens.load(Ordering::Relaxed),
            ),
            (
                "qatflow_serve_generated_tokens_total",
                "Tokens generated.",
                self.generated_tokens.load(Ordering::Relaxed),
            ),
            (
                "qatflow_serve_tool_calls_malformed_total",
                "Tool-call blocks that did not parse and were returned as text.",
                self.tool_calls_malformed.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let gauges = [
            (
                "qatflow_serve_queue_depth",
                "Requests waiting for the model worker.",
                self.queue_depth.load(Ordering::Relaxed),
            ),
            (
                "qatflow_serve_active_sequences",
                "Sequences being decoded.",
                self.active_sequences.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        self.ttft.render(
            "qatflow_serve_time_to_first_token_seconds",
            "Seconds from request arrival to the first generated token.",
            &mut out,
        );
        self.token_latency.render(
            "qatflow_serve_time_per_output_token_seconds",
            "Seconds between consecutive generated tokens of a sequence.",
            &mut out,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.ttft.observe(0.003);
        m.ttft.observe(0.2);
        m.ttft.observe(100.0);
        m.requests.fetch_add(2, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("qatflow_serve_requests_total 2\n"), "{text}");
        assert!(text.contains("qatflow_serve_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("qatflow_serve_time_to_first_token_seconds_bucket{le=\"0.25\"} 2\n"));
        assert!(text.contains("qatflow_serve_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("qatflow_serve_time_to_first_token_seconds_count 3\n"));
        assert!(
            text.contains("# TYPE qatflow_serve_queue_depth gauge\nqatflow_serve_queue_depth 0\n")
        );
    }
}
