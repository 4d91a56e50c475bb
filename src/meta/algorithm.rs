//! The meta-gradient of one task under each algorithm (`--algo`).

use crate::adapt::{query_logits, BnMode, InnerLoop, SupportSet, TaskState};
use crate::metadata::HeadSpec;
use crate::network::Network;
use crate::learned_rates::LearnedRates;
use crate::params::ParamSet;
use crate::supernet::Alphas;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// `--algo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// First-order T-NAS (Eq. 7): the query-loss gradient at the adapted [w; θ].
    Tnas,
    /// T-NAS on MAML++: first-order T-NAS with meta-learned per-step, per-tensor inner rates, a
    /// meta-learned logit scale on the proto head and cosine annealing of the outer rates.
    #[value(name = "tnas++")]
    #[serde(rename = "tnas++")]
    TnasPlusPlus,
    /// T-NAS with second-order gradients through the inner steps.
    #[value(name = "tnas-2nd")]
    #[serde(rename = "tnas-2nd")]
    Tnas2nd,
    /// MAML (second order) on the fixed Conv-4 network.
    Maml,
    /// Reptile outer update (w̃ − w_task) on the supernet, as Auto-Meta and MetaNAS.
    Reptile,
    /// BASE: each task adapts a Gumbel-softmax sample of the architecture, then a Reptile update
    /// of the weights and θ.
    Base,
}

/// How the outer gradient of a task is formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradientRule {
    FirstOrder,
    SecondOrder,
    Reptile,
}

impl Algorithm {
    pub fn rule(self) -> GradientRule {
        match self {
            Algorithm::Tnas | Algorithm::TnasPlusPlus => GradientRule::FirstOrder,
            Algorithm::Tnas2nd | Algorithm::Maml => GradientRule::SecondOrder,
            Algorithm::Reptile | Algorithm::Base => GradientRule::Reptile,
        }
    }

    /// Whether each task adapts a Gumbel-softmax sample of θ rather than θ itself.
    pub fn samples_architecture(self) -> bool {
        self == Algorithm::Base
    }

    /// Whether the inner loop meta-learns its rates, logit scale and outer schedule (MAML++).
    pub fn is_maml_plus_plus(self) -> bool {
        self == Algorithm::TnasPlusPlus
    }

    /// Whether the network is the DARTS supernet (else Conv-4).
    pub fn uses_supernet(self) -> bool {
        self != Algorithm::Maml
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Tnas => "tnas",
            Algorithm::TnasPlusPlus => "tnas++",
            Algorithm::Tnas2nd => "tnas-2nd",
            Algorithm::Maml => "maml",
            Algorithm::Reptile => "reptile",
            Algorithm::Base => "base",
        }
    }
}

/// One episode on the compute device.
pub struct MetaTask<'a> {
    pub support: SupportSet<'a>,
    pub query: &'a Tensor,
    pub query_labels: &'a Tensor,
    /// Seeds the task's own random draws (the Gumbel noise of `base`), so runs repeat and resume exactly.
    pub seed: u64,
}

/// What one task contributes to the outer update.
pub struct TaskGradient {
    /// One gradient per meta-weight, in the meta [`ParamSet`]'s order.
    pub w: Vec<Tensor>,
    /// Gradients of θ̃ (normal, reduce) for supernet algorithms.
    pub theta: Option<(Tensor, Tensor)>,
    /// Gradients of the learned rate tables (w, θ), when the inner loop uses them.
    pub rates: Option<(Tensor, Tensor)>,
    pub query_loss: f64,
    pub query_accuracy: f64,
}

/// Fraction of rows whose argmax equals the label.
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> f64 {
    logits.argmax(-1, false).eq_tensor(labels).to_kind(Kind::Float).mean(Kind::Float).double_value(&[])
}

/// Everything fixed across the tasks of a run.
pub struct TaskContext<'a> {
    pub network: &'a Network,
    pub head: HeadSpec,
    pub inner: InnerLoop,
    pub bn: BnMode,
    pub rule: GradientRule,
    /// `base`: adapt softmax(θ + g) with Gumbel noise g drawn once per task.
    pub sample_architecture: bool,
    /// Meta-learned inner rates, used by every task and learned from their query losses.
    pub rates: Option<LearnedRates>,
    pub device: Device,
}

