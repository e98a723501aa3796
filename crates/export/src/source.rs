//! Read-only, memory-mapped access to the tensors of a Hugging Face or checkpoint directory
//! (`model.safetensors` or shards listed in `model.safetensors.index.json`), one tensor at a
//! time: after a tensor is used its pages are handed back to the kernel, so reading a whole
//! model keeps only about one tensor resident.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};

use crate::error::ExportError;

struct Mapped {
    path: PathBuf,
    file: File,
    mmap: Mmap,
    data_start: usize,
}

/// Dtype, shape and place of one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    file: usize,
    start: usize,
    end: usize,
}

impl SourceInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size in bytes.
    pub fn byte_len(&self) -> usize {
        self.end - self.start
    }
}

/// The memory-mapped safetensors files of one model; see the module docs.
pub struct SourceTensors {
    files: Vec<Mapped>,
    tensors: BTreeMap<String, SourceInfo>,
}

impl std::fmt::Debug for SourceTensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceTensors")
            .field(
                "files",
                &self.files.iter().map(|m| &m.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// The weight files of a model directory ([`qatflow_model::weights::weight_files`]), with
/// the exporter's errors.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ExportError> {
    use qatflow_model::LoadError;
    qatflow_model::weights::weight_files(dir).map_err(|e| match e {
        LoadError::NoWeights { dir } => ExportError::NoWeights { dir },
        LoadError::Index { path, problem } => ExportError::BadInput { path, problem },
        LoadError::Io { path, source } => ExportError::io(&path, source),
        other => ExportError::Load(other),
    })
}

impl SourceTensors {
    /// Maps the weight files of a model directory ([`weight_files`]).
    pub fn open_dir(dir: &Path) -> Result<Self, ExportError> {
        Self::open_files(&weight_files(dir)?)
    }

    /// Maps the given safetensors files; a tensor name in two files is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self, ExportError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = BTreeMap::new();
        for path in paths {
            let file = File::open(path).map_err(|e| ExportError::io(path, e))?;
            // SAFETY: a read-only map; the exporter runs on committed checkpoints, which no
            // writer modifies (they are written once into a temporary directory and renamed).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ExportError::io(path, e))?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| ExportError::BadInput {
                    path: path.clone(),
                    problem: format!(
                        "not a complete safetensors file ({e}); it may be truncated: use another checkpoint"
                    ),
                })?;
            let data_start = 8 + header_len;
            let index = files.len();
            for (name, info) in meta.tensors() {
                let (start, end) = info.data_offsets;
                let entry = SourceInfo {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    file: index,
                    start: data_start + start,
                    end: data_start + end,
                };
                if tensors.insert(name.clone(), entry).is_some() {
                    return Err(ExportError::BadInput {
                        path: path.clone(),
                        problem: format!("tensor `{name}` is also in another weight file"),
                    });
                }
            }
            files.push(Mapped {
                path: path.clone(),
                file,
                mmap,
                data_start,
            });
        }
        Ok(Self { files, tensors })
    }

    /// Every tensor, by name.
    pub fn tensors(&self) -> &BTreeMap<String, SourceInfo> {
        &self.tensors
    }

    /// One tensor's info.
    pub fn info(&self, name: &str) -> Option<&SourceInfo> {
        self.tensors.get(name)
    }

    /// The file a tensor is stored in.
    pub fn path_of(&self, info: &SourceInfo) -> &Path {
        &self.files[info.file].path
    }

    /// The raw little-endian bytes of a tensor.
    pub fn bytes(&self, info: &SourceInfo) -> &[u8] {
        let m = &self.files[info.file];
        debug_assert!(info.start >= m.data_start);
        &m.mmap[info.start..info.end]
    }

    /// Reads bytes `range` of a tensor into `buf` (resized to fit) with a positioned read, not
    /// through the map: the hot loops read their pieces this way, so that no source pages
    /// stay mapped into the process while a model streams through it.
    pub fn read_bytes(
        &self,
        info: &SourceInfo,
        range: std::ops::Range<usize>,
        buf: &mut Vec<u8>,
    ) -> Result<(), ExportError> {
        use std::os::unix::fs::FileExt;
        let m = &self.files[info.file];
        buf.resize(range.len(), 0);
        m.file
            .read_exact_at(buf, (info.start + range.start) as u64)
            .map_err(|e| ExportError::io(&m.path, e))
    }

    /// Elements `range` of a float tensor (F32, BF16 or F16) as f32.
    pub fn read_f32(
        &self,
        name: &str,
        info: &SourceInfo,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<f32>, ExportError> {
        let width = info.dtype.bitsize() / 8;
        let mut part = Vec::new();
        self.read_bytes(info, range.start * width..range.end * width, &mut part)?;
        Ok(match info.dtype {
            Dtype::F32 => part
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => part
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => part
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(ExportError::BadInput {
                    path: self.path_of(info).to_path_buf(),
                    problem: format!(
                        "tensor `{name}` is {other:?}; the exporter reads F32, BF16 or F16 weights"
                    ),
                })
            }
        })
    }

    /// Hands a tensor's pages back to the kernel once it has been used, so that a pass over
    /// the whole model does not keep the model resident.
    pub fn release(&self, info: &SourceInfo) {
        self.release_bytes(info, 0..info.byte_len());
    }

    /// [`Self::release`] for bytes `range` of a tensor only (whole pages around it).
    pub fn release_bytes(&self, info: &SourceInfo, range: std::ops::Range<usize>) {
        let m = &self.files[info.file];
        let page = 4096;
        let start = (info.start + range.start) / page * page;
        let end = (info.start + range.end).min(m.mmap.len());
        if end <= start {
            return;
        }
        // SAFETY: the map is a read-only shared file mapping, for which MADV_DONTNEED only
        // drops this process's mapping of the pages (they are read again from the page cache
        // or the file on the next access, also by another thread reading a neighbouring
        // tensor on the same page), so no data visible through it changes.
        let _ = unsafe {
            m.mmap
                .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
        };
    }
}
