//! The routes that describe the server: `/health`, `/ready`, `/metrics`, `/info` and `/models`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use phi_api::{ModelInfo, ModelList};
use serde_json::{json, Value};

use crate::state::AppState;

/// `GET /health`: 200 once the model is loaded (503 `loading` before, see [`crate::loading`]),
/// with the number of requests generating and waiting; needs no key so that load balancers and
/// orchestrators can probe it.
pub async fn health(State(state): State<AppState>) -> Json<Value> {
    let stats = state.worker().stats();
    Json(json!({"status": "ok", "running": stats.running(), "queued": stats.queued()}))
}

/// `GET /ready`: 200 while the server takes new requests; 503 `draining` after SIGTERM (and
/// `loading` before the model is loaded), so that a load balancer sends traffic elsewhere
/// while `/health` still reports the process alive. Needs no key.
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "draining"}))).into_response()
    } else {
        Json(json!({"status": "ready"})).into_response()
    }
}

/// `GET /metrics`: Prometheus text format (see [`crate::metrics`]). Needs no key, as scrapers
/// usually have none; it tells load and latency, nothing of any request's content.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let prefix = state.engine().prefix_cache_stats();
    let body = state.metrics().render(state.worker().stats(), state.is_draining(), prefix);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// `GET /info` and `/v1/info`: the azure SDK's `get_model_info()`.
pub async fn info(State(state): State<AppState>) -> Json<ModelInfo> {
    let c = state.config();
    Json(ModelInfo {
        model_name: c.model_name.clone(),
        model_type: "chat_completion",
        model_provider_name: c.model_provider.clone(),
    })
}

/// `GET /v1/models` and `/models`: the openai SDK's `models.list()`.
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    let c = state.config();
    Json(ModelList::single(c.model_name.clone(), state.started(), c.model_provider.to_lowercase()))
}
