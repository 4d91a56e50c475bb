//! Few-shot evaluation: mean accuracy over many tasks with a 95% confidence interval.

use super::algorithm::accuracy;
use crate::adapt::{views, Adaptation, InnerLoop, PredictWith, SupportSet, TaskState};
use crate::data::sampler::{Episode, EpisodeSampler};
use crate::model::metadata::HeadSpec;
use crate::nn::genotype::Genotype;
use crate::nn::learned_rates::LearnedRates;
use crate::nn::network::Network;
use crate::nn::params::ParamSet;
use crate::nn::supernet::Alphas;
use tch::{Device, Tensor};

/// Mean and 95% half-interval (1.96 · sample std / √n), the form few-shot papers report, of at
/// least one value.
pub fn mean_and_ci95(values: &[f64]) -> (f64, f64) {
    assert!(!values.is_empty(), "a mean of no values");
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, 1.96 * (var / n).sqrt())
}

/// How a results row names its predictions: `supernet` or `derived` for a supernet, else the
/// network that always predicts with itself: `genotype` (a fixed cell network) or `conv4`.
pub fn prediction_label(network: &Network, predict_with: PredictWith) -> &'static str {
    match network {
        Network::Supernet(_) => predict_name(predict_with),
        Network::Derived(_) => "genotype",
        Network::Conv4(_) => "conv4",
    }
}

/// A prediction mode as `--predict-with` and results rows name it.
pub fn predict_name(p: PredictWith) -> &'static str {
    match p {
        PredictWith::Supernet => "supernet",
        PredictWith::Derived => "derived",
    }
}

/// A model to evaluate and how to adapt it.
pub struct Evaluation<'a> {
    pub network: &'a Network,
    pub params: &'a ParamSet,
    pub alphas: Option<&'a Alphas>,
    pub head: HeadSpec,
    /// How each task adapts and predicts.
    pub settings: Adaptation,
    /// Meta-learned inner rates, used instead of the settings' when set.
    pub rates: Option<LearnedRates>,
    pub device: Device,
}

impl Evaluation<'_> {
    /// Query accuracy of each of `tasks` episodes drawn from `sampler`.
    pub fn accuracies(&self, sampler: &mut EpisodeSampler, tasks: usize) -> Vec<f64> {
        (0..tasks).map(|_| self.task_accuracy(sampler)).collect()
    }

    /// The decoded genotype of each of `tasks` episodes drawn from `sampler`, after adaptation.
    pub fn genotypes(&self, sampler: &mut EpisodeSampler, tasks: usize) -> Vec<Genotype> {
        (0..tasks)
            .filter_map(|_| {
                let episode = sampler.sample().to_device(self.device);
                let (images, labels) = self.support_views(&episode);
                let support = SupportSet {
                    images: &images,
                    labels: &labels,
                    n_way: sampler.way(),
                };
                self.adapted(&support).genotype(self.network)
            })
            .collect()
    }

    /// The episode's support images and labels with the test-time views the settings ask for.
    fn support_views(&self, episode: &Episode) -> (Tensor, Tensor) {
        views::of_support(
            &episode.support,
            &episode.support_labels,
            self.settings.views,
        )
    }

    /// A task's state after adaptation to `support`.
    fn adapted(&self, support: &SupportSet) -> TaskState {
        let (mut state, first_loss) = TaskState::start(
            self.network,
            self.params,
            self.alphas,
            self.head,
            support,
            self.device,
        );
        state.rates = self.rates.as_ref().map(LearnedRates::detach);
        state
            .adapt(
                &support.on(self.network),
                &InnerLoop::of(&self.settings),
                first_loss,
                &|| true,
            )
            .expect("never interrupted");
        state
    }

    fn task_accuracy(&self, sampler: &mut EpisodeSampler) -> f64 {
        let episode = sampler.sample().to_device(self.device);
        let (images, labels) = self.support_views(&episode);
        let support = SupportSet {
            images: &images,
            labels: &labels,
            n_way: sampler.way(),
        };
        let state = self.adapted(&support);
        let logits = state
            .predict_queries(
                self.network,
                self.head,
                &support,
                &episode.query,
                &self.settings,
                &|| true,
            )
            .expect("never interrupted");
        accuracy(&logits, &episode.query_labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_is_1_96_standard_errors() {
        let values = [0.0, 1.0, 0.0, 1.0];
        let (mean, ci) = mean_and_ci95(&values);
        assert_eq!(mean, 0.5);
        // sample std = sqrt(1/3); standard error = sqrt(1/3) / 2.
        assert!((ci - 1.96 * (1.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
        assert_eq!(mean_and_ci95(&[0.7]), (0.7, 0.0));
    }
}
