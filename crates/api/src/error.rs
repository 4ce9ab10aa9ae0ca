//! The error every endpoint answers with: an HTTP status plus the body
//! `{"error": {"code", "message", "type", "param", "status"}}`.
//!
//! One shape serves both SDKs: azure-core reads `error.code` and `error.message` (and the server
//! copies `code` into the `x-ms-error-code` header), the `openai` SDK reads `message`, `type`,
//! `param` and `code` from the same object. Statuses are chosen so that a bad request is never a
//! 5xx, because both SDKs retry 5xx answers.

use serde::Serialize;
use utoipa::ToSchema;

/// A failed request: what went wrong, which parameter is at fault, and the HTTP status.
///
/// Exists so validation (in this crate) and the HTTP layer (in `phi-server`) agree on one error
/// value that knows its own status and wire body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code (4xx for anything wrong with the request).
    pub status: u16,
    /// Machine-readable code, also sent as the `x-ms-error-code` header.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// The request parameter at fault, when there is one (OpenAI's `param`).
    pub param: Option<String>,
    /// OpenAI's error `type`; empty for `null` (as Azure OpenAI's content-filter error has).
    pub kind: &'static str,
    /// Azure OpenAI's `innererror` object, when there is one (a blocked prompt's filter results).
    pub innererror: Option<serde_json::Value>,
}

/// The JSON body of an error response.
///
/// Exists as a separate serializable type so the wire shape is written down in one place.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error object both SDKs look for.
    pub error: ErrorObject,
}

/// The object inside [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ErrorObject {
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// OpenAI's error type, e.g. `invalid_request_error`, or `null`.
    #[serde(rename = "type")]
    pub kind: Option<&'static str>,
    /// The parameter at fault, or `null`.
    pub param: Option<String>,
    /// The HTTP status again, as Azure OpenAI's error bodies carry it.
    pub status: u16,
    /// Azure OpenAI's `innererror`, only when there is one.
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub innererror: Option<serde_json::Value>,
}

const INVALID_REQUEST: &str = "invalid_request_error";

/// The message of a blocked prompt, word for word as Azure OpenAI sends it.
pub const CONTENT_FILTER_MESSAGE: &str = "The response was filtered due to the prompt triggering \
    Azure OpenAI's content management policy. Please modify your prompt and retry. To learn more \
    about our content filtering policies please read our documentation: \
    https://go.microsoft.com/fwlink/?linkid=2198766";

impl ApiError {
    fn new(
        status: u16,
        code: &'static str,
        kind: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError { status, code, message: message.into(), param: None, kind, innererror: None }
    }

    /// Names the parameter at fault.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// The body is not JSON, or not a JSON object (400).
    pub fn invalid_json(message: impl std::fmt::Display) -> Self {
        Self::new(400, "invalid_json", INVALID_REQUEST, format!("invalid JSON body: {message}"))
    }

    /// A parameter has the wrong JSON type (400).
    pub fn invalid_type(param: &str, expected: &str) -> Self {
        Self::new(
            400,
            "invalid_type",
            INVALID_REQUEST,
            format!("invalid type for `{param}`: expected {expected}"),
        )
        .with_param(param)
    }

    /// A parameter has a value outside what is allowed (400).
    pub fn invalid_value(param: &str, message: impl Into<String>) -> Self {
        Self::new(400, "invalid_value", INVALID_REQUEST, message).with_param(param)
    }

    /// A required parameter is missing (400).
    pub fn missing_parameter(param: &str) -> Self {
        Self::new(
            400,
            "missing_required_parameter",
            INVALID_REQUEST,
            format!("missing required parameter `{param}`"),
        )
        .with_param(param)
    }

    /// A valid parameter value this server cannot honour, e.g. tools or images (422, as the
    /// Azure AI Model Inference API specifies for "not supported by the model").
    pub fn not_supported(param: &str, message: impl Into<String>) -> Self {
        Self::new(422, "parameter_not_supported", INVALID_REQUEST, message).with_param(param)
    }

    /// Body keys the API does not define, with `extra-parameters` absent or `error` (400).
    pub fn extra_parameters(names: &[String]) -> Self {
        let list = names.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ");
        let err = Self::new(
            400,
            "extra_parameters_not_allowed",
            INVALID_REQUEST,
            format!(
                "Extra parameters [{list}] are not allowed when extra-parameters is not set or set \
                 to 'error'. Set the header extra-parameters to 'drop' to ignore them or to \
                 'pass-through' to hand them to the model."
            ),
        );
        match names.first() {
            Some(first) => err.with_param(first.clone()),
            None => err,
        }
    }

    /// An `extra-parameters` header value other than `error`, `drop` and `pass-through` (400).
    pub fn invalid_extra_parameters_header(value: &str) -> Self {
        Self::new(
            400,
            "invalid_extra_parameters",
            INVALID_REQUEST,
            format!(
                "unexpected extra-parameters header value {value:?}: expected 'error', 'drop' or \
                 'pass-through'"
            ),
        )
        .with_param("extra-parameters")
    }

