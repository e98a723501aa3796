//! The gated delta rule (Qwen3.5's linear attention) as fused kernels: one forward kernel and
//! one backward kernel a layer instead of the chunked algorithm's hundreds of tensor
//! operations (`qatflow_model::arch::deltanet`).
//!
//! Per head, with state `S ∈ R^{dk×dv}`: `S̃ = αₜS`, `uₜ = vₜ − S̃ᵀkₜ`, `δₜ = βₜuₜ`,
//! `Sₜ = S̃ + kₜδₜᵀ`, `oₜ = Sₜᵀqₜ` (`αₜ = exp(gₜ)`). The state's columns evolve independently,
//! so a cube owns one head's block of [`BLOCK_V`] columns for the whole sequence, its 256 units
//! laid out as [`ROW_GROUPS`] row groups × [`BLOCK_V`] columns, each unit holding
//! `⌈dk / ROW_GROUPS⌉` entries of its column in registers; a token costs two cube-wide
//! synchronizations (the column sums `S̃ᵀk` and `Sᵀq`). Forward writes the outputs, the last
//! state and the state at the start of every [`CHUNK`] tokens.
//!
//! Backward walks the chunks from the last: it replays a chunk's forward from its stored
//! starting state (keeping each token's state in a scratch buffer and its `uₜ` in shared
//! memory), then runs the chunk's tokens backwards with the state's gradient `G` in registers:
//! `G += q dOᵀ`, `dq = Sₜ dO`, `dδ = Gᵀk`, `du = β dδ`, `dv = du`, `dβ = uᵀdδ`,
//! `dS̃ = G − k duᵀ`, `dk = G δ − S̃ du`, `dg = ⟨S̃, dS̃⟩`, then `G = α dS̃`. A cube sees only
//! its columns, so `dq`, `dk`, `dg` and `dβ` come out as one partial sum per column block,
//! added by the caller.
//!
//! Every value is f32 inside the kernels (inputs may be BF16). The launches are generic over
//! the CubeCL runtime: CUDA in training, a software Vulkan device in the tests.

use burn::tensor::DType;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use half::bf16;

use crate::custom::empty;

/// Value columns of the state one cube owns.
pub const BLOCK_V: usize = 16;
/// Row groups of a cube (units = `ROW_GROUPS × BLOCK_V` = 256).
pub const ROW_GROUPS: usize = 16;
/// Tokens between two stored states (and replayed together in backward).
pub const CHUNK: usize = 64;

/// Units of a cube.
const UNITS: usize = ROW_GROUPS * BLOCK_V;

