//! `POST /adapt`: parse, validate, decode images, queue for the worker, answer.

use crate::model::metadata::TaskOrigin;
use crate::server::admission::CostKey;
use crate::server::api::{AdaptResponse, ErrorBody, GenotypeRecord, Prediction, TimingMs};
use crate::server::error::ApiError;
use crate::server::state::SharedState;
use crate::server::store::kept_task::KeptTask;
use crate::server::task_request::TaskRequest;
use crate::server::worker::Job;
use axum::extract::{FromRequest, Request, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::Json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Adapt the model to a few-shot task and classify its queries.
#[utoipa::path(
    post,
    path = "/adapt",
    request_body(
        description = "JSON, or multipart/form-data: `support[<label>]` parts (image files, repeated), `query` parts (image files, repeated; id = filename) and an optional `options` part holding the JSON options",
        content((crate::server::api::AdaptRequest = "application/json"), ("multipart/form-data"))
    ),
    responses(
        (status = 200, description = "Genotype and predictions", body = AdaptResponse),
        (status = 400, description = "Malformed JSON, multipart, base64 or image", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body, image or image count over the limit, or the task over the device's free memory", body = ErrorBody),
        (status = 415, description = "Not JSON or multipart", body = ErrorBody),
        (status = 422, description = "Semantically invalid task, or an adaptation that diverged", body = ErrorBody),
        (status = 429, description = "Queue full, the server at its limit of requests in flight, or the task estimated to miss its deadline \
            behind the work queued; see Retry-After", body = ErrorBody),
        (status = 503, description = "Not ready, or the compute worker stopped (see /readyz)", body = ErrorBody),
        (status = 504, description = "Timed out", body = ErrorBody),
    ),
    tag = "adaptation"
)]
pub async fn adapt(
    State(state): State<SharedState>,
    request: Request,
) -> Result<Json<AdaptResponse>, ApiError> {
    let arrived = Instant::now();
    let deadline = arrived + Duration::from_millis(state.limits.request_timeout_ms);
    let timed_out = || ApiError::Timeout(state.limits.request_timeout_ms);
    let _in_flight = super::enter(&state)?;
    let task = tokio::time::timeout_at(
        deadline.into(),
        parse(&state, request, TaskRequest::from_json),
    )
    .await
    .map_err(|_| timed_out())??;
    let name = task
        .options
        .model
        .clone()
        .unwrap_or_else(|| state.default_model.clone());
    let meta = state
        .models
        .get(&name)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no model named '{name}'; GET /models lists the loaded ones"
            ))
        })?
        .clone();
    let options = task.validate(&meta, &state.limits)?;
    let (labels, support_labels) = task.classes();
    let ids: Vec<String> = task.query.iter().map(|(id, _)| id.clone()).collect();
    let k_shot = (0..labels.len() as i64)
        .map(|class| support_labels.iter().filter(|&&l| l == class).count())
        .min()
        .unwrap_or(0);
    let cost = CostKey::new(
        &name,
        labels.len(),
        task.support.len(),
        task.query.len(),
        &options,
    );
    let timeout = Duration::from_millis(state.limits.request_timeout_ms);
    let remaining = deadline.saturating_duration_since(Instant::now());
    let refused = |refusal| ApiError::WouldMissDeadline {
        refusal,
        timeout_ms: state.limits.request_timeout_ms,
    };
    let reservation = state
        .worker
        .admission()
        .admit(&cost, remaining, timeout)
        .map_err(refused)?;
    let decode_started = Instant::now();
    let (limits, source) = (state.limits.clone(), meta.clone());
    let decoding = decode(&state, move |keep_going| {
        task.into_task_input(&source, &limits, options, keep_going)
    });
    let input = tokio::time::timeout_at(deadline.into(), decoding)
        .await
        .map_err(|_| timed_out())??;
    let decode_ms = decode_started.elapsed().as_secs_f64() * 1e3;

    let (reply, response) = tokio::sync::oneshot::channel();
    state
        .worker
        .submit(Job {
            input,
            deadline,
            enqueued: Instant::now(),
            reply,
        })
        .map_err(|e| super::not_queued(e, "adaptation", state.worker.queued()))?;
    reservation.hand_over();
    let output = super::worker_output(&state, response, deadline, "task").await?;

    let task_id = output
        .genotype
        .as_ref()
        .map(|_| uuid::Uuid::new_v4().to_string());
    let record = output
        .genotype
        .clone()
        .zip(task_id.clone())
        .map(|(genotype, task_id)| GenotypeRecord {
            task_id,
            model: name.clone(),
            labels: labels.clone(),
            n_way: labels.len(),
            k_shot,
            created_at: chrono::Utc::now().to_rfc3339(),
            genotype,
        });
    let task = task_id
        .clone()
        .zip(output.task_model)
        .map(|(task_id, bytes)| {
            let origin = TaskOrigin {
                task_id,
                adapted_from: name.clone(),
                adapted_from_sha256: meta.sha256.clone(),
                labels: labels.clone(),
            };
            KeptTask::new(&meta, origin, &options, output.genotype.clone(), bytes)
        });
    // Both go to the store at once: a stalled Redis costs the answer one store timeout, not two.
    let (genotype_stored, task_model_kept) = tokio::join!(
        async {
            match record {
                Some(record) => store(&state, record).await,
                None => false,
            }
        },
        async {
            match task {
                Some(task) => keep(&state, task).await,
                None => false,
            }
        }
    );
    let predictions = ids
        .into_iter()
        .zip(output.logits)
        .map(|(id, logits)| prediction(id, logits, &labels))
        .collect();
    metrics::histogram!("tnas_total_seconds").record(arrived.elapsed().as_secs_f64());
    Ok(Json(AdaptResponse {
        task_id,
        model: name,
        labels,
        genotype: output.genotype,
        genotype_stored,
        task_model_kept,
        alphas: output.alphas,
        predictions,
        steps: options.steps,
        device: crate::runtime::device::device_name(state.worker.device),
        cuda_graph: output.cuda_graph,
        timing_ms: TimingMs {
            decode_images: decode_ms,
            queue: output.queue_ms,
            adapt: output.adapt_ms,
            predict: output.predict_ms,
            total: arrived.elapsed().as_secs_f64() * 1e3,
        },
    }))
}

