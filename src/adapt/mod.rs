//! Task adaptation: T-NAS Algorithm 2 (M joint SGD steps on [w; θ] over the support set) and
//! prediction for the task's queries, with the supernet or with the decoded derived network.
//!
//! Everything works on a task's own copies ([`TaskState`]); the meta-weights are only read. The
//! inner loop and a proto head's start are written once, over a [`SupportPass`]: one task on its
//! network ([`OneTask`]), or several tasks stacked into one pass ([`crate::adapt::task_batch`]).

pub mod task_batch;
pub mod task_model;
pub mod views;

use crate::model::metadata::HeadSpec;
pub use crate::model::settings::{Adaptation, BnMode, PredictWith};
use crate::nn::derived::DerivedNetwork;
use crate::nn::genotype::Genotype;
use crate::nn::head::{
    classify, prototype_classifier, CLASSIFIER_BIAS, CLASSIFIER_WEIGHT, LOGIT_SCALE,
};
use crate::nn::learned_rates::LearnedRates;
use crate::nn::network::Network;
use crate::nn::ops::BnStats;
use crate::nn::params::ParamSet;
use crate::nn::relaxation::Relaxation;
use crate::nn::supernet::Alphas;
use task_model::TaskModel;
use tch::{Device, Tensor};

/// A task's support set on the compute device.
pub struct SupportSet<'a> {
    /// [N_s, C, H, W]
    pub images: &'a Tensor,
    /// [N_s] class indices in 0..n_way.
    pub labels: &'a Tensor,
    pub n_way: usize,
}

/// The forward passes over a support set that adapting a [`TaskState`] takes: the state may hold
/// one task or several stacked task by task, each with its own classifier.
pub trait SupportPass {
    /// The support images' features under the state's weights and θ (support-batch BN).
    fn features(&self, state: &TaskState) -> Tensor;
    /// A proto head built from each task's support prototypes in `features`: (weight, bias).
    fn prototype_head(&self, features: &Tensor) -> (Tensor, Tensor);
    /// The support loss of `features` under the state's classifier (with several tasks, the sum of
    /// their losses, so each task's gradient is its own).
    fn loss(&self, state: &TaskState, features: &Tensor) -> Tensor;
    /// How θ is relaxed, and annealed over the steps.
    fn relaxation(&self) -> Relaxation;
}

/// One task's support set, forwarded through `network`.
pub struct OneTask<'a> {
    pub network: &'a Network,
    pub support: &'a SupportSet<'a>,
}

impl SupportPass for OneTask<'_> {
    fn features(&self, state: &TaskState) -> Tensor {
        self.network.features(
            &state.params,
            state.mixing(self.network).as_ref(),
            self.support.images,
            BnStats::Batch,
        )
    }

    fn prototype_head(&self, features: &Tensor) -> (Tensor, Tensor) {
        prototype_classifier(features, self.support.labels, self.support.n_way)
    }

    fn loss(&self, state: &TaskState, features: &Tensor) -> Tensor {
        classify(&state.params, features).cross_entropy_for_logits(self.support.labels)
    }

    fn relaxation(&self) -> Relaxation {
        self.network.relaxation()
    }
}

impl<'a> SupportSet<'a> {
    /// This support set forwarded through `network`.
    pub fn on(&'a self, network: &'a Network) -> OneTask<'a> {
        OneTask {
            network,
            support: self,
        }
    }
}

/// Inner-loop hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InnerLoop {
    pub steps: usize,
    pub lr_w: f64,
    pub lr_theta: f64,
    /// Keep the graph through the steps (second-order meta-gradients, `tnas-2nd`).
    pub second_order: bool,
}

impl InnerLoop {
    /// The adaptation steps `settings` ask for (first order, as served).
    pub fn of(settings: &Adaptation) -> InnerLoop {
        InnerLoop {
            steps: settings.steps,
            lr_w: settings.lr_w,
            lr_theta: settings.lr_theta,
            second_order: false,
        }
    }

    /// The derived network's weight-only fine-tuning steps `settings` ask for.
    pub fn finetuning(settings: &Adaptation) -> InnerLoop {
        InnerLoop {
            steps: settings.finetune_steps,
            ..InnerLoop::of(settings)
        }
    }
}