/// Forward: one cube per (column block, batch·head). `q`, `k` `[bh, len, dk]`, `v` and `o`
/// `[bh, len, dv]`, `g`, `beta` `[bh, len]` f32, `s0` `[bh, dk, dv]` f32 (read only when
/// `has_state`), `s_last` `[bh, dk, dv]` and `ckpt` `[bh, chunks, dk, dv]` f32.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn forward_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    g: &Array<f32>,
    beta: &Array<f32>,
    s0: &Array<f32>,
    o: &mut Array<F>,
    s_last: &mut Array<f32>,
    ckpt: &mut Array<f32>,
    len: u32,
    dv: u32,
    #[comptime] dk: usize,
    #[comptime] has_state: bool,
) {
    let rk = comptime!(dk.div_ceil(ROW_GROUPS));
    let (len, dv) = (len as usize, dv as usize);
    let bh = CUBE_POS_Y as usize;
    let unit = UNIT_POS as usize;
    let col = unit % BLOCK_V;
    let group = unit / BLOCK_V;
    let j = CUBE_POS_X as usize * BLOCK_V + col;
    let live = j < dv;
    let chunks = len.div_ceil(CHUNK);
    let mut s = Array::<f32>::new(rk);
    let mut kr = Array::<f32>::new(rk);
    let mut qr = Array::<f32>::new(rk);
    #[unroll]
    for m in 0..rk {
        let i = group + m * ROW_GROUPS;
        s[m] = 0.0f32;
        if has_state && live && i < dk {
            s[m] = s0[(bh * dk + i) * dv + j];
        }
    }
    let mut sums = SharedMemory::<f32>::new(2 * UNITS);
    let mut outs = SharedMemory::<f32>::new(UNITS);
    for t in 0..len {
        if t % CHUNK == 0 && live {
            let c = t / CHUNK;
            #[unroll]
            for m in 0..rk {
                let i = group + m * ROW_GROUPS;
                if i < dk {
                    ckpt[((bh * chunks + c) * dk + i) * dv + j] = s[m];
                }
            }
        }
        let row = bh * len + t;
        let alpha = f32::exp(g[row]);
        let b = beta[row];
        let mut part = 0.0f32;
        #[unroll]
        for m in 0..rk {
            let i = group + m * ROW_GROUPS;
            kr[m] = 0.0f32;
            qr[m] = 0.0f32;
            if i < dk {
                kr[m] = f32::cast_from(k[row * dk + i]);
                qr[m] = f32::cast_from(q[row * dk + i]);
            }
            s[m] *= alpha;
            part += s[m] * kr[m];
        }
        // Two buffers by token parity: a unit may write the next token's sums while a slower
        // one still reads these.
        let half = (t % 2) * UNITS;
        sums[half + unit] = part;
        sync_cube();
        let mut pred = 0.0f32;
        #[unroll]
        for r in 0..ROW_GROUPS {
            pred += sums[half + r * BLOCK_V + col];
        }
        let mut vj = 0.0f32;
        if live {
            vj = f32::cast_from(v[row * dv + j]);
        }
        let delta = b * (vj - pred);
        let mut part_o = 0.0f32;
        #[unroll]
        for m in 0..rk {
            s[m] += kr[m] * delta;
            part_o += s[m] * qr[m];
        }
        outs[unit] = part_o;
        sync_cube();
        if group == 0 && live {
            let mut total = 0.0f32;
            #[unroll]
            for r in 0..ROW_GROUPS {
                total += outs[r * BLOCK_V + col];
            }
            o[row * dv + j] = F::cast_from(total);
        }
    }
    if live {
        #[unroll]
        for m in 0..rk {
            let i = group + m * ROW_GROUPS;
            if i < dk {
                s_last[(bh * dk + i) * dv + j] = s[m];
            }
        }
    }
}

