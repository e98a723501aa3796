//! `qatflow`: keep a fine-tuned LLM's behaviour through NVFP4 quantization.
//!
//! This binary only parses arguments, sets up telemetry and renders results; every
//! command's work is done by a library crate.

mod cmd;
mod output;
mod progress;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// qatflow keeps a fine-tuned LLM's manners (tool-call JSON, no markdown, no thinking
/// leaks, short spoken answers) through NVFP4 quantization: it generates teacher-written
/// datasets and checks them against behaviour gates, stores them, trains with NVFP4 fake
/// quantization (QAT), and exports checkpoints vLLM serves with `--quantization
/// modelopt_fp4`, on one machine or as two nodes connected over gRPC.
#[derive(Parser)]
#[command(name = "qatflow", version, about, long_about, max_term_width = 100)]
struct Cli {
    /// Log level or tracing directive for stderr logs (overridden by QATFLOW_LOG / RUST_LOG).
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL")]
    log_level: String,

    /// Export traces over OTLP/gRPC to this endpoint (Jaeger: http://127.0.0.1:4317).
    #[arg(
        long,
        global = true,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "URL"
    )]
    otlp_endpoint: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a JSONL dataset against a gate profile and show why it passes or fails.
    ///
    /// Prints each dataset gate (value, threshold, pass/fail), how many conversations each
    /// check flagged, and the worst offenders by line number. Exit status: 0 when every
    /// gate passes, 1 when a gate fails, 2 when the input is unusable (missing or empty
    /// file, a directory, a bad profile). With --template MODEL_DIR it also renders every
    /// conversation with that model's chat template, as training does, and fails when a
    /// render would drop a reply, a tool call or a tool result.
    Validate(cmd::validate::Args),

    /// Generate teacher conversations by category, check each on arrival, store them.
    ///
    /// Categories, tools and prompts come from config/teacher/ (categories.toml,
    /// tools.toml, generation.toml, system_prompt.txt). Every conversation is checked
    /// against the gate profile and stored (flagged ones as rejected, with their flags);
    /// a ledger of finished batches makes --resume after a crash or Ctrl-C generate
    /// exactly the missing batches. Exit status 0 when every batch is stored and every
    /// dataset gate passes, 1 otherwise, 2 on unusable input.
    Generate(cmd::generate::Args),

    /// Import, inspect and export the sled dataset store.
    #[command(subcommand)]
    Dataset(cmd::dataset::DatasetCommand),

    /// Import a GGUF or fetch a known model as a Hugging Face directory.
    #[command(subcommand)]
    Model(cmd::model::ModelCommand),

    /// Chat with a model directory (Hugging Face or NVFP4 export): prints the reply.
    Chat(cmd::infer::ChatArgs),

    /// Serve a model directory over an OpenAI-compatible HTTP API (Chat Completions).
    ///
    /// POST /v1/chat/completions (streaming or not, tools, stop, seed,
    /// chat_template_kwargs.enable_thinking), GET /v1/models, GET /health, GET /metrics
    /// (Prometheus). Listens on 127.0.0.1 unless --host is given with --token. Prints
    /// `listening on http://ADDR` on stdout once ready; Ctrl-C stops it.
    ///
    /// Dense models (Llama/SmolLM2, Qwen3) generate through qatflow's own decoders: the packed
    /// CPU decoder (float32 on cpu) or the CUDA decoder (on cuda); Qwen3.5 and shapes they do
    /// not take through burn's forward (the log says which and why). QATFLOW_DECODER=burn
    /// forces burn's forward.
    Serve(cmd::serve::ServeArgs),

    /// Measure what quantization costs a model: NLL/perplexity, or KL divergence.
    #[command(subcommand)]
    Eval(cmd::infer::EvalCommand),

    /// Show what NVFP4 costs each weight of a safetensors checkpoint (relative error, SQNR).
    QuantCheck(cmd::quant_check::Args),

    /// Measure validation throughput (conversations/s on one core) and write JSON.
    ///
    /// Builds a file of N lines by cycling through an input dataset (each copy made
    /// distinct), validates it several times in this process on one thread, and reports
    /// the median; the file is written to a temporary directory first so disk reads are
    /// warm.
    BenchGates(cmd::bench_gates::Args),

    /// Run a node of the two-node system (workstation, spark, or both in one process).
    ///
    /// The config's role picks the actors: workstation (teacher, validator, shard
    /// shipper), spark (shard receiver, serving supervisor) or all (both, shipping over
    /// loopback). Runs until Ctrl-C or SIGTERM; after a crash, starting it again resumes
    /// from what its databases hold.
    Node(cmd::node::NodeArgs),

    /// Show both nodes' state on one screen: shards sealed, shipped and committed,
    /// training, export and serving. Exit status 1 when a node does not answer.
    Status(cmd::node::StatusArgs),

    /// Measure shard streaming on loopback (seal, upload, verify, import) against a plain
    /// file copy of the same dataset, in MB/s of uncompressed data.
    BenchShards(cmd::node::BenchShardsArgs),

    /// Fine-tune a model with NVFP4 fake quantization (QAT) from a TOML recipe.
    ///
    /// Loads the base model, puts fake quantizers on every linear except lm_head,
    /// calibrates their input ranges, trains on assistant tokens only and writes verified
    /// checkpoints to the run directory (metrics.jsonl beside them). Ctrl-C saves a
    /// checkpoint and exits 130; --resume continues from the newest valid checkpoint.
    Train(cmd::train::TrainArgs),

    /// Plot a training run's loss and learning rate (RUN_DIR/report/*.svg) and summarize it.
    Report(cmd::train::ReportArgs),

    /// Measure training throughput on a random-init model: plain and QAT side by side (JSON).
    BenchTrain(cmd::train::BenchTrainArgs),

    /// Export a QAT checkpoint as an NVFP4 Hugging Face directory that vLLM serves with
    /// `--quantization modelopt_fp4`, in exactly ModelOpt 0.47's format.
    ///
    /// The checkpoint is verified first (every file's size and sha256). Weights stream one
    /// tensor at a time from the memory-mapped checkpoint into `.DIR.tmp-<pid>` next to
    /// DIR, which is fsynced, read back and renamed into place: a killed export leaves no
    /// DIR (the next run removes its temporary directory). Set
    /// QATFLOW_EXPORT_PAUSE_AFTER_TENSORS=N to make it stop after N tensors (for tests).
    Export(cmd::export::ExportArgs),

    /// Post-training quantization (PTQ) of a Hugging Face model to NVFP4: ModelOpt's max
    /// calibration on the CPU or a GPU (--device), then the same export as `qatflow export`.
    Quantize(cmd::export::QuantizeArgs),

    /// Benchmark the exporter on a random-init checkpoint (Qwen3-1.7B config): wall time
    /// (median of --runs) and peak memory of `qatflow export`, as JSON.
    BenchExport(cmd::export::BenchArgs),

    /// Run the whole loop on this machine and show what QAT keeps that PTQ loses.
    ///
    /// Fetches SmolLM2-135M-Instruct, generates the offline teacher's dataset, checks it
    /// (gates and the chat-template render audit), fine-tunes the behaviour in BF16 (the
    /// "production model"), quantizes that model with PTQ and with QAT, exports NVFP4, and
    /// compares PTQ and QAT against the BF16 model (KL, NLL, replies) in a final table
    /// (also written to DIR/report.md). Each stage prints the qatflow command it runs. A
    /// second run skips finished stages; --from STAGE redoes one and all after it.
    Demo(cmd::demo::Args),

    /// Run the behaviour suite (config/bench/) against a served model: thinking leaks,
    /// tool calls, markdown, facts, reasoning, follow-up questions, verbosity, TTFT and
    /// decode speed.
    ///
    /// Every prompt is sent with the production system prompt and tools of config/teacher/
    /// as a streaming request to --endpoint (any OpenAI-compatible server: vLLM, qatflow
    /// serve) or to `qatflow serve MODEL_DIR` started for the run, and checked with the
    /// data gates' definitions. Prints a table per category (and writes --out JSON);
    /// --compare A.json B.json prints saved runs side by side. Exit status 0 when every
    /// gate passes, 1 when one fails, 2 on unusable input or an unreachable server.
    Bench(cmd::bench::Args),
}

