//! `POST /tasks/{task_id}/predict` (later queries for a kept task model) and
//! `GET /tasks/{task_id}/model` (the task model as a model folder, zipped).

use super::adapt::{decode, parse, prediction};
use crate::model::checkpoint::{META_FILE, WEIGHTS_FILE};
use crate::model::metadata::{ModelKind, TaskOrigin};
use crate::server::api::{ErrorBody, PredictResponse, PredictTimingMs};
use crate::server::compute::PredictInput;
use crate::server::error::ApiError;
use crate::server::extract::Path;
use crate::server::state::SharedState;
use crate::server::store::kept_task::KeptTask;
use crate::server::task_request::TaskRequest;
use crate::server::worker::PredictJob;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The file of a task model's support images, beside `model.json` and `model.safetensors`.
pub const SUPPORT_FILE: &str = "support.safetensors";

/// The kept task model of `task_id` with where it came from, if it is kept and its model is
/// served here as it was when the task was adapted.
async fn kept(state: &SharedState, task_id: &str) -> Result<(Arc<KeptTask>, TaskOrigin), ApiError> {
    let task_id = super::task_id(task_id)?;
    let task = state.task_models.get(&task_id).await?.ok_or_else(|| {
        ApiError::NotFound(format!(
            "no kept model for task {task_id}: it was never kept (\"keep\": false, or over --task-store-bytes), \
             it was evicted to make room for newer tasks, or another replica adapted it without a shared \
             store (--store redis://…); POST /adapt again with its support set"
        ))
    })?;
    let origin = task.meta.task.clone().ok_or_else(|| {
        ApiError::Internal(format!(
            "the kept model of task {task_id} does not record its task"
        ))
    })?;
    match state.models.get(&origin.adapted_from) {
        Some(model) if model.sha256 == origin.adapted_from_sha256 => Ok((task, origin)),
        Some(_) => Err(ApiError::unprocessable(
            "model_replaced",
            format!("task {task_id} was adapted from other weights of model '{}' than this server serves; POST /adapt again", origin.adapted_from),
        )),
        None => Err(ApiError::NotFound(format!(
            "task {task_id} was adapted from model '{}', which this server no longer serves; GET /models lists the loaded ones, POST /adapt again with one of them",
            origin.adapted_from
        ))),
    }
}

/// Classify new query images with a task's kept model, without adapting again.
#[utoipa::path(
    post,
    path = "/tasks/{task_id}/predict",
    params(("task_id" = String, Path, description = "From POST /adapt")),
    request_body(
        description = "JSON, or multipart/form-data: `query` parts (image files, repeated; id = filename) and an optional `options` part naming the `model`",
        content((crate::server::api::PredictRequest = "application/json"), ("multipart/form-data"))
    ),
    responses(
        (status = 200, description = "Predictions of the kept task model", body = PredictResponse),
        (status = 400, description = "Malformed JSON, multipart, base64 or image", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown or evicted task, or its model no longer served", body = ErrorBody),
        (status = 413, description = "Body, image or image count over the limit, or the queries need more memory than the device has free", body = ErrorBody),
        (status = 415, description = "Not JSON or multipart", body = ErrorBody),
        (status = 422, description = "No queries, support images or adaptation options sent, another model named, the model's weights replaced, or the kept model's logits not finite (adapt again with lower rates)", body = ErrorBody),
        (status = 429, description = "Prediction queue full, or the server at its limit of requests in flight; see Retry-After", body = ErrorBody),
        (status = 503, description = "Not ready, the compute worker stopped (see /readyz), or the shared store (Redis) is unreachable or slow", body = ErrorBody),
        (status = 504, description = "Timed out", body = ErrorBody),
    ),
    tag = "tasks"
)]
pub async fn predict(
    State(state): State<SharedState>,
    Path(task_id): Path<String>,
    request: Request,
) -> Result<Json<PredictResponse>, ApiError> {
    let arrived = Instant::now();
    let deadline = arrived + Duration::from_millis(state.limits.request_timeout_ms);
    let timed_out = || ApiError::Timeout(state.limits.request_timeout_ms);
    let _in_flight = super::enter(&state)?;
    let (task, origin) = kept(&state, &task_id).await?;
    let request = parse(&state, request, TaskRequest::from_predict_json);
    let request = tokio::time::timeout_at(deadline.into(), request)
        .await
        .map_err(|_| timed_out())??;
    request.validate_queries(&state.limits, task.meta.adaptation.views)?;
    if let Some(model) = request
        .options
        .model
        .as_ref()
        .filter(|m| **m != origin.adapted_from)
    {
        return Err(ApiError::unprocessable(
            "wrong_model",
            format!("task {task_id} was adapted from model '{}', not '{model}'; name its own model or none", origin.adapted_from),
        ));
    }
    let ids: Vec<String> = request.query.iter().map(|(id, _)| id.clone()).collect();
    let decode_started = Instant::now();
    let (limits, input) = (state.limits.clone(), task.meta.input.clone());
    let decoding = decode(&state, move |keep_going| {
        request.decoded(&input, &limits, keep_going)
    });
    let query = tokio::time::timeout_at(deadline.into(), decoding)
        .await
        .map_err(|_| timed_out())??;
    let decode_ms = decode_started.elapsed().as_secs_f64() * 1e3;
    let predict_with = match task.meta.kind {
        ModelKind::Supernet => crate::adapt::PredictWith::Supernet,
        _ => crate::adapt::PredictWith::Derived,
    };
    let (reply, response) = tokio::sync::oneshot::channel();
    let job = PredictJob {
        input: PredictInput { task, query },
        deadline,
        enqueued: Instant::now(),
        reply,
    };
    state
        .worker
        .submit_prediction(job)
        .map_err(|e| super::not_queued(e, "prediction", state.limits.queue_depth))?;
    let output = super::worker_output(&state, response, deadline, "prediction").await?;
    let predictions = ids
        .into_iter()
        .zip(output.logits)
        .map(|(id, logits)| prediction(id, logits, &origin.labels))
        .collect();
    metrics::histogram!("tnas_predict_total_seconds").record(arrived.elapsed().as_secs_f64());
    Ok(Json(PredictResponse {
        task_id,
        model: origin.adapted_from,
        labels: origin.labels,
        predict_with,
        predictions,
        device: crate::runtime::device::device_name(state.worker.device),
        timing_ms: PredictTimingMs {
            decode_images: decode_ms,
            queue: output.queue_ms,
            load: output.load_ms,
            predict: output.predict_ms,
            total: arrived.elapsed().as_secs_f64() * 1e3,
        },
    }))
}

