//! `qatflow bench-gates`: validation throughput on one core, median of several runs.

use anyhow::{bail, Context};
use qatflow_core::{Conversation, JsonlReader, NoProgress};
use qatflow_gates::{validate, GateProfile};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Arguments of `qatflow bench-gates`.
#[derive(clap::Args)]
pub struct Args {
    /// Dataset whose lines are cycled to build the benchmark file.
    #[arg(long, default_value = "config/examples/qat_v4_example.jsonl")]
    pub input: PathBuf,
    /// Lines in the benchmark file.
    #[arg(long, default_value_t = 100_000)]
    pub lines: usize,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Gate profile.
    #[arg(long, default_value = "v4")]
    pub profile: String,
    /// Also write the JSON result to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Runs the benchmark.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if a.runs == 0 || a.lines == 0 {
        bail!("--runs and --lines must be at least 1");
    }
    let profile = GateProfile::resolve(&a.profile)?;
    let source: Vec<Conversation> = JsonlReader::open(&a.input)?
        .filter_map(|l| l.ok()?.text.ok())
        .filter_map(|t| Conversation::from_json(&t).ok())
        .collect();
    if source.is_empty() {
        bail!(
            "{}: no parseable conversations to build the benchmark from",
            a.input.display()
        );
    }
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let path = dir.path().join("bench.jsonl");
    let mut bytes = 0u64;
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for i in 0..a.lines {
            let mut c = source[i % source.len()].clone();
            c.extra.insert("bench_copy".into(), json!(i));
            let line = c.to_json();
            bytes += line.len() as u64 + 1;
            writeln!(w, "{line}")?;
        }
        w.flush()?;
    }
    // One warm-up pass so the file is in the page cache, then the timed runs.
    validate(JsonlReader::open(&path)?, &profile, &NoProgress)?;
    let mut secs = Vec::with_capacity(a.runs);
    let mut conversations = 0;
    for _ in 0..a.runs {
        let t = Instant::now();
        let report = validate(JsonlReader::open(&path)?, &profile, &NoProgress)?;
        secs.push(t.elapsed().as_secs_f64());
        conversations = report.stats.lines;
    }
    let mut sorted = secs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let result = json!({
        "benchmark": "validate",
        "machine": machine(),
        "threads": 1,
        "profile": profile.name,
        "lines": conversations,
        "bytes": bytes,
        "runs_s": secs,
        "median_s": median,
        "conversations_per_s": conversations as f64 / median,
        "mb_per_s": bytes as f64 / median / 1e6,
        "target_conversations_per_s": 50_000,
    });
    let text = serde_json::to_string_pretty(&result)?;
    println!("{text}");
    if let Some(out) = a.out {
        std::fs::write(&out, format!("{text}\n"))
            .with_context(|| format!("{}: cannot write", out.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// CPU model and core count, from /proc/cpuinfo where available.
fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}
