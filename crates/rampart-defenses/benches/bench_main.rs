//! Benchmarks of the training loop's parts; one file per benchmark.

mod sgd;

criterion::criterion_main!(sgd::benches);
