//! The training configuration: every knob of the recipe, read from TOML (unknown keys are
//! errors), with the seeds' defaults, validation that names the offending field, and the
//! hash that ties checkpoints to the configuration that produced them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Errors of reading or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown/mistyped keys.
    #[error("{path}: {message}")]
    Toml {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A value is out of range.
    #[error("{path}: `{field}` {problem}")]
    Invalid {
        /// The file (or `<flags>`).
        path: PathBuf,
        /// The field, e.g. `optim.lr`.
        field: &'static str,
        /// What is wrong and what is allowed.
        problem: String,
    },
}

/// How parameters and optimizer updates are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimPrecision {
    /// FP32 parameters (the master weights), FP32 moments: updates of any size survive.
    Fp32,
    /// BF16 parameters with Kahan-compensated updates (a BF16 compensation buffer carries
    /// what rounding dropped into the next step).
    Bf16Kahan,
    /// BF16 parameters with stochastically rounded updates (unbiased in expectation).
    Bf16Stochastic,
    /// BF16 parameters, plain round-to-nearest updates: the baseline whose small updates
    /// vanish; for comparison only.
    Bf16Plain,
}

/// How AdamW's two moments are stored between steps (`optim.moments`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MomentPrecision {
    /// FP32 moments (the default): 8 bytes a parameter.
    #[default]
    Fp32,
    /// BF16 moments: 4 bytes a parameter, what PyTorch's AdamW keeps for BF16 parameters.
    /// Every update is still computed in f32; only the stored moments are rounded.
    Bf16,
}

impl OptimPrecision {
    /// True when parameters are stored in BF16.
    pub fn bf16_params(self) -> bool {
        !matches!(self, OptimPrecision::Fp32)
    }
}

/// `[model]`: what is fine-tuned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The base model: a Hugging Face directory (`config.json`, safetensors, tokenizer).
    pub base: PathBuf,
}

/// `[data]`: where conversations come from and how they become token sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// A JSONL file of `{"messages": [...]}` conversations.
    pub jsonl: Option<PathBuf>,
    /// A qatflow dataset store (sled directory), read in import order.
    pub store: Option<PathBuf>,
    /// Store filter: only this category.
    pub category: Option<String>,
    /// Store filter: only conversations without gate flags.
    pub clean_only: bool,
    /// Longest token sequence; longer conversations are truncated (default 2048).
    pub max_seq_len: usize,
    /// Prefix assistant replies that lack one with the empty think block
    /// (`<think>\n\n</think>\n\n`), as a `no_thinking` serving setup produces.
    pub no_thinking: bool,
    /// `enable_thinking` passed to the chat template (Qwen3); unset leaves the default.
    pub enable_thinking: Option<bool>,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            jsonl: None,
            store: None,
            category: None,
            clean_only: false,
            max_seq_len: 2048,
            no_thinking: false,
            enable_thinking: None,
        }
    }
}

/// `[optim]`: schedule and optimizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    /// Passes over the data (default 5).
    pub epochs: u32,
    /// Peak learning rate (default 1e-5).
    pub lr: f64,
    /// Fraction of all steps spent warming up linearly from 0 (default 0.03).
    pub warmup_ratio: f64,
    /// Cosine decay ends at `lr × min_lr_ratio` (default 0).
    pub min_lr_ratio: f64,
    /// Conversations per forward/backward (default 1).
    pub micro_batch: usize,
    /// Micro-batches per optimizer step (default 8: effective batch 8).
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (0 disables; default 1.0).
    pub grad_clip: f64,
    /// Decoupled weight decay (AdamW; default 0).
    pub weight_decay: f64,
    /// Adam β1 (default 0.9).
    pub beta1: f64,
    /// Adam β2 (default 0.999).
    pub beta2: f64,
    /// Adam ε (default 1e-8).
    pub eps: f64,
    /// Parameter/update precision (default `fp32`: FP32 master weights).
    pub precision: OptimPrecision,
    /// Storage of Adam's moments (default `fp32`; `bf16` halves the optimizer's memory).
    pub moments: MomentPrecision,
    /// Fake-quantize each weight once per optimizer step and reuse it in every micro-batch
    /// and every recompute (default `false`): saves `2 × grad_accum − 1` fake-quant passes
    /// over the weights a step, at the cost of keeping every quantized weight's fake-quantized
    /// copy (2 bytes a parameter at BF16) through the step.
    pub cache_fake_quant: bool,
    /// Update each block's parameters as soon as backward has finished with that block
    /// (default `false`): the step differentiates the final norm and LM head, then each
    /// decoder block from the last, then the embedding, one graph at a time, and applies
    /// AdamW to a block's parameters before going on, so the whole model's gradients never
    /// exist at once (−2 bytes a parameter at BF16). Needs `grad_accum = 1` (nothing to
    /// accumulate into) and `grad_clip = 0` (the global norm is only known after the last
    /// block; the step still reports it).
    pub update_during_backward: bool,
}

