//! The meta-gradient of one task under each algorithm (`--algo`).

use crate::adapt::{query_logits, BnMode, InnerLoop, SupportSet, TaskState};
use crate::model::metadata::HeadSpec;
use crate::nn::learned_rates::LearnedRates;
use crate::nn::network::Network;
use crate::nn::params::ParamSet;
use crate::nn::supernet::Alphas;
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
    /// MAML (second order) on a fixed network: Conv-4, or the cell network of `--genotype`.
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

    /// Whether the algorithm trains the DARTS supernet; MAML trains a fixed network (Conv-4). With
    /// `--genotype`, every algorithm trains that fixed cell network instead.
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
    logits
        .argmax(-1, false)
        .eq_tensor(labels)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[])
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
    pub fn task_gradient(
        &self,
        meta: &ParamSet,
        meta_alphas: Option<&Alphas>,
        task: &MetaTask,
    ) -> TaskGradient {
        let second_order = self.rule == GradientRule::SecondOrder;
        let inner = InnerLoop {
            second_order,
            ..self.inner
        };
        let (mut state, mut first_loss) = if second_order {
            // Leaves that share the meta-weights' storage: the graph runs from them through every step.
            let params = meta.map(|_, t| t.detach().set_requires_grad(true));
            let alphas = meta_alphas.map(|a| a.map(|t| t.detach().set_requires_grad(true)));
            let mut state = TaskState::new(params, alphas);
            state.temperature = self.network.relaxation().start_temperature();
            let first_loss = match self.head {
                // The head starts from the prototypes taken as constants (fo-Proto-MAML's choice):
                // the meta-gradient runs through every inner step, not through the head's start.
                HeadSpec::Proto { .. } => state.reset_proto_head(&task.support.on(self.network)),
                HeadSpec::Fixed { .. } => None,
            };
            (state, first_loss)
        } else {
            TaskState::start(
                self.network,
                meta,
                meta_alphas,
                self.head,
                &task.support,
                self.device,
            )
        };
        let gumbel = state
            .alphas
            .as_ref()
            .filter(|_| self.sample_architecture)
            .map(|a| gumbel_noise(a, task.seed));
        if let Some(noise) = &gumbel {
            // softmax(θ + g) is the Gumbel-softmax sample at temperature 1; adapting θ + g adapts θ.
            state.alphas = state.alphas.as_ref().map(|a| Alphas {
                normal: crate::runtime::grad::no_grad(|| &a.normal + &noise.normal)
                    .set_requires_grad(true),
                reduce: crate::runtime::grad::no_grad(|| &a.reduce + &noise.reduce)
                    .set_requires_grad(true),
            });
            first_loss = match self.head {
                HeadSpec::Proto { .. } => state.reset_proto_head(&task.support.on(self.network)),
                HeadSpec::Fixed { .. } => None,
            };
        }
        // With learned rates (first order too) the steps stay in the graph, their gradients
        // constants: the meta-gradient of the weights is still the adapted point's, and the
        // rates get theirs.
        state.rates = self.rates.clone();
        let origin = TaskState::new(state.params.clone(), state.alphas.clone());
        state
            .adapt(&task.support.on(self.network), &inner, first_loss, &|| true)
            .expect("never interrupted");
        let logits = query_logits(
            self.network,
            &state.params,
            state.mixing(self.network).as_ref(),
            &task.support,
            task.query,
            self.bn,
        );
        let loss = logits.cross_entropy_for_logits(task.query_labels);
        let (query_loss, query_accuracy) =
            (loss.double_value(&[]), accuracy(&logits, task.query_labels));
        let (w, theta, rates) = match self.rule {
            GradientRule::Reptile => crate::runtime::grad::no_grad(|| {
                let w = meta
                    .names()
                    .iter()
                    .map(|n| meta.get(n) - state.params.get(n))
                    .collect();
                let adapted = state.alphas.as_ref().map(|a| match &gumbel {
                    Some(noise) => Alphas {
                        normal: &a.normal - &noise.normal,
                        reduce: &a.reduce - &noise.reduce,
                    },
                    None => a.clone(),
                });
                let theta = meta_alphas
                    .zip(adapted.as_ref())
                    .map(|(m, a)| (&m.normal - &a.normal, &m.reduce - &a.reduce));
                (w, theta, None)
            }),
            GradientRule::FirstOrder | GradientRule::SecondOrder => {
                let at = if second_order || self.rates.is_some() {
                    &origin
                } else {
                    &state
                };
                let tables: Vec<&Tensor> =
                    self.rates.iter().flat_map(|r| [&r.w, &r.theta]).collect();
                let (w, theta, mut tables) = at.gradients_with(&loss, false, &tables);
                let rates = self
                    .rates
                    .as_ref()
                    .map(|_| (tables.remove(0), tables.remove(0)));
                let w = at.params.views_of(&w);
                (
                    meta.names()
                        .iter()
                        .map(|n| w.get(n).shallow_clone())
                        .collect(),
                    theta,
                    rates,
                )
            }
        };
        TaskGradient {
            w,
            theta,
            rates,
            query_loss,
            query_accuracy,
        }
    }
}

