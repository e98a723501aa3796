//! The export pipeline shared by checkpoint export and PTQ: plan the output tensors, write
//! them one source tensor at a time into a temporary sibling directory `.DIR.tmp-<pid>`,
//! fsync, read every header back, and rename the directory into place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qatflow_checkpoint::st::{Layout, StreamWriter, TensorSpec};
use qatflow_checkpoint::{fsync_dir, remove_stale_temp_dirs, write_synced, TOKENIZER_FILES};
use qatflow_core::Progress;
use qatflow_nvfp4::keys::{key, INPUT_SCALE, WEIGHT_AMAX, WEIGHT_SCALE, WEIGHT_SCALE_2};
use qatflow_nvfp4::linears::{exclude_modules, quantized_module};
use qatflow_nvfp4::vectorized::quantize_bytes;
use qatflow_nvfp4::{codec, LinearAmax};
use safetensors::{Dtype, SafeTensors};
use serde::Serialize;
use serde_json::Value;

use tokio_util::sync::CancellationToken;

use crate::error::ExportError;
use crate::modelopt;
use crate::pieces::run_pieces;
use crate::report::{ExportReport, OutputFile, SourceDescription, TensorReport, Totals};
use crate::source::{SourceInfo, SourceTensors};

/// Shard size above which the weights are split, as `save_pretrained` does (5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The image-processor stub a VL-wrapped export gets (copied from the source if it has one).
pub const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";

/// Environment variable the CLI reads into [`ExportOptions::pause_after_tensors`] (tests use
/// it to kill an export mid-write).
pub const PAUSE_ENV: &str = "QATFLOW_EXPORT_PAUSE_AFTER_TENSORS";

/// Elements per piece of work a thread takes at a time (whole rows, at least one row): small
/// enough that memory stays at a few pieces per thread, large enough for big writes.
const PIECE_ELEMENTS: usize = 1 << 18;

/// Bytes per piece when a BF16 tensor is copied unchanged.
const COPY_BYTES: usize = 8 << 20;

/// How to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// Replace an existing output directory.
    pub force: bool,
    /// Largest weight shard in bytes before `model.safetensors` is split.
    pub max_shard_bytes: u64,
    /// Test hook: stop after this many source tensors, with the output half-written, until
    /// the export is cancelled (then it cleans up as any cancelled export); see [`PAUSE_ENV`].
    pub pause_after_tensors: Option<usize>,
    /// Threads for quantization and copying (0: all available cores).
    pub threads: usize,
    /// Whether `config.json` gets the Qwen3.5 VL wrapper (and `preprocessor_config.json`).
    pub vl_wrapper: VlWrapper,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            force: false,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            pause_after_tensors: None,
            threads: 0,
            vl_wrapper: VlWrapper::Auto,
        }
    }
}

/// Whether to wrap a text-only Qwen3.5 export the way vLLM serves it: `config.json` as
/// [`modelopt::vl_wrapper_config`] and a [`modelopt::preprocessor_config`] stub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VlWrapper {
    /// Wrap when the source config's `model_type` is `qwen3_5_text`.
    #[default]
    Auto,
    /// Always wrap; an error for any other `model_type`.
    On,
    /// Never wrap: `config.json` exactly as ModelOpt writes it.
    Off,
}

impl VlWrapper {
    /// Whether a source with this config gets the wrapper; `On` for a config that is not
    /// `qwen3_5_text` is an error naming `config_path`.
    pub fn applies(
        self,
        config: &serde_json::Map<String, Value>,
        config_path: &Path,
    ) -> Result<bool, ExportError> {
        let qwen3_5 = modelopt::model_type(config) == Some(modelopt::QWEN3_5_TEXT);
        match self {
            VlWrapper::Off => Ok(false),
            VlWrapper::Auto => Ok(qwen3_5),
            VlWrapper::On if qwen3_5 => Ok(true),
            VlWrapper::On => Err(ExportError::NoVlWrapper {
                path: config_path.to_path_buf(),
                model_type: modelopt::model_type(config).unwrap_or("(none)").to_owned(),
            }),
        }
    }
}

