//! The QAT loop: load → fake quantizers on every linear except `lm_head` → calibration →
//! assistant-only training with gradient accumulation, clipping and AdamW → checkpoints,
//! with exact resume from the newest checkpoint that verifies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use qatflow_checkpoint::CheckpointInfo;
use qatflow_core::NoProgress;
use qatflow_model::params::map_params;
use qatflow_model::{CausalLm, LoadOptions, ModelFamily, Precision, Tokenizer};
use qatflow_nvfp4::QuantizerAmax;
use tokio_util::sync::CancellationToken;

use crate::config::TrainConfig;
use crate::data::{encode_all, epoch_order, steps_per_epoch, Dataset, Example};
use crate::grads::{param_grads, ParamGrad};
use crate::loss::{self, Batch, Objective};
pub use crate::metrics::StepStats;
use crate::metrics::{MetricsWriter, StepMetrics};
use crate::optim::{f32_of, uniform, AdamW};
use crate::state::{self, TrainerState};
use crate::{TrainError, TrainEvent, TrainSink, TrainSummary};

/// How a run starts.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the newest valid checkpoint of `run.output_dir` (a fresh start when
    /// there is none).
    pub resume: bool,
    /// Train while data arrives (store datasets only).
    pub follow: Option<Follow>,
}

/// Train-while-generating: wait for enough data, then take in what arrived since at every
/// epoch boundary (each epoch keeps the example count it started with, recorded in the
/// checkpoint, so a resumed run sees the same data order).
#[derive(Debug, Clone)]
pub struct Follow {
    /// Start once the dataset holds at least this many conversations.
    pub min_conversations: usize,
    /// How often to look.
    pub poll: Duration,
}

fn precision_of(config: &TrainConfig) -> Precision {
    if config.optim.precision.bf16_params() {
        Precision::Bf16
    } else {
        Precision::F32
    }
}

fn load_options(config: &TrainConfig) -> LoadOptions {
    LoadOptions {
        precision: precision_of(config),
        emulate_nvfp4_activations: false,
    }
}

/// Sets every linear's fake quantizers; `None` entries leave a layer unquantized.
fn apply_quant<B: Backend>(
    model: &mut CausalLm<B>,
    quant: &BTreeMap<String, QuantizerAmax>,
) -> Result<(), TrainError> {
    for layer in model.linears_mut() {
        let q = quant
            .get(&layer.name)
            .copied()
            .ok_or_else(|| TrainError::Quantizers {
                problem: format!("no quantizer state for `{}`", layer.name),
            })?;
        layer
            .set_fake_quant(q)
            .map_err(|e| TrainError::Quantizers {
                problem: e.to_string(),
            })?;
    }
    Ok(())
}

/// Calibrates on the first `calib_samples` examples: input amax by ModelOpt's max
/// calibration, weight amax = max|W|, both unified over shared-input groups.
fn calibrate<B: Backend>(
    model: &CausalLm<B>,
    examples: &[Example],
    samples: usize,
) -> Result<BTreeMap<String, QuantizerAmax>, TrainError> {
    let seqs: Vec<Vec<u32>> = examples
        .iter()
        .take(samples)
        .map(|e| e.ids.clone())
        .collect();
    let input = qatflow_model::calib::calibrate_inputs(model, &seqs, &NoProgress).map_err(|e| {
        TrainError::Quantizers {
            problem: format!("calibration: {e}"),
        }
    })?;
    let input = qatflow_model::calib::apply_group_rule(&input);
    let weight = qatflow_model::calib::apply_group_rule(&qatflow_model::calib::weight_amax(model));
    Ok(weight
        .iter()
        .map(|(name, &w)| {
            (
                name.clone(),
                QuantizerAmax {
                    weight: Some(w),
                    input: input.get(name).copied(),
                },
            )
        })
        .collect())
}

