//! `indicatif` progress bars behind the libraries' [`Progress`] trait. Bars draw only when
//! stderr is a terminal, so logs and CI output stay clean.

use indicatif::{ProgressBar, ProgressStyle};
use qatflow_core::Progress;

/// A byte- or item-counting progress bar.
pub struct Bar(ProgressBar);

impl Bar {
    /// A bar counting bytes, with throughput and ETA.
    pub fn bytes(prefix: &str) -> Bar {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(prefix.to_string());
        Bar(bar)
    }

    /// A bar counting items (`unit` names them, e.g. `sequences`), with ETA.
    pub fn items(prefix: &str, unit: &str) -> Bar {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} eta {{eta}}"
            ))
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(prefix.to_string());
        Bar(bar)
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Bar {
    fn set_total(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
    fn message(&self, msg: &str) {
        self.0.set_message(msg.to_string());
    }
}
