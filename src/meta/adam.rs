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
        AdamConfig { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
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
        Adam { config, steps: 0, m: zeros(), v: zeros() }
    }

    /// One update of `params` in place with `grads` (same order).
    pub fn step(&mut self, params: &[&Tensor], grads: &[Tensor]) {
        let c = self.config;
        self.steps += 1;
        let bias1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bias2 = 1.0 - c.beta2.powi(self.steps as i32);
        crate::grad::no_grad(|| {
            for (i, (p, g)) in params.iter().zip(grads).enumerate() {
                let g = if c.weight_decay != 0.0 { g + *p * c.weight_decay } else { g.shallow_clone() };
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

    /// Early Adam steps move each coordinate by about lr, whatever the gradient's scale.
    #[test]
    fn minimises_a_quadratic_like_pytorch() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]);
        let mut adam = Adam::new(AdamConfig { weight_decay: 0.01, ..AdamConfig::new(0.1) }, &[&p]);
        for _ in 0..3 {
            let g = &p * 2.0;
            adam.step(&[&p], &[g]);
        }
        let v: Vec<f32> = Vec::try_from(&p).unwrap();
        assert!((v[0] - 0.7).abs() < 0.01 && (v[1] + 1.7).abs() < 0.01, "{v:?}");
        assert_eq!(adam.steps, 3);
    }
}
