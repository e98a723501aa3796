//! Greedy generation speed of SmolLM2-135M-Instruct (or any supported model directory),
//! printed as one JSON object:
//!
//! ```text
//! cargo run --release -p qatflow-model --example generate_bench -- \
//!     [--device cpu|cuda] [--model-dir DIR] [--precision f32|bf16] [--tokens N] [--prompt TEXT]
//! ```
//!
//! Without `--model-dir` the model is fetched into `<cache>/models/smollm2-135m-instruct`.
//! The decode rate counts tokens after the first one (the first includes the prefill);
//! stop tokens are ignored so every run generates exactly `--tokens` tokens.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use burn::tensor::backend::Backend;
use qatflow_model::generate::generate_tokens;
use qatflow_model::{load_with_tokenizer, GenerateOptions, LoadOptions, Precision};
use serde_json::json;

struct Args {
    device: String,
    model_dir: Option<PathBuf>,
    precision: Option<Precision>,
    tokens: usize,
    prompt: String,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        device: "cpu".into(),
        model_dir: None,
        precision: None,
        tokens: 64,
        prompt: "Write a short story about a robot who learns to paint.".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => args.device = value()?,
            "--model-dir" => args.model_dir = Some(PathBuf::from(value()?)),
            "--precision" => {
                args.precision = Some(match value()?.as_str() {
                    "f32" => Precision::F32,
                    "bf16" => Precision::Bf16,
                    other => return Err(format!("--precision {other}: use f32 or bf16")),
                })
            }
            "--tokens" => args.tokens = value()?.parse().map_err(|e| format!("--tokens: {e}"))?,
            "--prompt" => args.prompt = value()?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.tokens < 2 {
        return Err("--tokens must be at least 2".into());
    }
    Ok(args)
}

fn run<B: Backend>(
    args: &Args,
    dir: &std::path::Path,
    precision: Precision,
    device: B::Device,
) -> Result<serde_json::Value, String> {
    let start = Instant::now();
    let (model, tokenizer) = load_with_tokenizer::<B>(
        dir,
        LoadOptions {
            precision,
            ..LoadOptions::default()
        },
        &device,
    )
    .map_err(|e| e.to_string())?;
    let load_s = start.elapsed().as_secs_f64();
    let messages = [json!({"role": "user", "content": args.prompt})];
    let prompt = tokenizer
        .encode_prompt(&messages, None, None)
        .map_err(|e| e.to_string())?;
    let options = GenerateOptions {
        max_new_tokens: args.tokens,
        ..GenerateOptions::default()
    };
    // Warm-up (kernel compilation and autotuning on GPUs).
    generate_tokens(
        &model,
        &prompt,
        &[],
        &GenerateOptions {
            max_new_tokens: 2,
            ..options.clone()
        },
        |_| ControlFlow::Continue(()),
    )
    .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut first = None;
    let (ids, _) = generate_tokens(&model, &prompt, &[], &options, |_| {
        first.get_or_insert_with(Instant::now);
        ControlFlow::Continue(())
    })
    .map_err(|e| e.to_string())?;
    let end = Instant::now();
    let first = first.unwrap_or(end);
    let prefill_s = (first - start).as_secs_f64();
    let decode_s = (end - first).as_secs_f64();
    Ok(json!({
        "model_dir": dir.display().to_string(),
        "device": args.device,
        "precision": format!("{precision:?}").to_lowercase(),
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "load_s": load_s,
        "prompt_tokens": prompt.len(),
        "new_tokens": ids.len(),
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": prompt.len() as f64 / prefill_s,
        "decode_tokens_per_s": (ids.len() - 1) as f64 / decode_s,
        "total_s": (end - start).as_secs_f64(),
        "text": tokenizer.decode(&ids, true).map_err(|e| e.to_string())?,
    }))
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}\nusage: generate_bench [--device cpu|cuda] [--model-dir DIR] [--precision f32|bf16] [--tokens N] [--prompt TEXT]");
            return ExitCode::from(2);
        }
    };
    let dir = match &args.model_dir {
        Some(d) => d.clone(),
        None => {
            let dir =
                qatflow_model::fetch::default_cache_dir().join("models/smollm2-135m-instruct");
            if !dir.join("model.safetensors").exists() {
                if let Err(e) = qatflow_model::fetch_model("smollm2-135m-instruct", &dir) {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
            dir
        }
    };
    let result = match args.device.as_str() {
        "cpu" => run::<burn::backend::Flex>(
            &args,
            &dir,
            args.precision.unwrap_or(Precision::F32),
            Default::default(),
        ),
        "cuda" => run::<burn::backend::Cuda>(
            &args,
            &dir,
            args.precision.unwrap_or(Precision::Bf16),
            burn::backend::cuda::CudaDevice::default(),
        ),
        other => Err(format!("--device {other}: use cpu or cuda")),
    };
    match result {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