/// The quantized linears of a model: module names of every tensor that
/// [`quantized_module`] selects.
pub fn quantized_modules(tensors: &SourceTensors) -> Vec<String> {
    tensors
        .tensors()
        .iter()
        .filter_map(|(name, info)| quantized_module(name, &info.shape))
        .map(str::to_owned)
        .collect()
}

enum Job<'a> {
    Quantize { module: &'a str, amax: LinearAmax },
    Bf16,
    Raw,
}

fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16 | Dtype::F64)
}

/// Float types the exporter reads (converts or quantizes).
fn is_readable_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16)
}

fn spec(name: String, dtype: Dtype, shape: Vec<usize>) -> TensorSpec {
    TensorSpec { name, dtype, shape }
}

/// Output directory handling: the temporary sibling and the final rename.
/// Dropped before [`OutDir::commit`] (an error or cancellation), it removes the
/// temporary directory.
struct OutDir {
    out: PathBuf,
    parent: PathBuf,
    tmp: PathBuf,
    force: bool,
    committed: bool,
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = std::fs::remove_dir_all(&self.tmp) {
                tracing::warn!(dir = %self.tmp.display(), "could not remove the unfinished export's temporary directory: {e}");
            }
        }
    }
}

impl OutDir {
    fn prepare(out: &Path, source: &Path, force: bool) -> Result<Self, ExportError> {
        let name = out
            .file_name()
            .ok_or_else(|| ExportError::BadInput {
                path: out.to_path_buf(),
                problem: "--out needs a directory name".into(),
            })?
            .to_string_lossy()
            .into_owned();
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| ExportError::io(&parent, e))?;
        let src = source
            .canonicalize()
            .map_err(|e| ExportError::io(source, e))?;
        let target = parent
            .canonicalize()
            .map_err(|e| ExportError::io(&parent, e))?
            .join(&name);
        if src == target || src.starts_with(&target) {
            return Err(ExportError::OutputIsSource {
                out: out.to_path_buf(),
                source_dir: source.to_path_buf(),
            });
        }
        if out.exists() && !force {
            return Err(ExportError::OutputExists {
                dir: out.to_path_buf(),
            });
        }
        let prefix = format!(".{name}.tmp-");
        for stale in remove_stale_temp_dirs(&parent, &prefix)? {
            tracing::info!(dir = %stale.display(), "removed the temporary directory of an export that did not finish");
        }
        let tmp = parent.join(format!("{prefix}{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| ExportError::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| ExportError::io(&tmp, e))?;
        Ok(OutDir {
            out: out.to_path_buf(),
            parent,
            tmp,
            force,
            committed: false,
        })
    }

    fn commit(mut self) -> Result<(), ExportError> {
        fsync_dir(&self.tmp)?;
        let old = if self.out.exists() {
            if !self.force {
                return Err(ExportError::OutputExists {
                    dir: self.out.clone(),
                });
            }
            let name = self.out.file_name().expect("checked").to_string_lossy();
            let old = self
                .parent
                .join(format!(".{name}.tmp-old-{}", std::process::id()));
            std::fs::rename(&self.out, &old).map_err(|e| ExportError::io(&self.out, e))?;
            Some(old)
        } else {
            None
        };
        std::fs::rename(&self.tmp, &self.out).map_err(|e| ExportError::io(&self.out, e))?;
        self.committed = true;
        fsync_dir(&self.parent)?;
        if let Some(old) = old {
            std::fs::remove_dir_all(&old).map_err(|e| ExportError::io(&old, e))?;
        }
        Ok(())
    }
}

/// Splits tensors into shards of at most `max` bytes (a larger tensor gets a shard of its
/// own), in safetensors file order; returns the file names and each shard's specs.
fn shard(mut specs: Vec<TensorSpec>, max: u64) -> Vec<(String, Vec<TensorSpec>)> {
    specs.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
    let mut shards: Vec<Vec<TensorSpec>> = vec![Vec::new()];
    let mut size = 0u64;
    for s in specs {
        let len = qatflow_checkpoint::st::byte_len(s.dtype, &s.shape).unwrap_or(0);
        if size > 0 && size + len > max {
            shards.push(Vec::new());
            size = 0;
        }
        size += len;
        shards.last_mut().expect("one shard").push(s);
    }
    let n = shards.len();
    shards
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let name = if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", i + 1)
            };
            (name, s)
        })
        .collect()
}