/// A memory figure of this process from `/proc/self/status` (`VmRSS:` resident now,
/// `VmHWM:` peak), in bytes; 0 where unavailable.
pub(crate) fn proc_memory_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// What [`optimizer_step`] did.
#[derive(Debug)]
pub enum StepOutcome<B: AutodiffBackend> {
    /// The step finished: the updated model and the step's statistics.
    Done(CausalLm<B>, StepStats),
    /// The cancellation token fired between micro-batches: the model, unchanged.
    Cancelled(CausalLm<B>),
}

/// One optimizer step over `micro_batches` (each a list of examples): forward/backward per
/// micro-batch with `objective`'s loss normalized by the step's total target count,
/// global-norm clipping, one AdamW update at `lr`. `sr_seed` seeds stochastic rounding.
#[allow(clippy::too_many_arguments)]
pub fn optimizer_step<B: AutodiffBackend>(
    model: CausalLm<B>,
    optimizer: &mut AdamW<B::InnerBackend>,
    objective: &Objective<B>,
    micro_batches: &[Vec<&Example>],
    lr: f64,
    sr_seed: u64,
    cancel: &CancellationToken,
) -> StepOutcome<B> {
    if optimizer.hp.update_during_backward {
        if let [examples] = micro_batches {
            if cancel.is_cancelled() {
                return StepOutcome::Cancelled(model);
            }
            let (model, stats) =
                crate::layerwise::step(model, optimizer, objective, examples, lr, sr_seed);
            return StepOutcome::Done(model, stats);
        }
        panic!(
            "optim.update_during_backward takes one micro-batch a step, got {}",
            micro_batches.len()
        );
    }
    let started = Instant::now();
    let targets: usize = micro_batches.iter().flatten().map(|e| e.targets()).sum();
    let denom = targets.max(1) as f64;
    let mut acc: BTreeMap<String, Tensor<B::InnerBackend, 1>> = BTreeMap::new();
    let mut loss_sum = 0.0f64;
    let mut tokens = 0u64;
    // Each quantized weight fake-quantized once for the step's micro-batches and recomputes
    // (when asked), freed before the update.
    let fq_cache = optimizer
        .hp
        .cache_fake_quant
        .then(qatflow_model::linear::FakeQuantCache::begin);
    for examples in micro_batches {
        if cancel.is_cancelled() {
            return StepOutcome::Cancelled(model);
        }
        let batch = Batch::new(examples);
        tokens += batch.tokens() as u64;
        let loss = loss::loss_sum(&model, &batch, objective) / denom;
        loss_sum += f64::from(loss.clone().into_scalar().elem::<f32>());
        let grads = loss.backward();
        for ParamGrad { name, grad: g, .. } in param_grads(&model, &grads) {
            // One micro-batch's gradient stays in the dtype autodiff made it in (BF16 for
            // BF16 weights: 2 bytes a parameter instead of 4); sums of several are kept in
            // f32. Every use below widens it first, so the arithmetic is f32 either way.
            let merged = match acc.remove(&name) {
                Some(prev) => f32_of(prev) + f32_of(g),
                None => g,
            };
            acc.insert(name, merged);
        }
    }
    drop(fq_cache);
    // One read-back for the whole norm: a read per parameter would stall the GPU queue
    // hundreds of times a step.
    let sq = acc
        .values()
        .map(|g| qatflow_kernels::reduce::square_sum(g.clone()))
        .reduce(|a, b| a + b)
        .map_or(0.0, |t| f64::from(t.into_scalar().elem::<f32>()));
    let grad_norm = sq.sqrt();
    let forward_backward_s = started.elapsed().as_secs_f64();
    let update_started = Instant::now();
    let clip = optimizer.hp.grad_clip;
    let scale = if clip > 0.0 && grad_norm > clip {
        clip / (grad_norm + 1e-6)
    } else {
        1.0
    };
    let device = model.device();
    let inner_device = {
        let t: Tensor<B, 1> = Tensor::zeros([1], &device);
        t.inner().device()
    };
    optimizer.seed_rounding(&inner_device, sr_seed);
    let model = map_params(model, |name, t| {
        let Some(g) = acc.remove(name) else {
            return t;
        };
        let updated = optimizer.update(name, t.inner(), g, scale, lr, |n| {
            uniform::<B::InnerBackend>(n, &inner_device)
        });
        Tensor::from_inner(updated)
    });
    optimizer.finish_step();
    // Reading one element back waits for the queued update kernels.
    let _: f32 = model
        .embed_weight()
        .inner()
        .slice([0..1, 0..1])
        .into_scalar()
        .elem();
    StepOutcome::Done(
        model,
        StepStats {
            loss: loss_sum as f32,
            grad_norm: grad_norm as f32,
            tokens,
            targets: targets as u64,
            forward_backward_s,
            optimizer_s: update_started.elapsed().as_secs_f64(),
        },
    )
}

