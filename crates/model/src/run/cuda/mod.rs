//! [`CudaDecoder`]: generation of the dense architectures (Llama/SmolLM2, Qwen3) on an
//! NVIDIA GPU without burn's per-operation tensors. burn's forward launches about 1,200
//! small kernels per token for SmolLM2-135M; here a layer is ten launches of kernels written
//! for decoding (`kernels.cu`, compiled by NVRTC when the decoder is made): the projection
//! input (copy, RMSNorm or SwiGLU, then NVFP4 activation fake quantization when the layer
//! emulates it) in one kernel, one GEMV per projection that reads each weight row once for
//! all rows of the step and adds the residual itself, one kernel for q/k norms, RoPE and the
//! cache write, one for attention (split over blocks of 256 positions on long
//! contexts, plus one kernel that merges them). Steps of more than [`GEMV_MAX_ROWS`] rows
//! (prefill) run their projections through cuBLASLt and their attention through a
//! flash-style kernel (register tiles of scores and outputs, an online softmax, keys and
//! values staged through shared memory; no row of scores is stored whole).
//!
//! Weights are packed as the CPU decoder packs them ([`CpuDecoder::pack`]: fused q/k/v and
//! gate/up, fake-quantized weights, BF16 where lossless, float32 otherwise) and uploaded
//! once. Activations, the KV cache and accumulation are float32; only cuBLASLt's BF16
//! products (prefill of BF16 weights) round their inputs to BF16, as a BF16 serving engine
//! does. NVFP4 activation emulation runs the CPU codec's arithmetic in the projection-input
//! kernel.

mod blas;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use burn::tensor::backend::Backend;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg,
};

use crate::arch::model::CausalLm;
use crate::arch::rope::Rope;
use crate::config::ModelConfig;
use crate::run::cpu::kernels::Matrix;
use crate::run::cpu::{CpuDecoder, CpuDecoderError, Fused, Layer, Linear};

/// Most rows one GEMV launch takes (`GEMV_MAX_ROWS` in `kernels.cu`); larger steps run
/// their projections through cuBLASLt.
pub const GEMV_MAX_ROWS: usize = 16;

/// Largest head size the kernels take (and multiples of 4 only).
const MAX_HEAD_DIM: usize = 256;

/// Largest head size of the prefill attention's wide variant (`attend_prefill_64`: 64 query
/// rows and 32 keys per step); larger heads take `attend_prefill_32` (32 rows, 16 keys).
const PREFILL_WIDE_MAX_HD: usize = 128;

/// The prefill attention's launch shape for one head size.
struct PrefillTiles {
    /// `attend_prefill_64` rather than `attend_prefill_32`.
    wide: bool,
    /// Query rows per block.
    rows: usize,
    /// Floats of shared memory it stages: queries, keys and values with the row stride of
    /// `kernels.cu` (hd + 4, or hd + 8 when hd is not a multiple of 8), and probabilities.
    shared_floats: usize,
}

/// The prefill attention's variant and launch shape for head size `hd`.
fn prefill_tiles(hd: usize) -> PrefillTiles {
    let wide = hd <= PREFILL_WIDE_MAX_HD;
    let (rows, keys) = if wide { (64, 32) } else { (32, 16) };
    let ld = hd + if hd % 8 == 0 { 4 } else { 8 };
    PrefillTiles {
        wide,
        rows,
        shared_floats: rows * ld + 2 * keys * ld + rows * (keys + 4),
    }
}

/// Positions one block of the row attention kernel covers: longer contexts split over
/// several blocks (flash-decoding) whose partial results are merged by a second kernel.
const ATTEND_SPAN: usize = 256;

/// Environment variable: `off` launches every kernel of a decoding step directly instead of
/// replaying a captured CUDA graph.
pub const GRAPHS_ENV: &str = "QATFLOW_CUDA_GRAPHS";

fn graphs_enabled() -> bool {
    std::env::var(GRAPHS_ENV).map_or(true, |v| v != "off")
}

/// Why a model cannot run on the [`CudaDecoder`] (it then runs on burn).
#[derive(Debug, thiserror::Error)]
pub enum CudaDecoderError {
    /// The model's architecture or precision cannot be packed.
    #[error(transparent)]
    Pack(#[from] CpuDecoderError),
    /// A dimension the kernels do not handle.
    #[error("the CUDA decoder does not handle this model's shape: {0}")]
    Shape(String),
    /// The CUDA driver, NVRTC or cuBLASLt failed.
    #[error("CUDA: {0}")]
    Cuda(String),
}

fn cuda<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> CudaDecoderError {
    move |e| CudaDecoderError::Cuda(format!("{what}: {e}"))
}

/// The device address of `s` (event tracking is off, so nothing is recorded).
fn dptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

/// A weight matrix on the device.
#[derive(Debug)]
enum Weights {
    Bf16(CudaSlice<u16>),
    F32(CudaSlice<f32>),
}

#[derive(Debug)]
struct DMatrix {
    weights: Weights,
    rows: usize,
    cols: usize,
}

impl DMatrix {
    fn upload(m: &Matrix, stream: &Arc<CudaStream>) -> Result<DMatrix, CudaDecoderError> {
        let weights = match m {
            Matrix::Bf16 { data, .. } => {
                Weights::Bf16(stream.clone_htod(data).map_err(cuda("uploading weights"))?)
            }
            Matrix::F32 { data, .. } => {
                Weights::F32(stream.clone_htod(data).map_err(cuda("uploading weights"))?)
            }
        };
        Ok(DMatrix {
            weights,
            rows: m.rows(),
            cols: m.cols(),
        })
    }