/// A task's own weights and architecture logits, where this task's autograd graph starts (the
/// weights are views of one flat leaf, see [`ParamSet::task_copy`]).
#[derive(Debug)]
pub struct TaskState {
    pub params: ParamSet,
    pub alphas: Option<Alphas>,
    /// The temperature θ is read at by the next forward pass ([`crate::nn::relaxation::Relaxation::temperature`]).
    pub temperature: f64,
    /// Meta-learned rates that replace the inner loop's `lr_w` and `lr_theta` when set.
    pub rates: Option<LearnedRates>,
    /// Steps taken so far: which row of the learned rates the next step reads.
    pub step: usize,
}

/// Returned when the caller's `keep_going` says stop (deadline passed, client gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted {
    pub completed_steps: usize,
}

impl TaskState {
    pub fn new(params: ParamSet, alphas: Option<Alphas>) -> TaskState {
        TaskState {
            params,
            alphas,
            temperature: 1.0,
            rates: None,
            step: 0,
        }
    }

    /// θ's mixing weights at this state's temperature; `None` for networks without θ.
    pub fn mixing(&self, network: &Network) -> Option<Alphas> {
        match (network, &self.alphas) {
            (Network::Supernet(net), Some(alphas)) => Some(net.mixing(alphas, self.temperature)),
            _ => None,
        }
    }

    /// A task's starting point: copies of w̃ (and θ̃), plus, for a proto head, the classifier built
    /// from the support prototypes under the starting weights. Also returns the support loss that
    /// building the head computed: the first step's loss, for [`TaskState::adapt`].
    pub fn start(
        network: &Network,
        meta: &ParamSet,
        meta_alphas: Option<&Alphas>,
        head: HeadSpec,
        support: &SupportSet,
        device: Device,
    ) -> (TaskState, Option<Tensor>) {
        let mut state = TaskState::new(
            meta.task_copy(&network.weight_runs(), device, 1),
            meta_alphas.map(|a| a.task_copy(device, 1)),
        );
        state.temperature = network.relaxation().start_temperature();
        let first_loss = match head {
            HeadSpec::Proto { .. } => state.reset_proto_head(&support.on(network)),
            HeadSpec::Fixed { .. } => None,
        };
        (state, first_loss)
    }

    /// Rebuilds the classifier from the support prototypes under the current weights. The forward
    /// pass that gives the prototypes also gives the support loss with the new classifier: it is
    /// returned, so that the next step (given it) need not repeat the pass. `None` when the loss
    /// has no graph (under `no_grad`), or when replacing a classifier that lay in the weights' flat
    /// tensor (after a step) left the weights as separate views, which the pass did not read.
    pub fn reset_proto_head(&mut self, pass: &dyn SupportPass) -> Option<Tensor> {
        let features = pass.features(self);
        let (w, b) = crate::runtime::grad::no_grad(|| pass.prototype_head(&features));
        let was_flat = self.params.is_flat();
        self.set_classifier(w, b);
        (self.params.is_flat() == was_flat)
            .then(|| pass.loss(self, &features))
            .filter(Tensor::requires_grad)
    }

    /// Sets the classifier (a proto head's, built for the task) as leaves of their own. Added
    /// after the weights' flat tensor, they leave it whole ([`ParamSet::insert`]).
    pub fn set_classifier(&mut self, weight: Tensor, bias: Tensor) {
        self.params
            .insert(CLASSIFIER_WEIGHT.into(), weight.set_requires_grad(true));
        self.params
            .insert(CLASSIFIER_BIAS.into(), bias.set_requires_grad(true));
    }

    /// Support-set cross-entropy at the current point (support-batch BN).
    pub fn support_loss(&self, pass: &dyn SupportPass) -> Tensor {
        pass.loss(self, &pass.features(self))
    }

    /// ∇ `loss` with respect to the weights, laid out flat as [`ParamSet::flattened`] lays them,
    /// and to θ (normal, reduce) when present. `keep_graph` keeps the graph of the gradients, for
    /// second-order meta-gradients. When the weights are views of one flat tensor, the gradient
    /// is taken with respect to it ([`ParamSet::flat_parts`]): its backward gathers every weight's
    /// gradient in one piece.
    pub fn gradients(&self, loss: &Tensor, keep_graph: bool) -> (Tensor, Option<(Tensor, Tensor)>) {
        let (weights, theta, _) = self.gradients_with(loss, keep_graph, &[]);
        (weights, theta)
    }

