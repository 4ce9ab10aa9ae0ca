//! The routes that describe the server: `/health`, `/info` and `/models`.

use axum::extract::State;
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
