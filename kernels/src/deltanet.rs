//! The gated delta rule (Qwen3.5's linear attention) as fused kernels: one forward kernel and
//! one backward kernel a layer instead of the chunked algorithm's hundreds of tensor
//! operations (`qatflow_model::arch::deltanet`).
//!
//! Per head, with state `S ∈ R^{dk×dv}`: `S̃ = αₜS`, `uₜ = vₜ − S̃ᵀkₜ`, `δₜ = βₜuₜ`,
//! `Sₜ = S̃ + kₜδₜᵀ`, `oₜ = Sₜᵀqₜ` (`αₜ = exp(gₜ)`). The state's columns evolve independently,
//! so a cube owns one head's block of [`BLOCK_V`] columns for the whole sequence, its 256 units
//! laid out as [`ROW_GROUPS`] row groups × [`BLOCK_V`] columns, each unit holding
//! `⌈dk / ROW_GROUPS⌉` entries of its column in registers; a forward token costs one cube-wide
//! synchronization (the column sums `S̃ᵀk`, `S̃ᵀq` and `kᵀq`, then `oₜ = S̃ᵀq + δₜ kᵀq`). Forward writes the outputs, the last
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

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use burn_fusion::Fusion;
use cubecl::prelude::*;
use half::bf16;

use crate::custom::{self, downcast, empty, upcast, Cube, CubeBf16, CubeCall};
use crate::{p, t};

/// Value columns of the state one cube owns.
pub const BLOCK_V: usize = 16;
/// Row groups of a cube (units = `ROW_GROUPS × BLOCK_V` = 256).
pub const ROW_GROUPS: usize = 16;
/// Tokens between two stored states (and replayed together in backward).
pub const CHUNK: usize = 64;

/// Units of a cube.
const UNITS: usize = ROW_GROUPS * BLOCK_V;

/// Largest key head dimension the kernels take: backward keeps two `dk × BLOCK_V` f32 row
/// buffers in shared memory (40 KB in all at 256, under CUDA's default 48 KB a cube). Qwen3.5's
/// is 128; larger ones keep the tensor form.
pub const MAX_DK: usize = 256;

/// The unit's entries of row `row` of `x` `[rows, dk]` (rows `group + m · ROW_GROUPS` of the
/// state; zero past `dk`) into `out`, as f32.
#[cube]
fn load_rows<F: Float>(
    x: &Array<F>,
    row: usize,
    group: usize,
    out: &mut Array<f32>,
    #[comptime] dk: usize,
    #[comptime] rk: usize,
) {
    #[unroll]
    for m in 0..rk {
        let i = group + m * ROW_GROUPS;
        out[m] = 0.0f32;
        if i < dk {
            out[m] = f32::cast_from(x[row * dk + i]);
        }
    }
}

/// Element `j` of row `row` of `x` `[rows, dv]` as f32 when `live` (the unit's column exists),
/// else zero.
#[cube]
fn load_col<F: Float>(x: &Array<F>, row: usize, dv: usize, j: usize, live: bool) -> f32 {
    let mut value = 0.0f32;
    if live {
        value = f32::cast_from(x[row * dv + j]);
    }
    value
}

/// The unit's entries of state `state` (an index into `x` `[states, dk, dv]`) in column `j`
/// into `out`; zero past `dk`, and everywhere unless `live`.
#[allow(clippy::too_many_arguments)]
#[cube]
fn load_state(
    x: &Array<f32>,
    state: usize,
    group: usize,
    j: usize,
    dv: usize,
    live: bool,
    out: &mut Array<f32>,
    #[comptime] dk: usize,
    #[comptime] rk: usize,
) {
    #[unroll]
    for m in 0..rk {
        let i = group + m * ROW_GROUPS;
        out[m] = 0.0f32;
        if live && i < dk {
            out[m] = x[(state * dk + i) * dv + j];
        }
    }
}

/// [`load_state`]'s inverse: the unit's entries `values` into state `state` of `x`, when `live`.
#[allow(clippy::too_many_arguments)]
#[cube]
fn store_state(
    x: &mut Array<f32>,
    state: usize,
    group: usize,
    j: usize,
    dv: usize,
    live: bool,
    values: &Array<f32>,
    #[comptime] dk: usize,
    #[comptime] rk: usize,
) {
    #[unroll]
    for m in 0..rk {
        let i = group + m * ROW_GROUPS;
        if live && i < dk {
            x[(state * dk + i) * dv + j] = values[m];
        }
    }
}

