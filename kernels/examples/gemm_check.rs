//! GPU check and benchmark of the cuBLASLt GEMM path (`qatflow_kernels::gemm`).
//!
//! Prints one JSON object: for several shapes, the relative error
//! `‖out − ref‖ / ‖ref‖` of the forward `y = x · wᵀ` and of both gradients
//! (`dx = dy · w`, `dw = dyᵀ · x`) against a float64 reference on the CPU (the same
//! BF16-rounded operands), for the cuBLASLt path and for burn's matmul; then the median
//! time of a linear layer's forward + backward on each path. Then the training engine's other
//! CUDA kernels against their references: the attention operation (query blocks, the softmax
//! kernels; output and the gradients of q, k, v) against burn's tensor formula on the same
//! GPU in f32, with the time of a Qwen3-1.7B-sized layer on both; the AdamW kernel element by
//! element against `adamw::reference` (bits that differ, largest difference in last places);
//! `reduce::square_sum` against a float64 sum; the RMSNorm operation (both gain conventions)
//! against the norm's formula in f32; the fused gated delta rule (`deltanet`, output, last
//! state and the gradients of q, k, v, g, β) against burn's differentiation of the recurrence
//! on the same GPU, with the time of a Qwen3.5-2B-sized layer's forward + backward on the
//! fused kernels and on the recurrence's tensor form. Exit status 1 when an error exceeds 1e-2 (BF16
//! operands land between 1e-3 and 1e-2), an output is not finite, cuBLASLt did not run, or a
//! kernel check fails. `--device cuda:N` picks the GPU.

use std::time::Instant;

