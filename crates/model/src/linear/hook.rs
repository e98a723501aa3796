//! The input hook of [`QLinear`](super::QLinear): the one way code outside the layer sees
//! every linear's input. It owns the per-thread observer that
//! [`QLinear::forward`](super::QLinear::forward) feeds; ModelOpt's max calibration
//! (`crate::run::calib`) installs it for one pass and reads the amaxes back.
//!
//! Outside an installed [`InputAmaxHook`] an observation is one read of a thread-local flag;
//! inside, the input's amax is folded into the running maximum of the calling thread's
//! observer (an [`AmaxCalibrator`] per linear, keyed by its Hugging Face module name). The
//! maxima stay on the device until [`InputAmaxHook::finish`] reads them back, so a pass on a
//! GPU never waits for the host between layers. A pass over right-padded sequences names
//! its padding positions ([`InputAmaxHook::set_padding`]); they are left out of every maximum.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};
use qatflow_nvfp4::fake_quant::AmaxCalibrator;
use qatflow_nvfp4::keys::{key, INPUT_QUANTIZER};

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    static OBSERVED: RefCell<Observed> = RefCell::new(Observed::default());
    /// The padding positions of the pass running now: a `Tensor<B, 3, Bool>` `[batch, seq,
    /// 1]`, true at padding.
    static PADDING: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
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
    let padded = PADDING.with(|p| {
        let p = p.borrow();
        let mask = p
            .as_ref()?
            .downcast_ref::<Tensor<B, 3, Bool>>()
            .expect("the calibration padding was set on the backend the pass runs on");
        let [batch, seq, _] = mask.dims();
        let dims = x.dims();
        assert!(
            D == 3 && dims[0] == batch && dims[1] == seq,
            "calibration over padded sequences: the input of `{name}` has shape {dims:?}, not \
             [{batch}, {seq}, features]"
        );
        let x = x.clone().reshape([batch, seq, dims[2]]);
        Some(x.clone().mask_fill(mask.clone().expand(x.shape()), 0.0))
    });
    OBSERVED.with(|o| {
        let mut o = o.borrow_mut();
        let pending = o
            .amax
            .entry(name.to_owned())
            .or_insert_with(|| Box::new(AmaxCalibrator::<B>::new()))
            .as_any()
            .downcast_mut::<AmaxCalibrator<B>>()
            .expect("one calibration pass runs one backend");
        match &padded {
            Some(x) => pending.observe(x),
            None => pending.observe(x),
        }
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

    /// Names the padding positions of the passes that follow (`[batch, seq]`, true at
    /// padding): their inputs are left out of every linear's maximum. `None` clears it.
    /// Every linear's input must then be `[batch, seq, features]` (a dense decoder's are).
    pub fn set_padding<B: Backend>(&self, padding: Option<Tensor<B, 2, Bool>>) {
        let mask = padding.map(|m| Box::new(m.unsqueeze_dim::<3>(2)) as Box<dyn Any>);
        PADDING.with(|p| *p.borrow_mut() = mask);
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
        PADDING.with(|p| *p.borrow_mut() = None);
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

    #[test]
    fn padding_positions_are_left_out_of_the_maximum() {
        let device = Default::default();
        // Two sequences of three positions, two features; the second's last position is
        // padding and holds the largest value (and a NaN, which must not count either).
        let x = Tensor::<Flex, 3>::from_data(
            TensorData::new(
                vec![
                    1.0f32,
                    -2.0,
                    0.5,
                    0.25,
                    3.0,
                    0.0,
                    -1.5,
                    1.0,
                    0.5,
                    0.5,
                    99.0,
                    f32::NAN,
                ],
                [2, 3, 2],
            ),
            &device,
        );
        let padding = Tensor::<Flex, 2, Bool>::from_data(
            TensorData::new(vec![false, false, false, false, false, true], [2, 3]),
            &device,
        );
        let hook = InputAmaxHook::install().unwrap();
        hook.set_padding(Some(padding));
        observe_input("a", &x);
        hook.set_padding::<Flex>(None);
        observe_input("b", &x.clone().slice([1..2, 0..2, 0..2]));
        let got = hook.finish().unwrap();
        assert_eq!(got["a"], 3.0);
        assert_eq!(got["b"], 1.5);
        assert!(PADDING.with(|p| p.borrow().is_none()));
    }
}
