//! Benchmarks of the attacks; one file per benchmark.

mod pgd;

criterion::criterion_main!(pgd::benches);
