//! `GET /genotypes`, `GET /genotypes/{task_id}` (JSON or DARTS Python), `GET /genotypes/{task_id}/svg`.

use crate::server::api::{ErrorBody, GenotypeRecord};
use crate::server::error::ApiError;
use crate::server::extract::{Path, Query};
use crate::server::state::SharedState;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct GenotypeQuery {
    /// `json` (default) or `python` (DARTS's `Genotype(...)` repr).
    pub format: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// How many of the most recent genotypes (default 20, at most 1000; more is refused).
    pub limit: Option<usize>,
}

/// The most records one listing returns: with labels bounded by `--max-label-bytes`, this bounds
/// the response's size.
pub const MAX_LIST_LIMIT: usize = 1000;

async fn lookup(state: &SharedState, task_id: &str) -> Result<GenotypeRecord, ApiError> {
    let task_id = super::task_id(task_id)?;
    state.store.get(&task_id).await?.ok_or_else(|| {
        ApiError::NotFound(format!(
            "no genotype for task {task_id}; it never existed or was evicted from the store"
        ))
    })
}

/// A task's genotype with its metadata.
#[utoipa::path(get, path = "/genotypes/{task_id}", params(("task_id" = String, Path, description = "From POST /adapt"), GenotypeQuery),
    responses((status = 200, body = GenotypeRecord, description = "JSON, or text/x-python with ?format=python"), (status = 400, body = ErrorBody, description = "Unknown format or query parameter"), (status = 404, body = ErrorBody, description = "Unknown task id"), (status = 503, body = ErrorBody, description = "The shared store (Redis) is unreachable or slow")), tag = "genotypes")]
pub async fn get_genotype(
    State(state): State<SharedState>,
    Path(task_id): Path<String>,
    Query(query): Query<GenotypeQuery>,
) -> Result<Response, ApiError> {
    let record = lookup(&state, &task_id).await?;
    match query.format.as_deref() {
        None | Some("json") => Ok(Json(record).into_response()),
        Some("python") => Ok((
            [(header::CONTENT_TYPE, "text/x-python; charset=utf-8")],
            record.genotype.to_python() + "\n",
        )
            .into_response()),
        Some(other) => Err(ApiError::bad_request(
            "invalid_format",
            format!("format '{other}' is unknown; use json or python"),
        )),
    }
}

/// The normal and reduction cells drawn as DARTS draws them.
#[utoipa::path(get, path = "/genotypes/{task_id}/svg", params(("task_id" = String, Path, description = "From POST /adapt")),
    responses((status = 200, content_type = "image/svg+xml", body = String), (status = 404, body = ErrorBody, description = "Unknown task id"), (status = 503, body = ErrorBody, description = "The shared store (Redis) is unreachable or slow")), tag = "genotypes")]
pub async fn get_genotype_svg(
    State(state): State<SharedState>,
    Path(task_id): Path<String>,
) -> Result<Response, ApiError> {
    let record = lookup(&state, &task_id).await?;
    Ok((
        [(header::CONTENT_TYPE, "image/svg+xml")],
        crate::nn::genotype_svg::render(&record.genotype),
    )
        .into_response())
}

/// The most recent genotypes, newest first.
#[utoipa::path(get, path = "/genotypes", params(ListQuery),
    responses((status = 200, body = Vec<GenotypeRecord>), (status = 400, body = ErrorBody, description = "Malformed or unknown query parameter, or limit over 1000"), (status = 503, body = ErrorBody, description = "The shared store (Redis) is unreachable or slow")),
    tag = "genotypes")]
pub async fn list_genotypes(
    State(state): State<SharedState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<GenotypeRecord>>, ApiError> {
    match query.limit.unwrap_or(20) {
        limit if limit > MAX_LIST_LIMIT => {
            Err(ApiError::bad_request("limit_over_cap", format!("limit={limit} is over the cap of {MAX_LIST_LIMIT}; ask for at most {MAX_LIST_LIMIT}")))
        }
        limit => Ok(Json(state.store.recent(limit).await?)),
    }
}
