//! Convolution kernels reordered once per attack. An attack differentiates with
//! respect to its input only, so the weights of the model it runs cannot change while
//! it runs; [`frozen_weights`] says so for the current thread, and while its guard
//! lives the fused eval program on a GPU keeps each kernel it puts in KRSC order (one
//! launch and one buffer per convolution and pass) for the passes that follow, keyed
//! by the weight tensor. The attacks open the scope for each run (`rampart_attacks`:
//! `Attack::run`, `perturb`, the ensembles); the last guard of a thread dropped, the
//! kept kernels are freed. Outside a scope every pass reorders its kernels, as before.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, MutexGuard};

use candle_core::{Result, Tensor, TensorId};

/// The kept kernels of this thread: how many scopes are open, and the kernels by
/// weight tensor.
type Kept = (usize, HashMap<TensorId, Arc<dyn Any + Send + Sync>>);

thread_local! {
    static KEPT: RefCell<Kept> = RefCell::new((0, HashMap::new()));
}

/// While a value lives, the weights of every model this thread runs are taken as
/// fixed (see the module): a promise the attacks make for the length of a run. Not
/// `Send`: it is dropped on the thread that made it.
#[must_use = "the weights are taken as fixed only while the guard lives"]
pub struct FrozenWeights {
    _thread: PhantomData<MutexGuard<'static, ()>>,
}

/// Opens a scope in which this thread's models keep their weights (nested scopes
/// are one; the outermost one's end frees the kept kernels).
pub fn frozen_weights() -> FrozenWeights {
    KEPT.with(|k| k.borrow_mut().0 += 1);
    FrozenWeights {
        _thread: PhantomData,
    }
}

impl Drop for FrozenWeights {
    fn drop(&mut self) {
        // Freed outside the borrow (a buffer's drop runs the device's code).
        let freed = KEPT.with(|k| {
            let mut k = k.borrow_mut();
            k.0 = k.0.saturating_sub(1);
            if k.0 == 0 {
                std::mem::take(&mut k.1)
            } else {
                HashMap::new()
            }
        });
        drop(freed);
    }
}

/// Whether a scope of [`frozen_weights`] is open on this thread.
pub fn weights_frozen() -> bool {
    KEPT.with(|k| k.borrow().0 > 0)
}

/// `make`'s kernel for the weight tensor `w`: the one kept in this thread's scope when
/// there is one, else made (and kept while a scope is open).
pub(crate) fn reordered<B: Any + Send + Sync>(
    w: &Tensor,
    make: impl FnOnce() -> Result<B>,
) -> Result<Arc<B>> {
    let kept = KEPT.with(|k| {
        let k = k.borrow();
        if k.0 > 0 {
            k.1.get(&w.id()).cloned()
        } else {
            None
        }
    });
    if let Some(b) = kept.and_then(|any| any.downcast::<B>().ok()) {
        return Ok(b);
    }
    let b = Arc::new(make()?);
    KEPT.with(|k| {
        let mut k = k.borrow_mut();
        if k.0 > 0 {
            k.1.insert(w.id(), b.clone());
        }
    });
    Ok(b)
}