/// Backward: the same cubes as [`forward_kernel`]. Extra inputs: `ckpt` (forward's stored
/// states), `d_o` `[bh, len, dv]`, `d_last` `[bh, dk, dv]` f32 (read when `has_d_last`),
/// `scratch` `[cubes, CHUNK, dk, BLOCK_V]` f32 (each token's state while a chunk is replayed).
/// Outputs: `dq`, `dk_out` `[blocks, bh, len, dk]` and `dg`, `dbeta` `[blocks, bh, len]`
/// (partial sums per column block), `dv_out` `[bh, len, dv]`, `ds0` `[bh, dk, dv]`, all f32.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn backward_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    g: &Array<f32>,
    beta: &Array<f32>,
    ckpt: &Array<f32>,
    d_o: &Array<F>,
    d_last: &Array<f32>,
    scratch: &mut Array<f32>,
    dq: &mut Array<f32>,
    dk_out: &mut Array<f32>,
    dv_out: &mut Array<f32>,
    dg: &mut Array<f32>,
    dbeta: &mut Array<f32>,
    ds0: &mut Array<f32>,
    len: u32,
    dv: u32,
    bhs: u32,
    #[comptime] dk: usize,
    #[comptime] has_d_last: bool,
) {
    let rk = comptime!(dk.div_ceil(ROW_GROUPS));
    let (len, dv, bhs) = (len as usize, dv as usize, bhs as usize);
    let bh = CUBE_POS_Y as usize;
    let block = CUBE_POS_X as usize;
    let unit = UNIT_POS as usize;
    let col = unit % BLOCK_V;
    let group = unit / BLOCK_V;
    let j = block * BLOCK_V + col;
    let live = j < dv;
    let chunks = len.div_ceil(CHUNK);
    let cube = block * bhs + bh;
    let mut s = Array::<f32>::new(rk);
    let mut grad = Array::<f32>::new(rk);
    let mut kr = Array::<f32>::new(rk);
    #[unroll]
    for m in 0..rk {
        let i = group + m * ROW_GROUPS;
        grad[m] = 0.0f32;
        if has_d_last && live && i < dk {
            grad[m] = d_last[(bh * dk + i) * dv + j];
        }
    }
    let mut sums = SharedMemory::<f32>::new(2 * UNITS);
    let mut us = SharedMemory::<f32>::new(CHUNK * BLOCK_V);
    let mut row_q = SharedMemory::<f32>::new(dk * BLOCK_V);
    let mut row_k = SharedMemory::<f32>::new(dk * BLOCK_V);
    let mut dg_parts = SharedMemory::<f32>::new(UNITS);
    let mut db_parts = SharedMemory::<f32>::new(BLOCK_V);
    let mut c = chunks;
    while c > 0 {
        c -= 1;
        let t0 = c * CHUNK;
        let mut t1 = t0 + CHUNK;
        if t1 > len {
            t1 = len;
        }
        // Replay the chunk from its stored state: each token's incoming state into the
        // scratch buffer, its u into shared memory.
        #[unroll]
        for m in 0..rk {
            let i = group + m * ROW_GROUPS;
            s[m] = 0.0f32;
            if live && i < dk {
                s[m] = ckpt[((bh * chunks + c) * dk + i) * dv + j];
            }
        }
        for t in t0..t1 {
            let row = bh * len + t;
            let tc = t - t0;
            let alpha = f32::exp(g[row]);
            let mut part = 0.0f32;
            #[unroll]
            for m in 0..rk {
                let i = group + m * ROW_GROUPS;
                kr[m] = 0.0f32;
                if i < dk {
                    kr[m] = f32::cast_from(k[row * dk + i]);
                    scratch[((cube * CHUNK + tc) * dk + i) * BLOCK_V + col] = s[m];
                }
                s[m] *= alpha;
                part += s[m] * kr[m];
            }
            let half = (t % 2) * UNITS;
            sums[half + unit] = part;
            sync_cube();
            let mut pred = 0.0f32;
            #[unroll]
            for r in 0..ROW_GROUPS {
                pred += sums[half + r * BLOCK_V + col];
            }
            let mut vj = 0.0f32;
            if live {
                vj = f32::cast_from(v[row * dv + j]);
            }
            let u = vj - pred;
            if group == 0 {
                us[tc * BLOCK_V + col] = u;
            }
            let delta = beta[row] * u;
            #[unroll]
            for m in 0..rk {
                s[m] += kr[m] * delta;
            }
        }
        sync_cube();
        // The chunk's tokens backwards.
        let mut t = t1;
        while t > t0 {
            t -= 1;
            let row = bh * len + t;
            let tc = t - t0;
            let alpha = f32::exp(g[row]);
            let b = beta[row];
            let u = us[tc * BLOCK_V + col];
            let delta = b * u;
            let mut dout = 0.0f32;
            if live {
                dout = f32::cast_from(d_o[row * dv + j]);
            }
            // s: S̃ (the decayed incoming state); `S_t = S̃ + k δᵀ`.
            let mut part = 0.0f32;
            #[unroll]
            for m in 0..rk {
                let i = group + m * ROW_GROUPS;
                kr[m] = 0.0f32;
                s[m] = 0.0f32;
                let mut qi = 0.0f32;
                if i < dk {
                    kr[m] = f32::cast_from(k[row * dk + i]);
                    qi = f32::cast_from(q[row * dk + i]);
                    s[m] = alpha * scratch[((cube * CHUNK + tc) * dk + i) * BLOCK_V + col];
                }
                grad[m] += qi * dout;
                part += grad[m] * kr[m];
            }
            sums[unit] = part;
            sync_cube();
            let mut d_delta = 0.0f32;
            #[unroll]
            for r in 0..ROW_GROUPS {
                d_delta += sums[r * BLOCK_V + col];
            }
            if !live {
                d_delta = 0.0f32;
            }
            let du = b * d_delta;
            let mut part_g = 0.0f32;
            #[unroll]
            for m in 0..rk {
                let i = group + m * ROW_GROUPS;
                // dq = S_t dO; dk = G δ − S̃ du before `grad` becomes dS̃. Written after the
                // first synchronization: a slower unit may still read the last token's rows
                // before it.
                if i < dk {
                    row_q[i * BLOCK_V + col] = (s[m] + kr[m] * delta) * dout;
                    row_k[i * BLOCK_V + col] = grad[m] * delta - s[m] * du;
                }
                grad[m] -= kr[m] * du;
                part_g += s[m] * grad[m];
            }
            // dg: the plane's sum first, then one value a plane.
            let plane_g = plane_sum(part_g);
            if UNIT_POS_PLANE == 0 {
                dg_parts[unit / PLANE_DIM as usize] = plane_g;
            }
            if group == 0 {
                db_parts[col] = u * d_delta;
                if live {
                    dv_out[row * dv + j] = du;
                }
            }
            sync_cube();
            let mut i = unit;
            while i < dk {
                let mut tq = 0.0f32;
                let mut tk = 0.0f32;
                #[unroll]
                for cc in 0..BLOCK_V {
                    tq += row_q[i * BLOCK_V + cc];
                    tk += row_k[i * BLOCK_V + cc];
                }
                let at = (block * bhs * len + row) * dk + i;
                dq[at] = tq;
                dk_out[at] = tk;
                i += UNITS;
            }
            if unit == 0 {
                let mut tg = 0.0f32;
                for x in 0..(CUBE_DIM / PLANE_DIM) as usize {
                    tg += dg_parts[x];
                }
                let mut tb = 0.0f32;
                #[unroll]
                for cc in 0..BLOCK_V {
                    tb += db_parts[cc];
                }
                dg[block * bhs * len + row] = tg;
                dbeta[block * bhs * len + row] = tb;
            }
            #[unroll]
            for m in 0..rk {
                grad[m] *= alpha;
            }
        }
    }
    if live {
        #[unroll]
        for m in 0..rk {
            let i = group + m * ROW_GROUPS;
            if i < dk {
                ds0[(bh * dk + i) * dv + j] = grad[m];
            }
        }
    }
}