impl Default for OptimSection {
    fn default() -> Self {
        OptimSection {
            epochs: 5,
            lr: 1e-5,
            warmup_ratio: 0.03,
            min_lr_ratio: 0.0,
            micro_batch: 1,
            grad_accum: 8,
            grad_clip: 1.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            precision: OptimPrecision::Fp32,
            moments: MomentPrecision::Fp32,
            cache_fake_quant: false,
            update_during_backward: false,
        }
    }
}

/// `[quant]`: the NVFP4 fake quantizers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuantSection {
    /// Train with fake quantization (QAT); `false` is plain fine-tuning (default true).
    pub enabled: bool,
    /// Conversations of the calibration pass that sets each input quantizer's amax
    /// (default 64).
    pub calib_samples: usize,
}

impl Default for QuantSection {
    fn default() -> Self {
        QuantSection {
            enabled: true,
            calib_samples: 64,
        }
    }
}

/// `loss.kind`: what the student is trained against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// Next-token cross-entropy on the assistant tokens (the seeds' recipe).
    #[default]
    Sft,
    /// Quantization-aware distillation: forward KL(teacher ‖ student) at temperature 1 on
    /// the assistant tokens, against a teacher model's logits computed on the fly on the
    /// same device (NVIDIA's QAD), optionally mixed with the SFT loss.
    Qad,
}

/// `[loss]`: the training objective.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossSection {
    /// `sft` (default) or `qad`.
    pub kind: LossKind,
    /// The teacher's model directory for `qad` (default: `model.base`, the BF16 model QAT
    /// starts from). Resolved against the config file's directory like `model.base`.
    pub teacher: Option<PathBuf>,
    /// Weight `w` of the SFT loss in `qad`: loss = (1 − w)·KL + w·NLL, per target token
    /// (default 0: pure distillation).
    pub sft_weight: f64,
}

impl LossSection {
    /// The default objective (plain SFT), which leaves [`TrainConfig::hash`] as it was
    /// before `[loss]` existed.
    pub fn is_default(&self) -> bool {
        *self == LossSection::default()
    }
}

/// `[run]`: where, on what and how often to save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// The run directory: checkpoints, metrics, manifest (default `qatflow-data/runs/qat`).
    pub output_dir: PathBuf,
    /// Seed of the data order and stochastic rounding (default 42).
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N` (default `cpu`).
    pub device: String,
    /// Save a checkpoint every this many optimizer steps (default 50; the last step is
    /// always saved).
    pub checkpoint_every: u64,
    /// Keep this many newest valid checkpoints (default 3).
    pub keep_checkpoints: usize,
    /// Recompute activations in the backward pass (default: on for GPU, off for CPU).
    pub gradient_checkpointing: Option<bool>,
    /// Stop after this many optimizer steps (for benchmarks and tests; default: none).
    pub max_steps: Option<u64>,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            output_dir: PathBuf::from("qatflow-data/runs/qat"),
            seed: 42,
            device: "cpu".into(),
            checkpoint_every: 50,
            keep_checkpoints: 3,
            gradient_checkpointing: None,
            max_steps: None,
        }
    }
}

/// The whole configuration (`qatflow train --config FILE.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// `[model]`.
    pub model: ModelSection,
    /// `[data]`.
    #[serde(default)]
    pub data: DataSection,
    /// `[optim]`.
    #[serde(default)]
    pub optim: OptimSection,
    /// `[quant]`.
    #[serde(default)]
    pub quant: QuantSection,
    /// `[loss]`.
    #[serde(default, skip_serializing_if = "LossSection::is_default")]
    pub loss: LossSection,
    /// `[run]`.
    #[serde(default)]
    pub run: RunSection,
}

impl TrainConfig {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<TrainConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates TOML text; `path` is used in messages, and relative `model.base`,
    /// `data.jsonl` and `data.store` paths are resolved against its directory.
    pub fn from_toml(text: &str, path: &Path) -> Result<TrainConfig, ConfigError> {
        let mut config: TrainConfig = toml::from_str(text).map_err(|e| ConfigError::Toml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if let Some(base) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            let fix = |p: &mut PathBuf| {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            };
            fix(&mut config.model.base);
            if let Some(p) = config.data.jsonl.as_mut() {
                fix(p);
            }
            if let Some(p) = config.data.store.as_mut() {
                fix(p);
            }
            if let Some(p) = config.loss.teacher.as_mut() {
                fix(p);
            }
        }
        config.validate(path)?;
        Ok(config)
    }

