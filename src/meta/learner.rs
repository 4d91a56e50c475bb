//! The meta-learner: w̃ and θ̃ with their outer optimisers (T-NAS Algorithm 1, line 9).

use super::adam::{Adam, AdamConfig};
use super::algorithm::TaskGradient;
use crate::params::ParamSet;
use crate::supernet::Alphas;
use tch::Tensor;

/// Outer learning rates and the official θ optimiser settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OuterConfig {
    pub meta_lr_w: f64,
    pub meta_lr_theta: f64,
    /// L2 weight decay on θ̃ (official: 1e-3, with betas (0.5, 0.999)).
    pub theta_weight_decay: f64,
}

#[derive(Debug)]
pub struct MetaLearner {
    /// w̃ (no classifier for a proto head).
    pub params: ParamSet,
    /// θ̃, for supernet algorithms.
    pub alphas: Option<Alphas>,
    pub adam_w: Adam,
    pub adam_theta: Option<Adam>,
}

impl MetaLearner {
    pub fn new(params: ParamSet, alphas: Option<Alphas>, outer: OuterConfig) -> Self {
        let adam_w = Adam::new(AdamConfig::new(outer.meta_lr_w), &params.tensors().iter().collect::<Vec<_>>());
        let theta_config = AdamConfig { beta1: 0.5, weight_decay: outer.theta_weight_decay, ..AdamConfig::new(outer.meta_lr_theta) };
        let adam_theta = alphas.as_ref().map(|a| Adam::new(theta_config, &[&a.normal, &a.reduce]));
        MetaLearner { params, alphas, adam_w, adam_theta }
    }

    /// Averages the tasks' gradients and applies one Adam step to w̃ and θ̃.
    pub fn outer_step(&mut self, tasks: &[TaskGradient]) {
        let n = tasks.len() as f64;
        let mean = |pick: &dyn Fn(&TaskGradient) -> &Tensor| -> Tensor {
            tasks.iter().map(|t| pick(t).shallow_clone()).reduce(|a, b| a + b).expect("at least one task") / n
        };
        let grads_w: Vec<Tensor> = (0..self.params.len()).map(|i| mean(&|t| &t.w[i])).collect();
        self.adam_w.step(&self.params.tensors().iter().collect::<Vec<_>>(), &grads_w);
        if let (Some(alphas), Some(adam)) = (&self.alphas, &mut self.adam_theta) {
            let normal = mean(&|t| &t.theta.as_ref().expect("supernet tasks have θ gradients").0);
            let reduce = mean(&|t| &t.theta.as_ref().expect("supernet tasks have θ gradients").1);
            adam.step(&[&alphas.normal, &alphas.reduce], &[normal, reduce]);
        }
    }
}
