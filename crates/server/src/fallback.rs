//! JSON answers for requests no handler takes: unknown routes (404), wrong methods (405) and
//! handler panics (500), so that every error has the same body shape.

use std::any::Any;

use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use phi_api::ApiError;

use crate::http_error::HttpError;

/// Fallback for unknown routes.
pub async fn not_found(uri: Uri) -> HttpError {
    HttpError(ApiError::not_found(uri.path()))
}

/// Fallback for known routes called with another method.
pub async fn method_not_allowed(method: Method, uri: Uri) -> HttpError {
    HttpError(ApiError::method_not_allowed(method.as_str(), uri.path()))
}

/// Answer for a handler that panicked (a bug): a 500 in the usual shape.
pub fn panic_response(err: Box<dyn Any + Send + 'static>) -> Response {
    let detail = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = detail, "handler panicked");
    HttpError(ApiError::internal("internal server error")).into_response()
}
