//! The export pipeline shared by checkpoint export and PTQ: plan the output tensors, write
//! them one source tensor at a time into a temporary sibling directory `.DIR.tmp-<pid>`,
//! fsync, read every header back, and rename the directory into place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qatflow_checkpoint::st::{Layout, StreamWriter, TensorSpec};
use qatflow_checkpoint::{fsync_dir, remove_stale_temp_dirs, write_synced, TOKENIZER_FILES};
use qatflow_core::Progress;
use qatflow_nvfp4::codec;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ExportError;
use crate::modelopt;
use crate::report::{ExportReport, OutputFile, SourceDescription, TensorReport, Totals};
use crate::source::{SourceInfo, SourceTensors};

/// Shard size above which the weights are split, as `save_pretrained` does (5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Environment variable the CLI reads into [`ExportOptions::pause_after_tensors`] (tests use
/// it to kill an export mid-write).
pub const PAUSE_ENV: &str = "QATFLOW_EXPORT_PAUSE_AFTER_TENSORS";

/// Elements converted per piece when copying an unquantized tensor.
const COPY_CHUNK: usize = 1 << 22;

/// Calibrated global amaxes of one quantized linear (group rule applied).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinearAmax {
    /// Weight quantizer amax → `weight_scale_2`.
    pub weight: f32,
    /// Input quantizer amax → `input_scale`.
    pub input: f32,
}

/// How to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// Replace an existing output directory.
    pub force: bool,
    /// Largest weight shard in bytes before `model.safetensors` is split.
    pub max_shard_bytes: u64,
    /// Test hook: stop (sleep forever, with the output half-written) after this many source
    /// tensors; see [`PAUSE_ENV`].
    pub pause_after_tensors: Option<usize>,
    /// Threads for quantization (0: all available cores).
    pub threads: usize,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            force: false,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            pause_after_tensors: None,
            threads: 0,
        }
    }
}

