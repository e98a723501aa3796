//! Single-stream greedy decode speed of the server's model worker path (the `Generator` it
//! loads — the CPU decoder for F32, burn's forward for BF16 — prefill, then
//! `LanguageModel::decode_step` with one sequence, argmax sampling) on a random model of
//! SmolLM2-135M's shape, printed as JSON:
//!
//! ```text
//! cargo run -p qatflow-serve --example cpu_decode -- [--tokens N] [--runs R] [--prompt P] [--precision f32|bf16]
//! ```
//!
//! Stop tokens are ignored so every run decodes exactly `--tokens` tokens after a
//! `--prompt`-token prefill; the rate counts the decode steps only.

use std::time::Instant;

use qatflow_model::generate::Sampler;
use qatflow_model::{CausalLm, GenerateOptions, Generator, LanguageModel, LoadOptions, Precision};
use serde_json::json;

type B = burn::backend::Flex;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn main() {
    let tokens = arg("--tokens", 64).max(2);
    let runs = arg("--runs", 3).max(1);
    let prompt_len = arg("--prompt", 32).max(1);
    let args: Vec<String> = std::env::args().collect();
    let precision = match args
        .iter()
        .position(|a| a == "--precision")
        .map(|i| args[i + 1].as_str())
    {
        Some("bf16") => Precision::Bf16,
        _ => Precision::F32,
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = qatflow_model::init::named_config("smollm2-135m").expect("a named config");
    qatflow_model::init::write_random_model(&config, 1, safetensors::Dtype::BF16, dir.path())
        .expect("writing the random model");
    let model = CausalLm::<B>::load(
        dir.path(),
        LoadOptions {
            precision,
            emulate_nvfp4_activations: true,
        },
        &Default::default(),
    )
    .map(Generator::new)
    .expect("loading the random model");
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| 100 + i * 37 % 4000)
        .collect();
    let mut rates = Vec::new();
    let mut prefill_ms = Vec::new();
    for _ in 0..runs {
        let mut sampler = Sampler::new(&GenerateOptions::default());
        let mut cache = model.new_cache();
        let start = Instant::now();
        let logits = model.next_logits(&prompt, &mut cache);
        let mut token = sampler.sample(&logits);
        prefill_ms.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        for _ in 1..tokens {
            let mut caches = [&mut cache];
            let logits = model.decode_step(&[token], &mut caches);
            token = sampler.sample(&logits[0]);
        }
        rates.push((tokens - 1) as f64 / start.elapsed().as_secs_f64());
    }
    let mut sorted = rates.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "model": "smollm2-135m shape, random weights", "backend": "flex (CPU)",
            "precision": format!("{precision:?}"), "decoder": model.kind(),
            "prompt_tokens": prompt_len,
            "decode_tokens": tokens, "runs": runs, "tokens_per_s": rates,
            "median_tokens_per_s": sorted[sorted.len() / 2], "prefill_ms": prefill_ms,
            "threads": std::thread::available_parallelism().map_or(0, |n| n.get()),
        })
    );
}
