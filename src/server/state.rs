//! `AppState`: what every handler shares. Plain data and handles only; tensors stay on the worker.

use super::config::Limits;
use super::store::task_models::TaskModelStore;
use super::store::GenotypeStore;
use super::worker::Worker;
use crate::model::metadata::ModelMeta;
use axum::http::HeaderValue;
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::Semaphore;

pub struct AppState {
    /// Metadata of the loaded models, by name, for validation and `GET /models`.
    pub models: BTreeMap<String, ModelMeta>,
    pub default_model: String,
    pub worker: Worker,
    /// Requests whose images may be decoding at once (one per core); see `routes::adapt::decode`.
    pub decoding_slots: Arc<Semaphore>,
    /// `/adapt` requests in the server at once, at most `limits.max_in_flight`.
    pub in_flight: Semaphore,
    pub store: GenotypeStore,
    /// Task models kept after `/adapt`, bounded by `limits.task_store_bytes`.
    pub task_models: TaskModelStore,
    pub limits: Limits,
    pub metrics: PrometheusHandle,
    pub api_key: Option<String>,
    /// Origins allowed by CORS; empty means no CORS headers at all.
    pub cors_origins: Vec<HeaderValue>,
}

pub type SharedState = Arc<AppState>;
