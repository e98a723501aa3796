//! `quant_check`: how much NVFP4 round-tripping (PTQ with `amax = max|W|`) changes each 2-D float
//! tensor of a safetensors file. Backs the `qatflow quant-check` command.

use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde::Serialize;

use crate::codec::{self, Element, BLOCK_SIZE};
use crate::error::{Error, Result};

/// Error of one tensor after `dequantize(quantize(W))`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorCheck {
    /// Tensor name in the file.
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// `||dequant(quant(W)) - W||2 / ||W||2` (0 for an all-zero tensor).
    pub rel_error: f64,
    /// `10 log10(||W||² / ||dequant(quant(W)) - W||²)`; `None` (JSON `null`) when the round trip
    /// is exact, including an all-zero tensor.
    pub sqnr_db: Option<f64>,
}

/// Result of [`quant_check`]: one entry per checked tensor, sorted by name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantCheckReport {
    /// Checked tensors.
    pub tensors: Vec<TensorCheck>,
}

/// Quantizes every 2-D F32/BF16/F16 tensor of `path` whose last dimension is a multiple of 16
/// and reports its relative error and SQNR. Other tensors are skipped.
pub fn quant_check(path: impl AsRef<Path>) -> Result<QuantCheckReport> {
    let path = path.as_ref();
    let io_err = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    // SAFETY: the map is read-only and lives for this function; a checkpoint being
    // rewritten underneath would at worst give wrong numbers, as a read would.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mut tensors = Vec::new();
    for (name, view) in file.tensors() {
        let shape = view.shape().to_vec();
        if shape.len() != 2 || shape[1] == 0 || shape[1] % BLOCK_SIZE != 0 || shape[0] == 0 {
            continue;
        }
        let raw = view.data();
        let check = match view.dtype() {
            Dtype::F32 => check_tensor(&name, &decode_le(raw, f32::from_le_bytes), &shape)?,
            Dtype::BF16 => check_tensor(
                &name,
                &decode_le(raw, |b| bf16::from_bits(u16::from_le_bytes(b))),
                &shape,
            )?,
            Dtype::F16 => check_tensor(
                &name,
                &decode_le(raw, |b| f16::from_bits(u16::from_le_bytes(b))),
                &shape,
            )?,
            _ => continue,
        };
        tensors.push(check);
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(QuantCheckReport { tensors })
}

/// Decodes little-endian elements of `N` bytes (safetensors data need not be aligned).
fn decode_le<T, const N: usize>(raw: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    raw.chunks_exact(N)
        .map(|c| {
            let mut b = [0u8; N];
            b.copy_from_slice(c);
            f(b)
        })
        .collect()
}

/// Round-trips one tensor with `amax = max|W|` and measures the error in f64.
pub fn check_tensor<T: Element>(name: &str, data: &[T], shape: &[usize]) -> Result<TensorCheck> {
    codec::check_shape(name, shape, data.len())?;
    let amax = codec::amax(name, data)?;
    let (signal, noise) = if amax == 0.0 {
        (0.0, 0.0)
    } else {
        let deq = codec::fake_quantize(name, data, shape, amax)?;
        data.iter()
            .zip(&deq)
            .fold((0.0f64, 0.0f64), |(s, n), (x, y)| {
                let x = f64::from(x.to_f32());
                let d = f64::from(*y) - x;
                (s + x * x, n + d * d)
            })
    };
    let rel_error = if signal == 0.0 {
        0.0
    } else {
        (noise / signal).sqrt()
    };
    let sqnr_db = (noise > 0.0).then(|| 10.0 * (signal / noise).log10());
    Ok(TensorCheck {
        name: name.to_owned(),
        shape: shape.to_vec(),
        rel_error,
        sqnr_db,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn write_file(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> tempfile::NamedTempFile {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.to_string(),
                    TensorView::new(*d, s.clone(), b).expect("valid view"),
                )
            })
            .collect();
        let bytes = safetensors::serialize(views, None).expect("serializable");
        let file = tempfile::NamedTempFile::new().expect("temp dir writable");
        std::fs::write(file.path(), bytes).expect("temp file writable");
        file
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn checks_only_2d_block_aligned_float_tensors() {
        let w: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let grid: Vec<f32> = (0..32).map(|i| [0.5f32, -1.0, 6.0, 3.0][i % 4]).collect();
        let bf: Vec<u8> = w
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect();
        let file = write_file(&[
            ("w", Dtype::F32, vec![4, 16], f32_bytes(&w)),
            ("grid", Dtype::F32, vec![2, 16], f32_bytes(&grid)),
            ("zeros", Dtype::F32, vec![1, 16], f32_bytes(&[0.0; 16])),
            ("wb", Dtype::BF16, vec![2, 32], bf),
            ("odd", Dtype::F32, vec![4, 12], f32_bytes(&w[..48])),
            ("vec", Dtype::F32, vec![64], f32_bytes(&w)),
            ("ints", Dtype::I32, vec![1, 16], vec![0; 64]),
        ]);
        let report = quant_check(file.path()).expect("readable");
        let names: Vec<&str> = report.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["grid", "w", "wb", "zeros"]);
        let by = |n: &str| {
            report
                .tensors
                .iter()
                .find(|t| t.name == n)
                .expect("present")
        };
        // Values on the E2M1 grid with amax 6 round-trip exactly.
        assert_eq!(by("grid").rel_error, 0.0);
        assert_eq!(by("grid").sqnr_db, None);
        assert_eq!(by("zeros").rel_error, 0.0);
        let w_check = by("w");
        assert_eq!(w_check.shape, vec![4, 16]);
        assert!(
            w_check.rel_error > 0.0 && w_check.rel_error < 0.2,
            "{w_check:?}"
        );
        let sqnr = w_check.sqnr_db.expect("lossy");
        assert!((sqnr + 20.0 * w_check.rel_error.log10()).abs() < 1e-9);
        let json = serde_json::to_value(&report).expect("serializable");
        assert_eq!(json["tensors"][1]["name"], "w");
        assert!(json["tensors"][0]["sqnr_db"].is_null());
    }

    #[test]
    fn unreadable_files_are_errors() {
        let missing = std::env::temp_dir().join("qatflow-nvfp4-does-not-exist.safetensors");
        assert!(matches!(quant_check(&missing), Err(Error::Io { .. })));
        let garbage = tempfile::NamedTempFile::new().expect("temp dir writable");
        std::fs::write(garbage.path(), b"not a safetensors file").expect("temp file writable");
        let err = quant_check(garbage.path()).unwrap_err();
        assert!(matches!(err, Error::Safetensors { .. }));
    }
}
