//! Request and response bodies of the HTTP API (docs/HTTP_API.md), as plain serde types with OpenAPI schemas.

use crate::adapt::{BnMode, PredictWith};
use crate::nn::genotype::Genotype;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One labelled support image.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SupportImage {
    pub label: String,
    /// Base64 PNG or JPEG.
    pub image: String,
}

/// One query image to classify.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryImage {
    pub id: String,
    /// Base64 PNG or JPEG.
    pub image: String,
}

/// Per-request overrides of the model's adaptation defaults.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaptOptions {
    /// Model name; the server's default model when absent.
    pub model: Option<String>,
    /// M, the number of SGD steps on the support set.
    pub steps: Option<usize>,
    pub lr_w: Option<f64>,
    pub lr_theta: Option<f64>,
    pub bn: Option<BnMode>,
    pub predict_with: Option<PredictWith>,
    /// Extra weight-only steps for the derived network.
    pub finetune_steps: Option<usize>,
    /// Test-time views, 1 to 9: each support image joins its class again shifted by one pixel
    /// (the four edge neighbours first, then the diagonals), and each query's prediction averages
    /// its views' log-probabilities. Costs about `views` times the compute of one view.
    #[schema(minimum = 1, maximum = 9)]
    pub views: Option<usize>,
    /// Keep the adapted task model for `POST /tasks/{task_id}/predict` and
    /// `GET /tasks/{task_id}/model` (default true, while `--task-store-bytes` allows).
    pub keep: Option<bool>,
}

/// `POST /adapt` as JSON.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaptRequest {
    pub support: Vec<SupportImage>,
    pub query: Vec<QueryImage>,
    #[serde(flatten)]
    #[schema(inline)]
    pub options: AdaptOptions,
}

/// Softmaxed architecture weights, [14][8] per cell type, columns in primitive order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AlphaWeights {
    pub normal: Vec<Vec<f32>>,
    pub reduce: Vec<Vec<f32>>,
}

/// A query's prediction.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Prediction {
    pub id: String,
    pub label: String,
    pub probabilities: Vec<f32>,
    pub logits: Vec<f32>,
}

/// Where the request's time went, in milliseconds.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TimingMs {
    pub decode_images: f64,
    pub queue: f64,
    /// The adaptation steps and decoding. For a task adapted in a batch, or replayed from a recorded
    /// CUDA graph, also the queries' forward pass, which runs with them.
    pub adapt: f64,
    /// The queries' forward pass; for a batched or replayed task, copying its predictions back.
    pub predict: f64,
    pub total: f64,
}

/// `POST /adapt` response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdaptResponse {
    /// Where `GET /genotypes/{task_id}` finds this task's genotype; null when the model has no
    /// architecture (conv4), as there is nothing to fetch.
    pub task_id: Option<String>,
    pub model: String,
    /// Class names; class i is the i-th distinct support label in order of first appearance.
    pub labels: Vec<String>,
    /// The decoded (or, for fixed-architecture models, the fixed) genotype; null for conv4.
    pub genotype: Option<Genotype>,
    /// Whether the store kept the genotype for `GET /genotypes/{task_id}`. False when the model
    /// has no architecture, the store was unreachable or slow (`/readyz` says why), or the record
    /// was over `--genotype-store-bytes`; the genotype above is the task's all the same.
    pub genotype_stored: bool,
    /// Whether the adapted task model was kept for `POST /tasks/{task_id}/predict` and
    /// `GET /tasks/{task_id}/model`. False when the request said `"keep": false`, the model has no
    /// architecture, or the task model alone is over `--task-store-bytes`.
    pub task_model_kept: bool,
    pub alphas: Option<AlphaWeights>,
    pub predictions: Vec<Prediction>,
    pub steps: usize,
    pub device: String,
    /// True when the adaptation was replayed from a recorded CUDA graph (on a GPU, supernet
    /// predictions of a task shape seen before; the task that records a shape waits for that too).
    pub cuda_graph: bool,
    pub timing_ms: TimingMs,
}

/// `POST /tasks/{task_id}/predict` as JSON: only query images; the kept task model answers.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    pub query: Vec<QueryImage>,
    /// The model the task was adapted from, if the client wants that checked.
    pub model: Option<String>,
}

/// `POST /tasks/{task_id}/predict` response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PredictResponse {
    pub task_id: String,
    /// The model the task was adapted from.
    pub model: String,
    pub labels: Vec<String>,
    /// `supernet` or `derived`: which network the kept model is.
    pub predict_with: PredictWith,
    pub predictions: Vec<Prediction>,
    pub device: String,
    pub timing_ms: PredictTimingMs,
}

/// Where a prediction's time went, in milliseconds.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PredictTimingMs {
    pub decode_images: f64,
    pub queue: f64,
    /// Loading the kept weights onto the device.
    pub load: f64,
    /// The queries' forward pass.
    pub predict: f64,
    pub total: f64,
}

/// A stored genotype with its task's metadata (`GET /genotypes/{task_id}`); kept in this JSON
/// form in a shared store, hence `Deserialize`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenotypeRecord {
    pub task_id: String,
    pub model: String,
    pub labels: Vec<String>,
    pub n_way: usize,
    pub k_shot: usize,
    /// RFC 3339.
    pub created_at: String,
    pub genotype: Genotype,
}

/// Every error body: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code, e.g. `invalid_image`, `queue_full`.
    pub code: String,
    /// What was wrong and how to fix it.
    pub message: String,
}

/// `GET /healthz`, `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthStatus {
    /// `ok` (`/healthz`); `ready`, or `degraded` when the store is unreachable (`/readyz`).
    pub status: String,
    /// `/readyz`: where genotypes are kept, `memory` or `redis`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// `/readyz` when degraded: what is wrong and what still works.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
