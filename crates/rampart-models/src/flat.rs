//! A model's parameters in one buffer for the GPU's fused train program, whose op
//! takes them as one tensor.
//!
//! Concatenating the parameters for each pass (`Tensor::cat`) costs a copy per
//! parameter, and its backward pass, through candle's autograd, a zero-filled
//! gradient and an addition per parameter, twice for a weight of more than one
//! dimension (its flattening is an operation too): 210 small GPU launches for
//! PreActResNet-18's 56 parameters on each training pass, each with its host-side
//! cost, where the program itself launches a few hundred. Here the parameters are
//! copied into one variable kept by the model ([`FlatParams`]; one launch for all of
//! them, `kernels::gather`), whose gradient the op gives directly, and after the
//! backward pass each parameter is handed its slice of that gradient, a view of it
//! with no copy ([`backward`], [`hand_out_flat_gradients`]): one launch forward, and
//! the buffer's own gradient.
//!
//! A caller that runs the backward pass of a loss computed through such a pass must
//! hand the gradients out (or call [`backward`]); an optimiser given a store where
//! this was not done would see no gradient for those parameters, so the optimisers
//! of this workspace refuse such a store ([`flat_gradients_pending`]).

use std::sync::{Arc, Mutex, Weak};

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

/// The parameters of one fused train program in one f32 variable, each at its place.
pub(crate) struct FlatParams {
    flat: Var,
    /// Each parameter (a variable) and where it starts in `flat`.
    params: Vec<(Tensor, usize)>,
    /// The GPU's copy of the gather's table.
    #[cfg(feature = "cuda")]
    table: Mutex<crate::kernels::gather::TableCache>,
}

/// Every buffer made so far whose model may still be alive: what
/// [`hand_out_flat_gradients`] looks for in a gradient store.
static LIVE: Mutex<Vec<Weak<FlatParams>>> = Mutex::new(Vec::new());

fn live() -> Vec<Arc<FlatParams>> {
    let live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    live.iter().filter_map(Weak::upgrade).collect()
}

impl FlatParams {
    /// One buffer for `params` (in this order) when each is an f32 variable on the
    /// device of the first; None otherwise (a computed tensor among them, such as an
    /// OAT model's FiLM outputs, whose gradient must go through autograd).
    pub(crate) fn new(params: &[Tensor]) -> Result<Option<Arc<Self>>> {
        let Some(first) = params.first() else {
            return Ok(None);
        };
        let eligible = params.iter().all(|p| {
            p.is_variable() && p.dtype() == DType::F32 && p.device().same_device(first.device())
        });
        if !eligible {
            return Ok(None);
        }
        let mut placed = Vec::with_capacity(params.len());
        let mut at = 0;
        for p in params {
            placed.push((p.clone(), at));
            at += p.elem_count();
        }
        let made = Arc::new(FlatParams {
            flat: Var::zeros(at, DType::F32, first.device())?,
            params: placed,
            #[cfg(feature = "cuda")]
            table: Mutex::new(None),
        });
        let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(&made));
        Ok(Some(made))
    }

    /// Whether this buffer holds exactly `params`, in this order.
    pub(crate) fn holds(&self, params: &[Tensor]) -> bool {
        self.params.len() == params.len()
            && self
                .params
                .iter()
                .zip(params)
                .all(|((p, _), q)| p.id() == q.id())
    }

    /// The buffer with the parameters' current values copied in (one launch on a GPU,
    /// `kernels::gather`): the tensor the program takes in place of their
    /// concatenation. Its gradient reaches the parameters through
    /// [`hand_out_flat_gradients`].
    pub(crate) fn gathered(&self) -> Result<Tensor> {
        let flat = self.flat.as_tensor();
        flat.inplace_op1(&crate::kernels::gather::Gather {
            params: &self.params,
            #[cfg(feature = "cuda")]
            table: &self.table,
        })?;
        Ok(flat.clone())
    }
}

/// `loss.backward()`, with the gradient of every parameter buffer of a fused train
/// pass handed to its parameters ([`hand_out_flat_gradients`]): the gradients of a
/// training loss, whatever path its passes took.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    let mut grads = loss.backward()?;
    hand_out_flat_gradients(&mut grads)?;
    Ok(grads)
}

/// Replaces the gradient of each parameter buffer in `grads` by its parameters'
/// gradients: each parameter's slice of it, reshaped (a view, no copy), added to a
/// gradient the parameter already has from another use in the same loss.
pub fn hand_out_flat_gradients(grads: &mut GradStore) -> Result<()> {
    for f in live() {
        let Some(d) = grads.remove(f.flat.as_tensor()) else {
            continue;
        };
        for (p, at) in &f.params {
            let g = d.narrow(0, *at, p.elem_count())?.reshape(p.dims())?;
            let g = match grads.remove(p) {
                Some(earlier) => (earlier + g)?,
                None => g,
            };
            grads.insert(p, g);
        }
    }
    Ok(())
}

/// Whether `grads` still holds the gradient of a parameter buffer, not handed to its
/// parameters ([`hand_out_flat_gradients`]): an optimiser given it would miss them.
pub fn flat_gradients_pending(grads: &GradStore) -> bool {
    live()
        .iter()
        .any(|f| grads.get(f.flat.as_tensor()).is_some())
}
