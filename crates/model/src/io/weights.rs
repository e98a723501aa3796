//! Reading Hugging Face safetensors checkpoints into burn tensors: `model.safetensors` or
//! a sharded `model.safetensors.index.json`, memory-mapped and converted one tensor at a
//! time (a checkpoint is never held twice in memory). Every expected tensor is checked
//! (presence, dtype, shape) before any is converted, and all problems are reported at
//! once. NVFP4 linears of a ModelOpt export (packed U8 `weight`, F8_E4M3 `weight_scale`,
//! F32 `weight_scale_2`, optional `input_scale`) are dequantized with the
//! `qatflow-nvfp4` codec.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::config::ConfigError;
use crate::linear::{QLinear, QuantConfigError};
use qatflow_nvfp4::keys::{key, INPUT_SCALE, WEIGHT_SCALE, WEIGHT_SCALE_2};
use qatflow_nvfp4::QuantizerAmax;

/// Errors of loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `config.json` is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file could not be opened or mapped.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A weight file is not a complete safetensors file.
    #[error("{path} is not a valid safetensors file ({message}); it may be truncated or still downloading: fetch or export it again")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The directory holds neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("{dir} has no model.safetensors or model.safetensors.index.json; point at a Hugging Face model directory")]
    NoWeights {
        /// The directory.
        dir: PathBuf,
    },
    /// The shard index is malformed.
    #[error("{path}: {problem}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Tensors the configuration needs are missing or have the wrong dtype or shape.
    #[error("{origin}: {} tensor problem(s) for this config.json:\n  {}", problems.len(), problems.join("\n  "))]
    Tensors {
        /// The checkpoint (directory or files).
        origin: String,
        /// One line per problem, naming the tensor.
        problems: Vec<String>,
    },
    /// An NVFP4 tensor could not be decoded.
    #[error("NVFP4 tensor `{name}`: {source}")]
    Nvfp4 {
        /// The linear layer.
        name: String,
        /// The codec's error.
        source: qatflow_nvfp4::Error,
    },
    /// An imported `input_scale` cannot drive the activation fake quantizer.
    #[error(transparent)]
    Quant(#[from] QuantConfigError),
    /// The tokenizer is unusable or does not match the model.
    #[error(transparent)]
    Tokenizer(#[from] crate::text::tokenizer::TokenizerError),
}

/// Parameter precision chosen at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Precision {
    /// float32 parameters and activations.
    #[default]
    F32,
    /// bfloat16 parameters and activations (norms, softmax and log-softmax still in f32).
    Bf16,
}

impl Precision {
    /// The burn dtype.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

struct File {
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// The memory-mapped safetensors files of one checkpoint.
pub struct Checkpoint {
    origin: String,
    files: Vec<File>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("origin", &self.origin)
            .field("files", &self.files.len())
            .field("tensors", &self.index.len())
            .finish()
    }
}

fn open_file(path: &Path) -> Result<File, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the map is read-only; a checkpoint modified while loaded is a user error
    // that at worst yields wrong weights, which every caller validates by shape.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&mmap).map_err(|e| LoadError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(File {
        mmap,
        header_len,
        metadata,
    })
}

/// Shape and dtype of a stored tensor, and its bytes.
struct Stored<'a> {
    info: &'a TensorInfo,
    bytes: &'a [u8],
}

