//! The fast GEMM path of [`QLinear`]-style layers on CUDA: `y = x · wᵀ` and both backward
//! GEMMs (`dx = dy · w`, `dw = dyᵀ · x`) through cuBLASLt, BF16 operands with FP32
//! accumulation, on the device memory burn already holds.
//!
//! How it fits into burn: [`matmul_xwt`] is generic over the backend and finds the CUDA
//! primitives at run time (like [`crate::fake_quant`]). Under `Autodiff` it records one
//! custom operation whose backward runs the two cuBLASLt GEMMs; under fusion each GEMM is a
//! custom operation of the fusion stream, so it runs in stream order with burn's kernels.
//! cudarc shares CubeCL's CUDA context (the device's primary context) and reads the
//! buffers' device addresses from the CubeCL client, with the stream CubeCL orders them on
//! (a field the workspace's patched cubecl-cuda adds, `vendor/cubecl-cuda/PATCHED.md`): each
//! GEMM is enqueued on that stream like a CubeCL kernel, so nothing waits on the host (unless
//! an operand lives in another stream's pool: then it is synchronized).
//! `QATFLOW_GEMM_SYNC=1` instead drains CubeCL's queue before each GEMM and waits for it
//! after, so [`stats`] can time the GEMMs apart from burn's kernels (a profiling mode).
//!
//! The path is opt-in while it is unverified on a GPU: `QATFLOW_GEMM=cublaslt` turns it on.
//! Anything else (no such setting, CPU backends, F32 tensors, mixed dtypes, a machine without
//! cuBLASLt) takes burn's own `matmul`.
//!
//! [`QLinear`]: https://docs.rs/qatflow-model (the `qatflow-model` crate's linear layer)

use std::any::TypeId;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use crate::cublaslt::{self as lt, Lib};
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
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor, TensorMetadata, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use cubecl::cuda::CudaRuntime;
use cudarc::driver::result as drv;
use cudarc::driver::sys as drvs;

use crate::custom::{downcast, upcast, Cube, CubeBf16, FusedRuntime};

/// Environment variable that selects the GEMM path: `burn` forces burn's matmul everywhere.
pub const GEMM_ENV: &str = "QATFLOW_GEMM";

/// Environment variable: `1` synchronizes around every GEMM so [`stats`] times them.
pub const GEMM_SYNC_ENV: &str = "QATFLOW_GEMM_SYNC";

/// True when `QATFLOW_GEMM_SYNC=1` asks for timed, synchronized GEMMs.
pub fn synchronized() -> bool {
    static SYNC: OnceLock<bool> = OnceLock::new();
    *SYNC.get_or_init(|| std::env::var(GEMM_SYNC_ENV).is_ok_and(|v| v == "1"))
}

/// cuBLASLt workspace per device (NVIDIA recommends 32 MiB on Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// A row-major GEMM `C[m, n] = op(A) · op(B)`, `batch` times over contiguous stacks:
/// `A` is stored `[m, k]` (or `[k, m]` when `ta`), `B` is stored `[k, n]` (or `[n, k]`
/// when `tb`); all BF16, FP32 accumulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmShape {
    /// Independent products (1 for a plain GEMM).
    pub batch: usize,
    /// Rows of `C`.
    pub m: usize,
    /// Columns of `C`.
    pub n: usize,
    /// The contracted dimension.
    pub k: usize,
    /// `A` is stored transposed (`[k, m]`).
    pub ta: bool,
    /// `B` is stored transposed (`[n, k]`).
    pub tb: bool,
}

impl GemmShape {
    /// The shape of `op(A) · op(B)` for stored shapes `a` and `b` (both `[r, c]`, or both
    /// `[batch, r, c]`); `None` when the ranks, batches or inner dimensions differ.
    pub fn of(a: &[usize], b: &[usize], ta: bool, tb: bool) -> Option<GemmShape> {
        let (batch, a, b) = match (a, b) {
            ([ra, ca], [rb, cb]) => (1, [*ra, *ca], [*rb, *cb]),
            ([x, ra, ca], [y, rb, cb]) if x == y => (*x, [*ra, *ca], [*rb, *cb]),
            _ => return None,
        };
        let (m, k) = if ta { (a[1], a[0]) } else { (a[0], a[1]) };
        let (kb, n) = if tb { (b[1], b[0]) } else { (b[0], b[1]) };
        (k == kb).then_some(GemmShape {
            batch,
            m,
            n,
            k,
            ta,
            tb,
        })
    }

    /// The output's dimensions (`[m, n]`, or `[batch, m, n]` for rank-3 operands).
    fn out_dims(&self, rank: usize) -> Vec<usize> {
        if rank == 3 {
            vec![self.batch, self.m, self.n]
        } else {
            vec![self.m, self.n]
        }
    }

