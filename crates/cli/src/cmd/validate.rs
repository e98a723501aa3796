//! `qatflow validate`: gates report for a JSONL dataset.

use crate::output::table;
use crate::progress::Bar;
use anyhow::bail;
use qatflow_core::JsonlReader;
use qatflow_gates::Check;
use qatflow_gates::{validate, GateProfile, ValidationReport};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Arguments of `qatflow validate`.
#[derive(clap::Args)]
pub struct Args {
    /// The dataset: OpenAI chat JSONL, one {"messages": [...]} object per line.
    pub file: PathBuf,

    /// Gate profile: a built-in name (v3, v4), a name under config/gates/, or a .toml path.
    #[arg(long, default_value = "v4")]
    pub profile: String,

    /// Allowed tool names, comma-separated; replaces the profile's tool list.
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub tools: Option<Vec<String>>,

    /// Print a JSON report instead of tables.
    #[arg(long)]
    pub json: bool,

    /// How many worst offenders to list.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub top: usize,

    /// Also render every conversation with this model directory's chat template, as
    /// training does, and fail when a render drops a reply, a tool call or a tool result.
    #[arg(long, value_name = "MODEL_DIR")]
    pub template: Option<PathBuf>,
}

/// Loads the profile named by `--profile`, with `--tools` applied.
pub fn load_profile(profile: &str, tools: Option<Vec<String>>) -> anyhow::Result<GateProfile> {
    let p = GateProfile::resolve(profile)?;
    Ok(match tools {
        Some(t) => p.with_tools(t),
        None => p,
    })
}

/// Validates `file` with a progress bar; an empty file is an error.
pub fn validate_file(file: &Path, profile: &GateProfile) -> anyhow::Result<ValidationReport> {
    let reader = JsonlReader::open(file)?;
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let bar = Bar::bytes("validating");
    qatflow_core::Progress::set_total(&bar, size);
    let report = validate(reader, profile, &bar);
    bar.finish();
    let report = report?;
    if report.stats.lines == 0 {
        bail!(
            "{}: empty file, no conversations to validate; expected one JSON object per line",
            file.display()
        );
    }
    Ok(report)
}

/// Fails (exit 2) when no line of the report is a usable conversation: the input is not
/// a dataset at all, which is not the same as a dataset that fails its gates.
fn require_usable(file: &Path, report: &ValidationReport) -> anyhow::Result<()> {
    if report.stats.conversations == 0 {
        let first = report
            .flagged_lines
            .first()
            .and_then(|l| l.findings.first().map(|f| (l.line, f.detail.clone())));
        let why = first
            .map(|(n, d)| format!(" (line {n}: {})", truncate(&d, 160)))
            .unwrap_or_default();
        bail!(
            "{}: no usable conversation in {} lines{why}; expected OpenAI chat JSONL, one {{\"messages\": [...]}} object per line",
            file.display(),
            report.stats.lines
        );
    }
    Ok(())
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let profile = load_profile(&args.profile, args.tools)?;
    let report = {
        let _span =
            tracing::info_span!("validate", file = %args.file.display(), profile = %profile.name)
                .entered();
        validate_file(&args.file, &profile)?
    };
    report_unreadable_lines(&args.file, &report);
    require_usable(&args.file, &report)?;
    let audit = match &args.template {
        Some(dir) => Some(super::render_audit::audit_file(&args.file, dir)?),
        None => None,
    };
    if let Some(audit) = &audit {
        super::render_audit::report(&args.file, audit);
    }
    let lossless = audit.as_ref().is_none_or(|a| a.failures.is_empty());
    if args.json {
        let mut out = json_report(&args.file, &report);
        if let Some(audit) = &audit {
            out["render_audit"] = serde_json::to_value(audit)?;
            out["passed"] = json!(report.passed() && lossless);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", text_report(&args.file, &report, args.top));
    }
    Ok(if report.passed() && lossless {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Lines that are not JSON at all get one stderr line each (`FILE:LINE: ...`), like a
/// compiler diagnostic, besides their place in the report.
fn report_unreadable_lines(file: &Path, r: &ValidationReport) {
    const MAX: usize = 20;
    let bad: Vec<_> = r
        .flagged_lines
        .iter()
        .filter(|l| l.flags.contains(&Check::InvalidJson))
        .collect();
    for l in bad.iter().take(MAX) {
        let detail = l.findings.first().map(|f| f.detail.as_str()).unwrap_or("");
        eprintln!(
            "{}:{}: invalid_json: {}",
            file.display(),
            l.line,
            truncate(detail, 160)
        );
    }
    if bad.len() > MAX {
        eprintln!(
            "{}: … and {} more invalid lines",
            file.display(),
            bad.len() - MAX
        );
    }
}

fn json_report(file: &Path, r: &ValidationReport) -> serde_json::Value {
    json!({
        "file": file.display().to_string(),
        "profile": r.profile,
        "passed": r.passed(),
        "stats": {
            "lines": r.stats.lines,
            "conversations": r.stats.conversations,
            "clean_conversations": r.stats.clean_conversations,
            "tool_call_conversations": r.stats.tool_call_conversations,
            "text_replies": r.stats.text_replies,
            "flagged": r.stats.flagged.iter().map(|(c, n)| (c.name().to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        },
        "gates": r.gates,
        "conversations": r.flagged_lines.iter().map(|l| json!({
            "line": l.line,
            "flags": l.flags,
            "findings": l.findings,
        })).collect::<Vec<_>>(),
    })
}

fn text_report(file: &Path, r: &ValidationReport, top: usize) -> String {
    let s = &r.stats;
    let mut out = format!(
        "{}: {} lines, {} usable conversations, {} clean; profile {}\n\n",
        file.display(),
        s.lines,
        s.conversations,
        s.clean_conversations,
        r.profile
    );
    let rows: Vec<Vec<String>> = r
        .gates
        .iter()
        .map(|g| {
            vec![
                g.name.to_string(),
                g.format_value(g.value),
                format!("{} {}", g.op.symbol(), g.format_value(g.threshold)),
                if g.passed { "pass" } else { "FAIL" }.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&["gate", "value", "threshold", "result"], &rows));
    if !s.flagged.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = s
            .flagged
            .iter()
            .map(|(c, n)| vec![c.name().to_string(), n.to_string()])
            .collect();
        out.push_str(&table(&["check", "conversations flagged"], &rows));
    }
    let worst = r.worst_offenders(top);
    if !worst.is_empty() {
        out.push_str(&format!(
            "\nworst offenders (of {} flagged lines)\n",
            r.flagged_lines.len()
        ));
        for l in worst {
            let flags: Vec<&str> = l.flags.iter().map(|c| c.name()).collect();
            let detail = l.findings.first().map(|f| f.detail.as_str()).unwrap_or("");
            out.push_str(&format!(
                "  line {}: {} ({})\n",
                l.line,
                flags.join(", "),
                truncate(detail, 100)
            ));
        }
    }
    out.push_str(&format!(
        "\n{}\n",
        if r.passed() {
            "all gates pass"
        } else {
            "gates FAILED"
        }
    ));
    out
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}
