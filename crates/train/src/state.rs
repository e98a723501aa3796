//! Checkpoints of a training run: the model's parameters under their Hugging Face names,
//! the quantizer amaxes (ModelOpt's `*_quantizer._amax` names), the optimizer moments and
//! the trainer's cursor, written through `qatflow-checkpoint` (temporary directory, fsync,
//! manifest of sha256 digests, rename) and read back exactly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use qatflow_checkpoint::{CheckpointInfo, CheckpointWriter, TensorEntry};
use qatflow_model::params::named_params;
use qatflow_model::CausalLm;
use qatflow_nvfp4::keys::{key, INPUT_AMAX, WEIGHT_AMAX};
use qatflow_nvfp4::QuantizerAmax;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::optim::{AdamW, ParamState};

/// File names inside a checkpoint directory.
pub mod files {
    /// Model parameters.
    pub const MODEL: &str = "model.safetensors";
    /// Quantizer amaxes.
    pub const QUANTIZERS: &str = "quantizers.safetensors";
    /// Optimizer moments and compensation buffers.
    pub const OPTIMIZER: &str = "optimizer.safetensors";
    /// The cursor and counters ([`super::TrainerState`]).
    pub const TRAINER_STATE: &str = "trainer_state.json";
}

/// Errors of saving or restoring training state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The checkpoint layer failed.
    #[error(transparent)]
    Checkpoint(#[from] qatflow_checkpoint::CheckpointError),
    /// A file of a checkpoint is unreadable or inconsistent.
    #[error("{path}: {problem}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// Where training stands: everything besides tensors needed to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Completed optimizer steps.
    pub step: u64,
    /// The current epoch (0-based).
    pub epoch: u32,
    /// Completed steps within the epoch.
    pub step_in_epoch: u64,
    /// Examples the current epoch draws from (the data may grow between epochs in follow
    /// mode; an epoch keeps the count it started with).
    pub epoch_examples: usize,
    /// Steps the whole run will take, as planned at the last epoch start.
    pub total_steps: u64,
    /// Loss-target tokens seen so far.
    pub tokens_seen: u64,
    /// Hash of the configuration ([`crate::TrainConfig::hash`]).
    pub config_hash: String,
    /// Mean loss of the last step.
    pub last_loss: Option<f32>,
}

fn bytes_of<B: Backend>(t: Tensor<B, 1>) -> (Dtype, Vec<u8>) {
    let data = t.into_data();
    let dtype = match data.dtype {
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        _ => Dtype::F32,
    };
    let data = if matches!(data.dtype, DType::BF16 | DType::F16 | DType::F32) {
        data
    } else {
        data.convert::<f32>()
    };
    (dtype, data.as_bytes().to_vec())
}

fn entry<B: Backend>(name: String, shape: Vec<usize>, t: Tensor<B, 1>) -> TensorEntry<'static> {
    let (dtype, bytes) = bytes_of(t);
    TensorEntry {
        name,
        dtype,
        shape,
        data: bytes.into(),
    }
}

/// Writes a checkpoint of step `state.step` into `run_dir` and returns it.
pub fn save<B: Backend>(
    run_dir: &Path,
    base: &Path,
    model: &CausalLm<B>,
    quant: &BTreeMap<String, QuantizerAmax>,
    optimizer: &AdamW<B>,
    state: &TrainerState,
) -> Result<CheckpointInfo, StateError> {
    let mut w = CheckpointWriter::create(run_dir, state.step)?;
    w.copy_model_files(base)?;
    let params: Vec<TensorEntry<'static>> = named_params(model)
        .into_iter()
        .map(|p| entry(p.name, p.shape, p.flat))
        .collect();
    w.write_safetensors(files::MODEL, &params)?;
    drop(params);
    let mut q = Vec::new();
    for (name, fq) in quant {
        if let Some(a) = fq.weight {
            q.push(TensorEntry::scalar_f32(key(name, WEIGHT_AMAX), a));
        }
        if let Some(a) = fq.input {
            q.push(TensorEntry::scalar_f32(key(name, INPUT_AMAX), a));
        }
    }
    w.write_safetensors(files::QUANTIZERS, &q)?;
    let mut o = Vec::new();
    for (name, s) in &optimizer.state {
        let n = s.exp_avg.dims()[0];
        o.push(entry(format!("{name}.exp_avg"), vec![n], s.exp_avg.clone()));
        o.push(entry(
            format!("{name}.exp_avg_sq"),
            vec![n],
            s.exp_avg_sq.clone(),
        ));
        if let Some(c) = &s.compensation {
            o.push(entry(format!("{name}.compensation"), vec![n], c.clone()));
        }
    }
    w.write_safetensors(files::OPTIMIZER, &o)?;
    drop(o);
    w.write_json(files::TRAINER_STATE, state)?;
    Ok(w.commit(&state.config_hash)?)
}

