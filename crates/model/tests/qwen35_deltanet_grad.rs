//! Gradient check of the chunked gated delta rule (`qatflow_model::deltanet::chunked`,
//! autodiff through burn tensor operations) on the CPU: against the gradients of the
//! recurrent form, and against central finite differences of a float64 recurrence, for
//! every input (q, k, v, g, β and the initial state) over two chunks (a full and a partial
//! one).

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorData};
use qatflow_model::deltanet;

type AD = Autodiff<Flex>;

const H: usize = 2;
const T: usize = 100;
const DK: usize = 5;
const DV: usize = 3;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, f: impl Fn(f64) -> f64) -> Vec<f64> {
        (0..n).map(|_| f(self.next()) as f32 as f64).collect()
    }
}

/// The inputs: q/k rows L2-normalized (q scaled by dk^-1/2), decays in (0.6, 1), β in
/// (0.1, 0.9), a random initial state; plus the loss weights of outputs and final state.
#[derive(Clone)]
struct Inputs {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    g: Vec<f64>,
    beta: Vec<f64>,
    s0: Vec<f64>,
    w_out: Vec<f64>,
    w_state: Vec<f64>,
}

fn normalize_rows(x: &mut [f64], d: usize, scale: f64) {
    for row in x.chunks_mut(d) {
        let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        for v in row.iter_mut() {
            *v = (*v / n * scale) as f32 as f64;
        }
    }
}

fn inputs() -> Inputs {
    let mut rng = Rng(11);
    let mut q = rng.vec(H * T * DK, |u| u);
    let mut k = rng.vec(H * T * DK, |u| u);
    normalize_rows(&mut q, DK, (DK as f64).powf(-0.5));
    normalize_rows(&mut k, DK, 1.0);
    Inputs {
        q,
        k,
        v: rng.vec(H * T * DV, |u| u),
        g: rng.vec(H * T, |u| -0.25 * (u + 1.0) - 0.01),
        beta: rng.vec(H * T, |u| 0.5 + 0.4 * u),
        s0: rng.vec(H * DK * DV, |u| 0.5 * u),
        w_out: rng.vec(H * T * DV, |u| u),
        w_state: rng.vec(H * DK * DV, |u| u),
    }
}

/// The loss `Σ w_out·o + Σ w_state·S_T` of the float64 recurrence.
fn loss_f64(x: &Inputs) -> f64 {
    let mut total = 0.0;
    for h in 0..H {
        let mut s = x.s0[h * DK * DV..][..DK * DV].to_vec();
        for t in 0..T {
            let at = h * T + t;
            let k = &x.k[at * DK..][..DK];
            let q = &x.q[at * DK..][..DK];
            let v = &x.v[at * DV..][..DV];
            for e in s.iter_mut() {
                *e *= x.g[at].exp();
            }
            for c in 0..DV {
                let mem: f64 = (0..DK).map(|r| s[r * DV + c] * k[r]).sum();
                let delta = (v[c] - mem) * x.beta[at];
                for r in 0..DK {
                    s[r * DV + c] += k[r] * delta;
                }
            }
            for c in 0..DV {
                let o: f64 = (0..DK).map(|r| s[r * DV + c] * q[r]).sum();
                total += o * x.w_out[at * DV + c];
            }
        }
        total += s
            .iter()
            .zip(&x.w_state[h * DK * DV..][..DK * DV])
            .map(|(a, b)| a * b)
            .sum::<f64>();
    }
    total
}

fn t<const D: usize>(v: &[f64], shape: [usize; D]) -> Tensor<AD, D> {
    let v: Vec<f32> = v.iter().map(|x| *x as f32).collect();
    Tensor::from_data(TensorData::new(v, shape), &Default::default()).require_grad()
}

type Rule = fn(
    Tensor<AD, 4>,
    Tensor<AD, 4>,
    Tensor<AD, 4>,
    Tensor<AD, 3>,
    Tensor<AD, 3>,
    Option<Tensor<AD, 4>>,
) -> (Tensor<AD, 4>, Tensor<AD, 4>);

