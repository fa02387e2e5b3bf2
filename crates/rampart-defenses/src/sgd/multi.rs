//! The layout of `sgd_multi`'s launch, shared by the CUDA launch (`sgd/cuda.rs`) and
//! the kernels' CPU test (`sgd/emulated.rs`), so that the test runs the launch the GPU
//! gets: a table of five slots per parameter (the addresses of its weights, gradient
//! and momentum buffer, its length, whether it is decayed), then two per block (the
//! parameter, the block's first element), one block per [`MULTI_CHUNK`] elements of
//! each parameter; then the scalars.

/// Elements per block of `sgd_multi`, and its threads per block.
pub(crate) const MULTI_CHUNK: usize = 4096;
pub(crate) const MULTI_THREADS: u32 = 256;

/// One slot of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    /// The device address of parameter `param`'s operand `operand` (0 weights,
    /// 1 gradient, 2 momentum buffer).
    Address { param: usize, operand: usize },
    /// A value.
    Value(u64),
}

/// The table and the grid of one multi-tensor update.
#[derive(Debug)]
pub(crate) struct Plan {
    pub table: Vec<Slot>,
    /// Blocks of the launch (at least one when any parameter has an element).
    pub blocks: usize,
}

/// The plan for parameters of `(length, decayed)`.
pub(crate) fn plan(params: &[(usize, bool)]) -> Plan {
    let mut table = Vec::with_capacity(5 * params.len());
    let mut blocks = Vec::new();
    for (param, &(n, decay)) in params.iter().enumerate() {
        table.extend((0..3).map(|operand| Slot::Address { param, operand }));
        table.extend([Slot::Value(n as u64), Slot::Value(u64::from(decay))]);
        for first in (0..n).step_by(MULTI_CHUNK) {
            blocks.extend([Slot::Value(param as u64), Slot::Value(first as u64)]);
        }
    }
    let n_blocks = blocks.len() / 2;
    table.extend(blocks);
    Plan {
        table,
        blocks: n_blocks,
    }
}

/// The scalar arguments after the table, in the kernel's order: the parameter count,
/// μ, λ, Nesterov, the learning rate and [`MULTI_CHUNK`].
#[allow(clippy::type_complexity)]
pub(crate) fn scalars(
    params: u32,
    mu: f32,
    wd: f32,
    nesterov: bool,
    lr: f32,
) -> (u32, f32, f32, i32, f32, u32) {
    (params, mu, wd, i32::from(nesterov), lr, MULTI_CHUNK as u32)
}