/// The weight files of a Hugging Face model directory: `model.safetensors`, or the shards
/// named by `model.safetensors.index.json` (sorted, each once).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.exists() {
        return Err(LoadError::NoWeights {
            dir: dir.to_path_buf(),
        });
    }
    let bad = |problem: String| LoadError::Index {
        path: index_path.clone(),
        problem,
    };
    let text = std::fs::read_to_string(&index_path).map_err(|source| LoadError::Io {
        path: index_path.clone(),
        source,
    })?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut shards: Vec<String> = Vec::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[{name:?}] is not a file name")))?;
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    shards.sort();
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards named by
    /// `dir/model.safetensors.index.json` ([`weight_files`]).
    pub fn open(dir: &Path) -> Result<Checkpoint, LoadError> {
        let paths = weight_files(dir)?;
        let mut ckpt = Checkpoint::from_files(&paths)?;
        ckpt.origin = dir.display().to_string();
        Ok(ckpt)
    }

    /// Maps the given safetensors files as one checkpoint (a tensor name found in several
    /// files is taken from the first).
    pub fn from_files(paths: &[PathBuf]) -> Result<Checkpoint, LoadError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = open_file(path)?;
            for name in file.metadata.tensors().into_keys() {
                index.entry(name).or_insert(i);
            }
            files.push(file);
        }
        let origin = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Checkpoint {
            origin,
            files,
            index,
        })
    }

    /// Names of all stored tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Dtype and shape of a stored tensor.
    pub fn info(&self, name: &str) -> Option<(Dtype, Vec<usize>)> {
        self.stored(name)
            .map(|s| (s.info.dtype, s.info.shape.clone()))
    }

    fn stored(&self, name: &str) -> Option<Stored<'_>> {
        let file = &self.files[*self.index.get(name)?];
        let info = file.metadata.info(name)?;
        let start = 8 + file.header_len;
        let (a, b) = info.data_offsets;
        Some(Stored {
            info,
            bytes: &file.mmap[start + a..start + b],
        })
    }

    /// Checks the listed tensors (`(name, shape, is_quantizable_linear)`, linears named
    /// without `.weight`, as the architectures list them) and reports all problems at once.
    pub fn check_tensors(&self, tensors: &[(String, Vec<usize>, bool)]) -> Result<(), LoadError> {
        let mut problems = Vec::new();
        for (name, shape, linear) in tensors.iter().cloned() {
            if linear {
                self.check_linear(&name, &shape, &mut problems);
            } else {
                self.check_float(&name, &shape, &mut problems);
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LoadError::Tensors {
                origin: self.origin.clone(),
                problems,
            })
        }
    }

    fn check_float(&self, name: &str, shape: &[usize], problems: &mut Vec<String>) {
        match self.stored(name) {
            None => problems.push(format!("`{name}`: missing (expected shape {shape:?})")),
            Some(s) if !matches!(s.info.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) => problems
                .push(format!(
                    "`{name}`: dtype {:?}, expected F32, BF16 or F16",
                    s.info.dtype
                )),
            Some(s) if s.info.shape != shape => problems.push(format!(
                "`{name}`: shape {:?}, expected {shape:?}",
                s.info.shape
            )),
            Some(_) => {}
        }
    }

    fn check_scalar(&self, name: &str, required: bool, problems: &mut Vec<String>) {
        match self.stored(name) {
            None if required => problems.push(format!("`{name}`: missing (F32 scalar)")),
            None => {}
            Some(s) if s.info.dtype != Dtype::F32 || s.bytes.len() != 4 => problems.push(format!(
                "`{name}`: dtype {:?} shape {:?}, expected an F32 scalar",
                s.info.dtype, s.info.shape
            )),
            Some(_) => {}
        }
    }

    fn check_linear(&self, prefix: &str, shape: &[usize], problems: &mut Vec<String>) {
        let weight = format!("{prefix}.weight");
        let Some(s) = self.stored(&weight) else {
            problems.push(format!("`{weight}`: missing (expected shape {shape:?})"));
            return;
        };
        if s.info.dtype != Dtype::U8 {
            self.check_float(&weight, shape, problems);
            return;
        }
        let (out, inp) = (shape[0], shape[1]);
        if inp % qatflow_nvfp4::BLOCK_SIZE != 0 || s.info.shape != [out, inp / 2] {
            problems.push(format!(
                "`{weight}`: NVFP4 packed shape {:?}, expected [{out}, {}] for a [{out}, {inp}] layer",
                s.info.shape,
                inp / 2
            ));
        }
        let scale = key(prefix, WEIGHT_SCALE);
        let want = [out, inp / qatflow_nvfp4::BLOCK_SIZE];
        match self.stored(&scale) {
            None => problems.push(format!("`{scale}`: missing (F8_E4M3 {want:?})")),
            Some(s) if s.info.dtype != Dtype::F8_E4M3 || s.info.shape != want => {
                problems.push(format!(
                    "`{scale}`: dtype {:?} shape {:?}, expected F8_E4M3 {want:?}",
                    s.info.dtype, s.info.shape
                ))
            }
            Some(_) => {}
        }
        self.check_scalar(&key(prefix, WEIGHT_SCALE_2), true, problems);
        self.check_scalar(&key(prefix, INPUT_SCALE), false, problems);
    }

    fn scalar(&self, name: &str) -> Option<f32> {
        let s = self.stored(name)?;
        Some(f32::from_le_bytes(s.bytes.try_into().ok()?))
    }
}

/// `data` on `device` as `dtype`, allocated the way burn allocates the parameters it loads
/// itself (`Backend::memory_persistent_allocations`). On CubeCL that is an exact-size slice of
/// the persistent pool, and every later tensor of that byte size (the new value after an
/// update, the gradient, a moment in the weight's dtype) reuses such slices instead of being
/// carved out of the sliced pools' pages, whose granularity grows with the device's memory
/// (a quarter of it for the largest). Elsewhere a plain upload.
fn parameter<B: Backend, const D: usize>(
    device: &B::Device,
    data: TensorData,
    dtype: DType,
) -> Tensor<B, D> {
    B::memory_persistent_allocations(device, data, |data| {
        Tensor::from_data(data, (device, dtype))
    })
}

/// A tensor's stored floats widened to `f32`, on every core (a multi-GB checkpoint's
/// conversion is most of its load time on the CPU).
fn decode_floats(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::BF16 => bytes
            .par_chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        Dtype::F16 => bytes
            .par_chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => bytes
            .par_chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    }
}

