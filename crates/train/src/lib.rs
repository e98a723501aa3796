//! qatflow-train: quantization-aware training. "QAT = SFT with quantization active": every
//! weight of the model is fine-tuned (no LoRA) while NVFP4 fake quantizers sit on every
//! linear except the LM head, so the weights learn to survive FP4 rounding.
//!
//! - [`config`]: the TOML recipe ([`TrainConfig`]);
//! - [`data`]: conversations → token ids + assistant masks, deterministic epoch order;
//! - [`loss`]: the assistant-only losses (cross-entropy; KL to a teacher for QAD);
//! - [`optim`]: AdamW with FP32 master weights or compensated BF16 updates;
//! - [`grads`]: which parameters got a gradient, by name;
//! - [`layerwise`]: the optimizer step that updates each block during backward;
//! - [`state`]: checkpoints (through `qatflow-checkpoint`) and exact resume;
//! - [`run`]: the loop; [`metrics`] and [`report`]: what a run leaves to look at;
//! - [`bench`]: `bench-train`, QAT throughput on random-init models.
//!
//! [`train`] is the entry point for the CLI and the GPU node's trainer actor: it takes a
//! [`TrainSink`] for progress and a cancellation token, and picks the backend from
//! `run.device`.

pub mod bench;
pub mod config;
pub mod data;
pub mod grads;
pub mod layerwise;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod report;
pub mod run;
pub mod state;

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Cuda, Flex};
use burn::tensor::backend::AutodiffBackend;
pub use config::{
    ConfigError, DeviceSpec, LossKind, LossSection, MomentPrecision, OptimPrecision, TrainConfig,
};
pub use data::{Dataset, Example};
pub use run::{train_on, Follow, RunOptions};
pub use tokio_util::sync::CancellationToken;

