//! Runs a generation with the offline backend (or, with `--teacher-command`, the
//! claude-cli backend running that command) into a database, printing one line per
//! stored batch (`stored CATEGORY INDEX`) and the final report as JSON. The kill -9 tests
//! drive it; it also shows the library API the CLI calls.
//!
//! ```text
//! cargo run -p qatflow-teacher --example generate -- --db /tmp/db [--resume]
//!     [--per-batch 25] [--concurrency 4] [--category C] [--count N] [--seed S]
//!     [--delay-ms D] [--validate-only] [--teacher-command "claude -p ..."]
//!     [--timeout SECS]
//! ```

use qatflow_core::NoProgress;
use qatflow_gates::GateProfile;
use qatflow_store::Store;
use qatflow_teacher::{
    run_generation, BackendConfig, CancellationToken, ClaudeCliConfig, GenerateOptions,
    GenerationEvent, OfflineConfig,
};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut db = None;
    let mut offline = OfflineConfig::default();
    let mut teacher_command = None;
    let mut opts = GenerateOptions::new(
        BackendConfig::Offline(OfflineConfig::default()),
        GateProfile::builtin("v4").expect("built-in profile"),
    );
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--db" => db = Some(value()),
            "--resume" => opts.resume = true,
            "--validate-only" => opts.validate_only = true,
            "--per-batch" => opts.per_batch = value().parse().expect("--per-batch N"),
            "--concurrency" => opts.concurrency = value().parse().expect("--concurrency N"),
            "--category" => opts.category = Some(value()),
            "--count" => opts.count = Some(value().parse().expect("--count N")),
            "--seed" => offline.seed = value().parse().expect("--seed S"),
            "--delay-ms" => {
                offline.delay = Duration::from_millis(value().parse().expect("--delay-ms D"))
            }
            "--teacher-command" => {
                teacher_command = Some(
                    ClaudeCliConfig::from_command_line(&value())
                        .unwrap_or_else(|e| panic!("--teacher-command: {e}")),
                )
            }
            "--timeout" => {
                opts.timeout = Duration::from_secs(value().parse().expect("--timeout SECS"))
            }
            other => panic!("unknown argument {other}"),
        }
    }
    opts.backend = match teacher_command {
        Some(cli) => BackendConfig::ClaudeCli(cli),
        None => BackendConfig::Offline(offline),
    };
    opts.events = Some(Arc::new(|e: &GenerationEvent| {
        if let GenerationEvent::BatchStored {
            category, index, ..
        } = e
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "stored {category} {index}");
            let _ = out.flush();
        }
    }));
    let store = Store::open(db.expect("--db PATH is required")).expect("open the store");
    match run_generation(&opts, &store, &NoProgress, &CancellationToken::new()) {
        Ok(report) => {
            eprint!("{}", report.render());
            println!(
                "report {}",
                serde_json::to_string(&report).expect("serializes")
            );
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
