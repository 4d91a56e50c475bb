//! `/healthz` (alive), `/readyz` (models loaded and warmed up), `/metrics` (Prometheus text).

use crate::server::api::HealthStatus;
use crate::server::error::ApiError;
use crate::server::state::SharedState;
use crate::server::worker::Readiness;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

/// The process is up.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = HealthStatus)), tag = "health")]
pub async fn healthz() -> Json<HealthStatus> {
    Json(HealthStatus {
        status: "ok".into(),
    })
}

/// 200 once every model is loaded and warmed up on its device; 503 before, and after a fault.
#[utoipa::path(get, path = "/readyz", responses((status = 200, body = HealthStatus), (status = 503, body = crate::server::api::ErrorBody)), tag = "health")]
pub async fn readyz(State(state): State<SharedState>) -> Result<Json<HealthStatus>, ApiError> {
    match state.worker.readiness() {
        Readiness::Ready => Ok(Json(HealthStatus {
            status: "ready".into(),
        })),
        Readiness::Loading => Err(ApiError::NotReady(
            "models are loading and warming up".into(),
        )),
        Readiness::Failed(fault) => Err(ApiError::NotReady(format!(
            "the compute worker stopped: {}; the server log has the error",
            fault.summary
        ))),
    }
}

/// Prometheus metrics, names prefixed `tnas_`.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", body = String)), tag = "health")]
pub async fn metrics(State(state): State<SharedState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
