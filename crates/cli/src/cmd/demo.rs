//! `qatflow demo`: the whole loop on one machine, as a new user would run it by hand. Each
//! stage runs this same binary's own subcommand (printed before it runs, so the demo also
//! teaches the commands): fetch SmolLM2-135M-Instruct → offline teacher → gates and render
//! audit → behaviour SFT in BF16 (the "production model") → PTQ of it → QAT of it → QAD of
//! it (when the budget has QAD epochs) → NVFP4 exports → KL and NLL of the NVFP4 models
//! against the SFT model on held-out conversations → replies of every model to the same
//! prompts → the behaviour suite (`qatflow bench`, each model served by `qatflow serve`) → a
//! final table.
//!
//! Every finished stage leaves `DIR/stages/NAME.json` (its result and wall time), written
//! atomically after the stage's own outputs: a second run skips finished stages, and a run
//! cut off mid-stage redoes only that stage (training resumes from its newest checkpoint).
//!
//! On a machine with several GPUs (`--device cuda`), work that does not depend on each other
//! runs side by side, one GPU each (`CUDA_VISIBLE_DEVICES`), its output in `DIR/logs/`: PTQ,
//! QAT and QAD of the SFT model, then each model's replies, and each model's bench when
//! every model has a GPU of its own (so that no two latency measurements share one).

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::{json, Value};
use std::fs::File;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

const DEMO_TOML: &str = include_str!("../../../../config/demo/demo.toml");
const SFT_TOML: &str = include_str!("../../../../config/demo/sft.toml");
const QAT_TOML: &str = include_str!("../../../../config/demo/qat.toml");
const QAD_TOML: &str = include_str!("../../../../config/demo/qad.toml");
const SYSTEM_PROMPT: &str = include_str!("../../../../config/teacher/system_prompt.txt");

/// The prompts every model answers at the end, with the production system prompt.
const PROMPTS: &[&str] = &[
    "Give me two quick tips for sleeping better.",
    "Set a timer for ten minutes.",
    "What's the capital of Australia?",
];

/// The stages, in order (names of `--from`).
const STAGES: &[&str] = &[
    "fetch", "generate", "split", "validate", "sft", "ptq", "qat", "qad", "export", "eval",
    "replies", "bench",
];

/// `--budget`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BudgetArg {
    /// `full` on a machine with an NVIDIA GPU, `smoke` elsewhere.
    Auto,
    /// The stated small run for a CPU: proves every stage works, numbers are a smoke run.
    Smoke,
    /// The recipe: ~1,000 training conversations, the seeds' epochs (meant for a GPU).
    Full,
}

/// Arguments of `qatflow demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Working directory of the demo (models, data, runs, exports, stage results).
    #[arg(long, default_value = "qatflow-data/demo", value_name = "DIR")]
    pub dir: PathBuf,
    /// How much to train: auto, smoke or full (see config/demo/demo.toml).
    #[arg(long, value_enum, default_value = "auto")]
    pub budget: BudgetArg,
    /// cpu, cuda or cuda:N; default cuda when an NVIDIA driver is present, else cpu. With
    /// `cuda` and several visible GPUs, independent stages run side by side, one GPU each.
    #[arg(long)]
    pub device: Option<String>,
    /// Redo this stage and every later one (fetch, generate, split, validate, sft, ptq,
    /// qat, qad, export, eval, replies, bench).
    #[arg(long, value_name = "STAGE")]
    pub from: Option<String>,
    /// Budgets file (default: the shipped config/demo/demo.toml).
    #[arg(long, value_name = "FILE.toml")]
    pub recipe: Option<PathBuf>,
}

/// One budget of `demo.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Budget {
    train_conversations: usize,
    heldout_conversations: usize,
    sft_epochs: u32,
    qat_epochs: u32,
    /// Epochs of QAD (distillation from the SFT model); 0 (the default) skips the QAD stage.
    #[serde(default)]
    qad_epochs: u32,
    max_seq_len: usize,
    calib_samples: usize,
    /// Behaviour-suite categories the bench stage runs (empty: all of them).
    bench_categories: Vec<String>,
    /// Conversations per forward pass of SFT, QAT and QAD (default: each recipe's own). The
    /// recipes' effective batch stays: gradient accumulation becomes effective ÷ this, so
    /// it must divide the effective batch. A GPU trains several conversations at once far
    /// faster than one after another; a CPU gains nothing.
    #[serde(default)]
    micro_batch: Option<usize>,
    /// Cap of each bench request's max_tokens (`qatflow bench --max-tokens`; default: the
    /// suite's own).
    #[serde(default)]
    bench_max_tokens: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Budgets {
    full: Budget,
    smoke: Budget,
}

