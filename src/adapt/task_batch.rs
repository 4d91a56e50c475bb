//! Several tasks adapted as one network pass (cross-task batching).
//!
//! At few-shot sizes a step costs kernel launches, not arithmetic, so T tasks cost little more
//! than one when they run as one: every weight and θ is stacked task by task along dim 0, image i
//! of every task sits in row i with the tasks' channels side by side ([N, T·C, H, W]), and every
//! convolution is grouped by task (its grouping follows from the shapes, [`crate::nn::ops::conv`]).
//! BatchNorm is per channel, hence per task; the loss is the sum of the tasks' losses, so each
//! task's gradient is its own. Each task's logits and genotype equal those of adapting it alone
//! (the task-batching tests compare them).
//!
//! Tasks batch together when they have the same shape: way, shots, queries and settings.

use crate::adapt::{logits_under, BnMode, InnerLoop, Interrupted, SupportPass, TaskState};
use crate::model::checkpoint::Checkpoint;
use crate::model::metadata::HeadSpec;
use crate::nn::genotype::Genotype;
use crate::nn::head::{prototype_classifier, CLASSIFIER_BIAS, CLASSIFIER_WEIGHT, LOGIT_SCALE};
use crate::nn::learned_rates::LearnedRates;
use crate::nn::ops::BnStats;
use crate::nn::params::ParamSet;
use crate::nn::relaxation::Relaxation;
use crate::nn::supernet::{Alphas, MixingRows, Supernet};
use tch::Tensor;

/// Images of T tasks side by side: T tensors [N, C, H, W] → [N, T·C, H, W].
pub fn side_by_side(images: &[Tensor]) -> Tensor {
    Tensor::stack(images, 1).flatten(1, 2)
}

/// The support sets of T tasks of the same shape.
pub struct BatchedSupport {
    /// [N, T·C, H, W] (see [`side_by_side`]).
    pub images: Tensor,
    /// [T, N] class indices in 0..n_way.
    pub labels: Tensor,
    pub n_way: usize,
}

impl BatchedSupport {
    /// `images[t]` [N, C, H, W] and `labels[t]` [N] are task t's support set.
    pub fn new(images: &[Tensor], labels: &[Tensor], n_way: usize) -> BatchedSupport {
        BatchedSupport {
            images: side_by_side(images),
            labels: Tensor::stack(labels, 0),
            n_way,
        }
    }

    pub fn tasks(&self) -> i64 {
        self.labels.size()[0]
    }
}

/// T tasks' adapted weights and θ, stacked along dim 0.
pub struct TaskBatch {
    state: TaskState,
    tasks: i64,
}

/// T tasks' support sets forwarded as one pass through the supernet, over a [`TaskBatch`]'s state.
struct StackedTasks<'a> {
    net: &'a Supernet,
    support: &'a BatchedSupport,
}

impl StackedTasks<'_> {
    /// [N, T·C, H, W] → features [N, T, F].
    fn features_of(&self, state: &TaskState, x: &Tensor, stats: BnStats) -> Tensor {
        let alphas = state.alphas.as_ref().expect("a task batch holds θ");
        let tasks = self.support.tasks();
        let features = self.net.task_features(
            &state.params,
            &self.net.mixing(alphas, state.temperature),
            x,
            stats,
            tasks,
        );
        features.view([features.size()[0], tasks, -1])
    }

    /// Features [N, T, F] → logits [N, T, n_way], each task's classifier (and logit scale) on its
    /// own features.
    fn classify(&self, state: &TaskState, features: &Tensor) -> Tensor {
        let tasks = self.support.tasks();
        let weight = state.params.get(CLASSIFIER_WEIGHT);
        let weight = weight.view([tasks, -1, weight.size()[1]]);
        let bias = state.params.get(CLASSIFIER_BIAS).view([tasks, 1, -1]);
        let logits = features
            .transpose(0, 1)
            .matmul(&weight.transpose(1, 2))
            .g_add(&bias)
            .transpose(0, 1);
        match state.params.contains(LOGIT_SCALE) {
            true => logits * state.params.get(LOGIT_SCALE).exp().view([1, tasks, 1]),
            false => logits,
        }
    }
}

impl SupportPass for StackedTasks<'_> {
    fn features(&self, state: &TaskState) -> Tensor {
        self.features_of(state, &self.support.images, BnStats::Batch)
    }

    fn prototype_head(&self, features: &Tensor) -> (Tensor, Tensor) {
        let (weights, biases): (Vec<Tensor>, Vec<Tensor>) = (0..self.support.tasks())
            .map(|t| {
                prototype_classifier(
                    &features.select(1, t),
                    &self.support.labels.get(t),
                    self.support.n_way,
                )
            })
            .unzip();
        (Tensor::cat(&weights, 0), Tensor::cat(&biases, 0))
    }

    fn loss(&self, state: &TaskState, features: &Tensor) -> Tensor {
        let logits = self.classify(state, features).transpose(0, 1);
        let n_way = logits.size()[2];
        logits
            .reshape([-1, n_way])
            .cross_entropy_for_logits(&self.support.labels.reshape([-1]))
            * self.support.tasks() as f64
    }

    fn relaxation(&self) -> Relaxation {
        self.net.relaxation
    }
}