    /// The prompt leaves no room in the context window (400).
    pub fn context_length_exceeded(prompt_tokens: usize, context_length: usize) -> Self {
        Self::context_length_exceeded_in("messages", prompt_tokens, context_length)
    }

    /// [`context_length_exceeded`](Self::context_length_exceeded) for the prompt held by
    /// `param` (`prompt` for a text completion).
    pub fn context_length_exceeded_in(
        param: &str,
        prompt_tokens: usize,
        context_length: usize,
    ) -> Self {
        Self::new(
            400,
            "context_length_exceeded",
            INVALID_REQUEST,
            format!(
                "This model's maximum context length is {context_length} tokens, but the {param} \
                 resulted in {prompt_tokens} prompt tokens. At most {} prompt tokens fit, leaving \
                 room for one generated token; shorten the {param}.",
                context_length.saturating_sub(1)
            ),
        )
        .with_param(param)
    }

    /// No API key was sent (401).
    pub fn missing_api_key() -> Self {
        Self::new(
            401,
            "missing_api_key",
            "authentication_error",
            "no API key: send it as `Authorization: Bearer <key>` or `api-key: <key>`",
        )
    }

    /// The API key sent is not one of the configured keys (401).
    pub fn invalid_api_key() -> Self {
        Self::new(401, "invalid_api_key", "authentication_error", "the API key is not valid")
    }

    /// No route with this path (404).
    pub fn not_found(path: &str) -> Self {
        Self::new(404, "not_found", INVALID_REQUEST, format!("no route for {path}"))
    }

    /// The route exists but not for this method (405).
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            405,
            "method_not_allowed",
            INVALID_REQUEST,
            format!("method {method} is not allowed for {path}"),
        )
    }

    /// The body exceeds the configured size limit (413).
    pub fn payload_too_large(limit_bytes: usize) -> Self {
        Self::new(
            413,
            "payload_too_large",
            INVALID_REQUEST,
            format!("the request body is larger than the limit of {limit_bytes} bytes"),
        )
    }

    /// The body is not declared as JSON (415).
    pub fn unsupported_media_type(content_type: Option<&str>) -> Self {
        let got = content_type.map_or_else(|| "none".to_string(), |c| format!("{c:?}"));
        Self::new(
            415,
            "unsupported_media_type",
            INVALID_REQUEST,
            format!("the body must be sent with Content-Type: application/json (got {got})"),
        )
    }

    /// The waiting queue is full (429; the server adds `Retry-After`).
    pub fn too_many_requests() -> Self {
        Self::new(
            429,
            "too_many_requests",
            "rate_limit_error",
            "the server is busy: too many requests are waiting; retry later",
        )
    }

    /// A fault of the server itself (500).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal_error", "server_error", message)
    }

    /// The engine is not running (503).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "service_unavailable", "server_error", message)
    }

    /// The prompt was blocked by the content filter (400), in Azure OpenAI's shape: `type: null`,
    /// `param: "prompt"`, and `innererror` with the code `ResponsibleAIPolicyViolation` and the
    /// filter's per-category results.
    pub fn content_filter(results: &crate::content_filter::ContentFilterResults) -> Self {
        let mut e =
            Self::new(400, "content_filter", "", CONTENT_FILTER_MESSAGE).with_param("prompt");
        e.innererror = Some(serde_json::json!({
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": results,
        }));
        e
    }

    /// The wire body of this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorObject {
                code: self.code,
                message: self.message.clone(),
                kind: (!self.kind.is_empty()).then_some(self.kind),
                param: self.param.clone(),
                status: self.status,
                innererror: self.innererror.clone(),
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_every_field() {
        let e = ApiError::invalid_value("temperature", "too hot");
        let v = serde_json::to_value(e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"code": "invalid_value", "message": "too hot",
                "type": "invalid_request_error", "param": "temperature", "status": 400}})
        );
    }

    #[test]
    fn content_filter_body_is_azure_openai_shape() {
        let results = crate::content_filter::ContentFilterResults {
            violence: crate::content_filter::CategoryResult {
                filtered: true,
                severity: crate::Severity::Medium,
            },
            ..Default::default()
        };
        let v = serde_json::to_value(ApiError::content_filter(&results).body()).unwrap();
        let safe = serde_json::json!({"filtered": false, "severity": "safe"});
        assert_eq!(
            v,
            serde_json::json!({"error": {"code": "content_filter", "message": CONTENT_FILTER_MESSAGE,
                "type": null, "param": "prompt", "status": 400,
                "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
                    "hate": safe, "self_harm": safe, "sexual": safe,
                    "violence": {"filtered": true, "severity": "medium"}}}}})
        );
    }

    #[test]
    fn extra_parameters_names_them_all() {
        let e = ApiError::extra_parameters(&["foo".into(), "bar".into()]);
        assert_eq!(e.status, 400);
        assert_eq!(e.param.as_deref(), Some("foo"));
        assert!(e.message.contains("['foo', 'bar']"), "{}", e.message);
    }

    #[test]
    fn context_message_says_what_fits() {
        let e = ApiError::context_length_exceeded(70, 64);
        assert!(e.message.contains("70") && e.message.contains("64") && e.message.contains("63"));
    }
}