    /// The cuBLASLt (column-major) problem: `Cᵀ[n, m] = op(B)ᵀ · op(A)ᵀ` with `B` as the
    /// first operand. Returns `(op_first, rows, cols, ld)` of the first operand's stored
    /// layout, the same for the second, and `ld` of the output.
    fn column_major(&self) -> (Operand, Operand, i64) {
        let (m, n, k) = (self.m as u64, self.n as u64, self.k as u64);
        // B stored row-major [k, n] is column-major n×k (ld n): op N. Stored [n, k] is
        // column-major k×n (ld k): op T.
        let first = if self.tb {
            (true, k, n, k as i64)
        } else {
            (false, n, k, n as i64)
        };
        // A stored row-major [m, k] is column-major k×m (ld k): op N. Stored [k, m] is
        // column-major m×k (ld m): op T.
        let second = if self.ta {
            (true, m, k, m as i64)
        } else {
            (false, k, m, k as i64)
        };
        (first, second, n as i64)
    }
}

/// One cuBLASLt operand: transposed, stored rows, stored columns, leading dimension.
type Operand = (bool, u64, u64, i64);

/// cuBLASLt state of one device: the primary context CubeCL also uses, the handle, a
/// workspace per CubeCL stream (GEMMs of one stream run in order, so they can share one)
/// and the plans built so far.
struct Device {
    lib: &'static Lib,
    ctx: drvs::CUcontext,
    handle: lt::Opaque,
    /// By the address of the stream's handle.
    workspaces: HashMap<usize, drvs::CUdeviceptr>,
    /// One per [`GemmShape`] (cuBLASLt's A, B, C: [`GemmShape::column_major`]'s two operands
    /// and the output).
    plans: HashMap<GemmShape, lt::Plan>,
}

// SAFETY: the raw handles are only used under the `DEVICES` mutex, and CUDA driver and
// cuBLASLt handles may be used from any thread once their context is made current.
unsafe impl Send for Device {}

/// Per device index: the state, or why cuBLASLt could not be set up there.
type Devices = HashMap<usize, Result<Device, String>>;

fn devices() -> &'static Mutex<Devices> {
    static DEVICES: OnceLock<Mutex<Devices>> = OnceLock::new();
    DEVICES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Running totals of the cuBLASLt path in this process (all devices).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GemmStats {
    /// GEMMs run through cuBLASLt.
    pub calls: u64,
    /// Seconds the GEMMs took: under `QATFLOW_GEMM_SYNC=1` each timed from its launch to
    /// its completion (the GPU was idle otherwise, so this is their device time plus launch
    /// overhead); otherwise only the host time to enqueue them.
    pub gemm_s: f64,
    /// Seconds spent waiting for CubeCL's queue before the GEMMs (burn's own kernels
    /// that had not finished yet); 0 unless `QATFLOW_GEMM_SYNC=1`.
    pub wait_s: f64,
}

impl GemmStats {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &GemmStats) -> GemmStats {
        GemmStats {
            calls: self.calls - earlier.calls,
            gemm_s: self.gemm_s - earlier.gemm_s,
            wait_s: self.wait_s - earlier.wait_s,
        }
    }
}

static CALLS: AtomicU64 = AtomicU64::new(0);
static GEMM_NS: AtomicU64 = AtomicU64::new(0);
static WAIT_NS: AtomicU64 = AtomicU64::new(0);

/// The totals so far (see [`GemmStats`]).
pub fn stats() -> GemmStats {
    GemmStats {
        calls: CALLS.load(Ordering::Relaxed),
        gemm_s: GEMM_NS.load(Ordering::Relaxed) as f64 * 1e-9,
        wait_s: WAIT_NS.load(Ordering::Relaxed) as f64 * 1e-9,
    }
}

