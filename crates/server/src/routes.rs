//! The router: which path goes to which handler, and the layers around them.

use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::auth::require_api_key;
use crate::chat::{azure_chat, openai_chat};
use crate::fallback::{method_not_allowed, not_found, panic_response};
use crate::info::{health, info, models};
use crate::request_id::request_id;
use crate::state::AppState;

/// Builds the router.
///
/// `/health` needs no key; every other route does when keys are configured. Query strings
/// (the azure SDK's `api-version`) are ignored. Unknown routes, wrong methods, oversized bodies
/// and panics all answer in the JSON error shape, and every response carries `x-request-id`.
pub fn router(state: AppState) -> Router {
    let max_body = state.config().max_body_bytes;
    let protected = Router::new()
        .route("/info", get(info))
        .route("/v1/info", get(info))
        .route("/models", get(models))
        .route("/v1/models", get(models))
        .route("/chat/completions", post(azure_chat))
        .route("/v1/chat/completions", post(openai_chat))
        .route_layer(from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .route("/health", get(health))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(from_fn(request_id))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
