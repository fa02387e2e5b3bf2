//! Runtime of `AutoAttack::standard(Linf)` at ε = 8/255 on an untrained WRN-10-1
//! (CIFAR-10 shape), CPU, on random images. Two labellings: random labels (most points
//! are misclassified and skipped) and the model's own predictions (every point is
//! attacked). `cargo run --release -p rampart-attacks --example autoattack_timing [n]`.

use candle_core::{Device, ModuleT, Tensor};
use rampart_attacks::{AutoAttack, Bounds, Norm};
use rampart_models::{Classifier, ModelSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100);
    let device = Device::Cpu;
    let model = Classifier::new(ModelSpec::wrn(10, 1, 10), 0, &device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let pixels: Vec<f32> = (0..n * 3 * 32 * 32).map(|_| rng.gen()).collect();
    let xs = Tensor::from_vec(pixels, (n, 3, 32, 32), &device)?;
    let random: Vec<u32> = (0..n).map(|_| rng.gen_range(0..10)).collect();
    let random = Tensor::from_vec(random, n, &device)?;
    let own = model.forward_t(&xs, false)?.argmax(1)?;
    let aa = AutoAttack::standard(Norm::Linf);
    for (name, ys) in [("random labels", random), ("own predictions", own)] {
        let eval = aa.evaluate(&model.frozen(), Bounds::UNIT, &xs, &ys, 8.0 / 255.0, 0)?;
        let r = &eval.report;
        println!(
            "{name}: {n} images, clean {:.1} %, robust {:.1} %, {:.1} s (clean pass and checks {:.2} s)",
            100.0 * r.clean_accuracy,
            100.0 * r.robust_accuracy,
            r.seconds,
            r.seconds - r.stages.iter().map(|s| s.seconds).sum::<f64>()
        );
        for s in &r.stages {
            println!(
                "  {:<8} attacked {:>3}  fooled {:>3}  robust {:>5.1} %  {:>7.2} s",
                s.name,
                s.attacked,
                s.broken,
                100.0 * s.robust_accuracy,
                s.seconds
            );
        }
        for w in &r.trust.warnings {
            println!("  warning: {w}");
        }
    }
    Ok(())
}
