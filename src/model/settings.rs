//! The adaptation settings: one type from a model's defaults (`model.json`'s `adaptation`)
//! through a request's overrides to the worker's batches, evaluation and the trainer.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where BatchNorm takes its statistics when predicting queries (adaptation always uses the support set).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum BnMode {
    /// Support-set statistics: a query's prediction does not depend on the other queries.
    #[default]
    Support,
    /// The query batch's own statistics (MAML and the official T-NAS code).
    Transductive,
}

/// Which network predicts the queries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PredictWith {
    /// The adapted supernet, mixing every op by softmax(θ).
    #[default]
    Supernet,
    /// The decoded genotype's discrete network on the adapted supernet's weights.
    Derived,
}

/// How a task is adapted and its queries predicted.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Adaptation {
    /// M: SGD steps on the support set.
    pub steps: usize,
    pub lr_w: f64,
    pub lr_theta: f64,
    pub bn: BnMode,
    /// The steps use the checkpoint's meta-learned rates (`inner.lr_w`, `inner.lr_theta`) instead
    /// of `lr_w` and `lr_theta`, unless a request sets either.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub learned_rates: bool,
    #[serde(default, skip_serializing_if = "PredictWith::is_supernet")]
    pub predict_with: PredictWith,
    /// Weight-only steps of the derived network before it predicts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub finetune_steps: usize,
    /// Test-time views (1 to 9): each image also seen shifted by one pixel, the four edge
    /// neighbours first, then the diagonals. 1: the task as sent.
    #[serde(default = "one_view", skip_serializing_if = "is_one_view")]
    #[schema(minimum = 1, maximum = 9)]
    pub views: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The most test-time views a task can ask for: the image and its eight neighbouring shifts.
pub const MAX_VIEWS: usize = 9;

pub(crate) fn one_view() -> usize {
    1
}

pub(crate) fn is_one_view(n: &usize) -> bool {
    *n == 1
}

impl PredictWith {
    fn is_supernet(&self) -> bool {
        *self == PredictWith::Supernet
    }
}

/// Learning rates are finite (models and requests are validated), so comparing them is an
/// equivalence: tasks with equal settings can share a batch.
impl Eq for Adaptation {}

impl std::hash::Hash for Adaptation {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // `+ 0.0` makes −0 and +0, which compare equal, hash alike.
        let bits = |rate: f64| (rate + 0.0).to_bits();
        (self.steps, bits(self.lr_w), bits(self.lr_theta), self.bn).hash(state);
        (self.learned_rates, self.predict_with, self.finetune_steps).hash(state);
        self.views.hash(state);
    }
}