struct Sharded {
    writers: Vec<StreamWriter>,
    files: Vec<String>,
    of: BTreeMap<String, usize>,
}

impl Sharded {
    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), ExportError> {
        Ok(self.writers[self.of[name]].write_tensor(name, bytes)?)
    }

    fn write_chunk(&self, name: &str, offset: u64, bytes: &[u8]) -> Result<(), ExportError> {
        Ok(self.writers[self.of[name]].write_chunk(name, offset, bytes)?)
    }

    fn start_writeback(&self, name: &str) -> Result<(), ExportError> {
        Ok(self.writers[self.of[name]].start_writeback(name)?)
    }
}

fn rel_error(err: f64, reference: f64) -> f64 {
    if reference > 0.0 {
        (err / reference).sqrt()
    } else if err > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// The test hook of [`ExportOptions::pause_after_tensors`]: waits, with the output
/// half-written, until `cancel` fires (or the process is killed).
fn pause_until_cancelled(after: usize, cancel: &CancellationToken) -> ExportError {
    tracing::warn!(
        "{PAUSE_ENV}: export paused after {after} tensors (test hook); the output is half-written"
    );
    while !cancel.is_cancelled() {
        std::thread::sleep(Duration::from_millis(20));
    }
    ExportError::Cancelled
}

fn write_json(path: &Path, value: &Value, indent: &[u8]) -> Result<(), ExportError> {
    let mut bytes = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(indent);
    let mut ser = serde_json::Serializer::with_formatter(&mut bytes, fmt);
    value.serialize(&mut ser).expect("JSON values serialize");
    bytes.push(b'\n');
    Ok(write_synced(path, &bytes)?)
}

fn read_json_object(path: &Path) -> Result<serde_json::Map<String, Value>, ExportError> {
    let text = std::fs::read(path).map_err(|e| ExportError::io(path, e))?;
    match serde_json::from_slice(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ExportError::BadInput {
            path: path.to_path_buf(),
            problem: "not a JSON object".into(),
        }),
        Err(e) => Err(ExportError::BadInput {
            path: path.to_path_buf(),
            problem: format!("not valid JSON: {e}"),
        }),
    }
}

/// Reads every written weight file back: its header must be the planned one and parse with
/// a data length that matches the file.
fn verify_written(tmp: &Path, layouts: &[(String, Layout)]) -> Result<(), ExportError> {
    for (file, layout) in layouts {
        let path = tmp.join(file);
        let bytes_on_disk = std::fs::metadata(&path)
            .map_err(|e| ExportError::io(&path, e))?
            .len();
        let f = std::fs::File::open(&path).map_err(|e| ExportError::io(&path, e))?;
        // SAFETY: read-only map of a file only this process writes, and it is finished.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| ExportError::io(&path, e))?;
        let fail = |problem: String| ExportError::Verify {
            path: path.clone(),
            problem,
        };
        let (_, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| fail(e.to_string()))?;
        if bytes_on_disk != layout.file_len()
            || mmap.get(..layout.header().len()) != Some(layout.header())
        {
            return Err(fail(
                "the header read back differs from the one written".into(),
            ));
        }
        for p in layout.placements() {
            let info = meta
                .info(&p.spec.name)
                .ok_or_else(|| fail(format!("tensor `{}` is missing", p.spec.name)))?;
            if info.dtype != p.spec.dtype || info.shape != p.spec.shape {
                return Err(fail(format!(
                    "tensor `{}` has the wrong dtype or shape",
                    p.spec.name
                )));
            }
        }
    }
    Ok(())
}