/// Standard Gumbel noise −log(−log U) for both θ matrices, drawn from `seed`.
fn gumbel_noise(alphas: &Alphas, seed: u64) -> Alphas {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut draw = |like: &Tensor| {
        let draws: Vec<f32> = (0..like.numel())
            .map(|_| -(-(rng.gen_range(f32::EPSILON..1.0)).ln()).ln())
            .collect();
        Tensor::from_slice(&draws)
            .view(like.size().as_slice())
            .to_device(like.device())
    };
    Alphas {
        normal: draw(&alphas.normal),
        reduce: draw(&alphas.reduce),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::task_tensors;
    use crate::nn::relaxation::Relaxation;
    use crate::nn::search_space::SearchSpace;
    use crate::nn::supernet::Supernet;

    /// With learned rates, a task's first-order meta-gradient is, for the weights and θ, the query
    /// loss's gradient at the adapted point (as without them), and for the rate of tensor i at
    /// step s, −⟨g_s, ∇L_q⟩ over tensor i's elements (g_s: step s's support gradient), here
    /// recomputed by adapting by hand.
    #[test]
    fn learned_rates_get_their_first_order_gradient() {
        let space = SearchSpace::tiny();
        let network = Network::Supernet(Supernet::relaxed(
            space,
            Relaxation::Annealed {
                start: 1.0,
                end: 0.3,
                pairwise_inputs: true,
                hard_end: false,
            },
        ));
        let head = HeadSpec::Proto {
            max_way: 5,
            learned_scale: true,
        };
        tch::manual_seed(2);
        let meta = ParamSet::initialise(
            &crate::model::checkpoint::param_specs(&network, head),
            Device::Cpu,
        );
        let alphas = Alphas::initialise(&space, Device::Cpu).map(|t| t * 300.0);
        let tensors = task_tensors(&meta, head);
        let rates = LearnedRates {
            w: Tensor::rand([2, tensors as i64], (Kind::Float, Device::Cpu)) * 0.2,
            theta: Tensor::from_slice(&[3f32, 5., 2., 4.]).view([2, 2]),
        };
        let learning = LearnedRates {
            w: rates.w.copy().set_requires_grad(true),
            theta: rates.theta.copy().set_requires_grad(true),
        };
        let (images, query) = (
            Tensor::randn([4, 1, 8, 8], (Kind::Float, Device::Cpu)),
            Tensor::randn([6, 1, 8, 8], (Kind::Float, Device::Cpu)),
        );
        let (labels, query_labels) = (
            Tensor::from_slice(&[0i64, 1, 0, 1]),
            Tensor::from_slice(&[0i64, 1, 0, 1, 1, 0]),
        );
        let support = SupportSet {
            images: &images,
            labels: &labels,
            n_way: 2,
        };
        let task = MetaTask {
            support: SupportSet { ..support },
            query: &query,
            query_labels: &query_labels,
            seed: 0,
        };
        let inner = InnerLoop {
            steps: 2,
            lr_w: 0.0,
            lr_theta: 0.0,
            second_order: false,
        };
        let context = TaskContext {
            network: &network,
            head,
            inner,
            bn: BnMode::Support,
            rule: GradientRule::FirstOrder,
            sample_architecture: false,
            rates: Some(learning),
            device: Device::Cpu,
        };
        let ours = context.task_gradient(&meta, Some(&alphas), &task);

        // By hand: first-order steps from fresh leaves, each step's support gradients kept.
        let (mut state, _) =
            TaskState::start(&network, &meta, Some(&alphas), head, &support, Device::Cpu);
        let mut steps = Vec::new();
        for step in 0..2 {
            state.temperature = network.relaxation().temperature(step, 2);
            let (g_w, g_theta) = state.gradients(&state.support_loss(&support.on(&network)), false);
            let (g_normal, g_reduce) = g_theta.unwrap();
            let (lr_normal, lr_reduce) = rates.for_theta(step);
            let (weights, a) = crate::runtime::grad::no_grad(|| {
                let a = state.alphas.as_ref().unwrap();
                (
                    state.params.flattened() - &g_w * rates.for_weights(step, &state.params),
                    Alphas {
                        normal: &a.normal - &g_normal * lr_normal,
                        reduce: &a.reduce - &g_reduce * lr_reduce,
                    },
                )
            });
            let temperature = state.temperature;
            state = TaskState::new(
                state.params.views_of(&weights.set_requires_grad(true)),
                Some(a.map(|t| t.set_requires_grad(true))),
            );
            state.temperature = temperature;
            steps.push((g_w, g_normal, g_reduce));
        }
        state.temperature = network.relaxation().temperature(2, 2);
        let loss = query_logits(
            &network,
            &state.params,
            state.mixing(&network).as_ref(),
            &support,
            &query,
            BnMode::Support,
        )
        .cross_entropy_for_logits(&query_labels);
        let (q_w, q_theta) = state.gradients(&loss, false);
        let (q_normal, q_reduce) = q_theta.unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let error =
                (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-12);
            assert!(error < 1e-4, "{what}: relative error {error}");
        };
        let by_name = state.params.views_of(&q_w);
        for (i, name) in meta.names().iter().enumerate() {
            close(&ours.w[i], by_name.get(name), name);
        }
        let (theta_normal, theta_reduce) = ours.theta.as_ref().unwrap();
        close(theta_normal, &q_normal, "θ normal");
        close(theta_reduce, &q_reduce, "θ reduce");
        let (rates_w, rates_theta) = ours.rates.as_ref().unwrap();
        for (step, (g_w, g_normal, g_reduce)) in steps.iter().enumerate() {
            let products = state.params.views_of(&(g_w * &q_w));
            let expected: Vec<f32> = products
                .tensors()
                .iter()
                .map(|t| -t.sum(Kind::Float).double_value(&[]) as f32)
                .collect();
            close(
                &rates_w.get(step as i64),
                &Tensor::from_slice(&expected),
                &format!("rates of step {step}"),
            );
            let theta = [
                -(g_normal * &q_normal).sum(Kind::Float).double_value(&[]) as f32,
                -(g_reduce * &q_reduce).sum(Kind::Float).double_value(&[]) as f32,
            ];
            close(
                &rates_theta.get(step as i64),
                &Tensor::from_slice(&theta),
                &format!("θ rates of step {step}"),
            );
        }
    }

    #[test]
    fn gumbel_noise_is_standard_gumbel_and_repeats_per_seed() {
        let like = Alphas {
            normal: Tensor::zeros([200, 100], (Kind::Float, Device::Cpu)),
            reduce: Tensor::zeros([200, 100], (Kind::Float, Device::Cpu)),
        };
        let (a, b) = (gumbel_noise(&like, 7), gumbel_noise(&like, 7));
        assert!(
            a.normal.equal(&b.normal) && a.reduce.equal(&b.reduce),
            "same seed, same draw"
        );
        assert!(
            !a.normal.equal(&a.reduce),
            "normal and reduce draw independently"
        );
        assert!(!gumbel_noise(&like, 8).normal.equal(&a.normal));
        // Gumbel(0, 1): mean = Euler–Mascheroni γ ≈ 0.5772, variance = π²/6 ≈ 1.645.
        let all = Tensor::cat(&[&a.normal, &a.reduce], 0);
        let (mean, var) = (
            all.mean(Kind::Float).double_value(&[]),
            all.var(true).double_value(&[]),
        );
        assert!((mean - 0.5772).abs() < 0.02, "mean {mean}");
        assert!((var - 1.6449).abs() < 0.05, "variance {var}");
    }
}
