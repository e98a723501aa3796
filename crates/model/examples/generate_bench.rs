//! Greedy generation speed of SmolLM2-135M-Instruct (or any supported model directory),
//! printed as one JSON object:
//!
//! ```text
//! cargo run --release --example generate_bench -- [--device cpu|cuda] [--model-dir DIR] \
//!     [--precision f32|bf16] [--decoder auto|burn|both] [--tokens N] [--runs N] [--prompt TEXT] \
//!     [--repeat N]
//! ```
//!
//! Without `--model-dir` the model is fetched into `<cache>/models/smollm2-135m-instruct`.
//! `--decoder auto` generates as `qatflow serve` and `qatflow chat` do (the packed CPU
//! decoder for a float32 dense model on the CPU, the CUDA decoder for a dense model on a GPU,
//! burn otherwise); `burn` forces burn's forward; `both` times burn's forward and the fast
//! decoder run by run in turn and reports the decode speed-up and whether both generated the
//! same tokens. `--repeat N` sends the prompt text N times in one message (a long prompt:
//! the time to the first token is then mostly prefill). The decode rate counts tokens after the first one (the first includes the
//! prefill); stop tokens are ignored so every run generates exactly `--tokens` tokens. Rates
//! are the median of `--runs` timed runs after one warm-up.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use burn::tensor::backend::Backend;
use qatflow_model::generate::generate_tokens;
use qatflow_model::{
    load_with_tokenizer, CpuDecoder, CudaDecoder, GenerateOptions, Generator, LoadOptions,
    Precision,
};
use serde_json::json;

struct Args {
    device: String,
    model_dir: Option<PathBuf>,
    precision: Option<Precision>,
    tokens: usize,
    runs: usize,
    decoder: Decoder,
    prompt: String,
    repeat: usize,
}

/// `--decoder`.
#[derive(Clone, Copy)]
enum Decoder {
    /// What `qatflow serve` and `qatflow chat` use.
    Auto,
    /// burn's forward.
    Burn,
    /// burn's forward and the fast (CPU or CUDA) decoder, run by run in turn.
    Both,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        device: "cpu".into(),
        model_dir: None,
        precision: None,
        tokens: 64,
        runs: 5,
        decoder: Decoder::Auto,
        prompt: "Write a short story about a robot who learns to paint.".into(),
        repeat: 1,
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
            "--runs" => args.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--decoder" => {
                args.decoder = match value()?.as_str() {
                    "auto" => Decoder::Auto,
                    "burn" => Decoder::Burn,
                    "both" => Decoder::Both,
                    other => return Err(format!("--decoder {other}: use auto, burn or both")),
                }
            }
            "--prompt" => args.prompt = value()?,
            "--repeat" => args.repeat = value()?.parse().map_err(|e| format!("--repeat: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.tokens < 2 {
        return Err("--tokens must be at least 2".into());
    }
    if args.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    Ok(args)
}

/// Timings of one generator over the runs.
#[derive(Default)]
struct Timings {
    prefill_s: Vec<f64>,
    decode_tokens_per_s: Vec<f64>,
    ids: Vec<u32>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
    let generators = match args.decoder {
        Decoder::Burn => vec![Generator::Burn(Box::new(model))],
        Decoder::Auto => vec![Generator::new(model)],
        Decoder::Both => {
            let both = |e: &dyn std::fmt::Display| format!("--decoder both: {e}");
            let fast = if args.device == "cpu" {
                Generator::Cpu(Box::new(CpuDecoder::new(&model).map_err(|e| both(&e))?))
            } else {
                let gpu = CudaDecoder::new(&model, 0).map_err(|e| both(&e))?;
                Generator::Cuda(Box::new(gpu))
            };
            vec![Generator::Burn(Box::new(model)), fast]
        }
    };
    let load_s = start.elapsed().as_secs_f64();
    let text = vec![args.prompt.as_str(); args.repeat.max(1)].join(" ");
    let messages = [json!({"role": "user", "content": text})];
    let prompt = tokenizer
        .encode_prompt(&messages, None, None)
        .map_err(|e| e.to_string())?;
    let options = GenerateOptions {
        max_new_tokens: args.tokens,
        ..GenerateOptions::default()
    };
    let time = |model: &Generator<B>, options: &GenerateOptions, t: &mut Timings| {
        let start = Instant::now();
        let mut first = None;
        let (ids, _) = generate_tokens(model, &prompt, &[], options, |_| {
            first.get_or_insert_with(Instant::now);
            ControlFlow::Continue(())
        })
        .map_err(|e| e.to_string())?;
        let end = Instant::now();
        let first = first.unwrap_or(end);
        t.prefill_s.push((first - start).as_secs_f64());
        t.decode_tokens_per_s
            .push((ids.len() - 1) as f64 / (end - first).as_secs_f64());
        t.ids = ids;
        Ok::<_, String>(())
    };
    // Warm-up (kernel compilation and autotuning on GPUs), then the generators take turns
    // run by run, so that both see the same machine.
    let warm_up = GenerateOptions {
        max_new_tokens: 2,
        ..options.clone()
    };
    let mut timings: Vec<Timings> = generators.iter().map(|_| Timings::default()).collect();
    for (g, t) in generators.iter().zip(timings.iter_mut()) {
        time(g, &warm_up, t)?;
        *t = Timings::default();
    }
    for _ in 0..args.runs {
        for (g, t) in generators.iter().zip(timings.iter_mut()) {
            time(g, &options, t)?;
        }
    }
    let mut results = Vec::new();
    for (g, t) in generators.iter().zip(&timings) {
        results.push(json!({
            "decoder": g.kind(),
            "prefill_s_median": median(&t.prefill_s),
            "prefill_tokens_per_s_median": prompt.len() as f64 / median(&t.prefill_s),
            "decode_tokens_per_s_median": median(&t.decode_tokens_per_s),
            "decode_tokens_per_s_runs": t.decode_tokens_per_s,
            "new_tokens": t.ids.len(),
            "text": tokenizer.decode(&t.ids, true).map_err(|e| e.to_string())?,
        }));
    }
    let same_tokens = timings.windows(2).all(|w| w[0].ids == w[1].ids);
    let speedup = (timings.len() == 2)
        .then(|| median(&timings[1].decode_tokens_per_s) / median(&timings[0].decode_tokens_per_s));
    Ok(json!({
        "model_dir": dir.display().to_string(),
        "device": args.device,
        "precision": format!("{precision:?}").to_lowercase(),
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "load_s": load_s,
        "prompt_tokens": prompt.len(),
        "runs": args.runs,
        "results": results,
        "same_tokens": same_tokens,
        "decode_speedup": speedup,
    }))
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}\nusage: generate_bench [--device cpu|cuda] [--model-dir DIR] [--precision f32|bf16] [--decoder auto|burn|both] [--tokens N] [--runs N] [--prompt TEXT] [--repeat N]");
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