    /// [`TaskState::gradients`], and in the same backward pass those of `extra` tensors (zeros for
    /// one the loss does not reach).
    pub fn gradients_with(
        &self,
        loss: &Tensor,
        keep_graph: bool,
        extra: &[&Tensor],
    ) -> (Tensor, Option<(Tensor, Tensor)>, Vec<Tensor>) {
        let mut inputs = self.params.flat_parts();
        let n = inputs.len();
        if let Some(a) = &self.alphas {
            inputs.extend([&a.normal, &a.reduce]);
        }
        inputs.extend(extra);
        let mut grads = Tensor::run_backward(&[loss], &inputs, keep_graph, keep_graph);
        // An extra the loss does not reach (a fixed genotype's θ rates) has a zero gradient;
        // autograd leaves it undefined.
        let extra = grads
            .split_off(inputs.len() - extra.len())
            .into_iter()
            .zip(extra)
            .map(|(grad, input)| match grad.defined() {
                true => grad,
                false => input.zeros_like(),
            })
            .collect();
        let theta = self
            .alphas
            .as_ref()
            .map(|_| (grads.remove(n), grads.remove(n)));
        let weights = ParamSet::join(&grads);
        (weights, theta, extra)
    }

    /// One step of T-NAS Algorithm 2: forward the support set with softmax(θ), cross-entropy, one
    /// backward pass, then plain SGD. `loss` is the support loss at this point when the caller
    /// already has it ([`TaskState::reset_proto_head`]). Returns the loss (detached).
    pub fn sgd_step(
        &mut self,
        pass: &dyn SupportPass,
        inner: &InnerLoop,
        loss: Option<Tensor>,
    ) -> Tensor {
        let loss = loss.unwrap_or_else(|| self.support_loss(pass));
        self.descend(&loss, inner);
        loss.detach()
    }

    /// Plain SGD down `loss`: w ← w − lr_w ∇_w L, θ ← θ − lr_θ ∇_θ L, with the learned rates of
    /// this step when the state has them. The weights (hundreds of tensors) update as one flat
    /// tensor whose views are the new weights: a handful of ops instead of two per weight tensor,
    /// so a GPU step launches hundreds fewer kernels.
    pub fn descend(&mut self, loss: &Tensor, inner: &InnerLoop) {
        let (grad_w, grad_theta) = self.gradients(loss, inner.second_order);
        let stepped = || {
            // The step's learned rate where there is one, else the hand-set one.
            let scaled = |grad: &Tensor, learned: Option<Tensor>, lr: f64| {
                learned.map_or_else(|| grad * lr, |rate| grad * rate)
            };
            let rates = self.rates.as_ref();
            let weights = self.params.flattened()
                - scaled(
                    &grad_w,
                    rates.map(|r| r.for_weights(self.step, &self.params)),
                    inner.lr_w,
                );
            let (lr_normal, lr_reduce) = rates.map(|r| r.for_theta(self.step)).unzip();
            let alphas =
                self.alphas
                    .as_ref()
                    .zip(grad_theta.as_ref())
                    .map(|(a, (normal, reduce))| Alphas {
                        normal: &a.normal - scaled(normal, lr_normal, inner.lr_theta),
                        reduce: &a.reduce - scaled(reduce, lr_reduce, inner.lr_theta),
                    });
            (weights, alphas)
        };
        // First order: each step's graph starts at fresh leaves, so the update itself is not
        // recorded; unless rates being learned need it (the gradients themselves stay constants).
        let (weights, alphas) =
            if inner.second_order || self.rates.as_ref().is_some_and(LearnedRates::requires_grad) {
                stepped()
            } else {
                let (weights, alphas) = crate::runtime::grad::no_grad(stepped);
                (
                    weights.set_requires_grad(true),
                    alphas.map(|a| a.map(|t| t.set_requires_grad(true))),
                )
            };
        let (temperature, rates, step) = (self.temperature, self.rates.take(), self.step + 1);
        *self = TaskState {
            temperature,
            rates,
            step,
            ..TaskState::new(self.params.views_of(&weights), alphas)
        };
    }