fn read(dir: &Path, file: &str) -> Result<Vec<u8>, StateError> {
    let path = dir.join(file);
    std::fs::read(&path).map_err(|e| StateError::File {
        path,
        problem: e.to_string(),
    })
}

fn parse<'a>(dir: &Path, file: &str, bytes: &'a [u8]) -> Result<SafeTensors<'a>, StateError> {
    SafeTensors::deserialize(bytes).map_err(|e| StateError::File {
        path: dir.join(file),
        problem: e.to_string(),
    })
}

/// Reads the trainer state of a checkpoint directory.
pub fn load_trainer_state(dir: &Path) -> Result<TrainerState, StateError> {
    let bytes = read(dir, files::TRAINER_STATE)?;
    serde_json::from_slice(&bytes).map_err(|e| StateError::File {
        path: dir.join(files::TRAINER_STATE),
        problem: format!("not a trainer state: {e}"),
    })
}

/// Reads the quantizer amaxes of a checkpoint directory, by linear module name.
pub fn load_quantizers(dir: &Path) -> Result<BTreeMap<String, QuantizerAmax>, StateError> {
    let bytes = read(dir, files::QUANTIZERS)?;
    let st = parse(dir, files::QUANTIZERS, &bytes)?;
    let mut out: BTreeMap<String, QuantizerAmax> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let bad = |problem: String| StateError::File {
            path: dir.join(files::QUANTIZERS),
            problem: format!("`{name}`: {problem}"),
        };
        let value: [u8; 4] = view
            .data()
            .try_into()
            .map_err(|_| bad("not an F32 scalar".into()))?;
        let value = f32::from_le_bytes(value);
        if let Some(module) = name.strip_suffix(WEIGHT_AMAX) {
            out.entry(module.to_string()).or_default().weight = Some(value);
        } else if let Some(module) = name.strip_suffix(INPUT_AMAX) {
            out.entry(module.to_string()).or_default().input = Some(value);
        } else {
            return Err(bad("unexpected tensor name".into()));
        }
    }
    Ok(out)
}

/// Reads the optimizer moments of a checkpoint directory onto `device`.
pub fn load_optimizer<B: Backend>(
    dir: &Path,
    optimizer: &mut AdamW<B>,
    step: u64,
    device: &B::Device,
) -> Result<(), StateError> {
    let bytes = read(dir, files::OPTIMIZER)?;
    let st = parse(dir, files::OPTIMIZER, &bytes)?;
    let tensor = |name: &str| -> Result<Tensor<B, 1>, StateError> {
        let view = st.tensor(name).map_err(|e| StateError::File {
            path: dir.join(files::OPTIMIZER),
            problem: format!("`{name}`: {e}"),
        })?;
        let n = view.shape().iter().product::<usize>();
        let dtype = match view.dtype() {
            Dtype::BF16 => DType::BF16,
            _ => DType::F32,
        };
        let data = TensorData::from_bytes_vec(view.data().to_vec(), [n], dtype);
        Ok(Tensor::from_data(data, (device, dtype)))
    };
    let mut names: Vec<String> = st
        .names()
        .into_iter()
        .filter_map(|n| n.strip_suffix(".exp_avg").map(str::to_string))
        .collect();
    names.sort();
    optimizer.state.clear();
    for name in names {
        let compensation = if st
            .names()
            .iter()
            .any(|n| **n == format!("{name}.compensation"))
        {
            Some(tensor(&format!("{name}.compensation"))?)
        } else {
            None
        };
        optimizer.state.insert(
            name.clone(),
            ParamState {
                exp_avg: tensor(&format!("{name}.exp_avg"))?,
                exp_avg_sq: tensor(&format!("{name}.exp_avg_sq"))?,
                compensation,
            },
        );
    }
    optimizer.step = step;
    Ok(())
}
