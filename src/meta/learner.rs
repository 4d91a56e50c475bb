//! The meta-learner: w̃ and θ̃ with their outer optimisers (T-NAS Algorithm 1, line 9).

use super::adam::{Adam, AdamConfig};
use super::algorithm::TaskGradient;
use crate::nn::learned_rates::LearnedRates;
use crate::nn::params::ParamSet;
use crate::nn::supernet::Alphas;
use tch::Tensor;

/// Outer learning rates and the official θ optimiser settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OuterConfig {
    pub meta_lr_w: f64,
    pub meta_lr_theta: f64,
    /// L2 weight decay on θ̃ (official: 1e-3, with betas (0.5, 0.999)).
    pub theta_weight_decay: f64,
    /// Cosine annealing of both learning rates over the run (MAML++).
    pub cosine: bool,
}

impl OuterConfig {
    /// The factor on both learning rates at `iteration` of `iterations`: 1, or ½(1 + cos πt/T).
    pub fn lr_factor(&self, iteration: usize, iterations: usize) -> f64 {
        match self.cosine {
            true => {
                0.5 * (1.0
                    + (std::f64::consts::PI * iteration as f64 / iterations.max(1) as f64).cos())
            }
            false => 1.0,
        }
    }
}

#[derive(Debug)]
pub struct MetaLearner {
    /// w̃ (no classifier for a proto head).
    pub params: ParamSet,
    /// θ̃, for supernet algorithms.
    pub alphas: Option<Alphas>,
    pub adam_w: Adam,
    pub adam_theta: Option<Adam>,
    /// Meta-learned inner rates (T-NAS++), with their optimiser (the weights' learning rate).
    pub rates: Option<LearnedRates>,
    pub adam_rates: Option<Adam>,
    outer: OuterConfig,
}

impl MetaLearner {
    pub fn new(
        params: ParamSet,
        alphas: Option<Alphas>,
        rates: Option<LearnedRates>,
        outer: OuterConfig,
    ) -> Self {
        let adam_w = Adam::new(
            AdamConfig::new(outer.meta_lr_w),
            &params.tensors().iter().collect::<Vec<_>>(),
        );
        let theta_config = AdamConfig {
            beta1: 0.5,
            weight_decay: outer.theta_weight_decay,
            ..AdamConfig::new(outer.meta_lr_theta)
        };
        let adam_theta = alphas
            .as_ref()
            .map(|a| Adam::new(theta_config, &[&a.normal, &a.reduce]));
        let rates = rates.map(|r| LearnedRates {
            w: r.w.set_requires_grad(true),
            theta: r.theta.set_requires_grad(true),
        });
        let adam_rates = rates
            .as_ref()
            .map(|r| Adam::new(AdamConfig::new(outer.meta_lr_w), &[&r.w, &r.theta]));
        MetaLearner {
            params,
            alphas,
            adam_w,
            adam_theta,
            rates,
            adam_rates,
            outer,
        }
    }

    /// Averages the tasks' gradients and applies one Adam step to w̃ and θ̃, at the learning
    /// rates times `lr_factor` ([`OuterConfig::lr_factor`]).
    pub fn outer_step(&mut self, tasks: &[TaskGradient], lr_factor: f64) {
        self.adam_w.config.lr = self.outer.meta_lr_w * lr_factor;
        if let Some(adam) = &mut self.adam_theta {
            adam.config.lr = self.outer.meta_lr_theta * lr_factor;
        }
        let n = tasks.len() as f64;
        let mean = |pick: &dyn Fn(&TaskGradient) -> &Tensor| -> Tensor {
            tasks
                .iter()
                .map(|t| pick(t).shallow_clone())
                .reduce(|a, b| a + b)
                .expect("at least one task")
                / n
        };
        let grads_w: Vec<Tensor> = (0..self.params.len()).map(|i| mean(&|t| &t.w[i])).collect();
        self.adam_w
            .step(&self.params.tensors().iter().collect::<Vec<_>>(), &grads_w);
        if let (Some(alphas), Some(adam)) = (&self.alphas, &mut self.adam_theta) {
            let normal = mean(&|t| &t.theta.as_ref().expect("supernet tasks have θ gradients").0);
            let reduce = mean(&|t| &t.theta.as_ref().expect("supernet tasks have θ gradients").1);
            adam.step(&[&alphas.normal, &alphas.reduce], &[normal, reduce]);
        }
        if let (Some(rates), Some(adam)) = (&self.rates, &mut self.adam_rates) {
            adam.config.lr = self.outer.meta_lr_w * lr_factor;
            let w = mean(&|t| {
                &t.rates
                    .as_ref()
                    .expect("tasks adapted with learned rates have their gradients")
                    .0
            });
            let theta = mean(&|t| {
                &t.rates
                    .as_ref()
                    .expect("tasks adapted with learned rates have their gradients")
                    .1
            });
            adam.step(&[&rates.w, &rates.theta], &[w, theta]);
        }
    }
}