/// The unit's entries of token slot `slot` (`cube × CHUNK + token in chunk`) of the backward
/// kernel's scratch buffer into `out` (zero past `dk`).
#[cube]
fn load_scratch(
    scratch: &Array<f32>,
    slot: usize,
    group: usize,
    col: usize,
    out: &mut Array<f32>,
    #[comptime] dk: usize,
    #[comptime] rk: usize,
) {
    #[unroll]
    for m in 0..rk {
        let i = group + m * ROW_GROUPS;
        out[m] = 0.0f32;
        if i < dk {
            out[m] = scratch[(slot * dk + i) * BLOCK_V + col];
        }
    }
}

/// One token of the recurrence as backward replays it, on a unit's entries `s` of its column
/// (`kr`: its key entries): decay by `alpha`, the column sum `S̃ᵀk` over the cube (in `sums`' half `half`,
/// which alternates by token: a unit may write the next token's sums while a slower one still
/// reads these), then `s += k · β(v − S̃ᵀk)`. Returns `u = v − S̃ᵀk`.
#[allow(clippy::too_many_arguments)]
#[cube]
fn token_step(
    s: &mut Array<f32>,
    kr: &Array<f32>,
    sums: &mut SharedMemory<f32>,
    alpha: f32,
    b: f32,
    vj: f32,
    half: usize,
    unit: usize,
    col: usize,
    #[comptime] rk: usize,
) -> f32 {
    let mut part = 0.0f32;
    #[unroll]
    for m in 0..rk {
        s[m] *= alpha;
        part += s[m] * kr[m];
    }
    sums[half + unit] = part;
    sync_cube();
    let mut pred = 0.0f32;
    #[unroll]
    for r in 0..ROW_GROUPS {
        pred += sums[half + r * BLOCK_V + col];
    }
    let u = vj - pred;
    let delta = b * u;
    #[unroll]
    for m in 0..rk {
        s[m] += kr[m] * delta;
    }
    u
}

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
    load_state(s0, bh, group, j, dv, has_state && live, &mut s, dk, rk);
    let mut sums = SharedMemory::<f32>::new(6 * UNITS);
    // The next token's inputs are loaded while this one's sums wait for the cube (the state
    // does not depend on them): a token then costs the synchronizations, not load latency.
    let mut kn = Array::<f32>::new(rk);
    let mut qn = Array::<f32>::new(rk);
    let first = bh * len;
    load_rows::<F>(k, first, group, &mut kn, dk, rk);
    load_rows::<F>(q, first, group, &mut qn, dk, rk);
    let mut gn = g[first];
    let mut bn = beta[first];
    let mut vn = load_col::<F>(v, first, dv, j, live);
    for t in 0..len {
        if t % CHUNK == 0 {
            store_state(
                ckpt,
                bh * chunks + t / CHUNK,
                group,
                j,
                dv,
                live,
                &s,
                dk,
                rk,
            );
        }
        let row = bh * len + t;
        let alpha = f32::exp(gn);
        let b = bn;
        let vj = vn;
        #[unroll]
        for m in 0..rk {
            kr[m] = kn[m];
            qr[m] = qn[m];
        }
        if t + 1 < len {
            let next = row + 1;
            load_rows::<F>(k, next, group, &mut kn, dk, rk);
            load_rows::<F>(q, next, group, &mut qn, dk, rk);
            gn = g[next];
            bn = beta[next];
            vn = load_col::<F>(v, next, dv, j, live);
        }
        // One synchronization a token: `oₜ = Sₜᵀq = S̃ᵀq + δₜ (kₜᵀq)`, so the three column sums
        // S̃ᵀk, S̃ᵀq and kᵀq are all taken over the state before the update. Two halves by
        // token parity: a unit may write the next token's sums while a slower one still reads
        // these.
        let half = (t % 2) * 3 * UNITS;
        let mut pk = 0.0f32;
        let mut pq = 0.0f32;
        let mut kq = 0.0f32;
        #[unroll]
        for m in 0..rk {
            s[m] *= alpha;
            pk += s[m] * kr[m];
            pq += s[m] * qr[m];
            kq += kr[m] * qr[m];
        }
        sums[half + unit] = pk;
        sums[half + UNITS + unit] = pq;
        sums[half + 2 * UNITS + unit] = kq;
        sync_cube();
        let mut pred = 0.0f32;
        let mut sq = 0.0f32;
        let mut dot = 0.0f32;
        #[unroll]
        for r in 0..ROW_GROUPS {
            let at = half + r * BLOCK_V + col;
            pred += sums[at];
            sq += sums[at + UNITS];
            dot += sums[at + 2 * UNITS];
        }
        let delta = b * (vj - pred);
        #[unroll]
        for m in 0..rk {
            s[m] += kr[m] * delta;
        }
        if group == 0 && live {
            o[row * dv + j] = F::cast_from(sq + delta * dot);
        }
    }
    store_state(s_last, bh, group, j, dv, live, &s, dk, rk);
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
    let mut kn = Array::<f32>::new(rk);
    let mut qn = Array::<f32>::new(rk);
    let mut sn = Array::<f32>::new(rk);
    load_state(
        d_last,
        bh,
        group,
        j,
        dv,
        has_d_last && live,
        &mut grad,
        dk,
        rk,
    );
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
        load_state(ckpt, bh * chunks + c, group, j, dv, live, &mut s, dk, rk);
        let first_row = bh * len + t0;
        load_rows::<F>(k, first_row, group, &mut kn, dk, rk);
        let mut ga = g[first_row];
        let mut ba = beta[first_row];
        let mut va = load_col::<F>(v, first_row, dv, j, live);
        for t in t0..t1 {
            let row = bh * len + t;
            let tc = t - t0;
            let alpha = f32::exp(ga);
            let b = ba;
            let vj = va;
            #[unroll]
            for m in 0..rk {
                kr[m] = kn[m];
            }
            if t + 1 < t1 {
                let next = row + 1;
                load_rows::<F>(k, next, group, &mut kn, dk, rk);
                ga = g[next];
                ba = beta[next];
                va = load_col::<F>(v, next, dv, j, live);
            }
            #[unroll]
            for m in 0..rk {
                let i = group + m * ROW_GROUPS;
                if i < dk {
                    scratch[((cube * CHUNK + tc) * dk + i) * BLOCK_V + col] = s[m];
                }
            }
            let u = token_step(
                &mut s,
                &kr,
                &mut sums,
                alpha,
                b,
                vj,
                (t % 2) * UNITS,
                unit,
                col,
                rk,
            );
            if group == 0 {
                us[tc * BLOCK_V + col] = u;
            }
        }
        sync_cube();
        // The chunk's tokens backwards, each token's inputs loaded one token ahead.
        let last_row = bh * len + t1 - 1;
        let last_tc = t1 - 1 - t0;
        load_rows::<F>(k, last_row, group, &mut kn, dk, rk);
        load_rows::<F>(q, last_row, group, &mut qn, dk, rk);
        load_scratch(scratch, cube * CHUNK + last_tc, group, col, &mut sn, dk, rk);
        let mut gn = g[last_row];
        let mut bn = beta[last_row];
        let mut dn = load_col::<F>(d_o, last_row, dv, j, live);
        let mut t = t1;
        while t > t0 {
            t -= 1;
            let row = bh * len + t;
            let tc = t - t0;
            let alpha = f32::exp(gn);
            let b = bn;
            let dout = dn;
            let u = us[tc * BLOCK_V + col];
            let delta = b * u;
            // s: S̃ (the decayed incoming state); `S_t = S̃ + k δᵀ`.
            let mut part = 0.0f32;
            #[unroll]
            for m in 0..rk {
                kr[m] = kn[m];
                s[m] = alpha * sn[m];
                grad[m] += qn[m] * dout;
                part += grad[m] * kr[m];
            }
            if t > t0 {
                let prev = row - 1;
                load_rows::<F>(k, prev, group, &mut kn, dk, rk);
                load_rows::<F>(q, prev, group, &mut qn, dk, rk);
                load_scratch(scratch, cube * CHUNK + tc - 1, group, col, &mut sn, dk, rk);
                gn = g[prev];
                bn = beta[prev];
                dn = load_col::<F>(d_o, prev, dv, j, live);
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
            // The token's dg and dβ by the cube's last two units, idle in the row sums above
            // while dk < 255 (Qwen3.5's 128).
            if unit == UNITS - 1 {
                let mut tg = 0.0f32;
                for x in 0..(CUBE_DIM / PLANE_DIM) as usize {
                    tg += dg_parts[x];
                }
                dg[block * bhs * len + row] = tg;
            }
            if unit == UNITS - 2 {
                let mut tb = 0.0f32;
                #[unroll]
                for cc in 0..BLOCK_V {
                    tb += db_parts[cc];
                }
                dbeta[block * bhs * len + row] = tb;
            }
            #[unroll]
            for m in 0..rk {
                grad[m] *= alpha;
            }
        }
    }
    store_state(ds0, bh, group, j, dv, live, &grad, dk, rk);
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

    /// Elements of `q` or `k`.
    fn keys(&self) -> usize {
        self.bh * self.len * self.dk
    }

    /// Elements of `v` or `o`.
    fn values(&self) -> usize {
        self.bh * self.len * self.dv
    }

    /// Elements of `g` or `beta`.
    fn tokens(&self) -> usize {
        self.bh * self.len
    }

    /// Elements of one state per sequence-head.
    fn states(&self) -> usize {
        self.bh * self.dk * self.dv
    }

    /// Elements of the stored states.
    fn stored(&self) -> usize {
        self.chunks() * self.states()
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

/// Checks what one call needs: `q`, `k`, `v` (and `dO`) F32 or BF16 alike, `g`, `beta` and
/// states F32, at least one token, a key head dimension of at most [`MAX_DK`].
fn check<R: CubeRuntime>(inputs: &[&CubeTensor<R>], states: &[&CubeTensor<R>], d: Dims) {
    assert!(d.len > 0, "gated delta rule kernels: an empty sequence");
    assert!(
        d.dk <= MAX_DK,
        "gated delta rule kernels: key head dimension {} over {MAX_DK}",
        d.dk
    );
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
    let [q, k, v, g, beta] = [q, k, v, g, beta].map(burn_cubecl::kernel::into_contiguous);
    let s0 = s0.map(burn_cubecl::kernel::into_contiguous);
    check(&[&q, &k, &v], &[&g, &beta], d);
    let f32s = |shape: Vec<usize>| empty(&q, shape, DType::F32);
    let out = Forward {
        o: empty(&q, vec![d.bh, d.len, d.dv], q.dtype),
        last: f32s(vec![d.bh, d.dk, d.dv]),
        ckpt: f32s(vec![d.bh, d.chunks(), d.dk, d.dv]),
    };
    let (state, state_len) = match &s0 {
        Some(s) => (s, d.states()),
        None => (&g, d.tokens()),
    };
    let client = q.client.clone();
    // SAFETY: each buffer is passed with the element count it holds; the kernel indexes
    // `[bh, len, d*]`, `[bh, len]`, `[bh, dk, dv]` and `[bh, chunks, dk, dv]` within the
    // dimensions passed (column `j < dv`, row `i < dk`, token `t < len`), and reads `s0`
    // only when it is given.
    let arg =
        |t: &CubeTensor<R>, n: usize| unsafe { ArrayArg::from_raw_parts(t.handle.clone(), n) };
    let (tk, tv, tl) = (d.keys(), d.values(), d.tokens());
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
                    arg(&out.last, d.states()),
                    arg(&out.ckpt, d.stored()),
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
    let [q, k, v, g, beta, d_o] = [q, k, v, g, beta, d_o].map(burn_cubecl::kernel::into_contiguous);
    let d_last = d_last.map(burn_cubecl::kernel::into_contiguous);
    check(&[&q, &k, &v, &d_o], &[&g, &beta, &ckpt], d);
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
    let last = d_last.as_ref().unwrap_or(&out.ds0);
    let client = q.client.clone();
    // SAFETY: as in `forward_cube`; `scratch` holds a `CHUNK × dk × BLOCK_V` slab for each
    // cube, the partial sums one `[bh, len(, dk)]` slab per column block, and `d_last` is
    // read only when given.
    let arg =
        |t: &CubeTensor<R>, n: usize| unsafe { ArrayArg::from_raw_parts(t.handle.clone(), n) };
    let (tk, tv, tl) = (d.keys(), d.values(), d.tokens());
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
                    arg(&ckpt, d.stored()),
                    arg(&d_o, tv),
                    arg(last, d.states()),
                    arg(&scratch, blocks * d.bh * CHUNK * d.dk * BLOCK_V),
                    arg(&out.dq, blocks * tk),
                    arg(&out.dk, blocks * tk),
                    arg(&out.dv, tv),
                    arg(&out.dg, blocks * tl),
                    arg(&out.dbeta, blocks * tl),
                    arg(&out.ds0, d.states()),
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

/// The forward launch as a burn operation: `[q, k, v, g, beta, s0?]` → `[o, last, ckpt]`.
#[derive(Debug, Clone, Copy)]
struct ForwardCall(Dims);

impl CubeCall for ForwardCall {
    const NAME: &'static str = "qatflow_gated_delta_rule";

    fn outputs(&self, inputs: &[(Vec<usize>, DType)]) -> Vec<(Vec<usize>, DType)> {
        let d = self.0;
        vec![
            (vec![d.bh, d.len, d.dv], inputs[0].1),
            (vec![d.bh, d.dk, d.dv], DType::F32),
            (vec![d.bh, d.chunks(), d.dk, d.dv], DType::F32),
        ]
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>) -> Vec<CubeTensor<R>> {
        let mut it = inputs.into_iter();
        let mut next = || it.next().expect("an input the caller passed");
        let qkv = [next(), next(), next()];
        let gates = [next(), next()];
        let out = forward_cube(qkv, gates, it.next(), self.0);
        vec![out.o, out.last, out.ckpt]
    }
}

/// The backward launch as a burn operation: `[q, k, v, g, beta, ckpt, dO]` → the partial
/// gradients `[dq, dk, dv, dg, dbeta, ds0]` of [`BackwardParts`].
#[derive(Debug, Clone, Copy)]
struct BackwardCall(Dims);

impl CubeCall for BackwardCall {
    const NAME: &'static str = "qatflow_gated_delta_rule_backward";

    fn outputs(&self, _: &[(Vec<usize>, DType)]) -> Vec<(Vec<usize>, DType)> {
        let d = self.0;
        let b = d.blocks();
        [
            vec![b, d.bh, d.len, d.dk],
            vec![b, d.bh, d.len, d.dk],
            vec![d.bh, d.len, d.dv],
            vec![b, d.bh, d.len],
            vec![b, d.bh, d.len],
            vec![d.bh, d.dk, d.dv],
        ]
        .into_iter()
        .map(|shape| (shape, DType::F32))
        .collect()
    }

    fn run<R: CubeRuntime>(&self, inputs: Vec<CubeTensor<R>>) -> Vec<CubeTensor<R>> {
        let mut it = inputs.into_iter();
        let mut next = || it.next().expect("an input the caller passed");
        let qkv = [next(), next(), next()];
        let gates = [next(), next()];
        let (ckpt, d_o) = (next(), next());
        let g = backward_cube(qkv, gates, ckpt, d_o, None, self.0);
        vec![g.dq, g.dk, g.dv, g.dg, g.dbeta, g.ds0]
    }
}

/// The forward on inner tensors `[q, k, v, g, beta]` (3-D `[bh, len, d]` and 2-D `[bh, len]`)
/// and a starting state: `[o, last, ckpt]`. Only called on the CUDA backends.
fn forward_inner<I: Backend>(
    inputs: Vec<FloatTensor<I>>,
    state: Option<FloatTensor<I>>,
    d: Dims,
) -> [FloatTensor<I>; 3] {
    let device = I::float_device(&inputs[0]);
    let mut inputs = inputs;
    inputs.extend(state);
    let out = crate::phase::timed::<I, _>(crate::phase::Phase::DeltaRule, &device, || {
        custom::on_cuda::<I, _>(&ForwardCall(d), inputs)
    })
    .unwrap_or_else(|_| unreachable!("called on the CUDA backends only"));
    let [o, last, ckpt]: [FloatTensor<I>; 3] = out.try_into().expect("three outputs");
    [o, last, ckpt]
}

/// Backward of the fused rule: the gradients of `q`, `k`, `v`, `g`, `beta`.
#[derive(Debug)]
struct RuleBackward;

impl<I: Backend> Backward<I, 5> for RuleBackward {
    /// The five inputs' nodes and the shape.
    type State = ([NodeId; 5], Dims);

    fn backward(
        self,
        ops: Ops<Self::State, 5>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let (ids, d) = ops.state;
        let inputs: Vec<FloatTensor<I>> = ids
            .iter()
            .map(|id| checkpointer.retrieve_node_output::<FloatTensor<I>>(*id))
            .collect();
        let d_o = grads.consume::<I>(&ops.node);
        // The stored states come from running forward again (cheaper to recompute than to
        // keep a layer's `[bh, chunks, dk, dv]` for every layer until backward).
        let [_, _, ckpt] = forward_inner::<I>(inputs.clone(), None, d);
        let mut all = inputs;
        all.extend([ckpt, d_o]);
        let device = I::float_device(&all[0]);
        let parts = crate::phase::timed::<I, _>(crate::phase::Phase::DeltaRule, &device, || {
            custom::on_cuda::<I, _>(&BackwardCall(d), all)
        })
        .unwrap_or_else(|_| unreachable!("called on the CUDA backends only"));
        let [dq, dk, dv, dg, dbeta, _]: [FloatTensor<I>; 6] =
            parts.try_into().expect("six outputs");
        let summed3 = |x: FloatTensor<I>, last: usize| {
            p(t::<I, 4>(x).sum_dim(0).reshape([d.bh, d.len, last]))
        };
        let summed2 = |x: FloatTensor<I>| p(t::<I, 3>(x).sum_dim(0).reshape([d.bh, d.len]));
        let out = [
            summed3(dq, d.dk),
            summed3(dk, d.dk),
            dv,
            summed2(dg),
            summed2(dbeta),
        ];
        for (parent, grad) in ops.parents.into_iter().zip(out) {
            if let Some(node) = parent {
                grads.register::<I>(node.id, grad);
            }
        }
    }
}

/// Recomputes the rule's output from its saved inputs in backward.
#[derive(Debug)]
struct RetroRule<I> {
    ids: [NodeId; 5],
    dims: Dims,
    _backend: std::marker::PhantomData<I>,
}

impl<I: Backend> RetroForward for RetroRule<I> {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let inputs = self
            .ids
            .iter()
            .map(|id| states.get_state::<FloatTensor<I>>(id))
            .collect();
        let [o, _, _] = forward_inner::<I>(inputs, None, self.dims);
        states.save(out_node, o);
    }
}

/// The rule under `Autodiff<I, C>`: the output tracked, the last state a constant.
fn autodiff_rule<I: Backend, C: CheckpointStrategy>(
    inputs: [FloatTensor<Autodiff<I, C>>; 5],
    d: Dims,
) -> [FloatTensor<Autodiff<I, C>>; 2] {
    let ids = inputs.each_ref().map(|x| x.node.id);
    let nodes = inputs.each_ref().map(|x| x.node.clone());
    let retro = RetroRule::<I> {
        ids,
        dims: d,
        _backend: std::marker::PhantomData,
    };
    let inner: Vec<FloatTensor<I>> = inputs.iter().map(|x| x.primitive.clone()).collect();
    let [o, last, _] = forward_inner::<I>(inner, None, d);
    let last = Autodiff::<I, C>::from_inner(last);
    let o = match RuleBackward
        .prepare::<C>(nodes)
        .memory_bound()
        .retro_forward(retro)
        .parents(inputs.each_ref())
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let ids = inputs.each_ref().map(|x| prep.checkpoint(x));
            prep.finish((ids, d), o)
        }
        OpsKind::UnTracked(prep) => prep.finish(o),
    };
    [o, last]
}