    /// Checks every range; `path` names the source in messages.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |field: &'static str, problem: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            problem: problem.to_string(),
        };
        let o = &self.optim;
        if o.epochs == 0 {
            return Err(bad("optim.epochs", "must be at least 1"));
        }
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(bad(
                "optim.lr",
                "must be a positive number (the recipe uses 1e-5)",
            ));
        }
        if !(0.0..1.0).contains(&o.warmup_ratio) {
            return Err(bad("optim.warmup_ratio", "must be in [0, 1)"));
        }
        if !(0.0..=1.0).contains(&o.min_lr_ratio) {
            return Err(bad("optim.min_lr_ratio", "must be in [0, 1]"));
        }
        if o.micro_batch == 0 {
            return Err(bad("optim.micro_batch", "must be at least 1"));
        }
        if o.grad_accum == 0 {
            return Err(bad("optim.grad_accum", "must be at least 1"));
        }
        if !(o.grad_clip.is_finite() && o.grad_clip >= 0.0) {
            return Err(bad("optim.grad_clip", "must be >= 0 (0 disables clipping)"));
        }
        if o.update_during_backward && o.grad_accum != 1 {
            return Err(bad(
                "optim.grad_accum",
                "must be 1 with optim.update_during_backward = true (each block is updated \
                 during its backward; put more conversations in one micro-batch with \
                 optim.micro_batch instead)",
            ));
        }
        if o.update_during_backward && o.grad_clip != 0.0 {
            return Err(bad(
                "optim.grad_clip",
                "must be 0 with optim.update_during_backward = true (blocks are updated \
                 before the global gradient norm is known)",
            ));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(bad("optim.weight_decay", "must be >= 0"));
        }
        for (field, b) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(bad(field, "must be in [0, 1)"));
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(bad("optim.eps", "must be positive"));
        }
        if self.data.max_seq_len < 2 {
            return Err(bad("data.max_seq_len", "must be at least 2"));
        }
        if self.data.jsonl.is_some() == self.data.store.is_some() {
            return Err(bad(
                "data",
                "set exactly one of `data.jsonl` (a JSONL file) and `data.store` (a dataset store)",
            ));
        }
        if self.quant.enabled && self.quant.calib_samples == 0 {
            return Err(bad(
                "quant.calib_samples",
                "must be at least 1 when quant.enabled",
            ));
        }
        let l = &self.loss;
        if !(0.0..=1.0).contains(&l.sft_weight) {
            return Err(bad("loss.sft_weight", "must be in [0, 1]"));
        }
        if l.kind == LossKind::Sft && (l.teacher.is_some() || l.sft_weight != 0.0) {
            return Err(bad(
                "loss",
                "`teacher` and `sft_weight` apply to kind = \"qad\" only; set kind = \"qad\" or remove them",
            ));
        }
        if self.run.checkpoint_every == 0 {
            return Err(bad("run.checkpoint_every", "must be at least 1"));
        }
        if self.run.keep_checkpoints == 0 {
            return Err(bad("run.keep_checkpoints", "must be at least 1"));
        }
        parse_device(&self.run.device).map_err(|p| bad("run.device", &p))?;
        Ok(())
    }

    /// sha256 of everything that changes what training computes (model, data selection,
    /// optimizer, quantization, seed); output paths, device and checkpoint cadence are
    /// left out so a run can resume elsewhere.
    pub fn hash(&self) -> String {
        let mut semantic = self.clone();
        semantic.run.output_dir = PathBuf::new();
        semantic.run.device = String::new();
        semantic.run.checkpoint_every = 0;
        semantic.run.keep_checkpoints = 0;
        semantic.run.gradient_checkpointing = None;
        semantic.run.max_steps = None;
        let json = serde_json::to_vec(&semantic).expect("configs serialize");
        hex::encode(Sha256::digest(json))
    }

    /// The QAD teacher's directory (`loss.teacher`, else `model.base`); `None` for SFT.
    pub fn teacher_dir(&self) -> Option<&Path> {
        (self.loss.kind == LossKind::Qad)
            .then(|| self.loss.teacher.as_deref().unwrap_or(&self.model.base))
    }

    /// Micro-batch × accumulation: conversations per optimizer step.
    pub fn effective_batch(&self) -> usize {
        self.optim.micro_batch * self.optim.grad_accum
    }
}

