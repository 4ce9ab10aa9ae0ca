//! The router: which path goes to which handler, and the layers around them.

use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::auth::require_api_key;
use crate::chat::{azure_chat, openai_chat};
use crate::fallback::{method_not_allowed, not_found, panic_response};
use crate::info::{health, info, metrics, models, ready};
use crate::openapi::openapi_json;
use crate::request_id::request_id;
use crate::request_log::access_log;
use crate::state::AppState;
use crate::text_completions::openai_completions;

/// Builds the router.
///
/// `/health`, `/ready`, `/metrics` and `/openapi.json` need no key; every other route does when keys are
/// configured. Query strings
/// (the azure SDK's `api-version`) are ignored. Unknown routes, wrong methods, oversized bodies
/// and panics all answer in the JSON error shape, every response carries `x-request-id` and gets
/// one log line, and browsers from the configured CORS origins may call every route.
pub fn router(state: AppState) -> Router {
    let max_body = state.config().max_body_bytes;
    let protected = Router::new()
        .route("/info", get(info))
        .route("/v1/info", get(info))
        .route("/models", get(models))
        .route("/v1/models", get(models))
        .route("/chat/completions", post(azure_chat))
        .route("/v1/chat/completions", post(openai_chat))
        .route("/v1/completions", post(openai_completions))
        .route_layer(from_fn_with_state(state.clone(), require_api_key));
    let router = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(from_fn_with_state(state.clone(), access_log))
        .layer(from_fn(request_id));
    // Outermost, so that a browser's preflight is answered before authentication.
    match cors_layer(&state.config().cors_origins) {
        Some(cors) => router.layer(cors).with_state(state),
        None => router.with_state(state),
    }
}

/// The headers a browser may read from a cross-origin response.
const EXPOSED_HEADERS: [&str; 4] =
    ["x-request-id", "x-ms-client-request-id", "x-ms-error-code", "retry-after"];

/// CORS for the configured origins (`*` for any); `None` when there are none, so browsers get
/// no cross-origin access. Any request header may be sent (the SDKs add their own, and
/// `Authorization` or `api-key` carry the key); no cookies are involved, so no credentials.
fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers(EXPOSED_HEADERS.map(HeaderName::from_static))
            .max_age(Duration::from_secs(600)),
    )
}
