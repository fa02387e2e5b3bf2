//! Small constant tensors of a training step (the class indices 0..K, a column of one
//! value), made once per device and kept: a step that made them anew would copy them
//! from the host every time, and a copy from the host inside a CUDA graph's capture
//! fails it (the trainer's graphs then run the step eagerly). The first, eager step of
//! a run makes them; the captured and replayed steps find them here.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Constants kept per thread; the oldest goes past this many.
const KEPT: usize = 32;

/// What a constant is: its device, and a key of its shape and value.
type Entry = (Device, Key, Tensor);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Key {
    /// 0..k, u32, shape (1, k).
    ClassRow(usize),
    /// (rows, 1) f64 of the value with these bits.
    Column(usize, u64),
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
        for k in 1..=2 * KEPT {
            assert_eq!(class_row(k, &dev)?.dims(), [1, k]);
        }
        assert_eq!(class_row(5, &dev)?.to_vec2::<u32>()?, [[0, 1, 2, 3, 4]]);
        Ok(())
    }
}
