//! `qatflow bench-train`: QAT throughput of a randomly initialized model of a named
//! configuration (`smollm2-135m`, `qwen3-1.7b`, ...) at batch 1 on random token sequences,
//! through the same optimizer step as training. Reports the median step time and tokens/s,
//! the time of the cuBLASLt GEMMs within a step, and the peak device memory of the process
//! as `nvidia-smi` counts it (CubeCL's pool and the CUDA context included).

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use qatflow_model::init::{named_config, write_random_model};
use qatflow_model::{CausalLm, LoadOptions, Precision};
use serde::Serialize;

use crate::config::{MomentPrecision, OptimPrecision, OptimSection};
use crate::data::Example;
use crate::loss::Objective;
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
    /// Storage of Adam's moments.
    pub moments: MomentPrecision,
    /// Fake quantization on (QAT) or off (plain fine-tuning), side by side.
    pub quant: bool,
    /// Learning rate of every step.
    pub lr: f64,
    /// Micro-batches a step (each the same sequence; gradients accumulated).
    pub micro_batches: usize,
    /// Each weight fake-quantized once a step (`optim.cache_fake_quant`).
    pub cache_fake_quant: bool,
    /// Global-norm gradient clipping (`optim.grad_clip`; 0 disables).
    pub grad_clip: f64,
    /// Each block updated during backward (`optim.update_during_backward`; needs one
    /// micro-batch and `grad_clip` 0).
    pub update_during_backward: bool,
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
    /// Storage of Adam's moments.
    pub moments: MomentPrecision,
    /// Fake quantization on.
    pub quant: bool,
    /// Backend and device.
    pub device: String,
    /// Seconds of each timed step.
    pub step_seconds: Vec<f64>,
    /// Learning rate of every step.
    pub lr: f64,
    /// Micro-batches a step (each `seq_len` tokens).
    pub micro_batches: usize,
    /// Each weight fake-quantized once a step.
    pub cache_fake_quant: bool,
    /// Global-norm gradient clipping (0: none).
    pub grad_clip: f64,
    /// Each block updated during backward.
    pub update_during_backward: bool,
    /// Training loss of every step, warmup included (the same seed and example on every
    /// run, so two GEMM paths' curves can be compared step by step).
    pub step_losses: Vec<f32>,
    /// Median step time.
    pub median_step_s: f64,
    /// `seq_len × micro_batches / median_step_s`.
    pub tokens_per_s: f64,
    /// Median seconds of forward + backward within a step.
    pub median_forward_backward_s: f64,
    /// Median seconds of the optimizer update within a step.
    pub median_optimizer_s: f64,
    /// Peak resident memory of the process (host side).
    pub peak_rss_bytes: u64,
    /// Median seconds per step spent in cuBLASLt GEMMs (0 on the burn matmul path): their
    /// device time under `QATFLOW_GEMM_SYNC=1`, otherwise only the host time to enqueue them.
    pub median_gemm_s: f64,
    /// Median seconds per step spent waiting for burn's queued kernels before a GEMM (only
    /// under `QATFLOW_GEMM_SYNC=1`; 0 otherwise).
    pub median_gemm_wait_s: f64,
    /// cuBLASLt GEMMs per step.
    pub gemms_per_step: u64,
    /// Peak device memory of this process while the model was loaded and trained, in MiB,
    /// as `nvidia-smi --query-compute-apps` reports it (`None` without `nvidia-smi`, or
    /// when it lists no process with this pid, as inside some containers).
    pub peak_process_gpu_mib: Option<u64>,
    /// Peak of `nvidia-smi --query-gpu=memory.used` over the same time, in MiB: the whole
    /// device, other processes included (`None` without `nvidia-smi`).
    pub peak_device_gpu_mib: Option<u64>,
    /// `memory.used` before the model was loaded, in MiB (what other processes held).
    pub device_gpu_mib_before: Option<u64>,
    /// GEMM path: `cublaslt` (opt-in with `QATFLOW_GEMM=cublaslt`) or `burn`.
    pub gemm_path: String,
    /// The engine kernels turned off by `QATFLOW_KERNELS_OFF` (their tensor forms ran), as
    /// set; `None` when unset.
    pub kernels_off: Option<String>,
    /// Median seconds per step of each engine phase under `QATFLOW_PHASE_TIMES=1` (each
    /// phase between two device syncs, so such steps are slower; `None` without it; 0 for a
    /// phase whose operations did not run: on the CPU, or without the training engine). What
    /// forward + backward leaves is burn's element-wise kernels, other reductions and GEMMs
    /// outside attention and the loss.
    pub median_phase_s: Option<PhaseMedians>,
}

