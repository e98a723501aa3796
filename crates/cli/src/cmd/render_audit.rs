//! `qatflow validate --template MODEL_DIR`: renders every conversation with a model's chat
//! template, exactly as training does, and reports each one whose render drops something it
//! says (a reply, a tool call, a tool result) or cannot be masked.

use qatflow_core::JsonlReader;
use qatflow_model::{ModelFamily, Tokenizer};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// One conversation the render audit refused.
#[derive(Debug, Serialize)]
pub struct Failure {
    /// 1-based line of the JSONL file.
    pub line: usize,
    /// What was lost or why it could not be rendered.
    pub error: String,
}

/// The audit of a whole file.
#[derive(Debug, Serialize)]
pub struct RenderAudit {
    /// The model directory whose template was used.
    pub template: String,
    /// Conversations rendered.
    pub checked: usize,
    /// Conversations refused.
    pub failures: Vec<Failure>,
}

/// Loads `model_dir`'s tokenizer and template and audits every readable conversation of
/// `file` (lines that are not JSON objects with `messages` are the gates' business).
pub fn audit_file(file: &Path, model_dir: &Path) -> anyhow::Result<RenderAudit> {
    let config: Value = std::fs::read_to_string(model_dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let tokenizer = Tokenizer::from_dir(model_dir, ModelFamily::detect(&config))?;
    let mut audit = RenderAudit {
        template: model_dir.display().to_string(),
        checked: 0,
        failures: Vec::new(),
    };
    for line in JsonlReader::open(file)? {
        let line = line?;
        let Ok(text) = line.text else { continue };
        let Ok(value) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let Some(messages) = value.get("messages").and_then(Value::as_array) else {
            continue;
        };
        let tools = value
            .get("tools")
            .and_then(Value::as_array)
            .map(Vec::as_slice);
        audit.checked += 1;
        if let Err(e) = tokenizer.encode_conversation(messages, tools, None) {
            audit.failures.push(Failure {
                line: line.number,
                error: e.to_string(),
            });
        }
    }
    Ok(audit)
}

/// Prints each failure as `FILE:LINE: render: ...` on stderr (at most 20) and a summary.
pub fn report(file: &Path, audit: &RenderAudit) {
    const MAX: usize = 20;
    for f in audit.failures.iter().take(MAX) {
        eprintln!("{}:{}: render: {}", file.display(), f.line, f.error);
    }
    if audit.failures.len() > MAX {
        eprintln!(
            "{}: … and {} more conversations the template cannot render losslessly",
            file.display(),
            audit.failures.len() - MAX
        );
    }
    eprintln!(
        "render audit with {}: {} conversations, {} lose content",
        audit.template,
        audit.checked,
        audit.failures.len()
    );
}