/// Seed of stochastic rounding at `step` (any fixed function of the run seed and step, so
/// a resumed run draws the same numbers).
fn sr_seed(seed: u64, step: u64) -> u64 {
    let mut rng =
        qatflow_model::rng::SplitMix64::new(seed ^ step.wrapping_mul(0xA24B_AED4_963E_E407));
    rng.next_u64()
}

fn load_examples(
    config: &TrainConfig,
    dataset: &Dataset,
    tokenizer: &Tokenizer,
    sink: &dyn TrainSink,
) -> Result<Vec<Example>, TrainError> {
    let conversations = dataset.conversations()?;
    let encoded = encode_all(&conversations, tokenizer, &config.data)?;
    if encoded.truncated > 0 || encoded.dropped > 0 {
        sink.event(&TrainEvent::Message(format!(
            "{} conversations truncated to {} tokens, {} dropped (no assistant token left)",
            encoded.truncated, config.data.max_seq_len, encoded.dropped
        )));
    }
    if encoded.examples.is_empty() {
        return Err(crate::data::DataError::Empty {
            origin: dataset.origin(),
            dropped: encoded.dropped,
        }
        .into());
    }
    Ok(encoded.examples)
}

fn wait_for_data(
    dataset: &Dataset,
    follow: &Follow,
    sink: &dyn TrainSink,
    cancel: &CancellationToken,
) -> Result<bool, TrainError> {
    let mut announced = false;
    loop {
        let have = dataset.conversations()?.len();
        if have >= follow.min_conversations {
            return Ok(true);
        }
        if !announced {
            sink.event(&TrainEvent::Message(format!(
                "waiting for data: {have} of {} conversations",
                follow.min_conversations
            )));
            announced = true;
        }
        if cancel.is_cancelled() {
            return Ok(false);
        }
        std::thread::sleep(follow.poll);
    }
}

/// What a run is made of, restored or fresh: the model (with its fake quantizers), the
/// calibrated amaxes, the optimizer and the trainer's counters.
type RunParts<B> = (
    CausalLm<B>,
    BTreeMap<String, QuantizerAmax>,
    AdamW<<B as AutodiffBackend>::InnerBackend>,
    TrainerState,
);

/// Creates the run directory and records the configuration in it.
fn prepare_run_dir(config: &TrainConfig) -> Result<PathBuf, TrainError> {
    let run_dir = config.run.output_dir.clone();
    std::fs::create_dir_all(&run_dir).map_err(|source| TrainError::Io {
        path: run_dir.clone(),
        source,
    })?;
    std::fs::write(
        run_dir.join("train_config.toml"),
        toml::to_string_pretty(config).expect("configs serialize"),
    )
    .map_err(|source| TrainError::Io {
        path: run_dir.join("train_config.toml"),
        source,
    })?;
    Ok(run_dir)
}

