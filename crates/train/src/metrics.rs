//! The run's metrics file (`RUN_DIR/metrics.jsonl`): one JSON object per optimizer step,
//! appended and flushed as training goes; on resume, lines past the resumed step are
//! dropped so the file always describes the run that the checkpoints continue. Also the
//! in-memory [`StepStats`] an optimizer step returns.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One optimizer step's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps completed (1-based).
    pub step: u64,
    /// Epoch of the step (0-based).
    pub epoch: u32,
    /// Mean target-token NLL of the step.
    pub loss: f32,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Tokens (all positions) processed in the step.
    pub tokens: u64,
    /// Tokens per second of the step.
    pub tokens_per_s: f64,
    /// Seconds since the run (or resumption) started.
    pub elapsed_s: f64,
}

/// The metrics file name inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Appends step metrics to a run's metrics file.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsWriter {
    /// Opens `run_dir/metrics.jsonl`, keeping only lines with `step <= keep_until`.
    pub fn open(run_dir: &Path, keep_until: u64) -> std::io::Result<MetricsWriter> {
        let path = run_dir.join(METRICS_FILE);
        let kept: Vec<StepMetrics> = read_metrics(&path)
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.step <= keep_until)
            .collect();
        let mut text = String::new();
        for m in &kept {
            text.push_str(&serde_json::to_string(m).expect("metrics serialize"));
            text.push('\n');
        }
        std::fs::write(&path, text)?;
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        Ok(MetricsWriter { path, file })
    }

    /// Appends one line and flushes it.
    pub fn write(&mut self, m: &StepMetrics) -> std::io::Result<()> {
        let mut line = serde_json::to_string(m).expect("metrics serialize");
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.flush()
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a metrics file; a torn last line (a crash mid-write) is skipped.
pub fn read_metrics(path: &Path) -> std::io::Result<Vec<StepMetrics>> {
    let file = std::fs::File::open(path)?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        if let Ok(m) = serde_json::from_str::<StepMetrics>(&line?) {
            out.push(m);
        }
    }
    Ok(out)
}

/// Statistics of one optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Mean target NLL over the step's examples.
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Tokens processed (all positions).
    pub tokens: u64,
    /// Loss-target tokens.
    pub targets: u64,
    /// Seconds of forward + backward passes and gradient accumulation (up to the gradient
    /// norm, which waits for them).
    pub forward_backward_s: f64,
    /// Seconds of the optimizer update, waited for by reading one parameter back.
    pub optimizer_s: f64,
}