fn add_ns(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// Environment variable: `off` keeps the GEMM outputs instead of recomputing blocks
/// ([`crate::recompute`]).
pub const RECOMPUTE_ENV: &str = "QATFLOW_RECOMPUTE";

/// True on the cuBLASLt path ([`enabled`]) unless `QATFLOW_RECOMPUTE=off`: the GEMMs are then
/// recomputed in backward, and [`crate::recompute::block_input`] keeps each block's input.
pub fn layer_recompute() -> bool {
    enabled() && std::env::var(RECOMPUTE_ENV).map_or(true, |v| v != "off")
}

/// True when `QATFLOW_GEMM=cublaslt` asks for this path. It is opt-in until it has been
/// checked on a GPU against burn's path (correctness, loss curves, speed); without it every
/// GEMM, attention and loss runs through burn as before.
pub fn enabled() -> bool {
    std::env::var(GEMM_ENV).is_ok_and(|v| v == "cublaslt")
}

/// Names the training engine's kernels that stay off (comma-separated: `attention`,
/// `softmax`, `adamw`, `square_sum`, `mean_last`, `rms_norm`), each replaced by the tensor form it
/// stands for: an A/B of one kernel, or a way around one that fails on a new GPU or driver.
pub const KERNELS_OFF_ENV: &str = "QATFLOW_KERNELS_OFF";

/// True when the engine is on ([`enabled`]) and [`KERNELS_OFF_ENV`] does not name `kernel`.
pub fn kernel_on(kernel: &str) -> bool {
    enabled() && std::env::var(KERNELS_OFF_ENV).map_or(true, |off| !names(&off, kernel))
}

/// Whether the comma-separated `list` names `kernel`.
fn names(list: &str, kernel: &str) -> bool {
    list.split(',').any(|k| k.trim() == kernel)
}

/// Sets cuBLASLt up on CUDA device `index` (once) and says whether it can be used; the
/// reason it cannot is kept and returned by [`unavailable_reason`].
pub fn available(index: usize) -> bool {
    let mut devices = devices().lock().unwrap_or_else(|e| e.into_inner());
    devices
        .entry(index)
        .or_insert_with(|| Device::open(index))
        .is_ok()
}

/// Why cuBLASLt could not be set up on device `index` (`None` when it was, or was not
/// tried yet).
pub fn unavailable_reason(index: usize) -> Option<String> {
    let devices = devices().lock().unwrap_or_else(|e| e.into_inner());
    devices.get(&index).and_then(|d| d.as_ref().err().cloned())
}

impl Device {
    fn open(index: usize) -> Result<Device, String> {
        let lib = lt::lib()?;
        // cudarc loads libcuda on first use and panics when it cannot.
        let opened = std::panic::catch_unwind(|| -> Result<Device, String> {
            fn e<'a>(what: &'a str) -> impl Fn(&dyn std::fmt::Debug) -> String + 'a {
                move |err| format!("{what}: {err:?}")
            }
            drv::init().map_err(|x| e("cuInit")(&x))?;
            let dev = drv::device::get(index as i32).map_err(|x| e("cuDeviceGet")(&x))?;
            // SAFETY: `dev` is a valid device; the primary context is retained for the
            // life of the process, as CubeCL does.
            let ctx = unsafe { drv::primary_ctx::retain(dev) }
                .map_err(|x| e("cuDevicePrimaryCtxRetain")(&x))?;
            // SAFETY: `ctx` was just retained.
            unsafe { drv::ctx::set_current(ctx) }.map_err(|x| e("cuCtxSetCurrent")(&x))?;
            let mut handle = std::ptr::null_mut();
            // SAFETY: `handle` is a valid out-pointer.
            lt::check(unsafe { (lib.create)(&mut handle) }, "cublasLtCreate")?;
            Ok(Device {
                lib,
                ctx,
                handle,
                workspaces: HashMap::new(),
                plans: HashMap::new(),
            })
        });
        match opened {
            Ok(r) => r,
            Err(panic) => Err(panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the CUDA driver could not be loaded".to_string())),
        }
    }

    fn plan(&mut self, shape: GemmShape) -> Result<&lt::Plan, String> {
        if !self.plans.contains_key(&shape) {
            let plan = self.build(shape)?;
            self.plans.insert(shape, plan);
        }
        Ok(&self.plans[&shape])
    }

    fn build(&self, shape: GemmShape) -> Result<lt::Plan, String> {
        let lib = self.lib;
        let ((t1, r1, c1, ld1), (t2, r2, c2, ld2), ldc) = shape.column_major();
        let op = |t: bool| if t { lt::OP_T } else { lt::OP_N };
        let mut plan = lt::Plan::new(lib, op(t1), op(t2))?;
        let layout = |rows: u64, cols: u64, ld: i64| -> Result<lt::Opaque, String> {
            let mut l = std::ptr::null_mut();
            // SAFETY: an out-pointer and attribute buffers of the documented types and sizes;
            // the layout is used only after its creation succeeded.
            unsafe {
                lt::check(
                    (lib.layout_create)(&mut l, lt::R_16BF, rows, cols, ld),
                    "cublasLtMatrixLayoutCreate",
                )?;
                if shape.batch > 1 {
                    let count = shape.batch as i32;
                    let stride = (rows * cols) as i64;
                    lt::check(
                        (lib.layout_set)(
                            l,
                            lt::LAYOUT_BATCH_COUNT,
                            &count as *const i32 as *const c_void,
                            size_of::<i32>(),
                        ),
                        "BATCH_COUNT",
                    )?;
                    lt::check(
                        (lib.layout_set)(
                            l,
                            lt::LAYOUT_STRIDED_BATCH_OFFSET,
                            &stride as *const i64 as *const c_void,
                            size_of::<i64>(),
                        ),
                        "STRIDED_BATCH_OFFSET",
                    )?;
                }
            }
            Ok(l)
        };
        plan.a = layout(r1, c1, ld1)?;
        plan.b = layout(r2, c2, ld2)?;
        plan.c = layout(shape.n as u64, shape.m as u64, ldc)?;
        // SAFETY: the descriptor and layouts were just made through `lib`.
        plan.algo = unsafe {
            lt::best_algo(
                lib,
                self.handle,
                plan.desc,
                plan.a,
                plan.b,
                plan.c,
                WORKSPACE_BYTES,
                &format!("{shape:?}"),
            )
        }?;
        Ok(plan)
    }

    /// Enqueues `shape` on device addresses (`a`, `b` as in [`GemmShape`], `c` the output)
    /// on `stream`, CubeCL's stream of those buffers; waits for it when `wait`.
    fn run(
        &mut self,
        shape: GemmShape,
        [a, b, c]: [u64; 3],
        stream: drvs::CUstream,
        wait: bool,
    ) -> Result<(), String> {
        // SAFETY: the context was retained in `open`.
        unsafe { drv::ctx::set_current(self.ctx) }
            .map_err(|x| format!("cuCtxSetCurrent: {x:?}"))?;
        let workspace = match self.workspaces.get(&(stream as usize)) {
            Some(w) => *w,
            None => {
                // SAFETY: a plain device allocation in the current context, kept for the
                // life of the process like the stream it serves.
                let w = unsafe { drv::malloc_sync(WORKSPACE_BYTES) }
                    .map_err(|x| format!("cuMemAlloc (cuBLASLt workspace): {x:?}"))?;
                self.workspaces.insert(stream as usize, w);
                w
            }
        };
        let (lib, handle) = (self.lib, self.handle);
        let plan = self.plan(shape)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the plan's layouts describe exactly the buffers behind `a`, `b`, `c`. Unless
        // `wait`, they belong to CubeCL's pool of `stream`, which orders every later use of
        // that memory after this GEMM, so they may be released once it is enqueued.
        unsafe {
            lt::check(
                (lib.matmul)(
                    handle,
                    plan.desc,
                    &alpha as *const f32 as *const c_void,
                    b as *const c_void,
                    plan.a,
                    a as *const c_void,
                    plan.b,
                    &beta as *const f32 as *const c_void,
                    c as *const c_void,
                    plan.c,
                    c as *mut c_void,
                    plan.c,
                    &plan.algo,
                    workspace as *mut c_void,
                    WORKSPACE_BYTES,
                    stream as *mut c_void,
                ),
                &format!("cublasLtMatmul {shape:?}"),
            )?;
            if wait {
                drv::stream::synchronize(stream)
                    .map_err(|x| format!("cuStreamSynchronize: {x:?}"))?;
            }
            Ok(())
        }
    }
}