/// The checkpoint to resume from (`resume`: the newest valid one, corrupt newer ones moved
/// aside), or none for a fresh run, which must not find checkpoints in `run_dir`.
fn resume_point(
    run_dir: &Path,
    resume: bool,
    sink: &dyn TrainSink,
) -> Result<Option<CheckpointInfo>, TrainError> {
    if !resume {
        if !qatflow_checkpoint::list(run_dir)?.is_empty() {
            return Err(TrainError::RunExists(run_dir.to_path_buf()));
        }
        return Ok(None);
    }
    let Some((info, skipped)) = qatflow_checkpoint::latest_valid(run_dir)? else {
        return Ok(None);
    };
    for s in skipped {
        // Moved aside (kept for inspection) so the step can be checkpointed again.
        let aside = s.dir.with_file_name(format!(
            "corrupt-{}",
            s.dir
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        ));
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(&s.dir, &aside).map_err(|source| TrainError::Io {
            path: s.dir.clone(),
            source,
        })?;
        sink.event(&TrainEvent::Message(format!(
            "skipping checkpoint {}: {} (moved to {})",
            s.dir.display(),
            s.reason,
            aside.display()
        )));
        tracing::warn!(dir = %s.dir.display(), reason = %s.reason, "skipping corrupt checkpoint");
    }
    Ok(Some(info))
}

/// The run's parts restored from checkpoint `info`, whose configuration must hash to
/// `config_hash`.
fn restore<B: AutodiffBackend>(
    config: &TrainConfig,
    info: &CheckpointInfo,
    config_hash: &str,
    device: &B::Device,
    sink: &dyn TrainSink,
) -> Result<RunParts<B>, TrainError> {
    let st = state::load_trainer_state(&info.dir)?;
    if st.config_hash != config_hash {
        return Err(TrainError::ConfigChanged {
            dir: info.dir.clone(),
        });
    }
    let mut model = CausalLm::<B>::load(&info.dir, load_options(config), device)?;
    let quant = state::load_quantizers(&info.dir)?;
    if config.quant.enabled {
        apply_quant(&mut model, &quant)?;
    }
    let mut optimizer = AdamW::new(config.optim.clone());
    let inner = model.valid().device();
    state::load_optimizer(&info.dir, &mut optimizer, st.step, &inner)?;
    sink.event(&TrainEvent::Message(format!(
        "resuming from {} (step {})",
        info.dir.display(),
        st.step
    )));
    Ok((model, quant, optimizer, st))
}

/// A fresh run's parts: the base model, calibrated on `examples` when QAT is on.
fn start_fresh<B: AutodiffBackend>(
    config: &TrainConfig,
    examples: &[Example],
    config_hash: String,
    device: &B::Device,
    sink: &dyn TrainSink,
) -> Result<RunParts<B>, TrainError> {
    let base = &config.model.base;
    let mut model = CausalLm::<B>::load(base, load_options(config), device)?;
    let quant = if config.quant.enabled {
        let q = calibrate(&model.valid(), examples, config.quant.calib_samples)?;
        apply_quant(&mut model, &q)?;
        sink.event(&TrainEvent::Calibrated {
            layers: q.len(),
            samples: config.quant.calib_samples.min(examples.len()),
        });
        q
    } else {
        BTreeMap::new()
    };
    let st = TrainerState {
        step: 0,
        epoch: 0,
        step_in_epoch: 0,
        epoch_examples: examples.len(),
        total_steps: 0,
        tokens_seen: 0,
        config_hash,
        last_loss: None,
    };
    Ok((model, quant, AdamW::new(config.optim.clone()), st))
}