    fn is_f32(&self) -> bool {
        matches!(self.weights, Weights::F32(_))
    }

    fn ptr(&self, stream: &Arc<CudaStream>) -> u64 {
        match &self.weights {
            Weights::Bf16(s) => dptr(s, stream),
            Weights::F32(s) => dptr(s, stream),
        }
    }
}

#[derive(Debug)]
struct DLinear {
    weight: DMatrix,
    input_scale_2: Option<f32>,
}

impl DLinear {
    fn upload(l: &Linear, stream: &Arc<CudaStream>) -> Result<DLinear, CudaDecoderError> {
        Ok(DLinear {
            weight: DMatrix::upload(&l.weight, stream)?,
            input_scale_2: l.input_scale_2,
        })
    }
}

fn upload_fused(f: &Fused, stream: &Arc<CudaStream>) -> Result<Vec<DLinear>, CudaDecoderError> {
    f.parts.iter().map(|p| DLinear::upload(p, stream)).collect()
}

fn upload_f32(v: &[f32], stream: &Arc<CudaStream>) -> Result<CudaSlice<f32>, CudaDecoderError> {
    stream.clone_htod(v).map_err(cuda("uploading norms"))
}

#[derive(Debug)]
struct DLayer {
    input_norm: CudaSlice<f32>,
    qkv: Vec<DLinear>,
    q_norm: Option<CudaSlice<f32>>,
    k_norm: Option<CudaSlice<f32>>,
    o: DLinear,
    post_norm: CudaSlice<f32>,
    gate_up: Vec<DLinear>,
    down: DLinear,
}

impl DLayer {
    fn upload(l: &Layer, stream: &Arc<CudaStream>) -> Result<DLayer, CudaDecoderError> {
        let opt = |v: &Option<Vec<f32>>| v.as_deref().map(|v| upload_f32(v, stream)).transpose();
        Ok(DLayer {
            input_norm: upload_f32(&l.input_norm, stream)?,
            qkv: upload_fused(&l.qkv, stream)?,
            q_norm: opt(&l.q_norm)?,
            k_norm: opt(&l.k_norm)?,
            o: DLinear::upload(&l.o, stream)?,
            post_norm: upload_f32(&l.post_norm, stream)?,
            gate_up: upload_fused(&l.gate_up, stream)?,
            down: DLinear::upload(&l.down, stream)?,
        })
    }
}

/// The compiled kernels.
#[derive(Debug)]
struct Kernels {
    embed_bf16: CudaFunction,
    embed_f32: CudaFunction,
    prep: CudaFunction,
    gemv_bf16: CudaFunction,
    gemv_f32: CudaFunction,
    qkv_post: CudaFunction,
    attend_rows: CudaFunction,
    attend_merge: CudaFunction,
    attend_prefill_64: CudaFunction,
    attend_prefill_32: CudaFunction,
}

impl Kernels {
    fn compile(ctx: &Arc<CudaContext>) -> Result<Kernels, CudaDecoderError> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(cuda("compute capability"))?;
        let source = include_str!("kernels.cu");
        let opts = |arch: bool| cudarc::nvrtc::CompileOptions {
            options: if arch {
                vec![format!("--gpu-architecture=compute_{major}{minor}")]
            } else {
                Vec::new()
            },
            name: Some("qatflow_decoder.cu".into()),
            ..Default::default()
        };
        // An NVRTC older than the GPU does not know its architecture; the driver then JIT-
        // compiles the default target's PTX.
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts(true))
            .or_else(|_| cudarc::nvrtc::compile_ptx_with_opts(source, opts(false)))
            .map_err(cuda("compiling the decoder kernels (NVRTC)"))?;
        let module = ctx.load_module(ptx).map_err(cuda("loading the kernels"))?;
        let f = |name: &str| module.load_function(name).map_err(cuda("kernel lookup"));
        Ok(Kernels {
            embed_bf16: f("embed_bf16")?,
            embed_f32: f("embed_f32")?,
            prep: f("prep")?,
            gemv_bf16: f("gemv_bf16")?,
            gemv_f32: f("gemv_f32")?,
            qkv_post: f("qkv_post")?,
            attend_rows: f("attend_rows")?,
            attend_merge: f("attend_merge")?,
            attend_prefill_64: wide_shared(f("attend_prefill_64")?, PREFILL_WIDE_MAX_HD)?,
            attend_prefill_32: wide_shared(f("attend_prefill_32")?, MAX_HEAD_DIM)?,
        })
    }
}

