//! Benchmarks of the attacks; one file per benchmark.

mod engine;
mod pgd;

criterion::criterion_main!(pgd::benches, engine::benches);
