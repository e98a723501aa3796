//! Running a suite against an endpoint: every prompt is sent with the production system
//! prompt and the tool set, one request at a time (so latency is single-stream), checked,
//! and summed up per category and over latency.

use crate::checks::{self, CheckContext};
use crate::client::{Client, Sample};
use crate::report::{
    CategoryResult, Latency, LatencyGateResult, Report, SampleReport, Stat, REPORT_FORMAT,
};
use crate::suite::{CategorySuite, Prompt, Suite};
use crate::BenchError;
use qatflow_core::Progress;
use qatflow_gates::GateProfile;
use qatflow_teacher::{TeacherConfig, ToolSpec};
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What every request carries besides the prompt: the production system prompt, the tool
/// set, and the gate profile's check settings.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The system message of every request.
    pub system_prompt: String,
    /// The tools of every request.
    pub tools: Vec<ToolSpec>,
    /// `verbose` threshold (the gate profile's `max_sentences`).
    pub max_sentences: usize,
}

impl Setup {
    /// The system prompt and tools of `teacher_dir` (default: `config/teacher/` or the
    /// built-in copy) and the check settings of the suite's gate profile.
    pub fn resolve(suite: &Suite, teacher_dir: Option<&Path>) -> Result<Setup, BenchError> {
        let teacher =
            TeacherConfig::resolve(teacher_dir).map_err(|e| BenchError::Setup(e.to_string()))?;
        let profile =
            GateProfile::resolve(&suite.profile).map_err(|e| BenchError::Setup(e.to_string()))?;
        Ok(Setup {
            system_prompt: teacher.production_prompt,
            tools: teacher.tools,
            max_sentences: profile.checks.max_sentences,
        })
    }

    fn context(&self) -> CheckContext {
        CheckContext {
            max_sentences: self.max_sentences,
            tools: self
                .tools
                .iter()
                .map(|t| (t.name.clone(), t.parameters.clone()))
                .collect(),
        }
    }
}

/// How a run is made.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The run's name in comparisons.
    pub label: String,
    /// The `model` field of every request.
    pub model: String,
    /// Measured repetitions of each prompt.
    pub runs: u32,
    /// Unmeasured requests before the run (the first prompts of the suite).
    pub warmup: u32,
    /// Longest wait for any chunk of a response.
    pub idle_timeout: Duration,
    /// Longest wait for a whole response.
    pub request_timeout: Duration,
}

impl RunOptions {
    /// One run of each prompt after one warm-up request, with 60 s / 300 s timeouts.
    pub fn new(label: &str, model: &str) -> RunOptions {
        RunOptions {
            label: label.to_string(),
            model: model.to_string(),
            runs: 1,
            warmup: 1,
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(300),
        }
    }
}