/// `op(a) · op(b)` of two BF16 CubeCL tensors (both `[r, c]` or both `[batch, r, c]`,
/// made contiguous) through cuBLASLt, into a new contiguous BF16 tensor `[(batch,) m, n]`.
///
/// Panics when the inner dimensions differ or cuBLASLt fails after [`available`] said yes
/// (both are bugs of the caller or of the driver, not of the input data).
pub fn cube_gemm(
    a: CubeTensor<CudaRuntime>,
    b: CubeTensor<CudaRuntime>,
    ta: bool,
    tb: bool,
) -> CubeTensor<CudaRuntime> {
    let a = burn_cubecl::kernel::into_contiguous(a);
    let b = burn_cubecl::kernel::into_contiguous(b);
    let (da, db) = (a.shape(), b.shape());
    let shape = GemmShape::of(&da, &db, ta, tb).unwrap_or_else(|| {
        panic!("cuBLASLt GEMM: shapes do not multiply: {da:?} (ta={ta}) by {db:?} (tb={tb})")
    });
    let client = a.client.clone();
    let out = CubeTensor::new_contiguous(
        client.clone(),
        a.device.clone(),
        Shape::from(shape.out_dims(da.num_dims())),
        client.empty(shape.batch * shape.m * shape.n * 2),
        DType::BF16,
    );
    assert!(
        shape.m > 0 && shape.n > 0 && shape.k > 0,
        "cuBLASLt GEMM: empty problem {shape:?} (matmul_xwt sends only non-empty ones)"
    );
    let ptr = |h: &cubecl::server::Handle| {
        client
            .get_resource(h.clone())
            .unwrap_or_else(|e| panic!("cuBLASLt GEMM: no device address for a buffer: {e:?}"))
    };
    let (ra, rb, rc) = (ptr(&a.handle), ptr(&b.handle), ptr(&out.handle));
    // The output was allocated on the current stream. When `a` and `b` live in its pool too
    // (qatflow's training runs on one thread, so one stream), stream order is enough: CubeCL
    // orders their producers before and any reuse of their memory after the GEMM. A buffer
    // of another stream's pool could be reused there while the GEMM still reads it, so such
    // a GEMM is synchronized as in `QATFLOW_GEMM_SYNC=1`.
    let stream = rc.resource().stream;
    let sync = synchronized() || ra.resource().stream != stream || rb.resource().stream != stream;
    if sync {
        let waited = Instant::now();
        cubecl::future::block_on(client.sync())
            .unwrap_or_else(|e| panic!("cuBLASLt GEMM: CubeCL sync failed: {e:?}"));
        add_ns(&WAIT_NS, waited);
    }
    let index = a.device.index;
    let mut devices = devices().lock().unwrap_or_else(|e| e.into_inner());
    let device = match devices.entry(index).or_insert_with(|| Device::open(index)) {
        Ok(d) => d,
        Err(why) => panic!("cuBLASLt GEMM on CUDA device {index}: {why}"),
    };
    let started = Instant::now();
    device
        .run(
            shape,
            [ra.resource().ptr, rb.resource().ptr, rc.resource().ptr],
            stream,
            sync,
        )
        .unwrap_or_else(|why| panic!("cuBLASLt GEMM on CUDA device {index}: {why}"));
    add_ns(&GEMM_NS, started);
    CALLS.fetch_add(1, Ordering::Relaxed);
    out
}

