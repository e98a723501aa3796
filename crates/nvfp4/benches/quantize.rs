//! CPU throughput of the reference codec: BF16 weight → packed NVFP4 (export) and
//! BF16 weight → dequantized f32 (fake quantization), in bytes of BF16 input per second.

use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use qatflow_nvfp4::{codec, fake_quantize, quantize};

/// A deterministic pseudo-random weight with a few outliers.
fn weight(rows: usize, cols: usize) -> Vec<bf16> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..rows * cols)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            bf16::from_f32(if i % 997 == 0 { u * 40.0 } else { u * 0.1 })
        })
        .collect()
}

fn bench_quantize(c: &mut Criterion) {
    let mut group = c.benchmark_group("nvfp4_weight");
    for &(rows, cols) in &[(1024usize, 1024usize), (2048, 4096)] {
        let w = weight(rows, cols);
        let shape = [rows, cols];
        let amax = codec::amax("w", &w).expect("finite");
        group.throughput(Throughput::Bytes((w.len() * 2) as u64));
        let id = format!("{rows}x{cols}");
        group.bench_with_input(BenchmarkId::new("quantize_pack", &id), &w, |b, w| {
            b.iter(|| quantize("w", w, &shape, amax).expect("quantizable"))
        });
        group.bench_with_input(BenchmarkId::new("fake_quantize", &id), &w, |b, w| {
            b.iter(|| fake_quantize("w", w, &shape, amax).expect("quantizable"))
        });
    }
    group.finish();
}

// `criterion_group!` defines a public function it cannot document.
#[allow(missing_docs)]
mod group {
    use criterion::{criterion_group, Criterion};

    criterion_group! {
        name = benches;
        config = Criterion::default().sample_size(10);
        targets = super::bench_quantize
    }
}

criterion_main!(group::benches);
