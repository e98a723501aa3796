//! The input hook of [`QLinear`](super::QLinear): the one way code outside the layer sees
//! every linear's input. It owns the per-thread observer that
//! [`QLinear::forward`](super::QLinear::forward) feeds; ModelOpt's max calibration
//! (`crate::run::calib`) installs it for one pass and reads the amaxes back.
//!
//! Outside an installed [`InputAmaxHook`] an observation is one read of a thread-local flag;
//! inside, the input's amax is folded into the running maximum of the calling thread's
//! observer (an [`AmaxCalibrator`] per linear, keyed by its Hugging Face module name). The
//! maxima stay on the device until [`InputAmaxHook::finish`] reads them back, so a pass on a
//! GPU never waits for the host between layers.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use qatflow_nvfp4::fake_quant::AmaxCalibrator;
use qatflow_nvfp4::keys::{key, INPUT_QUANTIZER};

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    static OBSERVED: RefCell<Observed> = RefCell::new(Observed::default());
}

/// One linear's calibrator with its backend erased (the thread-local cannot be generic).
trait Pending {
    fn as_any(&mut self) -> &mut dyn Any;
    fn amax(&self, name: &str) -> Result<f32, qatflow_nvfp4::Error>;
}

impl<B: Backend> Pending for AmaxCalibrator<B> {
    fn as_any(&mut self) -> &mut dyn Any {
        self
    }

    fn amax(&self, name: &str) -> Result<f32, qatflow_nvfp4::Error> {
        AmaxCalibrator::amax(self, &key(name, INPUT_QUANTIZER))
    }
}

#[derive(Default)]
struct Observed {
    amax: BTreeMap<String, Box<dyn Pending>>,
}

/// Records `max|x|` of the input of linear `name` when an [`InputAmaxHook`] is installed
/// on this thread; otherwise does nothing (one thread-local flag read).
#[inline]
pub(super) fn observe_input<B: Backend, const D: usize>(name: &str, x: &Tensor<B, D>) {
    if ACTIVE.with(Cell::get) {
        record(name, x);
    }
}

#[cold]
fn record<B: Backend, const D: usize>(name: &str, x: &Tensor<B, D>) {
    OBSERVED.with(|o| {
        let mut o = o.borrow_mut();
        let pending = o
            .amax
            .entry(name.to_owned())
            .or_insert_with(|| Box::new(AmaxCalibrator::<B>::new()));
        pending
            .as_any()
            .downcast_mut::<AmaxCalibrator<B>>()
            .expect("one calibration pass runs one backend")
            .observe(x);
    });
}

/// The input observer of every [`QLinear`](super::QLinear) forward on this thread, on for
/// the hook's lifetime and off (cleared) when dropped, also on panic.
pub struct InputAmaxHook(());

impl InputAmaxHook {
    /// Installs the hook on this thread with nothing observed; `None` when one is already
    /// installed here.
    pub fn install() -> Option<Self> {
        if ACTIVE.with(Cell::get) {
            return None;
        }
        OBSERVED.with(|o| *o.borrow_mut() = Observed::default());
        ACTIVE.with(|a| a.set(true));
        Some(InputAmaxHook(()))
    }

    /// Removes the hook and returns, per linear (Hugging Face module name), the largest
    /// `|x|` its input reached, or the first NaN/infinite activation's error.
    pub fn finish(self) -> Result<BTreeMap<String, f32>, qatflow_nvfp4::Error> {
        let observed = OBSERVED.with(|o| std::mem::take(&mut *o.borrow_mut()));
        observed
            .amax
            .into_iter()
            .map(|(name, c)| c.amax(&name).map(|amax| (name, amax)))
            .collect()
    }
}

impl Drop for InputAmaxHook {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(false));
        OBSERVED.with(|o| *o.borrow_mut() = Observed::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    #[test]
    fn observer_is_off_outside_a_hook_and_cleared_after_one() {
        let x = Tensor::<Flex, 2>::from_data(
            TensorData::new(vec![1.0f32, -4.0], [1, 2]),
            &Default::default(),
        );
        observe_input("a", &x);
        assert!(OBSERVED.with(|o| o.borrow().amax.is_empty()));
        let hook = InputAmaxHook::install().unwrap();
        assert!(InputAmaxHook::install().is_none());
        observe_input("a", &x);
        observe_input("a", &(x.clone() * 0.5));
        let got = hook.finish().unwrap();
        assert_eq!(got["a"], 4.0);
        assert!(!ACTIVE.with(Cell::get));
        observe_input("a", &x);
        assert!(OBSERVED.with(|o| o.borrow().amax.is_empty()));
    }
}