/// The demo's state: where it works and how it runs stages.
#[derive(Clone)]
struct Demo {
    dir: PathBuf,
    exe: PathBuf,
    device: String,
    budget_name: &'static str,
    budget: Budget,
    /// GPUs (`CUDA_VISIBLE_DEVICES` ids) that independent stages are spread over; fewer
    /// than two: everything runs one after another.
    gpus: Vec<String>,
    /// Where this demo's subcommands run when it is one of several side by side.
    lane: Option<Lane>,
}

/// One of several jobs running side by side: the GPU its subcommands see and the file
/// their output goes to.
#[derive(Clone)]
struct Lane {
    gpu: String,
    log: PathBuf,
}

fn has_nvidia_driver() -> bool {
    Path::new("/proc/driver/nvidia/version").exists()
}

/// The GPUs a `cuda` demo may spread its stages over: `CUDA_VISIBLE_DEVICES` when it is
/// set, else every GPU the NVIDIA driver lists.
fn visible_gpus() -> Vec<String> {
    if let Ok(list) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return list
            .split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(String::from)
            .collect();
    }
    let count = std::fs::read_dir("/proc/driver/nvidia/gpus").map_or(0, |d| d.count());
    (0..count).map(|i| i.to_string()).collect()
}

/// The last `n` lines of a log file (empty when it cannot be read).
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Demo {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn marker(&self, stage: &str) -> PathBuf {
        self.path("stages").join(format!("{stage}.json"))
    }

    /// Runs `f` unless `stage` finished in an earlier run; records its result.
    fn stage(
        &self,
        index: usize,
        stage: &str,
        f: impl FnOnce(&Self) -> anyhow::Result<Value>,
    ) -> anyhow::Result<Value> {
        let marker = self.marker(stage);
        let head = format!("[{}/{}] {stage}", index + 1, STAGES.len());
        if let Ok(text) = std::fs::read_to_string(&marker) {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                eprintln!("==> {head}: finished in an earlier run, skipped");
                return Ok(v["result"].clone());
            }
        }
        eprintln!("==> {head}");
        let start = Instant::now();
        let result = f(self).with_context(|| format!("demo stage `{stage}`"))?;
        let seconds = start.elapsed().as_secs_f64();
        let record = json!({"stage": stage, "seconds": seconds, "result": result});
        write_atomic(&marker, &serde_json::to_vec_pretty(&record)?)?;
        eprintln!("==> {head}: done in {}", human(seconds));
        Ok(result)
    }

    /// A subcommand with its standard error on the terminal, or in a lane on the lane's
    /// log and with the lane's GPU.
    fn command(&self, args: &[String]) -> anyhow::Result<Command> {
        let mut c = Command::new(&self.exe);
        c.args(args);
        match &self.lane {
            None => {
                eprintln!("$ qatflow {}", args.join(" "));
                c.stderr(Stdio::inherit());
            }
            Some(lane) => {
                eprintln!(
                    "[GPU {}] $ qatflow {}  (output: {})",
                    lane.gpu,
                    args.join(" "),
                    lane.log.display()
                );
                let mut log = File::options()
                    .create(true)
                    .append(true)
                    .open(&lane.log)
                    .with_context(|| format!("opening {}", lane.log.display()))?;
                writeln!(log, "$ qatflow {}", args.join(" "))?;
                c.env("CUDA_VISIBLE_DEVICES", &lane.gpu).stderr(log);
            }
        }
        Ok(c)
    }

    /// The error of a failed subcommand, with the end of its log when it ran in a lane.
    fn failed(&self, args: &[String], status: std::process::ExitStatus) -> anyhow::Error {
        let mut msg = format!("`qatflow {}` failed ({status})", args.join(" "));
        if let Some(lane) = &self.lane {
            msg += &format!(
                "; the end of its log {}:\n{}",
                lane.log.display(),
                tail(&lane.log, 20)
            );
        }
        anyhow::anyhow!(msg)
    }

    /// Runs a subcommand with its output on the terminal (or the lane's log); `ok` lists
    /// the exit codes that count as success.
    fn run_ok(&self, args: &[String], ok: &[i32]) -> anyhow::Result<i32> {
        let mut c = self.command(args)?;
        if let Some(lane) = &self.lane {
            c.stdout(File::options().append(true).open(&lane.log)?);
        }
        let status = c
            .status()
            .with_context(|| format!("starting {}", self.exe.display()))?;
        match status.code() {
            Some(code) if ok.contains(&code) => Ok(code),
            _ => Err(self.failed(args, status)),
        }
    }

    /// Runs a subcommand with its output on the terminal (or the lane's log); it must exit 0.
    fn run(&self, args: &[String]) -> anyhow::Result<()> {
        self.run_ok(args, &[0]).map(drop)
    }

    /// Runs a subcommand and returns its standard output.
    fn output(&self, args: &[String]) -> anyhow::Result<String> {
        let out = self
            .command(args)?
            .output()
            .with_context(|| format!("starting {}", self.exe.display()))?;
        if !out.status.success() {
            return Err(self.failed(args, out.status));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// This demo with everything one after another.
    fn sequential(&self) -> Demo {
        Demo {
            gpus: Vec::new(),
            ..self.clone()
        }
    }

    /// Runs `job(demo, i)` for each of `names`: side by side over the GPUs (round robin,
    /// output in `logs/NAME.log`) when there are several, else one after another. Every job
    /// runs to its end; the results come back in order, or the failures together.
    fn fan_out<T: Send>(
        &self,
        names: &[&str],
        job: impl Fn(&Demo, usize) -> anyhow::Result<T> + Sync,
    ) -> anyhow::Result<Vec<T>> {
        if self.gpus.len() < 2 || names.len() < 2 {
            return (0..names.len()).map(|i| job(self, i)).collect();
        }
        let logs = self.path("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let lanes: Vec<Demo> = names
            .iter()
            .enumerate()
            .map(|(i, name)| Demo {
                lane: Some(Lane {
                    gpu: self.gpus[i % self.gpus.len()].clone(),
                    log: logs.join(format!("{name}.log")),
                }),
                ..self.clone()
            })
            .collect();
        let results: Vec<anyhow::Result<T>> = std::thread::scope(|scope| {
            let job = &job;
            let handles: Vec<_> = lanes
                .iter()
                .enumerate()
                .map(|(i, lane)| scope.spawn(move || job(lane, i)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a demo job panicked")))
                })
                .collect()
        });
        let mut done = Vec::new();
        let mut failures = Vec::new();
        for (name, result) in names.iter().zip(results) {
            match result {
                Ok(v) => done.push(v),
                Err(e) => failures.push(format!("{name}: {e:#}")),
            }
        }
        if !failures.is_empty() {
            bail!("{}", failures.join("\n\n"));
        }
        Ok(done)
    }
}

fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

fn human(seconds: f64) -> String {
    if seconds < 120.0 {
        format!("{seconds:.0} s")
    } else {
        format!("{:.1} min", seconds / 60.0)
    }
}

/// `--micro-batch M --grad-accum E/M` for a recipe (`toml`, read from `origin`) whose
/// effective batch is `E`, so `micro_batch` changes how a step is computed, not what it is;
/// nothing when `micro_batch` is unset.
fn batch_flags(
    origin: &str,
    toml: &str,
    micro_batch: Option<usize>,
) -> anyhow::Result<Vec<String>> {
    let Some(micro) = micro_batch else {
        return Ok(Vec::new());
    };
    let effective =
        qatflow_train::config::TrainConfig::from_toml(toml, Path::new(origin))?.effective_batch();
    if micro == 0 || effective % micro != 0 {
        bail!(
            "demo budget: micro_batch = {micro} must divide the effective batch {effective} of \
             {origin} (optim.micro_batch × optim.grad_accum); use one of its divisors"
        );
    }
    Ok(args(&[
        "--micro-batch",
        &micro.to_string(),
        "--grad-accum",
        &(effective / micro).to_string(),
    ]))
}

/// Splits the clean dataset: every conversation whose position is a multiple of `stride`
/// goes to the held-out set until it has `heldout` lines; `train` lines of the rest train.
fn split(all: &Path, train: usize, heldout: usize) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let file = std::fs::File::open(all).with_context(|| format!("reading {}", all.display()))?;
    let lines: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", all.display()))?;
    let lines: Vec<String> = lines.into_iter().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() < heldout + 1 {
        bail!(
            "{} has {} conversations; the demo needs at least {}",
            all.display(),
            lines.len(),
            heldout + 1
        );
    }
    let stride = (lines.len() / heldout.max(1)).max(2);
    let (mut t, mut h) = (Vec::new(), Vec::new());
    for (i, line) in lines.into_iter().enumerate() {
        if i % stride == stride - 1 && h.len() < heldout {
            h.push(line);
        } else if t.len() < train {
            t.push(line);
        }
    }
    Ok((t, h))
}

/// The newest checkpoint directory of a run that verifies.
fn latest_checkpoint(run_dir: &Path) -> anyhow::Result<PathBuf> {
    Ok(qatflow_export::latest_valid_checkpoint(run_dir)?.dir)
}

/// Runs `qatflow demo`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let text = match &a.recipe {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => DEMO_TOML.to_string(),
    };
    let origin = a
        .recipe
        .as_ref()
        .map_or("config/demo/demo.toml".to_string(), |p| {
            p.display().to_string()
        });
    let budgets: Budgets =
        toml::from_str(&text).with_context(|| format!("{origin}: not a demo recipe"))?;
    let gpu = has_nvidia_driver();
    let device = a
        .device
        .clone()
        .unwrap_or_else(|| if gpu { "cuda" } else { "cpu" }.to_string());
    let full = match a.budget {
        BudgetArg::Auto => device.starts_with("cuda"),
        BudgetArg::Smoke => false,
        BudgetArg::Full => true,
    };
    let (budget_name, budget) = if full {
        ("full", budgets.full)
    } else {
        ("smoke", budgets.smoke)
    };
    if let Some(from) = &a.from {
        let Some(start) = STAGES.iter().position(|s| s == from) else {
            bail!(
                "--from {from}: unknown stage; stages are {}",
                STAGES.join(", ")
            );
        };
        for s in &STAGES[start..] {
            let _ = std::fs::remove_file(a.dir.join("stages").join(format!("{s}.json")));
        }
    }
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let demo = Demo {
        dir: a.dir.clone(),
        exe: std::env::current_exe().context("locating the qatflow binary")?,
        gpus: if device == "cuda" {
            visible_gpus()
        } else {
            Vec::new()
        },
        device,
        budget_name,
        budget,
        lane: None,
    };
    eprintln!(
        "qatflow demo: budget {budget_name} on {}{} in {}{}",
        demo.device,
        match demo.gpus.len() {
            0 | 1 => String::new(),
            n => format!(" ({n} GPUs: independent stages side by side)"),
        },
        demo.dir.display(),
        if full {
            ""
        } else {
            " (a smoke run: every stage runs, on too little data and training for its numbers to mean much)"
        }
    );
    let started = Instant::now();
    let results = run_stages(&demo)?;
    let report = final_report(&demo, &results, started.elapsed().as_secs_f64());
    write_atomic(&demo.path("report.md"), report.as_bytes())?;
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}

