//! Benchmarks of the models' kernels; one file per benchmark.

mod noise;

criterion::criterion_main!(noise::benches);
