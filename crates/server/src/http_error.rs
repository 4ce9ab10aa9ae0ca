//! Turning an [`ApiError`] into an HTTP response: status, JSON body, `x-ms-error-code`, and
//! `Retry-After` on 429.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use phi_api::ApiError;

/// Seconds a client is told to wait after a 429.
pub const RETRY_AFTER_SECONDS: u64 = 1;
/// Seconds a client is told to wait after a 503 (loading, or a content filter that is down).
pub const UNAVAILABLE_RETRY_AFTER_SECONDS: u64 = 5;

/// An [`ApiError`] as a handler's error type.
///
/// Exists because `IntoResponse` cannot be implemented for a foreign type, and so that every
/// error leaves the server through the same code path (body shape and headers).
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(code = e.code, message = %e.message, "request not served");
        } else if status.is_server_error() {
            tracing::error!(code = e.code, message = %e.message, "request failed");
        } else {
            tracing::debug!(status = e.status, code = e.code, message = %e.message, "request rejected");
        }
        let mut res = (status, Json(e.body())).into_response();
        let headers = res.headers_mut();
        headers.insert("x-ms-error-code", HeaderValue::from_static(e.code));
        if status == StatusCode::TOO_MANY_REQUESTS {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            let after = HeaderValue::from(UNAVAILABLE_RETRY_AFTER_SECONDS);
            headers.insert(header::RETRY_AFTER, after);
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}
