//! Where a training step's time goes, phase by phase, for `bench-train`'s breakdown.
//!
//! With `QATFLOW_PHASE_TIMES=1` each of the engine's operations — attention, RMSNorm, NVFP4
//! fake quantization, the LM-head loss, Qwen3.5's gated delta rule — drains the device queue
//! before it starts and after it ends (`Backend::sync`) and adds the wall time between to its
//! phase, in forward, in backward and in backward's recompute. The syncs serialize the step, so
//! such a step is slower than an unprofiled one; the phases are the step's shares under that
//! serialization (the attention's includes its GEMMs, which `QATFLOW_GEMM_SYNC=1` times apart).
//! Without the variable a phase costs one cached flag read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use burn::tensor::backend::Backend;

/// The variable that turns the phase timer on (`1`).
pub const PHASE_TIMES_ENV: &str = "QATFLOW_PHASE_TIMES";

/// A timed phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Training attention (`crate::attention`), its GEMMs included.
    Attention,
    /// RMSNorm (`crate::norm`).
    Norm,
    /// NVFP4 fake quantization of weights and inputs (`crate::fake_quant`).
    FakeQuant,
    /// The LM head and cross-entropy (`crate::loss`), its GEMMs included.
    Loss,
    /// Qwen3.5's fused gated delta rule (`crate::deltanet`).
    DeltaRule,
}

/// Nanoseconds so far, by phase.
static NANOS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];

/// Whether the timer is on (read once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var(PHASE_TIMES_ENV).is_ok_and(|v| v == "1"))
}

/// Runs `f` as part of `phase` on `device`: timed between two syncs when the timer is on.
pub fn timed<B: Backend, T>(phase: Phase, device: &B::Device, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    // A failed sync surfaces at the next read of a result; the timer only loses accuracy.
    let _ = B::sync(device);
    let started = Instant::now();
    let out = f();
    let _ = B::sync(device);
    NANOS[phase as usize].fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

/// Seconds per phase since the last call, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTimes {
    /// [`Phase::Attention`].
    pub attention_s: f64,
    /// [`Phase::Norm`].
    pub norm_s: f64,
    /// [`Phase::FakeQuant`].
    pub fake_quant_s: f64,
    /// [`Phase::Loss`].
    pub loss_s: f64,
    /// [`Phase::DeltaRule`].
    pub delta_rule_s: f64,
}

/// The phases' times since the last call (all zero with the timer off), and a fresh start.
pub fn take() -> PhaseTimes {
    let s = |p: Phase| NANOS[p as usize].swap(0, Ordering::Relaxed) as f64 * 1e-9;
    PhaseTimes {
        attention_s: s(Phase::Attention),
        norm_s: s(Phase::Norm),
        fake_quant_s: s(Phase::FakeQuant),
        loss_s: s(Phase::Loss),
        delta_rule_s: s(Phase::DeltaRule),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_variable_phases_run_untimed() {
        assert!(!enabled(), "tests run without {PHASE_TIMES_ENV}");
        let v = timed::<burn::backend::Flex, _>(Phase::Norm, &Default::default(), || 7);
        assert_eq!(v, 7);
        assert_eq!(take(), PhaseTimes::default());
    }
}