use burn::backend::cuda::CudaDevice;
use burn::backend::{Autodiff, Cuda};
use burn::tensor::{DType, Distribution, ElementConversion, Tensor, TensorData};
use half::bf16;
use qatflow_core::Device;
use qatflow_kernels::adamw::{self, AdamWStep, Slots};
use qatflow_kernels::{attention, gemm, reduce, KernelElement};

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
    let attention = attention_check(&device, &mut failures);
    let adamw = adamw_check(&device, &mut failures);
    let square_sum = square_sum_check(&device, &mut failures);
    let rms_norm = rms_norm_check(&device, &mut failures);
    let deltanet = deltanet_check(&device, &mut failures);
    let ok = failures.is_empty();
    let out = serde_json::json!({
        "ok": ok,
        "cublaslt_available": available,
        "checks": checks,
        "bench_linear_fwd_bwd": bench,
        "attention": attention,
        "adamw": adamw,
        "square_sum": square_sum,
        "rms_norm": rms_norm,
        "deltanet": deltanet,
        "failures": failures,
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    if !ok {
        std::process::exit(1);
    }
}

/// A causal mask `[batch, 1, len, len]` with `valid[b]` valid keys in sequence `b` (as the
/// model's `attention_mask`).
fn causal_mask(len: usize, valid: &[usize], device: &CudaDevice) -> Tensor<B, 4> {
    let mut m = vec![0f32; valid.len() * len * len];
    for (b, &n) in valid.iter().enumerate() {
        for i in 0..len {
            for j in 0..len {
                if j > i || j >= n {
                    m[(b * len + i) * len + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [valid.len(), 1, len, len]), device)
}

/// Grouped-query attention in f32 with burn's tensor operations (the model's formula).
fn attention_formula(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, h, len, hd] = q.dims();
    let [_, kvh, keys, _] = k.dims();
    let rep = h / kvh;
    let f = |x: Tensor<B, 4>| x.cast(DType::F32);
    let s = f(q)
        .reshape([b, kvh, rep * len, hd])
        .matmul(f(k).swap_dims(2, 3))
        .mul_scalar((hd as f64).powf(-0.5))
        .reshape([b, h, len, keys])
        + mask;
    burn::tensor::activation::softmax(s, 3)
        .reshape([b, kvh, rep * len, keys])
        .matmul(f(v))
        .reshape([b, h, len, hd])
}

/// Output and gradients of `sum(out · w)`, engine path (`try_attention`) or the formula.
fn attention_run(
    qkv: &[Tensor<B, 4>; 3],
    mask: &Tensor<B, 4>,
    w: &Tensor<B, 4>,
    engine: bool,
) -> [Tensor<B, 4>; 4] {
    let [q, k, v] = qkv.clone().map(|x| x.require_grad());
    let out = if engine {
        match attention::try_attention(q.clone(), k.clone(), v.clone(), Some(mask)) {
            Ok(out) => out,
            Err(_) => panic!("the training engine's attention did not apply"),
        }
    } else {
        attention_formula(q.clone(), k.clone(), v.clone(), mask.clone())
    };
    let grads = (out.clone().cast(DType::F32) * w.clone()).sum().backward();
    let g = |x: &Tensor<B, 4>| Tensor::<B, 4>::from_inner(x.grad(&grads).expect("a gradient"));
    [out, g(&q), g(&k), g(&v)]
}

fn flat(t: Tensor<B, 4>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .to_vec::<f32>()
        .expect("f32 data")
}

/// The attention operation against the formula, and the time of both.
fn attention_check(device: &CudaDevice, failures: &mut Vec<String>) -> serde_json::Value {
    let mut cases = Vec::new();
    // (batch, heads, kv heads, len, head dim, valid keys): one block, then blocks of 1024.
    for (batch, heads, kvh, len, hd, valid) in [
        (
            2usize,
            8usize,
            2usize,
            300usize,
            64usize,
            vec![300usize, 251],
        ),
        (1, 4, 4, 2100, 128, vec![2100]),
    ] {
        let bf = |shape: [usize; 4]| {
            Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(DType::BF16)
        };
        let qkv = [
            bf([batch, heads, len, hd]),
            bf([batch, kvh, len, hd]),
            bf([batch, kvh, len, hd]),
        ];
        let w = Tensor::<B, 4>::random(
            [batch, heads, len, hd],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        let mask = causal_mask(len, &valid, device);
        let want = attention_run(&qkv, &mask, &w, false);
        let got = attention_run(&qkv, &mask, &w, true);
        let mut entry = serde_json::json!({"batch": batch, "heads": heads, "kv_heads": kvh, "len": len, "head_dim": hd});
        for (name, (g, w)) in ["out", "dq", "dk", "dv"]
            .iter()
            .zip(got.into_iter().zip(want))
        {
            let w64: Vec<f64> = flat(w).into_iter().map(f64::from).collect();
            let e = rel_err(&flat(g), &w64);
            if e.is_nan() || e > 2e-2 {
                failures.push(format!(
                    "attention {name} {batch}x{heads}/{kvh}x{len}x{hd}: rel err {e}"
                ));
            }
            entry[*name] = serde_json::json!(e);
        }
        cases.push(entry);
    }
    // One Qwen3-1.7B attention layer (16 heads, 8 KV heads, 2048 positions, head dim 128):
    // forward + backward, median of 7 after 2 warm-ups.
    let bf = |shape: [usize; 4]| {
        Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(DType::BF16)
    };
    let qkv = [
        bf([1, 16, 2048, 128]),
        bf([1, 8, 2048, 128]),
        bf([1, 8, 2048, 128]),
    ];
    let w = Tensor::<B, 4>::random([1, 16, 2048, 128], Distribution::Normal(0.0, 1.0), device);
    let mask = causal_mask(2048, &[2048], device);
    let mut timing = serde_json::json!({});
    for (path, engine) in [("engine", true), ("formula_f32", false)] {
        let mut times = Vec::new();
        for i in 0..9 {
            let t0 = Instant::now();
            let [_, dq, dk, dv] = attention_run(&qkv, &mask, &w, engine);
            for g in [dq, dk, dv] {
                let _ = g.slice([0..1, 0..1, 0..1, 0..1]).into_data();
            }
            if i >= 2 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        timing[path] = serde_json::json!({"median_ms": times[times.len() / 2] * 1e3});
    }
    serde_json::json!({"checks": cases, "qwen3_1.7b_layer_fwd_bwd": timing})
}

/// A storage type of the AdamW check: `f32` or `bf16`.
trait Stored: KernelElement + burn::tensor::Element {}
impl<T: KernelElement + burn::tensor::Element> Stored for T {}

/// Host values of one dtype for the AdamW check.
fn host<T: Stored>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32_value(x)).collect()
}

/// `v` on the GPU in `T`'s own dtype (`from_data` with a bare device would convert it to the
/// backend's default float type).
fn to_gpu<T: Stored>(v: &[T], device: &CudaDevice) -> Tensor<Cuda, 1> {
    let dtype = <T as burn::tensor::Element>::dtype();
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), (device, dtype))
}

fn from_gpu<T: Stored>(t: Tensor<Cuda, 1>) -> Vec<T> {
    t.into_data().to_vec::<T>().expect("the stored dtype")
}

/// Distance in units of the last place between two values of one storage type.
fn ulps<T: Stored>(a: T, b: T) -> u64 {
    let (a, b) = (f64::from(a.to_f32()), f64::from(b.to_f32()));
    if a == b {
        return 0;
    }
    let ulp = if std::mem::size_of::<T>() == 2 {
        2f64.powi(-7)
    } else {
        2f64.powi(-23)
    };
    let scale = a.abs().max(b.abs()).max(f64::MIN_POSITIVE);
    let exp = scale.log2().floor();
    ((a - b).abs() / (ulp * 2f64.powf(exp))).ceil() as u64
}

/// One AdamW configuration: weight type `P`, gradient `G`, moments `M`.
fn adamw_case<P: Stored, G: Stored, M: Stored>(
    device: &CudaDevice,
    kahan: bool,
    stochastic: Option<u32>,
    failures: &mut Vec<String>,
) -> serde_json::Value {
    let n = (1 << 20) + 37;
    let val = |i: usize, k: u64| {
        ((i as u64).wrapping_mul(2654435761).wrapping_add(k * 97) % 20011) as f32 / 20011.0
    };
    let w: Vec<f32> = (0..n).map(|i| val(i, 1) * 2.0 - 1.0).collect();
    let g: Vec<f32> = (0..n).map(|i| (val(i, 2) - 0.5) * 1e-2).collect();
    let m: Vec<f32> = (0..n).map(|i| (val(i, 3) - 0.5) * 1e-3).collect();
    let v: Vec<f32> = (0..n).map(|i| val(i, 4) * 1e-5).collect();
    let c: Vec<f32> = (0..n).map(|i| (val(i, 5) - 0.5) * 1e-4).collect();
    let mut step = AdamWStep::new(0.9, 0.95, 1e-8, 0.1, 1e-3, 3, 0.5);
    step.stochastic = stochastic;
    let (wp, gp, mp, vp, cp) = (
        host::<P>(&w),
        host::<G>(&g),
        host::<M>(&m),
        host::<M>(&v),
        host::<P>(&c),
    );
    let slots = Slots {
        param: to_gpu(&wp, device),
        exp_avg: to_gpu(&mp, device),
        exp_avg_sq: to_gpu(&vp, device),
        compensation: kahan.then(|| to_gpu(&cp, device)),
    };
    let new = adamw::update::<Cuda>(slots, to_gpu(&gp, device), &step, kahan);
    let (nw, nm, nv) = (
        from_gpu::<P>(new.param),
        from_gpu::<M>(new.exp_avg),
        from_gpu::<M>(new.exp_avg_sq),
    );
    let nc = new.compensation.map(from_gpu::<P>);
    let (mut differ, mut worst) = (0usize, 0u64);
    for i in 0..n {
        let wc = [wp[i], cp[i]];
        let (g, mv) = (gp[i].to_f32(), [mp[i], vp[i]]);
        let (rw, rm, rv, rc) = match stochastic {
            Some(seed) => adamw::reference_rounded(
                &step,
                kahan,
                wc,
                g,
                mv,
                |x| P::from_f32_value(adamw::stochastic_bf16(x, seed, i as u32).to_f32()),
                M::from_f32_value,
            ),
            None => adamw::reference::<P, M>(&step, kahan, wc, g, mv),
        };
        let mut d = [ulps(rw, nw[i]), ulps(rm, nm[i]), ulps(rv, nv[i]), 0];
        if let Some(nc) = &nc {
            d[3] = ulps(rc, nc[i]);
        }
        differ += d.iter().filter(|&&x| x > 0).count();
        worst = worst.max(*d.iter().max().expect("four"));
    }
    let name = format!(
        "{}/{}/{}{}",
        std::any::type_name::<P>(),
        std::any::type_name::<G>(),
        std::any::type_name::<M>(),
        if kahan {
            " kahan"
        } else if stochastic.is_some() {
            " stochastic"
        } else {
            ""
        }
    );
    // An FMA contraction moves a result by one last place at most, and rarely.
    if worst > 1 || differ > n / 100 {
        failures.push(format!(
            "adamw {name}: {differ} values differ, up to {worst} last places"
        ));
    }
    serde_json::json!({"case": name, "elements": n, "values_differing": differ, "max_ulps": worst})
}

/// The AdamW kernel against `adamw::reference`.
fn adamw_check(device: &CudaDevice, failures: &mut Vec<String>) -> serde_json::Value {
    if !adamw::available::<Cuda>() {
        failures.push("the AdamW kernel is not available on Cuda".into());
        return serde_json::json!(null);
    }
    serde_json::json!([
        adamw_case::<bf16, bf16, bf16>(device, true, None, failures),
        adamw_case::<bf16, bf16, bf16>(device, false, None, failures),
        adamw_case::<bf16, bf16, bf16>(device, false, Some(0x5EED), failures),
        adamw_case::<bf16, f32, f32>(device, true, None, failures),
        adamw_case::<f32, f32, f32>(device, false, None, failures),
        adamw_case::<f32, bf16, bf16>(device, false, None, failures),
    ])
}

/// `reduce::square_sum` of a BF16 and an F32 tensor against a float64 sum.
fn square_sum_check(device: &CudaDevice, failures: &mut Vec<String>) -> serde_json::Value {
    let n = 3_000_017;
    let mut out = Vec::new();
    for dtype in [DType::BF16, DType::F32] {
        let x = Tensor::<Cuda, 1>::random([n], Distribution::Normal(0.0, 1.0), device).cast(dtype);
        let host: Vec<f64> = x
            .clone()
            .cast(DType::F32)
            .into_data()
            .to_vec::<f32>()
            .expect("f32")
            .into_iter()
            .map(f64::from)
            .collect();
        let want: f64 = host.iter().map(|v| v * v).sum();
        let got = reduce::square_sum(x).into_scalar().elem::<f64>();
        let rel = ((got - want) / want).abs();
        if rel.is_nan() || rel > 1e-5 {
            failures.push(format!("square_sum {dtype:?}: {got} vs {want} (rel {rel})"));
        }
        out.push(serde_json::json!({"dtype": format!("{dtype:?}"), "rel_err": rel}));
    }
    serde_json::json!(out)
}

/// RMSNorm (`norm::try_rms_norm`, both gain conventions) against its formula in f32: output
/// and the gradients of input and gain.
fn rms_norm_check(device: &CudaDevice, failures: &mut Vec<String>) -> serde_json::Value {
    let mut out = Vec::new();
    for (rows, hidden) in [(300usize, 2048usize), (4096, 128), (77, 200)] {
        for offset in [false, true] {
            let x0 = Tensor::<B, 2>::random([rows, hidden], Distribution::Normal(0.0, 2.0), device)
                .cast(DType::BF16);
            let w0 = Tensor::<B, 1>::random([hidden], Distribution::Normal(0.5, 0.3), device)
                .cast(DType::BF16);
            let up = Tensor::<B, 2>::random([rows, hidden], Distribution::Normal(0.0, 1.0), device);
            let run = |engine: bool| {
                let x = x0.clone().require_grad();
                let w = w0.clone().require_grad();
                let y = if engine {
                    match qatflow_kernels::norm::try_rms_norm(x.clone(), w.clone(), 1e-6, offset) {
                        Ok(y) => y,
                        Err(_) => panic!("the training engine's RMSNorm did not apply"),
                    }
                } else {
                    let xf = x.clone().cast(DType::F32);
                    let r = xf
                        .clone()
                        .square()
                        .mean_dim(1)
                        .add_scalar(1e-6)
                        .sqrt()
                        .recip();
                    let wf = w.clone().cast(DType::F32);
                    let gain = if offset { wf.add_scalar(1.0) } else { wf };
                    xf * r * gain.unsqueeze()
                };
                let grads = (y.clone().cast(DType::F32) * up.clone()).sum().backward();
                let v2 =
                    |t: Tensor<B, 2>| t.cast(DType::F32).into_data().to_vec::<f32>().expect("f32");
                let dw = Tensor::<B, 1>::from_inner(w.grad(&grads).expect("dw"));
                (
                    v2(y),
                    v2(Tensor::from_inner(x.grad(&grads).expect("dx"))),
                    dw.cast(DType::F32)
                        .into_data()
                        .to_vec::<f32>()
                        .expect("f32"),
                )
            };
            let (want, got) = (run(false), run(true));
            let mut entry = serde_json::json!({"rows": rows, "hidden": hidden, "offset": offset});
            for (name, g, w) in [
                ("out", &got.0, &want.0),
                ("dx", &got.1, &want.1),
                ("dw", &got.2, &want.2),
            ] {
                let w64: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
                let e = rel_err(g, &w64);
                if e.is_nan() || e > 2e-2 {
                    failures.push(format!(
                        "rms_norm {name} {rows}x{hidden} offset {offset}: rel err {e}"
                    ));
                }
                entry[name] = serde_json::json!(e);
            }
            out.push(entry);
        }
    }
    serde_json::json!(out)
}

/// The gated delta rule one token at a time in tensor operations (the model's decode form):
/// `[o, last]` of `q`, `k` `[b, h, len, dk]`, `v` `[b, h, len, dv]`, `g`, `beta` `[b, h, len]`.
fn delta_rule_recurrence(
    [q, k, v]: [Tensor<B, 4>; 3],
    [g, beta]: [Tensor<B, 3>; 2],
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, len, dk] = q.dims();
    let dv = v.dims()[3];
    let mut s = Tensor::<B, 4>::zeros([b, h, dk, dv], &q.device());
    let mut outs = Vec::new();
    for t in 0..len {
        let at = |x: &Tensor<B, 4>| x.clone().narrow(2, t, 1);
        let kt = at(&k);
        s = s * g.clone().narrow(2, t, 1).exp().reshape([b, h, 1, 1]);
        let delta = (at(&v) - kt.clone().matmul(s.clone()))
            * beta.clone().narrow(2, t, 1).reshape([b, h, 1, 1]);
        s = s + kt.swap_dims(2, 3).matmul(delta);
        outs.push(at(&q).matmul(s.clone()));
    }
    (Tensor::cat(outs, 2), s)
}

