//! `POST /adapt`: parse, validate, decode images, queue for the worker, answer.

use crate::server::api::{AdaptResponse, ErrorBody, GenotypeRecord, Prediction, TimingMs};
use crate::server::error::ApiError;
use crate::server::state::SharedState;
use crate::server::task_request::TaskRequest;
use crate::server::worker::{Job, WorkerError};
use axum::extract::{FromRequest, Request, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::Json;
use std::time::{Duration, Instant};

/// Adapt the model to a few-shot task and classify its queries.
#[utoipa::path(
    post,
    path = "/adapt",
    request_body(content = crate::server::api::AdaptRequest, description = "JSON, or multipart/form-data with support[<label>] files, query files and an options part", content_type = "application/json"),
    responses(
        (status = 200, description = "Genotype and predictions", body = AdaptResponse),
        (status = 400, description = "Malformed JSON, multipart, base64 or image", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body, image or image count over the limit", body = ErrorBody),
        (status = 415, description = "Not JSON or multipart", body = ErrorBody),
        (status = 422, description = "Semantically invalid task", body = ErrorBody),
        (status = 429, description = "Queue full; see Retry-After", body = ErrorBody),
        (status = 503, description = "Not ready", body = ErrorBody),
        (status = 504, description = "Timed out", body = ErrorBody),
    ),
    tag = "adaptation"
)]
pub async fn adapt(State(state): State<SharedState>, request: Request) -> Result<Json<AdaptResponse>, ApiError> {
    let arrived = Instant::now();
    let deadline = arrived + Duration::from_millis(state.limits.request_timeout_ms);
    let task = parse(&state, request).await?;
    let name = task.options.model.clone().unwrap_or_else(|| state.default_model.clone());
    let meta = state.models.get(&name).ok_or_else(|| ApiError::NotFound(format!("no model named '{name}'; GET /models lists the loaded ones")))?.clone();
    let options = task.validate(&meta, &state.limits)?;
    let (labels, _) = task.classes();
    let ids: Vec<String> = task.query.iter().map(|(id, _)| id.clone()).collect();
    let k_shot = task.support.len() / labels.len();
    let limits = state.limits.clone();
    let decode_meta = meta.clone();
    let input = tokio::task::spawn_blocking(move || task.into_task_input(&decode_meta, &limits, options))
        .await
        .map_err(|e| ApiError::Internal(format!("image decoding task failed: {e}")))??;
    let decode_ms = arrived.elapsed().as_secs_f64() * 1e3;

    let (reply, response) = tokio::sync::oneshot::channel();
    state.worker.submit(Job { input, deadline, enqueued: Instant::now(), reply }).map_err(|e| match e {
        WorkerError::QueueFull => ApiError::QueueFull(state.worker.queued()),
        other => ApiError::NotReady(format!("the compute worker is unavailable ({other}); check /readyz")),
    })?;
    let timeout_ms = state.limits.request_timeout_ms;
    let output = match tokio::time::timeout_at(deadline.into(), response).await {
        Err(_) => return Err(ApiError::Timeout(timeout_ms)),
        Ok(Err(_)) => return Err(ApiError::Internal("the worker dropped the reply".into())),
        Ok(Ok(Err(WorkerError::DeadlinePassed { .. } | WorkerError::Cancelled))) => return Err(ApiError::Timeout(timeout_ms)),
        Ok(Ok(Err(e))) => return Err(ApiError::Internal(e.to_string())),
        Ok(Ok(Ok(output))) => output,
    };

    let task_id = uuid::Uuid::new_v4().to_string();
    if let Some(genotype) = &output.genotype {
        state.store.insert(GenotypeRecord {
            task_id: task_id.clone(),
            model: name.clone(),
            labels: labels.clone(),
            n_way: labels.len(),
            k_shot,
            created_at: chrono::Utc::now().to_rfc3339(),
            genotype: genotype.clone(),
        });
    }
    let predictions = ids.into_iter().zip(output.logits).map(|(id, logits)| prediction(id, logits, &labels)).collect();
    metrics::histogram!("tnas_total_seconds").record(arrived.elapsed().as_secs_f64());
    Ok(Json(AdaptResponse {
        task_id,
        model: name,
        labels,
        genotype: output.genotype,
        alphas: output.alphas,
        predictions,
        steps: options.steps,
        device: crate::device::device_name(state.worker.device),
        cuda_graph: output.cuda_graph,
        timing_ms: TimingMs { decode_images: decode_ms, queue: output.queue_ms, adapt: output.adapt_ms, predict: output.predict_ms, total: arrived.elapsed().as_secs_f64() * 1e3 },
    }))
}

/// Reads the body by content type, refusing oversized bodies before reading them.
async fn parse(state: &SharedState, request: Request) -> Result<TaskRequest, ApiError> {
    let max = state.limits.max_body_bytes;
    let too_large = || ApiError::PayloadTooLarge(format!("request body is over the limit of {max} bytes; send fewer or smaller images"));
    let declared = request.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let content_type = request.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_ascii_lowercase();
    if content_type.starts_with("application/json") {
        let body = axum::body::to_bytes(request.into_body(), max).await.map_err(|_| too_large())?;
        TaskRequest::from_json(&body)
    } else if content_type.starts_with("multipart/form-data") {
        let multipart = axum::extract::Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError::bad_request("invalid_multipart", format!("multipart body is malformed: {}", e.body_text())))?;
        TaskRequest::from_multipart(multipart).await
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "content type '{content_type}' is not accepted; send application/json or multipart/form-data"
        )))
    }
}

fn prediction(id: String, logits: Vec<f32>, labels: &[String]) -> Prediction {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let probabilities: Vec<f32> = exp.iter().map(|e| e / sum).collect();
    let best = probabilities.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
    Prediction { id, label: labels[best].clone(), probabilities, logits }
}