/// [`cube_gemm`] as a custom operation of the fusion stream.
fn fused_gemm(
    a: FusionTensor<FusedRuntime>,
    b: FusionTensor<FusedRuntime>,
    ta: bool,
    tb: bool,
) -> FusionTensor<FusedRuntime> {
    let (da, db) = (a.shape.clone(), b.shape.clone());
    let shape = GemmShape::of(&da, &db, ta, tb).unwrap_or_else(|| {
        panic!("cuBLASLt GEMM: shapes do not multiply: {da:?} (ta={ta}) by {db:?} (tb={tb})")
    });
    let client = a.client.clone();
    let streams = OperationStreams::with_inputs([&a, &b]);
    let out = TensorIr::uninit(
        client.create_empty_handle(),
        Shape::from(shape.out_dims(da.num_dims())),
        DType::BF16,
    );
    let desc = CustomOpIr::new("qatflow_cublaslt_gemm", &[a.into_ir(), b.into_ir()], &[out]);
    client
        .register(
            streams,
            OperationIr::Custom(desc.clone()),
            GemmOp { desc, ta, tb },
        )
        .output()
}

/// The fusion stream's record of one GEMM.
#[derive(Debug, Clone)]
struct GemmOp {
    desc: CustomOpIr,
    ta: bool,
    tb: bool,
}

impl Operation<FusedRuntime> for GemmOp {
    fn execute(
        &self,
        handles: &mut HandleContainer<<FusedRuntime as burn_fusion::FusionRuntime>::FusionHandle>,
    ) {
        let ([a, b], [out]) = self.desc.as_fixed();
        let a = handles.get_float_tensor::<Cube>(a);
        let b = handles.get_float_tensor::<Cube>(b);
        handles.register_float_tensor::<Cube>(&out.id, cube_gemm(a, b, self.ta, self.tb));
    }
}

/// A CUDA backend whose primitives [`cube_gemm`] can run on (with or without fusion).
pub trait CudaGemm: Backend {
    /// `op(a) · op(b)` of two BF16 matrices.
    fn gemm(a: FloatTensor<Self>, b: FloatTensor<Self>, ta: bool, tb: bool) -> FloatTensor<Self>;
}

impl CudaGemm for Fusion<Cube> {
    fn gemm(a: FloatTensor<Self>, b: FloatTensor<Self>, ta: bool, tb: bool) -> FloatTensor<Self> {
        fused_gemm(a, b, ta, tb)
    }
}

impl CudaGemm for Fusion<CubeBf16> {
    fn gemm(a: FloatTensor<Self>, b: FloatTensor<Self>, ta: bool, tb: bool) -> FloatTensor<Self> {
        fused_gemm(a, b, ta, tb)
    }
}

impl CudaGemm for Cube {
    fn gemm(a: FloatTensor<Self>, b: FloatTensor<Self>, ta: bool, tb: bool) -> FloatTensor<Self> {
        cube_gemm(a, b, ta, tb)
    }
}

impl CudaGemm for CubeBf16 {
    fn gemm(a: FloatTensor<Self>, b: FloatTensor<Self>, ta: bool, tb: bool) -> FloatTensor<Self> {
        cube_gemm(a, b, ta, tb)
    }
}

/// Backward of `c = op(a) · op(b)`: `dop(a) = dc · op(b)ᵀ`, `dop(b) = op(a)ᵀ · dc`, each
/// one cuBLASLt GEMM on the stored operands.
#[derive(Debug)]
struct GemmBackward;

/// Gradients of `c = op(a) · op(b)` given `dc`, in the stored layouts of `a` and `b`,
/// with `g(x, y, tx, ty) = op(x) · op(y)`: `da` needs `b`, `db` needs `a`.
fn gemm_grads<T: Clone>(
    dc: T,
    a: Option<T>,
    b: Option<T>,
    ta: bool,
    tb: bool,
    g: impl Fn(T, T, bool, bool) -> T,
) -> (Option<T>, Option<T>) {
    // dop(a) = dc · op(b)ᵀ; a stored transposed takes its transpose, op(b) · dcᵀ.
    let da = b.map(|b| {
        if ta {
            g(b, dc.clone(), tb, true)
        } else {
            g(dc.clone(), b, false, !tb)
        }
    });
    // dop(b) = op(a)ᵀ · dc; b stored transposed takes dcᵀ · op(a).
    let db = a.map(|a| {
        if tb {
            g(dc, a, true, ta)
        } else {
            g(a, dc, !ta, false)
        }
    });
    (da, db)
}

