//! The CUDA decoder's many-row projections through cuBLASLt: `Y[n, o] (+)= X[n, k] · W[o, k]ᵀ`
//! with BF16 operands (tensor cores) or float32 operands, float32 accumulation and a float32
//! output that may be a column range of a wider matrix. One plan per shape, built on first use.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::driver::{CudaSlice, CudaStream};
use qatflow_kernels::cublaslt::{self as lt, Lib};

use super::{dptr, CudaDecoderError};

/// cuBLASLt workspace (NVIDIA recommends 32 MiB on Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// One projection's shape: `n` input rows of `k` features, `out` output features written
/// with row stride `y_ld`, operands BF16 or float32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Shape {
    pub n: usize,
    pub k: usize,
    pub out: usize,
    pub y_ld: usize,
    pub f32_operands: bool,
}

/// cuBLASLt on the decoder's stream.
pub(super) struct Blas {
    lib: &'static Lib,
    handle: lt::Opaque,
    workspace: CudaSlice<u8>,
    /// One per shape: A the weight, B the input rows, C the output.
    plans: Mutex<HashMap<Shape, lt::Plan>>,
}

// SAFETY: the handle and descriptors are used only under the decoder's scratch lock (one
// forward at a time) and with the decoder's context bound to the calling thread.
unsafe impl Send for Blas {}
// SAFETY: as above.
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // The plans' descriptors first, then the handle they were used with.
        self.plans
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        // SAFETY: `handle` was made by `lib` in `Blas::new` and is destroyed once, here.
        unsafe { (self.lib.destroy)(self.handle) };
    }
}

fn check(status: lt::Status, what: &str) -> Result<(), CudaDecoderError> {
    lt::check(status, what).map_err(CudaDecoderError::Cuda)
}

impl Blas {
    /// Loads cuBLASLt and makes a handle and workspace on `stream`'s device.
    pub fn new(stream: &std::sync::Arc<CudaStream>) -> Result<Blas, CudaDecoderError> {
        let lib = lt::lib().map_err(CudaDecoderError::Cuda)?;
        let mut handle = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer.
        check(unsafe { (lib.create)(&mut handle) }, "cublasLtCreate")?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(|e| CudaDecoderError::Cuda(format!("cuBLASLt workspace: {e}")))?;
        Ok(Blas {
            lib,
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
        })
    }

    fn build(&self, s: Shape) -> Result<lt::Plan, CudaDecoderError> {
        let lib = self.lib;
        let dtype = if s.f32_operands {
            lt::R_32F
        } else {
            lt::R_16BF
        };
        // Column-major: Yᵀ[out, n] = op_T(W stored k×out) · op_N(X stored k×n).
        let mut plan = lt::Plan::new(lib, lt::OP_T, lt::OP_N).map_err(CudaDecoderError::Cuda)?;
        let layout = |dtype, rows: usize, cols: usize, ld: usize| {
            let mut l = std::ptr::null_mut();
            // SAFETY: a valid out-pointer and plain integer arguments.
            check(
                unsafe { (lib.layout_create)(&mut l, dtype, rows as u64, cols as u64, ld as i64) },
                "cublasLtMatrixLayoutCreate",
            )
            .map(|()| l)
        };
        plan.a = layout(dtype, s.k, s.out, s.k)?;
        plan.b = layout(dtype, s.k, s.n, s.k)?;
        plan.c = layout(lt::R_32F, s.out, s.n, s.y_ld)?;
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
                &format!("{s:?}"),
            )
        }
        .map_err(CudaDecoderError::Cuda)?;
        Ok(plan)
    }

    /// Enqueues `y (= or +=) x · wᵀ` on `stream` (device addresses; `accumulate` adds to
    /// what `y` holds).
    pub fn gemm(
        &self,
        stream: &std::sync::Arc<CudaStream>,
        s: Shape,
        w: u64,
        x: u64,
        y: u64,
        accumulate: bool,
    ) -> Result<(), CudaDecoderError> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let plan = match plans.entry(s) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.build(s)?),
        };
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        let workspace = dptr(&self.workspace, stream);
        // SAFETY: the plan's layouts describe the buffers behind `w`, `x` and `y`, which the
        // decoder keeps alive until the stream has run the product.
        check(
            unsafe {
                (self.lib.matmul)(
                    self.handle,
                    plan.desc,
                    &alpha as *const f32 as *const c_void,
                    w as *const c_void,
                    plan.a,
                    x as *const c_void,
                    plan.b,
                    &beta as *const f32 as *const c_void,
                    y as *const c_void,
                    plan.c,
                    y as *mut c_void,
                    plan.c,
                    &plan.algo,
                    workspace as *mut c_void,
                    WORKSPACE_BYTES,
                    stream.cu_stream() as *mut c_void,
                )
            },
            "cublasLtMatmul",
        )
    }
}