/// Gradients of the loss through `rule`, in the order q, k, v, g, β, state.
fn grads(x: &Inputs, rule: Rule) -> Vec<Vec<f64>> {
    let q = t(&x.q, [1, H, T, DK]);
    let k = t(&x.k, [1, H, T, DK]);
    let v = t(&x.v, [1, H, T, DV]);
    let g = t(&x.g, [1, H, T]);
    let beta = t(&x.beta, [1, H, T]);
    let s0 = t(&x.s0, [1, H, DK, DV]);
    let (o, s) = rule(
        q.clone(),
        k.clone(),
        v.clone(),
        g.clone(),
        beta.clone(),
        Some(s0.clone()),
    );
    let w_out = t(&x.w_out, [1, H, T, DV]).detach();
    let w_state = t(&x.w_state, [1, H, DK, DV]).detach();
    let loss = (o * w_out).sum() + (s * w_state).sum();
    let grads = loss.backward();
    let flat = |g: Option<Vec<f32>>| -> Vec<f64> {
        g.expect("a gradient")
            .into_iter()
            .map(|v| v as f64)
            .collect()
    };
    let grad4 = |p: &Tensor<AD, 4>| flat(p.grad(&grads).map(|g| g.into_data().to_vec().unwrap()));
    let grad3 = |p: &Tensor<AD, 3>| flat(p.grad(&grads).map(|g| g.into_data().to_vec().unwrap()));
    vec![
        grad4(&q),
        grad4(&k),
        grad4(&v),
        grad3(&g),
        grad3(&beta),
        grad4(&s0),
    ]
}

fn field(x: &mut Inputs, i: usize) -> &mut Vec<f64> {
    match i {
        0 => &mut x.q,
        1 => &mut x.k,
        2 => &mut x.v,
        3 => &mut x.g,
        4 => &mut x.beta,
        _ => &mut x.s0,
    }
}

const NAMES: [&str; 6] = ["q", "k", "v", "g", "beta", "state"];

#[test]
fn chunked_gradients_match_the_recurrent_form() {
    let x = inputs();
    let chunked = grads(&x, deltanet::chunked::<AD>);
    let recurrent = grads(&x, deltanet::recurrent::<AD>);
    for (i, (a, b)) in chunked.iter().zip(&recurrent).enumerate() {
        let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(b).fold(0f64, |m, (p, q)| m.max((p - q).abs()));
        println!(
            "d loss / d {}: chunked vs recurrent max |Δ| {diff:e} (scale {scale:.3})",
            NAMES[i]
        );
        assert!(diff <= 1e-4 * scale.max(1.0), "{}: {diff}", NAMES[i]);
    }
}

#[test]
fn chunked_gradients_match_finite_differences() {
    let x = inputs();
    let chunked = grads(&x, deltanet::chunked::<AD>);
    let mut rng = Rng(5);
    let eps = 1e-6;
    for (i, grad) in chunked.iter().enumerate() {
        let mut worst = 0f64;
        // Every state entry and β/g of both chunks; a sample of the rest.
        let picks: Vec<usize> = if grad.len() <= 2 * T {
            (0..grad.len()).collect()
        } else {
            (0..40)
                .map(|_| ((rng.next() + 1.0) / 2.0 * grad.len() as f64) as usize % grad.len())
                .collect()
        };
        for j in picks {
            let mut plus = x.clone();
            field(&mut plus, i)[j] += eps;
            let mut minus = x.clone();
            field(&mut minus, i)[j] -= eps;
            let fd = (loss_f64(&plus) - loss_f64(&minus)) / (2.0 * eps);
            let err = (grad[j] - fd).abs() / fd.abs().max(1.0);
            worst = worst.max(err);
        }
        println!(
            "d loss / d {}: worst relative error vs finite differences {worst:e}",
            NAMES[i]
        );
        assert!(worst < 1e-3, "{}: {worst}", NAMES[i]);
    }
}
