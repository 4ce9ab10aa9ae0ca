//! `x-request-id` on every response: the client's `x-ms-client-request-id` when it sent a usable
//! one (so azure SDK logs and server logs can be matched), otherwise a fresh random id. The
//! openai SDK exposes this header as `e.request_id`.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::ids::random_id;

/// The azure SDK's per-request id header.
pub const CLIENT_REQUEST_ID: &str = "x-ms-client-request-id";
/// The response header carrying the request's id.
pub const REQUEST_ID: &str = "x-request-id";

/// The request's id, in the request's extensions for the handlers and the log.
#[derive(Debug, Clone)]
pub struct RequestId(pub HeaderValue);

impl RequestId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

/// Middleware: runs the request inside a tracing span named after its id, hands the id to the
/// handlers ([`RequestId`]) and stamps it on the response.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let client_id = req
        .headers()
        .get(CLIENT_REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 256 && v.to_str().is_ok())
        .cloned();
    let id = client_id.clone().unwrap_or_else(|| {
        HeaderValue::from_str(&random_id("")).expect("hex digits are a valid header value")
    });
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!(
        "request",
        id = id.to_str().unwrap_or_default(),
        method = %req.method(),
        path = req.uri().path(),
    );
    let mut res = next.run(req).instrument(span).await;
    let headers = res.headers_mut();
    headers.insert(REQUEST_ID, id);
    if let Some(c) = client_id {
        headers.insert(CLIENT_REQUEST_ID, c);
    }
    res
}
