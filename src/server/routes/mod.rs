//! HTTP handlers, one file per route group.

pub mod adapt;
pub mod genotypes;
pub mod health;
pub mod models;
pub mod tasks;

use crate::server::error::ApiError;
use crate::server::state::SharedState;
use crate::server::worker::Readiness;
use tokio::sync::SemaphorePermit;

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
