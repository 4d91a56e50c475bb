//! `Network`: the three kinds of checkpoint network behind one interface, so adaptation,
//! prediction and meta-training are written once.

use crate::nn::conv4::Conv4;
use crate::nn::derived::DerivedNetwork;
use crate::nn::head::classify;
use crate::nn::ops::BnStats;
use crate::nn::params::{ParamSet, ParamSpec};
use crate::nn::relaxation::Relaxation;
use crate::nn::supernet::{Alphas, Supernet};
use tch::Tensor;

#[derive(Clone, Debug)]
pub enum Network {
    /// T-NAS: weights and architecture adapt.
    Supernet(Supernet),
    /// A fixed genotype: weights adapt.
    Derived(DerivedNetwork),
    /// MAML's Conv-4: weights adapt.
    Conv4(Conv4),
}

impl Network {
    /// Whether the network has architecture logits θ to adapt.
    pub fn has_alphas(&self) -> bool {
        matches!(self, Network::Supernet(_))
    }

    pub fn body_specs(&self) -> Vec<ParamSpec> {
        match self {
            Network::Supernet(n) => n.body_specs(),
            Network::Derived(n) => n.body_specs(),
            Network::Conv4(n) => n.body_specs(),
        }
    }

    /// The runs of weights the forward pass reads stacked, to lay out as blocks of a task's flat
    /// weights ([`crate::nn::fast::flat_layout::Layout`]); none but the supernet's.
    pub fn weight_runs(&self) -> Vec<Vec<String>> {
        match self {
            Network::Supernet(n) => n.weight_runs(),
            Network::Derived(_) | Network::Conv4(_) => Vec::new(),
        }
    }

    pub fn feature_dim(&self) -> usize {
        match self {
            Network::Supernet(n) => n.space.feature_dim(),
            Network::Derived(n) => n.supernet().space.feature_dim(),
            Network::Conv4(n) => n.feature_dim(),
        }
    }

    /// How θ is relaxed into mixing weights; the softmax for networks without θ.
    pub fn relaxation(&self) -> Relaxation {
        match self {
            Network::Supernet(n) => n.relaxation,
            Network::Derived(_) | Network::Conv4(_) => Relaxation::Softmax,
        }
    }

    /// Pooled features [N, F]. `mixing` (θ's mixing weights, [`Supernet::mixing`]) is required
    /// for the supernet and ignored otherwise.
    pub fn features(
        &self,
        params: &ParamSet,
        mixing: Option<&Alphas>,
        x: &Tensor,
        stats: BnStats,
    ) -> Tensor {
        match self {
            Network::Supernet(n) => n.features(
                params,
                mixing.expect("a supernet forward needs mixing weights"),
                x,
                stats,
            ),
            Network::Derived(n) => n.features(params, x, stats),
            Network::Conv4(n) => n.features(params, x, stats),
        }
    }

    /// Logits [N, n_way] with the classifier held in `params`.
    pub fn logits(
        &self,
        params: &ParamSet,
        mixing: Option<&Alphas>,
        x: &Tensor,
        stats: BnStats,
    ) -> Tensor {
        classify(params, &self.features(params, mixing, x, stats))
    }
}