/// A parsed `run.device`: the one device type, `qatflow_core::Device`.
pub use qatflow_core::Device as DeviceSpec;

/// Parses `run.device` (`cpu`, `cuda` or `cuda:N`, through the device's `FromStr`), the problem as
/// text for [`ConfigError::Invalid`].
pub fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    s.parse()
        .map_err(|e: qatflow_core::DeviceError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[model]\nbase = \"m\"\n[data]\njsonl = \"d.jsonl\"\n";

    #[test]
    fn defaults_are_the_recipe() {
        let c = TrainConfig::from_toml(MIN, Path::new("t.toml")).unwrap();
        assert_eq!(c.optim.epochs, 5);
        assert_eq!(c.optim.lr, 1e-5);
        assert_eq!(c.effective_batch(), 8);
        assert_eq!(c.data.max_seq_len, 2048);
        assert_eq!(c.quant.calib_samples, 64);
        assert_eq!(c.optim.precision, OptimPrecision::Fp32);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = TrainConfig::from_toml(
            &format!("{MIN}[optim]\nlr_max = 1.0\n"),
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("lr_max") && err.contains("t.toml"), "{err}");
        let err =
            TrainConfig::from_toml(&format!("{MIN}[optim]\nlr = -1.0\n"), Path::new("t.toml"))
                .unwrap_err()
                .to_string();
        assert!(err.contains("optim.lr"), "{err}");
        let err = TrainConfig::from_toml(
            &format!("{MIN}[run]\ndevice = \"tpu\"\n"),
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("run.device"), "{err}");
        let err = TrainConfig::from_toml("[model]\nbase = \"m\"\n", Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("data.jsonl"), "{err}");
    }

    #[test]
    fn update_during_backward_needs_one_micro_batch_and_no_clipping() {
        let on = format!("{MIN}[optim]\nupdate_during_backward = true\n");
        for (extra, field) in [
            ("grad_clip = 0.0\n", "optim.grad_accum"),
            ("grad_accum = 1\n", "optim.grad_clip"),
        ] {
            let err = TrainConfig::from_toml(&format!("{on}{extra}"), Path::new("t.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field) && err.contains("t.toml"), "{err}");
        }
        let c = TrainConfig::from_toml(
            &format!("{on}grad_accum = 1\ngrad_clip = 0.0\nmicro_batch = 4\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        assert!(c.optim.update_during_backward);
    }

    #[test]
    fn qad_reads_its_teacher_and_weight_and_checks_them() {
        let c = TrainConfig::from_toml(
            &format!("{MIN}[loss]\nkind = \"qad\"\nteacher = \"t\"\nsft_weight = 0.25\n"),
            Path::new("dir/t.toml"),
        )
        .unwrap();
        assert_eq!(c.loss.kind, LossKind::Qad);
        assert_eq!(c.teacher_dir(), Some(Path::new("dir/t")));
        assert_eq!(c.loss.sft_weight, 0.25);
        let c = TrainConfig::from_toml(
            &format!("{MIN}[loss]\nkind = \"qad\"\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.teacher_dir(), Some(Path::new("m")));
        assert_eq!(
            TrainConfig::from_toml(MIN, Path::new("t.toml"))
                .unwrap()
                .teacher_dir(),
            None
        );
        for (body, field) in [
            ("kind = \"qad\"\nsft_weight = 1.5\n", "loss.sft_weight"),
            ("teacher = \"t\"\n", "`loss`"),
            ("kind = \"kd\"\n", "kind"),
        ] {
            let err = TrainConfig::from_toml(&format!("{MIN}[loss]\n{body}"), Path::new("t.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field) && err.contains("t.toml"), "{err}");
        }
    }

    #[test]
    fn an_sft_config_hashes_as_before_loss_existed() {
        let a = TrainConfig::from_toml(MIN, Path::new("t.toml")).unwrap();
        let json = serde_json::to_value(&a).unwrap();
        assert!(json.get("loss").is_none(), "{json}");
        let mut b = a.clone();
        b.loss.kind = LossKind::Qad;
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn hash_ignores_where_but_not_what() {
        let a = TrainConfig::from_toml(MIN, Path::new("t.toml")).unwrap();
        let mut b = a.clone();
        b.run.output_dir = "elsewhere".into();
        b.run.device = "cuda:1".into();
        assert_eq!(a.hash(), b.hash());
        b.optim.lr = 2e-5;
        assert_ne!(a.hash(), b.hash());
    }
}
