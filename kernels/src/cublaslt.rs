//! The few cuBLASLt entry points the GEMM path needs, loaded at run time from
//! `libcublasLt.so` (or its versioned names 13, 12, 11), so building needs no
//! CUDA toolkit and a machine without cuBLASLt only loses the fast path. Types and
//! constants are those of `cublasLt.h` (CUDA 12 and 13 agree on all of them).

use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

/// `cublasLtHandle_t` and the descriptor handles: opaque pointers.
pub type Opaque = *mut c_void;
/// `cublasStatus_t`.
pub type Status = c_int;

/// `CUBLAS_COMPUTE_32F`.
pub const COMPUTE_32F: c_int = 68;
/// `CUDA_R_32F`.
pub const R_32F: c_int = 0;
/// `CUDA_R_16BF`.
pub const R_16BF: c_int = 14;
/// `CUBLAS_OP_N`.
pub const OP_N: c_int = 0;
/// `CUBLAS_OP_T`.
pub const OP_T: c_int = 1;
/// `CUBLASLT_MATMUL_DESC_TRANSA`.
pub const DESC_TRANSA: c_int = 3;
/// `CUBLASLT_MATMUL_DESC_TRANSB`.
pub const DESC_TRANSB: c_int = 4;
/// `CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT` (int32).
pub const LAYOUT_BATCH_COUNT: c_int = 5;
/// `CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET` (int64).
pub const LAYOUT_STRIDED_BATCH_OFFSET: c_int = 6;
/// `CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES` (uint64).
pub const PREF_MAX_WORKSPACE_BYTES: c_int = 1;

/// `cublasLtMatmulAlgo_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Algo {
    /// Opaque algorithm data.
    pub data: [u64; 8],
}

/// `cublasLtMatmulHeuristicResult_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Heuristic {
    /// The algorithm.
    pub algo: Algo,
    /// Workspace it needs.
    pub workspace_size: usize,
    /// `CUBLAS_STATUS_SUCCESS` (0) when usable.
    pub state: Status,
    /// Waves count.
    pub waves_count: f32,
    /// Reserved.
    pub reserved: [c_int; 4],
}

/// The loaded entry points.
#[allow(missing_docs)]
pub struct Lib {
    _lib: libloading::Library,
    pub create: unsafe extern "C" fn(*mut Opaque) -> Status,
    pub destroy: unsafe extern "C" fn(Opaque) -> Status,
    pub desc_create: unsafe extern "C" fn(*mut Opaque, c_int, c_int) -> Status,
    pub desc_set: unsafe extern "C" fn(Opaque, c_int, *const c_void, usize) -> Status,
    pub desc_destroy: unsafe extern "C" fn(Opaque) -> Status,
    pub layout_create: unsafe extern "C" fn(*mut Opaque, c_int, u64, u64, i64) -> Status,
    pub layout_set: unsafe extern "C" fn(Opaque, c_int, *const c_void, usize) -> Status,
    pub layout_destroy: unsafe extern "C" fn(Opaque) -> Status,
    pub pref_create: unsafe extern "C" fn(*mut Opaque) -> Status,
    pub pref_set: unsafe extern "C" fn(Opaque, c_int, *const c_void, usize) -> Status,
    pub pref_destroy: unsafe extern "C" fn(Opaque) -> Status,
    #[allow(clippy::type_complexity)]
    pub heuristic: unsafe extern "C" fn(
        Opaque,
        Opaque,
        Opaque,
        Opaque,
        Opaque,
        Opaque,
        Opaque,
        c_int,
        *mut Heuristic,
        *mut c_int,
    ) -> Status,
    #[allow(clippy::type_complexity)]
    pub matmul: unsafe extern "C" fn(
        Opaque,
        Opaque,
        *const c_void,
        *const c_void,
        Opaque,
        *const c_void,
        Opaque,
        *const c_void,
        *const c_void,
        Opaque,
        *mut c_void,
        Opaque,
        *const Algo,
        *mut c_void,
        usize,
        *mut c_void,
    ) -> Status,
}

// SAFETY: the library handle and function pointers are immutable after loading.
unsafe impl Send for Lib {}
// SAFETY: as above.
unsafe impl Sync for Lib {}

impl Lib {
    fn open() -> Result<Lib, String> {
        let names = [
            "libcublasLt.so",
            "libcublasLt.so.13",
            "libcublasLt.so.12",
            "libcublasLt.so.11",
        ];
        let mut last = String::new();
        for name in names {
            // SAFETY: loading cuBLASLt runs only its own initializers.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => return Self::resolve(lib),
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!(
            "libcublasLt not found (tried {} names, last error: {last}); put the CUDA \
             libraries' directory on LD_LIBRARY_PATH, or unset QATFLOW_GEMM",
            names.len()
        ))
    }