/// Random inputs of the rule as the model makes them: unit-norm keys, queries scaled by
/// `dk^-1/2`, log decays in (−1, 0), write strengths in (0, 1).
fn delta_rule_inputs(
    [b, h, len, dk, dv]: [usize; 5],
    device: &CudaDevice,
) -> ([Tensor<B, 4>; 3], [Tensor<B, 3>; 2]) {
    let normal =
        |shape: [usize; 4]| Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), device);
    let unit = |x: Tensor<B, 4>| x.clone() / x.square().sum_dim(3).sqrt();
    let q = unit(normal([b, h, len, dk])) * (dk as f64).powf(-0.5);
    let k = unit(normal([b, h, len, dk]));
    let v = normal([b, h, len, dv]);
    let g = Tensor::<B, 3>::random([b, h, len], Distribution::Uniform(-1.0, 0.0), device);
    let beta = Tensor::<B, 3>::random([b, h, len], Distribution::Uniform(0.0, 1.0), device);
    ([q, k, v], [g, beta])
}

/// One forward + backward of the rule (fused kernels when `fused`): the output, the last state
/// and the five gradients, flat f32.
fn delta_rule_run(
    inputs: &([Tensor<B, 4>; 3], [Tensor<B, 3>; 2]),
    up: &Tensor<B, 4>,
    fused: bool,
) -> Vec<Vec<f32>> {
    let ([q, k, v], [g, beta]) = inputs;
    let (q, k, v) = (
        q.clone().require_grad(),
        k.clone().require_grad(),
        v.clone().require_grad(),
    );
    let (g, beta) = (g.clone().require_grad(), beta.clone().require_grad());
    let qkv = [q.clone(), k.clone(), v.clone()];
    let gates = [g.clone(), beta.clone()];
    let (o, last) = if fused {
        match qatflow_kernels::deltanet::try_gated_delta_rule(qkv, gates, None) {
            Ok(r) => r,
            Err(_) => panic!("the fused gated delta rule did not apply"),
        }
    } else {
        delta_rule_recurrence(qkv, gates)
    };
    let grads = (o.clone() * up.clone()).sum().backward();
    let f4 = |t: Tensor<B, 4>| t.into_data().convert::<f32>().to_vec::<f32>().expect("f32");
    let i4 = |t: Tensor<Cuda, 4>| t.into_data().convert::<f32>().to_vec::<f32>().expect("f32");
    let i3 = |t: Tensor<Cuda, 3>| t.into_data().convert::<f32>().to_vec::<f32>().expect("f32");
    vec![
        f4(o),
        f4(last),
        i4(q.grad(&grads).expect("dq")),
        i4(k.grad(&grads).expect("dk")),
        i4(v.grad(&grads).expect("dv")),
        i3(g.grad(&grads).expect("dg")),
        i3(beta.grad(&grads).expect("dbeta")),
    ]
}