/// Runs every stage and returns their results by name.
fn run_stages(d: &Demo) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut results = serde_json::Map::new();
    let models = d.path("models/smollm2");
    let data = d.path("data");
    let b = d.budget.clone();
    let mut at = 0;
    let mut next = |name: &str| {
        at += 1;
        debug_assert_eq!(STAGES[at - 1], name);
        at - 1
    };
    let r = d.stage(next("fetch"), "fetch", |d| {
        if !models.join("config.json").exists() {
            d.run(&args(&[
                "model",
                "fetch",
                "smollm2-135m-instruct",
                "--out",
                &p(&models),
            ]))?;
        }
        Ok(json!({"model": p(&models)}))
    })?;
    results.insert("fetch".into(), r);
    let r = d.stage(next("generate"), "generate", |d| {
        let db = d.path("db");
        // The teacher's own dataset (its categories' counts, what the gates are sized for),
        // scaled up when the budget needs more conversations than it has.
        let teacher = qatflow_teacher::TeacherConfig::resolve(None)?;
        let default_total: u64 = teacher.categories.iter().map(|c| c.count).sum();
        let total = default_total.max((b.train_conversations + b.heldout_conversations) as u64);
        // Exit 1 means a dataset gate failed; the conversations are stored all the same and
        // the validate stage reports the gates.
        d.run_ok(
            &args(&[
                "generate",
                "--backend",
                "offline",
                "--total",
                &total.to_string(),
                "--resume",
                "--seed",
                "0",
                "--db",
                &p(&db),
            ]),
            &[0, 1],
        )?;
        d.run(&args(&[
            "dataset",
            "export",
            "--db",
            &p(&db),
            "--out",
            &p(&data.join("all.jsonl")),
            "--clean-only",
            "--force",
        ]))?;
        Ok(json!({"dataset": p(&data.join("all.jsonl"))}))
    })?;
    results.insert("generate".into(), r);
    let r = d.stage(next("split"), "split", |_| {
        let (train, heldout) = split(
            &data.join("all.jsonl"),
            b.train_conversations,
            b.heldout_conversations,
        )?;
        write_atomic(
            &data.join("train.jsonl"),
            (train.join("\n") + "\n").as_bytes(),
        )?;
        write_atomic(
            &data.join("heldout.jsonl"),
            (heldout.join("\n") + "\n").as_bytes(),
        )?;
        Ok(json!({"train": train.len(), "heldout": heldout.len()}))
    })?;
    results.insert("split".into(), r);
    let r = d.stage(next("validate"), "validate", |d| {
        let out = d
            .command(&args(&[
                "validate",
                &p(&data.join("all.jsonl")),
                "--profile",
                "v4",
                "--template",
                &p(&models),
                "--json",
            ]))?
            .output()?;
        let report: Value = serde_json::from_slice(&out.stdout)
            .context("reading the JSON report of `qatflow validate`")?;
        let lost = report["render_audit"]["failures"]
            .as_array()
            .map_or(0, Vec::len);
        if lost > 0 {
            bail!("the chat template drops content of {lost} conversations (see above)");
        }
        Ok(json!({
            "gates_passed": report["passed"],
            "conversations": report["stats"]["conversations"],
            "render_audit_checked": report["render_audit"]["checked"],
        }))
    })?;
    results.insert("validate".into(), r);
    let common = |run: &Path, base: &Path, epochs: u32| {
        args(&[
            "--base",
            &p(base),
            "--data",
            &p(&data.join("train.jsonl")),
            "--output-dir",
            &p(run),
            "--device",
            &d.device,
            "--epochs",
            &epochs.to_string(),
            "--max-seq-len",
            &b.max_seq_len.to_string(),
            "--resume",
        ])
    };
    let recipes = d.path("recipes");
    let sft_run = d.path("runs/sft");
    let r = d.stage(next("sft"), "sft", |d| {
        write_atomic(&recipes.join("sft.toml"), SFT_TOML.as_bytes())?;
        let mut a = args(&["train", "--config", &p(&recipes.join("sft.toml"))]);
        a.extend(common(&sft_run, &models, b.sft_epochs));
        a.extend(batch_flags(
            "config/demo/sft.toml",
            SFT_TOML,
            b.micro_batch,
        )?);
        d.run(&a)?;
        Ok(json!({"checkpoint": p(&latest_checkpoint(&sft_run)?)}))
    })?;
    let sft = PathBuf::from(r["checkpoint"].as_str().unwrap_or_default());
    results.insert("sft".into(), r);
    let ptq = d.path("exports/ptq");
    let ptq_stage = |d: &Demo| -> anyhow::Result<Value> {
        d.run(&args(&[
            "quantize",
            &p(&sft),
            "--out",
            &p(&ptq),
            "--calib",
            &p(&data.join("train.jsonl")),
            "--calib-samples",
            &b.calib_samples.to_string(),
            "--device",
            &d.device,
            "--force",
        ]))?;
        Ok(json!({"export": p(&ptq)}))
    };
    // QAT and QAD of the SFT model: `recipe` (its TOML) with the calibration size.
    let quantized_training =
        |d: &Demo, recipe: &str, toml: &str, run: &Path, epochs: u32| -> anyhow::Result<Value> {
            let path = recipes.join(recipe);
            write_atomic(&path, toml.as_bytes())?;
            let mut a = args(&["train", "--config", &p(&path)]);
            a.extend(common(run, &sft, epochs));
            a.extend(batch_flags(
                &format!("config/demo/{recipe}"),
                toml,
                b.micro_batch,
            )?);
            a.extend(args(&["--calib-samples", &b.calib_samples.to_string()]));
            d.run(&a)?;
            Ok(json!({"checkpoint": p(&latest_checkpoint(run)?)}))
        };
    let qat_run = d.path("runs/qat");
    let qad_run = d.path("runs/qad");
    // PTQ, QAT and QAD each start from the SFT model alone: side by side on several GPUs.
    let quantized_stages = ["ptq", "qat", "qad"];
    let indices = quantized_stages.map(&mut next);
    let stage_results = d.fan_out(&quantized_stages, |d, i| {
        d.stage(indices[i], quantized_stages[i], |d| match i {
            0 => ptq_stage(d),
            1 => quantized_training(d, "qat.toml", QAT_TOML, &qat_run, b.qat_epochs),
            _ if b.qad_epochs == 0 => {
                eprintln!("(the {} budget has no QAD epochs)", d.budget_name);
                Ok(json!({"skipped": true}))
            }
            _ => quantized_training(d, "qad.toml", QAD_TOML, &qad_run, b.qad_epochs),
        })
    })?;
    for (name, r) in quantized_stages.iter().zip(stage_results) {
        results.insert(name.to_string(), r);
    }
    // The trained NVFP4 models (name, run directory), exported to `exports/NAME`.
    let mut trained = vec![("qat", qat_run.clone())];
    if with_qad(&results) {
        trained.push(("qad", qad_run.clone()));
    }
    let export_dir = |name: &str| d.path(&format!("exports/{name}"));
    // The NVFP4 models compared with the SFT model: (name, export directory).
    let quantized: Vec<(&str, PathBuf)> = std::iter::once(("ptq", ptq.clone()))
        .chain(trained.iter().map(|(name, _)| (*name, export_dir(name))))
        .collect();
    let r = d.stage(next("export"), "export", |d| {
        let mut out = serde_json::Map::new();
        for (name, run) in &trained {
            let export = export_dir(name);
            d.run(&args(&[
                "export",
                &p(run),
                "--checkpoint",
                "latest-valid",
                "--out",
                &p(&export),
                "--force",
            ]))?;
            out.insert(p(run), json!(p(&export)));
        }
        Ok(Value::Object(out))
    })?;
    results.insert("export".into(), r);
    let mut models = vec![("sft", sft.clone())];
    models.extend(quantized.iter().cloned());
    let heldout = data.join("heldout.jsonl");
    let r = d.stage(next("eval"), "eval", |d| {
        // One `eval kld` for every export: the SFT model runs once, and the KL, the top-1
        // agreement and both models' NLL come from the same forward passes.
        let mut a = args(&["eval", "kld", "--base", &p(&sft)]);
        for (_, dir) in &quantized {
            a.extend(args(&["--other", &p(dir)]));
        }
        a.extend(args(&["--data", &p(&heldout), "--device", &d.device]));
        let reports: Value = serde_json::from_str(&d.output(&a)?)?;
        let nll = |v: &Value| json!({"mean_nll": v, "perplexity": v.as_f64().map(f64::exp)});
        let mut out = serde_json::Map::new();
        for (name, dir) in &quantized {
            let kld = if quantized.len() == 1 {
                reports.clone()
            } else {
                reports[p(dir)].clone()
            };
            out.entry("sft_nll")
                .or_insert_with(|| nll(&kld["base_nll"]));
            out.insert(format!("{name}_nll"), nll(&kld["other_nll"]));
            out.insert(name.to_string(), kld);
        }
        Ok(Value::Object(out))
    })?;
    results.insert("eval".into(), r);
    let r = d.stage(next("replies"), "replies", |d| {
        write_atomic(&d.path("system_prompt.txt"), SYSTEM_PROMPT.as_bytes())?;
        let system = format!("@{}", p(&d.path("system_prompt.txt")));
        let names: Vec<String> = models
            .iter()
            .map(|(name, _)| format!("replies-{name}"))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let replies = d.fan_out(&names, |d, i| {
            PROMPTS
                .iter()
                .map(|prompt| {
                    let reply = d.output(&args(&[
                        "chat",
                        &p(&models[i].1),
                        prompt,
                        "--system",
                        &system,
                        "--max-tokens",
                        "96",
                        "--device",
                        &d.device,
                    ]))?;
                    Ok(reply.trim().to_string())
                })
                .collect::<anyhow::Result<Vec<String>>>()
        })?;
        let rows = PROMPTS.iter().enumerate().map(|(k, prompt)| {
            let mut row = serde_json::Map::new();
            row.insert("prompt".into(), json!(prompt));
            for ((name, _), replies) in models.iter().zip(&replies) {
                row.insert(name.to_string(), json!(replies[k]));
            }
            Value::Object(row)
        });
        Ok(Value::Array(rows.collect()))
    })?;
    results.insert("replies".into(), r);
    let r = d.stage(next("bench"), "bench", |d| {
        let reports = d.path("bench");
        std::fs::create_dir_all(&reports)
            .with_context(|| format!("creating {}", reports.display()))?;
        // Side by side only when every model has a GPU of its own: latencies measured on a
        // shared GPU would not compare.
        let runner = if d.gpus.len() >= models.len() {
            d.clone()
        } else {
            d.sequential()
        };
        let names: Vec<String> = models
            .iter()
            .map(|(name, _)| format!("bench-{name}"))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let summaries = runner.fan_out(&names, |d, i| {
            let (name, dir) = &models[i];
            let report = reports.join(format!("{name}.json"));
            let mut a = args(&["bench", &p(dir), "--label", name, "--out", &p(&report)]);
            a.push("--serve-arg=--device".into());
            a.push(format!("--serve-arg={}", d.device));
            if let Some(cap) = b.bench_max_tokens {
                a.push("--max-tokens".into());
                a.push(cap.to_string());
            }
            if !b.bench_categories.is_empty() {
                a.push("--category".into());
                a.push(b.bench_categories.join(","));
            }
            // Exit 1 means a behaviour gate failed: a result of the comparison, not an error.
            d.run_ok(&a, &[0, 1])?;
            let summary = qatflow_bench::Report::load(&report)?.summary();
            Ok(json!({"report": p(&report), "summary": summary}))
        })?;
        let out = models
            .iter()
            .zip(summaries)
            .map(|((name, _), summary)| (name.to_string(), summary));
        Ok(Value::Object(out.collect()))
    })?;
    results.insert("bench".into(), r);
    Ok(results)
}

