//! Answers about the served model: `GET /info` (azure `get_model_info()`) and `GET /v1/models`
//! (openai `models.list()`).

use serde::Serialize;
use utoipa::ToSchema;

/// The body of `GET /info`.
///
/// Exists for `ChatCompletionsClient.get_model_info()` and `load_client()`, which only accepts
/// `model_type` values such as `chat_completion`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ModelInfo {
    /// The served model's name.
    pub model_name: String,
    /// Always `chat_completion`.
    pub model_type: &'static str,
    /// The model's publisher.
    pub model_provider_name: String,
}

/// The body of `GET /v1/models`.
///
/// Exists because the openai SDK's strict mode requires `object` and `data`, and every field of
/// each entry.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The served models (one).
    pub data: Vec<ModelCard>,
}

/// One entry of [`ModelList`].
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ModelCard {
    /// The name clients put in `model`.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds (when the server loaded it).
    pub created: u64,
    /// The model's publisher.
    pub owned_by: String,
}

impl ModelList {
    /// A list holding one model.
    pub fn single(id: String, created: u64, owned_by: String) -> Self {
        ModelList {
            object: "list",
            data: vec![ModelCard { id, object: "model", created, owned_by }],
        }
    }
}
