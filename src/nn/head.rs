//! The classifier head: a linear layer, either trained (`fixed`) or built per task from the
//! support set's class prototypes (`proto`, Proto-MAML, Triantafillou et al. 2020).

use crate::nn::params::{Init, ParamSet, ParamSpec};
use tch::{Kind, Tensor};

/// Names of the classifier parameters in every checkpoint and task parameter set.
pub const CLASSIFIER_WEIGHT: &str = "classifier.weight";
pub const CLASSIFIER_BIAS: &str = "classifier.bias";

/// The linear classifier for `n_way` classes on `feature_dim` features (PyTorch `nn.Linear` init).
pub fn classifier_specs(feature_dim: usize, n_way: usize) -> Vec<ParamSpec> {
    let (n, f) = (n_way as i64, feature_dim as i64);
    vec![
        ParamSpec::new(CLASSIFIER_WEIGHT, &[n, f], Init::FanIn),
        ParamSpec::new(CLASSIFIER_BIAS, &[n], Init::FanInBias(f)),
    ]
}

/// The meta-learned log of a proto head's logit scale (a learned-scale head only).
pub const LOGIT_SCALE: &str = "classifier.log_scale";

/// The learned logit scale, starting at 1 (log 0) so that a model trained without it starts
/// from its own predictions.
pub fn logit_scale_specs() -> Vec<ParamSpec> {
    vec![ParamSpec::new(LOGIT_SCALE, &[1], Init::Zeros)]
}

/// The linear head: features [N, F] → logits [N, n_way], scaled by exp(log scale) when `params`
/// holds one.
pub fn classify(params: &ParamSet, features: &Tensor) -> Tensor {
    let logits = features.linear(
        params.get(CLASSIFIER_WEIGHT),
        Some(params.get(CLASSIFIER_BIAS)),
    );
    if params.contains(LOGIT_SCALE) {
        logits * params.get(LOGIT_SCALE).exp()
    } else {
        logits
    }
}

/// Proto-MAML head: with prototypes c_k (class means of the support features), a linear layer with
/// W_k = 2 c_k and b_k = −‖c_k‖² ranks classes exactly as the negative squared distance
/// −‖f − c_k‖² does. `features`: [N_s, F], `labels`: [N_s] in 0..n_way → (W [n_way, F], b [n_way]).
pub fn prototype_classifier(features: &Tensor, labels: &Tensor, n_way: usize) -> (Tensor, Tensor) {
    let one_hot = labels.one_hot(n_way as i64).to_kind(Kind::Float);
    let counts = one_hot
        .sum_dim_intlist(0i64, false, Kind::Float)
        .clamp_min(1.0);
    let prototypes = one_hot.transpose(0, 1).matmul(features) / counts.unsqueeze(1);
    let bias = -prototypes
        .square()
        .sum_dim_intlist(1i64, false, Kind::Float);
    (prototypes * 2.0, bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn prototype_head_ranks_like_squared_distance() {
        tch::manual_seed(1);
        let features = Tensor::randn([6, 4], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]);
        let (w, b) = prototype_classifier(&features, &labels, 3);
        let queries = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        let logits = queries.linear(&w, Some(&b));
        let protos = w / 2.0;
        let distances = (queries.unsqueeze(1) - protos.unsqueeze(0))
            .square()
            .sum_dim_intlist(2i64, false, Kind::Float);
        let expected = -distances + queries.square().sum_dim_intlist(1i64, true, Kind::Float);
        assert!(logits.allclose(&expected, 1e-5, 1e-5, false));
    }
}