/// The run's objective: for QAD, the teacher loaded (without fake quantization) on the
/// student's device.
fn objective<B: AutodiffBackend>(
    config: &TrainConfig,
    student: &CausalLm<B>,
    sink: &dyn TrainSink,
) -> Result<Objective<B>, TrainError> {
    let Some(dir) = config.teacher_dir() else {
        return Ok(Objective::Sft);
    };
    let device = student.embed_weight().inner().device();
    let teacher = CausalLm::<B::InnerBackend>::load(dir, load_options(config), &device)?;
    if teacher.config().vocab_size != student.config().vocab_size {
        return Err(TrainError::Config(crate::ConfigError::Invalid {
            path: dir.join("config.json"),
            field: "loss.teacher",
            problem: format!(
                "has a vocabulary of {} tokens, the student {}: a QAD teacher must share the student's tokenizer",
                teacher.config().vocab_size,
                student.config().vocab_size
            ),
        }));
    }
    sink.event(&TrainEvent::TeacherLoaded {
        dir: dir.to_path_buf(),
        sft_weight: config.loss.sft_weight,
    });
    Ok(Objective::Qad {
        teacher: Box::new(teacher),
        sft_weight: config.loss.sft_weight,
    })
}

/// Runs (or resumes) a QAT run on backend `B` and `device`.
pub fn train_on<B: AutodiffBackend>(
    config: &TrainConfig,
    dataset: Dataset,
    options: RunOptions,
    device: &B::Device,
    sink: &dyn TrainSink,
    cancel: &CancellationToken,
) -> Result<TrainSummary, TrainError> {
    let run_dir = prepare_run_dir(config)?;
    let base = config.model.base.clone();
    let config_hash = config.hash();

    if let Some(follow) = &options.follow {
        if !wait_for_data(&dataset, follow, sink, cancel)? {
            return Ok(TrainSummary::cancelled_before_start(&run_dir));
        }
    }

    let raw_config: serde_json::Value = std::fs::read_to_string(base.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let tokenizer = Tokenizer::from_dir(&base, ModelFamily::detect(&raw_config))?;
    let mut examples = load_examples(config, &dataset, &tokenizer, sink)?;

    let resumed = resume_point(&run_dir, options.resume, sink)?;

    let (mut model, quant, mut optimizer, mut st) = match &resumed {
        Some(info) => restore::<B>(config, info, &config_hash, device, sink)?,
        None => start_fresh::<B>(config, &examples, config_hash, device, sink)?,
    };

    let objective = objective::<B>(config, &model, sink)?;
    let per_step = config.effective_batch();
    let mut metrics = MetricsWriter::open(&run_dir, st.step).map_err(|source| TrainError::Io {
        path: run_dir.join(crate::metrics::METRICS_FILE),
        source,
    })?;
    let started = Instant::now();
    let mut last_saved = resumed.as_ref().map(|i| i.step);
    let mut last_checkpoint: Option<PathBuf> = resumed.as_ref().map(|i| i.dir.clone());

    let save = |model: &CausalLm<B>,
                optimizer: &AdamW<B::InnerBackend>,
                st: &TrainerState|
     -> Result<PathBuf, TrainError> {
        let info = state::save(&run_dir, &base, &model.valid(), &quant, optimizer, st)?;
        qatflow_checkpoint::prune(&run_dir, config.run.keep_checkpoints)?;
        sink.event(&TrainEvent::Checkpoint {
            step: st.step,
            dir: info.dir.clone(),
        });
        Ok(info.dir)
    };

    let mut started_event = false;
    while st.epoch < config.optim.epochs {
        if st.step_in_epoch == 0 {
            if options.follow.is_some() && st.epoch > 0 {
                examples = load_examples(config, &dataset, &tokenizer, sink)?;
            }
            st.epoch_examples = examples.len();
        }
        if st.epoch_examples > examples.len() {
            return Err(TrainError::DataShrank {
                expected: st.epoch_examples,
                found: examples.len(),
            });
        }
        let n = st.epoch_examples;
        let epoch_steps = steps_per_epoch(n, per_step);
        let remaining_epochs = u64::from(config.optim.epochs - st.epoch - 1);
        // The schedule spans the planned run; `max_steps` only stops early, so a run cut
        // short and resumed follows the same learning rates as an uninterrupted one.
        st.total_steps =
            st.step + (epoch_steps - st.step_in_epoch) + remaining_epochs * epoch_steps;
        let stop_at = config
            .run
            .max_steps
            .map_or(st.total_steps, |m| st.total_steps.min(m));
        if !started_event {
            sink.event(&TrainEvent::Started {
                total_steps: stop_at,
                resumed_from: resumed.as_ref().map(|i| i.step),
                examples: n,
            });
            started_event = true;
        }
        let order = epoch_order(n, config.run.seed, st.epoch);
        while st.step_in_epoch < epoch_steps {
            if st.step >= stop_at {
                break;
            }
            let from = st.step_in_epoch as usize * per_step;
            let to = (from + per_step).min(n);
            let chosen: Vec<&Example> = order[from..to].iter().map(|&i| &examples[i]).collect();
            let micro: Vec<Vec<&Example>> = chosen
                .chunks(config.optim.micro_batch)
                .map(<[&Example]>::to_vec)
                .collect();
            let lr = AdamW::<B::InnerBackend>::lr_at(&config.optim, st.step, st.total_steps);
            let t0 = Instant::now();
            let (next, stats) = match optimizer_step(
                model,
                &mut optimizer,
                &objective,
                &micro,
                lr,
                sr_seed(config.run.seed, st.step),
                cancel,
            ) {
                StepOutcome::Done(next, stats) => (next, stats),
                StepOutcome::Cancelled(unchanged) => {
                    model = unchanged;
                    if last_saved != Some(st.step) {
                        last_checkpoint = Some(save(&model, &optimizer, &st)?);
                    }
                    return Ok(TrainSummary {
                        steps: st.step,
                        run_dir: run_dir.clone(),
                        last_checkpoint,
                        final_loss: st.last_loss,
                        cancelled: true,
                    });
                }
            };
            model = next;
            let dt = t0.elapsed().as_secs_f64();
            st.step += 1;
            st.step_in_epoch += 1;
            st.tokens_seen += stats.targets;
            st.last_loss = Some(stats.loss);
            let m = StepMetrics {
                step: st.step,
                epoch: st.epoch,
                loss: stats.loss,
                lr,
                grad_norm: stats.grad_norm,
                tokens: stats.tokens,
                tokens_per_s: stats.tokens as f64 / dt.max(1e-9),
                elapsed_s: started.elapsed().as_secs_f64(),
            };
            metrics.write(&m).map_err(|source| TrainError::Io {
                path: metrics.path().to_path_buf(),
                source,
            })?;
            sink.event(&TrainEvent::Step {
                step: st.step,
                total_steps: stop_at,
                epoch: st.epoch,
                loss: stats.loss,
                lr,
                grad_norm: stats.grad_norm,
                tokens_per_s: m.tokens_per_s,
                rss_bytes: proc_memory_bytes("VmRSS:"),
            });
            let last = st.step >= stop_at;
            if st.step_in_epoch == epoch_steps && !last {
                st.epoch += 1;
                st.step_in_epoch = 0;
            }
            if st.step % config.run.checkpoint_every == 0 || last {
                last_checkpoint = Some(save(&model, &optimizer, &st)?);
                last_saved = Some(st.step);
            }
            if last {
                sink.event(&TrainEvent::Finished { steps: st.step });
                return Ok(TrainSummary {
                    steps: st.step,
                    run_dir,
                    last_checkpoint,
                    final_loss: st.last_loss,
                    cancelled: false,
                });
            }
            if st.step_in_epoch == 0 {
                break;
            }
        }
        if st.step >= stop_at {
            break;
        }
        if st.step_in_epoch >= epoch_steps {
            st.epoch += 1;
            st.step_in_epoch = 0;
        }
    }
    sink.event(&TrainEvent::Finished { steps: st.step });
    Ok(TrainSummary {
        steps: st.step,
        run_dir,
        last_checkpoint,
        final_loss: st.last_loss,
        cancelled: false,
    })
}