/// Download a task's kept model: a zip of one folder, `task-<task_id>/`, holding `model.json`,
/// `model.safetensors` and `support.safetensors`, which `tnas-server --models` serves and
/// `tools/task_model.py` runs.
#[utoipa::path(
    get,
    path = "/tasks/{task_id}/model",
    params(("task_id" = String, Path, description = "From POST /adapt")),
    responses(
        (status = 200, description = "application/zip: the folder task-<task_id>/ with model.json, model.safetensors and support.safetensors", content_type = "application/zip"),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown or evicted task, or its model no longer served", body = ErrorBody),
        (status = 422, description = "The model's weights were replaced since the task was adapted", body = ErrorBody),
        (status = 429, description = "Too many requests in flight (--max-in-flight); retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The shared store (Redis) is unreachable or slow", body = ErrorBody),
    ),
    tag = "tasks"
)]
pub async fn download_model(
    State(state): State<SharedState>,
    Path(task_id): Path<String>,
) -> Result<Response, ApiError> {
    // Each download zips a copy of its model in memory: it counts as a request in flight.
    let _in_flight = super::enter(&state)?;
    let (task, _) = kept(&state, &task_id).await?;
    let folder = task.meta.name.clone();
    let archive = tokio::task::spawn_blocking(move || zipped(&task))
        .await
        .map_err(|e| ApiError::Internal(format!("zipping a task model failed: {e}")))?
        .map_err(|e| ApiError::Internal(format!("zipping a task model failed: {e}")))?;
    let disposition = format!("attachment; filename=\"{folder}.zip\"");
    Ok((
        [
            (header::CONTENT_TYPE, "application/zip".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        archive,
    )
        .into_response())
}

/// The task model's folder as a zip (stored, not compressed: float weights barely compress).
fn zipped(task: &KeptTask) -> zip::result::ZipResult<Vec<u8>> {
    let json = serde_json::to_vec_pretty(&task.meta).expect("metadata serialises");
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .unix_permissions(0o644);
    for (file, bytes) in [
        (META_FILE, &json),
        (WEIGHTS_FILE, &task.weights),
        (SUPPORT_FILE, &task.support),
    ] {
        zip.start_file(format!("{}/{file}", task.meta.name), options)?;
        zip.write_all(bytes)?;
    }
    Ok(zip.finish()?.into_inner())
}
