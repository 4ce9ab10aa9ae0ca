//! `POST /chat/completions` (Azure, any `api-version`) and `POST /v1/chat/completions` (OpenAI).
//!
//! Everything that can be wrong with a request is found before it is queued: content type, body
//! size, JSON, parameters, the chat template and the context length; then the request goes to
//! the engine worker (429 when its queue is full) and is answered as JSON or as server-sent
//! events, decided by the body's `stream` alone (both SDKs send `Accept: application/json` even
//! when streaming).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use phi_api::{parse_chat_request, ApiError};

use crate::admission::{admit, screen_prompt, submit, Admitted};
use crate::completion::collect;
use crate::content_filter::FilterContext;
use crate::flavor::Flavor;
use crate::http_error::HttpError;
use crate::ids::random_id;
use crate::prepare::prepare;
use crate::request_id::RequestId;
use crate::request_log::{CompletionLog, LoggedByCompletion};
use crate::response_meta::ResponseMeta;
use crate::state::{unix_now, AppState};
use crate::stream::{sse_response, ChatChunks};
use crate::worker::Job;

/// Handler of the Azure route.
#[utoipa::path(post, path = "/chat/completions", tag = "azure", operation_id = "azure_chat_completions",
    params(crate::openapi::ApiVersion, crate::openapi::ExtraParametersHeader),
    request_body(content = phi_api::request_schema::ChatCompletionsRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The answer: JSON, or server-sent events when `stream` is true \
            (each `data:` line a `ChatCompletionChunk`, then `data: [DONE]`).",
            content(
                (phi_api::ChatCompletion = "application/json"),
                (phi_api::sse::ChatCompletionEvent = "text/event-stream"),
            )),
        crate::openapi::ChatErrors,
    ),
    security((), ("api_key" = []), ("bearer" = [])))]
pub async fn azure_chat(
    State(state): State<AppState>,
    id: Option<Extension<RequestId>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    chat(state, Flavor::Azure, id.map(|e| e.0), headers, body).await
}

/// Handler of the OpenAI route.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", operation_id = "openai_chat_completions",
    params(crate::openapi::ExtraParametersHeader),
    request_body(content = phi_api::request_schema::ChatCompletionsRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The answer: JSON, or server-sent events when `stream` is true \
            (each `data:` line a `ChatCompletionChunk`, then `data: [DONE]`).",
            content(
                (phi_api::ChatCompletion = "application/json"),
                (phi_api::sse::ChatCompletionEvent = "text/event-stream"),
            )),
        crate::openapi::ChatErrors,
    ),
    security((), ("api_key" = []), ("bearer" = [])))]
pub async fn openai_chat(
    State(state): State<AppState>,
    id: Option<Extension<RequestId>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    chat(state, Flavor::OpenAi, id.map(|e| e.0), headers, body).await
}

async fn chat(
    state: AppState,
    flavor: Flavor,
    id: Option<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let Admitted { started, body, extra } = admit(&state, &headers, body)?;
    let req = parse_chat_request(&body, extra)?;
    if !req.ignored_parameters.is_empty() {
        tracing::debug!(parameters = ?req.ignored_parameters, "ignoring extra parameters");
    }

    // The prompt is screened before anything else: a blocked one starts no generation.
    let verdict = match state.config().content_filter.clone() {
        None => None,
        Some(filter) => {
            let text: Vec<&str> = req.messages.iter().map(|m| m.content.as_str()).collect();
            Some((screen_prompt(filter.as_ref(), &text.join("\n")).await?, filter))
        }
    };
    let engine = state.engine().clone();
    let (req, prepared) = tokio::task::spawn_blocking(move || {
        let prepared = prepare(&engine, &req);
        (req, prepared)
    })
    .await
    .map_err(|_| ApiError::internal("preparing the prompt panicked"))?;
    let prepared = prepared?;
    let cached_prompt_tokens = prepared.cached_prompt_tokens();
    let (job, events) = Job::new(prepared.sequences);
    let job = job.with_deadline(state.config().request_timeout.map(|t| started + t));
    let filter =
        verdict.map(|(prompt, filter)| FilterContext { filter, prompt, stopper: job.stopper() });

    let meta = ResponseMeta {
        id: random_id("chatcmpl-"),
        created: unix_now(),
        model: state.config().model_name.clone(),
        n: req.n,
        prompt_tokens: prepared.prompt_tokens,
        cached_prompt_tokens,
        logprobs: req.sampling.logprobs,
        include_usage: req.include_usage,
        flavor,
        engine: state.engine().clone(),
        filter,
    };
    submit(&state, job, req.n)?;
    let log =
        CompletionLog::start(id, flavor.path(), req.stream, started, meta.prompt_tokens, req.n)
            .with_metrics(state.metrics().clone())
            .with_cached_tokens(cached_prompt_tokens);
    let mut res = if req.stream {
        sse_response(meta, events, log, ChatChunks)
    } else {
        let completion = collect(&meta, events, log).await?;
        (StatusCode::OK, Json(completion)).into_response()
    };
    res.extensions_mut().insert(LoggedByCompletion);
    Ok(res)
}
