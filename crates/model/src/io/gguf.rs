//! GGUF (llama.cpp) reader: header, metadata and tensor table parsed with bounds checks
//! (bad input is an error, never a panic), memory-mapped files, and dequantization of
//! F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors to f32.

use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 4;
const MAX_ARRAY_NESTING: usize = 4;

/// Errors of reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("reading GGUF file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file: magic bytes are {found:?}, expected \"GGUF\"")]
    BadMagic {
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// A GGUF version this reader does not know (it reads versions 2 and 3).
    #[error("GGUF version {0} is not supported (versions 2 and 3 are); re-convert the model with a current llama.cpp")]
    UnsupportedVersion(u32),
    /// The file ends in the middle of a structure.
    #[error(
        "GGUF file is truncated: {what} at byte {offset} needs {needed} bytes, {available} left"
    )]
    Truncated {
        /// What was being read.
        what: String,
        /// Byte offset of the read.
        offset: usize,
        /// Bytes needed.
        needed: usize,
        /// Bytes left in the file.
        available: usize,
    },
    /// A structurally invalid field (bad UTF-8, unknown value type, too many dims, ...).
    #[error("invalid GGUF {what}")]
    Invalid {
        /// What is wrong, and where.
        what: String,
    },
    /// A tensor's data lies outside the file.
    #[error("GGUF tensor {name:?}: data {start}..{end} lies outside the file ({file_len} bytes)")]
    TensorOutOfBounds {
        /// Tensor name.
        name: String,
        /// Start of its data.
        start: u64,
        /// End of its data.
        end: u64,
        /// File length.
        file_len: usize,
    },
    /// A tensor type that cannot be dequantized.
    #[error("GGUF tensor {name:?} has type {type_name}, which is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1); re-quantize the model to one of these")]
    UnsupportedType {
        /// Tensor name.
        name: String,
        /// The ggml type's name.
        type_name: String,
    },
    /// A tensor asked for by name is not in the file.
    #[error("GGUF file has no tensor {0:?}")]
    MissingTensor(String),
}

fn invalid(what: impl Into<String>) -> GgufError {
    GgufError::Invalid { what: what.into() }
}

/// A ggml tensor type id, as stored in the tensor table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// 32-bit float.
    pub const F32: GgmlType = GgmlType(0);
    /// 16-bit IEEE float.
    pub const F16: GgmlType = GgmlType(1);
    /// 4-bit blocks of 32 with an f16 scale: `x = (q - 8) * d`.
    pub const Q4_0: GgmlType = GgmlType(2);
    /// 4-bit blocks of 32 with f16 scale and minimum: `x = q * d + m`.
    pub const Q4_1: GgmlType = GgmlType(3);
    /// 8-bit blocks of 32 with an f16 scale: `x = q * d`.
    pub const Q8_0: GgmlType = GgmlType(8);
    /// bfloat16.
    pub const BF16: GgmlType = GgmlType(30);

    /// (name, elements per block, bytes per block) of the types this reader can size.
    fn layout(self) -> Option<(&'static str, u64, u64)> {
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 36),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            30 => ("BF16", 1, 2),
            _ => return None,
        })
    }

    /// The ggml name of the type (`"Q4_1"`), or `"type N"` for unknown ids.
    pub fn name(self) -> String {
        self.layout()
            .map_or_else(|| format!("type {}", self.0), |l| l.0.to_string())
    }

    /// Bytes taken by `n` elements, if the type is known and `n` fills whole blocks.
    pub fn byte_size(self, n: u64) -> Option<u64> {
        let (_, block, bytes) = self.layout()?;
        if n % block != 0 {
            return None;
        }
        (n / block).checked_mul(bytes)
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// uint8
    U8(u8),
    /// int8
    I8(i8),
    /// uint16
    U16(u16),
    /// int16
    I16(i16),
    /// uint32
    U32(u32),
    /// int32
    I32(i32),
    /// float32
    F32(f32),
    /// bool
    Bool(bool),
    /// UTF-8 string
    String(String),
    /// array of values of one type
    Array(Vec<MetaValue>),
    /// uint64
    U64(u64),
    /// int64
    I64(i64),
    /// float64
    F64(f64),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// GGUF tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in ggml order (`ne[0]`, the contiguous one, first).
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements (`u64::MAX` if the product overflows).
    pub fn n_elements(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .unwrap_or(u64::MAX)
    }

    /// Shape in row-major (PyTorch / safetensors) order: the ggml dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF header: metadata in file order and the tensor table.
#[derive(Debug, Clone)]
pub struct Gguf {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata key/value pairs in file order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensor table in file order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the data section.
    pub data_offset: usize,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let available = self.bytes.len() - self.pos;
        if n > available {
            return Err(GgufError::Truncated {
                what: what.to_string(),
                offset: self.pos,
                needed: n,
                available,
            });
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let len =
            usize::try_from(len).map_err(|_| invalid(format!("{what}: length {len} too large")))?;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| invalid(format!("{what}: not UTF-8")))
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(what)?[0]),
            1 => MetaValue::I8(self.array::<1>(what)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(invalid(format!("{what}: bool byte {b}"))),
            },
            8 => MetaValue::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(invalid(format!(
                        "{what}: arrays nested deeper than {MAX_ARRAY_NESTING}"
                    )));
                }
                let elem = self.u32(what)?;
                let count = self.u64(what)?;
                // Every element takes at least one byte: reject counts the file cannot hold
                // before allocating.
                if count > self.remaining() as u64 {
                    return Err(GgufError::Truncated {
                        what: format!("{what}: array of {count} elements"),
                        offset: self.pos,
                        needed: usize::try_from(count).unwrap_or(usize::MAX),
                        available: self.remaining(),
                    });
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem, what, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(invalid(format!("{what}: unknown value type {t}"))),
        })
    }
}

