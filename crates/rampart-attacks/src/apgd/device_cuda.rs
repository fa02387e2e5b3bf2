//! The launches of APGD's device-resident loop ([`super::device`]): its kernels live
//! in `engine/device.cu`, one NVRTC module with PGD's, each doing its CPU twin's
//! operations in the same order.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{DType, Result, Tensor};
use rampart_models::cuda::{elementwise, launch_error};

use super::device::{State, Update, AROW, EROW};
use crate::engine::device_cuda::{count, per_row, with_addresses, ATTACK};

const _: () = assert!(
    AROW == 8 && EROW == 3,
    "the kernels index 8 values per row, 3 per example"
);

/// `apgd_propose_linf` or `apgd_propose_l2` (see [`super::device::twin::propose`]).
pub(super) fn propose(
    s: &mut State,
    l2: bool,
    eps: f64,
    a: f64,
    bounds: crate::Bounds,
) -> Result<()> {
    let (d, md) = (count(s.d)?, s.m * s.d);
    if l2 {
        if s.scratch.is_none() {
            s.scratch = Some(Tensor::zeros(md, DType::F64, s.x.device())?);
        }
        let tensors = [
            Some(&s.adv),
            Some(&s.old),
            s.scratch.as_ref(),
            Some(&s.x),
            Some(&s.grad),
            Some(&s.rows),
            Some(&s.pos),
        ];
        return with_addresses(&tensors, |dev, p| {
            let func = ATTACK.func(dev, "apgd_propose_l2")?;
            let mut b = func.builder();
            for ptr in p {
                b.arg(ptr);
            }
            b.arg(&d).arg(&eps).arg(&a).arg(&bounds.lo).arg(&bounds.hi);
            // SAFETY: block j reads and writes row j (D values) of each (M·D) buffer,
            // its row's scalars and place.
            unsafe { b.launch(per_row(s.m)?) }
                .map_err(|e| launch_error("APGD on the device: L2 proposal", e))?;
            Ok(())
        });
    }
    let tensors = [
        Some(&s.adv),
        Some(&s.old),
        Some(&s.x),
        Some(&s.grad),
        Some(&s.rows),
        Some(&s.pos),
    ];
    with_addresses(&tensors, |dev, p| {
        let func = ATTACK.func(dev, "apgd_propose_linf")?;
        let (cfg, md) = elementwise(md, "APGD on the device: proposal")?;
        let mut b = func.builder();
        for ptr in p {
            b.arg(ptr);
        }
        b.arg(&d)
            .arg(&md)
            .arg(&eps)
            .arg(&a)
            .arg(&bounds.lo)
            .arg(&bounds.hi);
        // SAFETY: element i of each (M·D) buffer, its row's scalars and place.
        unsafe { b.launch(cfg) }.map_err(|e| launch_error("APGD on the device: proposal", e))?;
        Ok(())
    })
}

/// `apgd_update` (see [`super::device::twin::update`]).
pub(super) fn update(s: &mut State, u: Update) -> Result<()> {
    let tensors = [
        Some(&s.rows),
        Some(&s.grad),
        Some(&s.best_point),
        Some(&s.best_grad),
        Some(&s.adv),
        Some(&s.acc_obj),
        Some(&s.acc_probs),
        Some(&s.acc_grad),
        Some(&s.labels),
        Some(&s.pos),
    ];
    let (k, d, n) = (count(s.k)?, count(s.d)?, count(u.samples)?);
    with_addresses(&tensors, |dev, p| {
        let func = ATTACK.func(dev, "apgd_update")?;
        let mut b = func.builder();
        for ptr in p {
            b.arg(ptr);
        }
        let (first, want_grad) = (i32::from(u.first), i32::from(u.want_grad));
        b.arg(&k)
            .arg(&d)
            .arg(&n)
            .arg(&first)
            .arg(&want_grad)
            .arg(&u.step0);
        // SAFETY: block j writes row j of the scalars and of each (M·D) buffer, and
        // reads the sums at its place r < M (K and D values).
        unsafe { b.launch(per_row(s.m)?) }
            .map_err(|e| launch_error("APGD on the device: update", e))?;
        Ok(())
    })
}

/// `apgd_offer` (see [`super::device::twin::offer`]).
pub(super) fn offer(s: &mut State) -> Result<()> {
    let examples = s.rec.elem_count() / EROW;
    let tensors = [
        Some(&s.rec),
        Some(&s.rec_points),
        Some(&s.rows),
        Some(&s.adv),
        Some(&s.pos),
        Some(&s.row_start),
        Some(&s.row_list),
    ];
    let d = count(s.d)?;
    with_addresses(&tensors, |dev, p| {
        let func = ATTACK.func(dev, "apgd_offer")?;
        let mut b = func.builder();
        for ptr in p {
            b.arg(ptr);
        }
        b.arg(&d);
        // SAFETY: block e writes its record (EROW scalars, D values) and reads the rows
        // its offsets list (each < M).
        unsafe { b.launch(per_row(examples)?) }
            .map_err(|e| launch_error("APGD on the device: record", e))?;
        Ok(())
    })
}

/// `apgd_check` (see [`super::device::twin::check`]).
pub(super) fn check(s: &mut State, rho: f64, interval: usize) -> Result<()> {
    let tensors = [
        Some(&s.rows),
        Some(&s.adv),
        Some(&s.grad),
        Some(&s.best_point),
        Some(&s.best_grad),
        Some(&s.pos),
    ];
    let (d, interval) = (count(s.d)?, count(interval)?);
    with_addresses(&tensors, |dev, p| {
        let func = ATTACK.func(dev, "apgd_check")?;
        let mut b = func.builder();
        for ptr in p {
            b.arg(ptr);
        }
        b.arg(&d).arg(&rho).arg(&interval);
        // SAFETY: block j reads and writes row j of the scalars and (M·D) buffers.
        unsafe { b.launch(per_row(s.m)?) }
            .map_err(|e| launch_error("APGD on the device: checkpoint", e))?;
        Ok(())
    })
}