    fn resolve(lib: libloading::Library) -> Result<Lib, String> {
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol has the signature of the field it is stored in, as
                // declared by cublasLt.h.
                *unsafe { lib.get($name) }.map_err(|e| {
                    format!("libcublasLt lacks {}: {e}", String::from_utf8_lossy($name))
                })?
            };
        }
        Ok(Lib {
            create: sym!(b"cublasLtCreate"),
            destroy: sym!(b"cublasLtDestroy"),
            desc_create: sym!(b"cublasLtMatmulDescCreate"),
            desc_set: sym!(b"cublasLtMatmulDescSetAttribute"),
            desc_destroy: sym!(b"cublasLtMatmulDescDestroy"),
            layout_create: sym!(b"cublasLtMatrixLayoutCreate"),
            layout_set: sym!(b"cublasLtMatrixLayoutSetAttribute"),
            layout_destroy: sym!(b"cublasLtMatrixLayoutDestroy"),
            pref_create: sym!(b"cublasLtMatmulPreferenceCreate"),
            pref_set: sym!(b"cublasLtMatmulPreferenceSetAttribute"),
            pref_destroy: sym!(b"cublasLtMatmulPreferenceDestroy"),
            heuristic: sym!(b"cublasLtMatmulAlgoGetHeuristic"),
            matmul: sym!(b"cublasLtMatmul"),
            _lib: lib,
        })
    }
}

/// A matmul descriptor (float32 compute and scaling, the given transposes of A and B), the
/// layouts of A, B and C (= D), and the algorithm chosen for them. Dropping it destroys the
/// descriptor and the layouts it holds, also those of a plan an error left half-built; a
/// plan must outlive the products that use it.
pub struct Plan {
    lib: &'static Lib,
    /// The matmul descriptor.
    pub desc: Opaque,
    /// Layout of A.
    pub a: Opaque,
    /// Layout of B.
    pub b: Opaque,
    /// Layout of C and D.
    pub c: Opaque,
    /// The algorithm (from [`best_algo`]).
    pub algo: Algo,
}

impl Plan {
    /// A plan with its descriptor made (`op_a`, `op_b`: [`OP_N`] or [`OP_T`]); the caller
    /// makes the layouts with `lib.layout_create` into `a`, `b`, `c` and sets `algo`.
    pub fn new(lib: &'static Lib, op_a: c_int, op_b: c_int) -> Result<Plan, String> {
        let mut plan = Plan {
            lib,
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algo: Algo::default(),
        };
        // SAFETY: an out-pointer and attribute buffers of the documented types and sizes;
        // the descriptor is used only after its creation succeeded.
        unsafe {
            check(
                (lib.desc_create)(&mut plan.desc, COMPUTE_32F, R_32F),
                "cublasLtMatmulDescCreate",
            )?;
            let op_a = &op_a as *const c_int as *const c_void;
            check((lib.desc_set)(plan.desc, DESC_TRANSA, op_a, 4), "TRANSA")?;
            let op_b = &op_b as *const c_int as *const c_void;
            check((lib.desc_set)(plan.desc, DESC_TRANSB, op_b, 4), "TRANSB")?;
        }
        Ok(plan)
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each non-null handle was made by `lib` and is destroyed once, here.
        unsafe {
            if !self.desc.is_null() {
                (self.lib.desc_destroy)(self.desc);
            }
            for layout in [self.a, self.b, self.c] {
                if !layout.is_null() {
                    (self.lib.layout_destroy)(layout);
                }
            }
        }
    }
}

/// cuBLASLt, loaded on first use (the error says why it could not be).
pub fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(Lib::open).as_ref().map_err(Clone::clone)
}

/// `Ok` for `CUBLAS_STATUS_SUCCESS`, else an error naming the call.
pub fn check(status: Status, what: &str) -> Result<(), String> {
    if status == 0 {
        Ok(())
    } else {
        Err(format!("{what} failed with cuBLAS status {status}"))
    }
}

/// The algorithm cuBLASLt's heuristic ranks first for `desc` over the layouts `a`, `b` and
/// `out` (C and D alike) within `workspace` bytes; `what` names the problem in the error.
///
/// # Safety
/// `handle`, `desc` and the layouts must be live cuBLASLt objects made through `lib`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn best_algo(
    lib: &Lib,
    handle: Opaque,
    desc: Opaque,
    a: Opaque,
    b: Opaque,
    out: Opaque,
    workspace: usize,
    what: &str,
) -> Result<Algo, String> {
    let ws = workspace as u64;
    let mut heuristic = Heuristic::default();
    let mut found = 0;
    let mut pref = std::ptr::null_mut();
    // SAFETY: out-pointers and an attribute buffer of the documented type and size; the
    // caller vouches for the handle, descriptor and layouts; the preference is destroyed
    // after use.
    unsafe {
        check(
            (lib.pref_create)(&mut pref),
            "cublasLtMatmulPreferenceCreate",
        )?;
        let set = (lib.pref_set)(
            pref,
            PREF_MAX_WORKSPACE_BYTES,
            &ws as *const u64 as *const c_void,
            size_of::<u64>(),
        );
        let got = (lib.heuristic)(
            handle,
            desc,
            a,
            b,
            out,
            out,
            pref,
            1,
            &mut heuristic,
            &mut found,
        );
        (lib.pref_destroy)(pref);
        check(set, "MAX_WORKSPACE_BYTES")?;
        check(got, "cublasLtMatmulAlgoGetHeuristic")?;
    }
    if found == 0 || heuristic.state != 0 {
        return Err(format!(
            "cuBLASLt has no algorithm for {what} (state {})",
            heuristic.state
        ));
    }
    Ok(heuristic.algo)
}
