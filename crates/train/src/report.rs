//! `qatflow report RUN_DIR`: SVG plots of loss and learning rate from the metrics file,
//! and a one-screen summary of the run.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::metrics::{read_metrics, StepMetrics, METRICS_FILE};

/// Errors of building a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The metrics file is missing or unreadable.
    #[error("{path}: {source}; is this a qatflow run directory (RUN_DIR of `qatflow train`)?")]
    Metrics {
        /// The metrics file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file has no steps yet.
    #[error("{0}: no completed steps yet")]
    Empty(PathBuf),
    /// Drawing failed.
    #[error("writing {path}: {message}")]
    Plot {
        /// The SVG file.
        path: PathBuf,
        /// The drawing backend's message.
        message: String,
    },
}

/// What a report wrote and found.
#[derive(Debug, Clone)]
pub struct Report {
    /// The loss plot.
    pub loss_svg: PathBuf,
    /// The learning-rate plot.
    pub lr_svg: PathBuf,
    /// The metrics, in step order.
    pub steps: Vec<StepMetrics>,
}

impl Report {
    /// A few lines: steps, first/last/min loss, mean throughput.
    pub fn summary(&self) -> String {
        let s = &self.steps;
        let first = &s[0];
        let last = &s[s.len() - 1];
        let min = s.iter().map(|m| m.loss).fold(f32::INFINITY, f32::min);
        let tps: Vec<f64> = s.iter().map(|m| m.tokens_per_s).collect();
        let mean_tps = tps.iter().sum::<f64>() / tps.len() as f64;
        let tail = &s[s.len().saturating_sub(10)..];
        let tail_loss = tail.iter().map(|m| m.loss).sum::<f32>() / tail.len() as f32;
        format!(
            "steps        {} (epochs {}..={})\n\
             loss         first {:.4}  last {:.4}  min {:.4}  mean of last {} {:.4}\n\
             lr           last {:.3e}\n\
             grad norm    last {:.3}\n\
             throughput   {:.0} tokens/s mean over steps\n\
             elapsed      {:.1} s\n\
             plots        {}\n             \
             {}",
            last.step,
            first.epoch,
            last.epoch,
            first.loss,
            last.loss,
            min,
            tail.len(),
            tail_loss,
            last.lr,
            last.grad_norm,
            mean_tps,
            last.elapsed_s,
            self.loss_svg.display(),
            self.lr_svg.display()
        )
    }
}

fn plot(path: &Path, title: &str, y_label: &str, points: &[(f64, f64)]) -> Result<(), ReportError> {
    let err = |e: String| ReportError::Plot {
        path: path.to_path_buf(),
        message: e,
    };
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let (mut y_min, mut y_max) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
    if y_max.is_nan() || y_min.is_nan() || y_max <= y_min {
        y_min -= 0.5;
        y_max += 0.5;
    }
    let pad = (y_max - y_min) * 0.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(LineSeries::new(points.iter().copied(), &BLUE))
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Writes `RUN_DIR/report/loss.svg` and `lr.svg` from `RUN_DIR/metrics.jsonl`.
pub fn report(run_dir: &Path) -> Result<Report, ReportError> {
    let path = run_dir.join(METRICS_FILE);
    let steps = read_metrics(&path).map_err(|source| ReportError::Metrics {
        path: path.clone(),
        source,
    })?;
    if steps.is_empty() {
        return Err(ReportError::Empty(path));
    }
    let out = run_dir.join("report");
    std::fs::create_dir_all(&out).map_err(|e| ReportError::Plot {
        path: out.clone(),
        message: e.to_string(),
    })?;
    let loss_svg = out.join("loss.svg");
    let lr_svg = out.join("lr.svg");
    let loss: Vec<(f64, f64)> = steps
        .iter()
        .map(|m| (m.step as f64, f64::from(m.loss)))
        .collect();
    let lr: Vec<(f64, f64)> = steps.iter().map(|m| (m.step as f64, m.lr)).collect();
    plot(
        &loss_svg,
        "training loss (assistant tokens)",
        "mean NLL",
        &loss,
    )?;
    plot(&lr_svg, "learning rate", "lr", &lr)?;
    Ok(Report {
        loss_svg,
        lr_svg,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_svgs_and_summary() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = crate::metrics::MetricsWriter::open(dir.path(), 0).unwrap();
        for step in 1..=20u64 {
            w.write(&StepMetrics {
                step,
                epoch: (step / 10) as u32,
                loss: 3.0 / step as f32,
                lr: 1e-5,
                grad_norm: 1.0,
                tokens: 100,
                tokens_per_s: 50.0,
                elapsed_s: step as f64,
            })
            .unwrap();
        }
        let r = report(dir.path()).unwrap();
        let svg = std::fs::read_to_string(&r.loss_svg).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "{}",
            &svg[..100]
        );
        let s = r.summary();
        assert!(
            s.contains("first 3.0000") && s.contains("last 0.1500"),
            "{s}"
        );
        let err = report(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl"), "{err}");
    }
}