/// Writes the NVFP4 export of `tensors` (the weights of `src_dir`) into `out`.
///
/// `amax` must hold every linear of [`quantized_modules`]; `amax_origin` names where the
/// amaxes came from, for errors. Everything else in `src_dir` that the output needs
/// (`config.json`, `generation_config.json`, tokenizer files) is read from there. Tensors
/// are written one after the other, each split into pieces that `options.threads` threads
/// quantize or copy at once. When `cancel` fires the export stops within one piece per
/// thread, removes its temporary directory and returns [`ExportError::Cancelled`].
#[allow(clippy::too_many_arguments)]
pub fn write_export(
    src_dir: &Path,
    tensors: &SourceTensors,
    amax: &BTreeMap<String, LinearAmax>,
    amax_origin: &Path,
    source: SourceDescription,
    out: &Path,
    options: &ExportOptions,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<ExportReport, ExportError> {
    write_export_then(
        src_dir,
        tensors,
        amax,
        amax_origin,
        source,
        out,
        options,
        progress,
        cancel,
        || Ok(()),
    )
}

/// The export plan: one job per source tensor (quantize, convert to BF16, or copy) and
/// the output tensors' specs; refuses unreadable dtypes, quantized linears without an
/// amax and amaxes of no quantized linear.
fn plan<'a>(
    tensors: &'a SourceTensors,
    amax: &BTreeMap<String, LinearAmax>,
    amax_origin: &Path,
) -> Result<Plan<'a>, ExportError> {
    let mut jobs: Vec<(&str, &SourceInfo, Job<'_>)> = Vec::new();
    let mut specs = Vec::new();
    for (name, info) in tensors.tensors() {
        if is_float(info.dtype) && !is_readable_float(info.dtype) {
            return Err(ExportError::BadInput {
                path: tensors.path_of(info).to_path_buf(),
                problem: format!(
                    "tensor `{name}` is {:?}; the exporter reads F32, BF16 or F16 weights",
                    info.dtype
                ),
            });
        }
        if let Some(module) = quantized_module(name, &info.shape) {
            let a = *amax.get(module).ok_or_else(|| ExportError::MissingAmax {
                file: amax_origin.to_path_buf(),
                tensor: key(module, WEIGHT_AMAX),
            })?;
            if !is_readable_float(info.dtype) {
                return Err(ExportError::BadInput {
                    path: tensors.path_of(info).to_path_buf(),
                    problem: format!(
                        "tensor `{name}` is {:?}; a quantized linear's weight must be F32, BF16 or F16",
                        info.dtype
                    ),
                });
            }
            let [rows, cols] = [info.shape[0], info.shape[1]];
            codec::check_shape(name, &info.shape, info.numel())?;
            specs.push(spec(name.clone(), Dtype::U8, vec![rows, cols / 2]));
            specs.push(spec(
                key(module, WEIGHT_SCALE),
                Dtype::F8_E4M3,
                vec![rows, cols / codec::BLOCK_SIZE],
            ));
            specs.push(spec(key(module, WEIGHT_SCALE_2), Dtype::F32, vec![]));
            specs.push(spec(key(module, INPUT_SCALE), Dtype::F32, vec![]));
            jobs.push((name, info, Job::Quantize { module, amax: a }));
        } else if is_float(info.dtype) {
            specs.push(spec(name.clone(), Dtype::BF16, info.shape.clone()));
            jobs.push((name, info, Job::Bf16));
        } else {
            specs.push(spec(name.clone(), info.dtype, info.shape.clone()));
            jobs.push((name, info, Job::Raw));
        }
    }
    let quantized: std::collections::BTreeSet<&str> = jobs
        .iter()
        .filter_map(|(_, _, j)| match j {
            Job::Quantize { module, .. } => Some(*module),
            _ => None,
        })
        .collect();
    if let Some(extra) = amax.keys().find(|m| !quantized.contains(m.as_str())) {
        return Err(ExportError::UnknownAmax {
            file: amax_origin.to_path_buf(),
            tensor: key(extra, WEIGHT_AMAX),
        });
    }
    Ok((jobs, specs))
}

/// The jobs (tensor name, its source, what to do) and the output tensors' specs.
type Plan<'a> = (Vec<(&'a str, &'a SourceInfo, Job<'a>)>, Vec<TensorSpec>);