impl<I: CudaGemm> Backward<I, 2> for GemmBackward {
    /// The checkpointed `a` (needed for `db`) and `b` (needed for `da`), then `ta`, `tb`.
    type State = (Option<NodeId>, Option<NodeId>, bool, bool);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let (a_id, b_id, ta, tb) = ops.state;
        let a: Option<FloatTensor<I>> = a_id.map(|id| checkpointer.retrieve_node_output(id));
        let b: Option<FloatTensor<I>> = b_id.map(|id| checkpointer.retrieve_node_output(id));
        let dc = grads.consume::<I>(&ops.node);
        let [a_parent, b_parent] = ops.parents;
        let b = a_parent.as_ref().and(b);
        let a = b_parent.as_ref().and(a);
        let (da, db) = gemm_grads(dc, a, b, ta, tb, I::gemm);
        if let (Some(node), Some(da)) = (a_parent, da) {
            grads.register::<I>(node.id, da);
        }
        if let (Some(node), Some(db)) = (b_parent, db) {
            grads.register::<I>(node.id, db);
        }
    }
}

/// Recomputes a GEMM's output from its saved operands in backward.
#[derive(Debug)]
struct RetroGemm<I> {
    a: NodeId,
    b: NodeId,
    ta: bool,
    tb: bool,
    _backend: std::marker::PhantomData<I>,
}

impl<I: CudaGemm> RetroForward for RetroGemm<I> {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let a = states.get_state::<FloatTensor<I>>(&self.a);
        let b = states.get_state::<FloatTensor<I>>(&self.b);
        states.save(out_node, I::gemm(a, b, self.ta, self.tb));
    }
}

/// `op(a) · op(b)` under `Autodiff<I, C>` with the cuBLASLt backward; memory-bound (its
/// output recomputed in backward) unless `QATFLOW_RECOMPUTE=off`.
fn autodiff_gemm<I: CudaGemm, C: CheckpointStrategy>(
    a: FloatTensor<Autodiff<I, C>>,
    b: FloatTensor<Autodiff<I, C>>,
    ta: bool,
    tb: bool,
) -> FloatTensor<Autodiff<I, C>> {
    let (a_tracked, b_tracked) = (a.is_tracked(), b.is_tracked());
    let prep = GemmBackward.prepare::<C>([a.node.clone(), b.node.clone()]);
    let prep = if layer_recompute() {
        let retro = RetroGemm::<I> {
            a: a.node.id,
            b: b.node.id,
            ta,
            tb,
            _backend: std::marker::PhantomData,
        };
        prep.memory_bound().retro_forward(retro).parents([&a, &b])
    } else {
        prep.compute_bound()
    };
    match prep.stateful() {
        OpsKind::Tracked(mut prep) => {
            let a_state = b_tracked.then(|| prep.checkpoint(&a));
            let b_state = a_tracked.then(|| prep.checkpoint(&b));
            let c = I::gemm(a.primitive, b.primitive, ta, tb);
            prep.finish((a_state, b_state, ta, tb), c)
        }
        OpsKind::UnTracked(prep) => prep.finish(I::gemm(a.primitive, b.primitive, ta, tb)),
    }
}

/// The primitives of a GEMM, handed back when the backend is not the one tried.
type Operands<B> = (FloatTensor<B>, FloatTensor<B>);

/// Runs the cuBLASLt GEMM when `B` is `X` (by type identity).
fn when_backend<B: Backend, X: Backend>(
    (a, b): Operands<B>,
    ta: bool,
    tb: bool,
    f: fn(FloatTensor<X>, FloatTensor<X>, bool, bool) -> FloatTensor<X>,
) -> Result<FloatTensor<B>, Operands<B>> {
    if TypeId::of::<B>() != TypeId::of::<X>() {
        return Err((a, b));
    }
    let a = downcast::<_, FloatTensor<X>>(a).unwrap_or_else(|_| unreachable!("B is X"));
    let b = downcast::<_, FloatTensor<X>>(b).unwrap_or_else(|_| unreachable!("B is X"));
    Ok(upcast(f(a, b, ta, tb)))
}

/// The CUDA device index of a burn device, when it is one.
pub fn cuda_index<B: Backend>(device: &B::Device) -> Option<usize> {
    let any: &dyn std::any::Any = device;
    any.downcast_ref::<cubecl::cuda::CudaDevice>()
        .map(|d| d.index)
}