/// The shape of one call: `bh` = batch × heads sequences of `len` tokens, key and value head
/// dimensions `dk`, `dv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Sequences × heads.
    pub bh: usize,
    /// Tokens.
    pub len: usize,
    /// Key (and query) head dimension.
    pub dk: usize,
    /// Value head dimension.
    pub dv: usize,
}

impl Dims {
    /// Column blocks of the state (cubes per sequence-head).
    pub fn blocks(&self) -> usize {
        self.dv.div_ceil(BLOCK_V)
    }

    /// Stored states per sequence-head.
    pub fn chunks(&self) -> usize {
        self.len.div_ceil(CHUNK)
    }

    fn cubes(&self) -> CubeCount {
        CubeCount::Static(self.blocks() as u32, self.bh as u32, 1)
    }
}

/// What [`forward_cube`] returns: the outputs `[bh, len, dv]` (the inputs' dtype), the last
/// state `[bh, dk, dv]` and the stored states `[bh, chunks, dk, dv]` (f32).
#[derive(Debug)]
pub struct Forward<T> {
    /// The outputs.
    pub o: T,
    /// The state after the last token.
    pub last: T,
    /// The state before every chunk's first token.
    pub ckpt: T,
}

/// What [`backward_cube`] returns, all f32: `dq`, `dk` `[blocks, bh, len, dk]` and `dg`,
/// `dbeta` `[blocks, bh, len]` are partial sums over column blocks (sum over the first
/// dimension); `dv` `[bh, len, dv]` and `ds0` `[bh, dk, dv]` are complete.
#[derive(Debug)]
pub struct BackwardParts<T> {
    /// Query gradient, per column block.
    pub dq: T,
    /// Key gradient, per column block.
    pub dk: T,
    /// Value gradient.
    pub dv: T,
    /// Log-decay gradient, per column block.
    pub dg: T,
    /// Write-strength gradient, per column block.
    pub dbeta: T,
    /// Gradient of the starting state.
    pub ds0: T,
}

/// Checks the dtypes one call needs: `q`, `k`, `v` (and `dO`) F32 or BF16 alike, `g`, `beta`
/// and states F32.
fn check(inputs: &[&CubeTensor<impl CubeRuntime>], states: &[&CubeTensor<impl CubeRuntime>]) {
    let dtype = inputs[0].dtype;
    assert!(
        matches!(dtype, DType::F32 | DType::BF16) && inputs.iter().all(|t| t.dtype == dtype),
        "gated delta rule kernels: q, k, v and dO in one dtype, F32 or BF16"
    );
    assert!(
        states.iter().all(|t| t.dtype == DType::F32),
        "gated delta rule kernels: g, beta and states in F32"
    );
}