/// The Chat Completions body of `prompt` (without `stream`, which the client sets).
pub fn request_body(
    suite: &Suite,
    setup: &Setup,
    model: &str,
    prompt: &Prompt,
) -> serde_json::Value {
    let mut messages = vec![serde_json::json!({"role": "system", "content": setup.system_prompt})];
    messages.extend(prompt.history.iter().map(|m| m.to_openai()));
    if let Some(user) = &prompt.user {
        messages.push(serde_json::json!({"role": "user", "content": user}));
    }
    let tools: Vec<serde_json::Value> = setup
        .tools
        .iter()
        .map(|t| {
            serde_json::json!({"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.parameters}})
        })
        .collect();
    let mut body = serde_json::json!({
        "model": model,
        "messages": messages,
        "tools": tools,
        "tool_choice": "auto",
        "max_tokens": prompt.max_tokens.unwrap_or(suite.max_tokens),
        "temperature": suite.temperature,
        "chat_template_kwargs": {"enable_thinking": suite.enable_thinking},
    });
    if let Some(seed) = suite.seed {
        body["seed"] = seed.into();
    }
    body
}

/// Every prompt with its category, in suite order.
fn all_prompts(suite: &Suite) -> Vec<(&CategorySuite, &Prompt)> {
    let mut out = Vec::new();
    for c in &suite.categories {
        for p in &c.prompts {
            out.push((c, p));
        }
    }
    out
}

async fn send(
    client: &Client,
    body: &serde_json::Value,
    opts: &RunOptions,
    cancel: &CancellationToken,
) -> Result<Sample, BenchError> {
    tokio::select! {
        r = client.chat_stream(body, opts.idle_timeout, opts.request_timeout) => r,
        _ = cancel.cancelled() => Err(BenchError::Cancelled),
    }
}

/// Runs `suite` against `client`; `progress` counts measured requests.
pub async fn run(
    client: &Client,
    suite: &Suite,
    setup: &Setup,
    opts: &RunOptions,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<Report, BenchError> {
    if opts.runs == 0 {
        return Err(BenchError::Setup("runs must be at least 1".into()));
    }
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let all = all_prompts(suite);
    for i in 0..opts.warmup as usize {
        let (_, prompt) = all[i % all.len()];
        let body = request_body(suite, setup, &opts.model, prompt);
        send(client, &body, opts, cancel)
            .await
            .map_err(|e| match e {
                BenchError::Cancelled => e,
                other => BenchError::Setup(format!(
                    "the warm-up request failed, so the endpoint is not usable: {other}"
                )),
            })?;
    }
    progress.set_total((all.len() * opts.runs as usize) as u64);
    let ctx = setup.context();
    let mut samples = Vec::new();
    let mut first_error = None;
    for run in 0..opts.runs {
        for (c, prompt) in all_prompts(suite) {
            if cancel.is_cancelled() {
                return Err(BenchError::Cancelled);
            }
            progress.message(&prompt.id);
            let body = request_body(suite, setup, &opts.model, prompt);
            let sample = match send(client, &body, opts, cancel).await {
                Ok(s) => Ok(s),
                Err(BenchError::Cancelled) => return Err(BenchError::Cancelled),
                Err(e) => Err(e.to_string()),
            };
            samples.push(sample_report(
                &c.category.checks,
                &c.category.name,
                run,
                prompt,
                sample,
                &ctx,
                &mut first_error,
            ));
            progress.advance(1);
        }
    }
    if samples.iter().all(|s| s.error.is_some()) {
        return Err(BenchError::Setup(format!(
            "every request failed; the first: {}",
            first_error.unwrap_or_default()
        )));
    }
    Ok(summarize(suite, opts, client.base(), started_unix, samples))
}

fn sample_report(
    counted: &[String],
    category: &str,
    run: u32,
    prompt: &Prompt,
    sample: Result<Sample, String>,
    ctx: &CheckContext,
    first_error: &mut Option<String>,
) -> SampleReport {
    match sample {
        Ok(s) => {
            let findings = checks::check(prompt, &s, ctx);
            let failures: Vec<_> = findings
                .iter()
                .filter(|f| counted.contains(&f.check))
                .cloned()
                .collect();
            SampleReport {
                prompt: prompt.id.clone(),
                category: category.to_string(),
                run,
                passed: failures.is_empty(),
                failures,
                findings,
                error: None,
                decode_tok_s: s.decode_tok_s(),
                content: s.content,
                reasoning_chars: s.reasoning.chars().count() as u64,
                tool_calls: s.tool_calls,
                ttft_ms: s.ttft_ms,
                ttft_output_ms: s.ttft_output_ms,
                total_ms: Some(s.total_ms),
                prompt_tokens: s.prompt_tokens,
                completion_tokens: s.completion_tokens,
            }
        }
        Err(e) => {
            tracing::warn!(prompt = %prompt.id, "request failed: {e}");
            first_error.get_or_insert_with(|| e.clone());
            SampleReport {
                prompt: prompt.id.clone(),
                category: category.to_string(),
                run,
                passed: false,
                failures: vec![],
                findings: vec![],
                error: Some(e),
                content: String::new(),
                reasoning_chars: 0,
                tool_calls: vec![],
                ttft_ms: None,
                ttft_output_ms: None,
                decode_tok_s: None,
                total_ms: None,
                prompt_tokens: None,
                completion_tokens: None,
            }
        }
    }
}

/// Category results, latency statistics and gates of measured samples.
pub fn summarize(
    suite: &Suite,
    opts: &RunOptions,
    endpoint: &str,
    started_unix: u64,
    samples: Vec<SampleReport>,
) -> Report {
    let categories: Vec<CategoryResult> = suite
        .categories
        .iter()
        .map(|c| {
            let of: Vec<&SampleReport> = samples
                .iter()
                .filter(|s| s.category == c.category.name)
                .collect();
            let passed = of.iter().filter(|s| s.passed).count() as u64;
            let total = of.len() as u64;
            let pass_pct = if total == 0 {
                0.0
            } else {
                100.0 * passed as f64 / total as f64
            };
            CategoryResult {
                name: c.category.name.clone(),
                passed,
                total,
                pass_pct,
                min_pass_pct: c.category.min_pass_pct,
                gate_passed: total > 0 && pass_pct + 1e-9 >= c.category.min_pass_pct,
            }
        })
        .collect();
    let collect = |f: fn(&SampleReport) -> Option<f64>| -> Vec<f64> {
        samples.iter().filter_map(f).collect()
    };
    let latency = Latency {
        ttft_ms: Stat::of(&collect(|s| s.ttft_ms)),
        ttft_output_ms: Stat::of(&collect(|s| s.ttft_output_ms)),
        decode_tok_s: Stat::of(&collect(|s| s.decode_tok_s)),
        total_ms: Stat::of(&collect(|s| s.total_ms)),
    };
    let mut latency_gates = Vec::new();
    if let Some(max) = suite.latency.max_ttft_p50_ms {
        let value = latency.ttft_ms.map(|s| s.p50);
        latency_gates.push(LatencyGateResult {
            name: "ttft_p50_ms".into(),
            value,
            threshold: format!("<= {max}"),
            passed: value.is_some_and(|v| v <= max),
        });
    }
    if let Some(min) = suite.latency.min_decode_tok_s_p50 {
        let value = latency.decode_tok_s.map(|s| s.p50);
        latency_gates.push(LatencyGateResult {
            name: "decode_tok_s_p50".into(),
            value,
            threshold: format!(">= {min}"),
            passed: value.is_some_and(|v| v >= min),
        });
    }
    let errors = samples.iter().filter(|s| s.error.is_some()).count() as u64;
    let passed = categories.iter().all(|c| c.gate_passed) && latency_gates.iter().all(|g| g.passed);
    Report {
        format: REPORT_FORMAT.into(),
        label: opts.label.clone(),
        endpoint: endpoint.to_string(),
        model: opts.model.clone(),
        suite: suite.name.clone(),
        suite_origin: suite.origin.clone(),
        started_unix,
        runs: opts.runs,
        warmup: opts.warmup,
        samples,
        categories,
        latency,
        latency_gates,
        errors,
        passed,
    }
}
