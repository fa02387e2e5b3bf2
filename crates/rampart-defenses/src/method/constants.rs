//! Small constant tensors of a training step (the class indices 0..K, a column of one
//! value), made once per device and kept: a step that made them anew would copy them
//! from the host every time, and a copy from the host inside a CUDA graph's capture
//! fails it (the trainer's graphs then run the step eagerly). The first, eager step of
//! a run makes them; the captured and replayed steps find them here.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Constants kept per thread; the oldest goes past this many. A captured CUDA graph
/// reads a kept constant where it lies, so one must not be freed while a run replays
/// its graph: the bound is far above the dozen or so a training run uses (its batch
/// sizes, bounds and class count).
const KEPT: usize = 1024;

/// What a constant is: its device, and a key of its shape and value.
type Entry = (Device, Key, Tensor);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Key {
    /// 0..k, u32, shape (1, k).
    ClassRow(usize),
    /// (rows, 1) f64 of the value with these bits.
    Column(usize, u64),
    /// (1,) of the value with these bits, in this type.
    Scalar(DType, u64),
    /// (steps,) f64: t/(steps − 1) for t = 0..steps.
    Powers(usize),
}

thread_local! {
    static KEPT_CONSTANTS: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

fn kept(device: &Device, key: Key, make: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
    let found = KEPT_CONSTANTS.with(|c| {
        c.borrow()
            .iter()
            .find(|(d, k, _)| *k == key && d.same_device(device))
            .map(|(_, _, t)| t.clone())
    });
    if let Some(t) = found {
        return Ok(t);
    }
    let t = make()?;
    KEPT_CONSTANTS.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= KEPT {
            c.remove(0);
        }
        c.push((device.clone(), key, t.clone()));
    });
    Ok(t)
}

/// The class indices 0..k as a row (1, k) of u32 on `device`.
pub(crate) fn class_row(k: usize, device: &Device) -> Result<Tensor> {
    kept(device, Key::ClassRow(k), || {
        Ok(Tensor::arange(0u32, k as u32, device)?.reshape((1, k))?)
    })
}

/// A column (rows, 1) of f64 holding `value` on `device`.
pub(crate) fn column(value: f64, rows: usize, device: &Device) -> Result<Tensor> {
    kept(device, Key::Column(rows, value.to_bits()), || {
        Ok(Tensor::full(value, (rows, 1), device)?.to_dtype(DType::F64)?)
    })
}

/// `value` as a (1,) tensor of `dtype` on `device` (rounded to the type as candle's
/// scalar operations round it): what `x.maximum(v)`, `x.clamp(lo, hi)` or `x.gt(v)`
/// would copy from the host at every call, for the `broadcast_` forms
/// ([`clamp`], [`maximum`]).
pub(crate) fn scalar(value: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    kept(device, Key::Scalar(dtype, value.to_bits()), || {
        Ok(Tensor::new(&[value], device)?.to_dtype(dtype)?)
    })
}

/// `x.clamp(lo, hi)` with the bounds kept on the device.
pub(crate) fn clamp(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let (dt, dev) = (x.dtype(), x.device());
    Ok(x.broadcast_maximum(&scalar(lo, dt, dev)?)?
        .broadcast_minimum(&scalar(hi, dt, dev)?)?)
}

/// `x.maximum(v)` with `v` kept on the device.
pub(crate) fn maximum(x: &Tensor, v: f64) -> Result<Tensor> {
    Ok(x.broadcast_maximum(&scalar(v, x.dtype(), x.device())?)?)
}

/// t/(steps − 1) for t = 0..steps, f64 (steps ≥ 2).
pub(crate) fn powers(steps: usize, device: &Device) -> Result<Tensor> {
    kept(device, Key::Powers(steps), || {
        let last = steps.saturating_sub(1).max(1) as f64;
        let v: Vec<f64> = (0..steps).map(|t| t as f64 / last).collect();
        Ok(Tensor::new(v.as_slice(), device)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_made_once_and_hold_their_values() -> Result<()> {
        let dev = Device::Cpu;
        let a = class_row(5, &dev)?;
        assert_eq!(a.to_vec2::<u32>()?, [[0, 1, 2, 3, 4]]);
        // The same tensor again, not a new copy.
        let b = class_row(5, &dev)?;
        assert_eq!(a.id(), b.id());
        assert_eq!(class_row(3, &dev)?.dims(), [1, 3]);
        let c = column(0.25, 4, &dev)?;
        assert_eq!(c.dtype(), DType::F64);
        assert_eq!(c.flatten_all()?.to_vec1::<f64>()?, [0.25; 4]);
        assert_eq!(c.id(), column(0.25, 4, &dev)?.id());
        assert_ne!(c.id(), column(0.5, 4, &dev)?.id());
        assert_ne!(c.id(), column(0.25, 3, &dev)?.id());
        // Past the limit the oldest goes: still the right values.
        for k in 1..=KEPT + 8 {
            assert_eq!(class_row(k, &dev)?.dims(), [1, k]);
        }
        assert_eq!(class_row(5, &dev)?.to_vec2::<u32>()?, [[0, 1, 2, 3, 4]]);
        Ok(())
    }

    /// The kept-bound forms give candle's scalar forms bit for bit.
    #[test]
    fn kept_bounds_clamp_as_scalar_bounds_do() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[-1.5f32, 0.1, 0.7, 2.0, f32::MIN_POSITIVE], &dev)?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
        };
        assert_eq!(bits(&clamp(&x, 0.1, 0.7)?)?, bits(&x.clamp(0.1, 0.7)?)?);
        assert_eq!(bits(&maximum(&x, 0.3)?)?, bits(&x.maximum(0.3)?)?);
        let s = scalar(0.1, DType::F32, &dev)?;
        assert_eq!((s.dims(), s.dtype()), (&[1][..], DType::F32));
        assert_eq!(s.id(), scalar(0.1, DType::F32, &dev)?.id());
        assert_ne!(s.id(), scalar(0.1, DType::F64, &dev)?.id());
        assert_eq!(
            powers(5, &dev)?.to_vec1::<f64>()?,
            [0.0, 0.25, 0.5, 0.75, 1.0]
        );
        Ok(())
    }
}