/// Opens one stream writer per output shard in `tmp`; answers the writers and each
/// shard's file name and layout.
fn open_shards(
    tmp: &Path,
    specs: Vec<TensorSpec>,
    max_shard_bytes: u64,
) -> Result<(Sharded, Vec<(String, Layout)>), ExportError> {
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let mut layouts = Vec::new();
    let mut sharded = Sharded {
        writers: Vec::new(),
        files: Vec::new(),
        of: BTreeMap::new(),
    };
    for (i, (file, specs)) in shard(specs, max_shard_bytes).into_iter().enumerate() {
        for s in &specs {
            sharded.of.insert(s.name.clone(), i);
        }
        let layout = Layout::new(specs, Some(&meta))?;
        sharded
            .writers
            .push(StreamWriter::create(&tmp.join(&file), layout.clone())?);
        sharded.files.push(file.clone());
        layouts.push((file, layout));
    }
    Ok((sharded, layouts))
}

/// Runs every job into the shard writers (quantizing on `threads` threads) and finishes
/// the writers; answers a report per tensor.
fn write_tensors(
    jobs: &[(&str, &SourceInfo, Job<'_>)],
    tensors: &SourceTensors,
    sharded: &mut Sharded,
    threads: usize,
    options: &ExportOptions,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<Vec<TensorReport>, ExportError> {
    progress.set_total(jobs.iter().map(|(_, i, _)| i.byte_len() as u64).sum());
    let mut reports = Vec::with_capacity(jobs.len());
    for (done, (name, info, job)) in jobs.iter().enumerate() {
        if cancel.is_cancelled() {
            return Err(ExportError::Cancelled);
        }
        let name: &str = name;
        let mut report = TensorReport {
            name: name.to_owned(),
            source_dtype: format!("{:?}", info.dtype),
            shape: info.shape.clone(),
            exported_as: String::new(),
            rel_error: 0.0,
            weight_amax: None,
            input_amax: None,
        };
        let width = info.dtype.bitsize() / 8;
        let src = tensors.bytes(info);
        match job {
            Job::Quantize { module, amax } => {
                let [rows, cols] = [info.shape[0], info.shape[1]];
                let scale_2 = codec::weight_scale_2(module, amax.weight)?;
                let input_scale = codec::input_scale(module, amax.input)?;
                let scale_name = key(module, WEIGHT_SCALE);
                let per = (PIECE_ELEMENTS / cols).max(1);
                let sums = run_pieces(rows.div_ceil(per), threads, cancel, |i| {
                    let (e0, e1) = (i * per * cols, ((i + 1) * per).min(rows) * cols);
                    let mut packed = vec![0u8; (e1 - e0) / 2];
                    let mut scales = vec![0u8; (e1 - e0) / codec::BLOCK_SIZE];
                    let mut bytes = Vec::new();
                    tensors.read_bytes(info, e0 * width..e1 * width, &mut bytes)?;
                    let sums =
                        quantize_bytes(info.dtype, &bytes, scale_2, &mut packed, &mut scales)
                            .map_err(|(index, value)| qatflow_nvfp4::Error::NonFinite {
                                name: name.to_owned(),
                                index: e0 + index,
                                value,
                            })?;
                    sharded.write_chunk(name, (e0 / 2) as u64, &packed)?;
                    sharded.write_chunk(&scale_name, (e0 / codec::BLOCK_SIZE) as u64, &scales)?;
                    Ok(sums)
                })?;
                let (err, reference) = sums
                    .iter()
                    .fold((0f64, 0f64), |(e, r), s| (e + s.0, r + s.1));
                sharded.write(&key(module, WEIGHT_SCALE_2), &scale_2.to_le_bytes())?;
                sharded.write(&key(module, INPUT_SCALE), &input_scale.to_le_bytes())?;
                sharded.start_writeback(name)?;
                sharded.start_writeback(&scale_name)?;
                report.exported_as = "NVFP4".into();
                report.rel_error = rel_error(err, reference);
                report.weight_amax = Some(amax.weight);
                report.input_amax = Some(amax.input);
            }
            Job::Bf16 if info.dtype == Dtype::BF16 => {
                // One thread: a plain copy is bound by the file's write lock, not the CPU.
                run_pieces(src.len().div_ceil(COPY_BYTES), 1, cancel, |i| {
                    let range = i * COPY_BYTES..((i + 1) * COPY_BYTES).min(src.len());
                    sharded.write_chunk(name, range.start as u64, &src[range.clone()])?;
                    tensors.release_bytes(info, range);
                    Ok(())
                })?;
                sharded.start_writeback(name)?;
                report.exported_as = "BF16".into();
            }
            Job::Bf16 => {
                let n = info.numel();
                let sums = run_pieces(n.div_ceil(PIECE_ELEMENTS), threads, cancel, |i| {
                    let range = i * PIECE_ELEMENTS..((i + 1) * PIECE_ELEMENTS).min(n);
                    let values = tensors.read_f32(name, info, range.clone())?;
                    let (mut err, mut reference) = (0f64, 0f64);
                    let mut out = Vec::with_capacity(values.len() * 2);
                    for v in values {
                        let b = half::bf16::from_f32(v);
                        err += f64::from(b.to_f32() - v).powi(2);
                        reference += f64::from(v).powi(2);
                        out.extend_from_slice(&b.to_le_bytes());
                    }
                    sharded.write_chunk(name, (range.start * 2) as u64, &out)?;
                    Ok((err, reference))
                })?;
                let (err, reference) = sums
                    .iter()
                    .fold((0f64, 0f64), |(e, r), s| (e + s.0, r + s.1));
                sharded.start_writeback(name)?;
                report.exported_as = "BF16".into();
                report.rel_error = rel_error(err, reference);
            }
            Job::Raw => {
                sharded.write(name, src)?;
                tensors.release(info);
                report.exported_as = format!("{:?}", info.dtype);
            }
        }
        progress.advance(info.byte_len() as u64);
        reports.push(report);
        if options.pause_after_tensors == Some(done + 1) {
            return Err(pause_until_cancelled(done + 1, cancel));
        }
    }
    for w in sharded.writers.drain(..) {
        w.finish()?;
    }
    Ok(reports)
}

/// What the files besides the weights are made from.
struct SideFiles<'a> {
    src_dir: &'a Path,
    source_config: &'a serde_json::Map<String, Value>,
    exclude: &'a [String],
    wrap: bool,
}

/// Writes everything besides the weights into `tmp`: the shard index (when sharded),
/// `config.json`, `hf_quant_config.json`, and the copied generation, tokenizer and
/// preprocessor files.
fn write_side_files(
    tmp: &Path,
    side: &SideFiles<'_>,
    sharded: &Sharded,
    layouts: &[(String, Layout)],
) -> Result<(), ExportError> {
    let SideFiles {
        src_dir,
        source_config,
        exclude,
        wrap,
    } = *side;
    if layouts.len() > 1 {
        let mut weight_map = serde_json::Map::new();
        let mut total = 0u64;
        for (name, &i) in &sharded.of {
            weight_map.insert(name.clone(), Value::String(sharded.files[i].clone()));
        }
        for (_, l) in layouts {
            total += l.placements().iter().map(|p| p.len).sum::<u64>();
        }
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&tmp.join("model.safetensors.index.json"), &index, b"  ")?;
    }
    let config = modelopt::export_config(source_config, exclude);
    let config = if wrap {
        modelopt::vl_wrapper_config(config)
    } else {
        config
    };
    write_json(&tmp.join("config.json"), &config, b"  ")?;
    write_json(
        &tmp.join("hf_quant_config.json"),
        &modelopt::hf_quant_config(exclude),
        b"    ",
    )?;
    let mut copied = vec!["generation_config.json"];
    copied.extend(TOKENIZER_FILES);
    if wrap {
        copied.push(PREPROCESSOR_CONFIG);
    }
    for name in copied {
        let src = src_dir.join(name);
        if src.is_file() {
            let dst = tmp.join(name);
            std::fs::copy(&src, &dst).map_err(|e| ExportError::io(&src, e))?;
            std::fs::File::open(&dst)
                .and_then(|f| f.sync_all())
                .map_err(|e| ExportError::io(&dst, e))?;
        } else if name == PREPROCESSOR_CONFIG {
            write_json(&tmp.join(name), &modelopt::preprocessor_config(), b"  ")?;
        }
    }
    Ok(())
}

/// The files in `tmp`, by name, with their sizes.
fn output_files(tmp: &Path) -> Result<Vec<OutputFile>, ExportError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(tmp).map_err(|e| ExportError::io(tmp, e))? {
        let entry = entry.map_err(|e| ExportError::io(tmp, e))?;
        let size = entry
            .metadata()
            .map_err(|e| ExportError::io(&entry.path(), e))?
            .len();
        files.push(OutputFile {
            name: entry.file_name().to_string_lossy().into_owned(),
            size,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// [`write_export`] that runs `before_commit` after everything is written and read back,
/// and renames the output into place only if it succeeds (the checkpoint export checks the
/// source's checksums there, computed while the export ran).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_export_then(
    src_dir: &Path,
    tensors: &SourceTensors,
    amax: &BTreeMap<String, LinearAmax>,
    amax_origin: &Path,
    source: SourceDescription,
    out: &Path,
    options: &ExportOptions,
    progress: &dyn Progress,
    cancel: &CancellationToken,
    before_commit: impl FnOnce() -> Result<(), ExportError>,
) -> Result<ExportReport, ExportError> {
    let started = Instant::now();
    let threads = if options.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        options.threads
    };
    let config_path = src_dir.join("config.json");
    let source_config = read_json_object(&config_path)?;
    crate::shape::check_shapes(&source_config, &config_path, tensors)?;
    let wrap = options.vl_wrapper.applies(&source_config, &config_path)?;

    // Plan: one job per source tensor, and the output tensors.
    let (jobs, specs) = plan(tensors, amax, amax_origin)?;
    let exclude = exclude_modules(tensors.tensors().keys().map(String::as_str));

    let dir = OutDir::prepare(out, src_dir, options.force)?;
    let (mut sharded, layouts) = open_shards(&dir.tmp, specs, options.max_shard_bytes)?;

    let reports = write_tensors(
        &jobs,
        tensors,
        &mut sharded,
        threads,
        options,
        progress,
        cancel,
    )?;

    // Everything besides the weights.
    let side = SideFiles {
        src_dir,
        source_config: &source_config,
        exclude: &exclude,
        wrap,
    };
    write_side_files(&dir.tmp, &side, &sharded, &layouts)?;
    verify_written(&dir.tmp, &layouts)?;

    let files = output_files(&dir.tmp)?;
    let q: Vec<f64> = reports
        .iter()
        .filter(|r| r.exported_as == "NVFP4")
        .map(|r| r.rel_error)
        .collect();
    before_commit()?;
    let report = ExportReport {
        format: "qatflow-export-report".into(),
        quant_algo: "NVFP4".into(),
        producer: modelopt::hf_quant_config(&[])["producer"].clone(),
        source,
        output_files: files,
        totals: Totals {
            tensors: reports.len(),
            quantized_linears: q.len(),
            source_bytes: jobs.iter().map(|(_, i, _)| i.byte_len() as u64).sum(),
            weight_bytes: layouts.iter().map(|(_, l)| l.file_len()).sum(),
            mean_rel_error_quantized: if q.is_empty() {
                0.0
            } else {
                q.iter().sum::<f64>() / q.len() as f64
            },
            max_rel_error_quantized: q.iter().copied().fold(0.0, f64::max),
            seconds: started.elapsed().as_secs_f64(),
        },
        tensors: reports,
    };
    let report_value = serde_json::to_value(&report).expect("a report serializes");
    write_json(&dir.tmp.join("export_report.json"), &report_value, b"  ")?;
    if cancel.is_cancelled() {
        return Err(ExportError::Cancelled);
    }
    dir.commit()?;
    Ok(report)
}