/// Runs [`autodiff_rule`] when `B` is `Autodiff<I, C>`.
fn when_autodiff<B: Backend, I: Backend, C: CheckpointStrategy>(
    inputs: [FloatTensor<B>; 5],
    d: Dims,
) -> Result<[FloatTensor<B>; 2], [FloatTensor<B>; 5]> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I, C>>() {
        return Err(inputs);
    }
    let cast = |v: FloatTensor<B>| {
        downcast::<_, FloatTensor<Autodiff<I, C>>>(v).unwrap_or_else(|_| unreachable!("B is X"))
    };
    Ok(autodiff_rule::<I, C>(inputs.map(cast), d).map(upcast))
}

/// The forward alone on the CUDA backends without autodiff (prefill, evaluation): `[o, last]`,
/// or the inputs back on any other backend.
#[allow(clippy::type_complexity)]
fn untracked<B: Backend>(
    inputs: [FloatTensor<B>; 5],
    state: Option<FloatTensor<B>>,
    d: Dims,
) -> Result<[FloatTensor<B>; 2], ([FloatTensor<B>; 5], Option<FloatTensor<B>>)> {
    let has_state = state.is_some();
    let mut all: Vec<FloatTensor<B>> = inputs.into();
    all.extend(state);
    match custom::on_cuda::<B, _>(&ForwardCall(d), all) {
        Ok(out) => {
            let [o, last, _]: [FloatTensor<B>; 3] = out
                .try_into()
                .unwrap_or_else(|_| unreachable!("three outputs"));
            Ok([o, last])
        }
        Err(mut back) => {
            let state = if has_state { back.pop() } else { None };
            let inputs: [FloatTensor<B>; 5] = back
                .try_into()
                .unwrap_or_else(|_| unreachable!("the five inputs"));
            Err((inputs, state))
        }
    }
}

