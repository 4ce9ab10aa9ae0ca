//! `GET /openapi.json`: the OpenAPI 3.1 description of every route, generated from the wire
//! types of `phi-api` and the handlers' annotations.
//!
//! Exists so that clients can be generated and the server can be fuzzed against its own
//! description (the schemathesis test in `tests/python`): a response that does not match the
//! schema its route states is a bug in one or the other.

use std::sync::OnceLock;

use axum::Json;
use phi_api::content_filter::{CategoryResult, ContentFilterResults, PromptFilterResult, Severity};
use phi_api::error::{ErrorBody, ErrorObject};
use phi_api::request_schema::{
    AssistantRole, AssistantTurn, ChatCompletionsRequest, CompletionsRequest, InstructionsMessage,
    InstructionsRole, MessageContent, Modality, PromptInput, RequestMessage, ResponseFormat,
    ResponseFormatType, Stop, StreamOptions, TextPart, TextPartType, UserMessage, UserRole,
};
use phi_api::sse::{ChatCompletionEvent, TextCompletionEvent};
use phi_api::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChoiceLogprobs, ChunkChoice,
    Delta, FinishReason, ModelCard, ModelInfo, ModelList, PromptTokensDetails, TextChoice,
    TextCompletion, TextLogprobs, TokenLogprob, TopLogprob, Usage,
};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as OpenApiDoc, PathItem};
use utoipa::{IntoParams, IntoResponses, Modify, OpenApi, ToSchema};

use crate::info::{Health, Status};

/// The description; [`document`] adds the routes that share a handler.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "phi-serve",
        description = "Phi-3 chat completions behind the Azure AI Model Inference API \
            (`/info`, `/chat/completions`) and the OpenAI API (`/v1/models`, \
            `/v1/chat/completions`, and the legacy text completions `/v1/completions`). With \
            API keys configured, every route but `/health`, `/ready`, `/metrics` and \
            `/openapi.json` needs one, as `Authorization: Bearer KEY` or `api-key: KEY`.",
        license(name = "MIT OR Apache-2.0")
    ),
    paths(
        crate::chat::azure_chat,
        crate::chat::openai_chat,
        crate::text_completions::openai_completions,
        crate::info::info,
        crate::info::models,
        crate::info::health,
        crate::info::ready,
        crate::info::metrics,
        openapi_json,
    ),
    components(schemas(
        ChatCompletionsRequest, RequestMessage, InstructionsMessage, InstructionsRole, UserMessage,
        UserRole, AssistantTurn, AssistantRole, MessageContent, TextPart, TextPartType,
        Stop, StreamOptions, ResponseFormat, ResponseFormatType, Modality,
        ChatCompletion, Choice, AssistantMessage, ChatCompletionChunk, ChunkChoice, Delta,
        Usage, PromptTokensDetails, ChoiceLogprobs, TokenLogprob, TopLogprob, FinishReason,
        ContentFilterResults, CategoryResult, Severity, PromptFilterResult,
        ModelInfo, ModelList, ModelCard, ErrorBody, ErrorObject, Health, Status,
        ExtraParametersValue, ChatCompletionEvent,
        CompletionsRequest, PromptInput, TextCompletion, TextChoice, TextLogprobs,
        TextCompletionEvent,
    )),
    modifiers(&SecuritySchemes),
    tags(
        (name = "azure", description = "Azure AI Model Inference API (any `api-version`)."),
        (name = "openai", description = "OpenAI-compatible API."),
        (name = "operations", description = "Probes, metrics and this description; no key."),
    )
)]
struct ApiDoc;

/// The whole description, with the alias routes (`/v1/info`, `/models`) that serve the same
/// handlers as `/info` and `/v1/models`.
pub fn document() -> OpenApiDoc {
    let mut doc = ApiDoc::openapi();
    let paths = &mut doc.paths.paths;
    for (alias, original) in [("/v1/info", "/info"), ("/models", "/v1/models")] {
        if let Some(item) = paths.get(original).cloned() {
            paths.insert(alias.to_string(), renamed_operations(item, alias));
        }
    }
    doc
}

/// A copy of a path item whose operation ids are made unique for `alias`.
fn renamed_operations(mut item: PathItem, alias: &str) -> PathItem {
    let suffix = alias.trim_start_matches('/').replace('/', "_");
    if let Some(op) = item.get.as_mut() {
        op.operation_id = op.operation_id.take().map(|id| format!("{id}_{suffix}"));
    }
    item
}