/// Lets `f` (a prefill attention kernel) use the dynamic shared memory it needs for head
/// sizes up to `max_hd`, beyond the default 48 KiB.
fn wide_shared(f: CudaFunction, max_hd: usize) -> Result<CudaFunction, CudaDecoderError> {
    let bytes = prefill_tiles(max_hd).shared_floats * 4;
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .map_err(cuda("allowing the prefill attention its shared memory"))?;
    Ok(f)
}

/// Captured decoding steps by (rows, attention runs, logit rows).
#[derive(Default)]
struct Graphs(HashMap<(usize, usize, usize), CudaGraph>);

impl std::fmt::Debug for Graphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} CUDA graphs", self.0.len())
    }
}

/// Device buffers of one forward, grown to the largest step seen.
#[derive(Debug, Default)]
struct Scratch {
    rows: usize,
    /// Rows of logits the logits buffer holds (a prefill returns one row, not one per token).
    logit_rows: usize,
    x: Option<CudaSlice<f32>>,
    h: Option<CudaSlice<f32>>,
    h_bf16: Option<CudaSlice<u16>>,
    qkv: Option<CudaSlice<f32>>,
    q: Option<CudaSlice<f32>>,
    att: Option<CudaSlice<f32>>,
    gate_up: Option<CudaSlice<f32>>,
    logits: Option<CudaSlice<f32>>,
    /// `attend_rows`' partial results when a step's context spans several runs.
    partials: Option<CudaSlice<f32>>,
    /// The decoding steps' graphs by (rows, attention runs, logit rows); cleared when a
    /// buffer they use is replaced.
    graphs: Graphs,
    /// A capture failed: steps launch their kernels directly.
    graphs_failed: bool,
    meta: Option<CudaSlice<u64>>,
    cos: Option<CudaSlice<f32>>,
    sin: Option<CudaSlice<f32>>,
}

/// The keys and values of one sequence on the GPU: `[capacity, layers, kv_heads, head_dim]`
/// float32 each, growing by doubling.
#[derive(Debug)]
pub struct CudaCache {
    keys: Option<CudaSlice<f32>>,
    values: Option<CudaSlice<f32>>,
    capacity: usize,
    len: usize,
    /// Floats per position (`layers × kv_heads × head_dim`).
    stride: usize,
    stream: Arc<CudaStream>,
}

impl CudaCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes room for `positions` positions, keeping the cached ones.
    fn reserve(&mut self, positions: usize) -> Result<(), CudaDecoderError> {
        if positions <= self.capacity {
            return Ok(());
        }
        let capacity = positions.max(self.capacity * 2).max(256);
        let grow = |old: &Option<CudaSlice<f32>>| -> Result<CudaSlice<f32>, CudaDecoderError> {
            let mut new = self
                .stream
                .alloc_zeros::<f32>(capacity * self.stride)
                .map_err(cuda("growing the KV cache"))?;
            if let Some(old) = old {
                let used = self.len * self.stride;
                if used > 0 {
                    self.stream
                        .memcpy_dtod(&old.slice(..used), &mut new.slice_mut(..used))
                        .map_err(cuda("copying the KV cache"))?;
                }
            }
            Ok(new)
        };
        let keys = grow(&self.keys)?;
        let values = grow(&self.values)?;
        self.keys = Some(keys);
        self.values = Some(values);
        self.capacity = capacity;
        Ok(())
    }

    fn addresses(&self) -> (u64, u64) {
        let k = self.keys.as_ref().expect("reserved before use");
        let v = self.values.as_ref().expect("reserved before use");
        (dptr(k, &self.stream), dptr(v, &self.stream))
    }
}

impl Clone for CudaCache {
    /// A copy of the cached positions (the server's prefix cache hands these out).
    ///
    /// Panics when the GPU has no memory left for the copy.
    fn clone(&self) -> CudaCache {
        let mut copy = CudaCache {
            keys: None,
            values: None,
            capacity: 0,
            len: 0,
            stride: self.stride,
            stream: self.stream.clone(),
        };
        if self.len > 0 {
            copy.reserve(self.len)
                .expect("GPU memory for a KV cache copy");
            let used = self.len * self.stride;
            let pairs = [
                (&self.keys, &mut copy.keys),
                (&self.values, &mut copy.values),
            ];
            for (src, dst) in pairs {
                let (src, dst) = (
                    src.as_ref().expect("cached"),
                    dst.as_mut().expect("reserved"),
                );
                self.stream
                    .memcpy_dtod(&src.slice(..used), &mut dst.slice_mut(..used))
                    .expect("copying a KV cache on the GPU");
            }
            copy.len = self.len;
        }
        copy
    }
}

