//! Query-string and path extractors whose rejections are [`ApiError`]s, so that a malformed
//! `?limit=abc` or an undecodable path answers in the JSON error format, counted by code, like every
//! other error (axum's own extractors answer in plain text).

use super::error::ApiError;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::FromRequestParts;

/// `axum::extract::Query`, rejecting with a 400 `invalid_query`.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// `axum::extract::Path`, rejecting with a 400 `invalid_path`.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::bad_request(
            "invalid_query",
            format!(
                "{}; see /docs for this route's parameters",
                rejection.body_text()
            ),
        )
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::bad_request(
            "invalid_path",
            format!(
                "{}; percent-encode the path as UTF-8",
                rejection.body_text()
            ),
        )
    }
}
