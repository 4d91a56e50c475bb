//! `/healthz` (alive), `/readyz` (models loaded and warmed up; the store's state), `/metrics`
//! (Prometheus text).

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
        store: None,
        reason: None,
    })
}

/// 200 once every model is loaded and warmed up on its device; 503 before, and after a fault.
/// An unreachable store keeps it 200, as `degraded` with the reason: adaptation still works, so
/// a load balancer should keep sending it requests.
#[utoipa::path(get, path = "/readyz", responses((status = 200, body = HealthStatus, description = "ready, or degraded (the store unreachable) with the reason"), (status = 503, body = crate::server::api::ErrorBody)), tag = "health")]
pub async fn readyz(State(state): State<SharedState>) -> Result<Json<HealthStatus>, ApiError> {
    match state.worker.readiness() {
        Readiness::Ready => {}
        Readiness::Loading => {
            return Err(ApiError::NotReady(
                "models are loading and warming up".into(),
            ))
        }
        Readiness::Failed(fault) => {
            return Err(ApiError::NotReady(format!(
                "the compute worker stopped: {}; the server log has the error",
                fault.summary
            )))
        }
    }
    let (status, reason) = match state.store.check().await {
        Ok(()) => ("ready", None),
        Err(error) => (
            "degraded",
            Some(format!(
                "{error}; POST /adapt answers without storing genotypes or keeping task models \
                 (genotype_stored, task_model_kept: false), and GET /genotypes and /tasks/… answer \
                 503 until it is back"
            )),
        ),
    };
    Ok(Json(HealthStatus {
        status: status.into(),
        store: Some(state.store.kind().into()),
        reason,
    }))
}

/// Prometheus metrics, names prefixed `tnas_`.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", body = String)), tag = "health")]
pub async fn metrics(State(state): State<SharedState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