/// `op(a) · op(b)` on the cuBLASLt path when it applies (see the module docs), else burn's
/// `matmul` on transposed views.
fn gemm<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
    ta: bool,
    tb: bool,
) -> Tensor<B, D> {
    let nonempty = a.dims().iter().chain(b.dims().iter()).all(|&d| d > 0);
    let fast = enabled()
        && nonempty
        && a.dtype() == DType::BF16
        && b.dtype() == DType::BF16
        && cuda_index::<B>(&a.device()).is_some_and(available);
    let burn_path = |a: Tensor<B, D>, b: Tensor<B, D>| {
        let a = if ta { a.swap_dims(D - 2, D - 1) } else { a };
        let b = if tb { b.swap_dims(D - 2, D - 1) } else { b };
        a.matmul(b)
    };
    if !fast {
        return burn_path(a, b);
    }
    let ops = (a.into_primitive().tensor(), b.into_primitive().tensor());
    type Ad<I, C> = Autodiff<Fusion<I>, C>;
    let r = when_backend::<B, Ad<Cube, BalancedCheckpointing>>(
        ops,
        ta,
        tb,
        autodiff_gemm::<Fusion<Cube>, BalancedCheckpointing>,
    )
    .or_else(|o| {
        when_backend::<B, Ad<Cube, NoCheckpointing>>(
            o,
            ta,
            tb,
            autodiff_gemm::<Fusion<Cube>, NoCheckpointing>,
        )
    })
    .or_else(|o| {
        when_backend::<B, Ad<CubeBf16, BalancedCheckpointing>>(
            o,
            ta,
            tb,
            autodiff_gemm::<Fusion<CubeBf16>, BalancedCheckpointing>,
        )
    })
    .or_else(|o| {
        when_backend::<B, Ad<CubeBf16, NoCheckpointing>>(
            o,
            ta,
            tb,
            autodiff_gemm::<Fusion<CubeBf16>, NoCheckpointing>,
        )
    })
    .or_else(|o| when_backend::<B, Fusion<Cube>>(o, ta, tb, fused_gemm))
    .or_else(|o| when_backend::<B, Fusion<CubeBf16>>(o, ta, tb, fused_gemm))
    .or_else(|o| when_backend::<B, Cube>(o, ta, tb, cube_gemm))
    .or_else(|o| when_backend::<B, CubeBf16>(o, ta, tb, cube_gemm));
    match r {
        Ok(c) => Tensor::from_primitive(TensorPrimitive::Float(c)),
        Err((a, b)) => burn_path(
            Tensor::from_primitive(TensorPrimitive::Float(a)),
            Tensor::from_primitive(TensorPrimitive::Float(b)),
        ),
    }
}

/// `x · wᵀ` for `x` `[rows, in]` and `w` `[out, in]`: through cuBLASLt (forward and, under
/// autodiff, both backward GEMMs) when both are BF16 on a CUDA backend qatflow runs on and
/// cuBLASLt loads; through burn's `matmul` otherwise (same function, other summation order).
pub fn matmul_xwt<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    gemm(x, w, false, true)
}

