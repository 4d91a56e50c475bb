//! Cross-cutting layers: bearer-token auth, request metrics, request ids and tracing, 404s.

use super::error::ApiError;
use super::state::SharedState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use std::time::Instant;
use subtle::ConstantTimeEq;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Requires `Authorization: Bearer <key>` when an API key is configured (constant-time compare).
/// The scheme is matched in any case, as RFC 7235 has it.
pub async fn require_api_key(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(expected) = &state.api_key {
        let credentials = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '));
        let given = credentials
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim_start());
        if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            return Err(ApiError::Unauthorized(
                "missing or wrong API key; send Authorization: Bearer <key>".into(),
            ));
        }
    }
    Ok(next.run(request).await)
}

/// Counts requests by route and status and records their latency.
pub async fn record_metrics(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("tnas_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("tnas_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// JSON 404 for unknown paths.
pub async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {} {}; see /docs",
        request.method(),
        request.uri().path()
    ))
}

/// JSON 405 for a known path asked with a method it does not serve.
pub async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{} {} is not served; see /docs for this path's methods",
        request.method(),
        request.uri().path()
    ))
}

/// Gives every request an `x-request-id` (kept if the client sent one), returns it, and opens a
/// tracing span carrying it, so every log line of the request names it.
pub fn with_request_ids(app: Router) -> Router {
    app.layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let id = request.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", request_id = %id, method = %request.method(), path = %request.uri().path())
        }))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// Adds CORS for the configured origins only (`*` alone: every origin); with none configured,
/// browsers get no CORS headers.
pub fn with_cors(app: Router, origins: &[header::HeaderValue]) -> Router {
    let allowed = match origins {
        [] => return app,
        [only] if only == "*" => tower_http::cors::AllowOrigin::any(),
        listed => tower_http::cors::AllowOrigin::list(listed.to_vec()),
    };
    app.layer(
        tower_http::cors::CorsLayer::new()
            .allow_origin(allowed)
            .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION]),
    )
}
