//! `ApiError`: every failure a request can meet, mapped to status and JSON body in one place.

use super::admission::Refusal;
use super::api::{ErrorBody, ErrorDetail};
use super::store::StoreError;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed request: bad JSON, base64, multipart, undecodable image.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Well-formed but unusable: label count, empty support, steps over the limit…
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    /// The worker's `queue` of jobs (adaptations or predictions) holds as many as it takes.
    #[error("the {queue} queue is full ({waiting} waiting); retry after a second")]
    QueueFull { queue: &'static str, waiting: usize },
    #[error("the server is handling its limit of {0} requests at once (adaptations, predictions and task model downloads); retry after a second")]
    Overloaded(usize),
    /// Admitting the task would have it miss its deadline (see [`super::admission`]).
    #[error(
        "the worker has about {:.1} s of work ahead of this task, which takes about {:.1} s itself: it would miss its {timeout_ms} ms deadline; \
         retry after {} s (Retry-After), or send fewer images or steps",
        refusal.wait.as_secs_f64(), refusal.cost.as_secs_f64(), refusal.retry_after_s
    )]
    WouldMissDeadline { refusal: Refusal, timeout_ms: u64 },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotReady(String),
    /// The shared store cannot be read now; the detail says where it is and what it said.
    #[error("{0}; genotypes and kept task models cannot be read until it is back (GET /readyz says when), while POST /adapt still answers")]
    StoreUnavailable(String),
    #[error("the request did not finish within {0} ms; send fewer images or steps, or raise --request-timeout-ms")]
    Timeout(u64),
    /// A fault on our side; the detail is logged, the client gets a generic message.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Unprocessable {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::QueueFull { .. }
            | ApiError::Overloaded(_)
            | ApiError::WouldMissDeadline { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotReady(_) | ApiError::StoreUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. } | ApiError::Unprocessable { code, .. } => code,
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::QueueFull { .. } => "queue_full",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::WouldMissDeadline { .. } => "would_miss_deadline",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotReady(_) => "not_ready",
            ApiError::StoreUnavailable(_) => "store_unavailable",
            ApiError::Timeout(_) => "timeout",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable { .. } => ApiError::StoreUnavailable(error.to_string()),
            StoreError::TooLarge { .. } | StoreError::Corrupt { .. } => {
                ApiError::Internal(error.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        metrics::counter!("tnas_errors_total", "code" => self.code()).increment(1);
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().into(),
                message: self.to_string(),
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        match self {
            ApiError::QueueFull { .. }
            | ApiError::Overloaded(_)
            | ApiError::NotReady(_)
            | ApiError::StoreUnavailable(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            }
            ApiError::WouldMissDeadline { refusal, .. } => {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    header::HeaderValue::from(refusal.retry_after_s),
                );
            }
            ApiError::Unauthorized(_) => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            _ => {}
        }
        response
    }
}
