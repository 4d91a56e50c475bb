//! The HTTP adaptation server (docs/HTTP_API.md).
//!
//! - [`config`]: flags and limits. [`api`]: request/response bodies. [`error`]: `ApiError` → status + JSON;
//!   [`extract`]: query and path extractors that reject with it.
//! - [`task_request`]: where a request becomes a task (parsing, validation, image decoding).
//! - [`worker`]: the compute thread that owns the tensors, behind a bounded queue; [`batcher`]:
//!   which waiting tasks run together (no tensors); [`compute`]: what the worker computes for a
//!   task or a batch; [`admission`]: what queued tasks will cost, to refuse those that would miss
//!   their deadline; [`worker_error`]: how a job can fail.
//! - [`store`]: recent genotypes, in memory or in Redis shared by replicas. [`routes`]: handlers.
//!   [`middleware`]: auth, metrics, request ids.
//! - [`connections`]: the accept loop; what a connection may cost, and how it ends at shutdown.
//! - [`openapi`]: the generated OpenAPI document.

pub mod admission;
pub mod api;
mod batcher;
pub mod compute;
pub mod config;
pub mod connections;
pub mod error;
pub mod extract;
pub mod middleware;
pub mod openapi;
mod recorded;
pub mod routes;
pub mod state;
pub mod store;
pub mod task_request;
pub mod worker;
pub mod worker_error;

use crate::model::checkpoint::{Checkpoint, META_FILE};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use config::ServerConfig;
use state::{AppState, SharedState};
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use store::task_models::TaskModelStore;
use store::GenotypeStore;
use tch::Device;
use worker::Worker;

/// Every protected route (auth applies) plus the open health routes.
pub fn router(state: SharedState) -> Router {
    let protected = Router::new()
        .route("/adapt", post(routes::adapt::adapt))
        .route("/genotypes", get(routes::genotypes::list_genotypes))
        .route("/genotypes/{task_id}", get(routes::genotypes::get_genotype))
        .route(
            "/genotypes/{task_id}/svg",
            get(routes::genotypes::get_genotype_svg),
        )
        .route("/tasks/{task_id}/predict", post(routes::tasks::predict))
        .route("/tasks/{task_id}/model", get(routes::tasks::download_model))
        .route("/models", get(routes::models::list_models))
        .route("/models/{name}", get(routes::models::get_model))
        .merge(openapi::docs())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::require_api_key,
        ));
    let open = Router::new()
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .route("/metrics", get(routes::health::metrics));
    let app = protected
        .merge(open)
        .fallback(middleware::not_found)
        .method_not_allowed_fallback(middleware::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(axum::middleware::from_fn(middleware::record_metrics))
        .with_state(state.clone());
    middleware::with_cors(middleware::with_request_ids(app), &state.cors_origins)
}

/// Loads every `models/<name>/model.json` (sorted by name), first removing the temp files of saves
/// a crash interrupted there; any unreadable model, or two with one name, stops start-up with an
/// error naming the files, since serving a partial model set, or the wrong one of two under a
/// name, would surprise clients.
pub fn load_models(dir: &Path) -> Result<Vec<Checkpoint>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut dirs: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join(META_FILE).exists())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        return Err(format!(
            "{}: no model directories (subfolders with {META_FILE})",
            dir.display()
        ));
    }
    for dir in &dirs {
        crate::model::checkpoint::remove_interrupted_temp_files(dir);
    }
    let checkpoints: Vec<Checkpoint> = dirs
        .iter()
        .map(|d| Checkpoint::load(d, Device::Cpu).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    for (i, checkpoint) in checkpoints.iter().enumerate() {
        if let Some(j) = checkpoints[..i]
            .iter()
            .position(|other| other.meta.name == checkpoint.meta.name)
        {
            return Err(format!(
                "{} and {} are both named '{}' in their {META_FILE}; give each model its own name",
                dirs[j].join(META_FILE).display(),
                dirs[i].join(META_FILE).display(),
                checkpoint.meta.name
            ));
        }
    }
    Ok(checkpoints)
}

/// The process-wide Prometheus recorder (installed once; tests start several servers).
fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Builds the state: loads models on the CPU (verifying them), starts the worker on `device`.
pub fn build_state(
    config: &ServerConfig,
    checkpoints: Vec<Checkpoint>,
    device: Device,
) -> Result<SharedState, String> {
    for meta in checkpoints.iter().map(|c| &c.meta) {
        let a = meta.adaptation;
        for (name, steps) in [("steps", a.steps), ("finetune_steps", a.finetune_steps)] {
            if steps > config.limits.max_steps {
                return Err(format!(
                    "model '{}' adapts with adaptation.{name} = {steps} by default, over \
                     --max-steps {}: every request that keeps the default would be refused; \
                     raise --max-steps",
                    meta.name, config.limits.max_steps
                ));
            }
        }
    }
    let models: std::collections::BTreeMap<_, _> = checkpoints
        .iter()
        .map(|c| (c.meta.name.clone(), c.meta.clone()))
        .collect();
    let default_model = match &config.default_model {
        Some(name) if models.contains_key(name) => name.clone(),
        Some(name) => {
            return Err(format!(
                "--default-model {name} is not among the loaded models: {:?}",
                models.keys().collect::<Vec<_>>()
            ))
        }
        None => models.keys().next().cloned().ok_or("no models loaded")?,
    };
    let cors_origins = config
        .cors_origins
        .iter()
        .map(|origin| axum::http::HeaderValue::from_str(origin).map_err(|_| format!("--cors-origins: '{origin}' is not a valid origin; give origins like https://example.org, comma-separated")))
        .collect::<Result<Vec<_>, _>>()?;
    if cors_origins.len() > 1 && cors_origins.iter().any(|o| o == "*") {
        return Err("--cors-origins: '*' allows every origin, so it stands alone; give either '*' or a list of origins".into());
    }
    let store = GenotypeStore::open(&config.store.store, config.store.bounds(&config.limits))?;
    let worker = Worker::spawn(
        checkpoints,
        device,
        config.limits.queue_depth,
        config.limits.max_batch_on(device),
        config.worker_threads(),
        config.cuda_graphs,
    );
    Ok(Arc::new(AppState {
        models,
        default_model,
        worker,
        decoding_slots: Arc::new(tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(1, usize::from),
        )),
        in_flight: tokio::sync::Semaphore::new(config.limits.max_in_flight),
        task_models: TaskModelStore::beside(&store, config.limits.task_store_bytes),
        store,
        limits: config.limits.clone(),
        metrics: metrics_handle(),
        api_key: config.api_key.clone(),
        cors_origins,
    }))
}

/// Serves until `shutdown` resolves, then closes idle and half-read connections at once and
/// finishes the requests in flight, each by its deadline.
pub async fn run(
    state: SharedState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = state.limits.connections();
    let trimming = tokio::spawn(return_freed_memory(Arc::clone(&state)));
    let served = connections::serve(listener, router(state), limits, shutdown).await;
    trimming.abort();
    served
}

/// Hands the memory that finished requests freed back to the OS whenever no adaptation request is
/// in the server. glibc keeps freed memory in its per-thread arenas for reuse, so without this a
/// burst of large bodies and images would leave the process at its peak for good.
async fn return_freed_memory(state: SharedState) {
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        ticks.tick().await;
        if state.in_flight.available_permits() == state.limits.max_in_flight {
            let _ = tokio::task::spawn_blocking(trim_heap).await;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    // SAFETY: malloc_trim only returns free pages of the heap to the OS; any thread may call it.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}