impl TaskContext<'_> {
    /// Adapts to one task from (w̃, θ̃) and returns its meta-gradient (T-NAS Algorithm 1, lines 4–8).
    pub fn task_gradient(&self, meta: &ParamSet, meta_alphas: Option<&Alphas>, task: &MetaTask) -> TaskGradient {
        let second_order = self.rule == GradientRule::SecondOrder;
        let inner = InnerLoop { second_order, ..self.inner };
        let mut state = if second_order {
            // Leaves that share the meta-weights' storage: the graph runs from them through every step.
            let params = meta.map(|_, t| t.detach().set_requires_grad(true));
            let alphas = meta_alphas.map(|a| a.map(|t| t.detach().set_requires_grad(true)));
            let mut state = TaskState::new(params, alphas);
            state.temperature = self.network.relaxation().temperature(0, 1);
            if let HeadSpec::Proto { .. } = self.head {
                // The head starts from the prototypes taken as constants (fo-Proto-MAML's choice):
                // the meta-gradient runs through every inner step, not through the head's start.
                state.reset_proto_head(self.network, &task.support);
            }
            state
        } else {
            TaskState::start(self.network, meta, meta_alphas, self.head, &task.support, self.device)
        };
        let gumbel = state.alphas.as_ref().filter(|_| self.sample_architecture).map(|a| gumbel_noise(a, task.seed));
        if let Some(noise) = &gumbel {
            // softmax(θ + g) is the Gumbel-softmax sample at temperature 1; adapting θ + g adapts θ.
            state.alphas = state.alphas.as_ref().map(|a| Alphas {
                normal: crate::grad::no_grad(|| &a.normal + &noise.normal).set_requires_grad(true),
                reduce: crate::grad::no_grad(|| &a.reduce + &noise.reduce).set_requires_grad(true),
            });
            if let HeadSpec::Proto { .. } = self.head {
                state.reset_proto_head(self.network, &task.support);
            }
        }
        // With learned rates (first order too) the steps stay in the graph, their gradients
        // constants: the meta-gradient of the weights is still the adapted point's, and the
        // rates get theirs.
        state.rates = self.rates.clone();
        let origin = TaskState::new(state.params.clone(), state.alphas.clone());
        state.adapt(self.network, &task.support, &inner, &|| true).expect("never interrupted");
        let logits = query_logits(self.network, &state.params, state.mixing(self.network).as_ref(), &task.support, task.query, self.bn);
        let loss = logits.cross_entropy_for_logits(task.query_labels);
        let (query_loss, query_accuracy) = (loss.double_value(&[]), accuracy(&logits, task.query_labels));
        let (w, theta, rates) = match self.rule {
            GradientRule::Reptile => crate::grad::no_grad(|| {
                let w = meta.names().iter().map(|n| meta.get(n) - state.params.get(n)).collect();
                let adapted = state.alphas.as_ref().map(|a| match &gumbel {
                    Some(noise) => Alphas { normal: &a.normal - &noise.normal, reduce: &a.reduce - &noise.reduce },
                    None => a.clone(),
                });
                let theta = meta_alphas.zip(adapted.as_ref()).map(|(m, a)| (&m.normal - &a.normal, &m.reduce - &a.reduce));
                (w, theta, None)
            }),
            GradientRule::FirstOrder | GradientRule::SecondOrder => {
                let at = if second_order || self.rates.is_some() { &origin } else { &state };
                let tables: Vec<&Tensor> = self.rates.iter().flat_map(|r| [&r.w, &r.theta]).collect();
                let (w, theta, mut tables) = at.gradients_with(&loss, false, &tables);
                let rates = self.rates.as_ref().map(|_| (tables.remove(0), tables.remove(0)));
                let w = at.params.views_of(&w);
                (meta.names().iter().map(|n| w.get(n).shallow_clone()).collect(), theta, rates)
            }
        };
        TaskGradient { w, theta, rates, query_loss, query_accuracy }
    }
}

/// Standard Gumbel noise −log(−log U) for both θ matrices, drawn from `seed`.
fn gumbel_noise(alphas: &Alphas, seed: u64) -> Alphas {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut draw = |like: &Tensor| {
        let draws: Vec<f32> = (0..like.numel()).map(|_| -(-(rng.gen_range(f32::EPSILON..1.0)).ln()).ln()).collect();
        Tensor::from_slice(&draws).view(like.size().as_slice()).to_device(like.device())
    };
    Alphas { normal: draw(&alphas.normal), reduce: draw(&alphas.reduce) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gumbel_noise_is_standard_gumbel_and_repeats_per_seed() {
        let like = Alphas { normal: Tensor::zeros([200, 100], (Kind::Float, Device::Cpu)), reduce: Tensor::zeros([200, 100], (Kind::Float, Device::Cpu)) };
        let (a, b) = (gumbel_noise(&like, 7), gumbel_noise(&like, 7));
        assert!(a.normal.equal(&b.normal) && a.reduce.equal(&b.reduce), "same seed, same draw");
        assert!(!a.normal.equal(&a.reduce), "normal and reduce draw independently");
        assert!(!gumbel_noise(&like, 8).normal.equal(&a.normal));
        // Gumbel(0, 1): mean = Euler–Mascheroni γ ≈ 0.5772, variance = π²/6 ≈ 1.645.
        let all = Tensor::cat(&[&a.normal, &a.reduce], 0);
        let (mean, var) = (all.mean(Kind::Float).double_value(&[]), all.var(true).double_value(&[]));
        assert!((mean - 0.5772).abs() < 0.02, "mean {mean}");
        assert!((var - 1.6449).abs() < 0.05, "variance {var}");
    }
}
