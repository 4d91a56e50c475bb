//! `TaskModel`: a task's network as it answers queries after adaptation, kept to answer later
//! queries without adapting again, and written as a model folder of its own.
//!
//! It is the adapted supernet (weights, θ and the temperature its mixing weights are read at), or
//! the derived network of the task's genotype on its inherited and fine-tuned weights, with the
//! task's classifier, the BN mode and, for `support` BN, the support images whose statistics
//! normalise every query. Predicting is then one forward pass.
//!
//! As a model folder ([`TaskModel::weights`], [`task_model_meta`]) it is a `supernet` or
//! `genotype` model with a fixed head of the task's way: a server that loads it and adapts for
//! 0 steps on the same support set answers as the kept model does.

use crate::adapt::{logits_under, views, Adaptation, BnMode, PredictWith};
use crate::model::checkpoint::{Checkpoint, ALPHAS_NORMAL, ALPHAS_REDUCE};
use crate::model::metadata::{HeadSpec, ModelKind, ModelMeta, TaskOrigin};
use crate::nn::genotype::Genotype;
use crate::nn::head::{CLASSIFIER_BIAS, CLASSIFIER_WEIGHT, LOGIT_SCALE};
use crate::nn::network::Network;
use crate::nn::params::ParamSet;
use crate::nn::supernet::Alphas;
use tch::Tensor;

/// The name of the support images [N_s, C, S, S] in a task model's `support.safetensors` (with
/// test-time views, [views · N_s, C, S, S], view after view).
pub const SUPPORT_IMAGES: &str = "support_images";

/// A task's adapted network, ready to predict.
#[derive(Debug)]
pub struct TaskModel {
    pub network: Network,
    /// The body's weights and the task's classifier.
    pub params: ParamSet,
    /// θ, for the adapted supernet.
    pub alphas: Option<Alphas>,
    /// The temperature θ is read at (the end of the annealing schedule).
    pub temperature: f64,
    pub bn: BnMode,
    /// [N_s, C, S, S]: the support set whose statistics every BN layer uses in `support` mode
    /// (with its test-time views, when the task asked for them).
    pub support_images: Tensor,
    /// Test-time views of each query, whose log-probabilities its prediction averages.
    pub views: usize,
}

impl TaskModel {
    /// Query logits [N_q, n_way] without gradients (with several views, the mean of their
    /// log-probabilities). `query`: [N_q, C, S, S].
    pub fn predict(&self, query: &Tensor) -> Tensor {
        let mixing = match (&self.network, &self.alphas) {
            (Network::Supernet(net), Some(alphas)) => Some(net.mixing(alphas, self.temperature)),
            _ => None,
        };
        let query = views::of_images(query, self.views);
        let logits = crate::runtime::grad::no_grad(|| {
            logits_under(self.bn, &self.support_images, &query, |x, stats| {
                self.network.logits(&self.params, mixing.as_ref(), x, stats)
            })
        });
        views::merged(&logits, self.views)
    }

    /// The tensors of its `model.safetensors`: the weights, with a learned logit scale folded into
    /// the classifier (exp(s)·(Wf + b) = (exp(s)W)f + exp(s)b), since a fixed head holds none;
    /// and θ for a supernet.
    pub fn weights(&self) -> Vec<(String, Tensor)> {
        let scale = self
            .params
            .contains(LOGIT_SCALE)
            .then(|| self.params.get(LOGIT_SCALE).detach().exp());
        let mut named: Vec<(String, Tensor)> = self
            .params
            .iter()
            .filter(|(name, _)| name.as_str() != LOGIT_SCALE)
            .map(|(name, t)| {
                let t = t.detach();
                let t = match (&scale, name.as_str()) {
                    (Some(s), CLASSIFIER_WEIGHT | CLASSIFIER_BIAS) => t * s,
                    _ => t,
                };
                (name.clone(), t)
            })
            .collect();
        if let Some(a) = &self.alphas {
            named.push((ALPHAS_NORMAL.into(), a.normal.detach()));
            named.push((ALPHAS_REDUCE.into(), a.reduce.detach()));
        }
        named
    }

    /// The task model a checkpoint written by [`TaskModel::weights`] and [`task_model_meta`]
    /// holds, with its support images.
    pub fn from_checkpoint(checkpoint: Checkpoint, support_images: Tensor) -> TaskModel {
        let network = checkpoint.network();
        TaskModel {
            temperature: network.relaxation().temperature(0, 0),
            network,
            params: checkpoint.params,
            alphas: checkpoint.alphas,
            bn: checkpoint.meta.adaptation.bn,
            views: checkpoint.meta.adaptation.views,
            support_images,
        }
    }
}

/// What a task's kept model is, from the model it was adapted from: the supernet itself when it
/// predicted with the supernet, else the derived network of `genotype` (the task's decoded
/// genotype, or a genotype model's own). `None` for a network without a genotype (Conv-4).
pub fn task_model_kind(source: ModelKind, predict_with: PredictWith) -> Option<ModelKind> {
    match (source, predict_with) {
        (ModelKind::Supernet, PredictWith::Supernet) => Some(ModelKind::Supernet),
        (ModelKind::Supernet | ModelKind::Genotype, _) => Some(ModelKind::Genotype),
        (ModelKind::Conv4, _) => None,
    }
}

/// The `model.json` of a task model: `source`'s search space, input and adaptation rates, with
/// `kind` ([`task_model_kind`]), the task's `genotype` for a genotype model, a fixed head of the
/// task's way, the BN mode and views its `options` asked for, no default steps, its origin, and
/// `sha256` of its weights.
pub fn task_model_meta(
    source: &ModelMeta,
    kind: ModelKind,
    genotype: Option<Genotype>,
    options: &Adaptation,
    origin: TaskOrigin,
    sha256: String,
) -> ModelMeta {
    ModelMeta {
        name: format!("task-{}", origin.task_id),
        kind,
        genotype: (kind == ModelKind::Genotype).then_some(genotype).flatten(),
        head: HeadSpec::Fixed {
            n_way: origin.labels.len(),
        },
        // The task's network already is what its adaptation and fine-tuning made it: served at
        // its defaults, it answers as kept; a request's `steps` adapt it further.
        adaptation: Adaptation {
            steps: 0,
            bn: options.bn,
            views: options.views,
            learned_rates: false,
            predict_with: PredictWith::Supernet,
            finetune_steps: 0,
            ..source.adaptation
        },
        training: None,
        evaluation: Vec::new(),
        task: Some(origin),
        sha256,
        ..source.clone()
    }
}