/// Batched `op(a) · op(b)` over the first dimension (`[batch, r, c]` each; `ta`/`tb`
/// transpose the last two dimensions), on the same paths as [`matmul_xwt`].
pub fn bmm<B: Backend>(a: Tensor<B, 3>, b: Tensor<B, 3>, ta: bool, tb: bool) -> Tensor<B, 3> {
    gemm(a, b, ta, tb)
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_off_list_names_kernels_exactly() {
        assert!(super::names("adamw", "adamw"));
        assert!(super::names("softmax, adamw", "adamw"));
        assert!(!super::names("adamw_x,softmax", "adamw"));
        assert!(!super::names("", "adamw"));
    }

    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    #[test]
    fn shapes_follow_the_stored_layouts() {
        let s = GemmShape::of(&[8, 4], &[6, 4], false, true).unwrap();
        assert_eq!((s.batch, s.m, s.n, s.k), (1, 8, 6, 4));
        let s = GemmShape::of(&[8, 6], &[6, 4], false, false).unwrap();
        assert_eq!((s.m, s.n, s.k), (8, 4, 6));
        let s = GemmShape::of(&[8, 6], &[8, 4], true, false).unwrap();
        assert_eq!((s.m, s.n, s.k), (6, 4, 8));
        let s = GemmShape::of(&[3, 8, 6], &[3, 4, 6], false, true).unwrap();
        assert_eq!((s.batch, s.m, s.n, s.k), (3, 8, 4, 6));
        assert_eq!(s.out_dims(3), vec![3, 8, 4]);
        assert!(GemmShape::of(&[8, 6], &[5, 4], false, false).is_none());
        assert!(GemmShape::of(&[2, 8, 6], &[3, 6, 4], false, false).is_none());
        assert!(GemmShape::of(&[8, 6], &[1, 6, 4], false, false).is_none());
    }

    /// The column-major problem, multiplied out on the CPU, is the row-major product.
    #[test]
    fn column_major_translation_computes_the_row_major_product() {
        let (m, n, k) = (3usize, 5usize, 4usize);
        let a_rm: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.7).sin()).collect();
        let b_rm: Vec<f64> = (0..k * n).map(|i| (i as f64 * 1.3).cos()).collect();
        let want: Vec<f64> = (0..m * n)
            .map(|i| {
                (0..k)
                    .map(|p| a_rm[i / n * k + p] * b_rm[p * n + i % n])
                    .sum()
            })
            .collect();
        let transpose = |v: &[f64], r: usize, c: usize| -> Vec<f64> {
            (0..r * c).map(|i| v[(i % r) * c + i / r]).collect()
        };
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = if ta {
                transpose(&a_rm, m, k)
            } else {
                a_rm.clone()
            };
            let b = if tb {
                transpose(&b_rm, k, n)
            } else {
                b_rm.clone()
            };
            let sa = if ta { [k, m] } else { [m, k] };
            let sb = if tb { [n, k] } else { [k, n] };
            let shape = GemmShape::of(&sa, &sb, ta, tb).unwrap();
            let ((t1, r1, c1, ld1), (t2, r2, c2, ld2), ldc) = shape.column_major();
            // Column-major element (i, j) of a stored rows×cols matrix with leading dim ld.
            let at = |v: &[f64], t: bool, r: u64, c: u64, ld: i64, i: usize, j: usize| {
                let (i, j) = if t { (j, i) } else { (i, j) };
                assert!((i as u64) < r && (j as u64) < c);
                v[j * ld as usize + i]
            };
            let mut got = vec![0.0; m * n];
            // D (n×m, column-major, ld n) = op(first) (n×k) · op(second) (k×m).
            for i in 0..n {
                for j in 0..m {
                    let s: f64 = (0..k)
                        .map(|p| at(&b, t1, r1, c1, ld1, i, p) * at(&a, t2, r2, c2, ld2, p, j))
                        .sum();
                    got[j * ldc as usize + i] = s;
                }
            }
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-12, "ta={ta} tb={tb}: {g} vs {w}");
            }
        }
    }

    /// The backward formulas give autodiff's gradients for every transpose combination.
    #[test]
    fn gradient_formulas_match_autodiff() {
        type A = burn::backend::Autodiff<Flex>;
        let t = |shape: [usize; 3], seed: usize| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| (((i + seed) * 37 % 23) as f32 - 11.0) / 8.0)
                .collect();
            Tensor::<Flex, 3>::from_data(TensorData::new(v, shape), &Default::default())
        };
        let (bt, m, k, n) = (2, 3, 4, 5);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = t(if ta { [bt, k, m] } else { [bt, m, k] }, 1);
            let b = t(if tb { [bt, n, k] } else { [bt, k, n] }, 7);
            let dc = t([bt, m, n], 3);
            let g = |x: Tensor<Flex, 3>, y: Tensor<Flex, 3>, tx: bool, ty: bool| {
                let x = if tx { x.swap_dims(1, 2) } else { x };
                let y = if ty { y.swap_dims(1, 2) } else { y };
                x.matmul(y)
            };
            let (da, db) = gemm_grads(dc.clone(), Some(a.clone()), Some(b.clone()), ta, tb, g);
            let ad = |x: &Tensor<Flex, 3>| Tensor::<A, 3>::from_inner(x.clone()).require_grad();
            let (aa, bb) = (ad(&a), ad(&b));
            let c = bmm(aa.clone(), bb.clone(), ta, tb);
            let grads = (c * Tensor::<A, 3>::from_inner(dc)).sum().backward();
            let close = |x: Tensor<Flex, 3>, y: Tensor<Flex, 3>| {
                let (x, y) = (
                    x.into_data().to_vec::<f32>().unwrap(),
                    y.into_data().to_vec::<f32>().unwrap(),
                );
                assert_eq!(x.len(), y.len());
                for (p, q) in x.iter().zip(&y) {
                    assert!((p - q).abs() < 1e-4, "ta={ta} tb={tb}: {p} vs {q}");
                }
            };
            close(da.unwrap(), aa.grad(&grads).unwrap());
            close(db.unwrap(), bb.grad(&grads).unwrap());
        }
    }

    #[test]
    fn off_cuda_it_is_burns_matmul() {
        let x = Tensor::<Flex, 2>::from_data(
            TensorData::new((0..12).map(|i| i as f32).collect::<Vec<_>>(), [3, 4]),
            &Default::default(),
        );
        let w = Tensor::<Flex, 2>::from_data(
            TensorData::new((0..8).map(|i| (i as f32) - 3.0).collect::<Vec<_>>(), [2, 4]),
            &Default::default(),
        );
        let got = matmul_xwt(x.clone(), w.clone()).into_data();
        let want = x.matmul(w.transpose()).into_data();
        assert_eq!(got, want);
    }
}