/// [`BenchReport::median_phase_s`]: median seconds a step by phase (`qatflow_kernels::phase`).
#[derive(Debug, Clone, Serialize)]
pub struct PhaseMedians {
    /// Training attention, its GEMMs included.
    pub attention: f64,
    /// RMSNorm.
    pub norm: f64,
    /// NVFP4 fake quantization (weights and inputs, forward and recompute).
    pub fake_quant: f64,
    /// The LM head and cross-entropy, its GEMMs included.
    pub loss: f64,
    /// Qwen3.5's fused gated delta rule (forward, recompute and backward kernels).
    pub delta_rule: f64,
}

/// Samples `nvidia-smi` in a background thread until dropped or stopped.
struct GpuMemorySampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(Option<u64>, Option<u64>)>>,
}

/// One `nvidia-smi` query's CSV lines (`None` when it cannot run).
fn nvidia_smi(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(args)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `memory.used` of every GPU, summed, in MiB.
fn device_used_mib() -> Option<u64> {
    parse_used_sum(&nvidia_smi(&[
        "--query-gpu=memory.used",
        "--format=csv,noheader,nounits",
    ])?)
}

/// The sum of the first column of `nvidia-smi` CSV lines.
fn parse_used_sum(csv: &str) -> Option<u64> {
    csv.lines()
        .map(|l| l.trim().parse::<u64>().ok())
        .sum::<Option<u64>>()
}

/// The `used_memory` of `pid` in `pid, used_memory` CSV lines (summed over GPUs).
fn parse_process_mib(csv: &str, pid: u32) -> Option<u64> {
    let mut found = None;
    for line in csv.lines() {
        let mut cols = line.split(',').map(str::trim);
        let (Some(p), Some(m)) = (cols.next(), cols.next()) else {
            continue;
        };
        if p.parse::<u32>().ok() == Some(pid) {
            if let Ok(m) = m.parse::<u64>() {
                found = Some(found.unwrap_or(0) + m);
            }
        }
    }
    found
}

impl GpuMemorySampler {
    fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let pid = std::process::id();
        let thread = std::thread::spawn(move || {
            let (mut process, mut device) = (None::<u64>, None::<u64>);
            loop {
                let done = flag.load(std::sync::atomic::Ordering::Relaxed);
                let apps = nvidia_smi(&[
                    "--query-compute-apps=pid,used_memory",
                    "--format=csv,noheader,nounits",
                ]);
                if let Some(m) = apps.as_deref().and_then(|c| parse_process_mib(c, pid)) {
                    process = Some(process.map_or(m, |p| p.max(m)));
                }
                if let Some(m) = device_used_mib() {
                    device = Some(device.map_or(m, |d| d.max(m)));
                }
                if done || apps.is_none() {
                    return (process, device);
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        });
        GpuMemorySampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; returns the peaks `(process, device)` in MiB.
    fn finish(mut self) -> (Option<u64>, Option<u64>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or((None, None))
    }
}

impl Drop for GpuMemorySampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
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
    let on_gpu = device_name.starts_with("cuda");
    let device_before = on_gpu.then(device_used_mib).flatten();
    let sampler = on_gpu.then(GpuMemorySampler::start);
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
                .set_fake_quant(qatflow_nvfp4::QuantizerAmax {
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
        moments: options.moments,
        cache_fake_quant: options.cache_fake_quant,
        grad_clip: options.grad_clip,
        update_during_backward: options.update_during_backward,
        ..OptimSection::default()
    });
    let cancel = CancellationToken::new();
    let micro = vec![vec![&example]; options.micro_batches.max(1)];
    let (mut times, mut fb, mut opt, mut losses) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut gemm, mut wait, mut calls) = (Vec::new(), Vec::new(), 0);
    let mut phases = Vec::new();
    for i in 0..options.warmup + options.steps {
        let t0 = Instant::now();
        let g0 = qatflow_kernels::gemm::stats();
        qatflow_kernels::phase::take();
        let StepOutcome::Done(next, stats) = optimizer_step(
            model,
            &mut optimizer,
            &Objective::Sft,
            &micro,
            options.lr,
            i as u64,
            &cancel,
        ) else {
            unreachable!("the benchmark's token is never cancelled")
        };
        model = next;
        losses.push(stats.loss);
        if i >= options.warmup {
            times.push(t0.elapsed().as_secs_f64());
            fb.push(stats.forward_backward_s);
            opt.push(stats.optimizer_s);
            let g = qatflow_kernels::gemm::stats().since(&g0);
            gemm.push(g.gemm_s);
            phases.push(qatflow_kernels::phase::take());
            wait.push(g.wait_s);
            calls = g.calls;
        }
    }
    let median = median_of(&times);
    let (peak_process_gpu_mib, peak_device_gpu_mib) =
        sampler.map_or((None, None), GpuMemorySampler::finish);
    Ok(BenchReport {
        config: options.config.clone(),
        parameters,
        seq_len: options.seq_len,
        precision: options.precision,
        moments: options.moments,
        quant: options.quant,
        device: device_name.to_string(),
        step_seconds: times,
        lr: options.lr,
        micro_batches: micro.len(),
        cache_fake_quant: options.cache_fake_quant,
        grad_clip: options.grad_clip,
        update_during_backward: options.update_during_backward,
        step_losses: losses,
        median_step_s: median,
        tokens_per_s: (options.seq_len * micro.len()) as f64 / median,
        median_forward_backward_s: median_of(&fb),
        median_optimizer_s: median_of(&opt),
        peak_rss_bytes: crate::run::proc_memory_bytes("VmHWM:"),
        median_gemm_s: median_of(&gemm),
        median_gemm_wait_s: median_of(&wait),
        gemms_per_step: calls,
        peak_process_gpu_mib,
        peak_device_gpu_mib,
        device_gpu_mib_before: device_before,
        gemm_path: if qatflow_kernels::gemm::enabled() {
            "cublaslt"
        } else {
            "burn"
        }
        .to_string(),
        kernels_off: std::env::var(qatflow_kernels::gemm::KERNELS_OFF_ENV).ok(),
        median_phase_s: qatflow_kernels::phase::enabled().then(|| {
            let m = |f: fn(&qatflow_kernels::phase::PhaseTimes) -> f64| {
                median_of(&phases.iter().map(f).collect::<Vec<_>>())
            };
            PhaseMedians {
                attention: m(|p| p.attention_s),
                norm: m(|p| p.norm_s),
                fake_quant: m(|p| p.fake_quant_s),
                loss: m(|p| p.loss_s),
                delta_rule: m(|p| p.delta_rule_s),
            }
        }),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_lines_are_parsed() {
        let apps = "1234, 5000\n42, 700\n1234, 300\nbad line\n";
        assert_eq!(parse_process_mib(apps, 1234), Some(5300));
        assert_eq!(parse_process_mib(apps, 42), Some(700));
        assert_eq!(parse_process_mib(apps, 7), None);
        assert_eq!(parse_used_sum("81000\n12\n"), Some(81012));
        assert_eq!(parse_used_sum("N/A\n"), None);
    }

    #[test]
    fn median_takes_the_middle() {
        assert_eq!(median_of(&[3.0, 1.0, 2.0]), 2.0);
        assert!(median_of(&[]).is_nan());
    }
}