impl TaskBatch {
    /// Every task starts from the meta-weights; a proto head is built per task from its own
    /// support prototypes. Also returns the support loss that building the heads computed: the
    /// first step's, for [`TaskBatch::adapt`].
    pub fn start(
        net: &Supernet,
        meta: &ParamSet,
        meta_alphas: &Alphas,
        head: HeadSpec,
        support: &BatchedSupport,
    ) -> (TaskBatch, Option<Tensor>) {
        let (tasks, device) = (support.tasks(), support.images.device());
        let mut state = TaskState::new(
            meta.task_copy(&net.weight_runs(), device, tasks),
            Some(meta_alphas.task_copy(device, tasks)),
        );
        state.temperature = net.relaxation.start_temperature();
        let first_loss = match head {
            HeadSpec::Proto { .. } => state.reset_proto_head(&StackedTasks { net, support }),
            HeadSpec::Fixed { .. } => None,
        };
        (TaskBatch { state, tasks }, first_loss)
    }

    /// `inner.steps` SGD steps for every task at once, asking `keep_going` before each, on the
    /// annealing schedule ([`TaskState::adapt`]).
    pub fn adapt(
        &mut self,
        net: &Supernet,
        support: &BatchedSupport,
        inner: &InnerLoop,
        first_loss: Option<Tensor>,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<(), Interrupted> {
        self.state
            .adapt(
                &StackedTasks { net, support },
                inner,
                first_loss,
                keep_going,
            )
            .map(drop)
    }

    /// Every task's θ, stacked task by task.
    pub fn alphas(&self) -> &Alphas {
        self.state.alphas.as_ref().expect("a task batch holds θ")
    }

    /// Every task's softmax(θ) as (normal, reduce) rows, in task order.
    pub fn mixings(&self) -> Vec<MixingRows> {
        task_mixings(self.alphas(), self.tasks)
    }

    /// Every task's decoded genotype, in task order.
    pub fn genotypes(&self, net: &Supernet) -> Vec<Genotype> {
        self.mixings()
            .iter()
            .map(|(normal, reduce)| Genotype::decode(&net.space, normal, reduce))
            .collect()
    }

    /// Query logits [N_q, T, n_way] without gradients; `query` is [N_q, T·C, H, W].
    pub fn predict(
        &self,
        net: &Supernet,
        support: &BatchedSupport,
        query: &Tensor,
        bn: BnMode,
    ) -> Tensor {
        let pass = StackedTasks { net, support };
        crate::runtime::grad::no_grad(|| {
            logits_under(bn, &support.images, query, |x, stats| {
                pass.classify(&self.state, &pass.features_of(&self.state, x, stats))
            })
        })
    }
}

/// What every task of a batch adapts from: the supernet, the checkpoint's meta-weights and θ, and
/// its learned inner rates when the tasks ask for them.
pub struct BatchSource<'a> {
    pub net: &'a Supernet,
    pub checkpoint: &'a Checkpoint,
    pub rates: Option<&'a LearnedRates>,
}

/// A batch's whole adaptation in the form a CUDA graph records, tensors in and out: from
/// [support images [N, T·C, H, W], labels [T, N], query images [N_q, T·C, H, W]], every task adapts
/// from `source` (`inner.steps` steps, asking `keep_going` before each) and predicts its queries →
/// [query logits [N_q, T, n_way], θ normal, θ reduce] (θ stacked by task). Reads nothing back to
/// the host.
pub fn adapt_and_predict(
    source: &BatchSource,
    tensors: &[Tensor],
    n_way: usize,
    inner: &InnerLoop,
    bn: BnMode,
    keep_going: &dyn Fn() -> bool,
) -> Result<Vec<Tensor>, Interrupted> {
    let BatchSource {
        net,
        checkpoint,
        rates,
    } = *source;
    let [images, labels, query] = tensors else {
        panic!("three input tensors: support images, labels, query images")
    };
    let support = BatchedSupport {
        images: images.shallow_clone(),
        labels: labels.shallow_clone(),
        n_way,
    };
    let meta_alphas = checkpoint
        .alphas
        .as_ref()
        .expect("a supernet checkpoint holds θ");
    let (mut batch, first_loss) = TaskBatch::start(
        net,
        &checkpoint.params,
        meta_alphas,
        checkpoint.meta.head,
        &support,
    );
    batch.state.rates = rates.cloned();
    batch.adapt(net, &support, inner, first_loss, keep_going)?;
    let alphas = batch.alphas();
    Ok(vec![
        batch.predict(net, &support, query, bn),
        alphas.normal.detach(),
        alphas.reduce.detach(),
    ])
}

/// Each task's softmax(θ) rows, in task order, from θ stacked over `tasks` tasks: one softmax and
/// one copy to the host for all of them.
pub fn task_mixings(alphas: &Alphas, tasks: i64) -> Vec<MixingRows> {
    let (normal, reduce) = alphas.mixing_rows();
    let edges = normal.len() / tasks as usize;
    normal
        .chunks(edges)
        .zip(reduce.chunks(edges))
        .map(|(n, r)| (n.to_vec(), r.to_vec()))
        .collect()
}