impl Gguf {
    /// Parses a whole GGUF file held in memory and checks that every tensor of a known
    /// type lies inside it.
    pub fn parse(bytes: &[u8]) -> Result<Gguf, GgufError> {
        let mut r = Reader { bytes, pos: 0 };
        let magic = r.take(4, "magic").map_err(|_| GgufError::BadMagic {
            found: bytes[..bytes.len().min(4)].to_vec(),
        })?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic {
                found: magic.to_vec(),
            });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // A key/value takes at least 12 bytes, a tensor entry at least 24.
        let min_size = n_kv
            .saturating_mul(12)
            .saturating_add(n_tensors.saturating_mul(24));
        if min_size > r.remaining() as u64 {
            return Err(GgufError::Truncated {
                what: format!("{n_kv} metadata entries and {n_tensors} tensor entries"),
                offset: r.pos,
                needed: usize::try_from(min_size).unwrap_or(usize::MAX),
                available: r.remaining(),
            });
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&format!("type of metadata {key:?}"))?;
            let value = r.value(ty, &format!("metadata {key:?}"), 0)?;
            metadata.push((key, value));
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = r.string(&format!("name of tensor #{i}"))?;
            let what = format!("tensor {name:?}");
            let n_dims = r.u32(&what)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(invalid(format!(
                    "{what}: {n_dims} dimensions (1..={MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&what)?);
            }
            let ggml_type = GgmlType(r.u32(&what)?);
            let offset = r.u64(&what)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(invalid(format!(
                        "general.alignment {v:?} is not a power of two"
                    )))
                }
            },
            None => DEFAULT_ALIGNMENT,
        };
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        let data_offset =
            usize::try_from(data_offset).map_err(|_| invalid("data offset overflows"))?;
        let gguf = Gguf {
            version,
            metadata,
            tensors,
            data_offset,
        };
        for t in &gguf.tensors {
            gguf.tensor_range(t, bytes.len())?;
        }
        Ok(gguf)
    }

    /// Looks up a metadata value.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Looks up a tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Byte range of a tensor's data in a file of `file_len` bytes; errors for unknown
    /// types, partial blocks, overflow, or data outside the file.
    pub fn tensor_range(
        &self,
        t: &TensorInfo,
        file_len: usize,
    ) -> Result<std::ops::Range<usize>, GgufError> {
        let n = t
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| invalid(format!("tensor {:?}: element count overflows", t.name)))?;
        let size = match t.ggml_type.layout() {
            None => return Ok(0..0),
            Some((type_name, block, _)) => t.ggml_type.byte_size(n).ok_or_else(|| {
                invalid(format!(
                    "tensor {:?}: {n} elements do not fill whole {type_name} blocks of {block}",
                    t.name
                ))
            })?,
        };
        let start = (self.data_offset as u64).checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len as u64 => Ok(start as usize..end as usize),
            _ => Err(GgufError::TensorOutOfBounds {
                name: t.name.clone(),
                start: self.data_offset as u64 + t.offset.min(u64::MAX / 2),
                end: end.unwrap_or(u64::MAX),
                file_len,
            }),
        }
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    mmap: Mmap,
    /// The parsed header.
    pub gguf: Gguf,
    /// Where the file is.
    pub path: PathBuf,
}

