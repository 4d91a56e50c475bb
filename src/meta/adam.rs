//! Adam for the outer (meta) update, with its state exposed so training can resume exactly.
//!
//! tch's optimizers bind to a `VarStore` and cannot save their moments; a resumable checkpoint needs
//! them, so this is PyTorch's `torch.optim.Adam` (L2 weight decay added to the gradient, bias-corrected
//! moments) over plain tensors.

use tch::Tensor;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamConfig {
    pub fn new(lr: f64) -> Self {
        AdamConfig {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Adam state for one group of parameters.
#[derive(Debug)]
pub struct Adam {
    pub config: AdamConfig,
    pub steps: i64,
    /// First and second moments, one per parameter, same order as the parameters.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl Adam {
    pub fn new(config: AdamConfig, params: &[&Tensor]) -> Self {
        let zeros = || params.iter().map(|p| p.zeros_like()).collect();
        Adam {
            config,
            steps: 0,
            m: zeros(),
            v: zeros(),
        }
    }

    /// One update of `params` in place with `grads` (same order).
    pub fn step(&mut self, params: &[&Tensor], grads: &[Tensor]) {
        let c = self.config;
        self.steps += 1;
        let bias1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bias2 = 1.0 - c.beta2.powi(self.steps as i32);
        crate::runtime::grad::no_grad(|| {
            for (i, (p, g)) in params.iter().zip(grads).enumerate() {
                let g = if c.weight_decay != 0.0 {
                    g + *p * c.weight_decay
                } else {
                    g.shallow_clone()
                };
                self.m[i] = &self.m[i] * c.beta1 + &g * (1.0 - c.beta1);
                self.v[i] = &self.v[i] * c.beta2 + g.square() * (1.0 - c.beta2);
                let denom = (&self.v[i] / bias2).sqrt() + c.eps;
                let update = &self.m[i] / denom * (c.lr / bias1);
                let _ = p.shallow_clone().f_sub_(&update).expect("shapes match");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Five steps on f(p) = Σ p² + 0.1·p³ from (1, −2, 0.5), lr 0.1, against the values
    /// `torch.optim.Adam` reaches (PyTorch 2.11), with the default betas and with θ̃'s official
    /// betas (0.5, 0.999) and an L2 weight decay large enough to show.
    #[test]
    fn five_steps_match_pytorch() {
        let cases = [
            (0.9, 0.0, [0.5091376f32, -1.5016961, 0.0293878]),
            (0.5, 0.1, [0.5346816, -1.5090454, 0.0807966]),
        ];
        for (beta1, weight_decay, expected) in cases {
            let p = Tensor::from_slice(&[1.0f32, -2.0, 0.5]);
            let mut adam = Adam::new(
                AdamConfig {
                    beta1,
                    weight_decay,
                    ..AdamConfig::new(0.1)
                },
                &[&p],
            );
            for _ in 0..5 {
                let gradient = &p * 2.0 + p.square() * 0.3;
                adam.step(&[&p], &[gradient]);
            }
            let got: Vec<f32> = Vec::try_from(&p).unwrap();
            for (g, e) in got.iter().zip(expected) {
                assert!((g - e).abs() < 1e-5, "betas ({beta1}, 0.999), weight decay {weight_decay}: {got:?}, PyTorch {expected:?}");
            }
            assert_eq!(adam.steps, 5);
        }
    }
}