/// The forward kernel on contiguous CubeCL tensors: `q`, `k` `[bh, len, dk]`, `v`
/// `[bh, len, dv]`, `g`, `beta` `[bh, len]` f32, `s0` `[bh, dk, dv]` f32 or none (zeros).
pub fn forward_cube<R: CubeRuntime>(
    [q, k, v]: [CubeTensor<R>; 3],
    [g, beta]: [CubeTensor<R>; 2],
    s0: Option<CubeTensor<R>>,
    d: Dims,
) -> Forward<CubeTensor<R>> {
    let contiguous = burn_cubecl::kernel::into_contiguous;
    let (q, k, v, g, beta) = (
        contiguous(q),
        contiguous(k),
        contiguous(v),
        contiguous(g),
        contiguous(beta),
    );
    let s0 = s0.map(contiguous);
    check(&[&q, &k, &v], &[&g, &beta]);
    let f32s = |shape: Vec<usize>| empty(&q, shape, DType::F32);
    let out = Forward {
        o: empty(&q, vec![d.bh, d.len, d.dv], q.dtype),
        last: f32s(vec![d.bh, d.dk, d.dv]),
        ckpt: f32s(vec![d.bh, d.chunks(), d.dk, d.dv]),
    };
    let state = s0.as_ref().unwrap_or(&g);
    let state_len = if s0.is_some() {
        d.bh * d.dk * d.dv
    } else {
        d.bh * d.len
    };
    let client = q.client.clone();
    // SAFETY: each buffer is passed with the element count it holds; the kernel indexes
    // `[bh, len, d*]`, `[bh, len]`, `[bh, dk, dv]` and `[bh, chunks, dk, dv]` within the
    // dimensions passed (column `j < dv`, row `i < dk`, token `t < len`), and reads `s0`
    // only when it is given.
    let arg =
        |t: &CubeTensor<R>, n: usize| unsafe { ArrayArg::from_raw_parts(t.handle.clone(), n) };
    let (tk, tv, tl) = (d.bh * d.len * d.dk, d.bh * d.len * d.dv, d.bh * d.len);
    macro_rules! launch {
        ($t:ty) => {
            unsafe {
                forward_kernel::launch_unchecked::<$t, R>(
                    &client,
                    d.cubes(),
                    CubeDim::new_1d(UNITS as u32),
                    arg(&q, tk),
                    arg(&k, tk),
                    arg(&v, tv),
                    arg(&g, tl),
                    arg(&beta, tl),
                    arg(state, state_len),
                    arg(&out.o, tv),
                    arg(&out.last, d.bh * d.dk * d.dv),
                    arg(&out.ckpt, d.bh * d.chunks() * d.dk * d.dv),
                    d.len as u32,
                    d.dv as u32,
                    d.dk,
                    s0.is_some(),
                )
            }
        };
    }
    match q.dtype {
        DType::BF16 => launch!(bf16),
        _ => launch!(f32),
    }
    out
}

