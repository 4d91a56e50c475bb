//! The meta-gradient of one task under each algorithm (`--algo`).

use crate::adapt::{query_logits, BnMode, InnerLoop, SupportSet, TaskState};
use crate::metadata::HeadSpec;
use crate::network::Network;
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
    /// T-NAS with second-order gradients through the inner steps.
    #[value(name = "tnas-2nd")]
    #[serde(rename = "tnas-2nd")]
    Tnas2nd,
    /// MAML (second order) on the fixed Conv-4 network.
    Maml,
    /// Reptile outer update (w̃ − w_task) on the supernet, as Auto-Meta and MetaNAS.
    Reptile,
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
            Algorithm::Tnas => GradientRule::FirstOrder,
            Algorithm::Tnas2nd | Algorithm::Maml => GradientRule::SecondOrder,
            Algorithm::Reptile => GradientRule::Reptile,
        }
    }

    /// Whether the network is the DARTS supernet (else Conv-4).
    pub fn uses_supernet(self) -> bool {
        self != Algorithm::Maml
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Tnas => "tnas",
            Algorithm::Tnas2nd => "tnas-2nd",
            Algorithm::Maml => "maml",
            Algorithm::Reptile => "reptile",
        }
    }
}

/// One episode on the compute device.
pub struct TaskBatch<'a> {
    pub support: SupportSet<'a>,
    pub query: &'a Tensor,
    pub query_labels: &'a Tensor,
}

/// What one task contributes to the outer update.
pub struct TaskGradient {
    /// One gradient per meta-weight, in the meta [`ParamSet`]'s order.
    pub w: Vec<Tensor>,
    /// Gradients of θ̃ (normal, reduce) for supernet algorithms.
    pub theta: Option<(Tensor, Tensor)>,
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
    pub device: Device,
}

impl TaskContext<'_> {
    /// Adapts to one task from (w̃, θ̃) and returns its meta-gradient (T-NAS Algorithm 1, lines 4–8).
    pub fn task_gradient(&self, meta: &ParamSet, meta_alphas: Option<&Alphas>, task: &TaskBatch) -> TaskGradient {
        let second_order = self.rule == GradientRule::SecondOrder;
        let inner = InnerLoop { second_order, ..self.inner };
        let mut state = if second_order {
            // Leaves that share the meta-weights' storage: the graph runs from them through every step.
            let params = meta.map(|_, t| t.detach().set_requires_grad(true));
            let alphas = meta_alphas.map(|a| a.map(|t| t.detach().set_requires_grad(true)));
            let mut state = TaskState { params, alphas };
            if let HeadSpec::Proto { .. } = self.head {
                state.reset_proto_head(self.network, &task.support);
            }
            state
        } else {
            TaskState::start(self.network, meta, meta_alphas, self.head, &task.support, self.device)
        };
        let origin = TaskState { params: state.params.clone(), alphas: state.alphas.clone() };
        state.adapt(self.network, &task.support, &inner, &|| true).expect("never interrupted");
        let logits = query_logits(self.network, &state.params, state.alphas.as_ref(), &task.support, task.query, self.bn);
        let loss = logits.cross_entropy_for_logits(task.query_labels);
        let (query_loss, query_accuracy) = (loss.double_value(&[]), accuracy(&logits, task.query_labels));
        let (w, theta) = match self.rule {
            GradientRule::Reptile => tch::no_grad(|| {
                let w = meta.names().iter().map(|n| meta.get(n) - state.params.get(n)).collect();
                let theta = meta_alphas.zip(state.alphas.as_ref()).map(|(m, a)| (&m.normal - &a.normal, &m.reduce - &a.reduce));
                (w, theta)
            }),
            GradientRule::FirstOrder | GradientRule::SecondOrder => {
                let at = if second_order { &origin } else { &state };
                let grads = Tensor::run_backward(&[&loss], &at.trainable(), false, false);
                let index: std::collections::HashMap<&str, usize> = at.params.names().iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
                let w = meta.names().iter().map(|n| grads[index[n.as_str()]].shallow_clone()).collect();
                let n = at.params.len();
                let theta = at.alphas.as_ref().map(|_| (grads[n].shallow_clone(), grads[n + 1].shallow_clone()));
                (w, theta)
            }
        };
        TaskGradient { w, theta, query_loss, query_accuracy }
    }
}