/// The quantized linears of a model: module names of every tensor that
/// [`modelopt::quantized_module`] selects.
pub fn quantized_modules(tensors: &SourceTensors) -> Vec<String> {
    tensors
        .tensors()
        .iter()
        .filter_map(|(name, info)| modelopt::quantized_module(name, &info.shape))
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

fn spec(name: String, dtype: Dtype, shape: Vec<usize>) -> TensorSpec {
    TensorSpec { name, dtype, shape }
}

/// Output directory handling: the temporary sibling and the final rename.
struct OutDir {
    out: PathBuf,
    parent: PathBuf,
    tmp: PathBuf,
    force: bool,
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
        })
    }

    fn commit(self) -> Result<(), ExportError> {
        fsync_dir(&self.tmp)?;
        let old = if self.out.exists() {
            if !self.force {
                return Err(ExportError::OutputExists { dir: self.out });
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
    fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), ExportError> {
        Ok(self.writers[self.of[name]].write_tensor(name, bytes)?)
    }

    fn write_chunk(&mut self, name: &str, offset: u64, bytes: &[u8]) -> Result<(), ExportError> {
        Ok(self.writers[self.of[name]].write_chunk(name, offset, bytes)?)
    }
}

/// Quantizes `data` (`[rows, cols]`) on `threads` threads; returns the tensor and the sums
/// of squared error and squared source values.
fn quantize_rows(
    name: &str,
    data: &[f32],
    shape: [usize; 2],
    amax: f32,
    threads: usize,
) -> Result<(codec::Nvfp4Tensor, f64, f64), ExportError> {
    let [rows, cols] = shape;
    let per = rows.div_ceil(threads.max(1)).max(1);
    let parts: Vec<Result<(codec::Nvfp4Tensor, f64, f64), qatflow_nvfp4::Error>> =
        std::thread::scope(|s| {
            let handles: Vec<_> = data
                .chunks(per * cols)
                .map(|chunk| {
                    s.spawn(move || {
                        let q = codec::quantize(name, chunk, &[chunk.len() / cols, cols], amax)?;
                        let (mut err, mut reference) = (0f64, 0f64);
                        for (d, x) in q.dequantize().iter().zip(chunk) {
                            err += f64::from(d - x).powi(2);
                            reference += f64::from(*x).powi(2);
                        }
                        Ok((q, err, reference))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("quantization threads do not panic"))
                .collect()
        });
    let mut packed = Vec::with_capacity(data.len() / 2);
    let mut scales = Vec::with_capacity(data.len() / codec::BLOCK_SIZE);
    let (mut err, mut reference) = (0f64, 0f64);
    let mut scale_2 = codec::weight_scale_2(name, amax)?;
    for part in parts {
        let (q, e, r) = part?;
        packed.extend_from_slice(&q.packed);
        scales.extend_from_slice(&q.weight_scale);
        scale_2 = q.weight_scale_2;
        err += e;
        reference += r;
    }
    let q = codec::Nvfp4Tensor::from_parts(name, vec![rows, cols], packed, scales, scale_2)?;
    Ok((q, err, reference))
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

fn pause_forever(after: usize) -> ! {
    tracing::warn!(
        "{PAUSE_ENV}: export paused after {after} tensors (test hook); the output is half-written"
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
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
/// (`config.json`, `generation_config.json`, tokenizer files) is read from there.
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
) -> Result<ExportReport, ExportError> {
    let started = Instant::now();
    let threads = if options.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        options.threads
    };
    let config_path = src_dir.join("config.json");
    let source_config = read_json_object(&config_path)?;

    // Plan: one job per source tensor, and the output tensors.
    let mut jobs: Vec<(&str, &SourceInfo, Job<'_>)> = Vec::new();
    let mut specs = Vec::new();
    for (name, info) in tensors.tensors() {
        if let Some(module) = modelopt::quantized_module(name, &info.shape) {
            let a = *amax.get(module).ok_or_else(|| ExportError::MissingAmax {
                file: amax_origin.to_path_buf(),
                tensor: format!("{module}{}", qatflow_checkpoint::WEIGHT_AMAX_SUFFIX),
            })?;
            let [rows, cols] = [info.shape[0], info.shape[1]];
            codec::check_shape(name, &info.shape, info.numel())?;
            specs.push(spec(name.clone(), Dtype::U8, vec![rows, cols / 2]));
            specs.push(spec(
                format!("{module}.weight_scale"),
                Dtype::F8_E4M3,
                vec![rows, cols / codec::BLOCK_SIZE],
            ));
            specs.push(spec(format!("{module}.weight_scale_2"), Dtype::F32, vec![]));
            specs.push(spec(format!("{module}.input_scale"), Dtype::F32, vec![]));
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
            tensor: format!("{extra}{}", qatflow_checkpoint::WEIGHT_AMAX_SUFFIX),
        });
    }

    let dir = OutDir::prepare(out, src_dir, options.force)?;
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let mut layouts = Vec::new();
    let mut sharded = Sharded {
        writers: Vec::new(),
        files: Vec::new(),
        of: BTreeMap::new(),
    };
    for (i, (file, specs)) in shard(specs, options.max_shard_bytes)
        .into_iter()
        .enumerate()
    {
        for s in &specs {
            sharded.of.insert(s.name.clone(), i);
        }
        let layout = Layout::new(specs, Some(&meta))?;
        sharded
            .writers
            .push(StreamWriter::create(&dir.tmp.join(&file), layout.clone())?);
        sharded.files.push(file.clone());
        layouts.push((file, layout));
    }

    progress.set_total(jobs.iter().map(|(_, i, _)| i.byte_len() as u64).sum());
    let mut reports = Vec::with_capacity(jobs.len());
    for (done, (name, info, job)) in jobs.iter().enumerate() {
        let mut report = TensorReport {
            name: (*name).to_owned(),
            source_dtype: format!("{:?}", info.dtype),
            shape: info.shape.clone(),
            exported_as: String::new(),
            rel_error: 0.0,
            weight_amax: None,
            input_amax: None,
        };
        match job {
            Job::Quantize { module, amax } => {
                let data = tensors.read_f32(name, info, 0..info.numel())?;
                let (q, err, reference) = quantize_rows(
                    module,
                    &data,
                    [info.shape[0], info.shape[1]],
                    amax.weight,
                    threads,
                )?;
                drop(data);
                let input_scale = codec::input_scale(module, amax.input)?;
                sharded.write(name, &q.packed)?;
                sharded.write(&format!("{module}.weight_scale"), &q.weight_scale)?;
                sharded.write(
                    &format!("{module}.weight_scale_2"),
                    &q.weight_scale_2.to_le_bytes(),
                )?;
                sharded.write(&format!("{module}.input_scale"), &input_scale.to_le_bytes())?;
                report.exported_as = "NVFP4".into();
                report.rel_error = rel_error(err, reference);
                report.weight_amax = Some(amax.weight);
                report.input_amax = Some(amax.input);
            }
            Job::Bf16 if info.dtype == Dtype::BF16 => {
                let bytes = tensors.bytes(info);
                for (i, chunk) in bytes.chunks(COPY_CHUNK * 2).enumerate() {
                    sharded.write_chunk(name, (i * COPY_CHUNK * 2) as u64, chunk)?;
                }
                report.exported_as = "BF16".into();
            }
            Job::Bf16 => {
                let n = info.numel();
                let (mut err, mut reference) = (0f64, 0f64);
                let mut start = 0;
                while start < n {
                    let end = (start + COPY_CHUNK).min(n);
                    let values = tensors.read_f32(name, info, start..end)?;
                    let mut out = Vec::with_capacity(values.len() * 2);
                    for v in values {
                        let b = half::bf16::from_f32(v);
                        err += f64::from(b.to_f32() - v).powi(2);
                        reference += f64::from(v).powi(2);
                        out.extend_from_slice(&b.to_le_bytes());
                    }
                    sharded.write_chunk(name, (start * 2) as u64, &out)?;
                    start = end;
                }
                report.exported_as = "BF16".into();
                report.rel_error = rel_error(err, reference);
            }
            Job::Raw => {
                sharded.write(name, tensors.bytes(info))?;
                report.exported_as = format!("{:?}", info.dtype);
            }
        }
        tensors.release(info);
        progress.advance(info.byte_len() as u64);
        reports.push(report);
        if options.pause_after_tensors == Some(done + 1) {
            pause_forever(done + 1);
        }
    }
    for w in sharded.writers.drain(..) {
        w.finish()?;
    }

    // Everything besides the weights.
    if layouts.len() > 1 {
        let mut weight_map = serde_json::Map::new();
        let mut total = 0u64;
        for (name, &i) in &sharded.of {
            weight_map.insert(name.clone(), Value::String(sharded.files[i].clone()));
        }
        for (_, l) in &layouts {
            total += l.placements().iter().map(|p| p.len).sum::<u64>();
        }
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.tmp.join("model.safetensors.index.json"), &index, b"  ")?;
    }
    write_json(
        &dir.tmp.join("config.json"),
        &modelopt::export_config(&source_config),
        b"  ",
    )?;
    write_json(
        &dir.tmp.join("hf_quant_config.json"),
        &modelopt::hf_quant_config(),
        b"    ",
    )?;
    for name in std::iter::once(&"generation_config.json").chain(TOKENIZER_FILES) {
        let src = src_dir.join(name);
        if src.is_file() {
            let dst = dir.tmp.join(name);
            std::fs::copy(&src, &dst).map_err(|e| ExportError::io(&src, e))?;
            std::fs::File::open(&dst)
                .and_then(|f| f.sync_all())
                .map_err(|e| ExportError::io(&dst, e))?;
        }
    }
    verify_written(&dir.tmp, &layouts)?;

    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir.tmp).map_err(|e| ExportError::io(&dir.tmp, e))? {
        let entry = entry.map_err(|e| ExportError::io(&dir.tmp, e))?;
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
    let q: Vec<f64> = reports
        .iter()
        .filter(|r| r.exported_as == "NVFP4")
        .map(|r| r.rel_error)
        .collect();
    let report = ExportReport {
        format: "qatflow-export-report".into(),
        quant_algo: "NVFP4".into(),
        producer: modelopt::hf_quant_config()["producer"].clone(),
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
    dir.commit()?;
    Ok(report)
}
