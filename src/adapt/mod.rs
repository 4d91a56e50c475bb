//! Task adaptation: T-NAS Algorithm 2 (M joint SGD steps on [w; θ] over the support set) and
//! prediction for the task's queries, with the supernet or with the decoded derived network.
//!
//! Everything works on a task's own copies ([`TaskState`]); the meta-weights are only read. The
//! inner loop and a proto head's start are written once, over a [`SupportPass`]: one task on its
//! network ([`OneTask`]), or several tasks stacked into one pass ([`crate::adapt::task_batch`]).

pub mod task_batch;
pub mod task_model;

use crate::model::metadata::HeadSpec;
pub use crate::model::settings::{BnMode, PredictWith};
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
    /// The support images and labels.
    fn support(&self) -> [&Tensor; 2];
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

    fn support(&self) -> [&Tensor; 2] {
        [self.support.images, self.support.labels]
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
    /// The support loss of the forward pass that built a proto head, kept for the next step,
    /// which would repeat that pass.
    kept_loss: Option<KeptLoss>,
}

/// A support loss and every tensor it was computed from, so that it is used only at that point.
#[derive(Debug)]
struct KeptLoss {
    loss: Tensor,
    from: Vec<Tensor>,
    temperature: f64,
}

/// How queries are predicted after adaptation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PredictOptions {
    pub bn: BnMode,
    pub predict_with: PredictWith,
    /// Weight-only steps of the derived network before it predicts.
    pub finetune: InnerLoop,
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
            kept_loss: None,
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
    /// from the support prototypes under the starting weights.
    pub fn start(
        network: &Network,
        meta: &ParamSet,
        meta_alphas: Option<&Alphas>,
        head: HeadSpec,
        support: &SupportSet,
        device: Device,
    ) -> TaskState {
        let mut state = TaskState::new(
            meta.task_copy(&network.weight_runs(), device, 1),
            meta_alphas.map(|a| a.task_copy(device, 1)),
        );
        state.temperature = network.relaxation().start_temperature();
        if let HeadSpec::Proto { .. } = head {
            state.reset_proto_head(&support.on(network));
        }
        state
    }

    /// Rebuilds the classifier from the support prototypes under the current weights. The forward
    /// pass that gives the prototypes also gives the support loss with the new classifier, which
    /// the next step takes instead of repeating the pass.
    pub fn reset_proto_head(&mut self, pass: &dyn SupportPass) {
        let features = pass.features(self);
        let (w, b) = crate::runtime::grad::no_grad(|| pass.prototype_head(&features));
        let was_flat = self.params.is_flat();
        self.set_classifier(w, b);
        // Replacing a classifier that lay in the flat tensor (after a step) leaves the weights as
        // separate views, which the pass above did not read: its loss could not reach them.
        if self.params.is_flat() == was_flat {
            let [images, labels] = pass.support();
            self.keep_support_loss(pass.loss(self, &features), images, labels);
        }
    }

    /// Every tensor a support loss at this point is computed from: the weights' flat parts, θ and
    /// the support set (and, not a tensor, the temperature).
    fn point(&self, images: &Tensor, labels: &Tensor) -> Vec<Tensor> {
        let mut from: Vec<Tensor> = self
            .params
            .flat_parts()
            .into_iter()
            .map(Tensor::shallow_clone)
            .collect();
        from.extend(
            self.alphas
                .iter()
                .flat_map(|a| [a.normal.shallow_clone(), a.reduce.shallow_clone()]),
        );
        from.extend([images.shallow_clone(), labels.shallow_clone()]);
        from
    }

    /// Keeps `loss`, the loss of the support set (`images`, `labels`) at this point, for the next
    /// step (unless it has no graph to differentiate, as under `no_grad`).
    fn keep_support_loss(&mut self, loss: Tensor, images: &Tensor, labels: &Tensor) {
        self.kept_loss = loss.requires_grad().then(|| KeptLoss {
            loss,
            from: self.point(images, labels),
            temperature: self.temperature,
        });
    }

    /// The kept support loss, if it was computed at this point from this support set: the same
    /// tensors by `is_set_to` (storage, offset, sizes, strides), which holds for the state as
    /// `reset_proto_head` left it. Whoever replaces the weights or θ with new tensors on the same
    /// storage, or changes them in place, before the next step must not leave a loss kept.
    fn take_support_loss(&mut self, images: &Tensor, labels: &Tensor) -> Option<Tensor> {
        let kept = self.kept_loss.take()?;
        let now = self.point(images, labels);
        let same = kept.temperature == self.temperature
            && kept.from.len() == now.len()
            && kept.from.iter().zip(&now).all(|(a, b)| a.is_set_to(b));
        same.then_some(kept.loss)
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

    /// [`TaskState::gradients`], and in the same backward pass those of `extra` tensors.
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
        let extra = grads.split_off(inputs.len() - extra.len());
        let theta = self
            .alphas
            .as_ref()
            .map(|_| (grads.remove(n), grads.remove(n)));
        let weights = ParamSet::join(&grads);
        (weights, theta, extra)
    }

    /// One step of T-NAS Algorithm 2: forward the support set with softmax(θ), cross-entropy, one
    /// backward pass, then plain SGD. Returns the loss (detached).
    pub fn sgd_step(&mut self, pass: &dyn SupportPass, inner: &InnerLoop) -> Tensor {
        let [images, labels] = pass.support();
        let loss = self
            .take_support_loss(images, labels)
            .unwrap_or_else(|| self.support_loss(pass));
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

    /// Runs `inner.steps` steps, asking `keep_going` before each so abandoned work stops early,
    /// each at its temperature on the annealing schedule, and leaves the state at the schedule's
    /// end, where queries are predicted. Returns the support loss of every step (detached) as
    /// tensors: on a GPU, reading each step's loss would make the host wait for the device every
    /// step, and a recorded CUDA graph cannot read at all.
    pub fn adapt(
        &mut self,
        pass: &dyn SupportPass,
        inner: &InnerLoop,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Vec<Tensor>, Interrupted> {
        let relaxation = pass.relaxation();
        let mut losses = Vec::with_capacity(inner.steps);
        for step in 0..inner.steps {
            if !keep_going() {
                return Err(Interrupted {
                    completed_steps: step,
                });
            }
            self.temperature = relaxation.temperature(step, inner.steps);
            losses.push(self.sgd_step(pass, inner));
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
    pub fn derive(
        &self,
        supernet: &Network,
        derived: &DerivedNetwork,
        head: HeadSpec,
        support: &SupportSet,
    ) -> (Network, TaskState) {
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
        if matches!(head, HeadSpec::Proto { .. }) && !supernet.relaxation().ends_discrete() {
            state.reset_proto_head(&support.on(&network));
        }
        (network, state)
    }

    /// Query logits after adaptation: from the adapted supernet, or (`Derived`) from the decoded
    /// genotype's network on the adapted weights, fine-tuned for `options.finetune.steps` weight-only
    /// steps. Networks without a genotype always predict with themselves.
    pub fn predict_queries(
        &self,
        network: &Network,
        head: HeadSpec,
        support: &SupportSet,
        query: &Tensor,
        options: &PredictOptions,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Tensor, Interrupted> {
        Ok(self
            .task_model(network, head, support, options, keep_going)?
            .predict(query))
    }

    /// The network that answers this task's queries ([`TaskState::predict_queries`]), with its
    /// weights: this state's own (shared, not copied) or the derived network's, fine-tuned.
    pub fn task_model(
        &self,
        network: &Network,
        head: HeadSpec,
        support: &SupportSet,
        options: &PredictOptions,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<TaskModel, Interrupted> {
        let (network, state) = match (options.predict_with, self.genotype(network), network) {
            (PredictWith::Derived, Some(genotype), Network::Supernet(net)) => {
                let derived =
                    DerivedNetwork::new(net.space, genotype).expect("decoded genotypes are valid");
                let (derived_net, mut derived_state) =
                    self.derive(network, &derived, head, support);
                derived_state.adapt(&support.on(&derived_net), &options.finetune, keep_going)?;
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
            bn: options.bn,
            support_images: support.images.shallow_clone(),
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

    /// The support loss kept from building a proto head is the loss a step would compute, and a
    /// step takes it only at the point it was computed at: once, with the same images, weights and θ.
    #[test]
    fn the_kept_support_loss_is_the_steps_own_and_only_at_its_point() {
        let space = SearchSpace {
            in_channels: 1,
            image_size: 8,
            init_channels: 4,
            layers: 2,
            steps: 2,
            multiplier: 2,
            stem_multiplier: 2,
            stem_pools: 1,
        };
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
        let mut state = TaskState::start(
            &network,
            &meta,
            Some(&alphas),
            HeadSpec::Proto {
                max_way: 5,
                learned_scale: false,
            },
            &support,
            Device::Cpu,
        );
        let kept = state
            .take_support_loss(&images, &labels)
            .expect("building the head keeps its loss");
        assert!(
            kept.equal(&state.support_loss(&support.on(&network))),
            "the loss a step would compute"
        );
        assert!(
            state.take_support_loss(&images, &labels).is_none(),
            "taken once"
        );

        state.reset_proto_head(&support.on(&network));
        assert!(
            state.take_support_loss(&images.copy(), &labels).is_none(),
            "other images"
        );
        state.reset_proto_head(&support.on(&network));
        assert!(
            state
                .take_support_loss(&images, &labels.flip([0]))
                .is_none(),
            "other labels"
        );
        state.reset_proto_head(&support.on(&network));
        state.alphas = Some(alphas.task_copy(Device::Cpu, 1));
        assert!(
            state.take_support_loss(&images, &labels).is_none(),
            "another θ"
        );
        state.reset_proto_head(&support.on(&network));
        state.params = state
            .params
            .views_of(&state.params.flattened().detach().set_requires_grad(true));
        assert!(
            state.take_support_loss(&images, &labels).is_none(),
            "other weights"
        );

        // After a step the classifier lies in the flat tensor; replacing it leaves no loss kept
        // (the pass read the flat tensor's blocks, not the separate views left), and a step works.
        let inner = InnerLoop {
            steps: 1,
            lr_w: 0.1,
            lr_theta: 0.1,
            second_order: false,
        };
        let _ = state.sgd_step(&support.on(&network), &inner);
        state.reset_proto_head(&support.on(&network));
        assert!(state.kept_loss.is_none());
        assert!(state
            .sgd_step(&support.on(&network), &inner)
            .double_value(&[])
            .is_finite());
    }
}