/// The gated delta rule of `q`, `k` `[batch, heads, len, dk]`, `v` `[batch, heads, len, dv]`,
/// `g`, `beta` `[batch, heads, len]` (all F32) from `state` `[batch, heads, dk, dv]` (zeros
/// when `None`): the outputs `[batch, heads, len, dv]` and the last state, as the two fused
/// kernels on the CUDA backends qatflow runs (training engine on, `deltanet` not in
/// `QATFLOW_KERNELS_OFF`); the inputs back elsewhere. Under autodiff it applies without a
/// starting state (training), and the last state is a constant (no gradient flows through it).
/// Key head dimensions above [`MAX_DK`] keep the tensor form.
#[allow(clippy::type_complexity)]
pub fn try_gated_delta_rule<B: Backend>(
    [q, k, v]: [Tensor<B, 4>; 3],
    [g, beta]: [Tensor<B, 3>; 2],
    state: Option<Tensor<B, 4>>,
) -> Result<
    (Tensor<B, 4>, Tensor<B, 4>),
    ([Tensor<B, 4>; 3], [Tensor<B, 3>; 2], Option<Tensor<B, 4>>),
> {
    let [batch, heads, len, dk] = q.dims();
    let dv = v.dims()[3];
    let applies = crate::gemm::kernel_on("deltanet")
        && [q.dtype(), k.dtype(), v.dtype(), g.dtype(), beta.dtype()]
            .iter()
            .all(|d| *d == DType::F32)
        && state.as_ref().is_none_or(|s| s.dtype() == DType::F32)
        && len > 0
        && dk <= MAX_DK
        && crate::gemm::cuda_index::<B>(&q.device()).is_some();
    if !applies {
        return Err(([q, k, v], [g, beta], state));
    }
    let d = Dims {
        bh: batch * heads,
        len,
        dk,
        dv,
    };
    let flat3 = |x: Tensor<B, 4>, last: usize| p(x.reshape([d.bh, len, last]));
    let flat2 = |x: Tensor<B, 3>| p(x.reshape([d.bh, len]));
    let inputs = [
        flat3(q, dk),
        flat3(k, dk),
        flat3(v, dv),
        flat2(g),
        flat2(beta),
    ];
    let back = |[q, k, v, g, beta]: [FloatTensor<B>; 5], state| {
        let four = |x, last| t::<B, 3>(x).reshape([batch, heads, len, last]);
        let three = |x| t::<B, 2>(x).reshape([batch, heads, len]);
        Err((
            [four(q, dk), four(k, dk), four(v, dv)],
            [three(g), three(beta)],
            state,
        ))
    };
    let done = |[o, last]: [FloatTensor<B>; 2]| {
        Ok((
            t::<B, 3>(o).reshape([batch, heads, len, dv]),
            t::<B, 3>(last).reshape([batch, heads, dk, dv]),
        ))
    };
    if state.is_none() {
        let r = when_autodiff::<B, Fusion<Cube>, BalancedCheckpointing>(inputs, d)
            .or_else(|i| when_autodiff::<B, Fusion<Cube>, NoCheckpointing>(i, d))
            .or_else(|i| when_autodiff::<B, Fusion<CubeBf16>, BalancedCheckpointing>(i, d))
            .or_else(|i| when_autodiff::<B, Fusion<CubeBf16>, NoCheckpointing>(i, d));
        match r {
            Ok(out) => return done(out),
            Err(i) => return untracked::<B>(i, None, d).map_or_else(|(i, _)| back(i, None), done),
        }
    }
    let state = state.map(|s| p(s.reshape([d.bh, dk, dv])));
    match untracked::<B>(inputs, state, d) {
        Ok(out) => done(out),
        Err((i, state)) => back(
            i,
            state.map(|s| t::<B, 3>(s).reshape([batch, heads, dk, dv])),
        ),
    }
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
            let (nk, nv, nl, ns) = (d.keys(), d.values(), d.tokens(), d.states());
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

    /// The autodiff operation on burn's backend over the software GPU, with and without
    /// balanced checkpointing (which recomputes its output in backward): output, last state
    /// and the gradients of all five inputs equal burn's differentiation of the recurrent
    /// form on the CPU, through the reshapes, the partial sums and the gradient registration.
    #[test]
    fn the_autodiff_operation_equals_the_differentiated_recurrence() {
        use crate::soft_gpu::SoftBackend;
        use burn::backend::autodiff::checkpoint::strategy::{
            BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
        };

        fn run<C: CheckpointStrategy>(d: Dims, data: &[Vec<f32>; 6]) -> Vec<Vec<f32>> {
            type I = SoftBackend;
            let dev = crate::soft_gpu::device();
            let leaf3 = |v: &[f32], last: usize| {
                Tensor::<Autodiff<I, C>, 3>::from_data(
                    TensorData::new(v.to_vec(), [d.bh, d.len, last]),
                    &dev,
                )
                .require_grad()
            };
            let leaf2 = |v: &[f32]| {
                Tensor::<Autodiff<I, C>, 2>::from_data(
                    TensorData::new(v.to_vec(), [d.bh, d.len]),
                    &dev,
                )
                .require_grad()
            };
            let [q, k, v, g, beta, d_o] = data;
            let (q, k, v) = (leaf3(q, d.dk), leaf3(k, d.dk), leaf3(v, d.dv));
            let (g, beta) = (leaf2(g), leaf2(beta));
            // A tracked operation before the rule, so balanced checkpointing has something
            // to recompute from.
            let v2 = v.clone() * 1.0;
            let inputs = [&q, &k, &v2]
                .map(|x| p(x.clone()))
                .into_iter()
                .chain([p(g.clone()), p(beta.clone())])
                .collect::<Vec<_>>();
            let inputs: [FloatTensor<Autodiff<I, C>>; 5] =
                inputs.try_into().unwrap_or_else(|_| unreachable!());
            let [o, last] = when_autodiff::<Autodiff<I, C>, I, C>(inputs, d)
                .unwrap_or_else(|_| panic!("the autodiff backend"));
            let o = t::<Autodiff<I, C>, 3>(o);
            let last = t::<Autodiff<I, C>, 3>(last);
            let w = Tensor::<Autodiff<I, C>, 3>::from_data(
                TensorData::new(d_o.clone(), [d.bh, d.len, d.dv]),
                &dev,
            );
            let grads = (o.clone() * w).sum().backward();
            let read = |x: Tensor<I, 3>| x.into_data().convert::<f32>().to_vec::<f32>().unwrap();
            let read2 = |x: Tensor<I, 2>| x.into_data().convert::<f32>().to_vec::<f32>().unwrap();
            vec![
                read(o.inner()),
                read(last.inner()),
                read(q.grad(&grads).unwrap()),
                read(k.grad(&grads).unwrap()),
                read(v.grad(&grads).unwrap()),
                read2(g.grad(&grads).unwrap()),
                read2(beta.grad(&grads).unwrap()),
            ]
        }

        let d = Dims {
            bh: 2,
            len: 70,
            dk: 20,
            dv: 20,
        };
        let (nk, nv, nl) = (d.keys(), d.values(), d.tokens());
        let mut k = values(nk, 11);
        for row in k.chunks_mut(d.dk) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        let data = [
            values(nk, 12).iter().map(|x| x * 0.5).collect::<Vec<f32>>(),
            k,
            values(nv, 13),
            values(nl, 14).iter().map(|x| -0.5 * (x + 1.0)).collect(),
            values(nl, 15).iter().map(|x| 0.5 * (x + 1.0)).collect(),
            values(nv, 16),
        ];
        let [q, k, v, g, beta, d_o] = &data;
        let (qa, ka, va) = (
            leaf(q, [d.bh, d.len, d.dk]),
            leaf(k, [d.bh, d.len, d.dk]),
            leaf(v, [d.bh, d.len, d.dv]),
        );
        let (ga, ba) = (leaf(g, [d.bh, d.len]), leaf(beta, [d.bh, d.len]));
        let zeros = Tensor::<A, 3>::zeros([d.bh, d.dk, d.dv], &Default::default());
        let (o, last) = recurrent(
            [qa.clone(), ka.clone(), va.clone()],
            ga.clone(),
            ba.clone(),
            zeros,
        );
        let want_o = floats(o.clone().inner());
        let want_last = floats(last.inner());
        let grads = (o * leaf(d_o, [d.bh, d.len, d.dv]).detach())
            .sum()
            .backward();
        let want = [
            want_o,
            want_last,
            floats(qa.grad(&grads).unwrap()),
            floats(ka.grad(&grads).unwrap()),
            floats(va.grad(&grads).unwrap()),
            floats(ga.grad(&grads).unwrap()),
            floats(ba.grad(&grads).unwrap()),
        ];
        let names = ["o", "last", "dq", "dk", "dv", "dg", "dbeta"];
        for (strategy, got) in [
            ("none", run::<NoCheckpointing>(d, &data)),
            ("balanced", run::<BalancedCheckpointing>(d, &data)),
        ] {
            for ((name, got), want) in names.iter().zip(&got).zip(&want) {
                assert!(
                    max_rel_diff(got, want) < 1e-4,
                    "{name}, checkpointing {strategy}"
                );
            }
        }
    }
}