/// Errors of a training run. Each names what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data could not be read or encoded.
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// The base model or a checkpoint's model could not be loaded.
    #[error(transparent)]
    Load(#[from] qatflow_model::LoadError),
    /// The tokenizer could not be loaded.
    #[error(transparent)]
    Tokenizer(#[from] qatflow_model::TokenizerError),
    /// Checkpoint files failed.
    #[error(transparent)]
    Checkpoint(#[from] qatflow_checkpoint::CheckpointError),
    /// Saving or restoring state failed.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// The fake quantizers could not be set up.
    #[error("quantizers: {problem}")]
    Quantizers {
        /// What is wrong.
        problem: String,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The run directory already has checkpoints and `--resume` was not given.
    #[error("{0} already has checkpoints; pass --resume to continue that run, or set run.output_dir (--output-dir) to a new directory")]
    RunExists(PathBuf),
    /// The checkpoint was made with a different configuration.
    #[error("checkpoint {dir} was written with a different training configuration (its config hash differs); resume with the original config or start a new run.output_dir")]
    ConfigChanged {
        /// The checkpoint.
        dir: PathBuf,
    },
    /// The dataset lost examples since the checkpoint was written.
    #[error("the checkpoint's epoch uses {expected} examples but the dataset now yields {found}; resume with the same data")]
    DataShrank {
        /// Examples the epoch was planned with.
        expected: usize,
        /// Examples found now.
        found: usize,
    },
}

/// Something that happened during training.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    /// The calibration pass set the quantizers.
    Calibrated {
        /// Quantized linears.
        layers: usize,
        /// Calibration sequences used.
        samples: usize,
    },
    /// The QAD teacher was loaded.
    TeacherLoaded {
        /// Its model directory.
        dir: PathBuf,
        /// Weight of the SFT loss in the objective.
        sft_weight: f64,
    },
    /// The loop starts (or resumes).
    Started {
        /// Optimizer steps of the whole run.
        total_steps: u64,
        /// The checkpoint step resumed from.
        resumed_from: Option<u64>,
        /// Examples in the current epoch.
        examples: usize,
    },
    /// An optimizer step finished.
    Step {
        /// Steps completed.
        step: u64,
        /// Steps of the whole run.
        total_steps: u64,
        /// Current epoch (0-based).
        epoch: u32,
        /// Mean loss per target token of the step (the NLL for SFT; KL, or the QAD mix, for
        /// QAD).
        loss: f32,
        /// Learning rate of the step.
        lr: f64,
        /// Gradient norm before clipping.
        grad_norm: f32,
        /// Throughput of the step.
        tokens_per_s: f64,
        /// Resident memory of the process.
        rss_bytes: u64,
    },
    /// A checkpoint was committed.
    Checkpoint {
        /// Its step.
        step: u64,
        /// Its directory.
        dir: PathBuf,
    },
    /// Training finished.
    Finished {
        /// Steps completed.
        steps: u64,
    },
    /// A note for the user (resume source, skipped checkpoints, truncated data).
    Message(String),
}

/// Receives [`TrainEvent`]s (the CLI renders them, an actor forwards them).
pub trait TrainSink: Send + Sync {
    /// Called for every event, on the training thread.
    fn event(&self, event: &TrainEvent);
}

/// A sink that drops events.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSink;

impl TrainSink for NoSink {
    fn event(&self, _event: &TrainEvent) {}
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Optimizer steps completed.
    pub steps: u64,
    /// The run directory.
    pub run_dir: PathBuf,
    /// The newest checkpoint.
    pub last_checkpoint: Option<PathBuf>,
    /// Loss of the last step.
    pub final_loss: Option<f32>,
    /// True when stopped by the cancellation token (a checkpoint was saved).
    pub cancelled: bool,
}

impl TrainSummary {
    fn cancelled_before_start(run_dir: &Path) -> Self {
        TrainSummary {
            steps: 0,
            run_dir: run_dir.to_path_buf(),
            last_checkpoint: None,
            final_loss: None,
            cancelled: true,
        }
    }
}

/// Runs (or resumes) training on the device `config.run.device` names: `cpu` uses burn's
/// `flex` backend, `cuda:N` the CUDA backend with gradient checkpointing unless
/// `run.gradient_checkpointing = false`.
pub fn train(
    config: &TrainConfig,
    dataset: Dataset,
    options: RunOptions,
    sink: &dyn TrainSink,
    cancel: &CancellationToken,
) -> Result<TrainSummary, TrainError> {
    let device =
        config::parse_device(&config.run.device).map_err(|problem| ConfigError::Invalid {
            path: PathBuf::from("<config>"),
            field: "run.device",
            problem,
        })?;
    let checkpointing = config.run.gradient_checkpointing.unwrap_or(true);
    struct Job<'a> {
        config: &'a TrainConfig,
        dataset: Dataset,
        options: RunOptions,
        sink: &'a dyn TrainSink,
        cancel: &'a CancellationToken,
    }
    impl TrainingWork for Job<'_> {
        type Output = Result<TrainSummary, TrainError>;
        fn run<B: AutodiffBackend>(self, device: &B::Device, _name: &str) -> Self::Output {
            train_on::<B>(
                self.config,
                self.dataset,
                self.options,
                device,
                self.sink,
                self.cancel,
            )
        }
    }
    on_training_backend(
        device,
        checkpointing,
        Job {
            config,
            dataset,
            options,
            sink,
            cancel,
        },
    )
}

/// Work generic over the training backend, run by [`on_training_backend`].
pub trait TrainingWork {
    /// What the work returns.
    type Output;
    /// Runs on backend `B` on `device`, which is named `name` (`flex cpu`, `cuda:N`).
    fn run<B: AutodiffBackend>(self, device: &B::Device, name: &str) -> Self::Output;
}

/// Runs `work` on the training backend of `device`: burn's autodiff over `flex` on the
/// CPU; over CUDA with burn's balanced checkpointing when `checkpointing` (the default), or
/// plain autodiff. The one place the backend types are spelled out, for `train` and
/// `bench-train` alike.
pub fn on_training_backend<W: TrainingWork>(
    device: DeviceSpec,
    checkpointing: bool,
    work: W,
) -> W::Output {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    match device {
        DeviceSpec::Cpu => work.run::<Autodiff<Flex>>(&Default::default(), "flex cpu"),
        DeviceSpec::Cuda(n) => {
            let cuda = burn::backend::cuda::CudaDevice::new(n);
            let name = format!("cuda:{n}");
            if checkpointing {
                work.run::<Autodiff<Cuda, BalancedCheckpointing>>(&cuda, &name)
            } else {
                work.run::<Autodiff<Cuda>>(&cuda, &name)
            }
        }
    }
}
