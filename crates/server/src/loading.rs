//! The server listens while the model loads (a large checkpoint takes minutes to read), so that
//! orchestrators see a live process and clients get a clear answer instead of a refused
//! connection: until the model is ready every route answers `503 service_unavailable` with
//! `Retry-After` (both SDKs retry it), and `GET /health` and `/ready` answer 503
//! `{"status": "loading"}`.
//! Once the model is loaded, [`LoadingGate::open`] hands every request to the real router.

use std::sync::{Arc, OnceLock};

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use phi_api::ApiError;
use serde_json::json;
use tower::ServiceExt;

use crate::http_error::HttpError;

/// The switch between "loading" and the real router. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct LoadingGate {
    ready: Arc<OnceLock<Router>>,
}

impl LoadingGate {
    /// A closed gate: every request is answered 503.
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on requests go to `router`. A second call changes nothing.
    pub fn open(&self, router: Router) {
        let _ = self.ready.set(router);
    }

    /// Whether the gate was opened.
    pub fn is_open(&self) -> bool {
        self.ready.get().is_some()
    }

    /// The router to serve: answers 503 until [`open`](Self::open), then is the real router.
    pub fn router(&self) -> Router {
        let gate = self.clone();
        Router::new().fallback(move |req: Request| {
            let gate = gate.clone();
            async move {
                match gate.ready.get() {
                    Some(router) => match router.clone().oneshot(req).await {
                        Ok(res) => res,
                        Err(never) => match never {},
                    },
                    None => loading_response(req.uri().path()),
                }
            }
        })
    }
}

/// What a request gets while the model loads.
fn loading_response(path: &str) -> Response {
    if path == "/health" || path == "/ready" {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "loading"})))
            .into_response();
    }
    HttpError(ApiError::unavailable("the model is still loading; retry shortly")).into_response()
}