/// The final table as Markdown.
fn final_report(d: &Demo, r: &serde_json::Map<String, Value>, seconds: f64) -> String {
    let eval = &r["eval"];
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.4}"));
    let pct = |v: &Value| {
        v.as_f64()
            .map_or("-".to_string(), |x| format!("{:.1} %", 100.0 * x))
    };
    let split = &r["split"];
    let mut out = format!(
        "# qatflow demo ({} budget, {})\n\n{} training conversations, {} held out; SmolLM2-135M-Instruct → behaviour SFT (BF16) → PTQ, QAT{} (NVFP4, W4A4 emulated).\n\n",
        d.budget_name,
        d.device,
        split["train"],
        split["heldout"],
        if with_qad(r) { " and QAD" } else { " (no QAD in this budget)" }
    );
    out.push_str("| model | NLL on held-out | KL vs SFT (mean) | KL vs SFT (p99) | top-1 agreement with SFT |\n|---|---|---|---|---|\n");
    out.push_str(&format!(
        "| BF16 SFT | {} | - | - | - |\n",
        f(&eval["sft_nll"]["mean_nll"])
    ));
    for (key, label) in model_labels(r).into_iter().skip(1) {
        out.push_str(&format!(
            "| {label} (NVFP4) | {} | {} | {} | {} |\n",
            f(&eval[format!("{key}_nll")]["mean_nll"]),
            f(&eval[key]["mean_kld"]),
            f(&eval[key]["p99_kld"]),
            pct(&eval[key]["top1_agreement"])
        ));
    }
    out.push_str(&behaviour_table(d, r));
    out.push_str("\n## Replies (production system prompt, greedy)\n");
    for row in r["replies"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n**{}**\n\n",
            row["prompt"].as_str().unwrap_or("")
        ));
        for (key, label) in model_labels(r) {
            let reply = row[key].as_str().unwrap_or("").replace('\n', "\\n");
            out.push_str(&format!("- {label}: {reply}\n"));
        }
    }
    out.push_str(&format!(
        "\nWall time of this run: {} (stages finished earlier are not counted). Stage results: {}/stages/.\n",
        human(seconds),
        d.dir.display()
    ));
    if d.budget_name == "smoke" {
        out.push_str("\nThis was a smoke run: every stage ran, but on too little data and training for its numbers to mean much. Run `qatflow demo --budget full` on a GPU for the real comparison.\n");
    }
    out
}

