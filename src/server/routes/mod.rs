//! HTTP handlers, one file per route group.

pub mod adapt;
pub mod genotypes;
pub mod health;
pub mod models;
pub mod tasks;

use crate::server::error::ApiError;
use crate::server::state::SharedState;
use crate::server::worker::Readiness;
use crate::server::worker_error::WorkerError;
use std::time::Instant;
use tokio::sync::{oneshot, SemaphorePermit};

/// A task id as `POST /adapt` wrote it (lowercase, hyphenated), from any form of the same UUID a
/// client may send (uppercase, braces, `urn:uuid:`), so that each names the one stored task.
fn task_id(text: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(text)
        .map(|id| id.hyphenated().to_string())
        .map_err(|_| {
            ApiError::NotFound(format!(
                "'{text}' is not a task id; use the task_id (a UUID) that POST /adapt returned"
            ))
        })
}

/// A compute request's place in the server, taken before its body is read: refused when the
/// compute worker has stopped, or when as many requests as the server takes are in flight. A
/// full queue refuses later, so that a malformed request still hears what is wrong with it.
fn enter(state: &SharedState) -> Result<SemaphorePermit<'_>, ApiError> {
    if let Readiness::Failed(fault) = state.worker.readiness() {
        return Err(ApiError::NotReady(format!(
            "the compute worker stopped ({}); check /readyz",
            fault.summary
        )));
    }
    state
        .in_flight
        .try_acquire()
        .map_err(|_| ApiError::Overloaded(state.limits.max_in_flight))
}

/// Why the compute worker would not take a job (a full `queue`, of jobs of the kind it names, or a
/// stopped worker), in the words every route that hands it jobs uses.
fn not_queued(error: WorkerError, queue: &'static str, waiting: usize) -> ApiError {
    match error {
        WorkerError::QueueFull => ApiError::QueueFull { queue, waiting },
        other => ApiError::NotReady(format!(
            "the compute worker is unavailable ({other}); check /readyz"
        )),
    }
}

/// The worker's answer to a job, awaited until `deadline`, or what went wrong in the words every
/// route that hands it jobs uses: the client's own task (diverged, too big for the device) is a
/// 4xx, a stopped worker a 503, and only a fault on our side a 500. `job` names the job in messages.
async fn worker_output<T>(
    state: &SharedState,
    response: oneshot::Receiver<Result<T, WorkerError>>,
    deadline: Instant,
    job: &str,
) -> Result<T, ApiError> {
    match tokio::time::timeout_at(deadline.into(), response).await {
        Err(_) | Ok(Ok(Err(WorkerError::DeadlinePassed { .. } | WorkerError::Cancelled))) => {
            Err(ApiError::Timeout(state.limits.request_timeout_ms))
        }
        Ok(Err(_) | Ok(Err(WorkerError::Stopped))) => Err(ApiError::NotReady(format!(
            "the compute worker stopped before this {job} ran; check /readyz"
        ))),
        Ok(Ok(Err(WorkerError::Diverged))) => Err(ApiError::unprocessable(
            "adaptation_diverged",
            "the adaptation diverged (its logits or architecture weights became infinite or NaN); \
             adapt the task again with lower lr_w or lr_theta, or leave them at the model's defaults",
        )),
        Ok(Ok(Err(WorkerError::OutOfMemory(_)))) => Err(ApiError::PayloadTooLarge(format!(
            "the {job} needs more memory than the device has free; send fewer query images per request"
        ))),
        Ok(Ok(Err(error @ (WorkerError::QueueFull | WorkerError::Failed(_))))) => {
            Err(ApiError::Internal(error.to_string()))
        }
        Ok(Ok(Ok(output))) => Ok(output),
    }
}