fn deltanet_check(device: &CudaDevice, failures: &mut Vec<String>) -> serde_json::Value {
    let names = ["o", "last", "dq", "dk", "dv", "dg", "dbeta"];
    let mut cases = Vec::new();
    for shape in [
        [1usize, 4, 150, 128, 128],
        [2, 3, 64, 64, 40],
        [1, 2, 7, 20, 20],
    ] {
        let inputs = delta_rule_inputs(shape, device);
        let [b, h, len, _, dv] = shape;
        let up = Tensor::<B, 4>::random([b, h, len, dv], Distribution::Normal(0.0, 1.0), device);
        let want = delta_rule_run(&inputs, &up, false);
        let got = delta_rule_run(&inputs, &up, true);
        let mut entry = serde_json::json!({"shape": shape});
        for ((name, g), w) in names.iter().zip(&got).zip(&want) {
            let w64: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
            let e = rel_err(g, &w64);
            if e.is_nan() || e > 1e-3 {
                failures.push(format!("deltanet {name} {shape:?}: rel err {e}"));
            }
            entry[*name] = serde_json::json!(e);
        }
        cases.push(entry);
    }
    // A Qwen3.5-2B linear-attention layer at sequence 2,048 (16 value heads of 128): forward +
    // backward on the fused kernels; the recurrence's tensor form is too slow to time at this
    // length, so its time is for 256 tokens.
    let mut timing = serde_json::json!({});
    for (path, len) in [
        ("fused", 2048usize),
        ("fused_256", 256),
        ("tensor_recurrence_256", 256),
    ] {
        let inputs = delta_rule_inputs([1, 16, len, 128, 128], device);
        let up = Tensor::<B, 4>::random([1, 16, len, 128], Distribution::Normal(0.0, 1.0), device);
        let fused = path.starts_with("fused");
        let mut times = Vec::new();
        for _ in 0..4 {
            let started = Instant::now();
            let out = delta_rule_run(&inputs, &up, fused);
            std::hint::black_box(out);
            times.push(started.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        timing[path] = serde_json::json!({"tokens": len, "median_ms_incl_readback": times[times.len() / 2] * 1e3});
    }
    serde_json::json!({"checks": cases, "qwen3.5_2b_layer_fwd_bwd": timing})
}
