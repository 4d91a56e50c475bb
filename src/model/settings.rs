//! The adaptation settings a model records as defaults and a request may override.

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PredictWith {
    /// The adapted supernet, mixing every op by softmax(θ).
    #[default]
    Supernet,
    /// The decoded genotype's discrete network on the adapted supernet's weights.
    Derived,
}
