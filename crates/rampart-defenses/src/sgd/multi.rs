//! The layout of `sgd_multi`'s launch, shared by the CUDA launch (`sgd/cuda.rs`) and
//! the kernels' CPU test (`sgd/emulated.rs`), so that the test runs the launch the GPU
//! gets: a table of [`SLOTS`] slots per parameter (the addresses of its weights,
//! gradient and momentum buffer, its length, whether it is decayed, its first block),
//! one block per [`MULTI_CHUNK`] elements of each parameter, each block finding its
//! parameter in the table by bisection; then the scalars. The table grows with the
//! number of parameters only (six values each: under 4 KiB for 80 parameters), not
//! with their sizes, so that its copy to the GPU each step stays small.

/// Elements per block of `sgd_multi`, and its threads per block.
pub(crate) const MULTI_CHUNK: usize = 4096;
pub(crate) const MULTI_THREADS: u32 = 256;
/// Values of the table per parameter.
pub(crate) const SLOTS: usize = 6;

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

/// The plan for parameters of `(length, decayed)`: parameter p's blocks are
/// `first_p … first_p + ⌈n_p / MULTI_CHUNK⌉ − 1` (an empty parameter has none).
pub(crate) fn plan(params: &[(usize, bool)]) -> Plan {
    let mut table = Vec::with_capacity(SLOTS * params.len());
    let mut blocks = 0usize;
    for (param, &(n, decay)) in params.iter().enumerate() {
        table.extend((0..3).map(|operand| Slot::Address { param, operand }));
        table.extend([
            Slot::Value(n as u64),
            Slot::Value(u64::from(decay)),
            Slot::Value(blocks as u64),
        ]);
        blocks += n.div_ceil(MULTI_CHUNK);
    }
    Plan { table, blocks }
}

/// The parameter and first element of block `k` as the kernel finds them: the last
/// parameter whose first block is at most `k` (a bisection over the table's first
/// blocks; empty parameters share their first block with the next and are passed
/// over). The CPU twin of the kernel's search, for the tests.
#[cfg(test)]
pub(crate) fn block_of(plan: &Plan, k: usize) -> (usize, usize) {
    let first = |p: usize| match plan.table[SLOTS * p + 5] {
        Slot::Value(v) => v as usize,
        Slot::Address { .. } => unreachable!("slot 5 is a value"),
    };
    let (mut lo, mut hi) = (0usize, plan.table.len() / SLOTS - 1);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if first(mid) <= k {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    (lo, (k - first(lo)) * MULTI_CHUNK)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element of every parameter belongs to exactly one block, found by the
    /// kernel's bisection: parameters shorter than a block, of whole blocks, empty
    /// ones (first, in the middle, last) and one alone.
    #[test]
    fn each_block_finds_its_parameter() {
        for sizes in [
            vec![7usize, 5000, 9000],
            vec![0, 4096, 0, 0, 1, 8192, 4097, 0],
            vec![12_000],
            vec![3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3],
        ] {
            let params: Vec<(usize, bool)> = sizes.iter().map(|&n| (n, n % 2 == 0)).collect();
            let plan = plan(&params);
            assert_eq!(plan.table.len(), SLOTS * sizes.len());
            let mut seen: Vec<Vec<usize>> = sizes.iter().map(|&n| vec![0; n]).collect();
            for k in 0..plan.blocks {
                let (p, start) = block_of(&plan, k);
                assert!(
                    start < sizes[p],
                    "{sizes:?}: block {k} starts past parameter {p}"
                );
                let end = (start + MULTI_CHUNK).min(sizes[p]);
                seen[p][start..end].iter_mut().for_each(|c| *c += 1);
            }
            assert!(
                seen.iter().flatten().all(|&c| c == 1),
                "{sizes:?}: an element updated other than once"
            );
        }
    }
}
