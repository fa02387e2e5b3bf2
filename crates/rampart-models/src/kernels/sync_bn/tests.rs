use super::*;
use crate::kernels::bn;
use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};
use std::sync::{Barrier, Mutex};

fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen::<f32>() * 4.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Worker threads summing in rank order: each call posts its values, waits for the
/// others, adds every worker's in rank order, and waits again before the next call.
#[derive(Debug)]
struct ThreadSum {
    rank: usize,
    shared: Arc<(Barrier, Mutex<Vec<Vec<f64>>>)>,
}

impl ChannelSum for ThreadSum {
    fn sum(&self, values: &Tensor) -> Result<Tensor> {
        let (barrier, slots) = &*self.shared;
        slots.lock().unwrap()[self.rank] = values.to_vec1::<f64>()?;
        barrier.wait();
        let total = {
            let slots = slots.lock().unwrap();
            let mut total = vec![0f64; slots[0].len()];
            for s in slots.iter() {
                total.iter_mut().zip(s).for_each(|(t, v)| *t += v);
            }
            total
        };
        barrier.wait();
        Tensor::new(total.as_slice(), values.device())
    }
}

/// What one BatchNorm computes for a probe loss Σ p·BN(x) (+ ReLU).
struct Out {
    y: Vec<f32>,
    dx: Vec<f32>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
    stats: BatchStats,
}

/// y, dx, dγ, dβ of a probe loss Σ p·BN(x) (+ ReLU) over `x`.
fn outputs(
    x: &Tensor,
    probe: &Tensor,
    gamma: &Var,
    beta: &Var,
    relu: bool,
    sum: Option<Arc<dyn ChannelSum>>,
) -> Result<Out> {
    let xv = Var::from_tensor(x)?;
    let (y, stats) = match sum {
        Some(sum) => {
            let (y, stats) = train(xv.as_tensor(), gamma, beta, 1e-5, relu, &sum)?;
            (y, stats.expect("statistics of a batch with rows"))
        }
        None => bn::train(xv.as_tensor(), gamma, beta, 1e-5, relu)?,
    };
    let grads = (&y * probe)?.sum_all()?.backward()?;
    let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let g = |v: &Var| flat(grads.get(v.as_tensor()).expect("a gradient"));
    Ok(Out {
        y: flat(&y)?,
        dx: g(&xv)?,
        dgamma: g(gamma)?,
        dbeta: g(beta)?,
        stats,
    })
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        worst <= tol * scale,
        "{what}: differs by {worst} (scale {scale})"
    );
}

/// Two workers with half a batch each, synchronised, compute what one BatchNorm
/// computes on the whole batch: the outputs and input gradients of their rows, and
/// (summed over the workers) the parameter gradients; and the same statistics. With
/// and without the ReLU.
#[test]
fn two_synchronised_halves_equal_the_whole_batch() -> Result<()> {
    let c = 5;
    let x = rand_tensor(&[6, 3, 3, c], 1);
    let probe = rand_tensor(&[6, 3, 3, c], 2);
    let gamma = Var::from_tensor(&(rand_tensor(&[c], 3) + 1.0)?)?;
    let beta = Var::from_tensor(&rand_tensor(&[c], 4))?;
    for relu in [false, true] {
        let whole = outputs(&x, &probe, &gamma, &beta, relu, None)?;
        let shared = Arc::new((Barrier::new(2), Mutex::new(vec![Vec::new(); 2])));
        let halves: Vec<Result<Out>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let shared = shared.clone();
                    let (x, probe, gamma, beta) = (&x, &probe, &gamma, &beta);
                    s.spawn(move || {
                        let sum: Arc<dyn ChannelSum> = Arc::new(ThreadSum { rank, shared });
                        let rows = |t: &Tensor| t.narrow(0, 3 * rank, 3);
                        outputs(&rows(x)?, &rows(probe)?, gamma, beta, relu, Some(sum))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let halves = halves.into_iter().collect::<Result<Vec<Out>>>()?;
        let joined = |f: fn(&Out) -> &Vec<f32>| -> Vec<f32> {
            halves.iter().flat_map(|h| f(h).clone()).collect()
        };
        close(&joined(|h| &h.y), &whole.y, 1e-5, "outputs");
        close(&joined(|h| &h.dx), &whole.dx, 1e-4, "input gradient");
        let summed = |f: fn(&Out) -> &Vec<f32>| -> Vec<f32> {
            f(&halves[0])
                .iter()
                .zip(f(&halves[1]))
                .map(|(a, b)| a + b)
                .collect()
        };
        close(
            &summed(|h| &h.dgamma),
            &whole.dgamma,
            1e-4,
            "scale gradient",
        );
        close(&summed(|h| &h.dbeta), &whole.dbeta, 1e-5, "shift gradient");
        let (m, v) = whole.stats.mean_var()?;
        for h in &halves {
            let (hm, hv) = h.stats.mean_var()?;
            close(&hm.to_vec1::<f32>()?, &m.to_vec1::<f32>()?, 1e-5, "mean");
            close(
                &hv.to_vec1::<f32>()?,
                &v.to_vec1::<f32>()?,
                1e-5,
                "variance",
            );
            assert_eq!(h.stats.rows, whole.stats.rows);
        }
    }
    Ok(())
}

/// The scope is per thread and ends with its guard; a model's train-mode forward
/// inside it takes the synchronised layers (one worker: the plain result).
#[test]
fn the_scope_is_per_thread_and_ends_with_its_guard() -> Result<()> {
    #[derive(Debug)]
    struct Alone;
    impl ChannelSum for Alone {
        fn sum(&self, values: &Tensor) -> Result<Tensor> {
            Ok(values.clone())
        }
    }
    assert!(current().is_none());
    {
        let _scope = SyncScope::new(Arc::new(Alone));
        assert!(current().is_some());
        std::thread::spawn(|| assert!(current().is_none()))
            .join()
            .unwrap();
        let x = rand_tensor(&[4, 2, 2, 3], 5);
        let probe = rand_tensor(&[4, 2, 2, 3], 6);
        let gamma = Var::from_tensor(&rand_tensor(&[3], 7))?;
        let beta = Var::from_tensor(&rand_tensor(&[3], 8))?;
        let sync = outputs(&x, &probe, &gamma, &beta, true, Some(Arc::new(Alone)))?;
        let plain = outputs(&x, &probe, &gamma, &beta, true, None)?;
        close(&sync.y, &plain.y, 1e-5, "outputs");
        close(&sync.dx, &plain.dx, 1e-4, "input gradient");
    }
    assert!(current().is_none());
    Ok(())
}