impl GgufFile {
    /// Maps and parses a GGUF file.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and only read through bounds-checked slices. Like
        // every mmap, it assumes no other process truncates or rewrites the file while
        // it is imported (that would fault or change numbers, as with any mmap reader).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let gguf = Gguf::parse(&mmap)?;
        Ok(GgufFile {
            mmap,
            gguf,
            path: path.to_path_buf(),
        })
    }

    /// Dequantizes a tensor by name to f32 values in row-major order.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self
            .gguf
            .tensor(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        let range = self.gguf.tensor_range(t, self.mmap.len())?;
        dequantize(t, &self.mmap[range])
    }
}

/// Dequantizes the raw data of tensor `t` to f32.
pub fn dequantize(t: &TensorInfo, data: &[u8]) -> Result<Vec<f32>, GgufError> {
    let supported = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
    ];
    if !supported.contains(&t.ggml_type) {
        return Err(GgufError::UnsupportedType {
            name: t.name.clone(),
            type_name: t.ggml_type.name(),
        });
    }
    let n = t.n_elements() as usize;
    if t.ggml_type.byte_size(n as u64) != Some(data.len() as u64) {
        return Err(invalid(format!(
            "tensor {:?}: {} bytes of data for {n} {} elements",
            t.name,
            data.len(),
            t.ggml_type.name()
        )));
    }
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let mut out = Vec::with_capacity(n);
    match t.ggml_type {
        GgmlType::F32 => out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(data.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::BF16 => out.extend(
            data.chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for block in data.chunks_exact(34) {
                let d = f16_at(block, 0);
                out.extend(block[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let with_min = t.ggml_type == GgmlType::Q4_1;
            let block_bytes = if with_min { 20 } else { 18 };
            for block in data.chunks_exact(block_bytes) {
                let d = f16_at(block, 0);
                let (m, qs) = if with_min {
                    (f16_at(block, 2), &block[4..20])
                } else {
                    (-8.0 * d, &block[2..18])
                };
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
        other => {
            return Err(GgufError::UnsupportedType {
                name: t.name.clone(),
                type_name: other.name(),
            })
        }
    }
    Ok(out)
}

/// Undoes llama.cpp's Q/K row permutation (`convert_hf_to_gguf.py::permute`): GGUF row
/// `h*hd + 2*i + j` holds Hugging Face row `h*hd + j*hd/2 + i` of a `[n_head*hd, cols]`
/// matrix. Errors if the rows do not split into `n_head` heads of even size.
pub fn unpermute_qk(
    data: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
    name: &str,
) -> Result<Vec<f32>, GgufError> {
    if n_head == 0
        || rows % n_head != 0
        || (rows / n_head) % 2 != 0
        || rows.checked_mul(cols) != Some(data.len())
    {
        return Err(invalid(format!(
            "tensor {name:?}: cannot undo the rope permutation of a [{rows}, {cols}] matrix ({} values) with {n_head} heads",
            data.len()
        )));
    }
    let hd = rows / n_head;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..hd / 2 {
                let hf_row = h * hd + j * hd / 2 + i;
                let gguf_row = h * hd + 2 * i + j;
                out[hf_row * cols..(hf_row + 1) * cols]
                    .copy_from_slice(&data[gguf_row * cols..(gguf_row + 1) * cols]);
            }
        }
    }
    Ok(out)
}