/// Commands whose stdout is data for other tools end quietly when the reader closes the
/// pipe (`qatflow validate --json | head -c0`), as Unix tools do: SIGPIPE gets its default
/// action back. Network commands keep Rust's ignored SIGPIPE, so that a closed socket is
/// an error they handle, not the end of the process.
fn quiet_on_closed_pipe(command: &Command) {
    if matches!(
        command,
        Command::Validate(_)
            | Command::Dataset(_)
            | Command::QuantCheck(_)
            | Command::BenchGates(_)
    ) {
        // SAFETY: setting a signal's disposition to its default before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    quiet_on_closed_pipe(&cli.command);
    // Node processes report as their own service in Jaeger; spans carry `node.name` too.
    let service = match cli.command {
        Command::Node(_) => "qatflow-node",
        _ => "qatflow-cli",
    };
    let mut telemetry = qatflow_telemetry::TelemetryConfig::new(service);
    telemetry.log_level = cli.log_level.clone();
    telemetry.otlp_endpoint = cli.otlp_endpoint.clone().filter(|s| !s.is_empty());
    if let Command::Node(args) = &cli.command {
        telemetry.resource = cmd::node::resource_attributes(args);
    }
    let _guard = match qatflow_telemetry::init(&telemetry) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("qatflow: error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Validate(args) => cmd::validate::run(args),
        Command::Dataset(c) => cmd::dataset::run(c),
        Command::Generate(args) => cmd::generate::run(args),
        Command::BenchGates(args) => cmd::bench_gates::run(args),
        Command::Model(c) => cmd::model::run(c),
        Command::QuantCheck(args) => cmd::quant_check::run(args),
        Command::Chat(args) => cmd::infer::chat(args),
        Command::Serve(args) => cmd::serve::run(args),
        Command::Eval(c) => cmd::infer::eval(c),
        Command::Train(args) => cmd::train::train(args),
        Command::Report(args) => cmd::train::report(args),
        Command::BenchTrain(args) => cmd::train::bench_train(args),
        Command::Node(args) => cmd::node::run_node(args),
        Command::Status(args) => cmd::node::run_status(args),
        Command::BenchShards(args) => cmd::node::run_bench_shards(args),
        Command::Export(args) => cmd::export::export(args),
        Command::Quantize(args) => cmd::export::quantize(args),
        Command::BenchExport(args) => cmd::export::bench(args),
        Command::Demo(args) => cmd::demo::run(args),
        Command::Bench(args) => cmd::bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qatflow: error: {}", output::error_chain(&e));
            ExitCode::from(2)
        }
    }
}
