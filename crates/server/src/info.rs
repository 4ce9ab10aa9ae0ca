//! The routes that describe the server: `/health`, `/ready`, `/metrics`, `/info` and `/models`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use phi_api::{ModelInfo, ModelList};
use serde::Serialize;
use utoipa::ToSchema;

use crate::openapi::{ApiVersion, ServiceErrors};

use crate::state::AppState;

/// `GET /health`: 200 once the model is loaded (503 `loading` before, see [`crate::loading`]),
/// with the number of requests generating and waiting; needs no key so that load balancers and
/// orchestrators can probe it.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses(
        (status = 200, description = "The model is loaded and served.", body = Health),
        (status = 503, description = "The model is still loading (`status: loading`).", body = Status),
    ))]
pub async fn health(State(state): State<AppState>) -> Json<Health> {
    let stats = state.worker().stats();
    Json(Health { status: "ok", running: stats.running(), queued: stats.queued() })
}

/// The body of `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: &'static str,
    /// Requests generating now.
    pub running: usize,
    /// Requests waiting for a place in the batch.
    pub queued: usize,
}

/// The body of `GET /ready`, and of `/health` while the model loads.
#[derive(Debug, Serialize, ToSchema)]
pub struct Status {
    /// `ready`, `draining` or `loading`.
    pub status: &'static str,
}

/// `GET /ready`: 200 while the server takes new requests; 503 `draining` after SIGTERM (and
/// `loading` before the model is loaded), so that a load balancer sends traffic elsewhere
/// while `/health` still reports the process alive. Needs no key.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "New requests are taken.", body = Status),
        (status = 503, description = "Loading or draining: send traffic elsewhere.", body = Status),
    ))]
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Status { status: "draining" })).into_response()
    } else {
        Json(Status { status: "ready" }).into_response()
    }
}

/// `GET /metrics`: Prometheus text format (see [`crate::metrics`]). Needs no key, as scrapers
/// usually have none; it tells load and latency, nothing of any request's content.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4.",
        body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let (prefix, sampled) = (state.engine().prefix_cache_stats(), state.engine().sampling_stats());
    let body = state.metrics().render(state.worker().stats(), state.is_draining(), prefix, sampled);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// `GET /info` and `/v1/info`: the azure SDK's `get_model_info()`.
#[utoipa::path(get, path = "/info", tag = "azure", operation_id = "get_model_info",
    params(ApiVersion),
    responses((status = 200, description = "The served model.", body = ModelInfo), ServiceErrors),
    security((), ("api_key" = []), ("bearer" = [])))]
pub async fn info(State(state): State<AppState>) -> Json<ModelInfo> {
    let c = state.config();
    Json(ModelInfo {
        model_name: c.model_name.clone(),
        model_type: "chat_completion",
        model_provider_name: c.model_provider.clone(),
    })
}

/// `GET /v1/models` and `/models`: the openai SDK's `models.list()`.
#[utoipa::path(get, path = "/v1/models", tag = "openai", operation_id = "list_models",
    responses((status = 200, description = "The served model.", body = ModelList), ServiceErrors),
    security((), ("api_key" = []), ("bearer" = [])))]
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    let c = state.config();
    Json(ModelList::single(c.model_name.clone(), state.started(), c.model_provider.to_lowercase()))
}