/// Keeps the task's genotype for `GET /genotypes/{task_id}`, and says whether it could: a store
/// that is down or slow costs the answer its stored copy, never the answer itself.
async fn store(state: &SharedState, record: GenotypeRecord) -> bool {
    let task_id = record.task_id.clone();
    match state.store.insert(record).await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%task_id, %error, "genotype not stored; the response still carries it");
            false
        }
    }
}

/// Keeps the task model for later predictions and downloads, and says whether it could: one larger
/// than the whole `--task-store-bytes` is not kept, nor one while Redis is unreachable.
async fn keep(state: &SharedState, task: KeptTask) -> bool {
    let task_id = task.task_id().to_string();
    match state.task_models.insert(task).await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%task_id, %error, "task model not kept");
            false
        }
    }
}

/// Decodes a request's body or images (`work`, given whether to keep going) off the async runtime, at
/// most one request per decoding slot (one per core) at a time, so that a burst of large pictures
/// queues here instead of taking every blocking thread and its memory. Decoding stops between
/// images once this future is dropped: the client has gone, or the deadline the caller holds it
/// to has passed.
pub(super) async fn decode<T: Send + 'static>(
    state: &SharedState,
    work: impl FnOnce(&dyn Fn() -> bool) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let slot = Arc::clone(&state.decoding_slots)
        .acquire_owned()
        .await
        .map_err(|e| ApiError::Internal(format!("decoding slots closed: {e}")))?;
    let abandoned = Arc::new(AtomicBool::new(false));
    let _on_drop = AbandonOnDrop(Arc::clone(&abandoned));
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        work(&|| !abandoned.load(Ordering::Relaxed))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("a decoding task failed: {e}")))?
}

/// Marks a request's decoding abandoned when its handler is dropped (the client went away).
struct AbandonOnDrop(Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Reads the body by content type, refusing oversized bodies before reading them; a JSON body is
/// parsed by `from_json`, off the async runtime.
pub(super) async fn parse(
    state: &SharedState,
    request: Request,
    from_json: fn(&[u8]) -> Result<TaskRequest, ApiError>,
) -> Result<TaskRequest, ApiError> {
    let max = state.limits.max_body_bytes;
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "request body is over the limit of {max} bytes; send fewer or smaller images"
        ))
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    // The media type without its parameters (`; charset=utf-8`, `; boundary=…`).
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        let body = axum::body::to_bytes(request.into_body(), max)
            .await
            .map_err(|e| {
                let over_limit = std::error::Error::source(&e)
                    .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
                if over_limit {
                    too_large()
                } else {
                    ApiError::bad_request(
                        "invalid_body",
                        format!(
                            "the request body could not be read ({e}); send the whole body again"
                        ),
                    )
                }
            })?;
        // Parsing and base64-decoding up to the whole body limit is CPU work: off the runtime, in
        // a decoding slot, as decoding the images is.
        decode(state, move |_| from_json(&body)).await
    } else if essence == "multipart/form-data" {
        let multipart = axum::extract::Multipart::from_request(request, &())
            .await
            .map_err(|e| {
                ApiError::bad_request(
                    "invalid_multipart",
                    format!("multipart body is malformed: {}", e.body_text()),
                )
            })?;
        TaskRequest::from_multipart(multipart).await
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "content type '{content_type}' is not accepted; send application/json or multipart/form-data"
        )))
    }
}

pub(super) fn prediction(id: String, logits: Vec<f32>, labels: &[String]) -> Prediction {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let probabilities: Vec<f32> = exp.iter().map(|e| e / sum).collect();
    let best = probabilities
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    Prediction {
        id,
        label: labels[best].clone(),
        probabilities,
        logits,
    }
}