/// Converts checked tensors of a [`Checkpoint`] to burn tensors of one precision on one
/// device.
pub struct Weights<'a, B: Backend> {
    ckpt: &'a Checkpoint,
    device: B::Device,
    dtype: DType,
    emulate_activations: bool,
}

impl<'a, B: Backend> Weights<'a, B> {
    /// A converter; with `emulate_activations`, NVFP4 linears that carry an `input_scale`
    /// get an input fake quantizer (W4A4 as Blackwell serves it), else weights only (W4A16).
    pub fn new(
        ckpt: &'a Checkpoint,
        precision: Precision,
        emulate_activations: bool,
        device: &B::Device,
    ) -> Self {
        Weights {
            ckpt,
            device: device.clone(),
            dtype: precision.dtype(),
            emulate_activations,
        }
    }

    fn missing(&self, name: &str, problem: String) -> LoadError {
        LoadError::Tensors {
            origin: self.ckpt.origin.clone(),
            problems: vec![format!("`{name}`: {problem}")],
        }
    }

    fn make<const D: usize>(&self, values: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
        let data = match self.dtype {
            DType::BF16 => TensorData::new(
                values
                    .into_iter()
                    .map(half::bf16::from_f32)
                    .collect::<Vec<_>>(),
                shape,
            ),
            _ => TensorData::new(values, shape),
        };
        parameter(&self.device, data, self.dtype)
    }

    /// A float tensor of the given shape in the load precision.
    pub fn tensor<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<B, D>, LoadError> {
        let s = self
            .ckpt
            .stored(name)
            .ok_or_else(|| self.missing(name, "missing".into()))?;
        if s.info.shape != shape {
            return Err(self.missing(
                name,
                format!("shape {:?}, expected {shape:?}", s.info.shape),
            ));
        }
        let on_gpu = qatflow_kernels::gemm::cuda_index::<B>(&self.device).is_some();
        if s.info.dtype == Dtype::BF16 && (self.dtype == DType::BF16 || on_gpu) {
            // BF16 → F32 is exact; on a GPU the widening happens there: half the bytes cross
            // to the device and no F32 copy of the model is built on the host (on the CPU
            // widening while decoding, below, is faster than a cast after it).
            let data = TensorData::from_bytes_vec(s.bytes.to_vec(), shape, DType::BF16);
            return Ok(if self.dtype == DType::BF16 {
                parameter(&self.device, data, DType::BF16)
            } else {
                Tensor::<B, D>::from_data(data, (&self.device, DType::BF16)).cast(self.dtype)
            });
        }
        if !matches!(s.info.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(self.missing(name, format!("unsupported dtype {:?}", s.info.dtype)));
        }
        Ok(self.make(decode_floats(s.info.dtype, s.bytes), shape))
    }

    /// A float tensor of the given shape in float32 whatever the load precision (for
    /// parameters such as Qwen3.5's `A_log` that stay float32 in mixed precision).
    pub fn tensor_f32<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<B, D>, LoadError> {
        let converter = Weights {
            ckpt: self.ckpt,
            device: self.device.clone(),
            dtype: DType::F32,
            emulate_activations: self.emulate_activations,
        };
        converter.tensor(name, shape)
    }

    /// The quantizable linear `{prefix}.weight` `[out, inp]`: a float weight, or an NVFP4
    /// export's packed weight dequantized (plus its input quantizer when emulating W4A4).
    pub fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<QLinear<B>, LoadError> {
        let name = format!("{prefix}.weight");
        let s = self
            .ckpt
            .stored(&name)
            .ok_or_else(|| self.missing(&name, "missing".into()))?;
        if s.info.dtype != Dtype::U8 {
            return Ok(QLinear::new(prefix, self.tensor(&name, [out, inp])?));
        }
        let scale_name = key(prefix, WEIGHT_SCALE);
        let scale = self
            .ckpt
            .stored(&scale_name)
            .ok_or_else(|| self.missing(&scale_name, "missing".into()))?;
        let scale_2_name = key(prefix, WEIGHT_SCALE_2);
        let scale_2 = self
            .ckpt
            .scalar(&scale_2_name)
            .ok_or_else(|| self.missing(&scale_2_name, "missing or not an F32 scalar".into()))?;
        let nvfp4 = qatflow_nvfp4::Nvfp4Tensor::from_parts(
            prefix,
            vec![out, inp],
            s.bytes.to_vec(),
            scale.bytes.to_vec(),
            scale_2,
        )
        .map_err(|source| LoadError::Nvfp4 {
            name: prefix.to_string(),
            source,
        })?;
        let mut layer = QLinear::new(prefix, self.make(nvfp4.dequantize(), [out, inp]));
        if self.emulate_activations {
            if let Some(input_scale) = self.ckpt.scalar(&key(prefix, INPUT_SCALE)) {
                layer.set_fake_quant(QuantizerAmax {
                    weight: None,
                    input: Some(qatflow_nvfp4::codec::amax_for_global_scale(input_scale)),
                })?;
            }
        }
        Ok(layer)
    }
}
