//! Writing safetensors files tensor by tensor, in exactly the layout the `safetensors`
//! library (and so PyTorch's `save_file` and ModelOpt's export) produces: tensors sorted by
//! dtype (descending, in the library's `Dtype` order) then name, a compact JSON header that
//! starts with `__metadata__`, padded with spaces to a multiple of 8 bytes.
//!
//! [`Layout::new`] fixes every tensor's offset from names, dtypes and shapes alone, so a
//! [`StreamWriter`] can write each tensor (or a chunk of one) at its place in any order, and
//! nothing but the tensor being produced needs to be in memory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::Dtype;
use serde_json::{Map, Value};

/// Errors of planning or writing a safetensors file.
#[derive(Debug, thiserror::Error)]
pub enum StError {
    /// The same tensor name was given twice.
    #[error(
        "tensor `{name}` is listed twice; every tensor of a safetensors file needs a unique name"
    )]
    Duplicate {
        /// The name.
        name: String,
    },
    /// A tensor's size in bits is not a whole number of bytes.
    #[error("tensor `{name}` ({dtype:?}, shape {shape:?}) does not fill whole bytes")]
    Misaligned {
        /// The name.
        name: String,
        /// Its dtype.
        dtype: Dtype,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A write does not fit the tensor's planned place.
    #[error("tensor `{name}`: {problem}")]
    Placement {
        /// The tensor.
        name: String,
        /// What is wrong (unknown name, wrong length, out of range).
        problem: String,
    },
    /// Tensors of the layout were never written.
    #[error("{path}: {} tensor(s) were never written, e.g. `{}`", missing.len(), missing[0])]
    Incomplete {
        /// The file.
        path: PathBuf,
        /// The tensors left unwritten.
        missing: Vec<String>,
    },
    /// The file could not be written.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Name, dtype and shape of one tensor to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (`[]` for a scalar).
    pub shape: Vec<usize>,
}

/// Where one tensor's bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The tensor.
    pub spec: TensorSpec,
    /// Offset of its first byte from the start of the file.
    pub file_offset: u64,
    /// Its size in bytes.
    pub len: u64,
}

/// The planned layout of a safetensors file: header bytes and each tensor's place.
#[derive(Debug, Clone)]
pub struct Layout {
    header: Vec<u8>,
    placements: Vec<Placement>,
    index: HashMap<String, usize>,
}

/// Size in bytes of a tensor of `dtype` and `shape`, or `None` if it is not whole bytes.
pub fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<u64> {
    let bits = shape.iter().product::<usize>() as u64 * dtype.bitsize() as u64;
    (bits % 8 == 0).then_some(bits / 8)
}

impl Layout {
    /// Plans a file holding `specs`, with `metadata` as its `__metadata__` (PyTorch writes
    /// `{"format": "pt"}`).
    pub fn new(
        mut specs: Vec<TensorSpec>,
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Result<Self, StError> {
        specs.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
        let mut header = Map::new();
        if let Some(meta) = metadata {
            let m: Map<String, Value> = meta
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            header.insert("__metadata__".into(), Value::Object(m));
        }
        let mut placements = Vec::with_capacity(specs.len());
        let mut index = HashMap::with_capacity(specs.len());
        let mut offset = 0u64;
        for spec in specs {
            let len = byte_len(spec.dtype, &spec.shape).ok_or_else(|| StError::Misaligned {
                name: spec.name.clone(),
                dtype: spec.dtype,
                shape: spec.shape.clone(),
            })?;
            if index.insert(spec.name.clone(), placements.len()).is_some() {
                return Err(StError::Duplicate { name: spec.name });
            }
            let mut info = Map::new();
            info.insert(
                "dtype".into(),
                serde_json::to_value(spec.dtype).expect("dtypes serialize"),
            );
            info.insert("shape".into(), serde_json::json!(spec.shape));
            info.insert(
                "data_offsets".into(),
                serde_json::json!([offset, offset + len]),
            );
            header.insert(spec.name.clone(), Value::Object(info));
            placements.push(Placement {
                spec,
                file_offset: offset,
                len,
            });
            offset += len;
        }
        let mut json = serde_json::to_vec(&Value::Object(header)).expect("a header serializes");
        json.resize(json.len().div_ceil(8) * 8, b' ');
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&json);
        let start = bytes.len() as u64;
        for p in &mut placements {
            p.file_offset += start;
        }
        Ok(Self {
            header: bytes,
            placements,
            index,
        })
    }

    /// The header: 8-byte little-endian length, then the padded JSON.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// Tensors in file order.
    pub fn placements(&self) -> &[Placement] {
        &self.placements
    }

    /// The place of tensor `name`.
    pub fn placement(&self, name: &str) -> Option<&Placement> {
        self.index.get(name).map(|&i| &self.placements[i])
    }

    /// Total file size in bytes.
    pub fn file_len(&self) -> u64 {
        self.placements
            .last()
            .map_or(self.header.len() as u64, |p| p.file_offset + p.len)
    }
}

/// Writes the tensors of a [`Layout`] into a file, each at its planned place, in any order.
///
/// Writes take `&self` (positioned writes), so several threads can fill different parts of
/// the file at once.
#[derive(Debug)]
pub struct StreamWriter {
    path: PathBuf,
    file: File,
    layout: Layout,
    /// Bytes written so far per tensor (layout order).
    written: Vec<AtomicU64>,
}