/// A dense model on the GPU, packed for fast generation (see the module header).
#[derive(Debug)]
pub struct CudaDecoder {
    config: ModelConfig,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    blas: blas::Blas,
    embed: DMatrix,
    lm_head: Option<DMatrix>,
    layers: Vec<DLayer>,
    norm: CudaSlice<f32>,
    eps: f32,
    rope: Rope,
    scratch: Mutex<Scratch>,
}

/// One step's rows: a single sequence's consecutive tokens (prefill, or one token), or one
/// token for each of several sequences.
enum Step<'a, 'c> {
    One(&'a mut CudaCache),
    Each(&'a mut [&'c mut CudaCache]),
}

impl std::fmt::Debug for blas::Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Blas")
    }
}

impl CudaDecoder {
    /// Packs `model` (a dense model of any precision) and uploads it to CUDA device
    /// `ordinal`.
    pub fn new<B: Backend>(
        model: &CausalLm<B>,
        ordinal: usize,
    ) -> Result<CudaDecoder, CudaDecoderError> {
        let packed = CpuDecoder::pack(model)?;
        Self::upload(&packed, ordinal)
    }

    /// Uploads a packed model to CUDA device `ordinal`.
    pub fn upload(packed: &CpuDecoder, ordinal: usize) -> Result<CudaDecoder, CudaDecoderError> {
        let c = &packed.config;
        let hd = c.head_dim;
        if hd % 4 != 0 || hd > MAX_HEAD_DIM {
            return Err(CudaDecoderError::Shape(format!(
                "head_dim {hd} (the kernels take multiples of 4 up to {MAX_HEAD_DIM})"
            )));
        }
        if c.num_kv_heads == 0 || c.num_heads % c.num_kv_heads != 0 {
            return Err(CudaDecoderError::Shape(format!(
                "{} query heads over {} key/value heads",
                c.num_heads, c.num_kv_heads
            )));
        }
        let inter = packed.layers.first().map_or(16, |l| l.down.weight.cols());
        let q_width = c.num_heads * hd;
        if c.hidden_size % 16 != 0 || inter % 16 != 0 || q_width % 16 != 0 {
            return Err(CudaDecoderError::Shape(format!(
                "hidden size {}, intermediate size {inter}, attention width {q_width} \
                 (projection inputs must be multiples of 16)",
                c.hidden_size
            )));
        }
        // cudarc panics when libcuda cannot be loaded: a machine without a driver.
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| CudaDecoderError::Cuda("the CUDA driver could not be loaded".into()))?
            .map_err(cuda("opening the device"))?;
        // One stream orders everything: no events per buffer.
        // SAFETY: every buffer of the decoder and its caches is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(cuda("creating a stream"))?;
        let kernels = Kernels::compile(&ctx)?;
        let blas = blas::Blas::new(&stream)?;
        let layers = packed
            .layers
            .iter()
            .map(|l| DLayer::upload(l, &stream))
            .collect::<Result<Vec<_>, _>>()?;
        let decoder = CudaDecoder {
            config: c.clone(),
            embed: DMatrix::upload(&packed.embed, &stream)?,
            lm_head: packed
                .lm_head
                .as_ref()
                .map(|m| DMatrix::upload(m, &stream))
                .transpose()?,
            norm: upload_f32(&packed.norm, &stream)?,
            eps: packed.eps,
            rope: packed.rope.clone(),
            layers,
            ctx,
            stream,
            kernels,
            blas,
            scratch: Mutex::new(Scratch::default()),
        };
        decoder.stream.synchronize().map_err(cuda("uploading"))?;
        Ok(decoder)
    }

    /// Hyperparameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// An empty cache.
    pub fn new_cache(&self) -> CudaCache {
        let c = &self.config;
        CudaCache {
            keys: None,
            values: None,
            capacity: 0,
            len: 0,
            stride: self.layers.len() * c.num_kv_heads * c.head_dim,
            stream: self.stream.clone(),
        }
    }

    /// Runs `ids` after the positions in `cache` (appending theirs) and returns the logits
    /// of the last one.
    ///
    /// Panics when CUDA fails (out of memory, a lost device): the caller cannot go on.
    pub fn next_logits(&self, ids: &[u32], cache: &mut CudaCache) -> Vec<f32> {
        self.forward(ids, Step::One(cache))
            .expect("CUDA decoder forward")
            .pop()
            .expect("at least one token")
    }

    /// One decoding step of several sequences: `tokens[i]` after `caches[i]`; returns each
    /// sequence's logits.
    pub fn decode_step(&self, tokens: &[u32], caches: &mut [&mut CudaCache]) -> Vec<Vec<f32>> {
        assert_eq!(tokens.len(), caches.len(), "one token per cache");
        self.forward(tokens, Step::Each(caches))
            .expect("CUDA decoder forward")
    }

    fn forward(&self, ids: &[u32], step: Step<'_, '_>) -> Result<Vec<Vec<f32>>, CudaDecoderError> {
        let n = ids.len();
        assert!(n > 0, "no tokens");
        self.ctx
            .bind_to_thread()
            .map_err(cuda("binding the context"))?;
        let c = &self.config;
        // Per row: token, position, cache addresses; and which rows' logits come back.
        let mut meta = Vec::with_capacity(n * 4);
        let mut positions = Vec::with_capacity(n);
        let logit_rows: Vec<usize> = match &step {
            Step::One(_) => vec![n - 1],
            Step::Each(_) => (0..n).collect(),
        };
        // Every id is checked before any cache changes.
        for &id in ids {
            self.check_id(id)?;
        }
        // A single sequence's many rows attend through the tiled kernel: `(first position,
        // keys, values)`.
        let mut prefill = None;
        match step {
            Step::One(cache) => {
                let first = cache.len;
                cache.reserve(first + n)?;
                let (k, v) = cache.addresses();
                for (i, &id) in ids.iter().enumerate() {
                    meta.extend([u64::from(id), (first + i) as u64, k, v]);
                    positions.push(first + i);
                }
                cache.len = first + n;
                if n > GEMV_MAX_ROWS {
                    prefill = Some((first, k, v));
                }
            }
            Step::Each(caches) => {
                assert_eq!(caches.len(), n, "one token per cache");
                for (cache, &id) in caches.iter_mut().zip(ids) {
                    let at = cache.len;
                    cache.reserve(at + 1)?;
                    let (k, v) = cache.addresses();
                    meta.extend([u64::from(id), at as u64, k, v]);
                    positions.push(at);
                    cache.len = at + 1;
                }
            }
        }
        let (cos, sin) = self.rope.cos_sin(positions.iter().copied());
        let runs = (positions.iter().max().copied().unwrap_or(0) + 1).div_ceil(ATTEND_SPAN);
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        self.ensure(s, n, logit_rows.len())?;
        let partial_len = n * c.num_heads * runs * (c.head_dim + 2);
        if runs > 1 && s.partials.as_ref().is_none_or(|b| b.len() < partial_len) {
            let len = partial_len.next_power_of_two();
            s.partials = Some(
                self.stream
                    .alloc_zeros::<f32>(len)
                    .map_err(cuda("allocating decoder buffers"))?,
            );
            s.graphs.0.clear();
        }
        let st = &self.stream;
        let up = |host: &[f32], dev: &mut Option<CudaSlice<f32>>| {
            let dev = dev.as_mut().expect("allocated");
            st.memcpy_htod(host, &mut dev.slice_mut(..host.len()))
                .map_err(cuda("uploading the step"))
        };
        up(&cos, &mut s.cos)?;
        up(&sin, &mut s.sin)?;
        {
            let dev = s.meta.as_mut().expect("allocated");
            st.memcpy_htod(&meta, &mut dev.slice_mut(..meta.len()))
                .map_err(cuda("uploading the step"))?;
        }
        let p = |b: &Option<CudaSlice<f32>>| dptr(b.as_ref().expect("allocated"), st);
        let bufs = Bufs {
            x: p(&s.x),
            h: p(&s.h),
            h_bf16: dptr(s.h_bf16.as_ref().expect("allocated"), st),
            qkv: p(&s.qkv),
            q: p(&s.q),
            att: p(&s.att),
            gate_up: p(&s.gate_up),
            logits: p(&s.logits),
            meta: dptr(s.meta.as_ref().expect("allocated"), st),
            partials: s.partials.as_ref().map_or(0, |b| dptr(b, st)),
            cos: p(&s.cos),
            sin: p(&s.sin),
        };
        let vocab = self.embed.rows;
        // Decoding steps replay a CUDA graph of the whole forward (one launch instead of
        // ~300): every argument is a scratch address or lives in `meta`, so one graph per
        // row count and attention run count serves every step of that shape.
        let key = (n, runs, logit_rows.len());
        let graphable = prefill.is_none() && n <= GEMV_MAX_ROWS && graphs_enabled();
        if graphable && !s.graphs.0.contains_key(&key) && !s.graphs_failed {
            st.begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .map_err(cuda("starting a graph capture"))?;
            let enqueued = self.enqueue(&bufs, n, runs, prefill, &logit_rows);
            let flags = cudarc::driver::sys::CUgraphInstantiate_flags(0);
            match (enqueued, st.end_capture(flags)) {
                (Ok(()), Ok(Some(graph))) => {
                    s.graphs.0.insert(key, graph);
                }
                // The direct launches below run the step; later steps do not try again.
                _ => s.graphs_failed = true,
            }
        }
        match s.graphs.0.get(&key).filter(|_| graphable) {
            Some(graph) => graph.launch().map_err(cuda("launching the step's graph"))?,
            None => self.enqueue(&bufs, n, runs, prefill, &logit_rows)?,
        }
        let mut host = vec![0f32; logit_rows.len() * vocab];
        let dev = s.logits.as_ref().expect("allocated");
        st.memcpy_dtoh(&dev.slice(..host.len()), &mut host)
            .map_err(cuda("reading the logits"))?;
        st.synchronize().map_err(cuda("the step"))?;
        Ok(host.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    /// Enqueues a step's forward on the stream: embedding, layers, final norm and LM head
    /// (logits of `logit_rows` into the logits buffer, in order). `prefill` is `(first
    /// position, keys, values)` of a single sequence's many rows.
    fn enqueue(
        &self,
        bufs: &Bufs,
        n: usize,
        runs: usize,
        prefill: Option<(usize, u64, u64)>,
        logit_rows: &[usize],
    ) -> Result<(), CudaDecoderError> {
        let c = &self.config;
        let st = &self.stream;
        let vocab = self.embed.rows;
        let hidden = c.hidden_size;
        let embed = match &self.embed.weights {
            Weights::Bf16(_) => &self.kernels.embed_bf16,
            Weights::F32(_) => &self.kernels.embed_f32,
        };
        self.launch(
            embed,
            (n as u32, 1, 1),
            256,
            0,
            &[
                Arg::U64(self.embed.ptr(st)),
                Arg::U64(bufs.meta),
                Arg::U64(bufs.x),
                Arg::I32(hidden as i32),
            ],
        )?;
        let (heads, kv_heads, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let width = (heads + 2 * kv_heads) * hd;
        let scale = (hd as f32).powf(-0.5);
        let layers = self.layers.len() as i32;
        for (li, layer) in self.layers.iter().enumerate() {
            // Attention block.
            let norm = In::Norm(dptr(&layer.input_norm, st));
            self.project_fused(bufs, n, norm, &layer.qkv, bufs.qkv)?;
            let opt = |o: &Option<CudaSlice<f32>>| o.as_ref().map_or(0, |b| dptr(b, st));
            self.launch(
                &self.kernels.qkv_post,
                (n as u32, (heads + 2 * kv_heads) as u32, 1),
                hd.next_multiple_of(32) as u32,
                0,
                &[
                    Arg::U64(bufs.qkv),
                    Arg::I32(width as i32),
                    Arg::U64(bufs.cos),
                    Arg::U64(bufs.sin),
                    Arg::U64(opt(&layer.q_norm)),
                    Arg::U64(opt(&layer.k_norm)),
                    Arg::F32(self.eps),
                    Arg::U64(bufs.q),
                    Arg::U64(bufs.meta),
                    Arg::I32(heads as i32),
                    Arg::I32(kv_heads as i32),
                    Arg::I32(hd as i32),
                    Arg::I32(li as i32),
                    Arg::I32(layers),
                ],
            )?;
            match prefill {
                Some((first, keys, values)) => {
                    let tiles = prefill_tiles(hd);
                    let kernel = if tiles.wide {
                        &self.kernels.attend_prefill_64
                    } else {
                        &self.kernels.attend_prefill_32
                    };
                    self.launch(
                        kernel,
                        (n.div_ceil(tiles.rows) as u32, heads as u32, 1),
                        256,
                        (tiles.shared_floats * 4) as u32,
                        &[
                            Arg::U64(bufs.q),
                            Arg::U64(bufs.att),
                            Arg::I32(n as i32),
                            Arg::U64(first as u64),
                            Arg::U64(keys),
                            Arg::U64(values),
                            Arg::I32(heads as i32),
                            Arg::I32(kv_heads as i32),
                            Arg::I32(hd as i32),
                            Arg::I32(li as i32),
                            Arg::I32(layers),
                            Arg::F32(scale),
                        ],
                    )?;
                }
                None => {
                    self.launch(
                        &self.kernels.attend_rows,
                        (n as u32, heads as u32, runs as u32),
                        256,
                        0,
                        &[
                            Arg::U64(bufs.q),
                            Arg::U64(bufs.att),
                            Arg::U64(bufs.partials),
                            Arg::U64(bufs.meta),
                            Arg::I32(heads as i32),
                            Arg::I32(kv_heads as i32),
                            Arg::I32(hd as i32),
                            Arg::I32(li as i32),
                            Arg::I32(layers),
                            Arg::F32(scale),
                            Arg::I32(ATTEND_SPAN as i32),
                        ],
                    )?;
                    if runs > 1 {
                        self.launch(
                            &self.kernels.attend_merge,
                            (n as u32, heads as u32, 1),
                            hd.next_multiple_of(32) as u32,
                            0,
                            &[
                                Arg::U64(bufs.partials),
                                Arg::U64(bufs.att),
                                Arg::I32(heads as i32),
                                Arg::I32(hd as i32),
                                Arg::I32(runs as i32),
                            ],
                        )?;
                    }
                }
            }
            let residual = Out {
                y: bufs.x,
                col: 0,
                ld: hidden,
                accumulate: true,
            };
            let (w, s2) = (&layer.o.weight, layer.o.input_scale_2);
            self.project(bufs, n, bufs.att, heads * hd, In::Copy, w, s2, residual)?;
            // MLP block.
            let norm = In::Norm(dptr(&layer.post_norm, st));
            let gu_width = self.project_fused(bufs, n, norm, &layer.gate_up, bufs.gate_up)?;
            let (w, s2) = (&layer.down.weight, layer.down.input_scale_2);
            let gu = bufs.gate_up;
            self.project(bufs, n, gu, gu_width, In::SwiGlu, w, s2, residual)?;
        }
        // Final norm and LM head, for the rows whose logits come back.
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let norm = In::Norm(dptr(&self.norm, st));
        for (i, chunk) in logit_rows.chunks(GEMV_MAX_ROWS).enumerate() {
            let x = bufs.x + (chunk[0] * hidden * 4) as u64;
            let to = Out {
                y: bufs.logits + (i * GEMV_MAX_ROWS * vocab * 4) as u64,
                col: 0,
                ld: vocab,
                accumulate: false,
            };
            self.project(bufs, chunk.len(), x, hidden, norm, head, None, to)?;
        }
        Ok(())
    }

    fn check_id(&self, id: u32) -> Result<(), CudaDecoderError> {
        if (id as usize) < self.embed.rows {
            Ok(())
        } else {
            Err(CudaDecoderError::Shape(format!(
                "token id {id} is outside the vocabulary of {} tokens",
                self.embed.rows
            )))
        }
    }

    /// Grows the scratch buffers to steps of `n` rows returning `logit_rows` rows of logits.
    fn ensure(&self, s: &mut Scratch, n: usize, logit_rows: usize) -> Result<(), CudaDecoderError> {
        let st = &self.stream;
        let f = |len: usize| -> Result<Option<CudaSlice<f32>>, CudaDecoderError> {
            st.alloc_zeros::<f32>(len.max(1))
                .map(Some)
                .map_err(cuda("allocating decoder buffers"))
        };
        if s.logit_rows < logit_rows {
            let rows = logit_rows.next_power_of_two().max(GEMV_MAX_ROWS);
            s.logits = f(rows * self.embed.rows)?;
            s.logit_rows = rows;
            s.graphs.0.clear();
        }
        if s.rows >= n && s.x.is_some() {
            return Ok(());
        }
        let rows = n.next_power_of_two().max(GEMV_MAX_ROWS);
        let c = &self.config;
        let (hidden, hd) = (c.hidden_size, c.head_dim);
        let q_width = c.num_heads * hd;
        let width = (c.num_heads + 2 * c.num_kv_heads) * hd;
        let gu = self
            .layers
            .iter()
            .map(|l| l.gate_up.iter().map(|p| p.weight.rows).sum::<usize>())
            .max()
            .unwrap_or(0);
        let inputs = [hidden, q_width, gu / 2]
            .into_iter()
            .max()
            .unwrap_or(hidden);
        s.x = f(rows * hidden)?;
        s.h = f(rows * inputs)?;
        s.h_bf16 = Some(
            st.alloc_zeros::<u16>(rows * inputs)
                .map_err(cuda("allocating decoder buffers"))?,
        );
        s.qkv = f(rows * width)?;
        s.q = f(rows * q_width)?;
        s.att = f(rows * q_width)?;
        s.gate_up = f(rows * gu)?;
        s.graphs.0.clear();
        s.meta = Some(
            st.alloc_zeros::<u64>(rows * 4)
                .map_err(cuda("allocating decoder buffers"))?,
        );
        s.cos = f(rows * hd)?;
        s.sin = f(rows * hd)?;
        s.rows = rows;
        Ok(())
    }

    /// Launches `f` on the decoder's stream.
    fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<(), CudaDecoderError> {
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::U64(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: shared,
        };
        // SAFETY: every kernel's parameters are the 64-bit addresses, 32-bit integers and
        // floats listed at its launch, in `kernels.cu`'s order, and the buffers behind the
        // addresses are sized for the step (`ensure`, `CudaCache::reserve`).
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(cuda("launching a kernel"))
    }

    /// Linears reading the same normalized rows of `x`, their outputs side by side in rows of
    /// `y`; returns the output width.
    fn project_fused(
        &self,
        bufs: &Bufs,
        n: usize,
        norm: In,
        parts: &[DLinear],
        y: u64,
    ) -> Result<usize, CudaDecoderError> {
        let width = parts.iter().map(|p| p.weight.rows).sum();
        let mut col = 0;
        for part in parts {
            let to = Out {
                y,
                col,
                ld: width,
                accumulate: false,
            };
            let hidden = self.config.hidden_size;
            let (w, s2) = (&part.weight, part.input_scale_2);
            self.project(bufs, n, bufs.x, hidden, norm, w, s2, to)?;
            col += part.weight.rows;
        }
        Ok(width)
    }

    /// One projection of `n` rows: the input prepared from `x` (rows of stride `x_ld`) as
    /// `input` says, fake-quantized under `scale_2`, times `w`ᵀ into `to`.
    #[allow(clippy::too_many_arguments)]
    fn project(
        &self,
        bufs: &Bufs,
        n: usize,
        x: u64,
        x_ld: usize,
        input: In,
        w: &DMatrix,
        scale_2: Option<f32>,
        to: Out,
    ) -> Result<(), CudaDecoderError> {
        let k = w.cols;
        let (mode, norm) = match input {
            In::Copy => (0, 0),
            In::Norm(weights) => (1, weights),
            In::SwiGlu => (2, 0),
        };
        let gemv = n <= GEMV_MAX_ROWS;
        let bf16_input = !gemv && !w.is_f32();
        let (h, h_bf16) = if bf16_input {
            (0, bufs.h_bf16)
        } else {
            (bufs.h, 0)
        };
        self.launch(
            &self.kernels.prep,
            (n as u32, 1, 1),
            128,
            0,
            &[
                Arg::U64(x),
                Arg::I32(x_ld as i32),
                Arg::U64(h),
                Arg::U64(h_bf16),
                Arg::I32(k as i32),
                Arg::I32(mode),
                Arg::U64(norm),
                Arg::F32(self.eps),
                Arg::F32(scale_2.unwrap_or(0.0)),
            ],
        )?;
        let y = to.y + (to.col * 4) as u64;
        let wp = w.ptr(&self.stream);
        if gemv {
            let f = if w.is_f32() {
                &self.kernels.gemv_f32
            } else {
                &self.kernels.gemv_bf16
            };
            self.launch(
                f,
                (w.rows.div_ceil(8) as u32, 1, 1),
                256,
                0,
                &[
                    Arg::U64(h),
                    Arg::U64(wp),
                    Arg::U64(y),
                    Arg::I32(n as i32),
                    Arg::I32(k as i32),
                    Arg::I32(w.rows as i32),
                    Arg::I32(to.ld as i32),
                    Arg::I32(i32::from(to.accumulate)),
                ],
            )
        } else {
            let shape = blas::Shape {
                n,
                k,
                out: w.rows,
                y_ld: to.ld,
                f32_operands: w.is_f32(),
            };
            let input = if bf16_input { h_bf16 } else { h };
            self.blas
                .gemm(&self.stream, shape, wp, input, y, to.accumulate)
        }
    }
}

/// A kernel argument.
enum Arg {
    U64(u64),
    I32(i32),
    F32(f32),
}

/// How a projection's input is made from its source rows.
#[derive(Clone, Copy)]
enum In {
    /// As they are.
    Copy,
    /// RMS-normalized with the norm weights at this address.
    Norm(u64),
    /// SwiGLU of `[gate | up]` rows.
    SwiGlu,
}

/// Where a projection writes: columns from `col` of rows with stride `ld` at `y`, added to
/// what is there when `accumulate`.
#[derive(Clone, Copy)]
struct Out {
    y: u64,
    col: usize,
    ld: usize,
    accumulate: bool,
}

/// The scratch buffers' device addresses for one forward.
struct Bufs {
    x: u64,
    h: u64,
    h_bf16: u64,
    qkv: u64,
    q: u64,
    att: u64,
    gate_up: u64,
    logits: u64,
    partials: u64,
    meta: u64,
    cos: u64,
    sin: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::init::{named_config, write_random_model};
    use crate::arch::model::LoadOptions;
    use crate::io::weights::Precision;
    use burn::backend::Flex;

    /// Shapes the kernels do not take are refused before any CUDA call, so the generator
    /// falls back to burn on any machine (the GPU paths are in `tests/cuda_decoder.rs`).
    #[test]
    fn shapes_the_kernels_do_not_take_are_refused() {
        for (field, value, expect) in [
            ("head_dim", 272, "head_dim 272"),
            ("head_dim", 18, "head_dim 18"),
            ("intermediate_size", 120, "intermediate size 120"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut json = named_config("tiny-llama").unwrap();
            json["vocab_size"] = 96.into();
            json[field] = value.into();
            write_random_model(&json, 1, safetensors::Dtype::BF16, dir.path()).unwrap();
            let options = LoadOptions {
                precision: Precision::Bf16,
                emulate_nvfp4_activations: false,
            };
            let model = CausalLm::<Flex>::load(dir.path(), options, &Default::default()).unwrap();
            match CudaDecoder::new(&model, 0) {
                Err(CudaDecoderError::Shape(message)) => {
                    assert!(message.contains(expect), "{message}")
                }
                other => panic!("{field} {value}: expected a shape error, got {other:?}"),
            }
        }
    }
}