/// `GET /openapi.json`.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This description (OpenAPI 3.1).",
        body = Object, content_type = "application/json")))]
pub async fn openapi_json() -> Json<&'static serde_json::Value> {
    static DOCUMENT: OnceLock<serde_json::Value> = OnceLock::new();
    Json(DOCUMENT.get_or_init(|| serde_json::to_value(document()).expect("serializable")))
}

/// The two ways to present a key: `api-key: KEY` (Azure) and `Authorization: Bearer KEY`.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut OpenApiDoc) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("api-key"))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The Azure SDK's `api-version` query parameter: accepted, any value.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ApiVersion {
    /// Accepted and ignored (the Azure SDK sends e.g. `2024-05-01-preview`).
    #[param(rename = "api-version")]
    #[allow(dead_code)]
    api_version: Option<String>,
}

/// The `extra-parameters` header of the chat routes.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct ExtraParametersHeader {
    /// What to do with body keys the API does not define: `error` (default, 400), `drop` or
    /// `pass-through` (both ignore them: there is no model-specific parameter to pass).
    #[param(rename = "extra-parameters", required = false, value_type = ExtraParametersValue)]
    #[allow(dead_code)]
    extra_parameters: Option<String>,
}

/// The values of the `extra-parameters` header.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "kebab-case")]
enum ExtraParametersValue {
    /// 400 naming the unknown keys.
    Error,
    /// Ignore them.
    Drop,
    /// Ignore them too: no model-specific parameter exists to pass through.
    PassThrough,
}

/// The errors every keyed route can answer.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum ServiceErrors {
    /// No key, or a key that is not configured.
    #[response(status = 401, headers(("WWW-Authenticate" = String)))]
    Unauthorized(#[to_schema] ErrorBody),
    /// The model is still loading or the server is draining; retry.
    #[response(status = 503, headers(("Retry-After" = u64, description = "Seconds to wait.")))]
    Unavailable(#[to_schema] ErrorBody),
}

/// The errors of the chat routes. Every error body carries the code in `error.code` and the
/// `x-ms-error-code` header too.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum ChatErrors {
    /// Malformed JSON, a parameter of the wrong type or out of range (`error.param` names it),
    /// a prompt longer than the context, or a prompt the content filter blocked
    /// (`code: content_filter`).
    #[response(status = 400)]
    BadRequest(#[to_schema] ErrorBody),
    /// No key, or a key that is not configured.
    #[response(status = 401, headers(("WWW-Authenticate" = String)))]
    Unauthorized(#[to_schema] ErrorBody),
    /// The body is larger than `--max-body-bytes`.
    #[response(status = 413)]
    PayloadTooLarge(#[to_schema] ErrorBody),
    /// The body is not declared as JSON.
    #[response(status = 415)]
    UnsupportedMediaType(#[to_schema] ErrorBody),
    /// A valid request this server cannot honour: tools, JSON mode, images, audio.
    #[response(status = 422)]
    NotSupported(#[to_schema] ErrorBody),
    /// The waiting queue is full; retry.
    #[response(status = 429, headers(("Retry-After" = u64, description = "Seconds to wait.")))]
    TooManyRequests(#[to_schema] ErrorBody),
    /// Loading, draining, the request's deadline passed while it waited, or the content filter
    /// could not judge the prompt; retry.
    #[response(status = 503, headers(("Retry-After" = u64, description = "Seconds to wait.")))]
    Unavailable(#[to_schema] ErrorBody),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_described() {
        let doc = serde_json::to_value(document()).unwrap();
        let mut paths: Vec<&str> =
            doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "/chat/completions",
                "/health",
                "/info",
                "/metrics",
                "/models",
                "/openapi.json",
                "/ready",
                "/v1/chat/completions",
                "/v1/completions",
                "/v1/info",
                "/v1/models"
            ]
        );
        let mut ids: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|item| item.as_object().unwrap().values())
            .filter_map(|op| op["operationId"].as_str())
            .collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "operation ids must be unique");
    }

    #[test]
    fn schema_references_resolve() {
        let doc = serde_json::to_value(document()).unwrap();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let mut refs = Vec::new();
        collect_refs(&doc, &mut refs);
        assert!(!refs.is_empty());
        for r in refs {
            let name = r.strip_prefix("#/components/schemas/").expect(&r);
            assert!(schemas.contains_key(name), "{r} is not defined");
        }
    }

    fn collect_refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|v| collect_refs(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
            _ => {}
        }
    }
}