/// Whether the run trained a QAD model.
fn with_qad(r: &serde_json::Map<String, Value>) -> bool {
    r.get("qad").and_then(|v| v.get("checkpoint")).is_some()
}

/// The compared models' result keys and labels, the BF16 SFT model first.
fn model_labels(r: &serde_json::Map<String, Value>) -> Vec<(&'static str, &'static str)> {
    let mut labels = vec![("sft", "SFT"), ("ptq", "PTQ"), ("qat", "QAT")];
    if with_qad(r) {
        labels.push(("qad", "QAD"));
    }
    labels
}

/// The behaviour suite of the compared models side by side, as `qatflow bench --compare`
/// prints it (empty when the bench stage wrote no reports).
fn behaviour_table(d: &Demo, r: &serde_json::Map<String, Value>) -> String {
    let reports: Result<Vec<_>, _> = model_labels(r)
        .iter()
        .map(|(name, _)| qatflow_bench::Report::load(&d.path(&format!("bench/{name}.json"))))
        .collect();
    match reports {
        Ok(reports) => format!(
            "\n## Behaviour suite (`qatflow bench`, passed/total per category)\n\n```text\n{}```\n",
            qatflow_bench::compare_table(&reports)
        ),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_recipe_parses_and_the_split_is_disjoint() {
        let b: Budgets = toml::from_str(DEMO_TOML).unwrap();
        assert!(b.full.train_conversations >= 1000);
        assert!(b.smoke.train_conversations < b.full.train_conversations);
        assert!(b.full.qad_epochs > 0);
        let dir = tempfile::tempdir().unwrap();
        let all = dir.path().join("all.jsonl");
        let lines: Vec<String> = (0..100).map(|i| format!("{{\"i\": {i}}}")).collect();
        std::fs::write(&all, lines.join("\n")).unwrap();
        let (train, heldout) = split(&all, 50, 8).unwrap();
        assert_eq!((train.len(), heldout.len()), (50, 8));
        assert!(heldout.iter().all(|h| !train.contains(h)));
        assert!(split(&all, 10, 100).is_err());
    }

    /// A demo over `gpus` whose "qatflow" is `sh`.
    fn shell_demo(dir: &Path, gpus: &[&str]) -> Demo {
        let budgets: Budgets = toml::from_str(DEMO_TOML).unwrap();
        Demo {
            dir: dir.to_path_buf(),
            exe: PathBuf::from("sh"),
            device: "cuda".into(),
            budget_name: "smoke",
            budget: budgets.smoke,
            gpus: gpus.iter().map(|g| g.to_string()).collect(),
            lane: None,
        }
    }

    #[test]
    fn fan_out_gives_each_job_a_gpu_and_a_log_and_reports_every_failure() {
        let dir = tempfile::tempdir().unwrap();
        let d = shell_demo(dir.path(), &["2", "5"]);
        let script = |code: i32| {
            args(&[
                "-c",
                &format!("echo \"gpu=$CUDA_VISIBLE_DEVICES\"; echo to-stderr >&2; exit {code}"),
            ])
        };
        let out = d
            .fan_out(&["a", "b", "c"], |d, i| {
                d.output(&script(0)).map(|o| (i, o))
            })
            .unwrap();
        let seen: Vec<_> = out
            .iter()
            .map(|(i, o)| (*i, o.trim().to_string()))
            .collect();
        assert_eq!(
            seen,
            [
                (0, "gpu=2".to_string()),
                (1, "gpu=5".into()),
                (2, "gpu=2".into())
            ]
        );
        let log = std::fs::read_to_string(dir.path().join("logs/b.log")).unwrap();
        assert!(log.contains("to-stderr"), "{log}");
        // `run` sends standard output to the log too; a failure names the job and shows
        // the end of its log, and the other jobs still finish.
        let err = d
            .fan_out(&["ok", "bad"], |d, i| d.run(&script(i as i32 * 3)))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("bad: "), "{err}");
        assert!(
            err.contains("gpu=5") && err.contains("logs/bad.log"),
            "{err}"
        );
        let ok_log = std::fs::read_to_string(dir.path().join("logs/ok.log")).unwrap();
        assert!(ok_log.contains("gpu=2"), "{ok_log}");
        // One GPU: the jobs run in this process's own environment, one after another.
        let one = shell_demo(dir.path(), &["7"]);
        let out = one
            .fan_out(&["x", "y"], |d, _| d.output(&args(&["-c", "echo run"])))
            .unwrap();
        assert_eq!(out, ["run\n", "run\n"]);
        assert!(!dir.path().join("logs/x.log").exists());
    }

    #[test]
    fn a_budget_micro_batch_keeps_the_recipes_effective_batch() {
        for (origin, recipe) in [("sft", SFT_TOML), ("qat", QAT_TOML), ("qad", QAD_TOML)] {
            assert!(batch_flags(origin, recipe, None).unwrap().is_empty());
            assert_eq!(
                batch_flags(origin, recipe, Some(4)).unwrap(),
                args(&["--micro-batch", "4", "--grad-accum", "2"])
            );
            let err = batch_flags(origin, recipe, Some(3))
                .unwrap_err()
                .to_string();
            assert!(err.contains("must divide the effective batch 8"), "{err}");
        }
        // A recipe that leaves the batch to the trainer's defaults (micro-batch 1, 8 steps of
        // accumulation) has their effective batch.
        let defaults = SFT_TOML.replace("grad_accum = 8\n", "");
        assert_ne!(defaults, SFT_TOML);
        assert_eq!(
            batch_flags("sft", &defaults, Some(2)).unwrap(),
            args(&["--micro-batch", "2", "--grad-accum", "4"])
        );
        let b: Budgets = toml::from_str(DEMO_TOML).unwrap();
        for budget in [&b.full, &b.smoke] {
            if let Some(m) = budget.micro_batch {
                batch_flags("sft", SFT_TOML, Some(m)).unwrap();
            }
        }
    }
}
