//! Adversarial frames (Zajac et al. 2019; used in the CCAT evaluation): the
//! perturbation is confined to a border of `width` pixels and may take any value within
//! the bounds there.

use serde::{Deserialize, Serialize};

use crate::base::{Attack, Criterion};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::norm::Norm;
use crate::pgd::Pgd;
use crate::problem::{Outcome, Problem};
use crate::repeated::{Record, Rows, SingleRun, Start};

/// The PGD loop with its perturbation masked to the image border. The ε of each run is
/// the loop's norm bound *inside* the frame: with [`crate::Norm::Linf`] and ε ≥ hi − lo the
/// frame is unconstrained within the bounds (the paper's setting: ε = 1 for [0, 1]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Frames {
    /// Border width in pixels (≥ 1).
    pub width: usize,
    /// The loop.
    pub pgd: Pgd,
}

impl Frames {
    /// CCAT's frame evaluation: a 3-pixel border, run at ε = hi − lo (unconstrained);
    /// the optimisation budget is [`Pgd::ccat_conf_eval`]'s (conf objective, 1000 steps,
    /// 11 runs), which is this crate's choice, the paper giving none separately.
    pub fn ccat() -> Frames {
        Frames {
            width: 3,
            pgd: Pgd::ccat_conf_eval(),
        }
    }

    /// The (C·H·W) mask of an image (C, H, W): 1 on the border of `width` pixels.
    pub fn mask(&self, c: usize, h: usize, w: usize) -> Result<Vec<f64>> {
        if self.width == 0 {
            return Err(Error::Config(
                "a frame needs a width of at least one pixel".into(),
            ));
        }
        let b = self.width;
        let mut mask = Vec::with_capacity(c * h * w);
        for _ in 0..c {
            for row in 0..h {
                for col in 0..w {
                    let border = row < b || col < b || row + b >= h || col + b >= w;
                    mask.push(if border { 1.0 } else { 0.0 });
                }
            }
        }
        Ok(mask)
    }
}

impl Frames {
    /// The mask of the problem's images; refuses inputs that are not (B, C, H, W).
    fn problem_mask(&self, problem: &Problem<'_>) -> Result<Vec<f64>> {
        match *problem.dims() {
            [_, c, h, w] => self.mask(c, h, w),
            ref other => Err(Error::Input(format!(
                "frames need images of shape (B, C, H, W), got {other:?}"
            ))),
        }
    }
}

impl Attack for Frames {
    fn norm(&self) -> Norm {
        self.pgd.norm
    }

    fn criterion(&self) -> Criterion {
        self.pgd.criterion
    }

    fn eval_samples(&self) -> usize {
        self.pgd.eot.eval_samples
    }

    fn validate(&self) -> Result<()> {
        if self.width == 0 {
            return Err(Error::Config(
                "a frame needs a width of at least one pixel".into(),
            ));
        }
        self.pgd.validate()
    }

    /// Refuses inputs that are not images (B, C, H, W), and what [`Pgd`] refuses.
    fn check(&self, problem: &Problem<'_>) -> Result<()> {
        let mask = self.problem_mask(problem)?;
        self.engine(&mask).check(problem)
    }

    fn attack_eps(&self, problem: &Problem<'_>, eps: f64, seed: u64) -> Result<Outcome> {
        let mask = self.problem_mask(problem)?;
        self.engine(&mask).attack_eps(problem, eps, seed)
    }
}

impl SingleRun for Frames {
    fn begin(&self, problem: &Problem<'_>) -> Result<Start> {
        self.pgd.begin(problem)
    }

    fn run_once(&self, problem: &Problem<'_>, rows: &Rows, record: &mut Record) -> Result<()> {
        let mask = self.problem_mask(problem)?;
        self.engine(&mask).run_once(problem, rows, record)
    }

    fn skips_fooled(&self) -> bool {
        self.pgd.skips_fooled()
    }
}

impl Frames {
    fn engine<'a>(&'a self, mask: &'a [f64]) -> Engine<'a> {
        Engine {
            cfg: &self.pgd,
            mask: Some(mask),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgd::{Restarts, StepSize};
    use crate::testutil::{TinyConv, CLASSES};
    use crate::Bounds;
    use crate::Init;
    use candle_core::Device;
    use candle_core::{ModuleT, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn mask_marks_exactly_the_border() -> Result<()> {
        let f = Frames {
            width: 1,
            ..Frames::ccat()
        };
        let m = f.mask(1, 4, 5)?;
        let expected = [
            1, 1, 1, 1, 1, //
            1, 0, 0, 0, 1, //
            1, 0, 0, 0, 1, //
            1, 1, 1, 1, 1,
        ];
        assert_eq!(m, expected.iter().map(|&v| v as f64).collect::<Vec<_>>());
        assert_eq!(f.mask(2, 4, 5)?.len(), 40);
        assert!(Frames { width: 0, ..f }.mask(1, 4, 4).is_err());
        Ok(())
    }

    /// The interior is untouched to the bit, the border stays within the bounds, and an
    /// unconstrained frame fools a random convnet on some inputs.
    #[test]
    fn frames_change_only_the_border() -> Result<()> {
        let model = TinyConv::random(3, 10, 10, CLASSES, 9)?;
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let b = 16;
        let x: Vec<f32> = (0..b * 300).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let xs = Tensor::from_vec(x, (b, 3, 10, 10), &Device::Cpu)?;
        let logits = model.forward_t(&xs, false)?;
        let ys = logits.argmax(1)?;
        let bounds = Bounds::new(-1.0, 1.0)?;
        let mut frames = Frames {
            width: 2,
            ..Frames::ccat()
        };
        frames.pgd.steps = 30;
        frames.pgd.step_size = StepSize::Absolute(0.1);
        frames.pgd.restarts = Restarts::same(1, Init::Zero);
        let res = frames.run(&model, bounds, &xs, &ys, &[2.0], 0)?;
        let mask = frames.mask(3, 10, 10)?;
        let adv = res[0].clipped.flatten_from(1)?.to_vec2::<f32>()?;
        let clean = xs.flatten_from(1)?.to_vec2::<f32>()?;
        for (a, x) in adv.iter().zip(&clean) {
            for ((av, xv), m) in a.iter().zip(x).zip(&mask) {
                assert!((-1.0..=1.0).contains(av));
                if *m == 0.0 {
                    assert_eq!(av.to_bits(), xv.to_bits());
                }
            }
        }
        assert!(
            res[0].success.iter().any(|&s| s),
            "no frame fooled the model"
        );
        assert!(frames
            .run(&model, bounds, &xs.flatten_from(1)?, &ys, &[2.0], 0)
            .is_err());
        Ok(())
    }
}