    /// Runs `inner.steps` steps from the state as it is (`first_loss`: its support loss, if the
    /// caller has it), asking `keep_going` before each so abandoned work stops early,
    /// each at its temperature on the annealing schedule, and leaves the state at the schedule's
    /// end, where queries are predicted. Returns the support loss of every step (detached) as
    /// tensors: on a GPU, reading each step's loss would make the host wait for the device every
    /// step, and a recorded CUDA graph cannot read at all.
    pub fn adapt(
        &mut self,
        pass: &dyn SupportPass,
        inner: &InnerLoop,
        first_loss: Option<Tensor>,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Vec<Tensor>, Interrupted> {
        let relaxation = pass.relaxation();
        let mut losses = Vec::with_capacity(inner.steps);
        let mut known_loss = first_loss;
        for step in 0..inner.steps {
            if !keep_going() {
                return Err(Interrupted {
                    completed_steps: step,
                });
            }
            self.temperature = relaxation.temperature(step, inner.steps);
            losses.push(self.sgd_step(pass, inner, known_loss.take()));
        }
        self.temperature = relaxation.temperature(inner.steps, inner.steps);
        Ok(losses)
    }

    /// The decoded genotype of the current θ (DARTS rule); `None` without alphas.
    pub fn genotype(&self, network: &Network) -> Option<Genotype> {
        let (Network::Supernet(net), Some(alphas)) = (network, &self.alphas) else {
            return None;
        };
        let (normal, reduce) = alphas.mixing_rows();
        Some(Genotype::decode(&net.space, &normal, &reduce))
    }

    /// Query logits [N_q, n_way] without gradients.
    pub fn predict(
        &self,
        network: &Network,
        support: &SupportSet,
        query: &Tensor,
        bn: BnMode,
    ) -> Tensor {
        crate::runtime::grad::no_grad(|| {
            query_logits(
                network,
                &self.params,
                self.mixing(network).as_ref(),
                support,
                query,
                bn,
            )
        })
    }

    /// The derived network of `genotype` with this task's weights on its kept edges: a task state
    /// holding only those weights and the classifier. A proto head's classifier is rebuilt from the
    /// derived network's prototypes, unless the supernet's annealed end state already is that
    /// network ([`crate::nn::relaxation::Relaxation::ends_discrete`]), whose adapted head it keeps.
    /// Also returns the support loss a rebuilt head computed, for the fine-tuning steps.
    pub fn derive(
        &self,
        supernet: &Network,
        derived: &DerivedNetwork,
        head: HeadSpec,
        support: &SupportSet,
    ) -> (Network, TaskState, Option<Tensor>) {
        let network = Network::Derived(derived.clone());
        let mut names: Vec<String> = derived.body_specs().into_iter().map(|s| s.name).collect();
        names.extend(
            [CLASSIFIER_WEIGHT, CLASSIFIER_BIAS, LOGIT_SCALE]
                .into_iter()
                .filter(|n| self.params.contains(n))
                .map(String::from),
        );
        let params = ParamSet::from_pairs(names.into_iter().map(|n| {
            let t = self.params.get(&n).detach().copy().set_requires_grad(true);
            (n, t)
        }));
        let mut state = TaskState::new(params, None);
        let first_loss = match head {
            HeadSpec::Proto { .. } if !supernet.relaxation().ends_discrete() => {
                state.reset_proto_head(&support.on(&network))
            }
            _ => None,
        };
        (network, state, first_loss)
    }

    /// Query logits after adaptation: from the adapted supernet, or (`Derived`) from the decoded
    /// genotype's network on the adapted weights, fine-tuned for `settings.finetune_steps` weight-only
    /// steps. Networks without a genotype always predict with themselves.
    pub fn predict_queries(
        &self,
        network: &Network,
        head: HeadSpec,
        support: &SupportSet,
        query: &Tensor,
        settings: &Adaptation,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Tensor, Interrupted> {
        Ok(self
            .task_model(network, head, support, settings, keep_going)?
            .predict(query))
    }

    /// The network that answers this task's queries ([`TaskState::predict_queries`]), with its
    /// weights: this state's own (shared, not copied) or the derived network's, fine-tuned.
    pub fn task_model(
        &self,
        network: &Network,
        head: HeadSpec,
        support: &SupportSet,
        settings: &Adaptation,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<TaskModel, Interrupted> {
        let (network, state) = match (settings.predict_with, self.genotype(network), network) {
            (PredictWith::Derived, Some(genotype), Network::Supernet(net)) => {
                let derived =
                    DerivedNetwork::new(net.space, genotype).expect("decoded genotypes are valid");
                let (derived_net, mut derived_state, first_loss) =
                    self.derive(network, &derived, head, support);
                derived_state.adapt(
                    &support.on(&derived_net),
                    &InnerLoop::finetuning(settings),
                    first_loss,
                    keep_going,
                )?;
                (derived_net, derived_state)
            }
            _ => {
                let alphas = self.alphas.as_ref().map(|a| a.map(|t| t.shallow_clone()));
                let mut state = TaskState::new(self.params.clone(), alphas);
                state.temperature = self.temperature;
                (network.clone(), state)
            }
        };
        Ok(TaskModel {
            network,
            params: state.params,
            alphas: state.alphas,
            temperature: state.temperature,
            bn: settings.bn,
            support_images: support.images.shallow_clone(),
            views: settings.views,
        })
    }
}

/// Query logits under the chosen BN mode; `mixing` as [`Network::features`] takes it.
pub fn query_logits(
    network: &Network,
    params: &ParamSet,
    mixing: Option<&Alphas>,
    support: &SupportSet,
    query: &Tensor,
    bn: BnMode,
) -> Tensor {
    logits_under(bn, support.images, query, |x, stats| {
        network.logits(params, mixing, x, stats)
    })
}

/// The query rows of `logits` (a forward pass, rows first) under the BN mode. In `support` mode the
/// support images are forwarded first in the same batch and supply every BN layer's statistics;
/// their rows are then dropped.
pub fn logits_under(
    bn: BnMode,
    support: &Tensor,
    query: &Tensor,
    logits: impl Fn(&Tensor, BnStats) -> Tensor,
) -> Tensor {
    match bn {
        BnMode::Transductive => logits(query, BnStats::Batch),
        BnMode::Support => {
            let n_support = support.size()[0];
            logits(
                &Tensor::cat(&[support, query], 0),
                BnStats::LeadingRows(n_support),
            )
            .narrow(0, n_support, query.size()[0])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::search_space::SearchSpace;
    use crate::nn::supernet::Supernet;
    use tch::Kind;

    /// The support loss that building a proto head returns is the loss a step would compute there,
    /// and a step given it lands where a step that computes its own does; after a step, rebuilding
    /// the head leaves the weights in another layout and returns no loss.
    #[test]
    fn the_first_loss_from_building_the_head_is_the_steps_own() {
        let space = SearchSpace::tiny();
        let network = Network::Supernet(Supernet::new(space));
        tch::manual_seed(0);
        let meta = ParamSet::initialise(&network.body_specs(), Device::Cpu);
        let alphas = Alphas::initialise(&space, Device::Cpu);
        let images = Tensor::randn([4, 1, 8, 8], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 1, 0, 1]);
        let support = SupportSet {
            images: &images,
            labels: &labels,
            n_way: 2,
        };
        let head = HeadSpec::Proto {
            max_way: 5,
            learned_scale: false,
        };
        let start =
            || TaskState::start(&network, &meta, Some(&alphas), head, &support, Device::Cpu);
        let (mut given, first_loss) = start();
        let first_loss = first_loss.expect("building the head computes the support loss");
        assert!(
            first_loss.equal(&given.support_loss(&support.on(&network))),
            "the loss a step would compute"
        );
        let inner = InnerLoop {
            steps: 1,
            lr_w: 0.1,
            lr_theta: 0.1,
            second_order: false,
        };
        let (mut computed, _) = start();
        let _ = given.sgd_step(&support.on(&network), &inner, Some(first_loss));
        let _ = computed.sgd_step(&support.on(&network), &inner, None);
        assert!(given.params.flattened().equal(&computed.params.flattened()));
        let (a, b) = (given.alphas.unwrap(), computed.alphas.as_ref().unwrap());
        assert!(a.normal.equal(&b.normal) && a.reduce.equal(&b.reduce));

        // After a step the classifier lies in the flat tensor; replacing it leaves separate views
        // that the head's pass did not read, so no loss comes back, and the next step still works.
        assert!(computed.reset_proto_head(&support.on(&network)).is_none());
        assert!(computed
            .sgd_step(&support.on(&network), &inner, None)
            .double_value(&[])
            .is_finite());
    }
}