impl StreamWriter {
    /// Creates (truncating) `path`, sized to the layout, and writes the header.
    pub fn create(path: &Path, layout: Layout) -> Result<Self, StError> {
        let io = |source| StError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(io)?;
        file.set_len(layout.file_len()).map_err(io)?;
        file.write_all_at(layout.header(), 0).map_err(io)?;
        let written = layout
            .placements
            .iter()
            .map(|_| AtomicU64::new(0))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            layout,
            written,
        })
    }

    /// The layout being written.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Writes the whole tensor `name`.
    pub fn write_tensor(&self, name: &str, bytes: &[u8]) -> Result<(), StError> {
        let len = self.place(name)?.len;
        if bytes.len() as u64 != len {
            return Err(StError::Placement {
                name: name.to_owned(),
                problem: format!("{} bytes given, the layout holds {len}", bytes.len()),
            });
        }
        self.write_chunk(name, 0, bytes)
    }

    /// Writes `bytes` at byte `offset` inside tensor `name` (for tensors produced in parts).
    pub fn write_chunk(&self, name: &str, offset: u64, bytes: &[u8]) -> Result<(), StError> {
        let i = *self
            .layout
            .index
            .get(name)
            .ok_or_else(|| self.unknown(name))?;
        let p = &self.layout.placements[i];
        if offset + bytes.len() as u64 > p.len {
            return Err(StError::Placement {
                name: name.to_owned(),
                problem: format!(
                    "bytes {offset}..{} are outside its {} bytes",
                    offset + bytes.len() as u64,
                    p.len
                ),
            });
        }
        self.file
            .write_all_at(bytes, p.file_offset + offset)
            .map_err(|source| StError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.written[i].fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Asks the kernel to start writing tensor `name`'s bytes to disk now, without waiting
    /// (Linux `sync_file_range`), so that the final fsync of [`Self::finish`] has less
    /// left to do. A no-op where that call is not available; durability still comes only
    /// from [`Self::finish`].
    pub fn start_writeback(&self, name: &str) -> Result<(), StError> {
        let p = self.place(name)?;
        start_writeback(&self.file, p.file_offset, p.len);
        Ok(())
    }

    fn place(&self, name: &str) -> Result<&Placement, StError> {
        self.layout
            .placement(name)
            .ok_or_else(|| self.unknown(name))
    }

    fn unknown(&self, name: &str) -> StError {
        StError::Placement {
            name: name.to_owned(),
            problem: format!("not part of the layout of {}", self.path.display()),
        }
    }

    /// Checks that every tensor was written in full, then fsyncs the file.
    pub fn finish(self) -> Result<(), StError> {
        let missing: Vec<String> = self
            .layout
            .placements
            .iter()
            .zip(&self.written)
            .filter(|(p, w)| w.load(Ordering::Relaxed) < p.len)
            .map(|(p, _)| p.spec.name.clone())
            .collect();
        if !missing.is_empty() {
            return Err(StError::Incomplete {
                path: self.path,
                missing,
            });
        }
        self.file.sync_all().map_err(|source| StError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads its integer arguments; a failure (e.g. a file
    // system without support) leaves the data to the final fsync, so it is ignored.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    struct V(Dtype, Vec<usize>, Vec<u8>);
    impl safetensors::View for &V {
        fn dtype(&self) -> Dtype {
            self.0
        }
        fn shape(&self) -> &[usize] {
            &self.1
        }
        fn data(&self) -> Cow<'_, [u8]> {
            Cow::Borrowed(&self.2)
        }
        fn data_len(&self) -> usize {
            self.2.len()
        }
    }

    #[test]
    fn same_bytes_as_the_safetensors_library() {
        let tensors = [
            ("b.weight".to_string(), V(Dtype::U8, vec![2, 3], vec![1; 6])),
            (
                "a.weight_scale".to_string(),
                V(Dtype::F8_E4M3, vec![2], vec![7, 8]),
            ),
            ("a.weight".to_string(), V(Dtype::U8, vec![1], vec![9])),
            (
                "z.scale".to_string(),
                V(Dtype::F32, vec![], vec![0, 0, 128, 63]),
            ),
            (
                "m.norm".to_string(),
                V(Dtype::BF16, vec![3], vec![1, 2, 3, 4, 5, 6]),
            ),
        ];
        let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let want = safetensors::serialize(
            tensors.iter().map(|(n, v)| (n.clone(), v)),
            Some(meta.clone().into_iter().collect()),
        )
        .unwrap();
        let specs = tensors
            .iter()
            .map(|(n, v)| TensorSpec {
                name: n.clone(),
                dtype: v.0,
                shape: v.1.clone(),
            })
            .collect();
        let layout = Layout::new(specs, Some(&meta)).unwrap();
        assert_eq!(layout.file_len(), want.len() as u64);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let w = StreamWriter::create(&path, layout).unwrap();
        // Reverse order and in chunks: places are fixed by the layout.
        for (n, v) in tensors.iter().rev() {
            let (a, b) = v.2.split_at(v.2.len() / 2);
            w.write_chunk(n, a.len() as u64, b).unwrap();
            w.write_chunk(n, 0, a).unwrap();
        }
        w.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    #[test]
    fn unwritten_tensors_and_bad_writes_are_named() {
        let specs = vec![
            TensorSpec {
                name: "x".into(),
                dtype: Dtype::F32,
                shape: vec![2],
            },
            TensorSpec {
                name: "y".into(),
                dtype: Dtype::U8,
                shape: vec![1],
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let w = StreamWriter::create(&path, Layout::new(specs, None).unwrap()).unwrap();
        let err = w.write_tensor("x", &[0; 4]).unwrap_err();
        assert!(err.to_string().contains("`x`"), "{err}");
        assert!(w.write_tensor("nope", &[0]).is_err());
        w.write_tensor("x", &[0; 8]).unwrap();
        let err = w.finish().unwrap_err();
        assert!(matches!(&err, StError::Incomplete { missing, .. } if missing == &["y"]));
    }
}
