//! `GET /models`, `GET /models/{name}`: the loaded models' metadata.

use crate::model::metadata::ModelMeta;
use crate::server::api::ErrorBody;
use crate::server::error::ApiError;
use crate::server::extract::Path;
use crate::server::state::SharedState;
use axum::extract::State;
use axum::Json;

/// Every loaded model.
#[utoipa::path(get, path = "/models", responses((status = 200, body = Vec<ModelMeta>)), tag = "models")]
pub async fn list_models(State(state): State<SharedState>) -> Json<Vec<ModelMeta>> {
    Json(state.models.values().cloned().collect())
}

/// One model's `model.json`.
#[utoipa::path(get, path = "/models/{name}", params(("name" = String, Path, description = "Model name")), responses((status = 200, body = ModelMeta), (status = 404, body = ErrorBody)), tag = "models")]
pub async fn get_model(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Json<ModelMeta>, ApiError> {
    state.models.get(&name).cloned().map(Json).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no model named '{name}'; GET /models lists the loaded ones"
        ))
    })
}
