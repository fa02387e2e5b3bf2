//! Benchmarks of the attacks; one file per benchmark.
//!
//! They run with the allocator of the `rampart` binary (mimalloc, freed memory kept),
//! so that the timings are those of the binary and not of the system allocator's
//! page faults on the engine's multi-megabyte buffers.

mod common;
mod engine;
mod pgd;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (option 15 in mimalloc 2 and 3), as the binary
/// sets it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: sets a process-wide option before any benchmark allocates much.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

fn main() {
    keep_freed_memory();
    pgd::benches();
    engine::benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}
