//! `qatflow bench-train`: QAT throughput of a randomly initialized model of a named
//! configuration (`smollm2-135m`, `qwen3-1.7b`, ...) at batch 1 on random token sequences,
//! through the same optimizer step as training. Reports the median step time and tokens/s.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use qatflow_model::init::{named_config, write_random_model};
use qatflow_model::{CausalLm, LoadOptions, Precision};
use serde::Serialize;

use crate::config::{OptimPrecision, OptimSection};
use crate::data::Example;
use crate::optim::AdamW;
use crate::run::{optimizer_step, StepOutcome};
use crate::{CancellationToken, TrainError};
use qatflow_model::rng::SplitMix64;

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// A named configuration of `qatflow_model::init::NAMED_CONFIGS`.
    pub config: String,
    /// Tokens per sequence (batch 1).
    pub seq_len: usize,
    /// Timed optimizer steps.
    pub steps: usize,
    /// Untimed warm-up steps first (kernel compilation, autotuning).
    pub warmup: usize,
    /// Parameter/update precision.
    pub precision: OptimPrecision,
    /// Fake quantization on (QAT) or off (plain fine-tuning), side by side.
    pub quant: bool,
}

/// The measured result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Named configuration.
    pub config: String,
    /// Parameters of the model.
    pub parameters: usize,
    /// Tokens per step.
    pub seq_len: usize,
    /// Precision used.
    pub precision: OptimPrecision,
    /// Fake quantization on.
    pub quant: bool,
    /// Backend and device.
    pub device: String,
    /// Seconds of each timed step.
    pub step_seconds: Vec<f64>,
    /// Median step time.
    pub median_step_s: f64,
    /// `seq_len / median_step_s`.
    pub tokens_per_s: f64,
    /// Median seconds of forward + backward within a step.
    pub median_forward_backward_s: f64,
    /// Median seconds of the optimizer update within a step.
    pub median_optimizer_s: f64,
    /// Peak resident memory of the process (host side).
    pub peak_rss_bytes: u64,
}

/// Runs the benchmark on backend `B`.
pub fn bench_train_on<B: AutodiffBackend>(
    options: &BenchOptions,
    device: &B::Device,
    device_name: &str,
) -> Result<BenchReport, TrainError> {
    let json = named_config(&options.config).map_err(|e| TrainError::Quantizers {
        problem: e.to_string(),
    })?;
    let dir = tempfile_dir()?;
    let config = write_random_model(&json, 1, safetensors::Dtype::BF16, &dir).map_err(|e| {
        TrainError::Quantizers {
            problem: e.to_string(),
        }
    })?;
    let precision = if options.precision.bf16_params() {
        Precision::Bf16
    } else {
        Precision::F32
    };
    let loaded = CausalLm::<B>::load(
        &dir,
        LoadOptions {
            precision,
            emulate_nvfp4_activations: false,
        },
        device,
    );
    let _ = std::fs::remove_dir_all(&dir);
    let mut model = loaded?;
    let parameters = qatflow_model::params::named_params(&model.valid())
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    let mut rng = SplitMix64::new(7);
    let ids: Vec<u32> = (0..options.seq_len)
        .map(|_| (rng.next_u64() % config.vocab_size as u64) as u32)
        .collect();
    let mut mask = vec![true; options.seq_len];
    mask[0] = false;
    let example = Example { ids, mask };
    if options.quant {
        let input = qatflow_model::calib::calibrate_inputs(
            &model.valid(),
            std::slice::from_ref(&example.ids),
            &qatflow_core::NoProgress,
        )
        .map_err(|e| TrainError::Quantizers {
            problem: e.to_string(),
        })?;
        let input = qatflow_model::calib::apply_group_rule(&input);
        let weight = qatflow_model::calib::apply_group_rule(&qatflow_model::calib::weight_amax(
            &model.valid(),
        ));
        for layer in model.linears_mut() {
            layer
                .set_fake_quant(qatflow_model::FakeQuant {
                    weight: weight.get(&layer.name).copied(),
                    input: input.get(&layer.name).copied(),
                })
                .map_err(|e| TrainError::Quantizers {
                    problem: e.to_string(),
                })?;
        }
    }
    let mut optimizer = AdamW::<B::InnerBackend>::new(OptimSection {
        precision: options.precision,
        ..OptimSection::default()
    });
    let cancel = CancellationToken::new();
    let micro = vec![vec![&example]];
    let (mut times, mut fb, mut opt) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..options.warmup + options.steps {
        let t0 = Instant::now();
        let StepOutcome::Done(next, stats) =
            optimizer_step(model, &mut optimizer, &micro, 1e-5, i as u64, &cancel)
        else {
            unreachable!("the benchmark's token is never cancelled")
        };
        model = next;
        if i >= options.warmup {
            times.push(t0.elapsed().as_secs_f64());
            fb.push(stats.forward_backward_s);
            opt.push(stats.optimizer_s);
        }
    }
    let median = median_of(&times);
    Ok(BenchReport {
        config: options.config.clone(),
        parameters,
        seq_len: options.seq_len,
        precision: options.precision,
        quant: options.quant,
        device: device_name.to_string(),
        step_seconds: times,
        median_step_s: median,
        tokens_per_s: options.seq_len as f64 / median,
        median_forward_backward_s: median_of(&fb),
        median_optimizer_s: median_of(&opt),
        peak_rss_bytes: crate::run::proc_memory_bytes("VmHWM:"),
    })
}

fn median_of(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn tempfile_dir() -> Result<std::path::PathBuf, TrainError> {
    let dir = std::env::temp_dir().join(format!("qatflow-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| TrainError::Io {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}
