//! GPU check and benchmark of the cuBLASLt GEMM path (`qatflow_kernels::gemm`).
//!
//! Prints one JSON object: for several shapes, the relative error
//! `‖out − ref‖ / ‖ref‖` of the forward `y = x · wᵀ` and of both gradients
//! (`dx = dy · w`, `dw = dyᵀ · x`) against a float64 reference on the CPU (the same
//! BF16-rounded operands), for the cuBLASLt path and for burn's matmul; then the median
//! time of a linear layer's forward + backward on each path. Exit status 1 when an error
//! exceeds 1e-2 (BF16 operands land between 1e-3 and 1e-2), an output is not finite, or
//! cuBLASLt did not run. `--device cuda:N` picks the GPU.

use std::time::Instant;

use burn::backend::{Autodiff, Cuda};
use burn::tensor::{DType, Distribution, Tensor};
use qatflow_core::Device;
use qatflow_kernels::gemm;

type B = Autodiff<Cuda>;

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - w).powi(2);
        den += w * w;
    }
    if got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    (num / den).sqrt()
}

/// Row-major `a [m, k] · b [k, n]` in float64.
fn matmul64(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for p in 0..k {
            let av = a[i * k + p];
            for j in 0..n {
                c[i * n + j] += av * b[p * n + j];
            }
        }
    }
    c
}

fn transpose64(a: &[f64], r: usize, c: usize) -> Vec<f64> {
    let mut t = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            t[j * r + i] = a[i * c + j];
        }
    }
    t
}

fn values(t: Tensor<B, 2>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .to_vec::<f32>()
        .expect("f32 data")
}

/// Forward and both gradients of `sum(y · g)` on the current path.
fn fwd_bwd(x: &Tensor<B, 2>, w: &Tensor<B, 2>, g: &Tensor<B, 2>) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let x = x.clone().require_grad();
    let w = w.clone().require_grad();
    let y = gemm::matmul_xwt(x.clone(), w.clone());
    let loss = (y.clone().cast(DType::F32) * g.clone().cast(DType::F32)).sum();
    let grads = loss.backward();
    let dx = x.grad(&grads).expect("dx");
    let dw = w.grad(&grads).expect("dw");
    (
        values(y),
        values(Tensor::from_inner(dx)),
        values(Tensor::from_inner(dw)),
    )
}

fn set_path(cublas: bool) {
    // The example is single-threaded; the variable is read at every GEMM. The cuBLASLt
    // path is opt-in, so it must be asked for by name.
    if cublas {
        std::env::set_var(gemm::GEMM_ENV, "cublaslt");
    } else {
        std::env::set_var(gemm::GEMM_ENV, "burn");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let index = match args
        .iter()
        .position(|a| a == "--device")
        .map(|i| args.get(i + 1).map(|v| v.parse::<Device>()))
    {
        None => 0,
        Some(Some(Ok(Device::Cuda(index)))) => index,
        Some(other) => {
            eprintln!("--device: expected `cuda` or `cuda:N`, got {other:?}");
            std::process::exit(2)
        }
    };
    let device = burn::backend::cuda::CudaDevice::new(index);
    let mut failures = Vec::new();
    let available = gemm::available(index);
    if !available {
        failures.push(format!(
            "cuBLASLt unavailable: {}",
            gemm::unavailable_reason(index).unwrap_or_default()
        ));
    }
    let mut checks = Vec::new();
    // (rows, in, out): odd sizes, a tall-skinny one, an LM-head-like wide one.
    for (m, k, n) in [
        (256, 512, 384),
        (77, 320, 96),
        (512, 576, 1536),
        (96, 256, 4099),
    ] {
        let bf = |shape: [usize; 2]| {
            Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device).cast(DType::BF16)
        };
        let (x, w, g) = (bf([m, k]), bf([n, k]), bf([m, n]));
        let to64 = |t: &Tensor<B, 2>| -> Vec<f64> {
            values(t.clone()).into_iter().map(f64::from).collect()
        };
        let (x64, w64, g64) = (to64(&x), to64(&w), to64(&g));
        let want_y = matmul64(&x64, &transpose64(&w64, n, k), m, k, n);
        let want_dx = matmul64(&g64, &w64, m, n, k);
        let want_dw = matmul64(&transpose64(&g64, m, n), &x64, n, m, k);
        let mut entry = serde_json::json!({"m": m, "k": k, "n": n});
        for (path, cublas) in [("cublaslt", true), ("burn", false)] {
            set_path(cublas);
            let before = gemm::stats();
            let (y, dx, dw) = fwd_bwd(&x, &w, &g);
            let calls = gemm::stats().since(&before).calls;
            let errs = [
                rel_err(&y, &want_y),
                rel_err(&dx, &want_dx),
                rel_err(&dw, &want_dw),
            ];
            for (what, e) in ["y", "dx", "dw"].iter().zip(errs) {
                if e.is_nan() || e > 1e-2 {
                    failures.push(format!("{path} {what} {m}x{k}x{n}: rel err {e}"));
                }
            }
            if cublas && available && calls != 3 {
                failures.push(format!(
                    "{m}x{k}x{n}: {calls} cuBLASLt GEMMs instead of 3 (forward, dx, dw)"
                ));
            }
            entry[path] = serde_json::json!({
                "rel_err_y": errs[0], "rel_err_dx": errs[1], "rel_err_dw": errs[2],
                "cublaslt_calls": calls,
            });
        }
        checks.push(entry);
    }
    // Timing: a linear layer's forward + backward, median of 10 after 3 warm-ups.
    let mut bench = Vec::new();
    for (m, k, n) in [
        (4096, 4096, 4096),
        (2048, 2048, 6144),
        (2048, 6144, 2048),
        (2048, 2048, 151936),
    ] {
        let bf = |shape: [usize; 2]| {
            Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device).cast(DType::BF16)
        };
        let (x, w, g) = (bf([m, k]), bf([n, k]), bf([m, n]));
        let mut entry = serde_json::json!({"m": m, "k": k, "n": n});
        for (path, cublas) in [("cublaslt", true), ("burn", false)] {
            set_path(cublas);
            let mut times = Vec::new();
            for i in 0..13 {
                let t0 = Instant::now();
                let xg = x.clone().require_grad();
                let wg = w.clone().require_grad();
                let y = gemm::matmul_xwt(xg.clone(), wg.clone());
                let grads = (y * g.clone()).sum().backward();
                let dx = xg.grad(&grads).expect("dx");
                let dw = wg.grad(&grads).expect("dw");
                // One element of each gradient back to the host waits for the GPU.
                let _ = dx.slice([0..1, 0..1]).into_data();
                let _ = dw.slice([0..1, 0..1]).into_data();
                if i >= 3 {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            let flops = 6.0 * m as f64 * k as f64 * n as f64;
            entry[path] = serde_json::json!({
                "median_ms": median * 1e3,
                "tflops": flops / median / 1e12,
            });
        }
        bench.push(entry);
    }
    set_path(true);
    let ok = failures.is_empty();
    let out = serde_json::json!({
        "ok": ok,
        "cublaslt_available": available,
        "checks": checks,
        "bench_linear_fwd_bwd": bench,
        "failures": failures,
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    if !ok {
        std::process::exit(1);
    }
}
