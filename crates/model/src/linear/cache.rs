//! The per-step cache of fake-quantized weights of [`QLinear`](super::QLinear).
//!
//! Between two optimizer steps a weight does not change, yet QAT fake-quantizes it in every
//! micro-batch's forward and again in every recompute of backward. Inside a
//! [`FakeQuantCache`] scope (the trainer opens one per optimizer step when asked to) each
//! quantized linear fake-quantizes its weight once, on first use, and every later forward
//! and recompute of the step reuses that tensor through
//! `qatflow_kernels::fake_quant::straight_through_value` (same values, same identity
//! gradient). The price is memory: the step keeps every quantized weight twice (2 bytes a
//! parameter at BF16) until the scope ends, where the uncached path keeps one layer's.
//! Outside a scope a lookup is one read of a thread-local flag.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use burn::module::ParamId;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    /// Fake-quantized weights by parameter: `Tensor<B, 2>` with the backend erased.
    static CACHE: RefCell<HashMap<ParamId, Box<dyn Any>>> = RefCell::new(HashMap::new());
}

/// A scope (one optimizer step) within which each quantized weight is fake-quantized once
/// on this thread; the cached tensors are freed when it is dropped. Scopes do not nest.
#[derive(Debug)]
pub struct FakeQuantCache {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl FakeQuantCache {
    /// Opens the scope on this thread.
    pub fn begin() -> FakeQuantCache {
        assert!(
            !ACTIVE.with(Cell::get),
            "a fake-quant cache scope is already open on this thread"
        );
        ACTIVE.with(|a| a.set(true));
        FakeQuantCache {
            _not_send: std::marker::PhantomData,
        }
    }

    /// Weights cached so far.
    pub fn len(&self) -> usize {
        CACHE.with(|c| c.borrow().len())
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for FakeQuantCache {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(false));
        CACHE.with(|c| c.borrow_mut().clear());
    }
}

/// The cached fake-quantized weight of parameter `id` (made by `make` on first use), or
/// `None` outside a scope.
pub(super) fn cached<B: Backend>(
    id: ParamId,
    make: impl FnOnce() -> Tensor<B, 2>,
) -> Option<Tensor<B, 2>> {
    if !ACTIVE.with(Cell::get) {
        return None;
    }
    if let Some(t) = CACHE.with(|c| {
        c.borrow()
            .get(&id)
            .and_then(|b| b.downcast_ref::<Tensor<B, 2>>().cloned())
    }) {
        return Some(t);
    }
    let t = make();
    CACHE.with(|c| c.borrow_mut().insert(id, Box::new(t.clone())));
    Some(t)
}
