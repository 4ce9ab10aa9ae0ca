//! What every generation route does around its own parsing: refuse while draining, require a
//! JSON body within the size limit, read the `extra-parameters` header, screen the prompt, and
//! hand the prepared job to the worker.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, StatusCode};
use phi_api::extra_parameters::HEADER as EXTRA_PARAMETERS;
use phi_api::{ApiError, ExtraParameters};

use crate::content_filter::{ContentFilter, FilterVerdict, TextKind};
use crate::state::AppState;
use crate::worker::{Job, SubmitError};

/// A request body that may be parsed.
#[derive(Debug)]
pub struct Admitted {
    /// When the request arrived (its deadline and log count from here).
    pub started: Instant,
    /// The body.
    pub body: Bytes,
    /// What to do with body keys the API does not define.
    pub extra: ExtraParameters,
}

/// 503 while draining, 415 unless the body is JSON, 413 when it is too large, 400 for an
/// `extra-parameters` header that is not one of its values.
pub fn admit(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Admitted, ApiError> {
    let started = Instant::now();
    if state.is_draining() {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    require_json(headers)?;
    let body = body.map_err(|rejection| body_error(&rejection, state.config().max_body_bytes))?;
    let extra = match headers.get(EXTRA_PARAMETERS) {
        None => ExtraParameters::Error,
        Some(v) => ExtraParameters::from_header(Some(
            v.to_str().map_err(|_| ApiError::invalid_extra_parameters_header("<not ASCII>"))?,
        ))?,
    };
    Ok(Admitted { started, body, extra })
}

/// The filter's verdict on the prompt's text: a 400 `content_filter` when it blocks, a 503
/// when the filter could not judge (fail closed; the SDKs retry 503).
pub async fn screen_prompt(
    filter: &dyn ContentFilter,
    text: &str,
) -> Result<FilterVerdict, ApiError> {
    let verdict = filter.check(text, TextKind::Prompt).await.map_err(|e| {
        tracing::error!(error = %e, "the content filter could not judge a prompt");
        ApiError::unavailable(format!("the content filter is unavailable: {e}"))
    })?;
    if verdict.filtered() {
        return Err(ApiError::content_filter(&verdict));
    }
    Ok(verdict)
}

/// Queues the job of a request with `choices` choices: 429 when the queue is full, 503 when
/// the worker has stopped, 400 when it could never fit the KV cache.
pub fn submit(state: &AppState, job: Job, choices: usize) -> Result<(), ApiError> {
    state.worker().submit(job).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::too_many_requests(),
        SubmitError::Stopped => ApiError::unavailable("the engine worker has stopped"),
        SubmitError::TooLarge { needed, budget } => ApiError::invalid_value(
            "max_tokens",
            format!(
                "this request may grow to {needed} tokens of KV cache (its prompt plus max_tokens, \
                 for each of its {choices} choices), but this server holds at most {budget}; ask \
                 for fewer max_tokens or choices"
            ),
        ),
    })
}

/// 415 unless the body is declared as JSON (`application/json` or `application/*+json`, any
/// parameters).
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let value = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("<not ASCII>"));
    let ok = value.is_some_and(|v| {
        let mime = v.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(value))
    }
}

/// 413 for a body over the limit, 400 for one that could not be read.
fn body_error(rejection: &BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large(limit)
    } else {
        ApiError::invalid_json(format!("the body could not be read: {rejection}"))
    }
}