/// The backward kernel: the forward's inputs, its stored states `ckpt`, the outputs' gradient
/// `d_o` (the inputs' dtype) and the last state's gradient `d_last` (f32, or none).
pub fn backward_cube<R: CubeRuntime>(
    [q, k, v]: [CubeTensor<R>; 3],
    [g, beta]: [CubeTensor<R>; 2],
    ckpt: CubeTensor<R>,
    d_o: CubeTensor<R>,
    d_last: Option<CubeTensor<R>>,
    d: Dims,
) -> BackwardParts<CubeTensor<R>> {
    let contiguous = burn_cubecl::kernel::into_contiguous;
    let (q, k, v, g, beta, d_o) = (
        contiguous(q),
        contiguous(k),
        contiguous(v),
        contiguous(g),
        contiguous(beta),
        contiguous(d_o),
    );
    let d_last = d_last.map(contiguous);
    check(&[&q, &k, &v, &d_o], &[&g, &beta, &ckpt]);
    let blocks = d.blocks();
    let f32s = |shape: Vec<usize>| empty(&q, shape, DType::F32);
    let scratch = f32s(vec![blocks * d.bh * CHUNK * d.dk * BLOCK_V]);
    let out = BackwardParts {
        dq: f32s(vec![blocks, d.bh, d.len, d.dk]),
        dk: f32s(vec![blocks, d.bh, d.len, d.dk]),
        dv: f32s(vec![d.bh, d.len, d.dv]),
        dg: f32s(vec![blocks, d.bh, d.len]),
        dbeta: f32s(vec![blocks, d.bh, d.len]),
        ds0: f32s(vec![d.bh, d.dk, d.dv]),
    };
    let state_len = d.bh * d.dk * d.dv;
    let last = d_last.as_ref().unwrap_or(&out.ds0);
    let client = q.client.clone();
    // SAFETY: as in `forward_cube`; `scratch` holds a `CHUNK × dk × BLOCK_V` slab for each
    // cube, the partial sums one `[bh, len(, dk)]` slab per column block, and `d_last` is
    // read only when given.
    let arg =
        |t: &CubeTensor<R>, n: usize| unsafe { ArrayArg::from_raw_parts(t.handle.clone(), n) };
    let (tk, tv, tl) = (d.bh * d.len * d.dk, d.bh * d.len * d.dv, d.bh * d.len);
    macro_rules! launch {
        ($t:ty) => {
            unsafe {
                backward_kernel::launch_unchecked::<$t, R>(
                    &client,
                    d.cubes(),
                    CubeDim::new_1d(UNITS as u32),
                    arg(&q, tk),
                    arg(&k, tk),
                    arg(&v, tv),
                    arg(&g, tl),
                    arg(&beta, tl),
                    arg(&ckpt, d.bh * d.chunks() * d.dk * d.dv),
                    arg(&d_o, tv),
                    arg(last, state_len),
                    arg(&scratch, blocks * d.bh * CHUNK * d.dk * BLOCK_V),
                    arg(&out.dq, blocks * tk),
                    arg(&out.dk, blocks * tk),
                    arg(&out.dv, tv),
                    arg(&out.dg, blocks * tl),
                    arg(&out.dbeta, blocks * tl),
                    arg(&out.ds0, state_len),
                    d.len as u32,
                    d.dv as u32,
                    d.bh as u32,
                    d.dk,
                    d_last.is_some(),
                )
            }
        };
    }
    match q.dtype {
        DType::BF16 => launch!(bf16),
        _ => launch!(f32),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soft_gpu::{self, max_rel_diff, read, values, Soft};
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Tensor, TensorData};

    type A = Autodiff<Flex>;

    /// The rule one token at a time in burn tensor operations (the model's decode form),
    /// differentiated by burn: the reference of both kernels.
    fn recurrent(
        [q, k, v]: [Tensor<A, 3>; 3],
        g: Tensor<A, 2>,
        beta: Tensor<A, 2>,
        s0: Tensor<A, 3>,
    ) -> (Tensor<A, 3>, Tensor<A, 3>) {
        let [bh, len, _] = q.dims();
        let mut s = s0;
        let mut outs = Vec::new();
        for t in 0..len {
            let at = |x: &Tensor<A, 3>| x.clone().narrow(1, t, 1);
            let kt = at(&k);
            s = s * g.clone().narrow(1, t, 1).exp().reshape([bh, 1, 1]);
            let delta = (at(&v) - kt.clone().matmul(s.clone()))
                * beta.clone().narrow(1, t, 1).reshape([bh, 1, 1]);
            s = s + kt.swap_dims(1, 2).matmul(delta);
            outs.push(at(&q).matmul(s.clone()));
        }
        (Tensor::cat(outs, 1), s)
    }

    fn leaf<const D: usize>(v: &[f32], shape: [usize; D]) -> Tensor<A, D> {
        Tensor::<A, D>::from_data(TensorData::new(v.to_vec(), shape), &Default::default())
            .require_grad()
    }

    fn floats<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    /// `[blocks, rest…]` partial sums added over the blocks.
    fn summed(parts: &[f32], blocks: usize) -> Vec<f32> {
        let n = parts.len() / blocks;
        (0..n)
            .map(|i| (0..blocks).map(|b| parts[b * n + i]).sum())
            .collect()
    }

    /// Both kernels on the software GPU against burn's differentiation of the recurrent form:
    /// outputs, last state and every gradient, with and without a starting state and a last
    /// state's gradient, for head dimensions that fill no block exactly (`dk` 20: two rows a
    /// unit, the second partly empty; `dv` 20: a second column block of 4) and lengths past
    /// one chunk that are not a multiple of it.
    #[test]
    fn the_kernels_equal_the_differentiated_recurrence() {
        for (d, with_state) in [
            (
                Dims {
                    bh: 3,
                    len: 70,
                    dk: 20,
                    dv: 20,
                },
                true,
            ),
            (
                Dims {
                    bh: 2,
                    len: 130,
                    dk: 8,
                    dv: 16,
                },
                false,
            ),
            (
                Dims {
                    bh: 1,
                    len: 5,
                    dk: 32,
                    dv: 3,
                },
                true,
            ),
        ] {
            let (nk, nv, nl, ns) = (
                d.bh * d.len * d.dk,
                d.bh * d.len * d.dv,
                d.bh * d.len,
                d.bh * d.dk * d.dv,
            );
            // Unit-norm keys (as the model's L2 norm makes them) keep the rule stable.
            let mut k = values(nk, 1);
            for row in k.chunks_mut(d.dk) {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                row.iter_mut().for_each(|x| *x /= norm);
            }
            let q: Vec<f32> = values(nk, 2).iter().map(|x| x * 0.5).collect();
            let v = values(nv, 3);
            let g: Vec<f32> = values(nl, 4).iter().map(|x| -0.5 * (x + 1.0)).collect();
            let beta: Vec<f32> = values(nl, 5).iter().map(|x| 0.5 * (x + 1.0)).collect();
            let s0: Vec<f32> = if with_state {
                values(ns, 6)
            } else {
                vec![0.0; ns]
            };
            let d_o = values(nv, 7);
            let d_last: Vec<f32> = if with_state {
                values(ns, 8)
            } else {
                vec![0.0; ns]
            };

            let (qa, ka, va) = (
                leaf(&q, [d.bh, d.len, d.dk]),
                leaf(&k, [d.bh, d.len, d.dk]),
                leaf(&v, [d.bh, d.len, d.dv]),
            );
            let (ga, ba, sa) = (
                leaf(&g, [d.bh, d.len]),
                leaf(&beta, [d.bh, d.len]),
                leaf(&s0, [d.bh, d.dk, d.dv]),
            );
            let (o, last) = recurrent(
                [qa.clone(), ka.clone(), va.clone()],
                ga.clone(),
                ba.clone(),
                sa.clone(),
            );
            let want_o = floats(o.clone().inner());
            let want_last = floats(last.clone().inner());
            let loss = (o * leaf(&d_o, [d.bh, d.len, d.dv]).detach()).sum()
                + (last * leaf(&d_last, [d.bh, d.dk, d.dv]).detach()).sum();
            let grads = loss.backward();
            let grad = |x: &Tensor<A, 3>| floats(x.grad(&grads).unwrap());
            let grad2 = |x: &Tensor<A, 2>| floats(x.grad(&grads).unwrap());

            let gpu = |x: &[f32], shape: &[usize]| soft_gpu::tensor(x, shape);
            let inputs = || {
                [
                    gpu(&q, &[d.bh, d.len, d.dk]),
                    gpu(&k, &[d.bh, d.len, d.dk]),
                    gpu(&v, &[d.bh, d.len, d.dv]),
                ]
            };
            let gates = || [gpu(&g, &[d.bh, d.len]), gpu(&beta, &[d.bh, d.len])];
            let state = with_state.then(|| gpu(&s0, &[d.bh, d.dk, d.dv]));
            let fwd = forward_cube::<Soft>(inputs(), gates(), state, d);
            let case = format!("{d:?}, state {with_state}");
            assert!(max_rel_diff(&read(&fwd.o), &want_o) < 1e-5, "o, {case}");
            assert!(
                max_rel_diff(&read(&fwd.last), &want_last) < 1e-5,
                "last, {case}"
            );

            let d_last_gpu = with_state.then(|| gpu(&d_last, &[d.bh, d.dk, d.dv]));
            let parts = backward_cube::<Soft>(
                inputs(),
                gates(),
                fwd.ckpt,
                gpu(&d_o, &[d.bh, d.len, d.dv]),
                d_last_gpu,
                d,
            );
            let blocks = d.blocks();
            let tol = 1e-4;
            assert!(
                max_rel_diff(&summed(&read(&parts.dq), blocks), &grad(&qa)) < tol,
                "dq, {case}"
            );
            assert!(
                max_rel_diff(&summed(&read(&parts.dk), blocks), &grad(&ka)) < tol,
                "dk, {case}"
            );
            assert!(
                max_rel_diff(&read(&parts.dv), &grad(&va)) < tol,
                "dv, {case}"
            );
            assert!(
                max_rel_diff(&summed(&read(&parts.dg), blocks), &grad2(&ga)) < tol,
                "dg, {case}"
            );
            assert!(
                max_rel_diff(&summed(&read(&parts.dbeta), blocks), &grad2(&ba)) < tol,
                "dbeta, {case}"
            );
            assert!(
                max_rel_diff(&read(&parts.ds0), &grad(&sa)) < tol,
                "ds0, {case}"
            );
        }
    }
}
