//! The non-streaming chat-completions answer, in the cloud shape:
//! `{id, object: "chat.completion", created, model, choices: [{index, message: {role, content,
//! tool_calls}, finish_reason, logprobs}], usage}`.

use serde::Serialize;
use utoipa::ToSchema;

use crate::content_filter::{ContentFilterResults, PromptFilterResult};
use crate::finish_reason::FinishReason;
use crate::logprobs::ChoiceLogprobs;
use crate::usage::Usage;

/// The body of a 200 answer to a non-streaming request.
///
/// Exists so that every field the openai SDK's strict mode requires is there by construction.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-...`, unique per request.
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix seconds (integer: azure converts it with `datetime.fromtimestamp`).
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// The prompt's content-filter annotation (only when a filter is configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_filter_results: Option<Vec<PromptFilterResult>>,
    /// One per `n`.
    pub choices: Vec<Choice>,
    /// Token counts.
    pub usage: Usage,
}

impl ChatCompletion {
    /// The `object` value.
    pub const OBJECT: &'static str = "chat.completion";
}

/// One generated answer.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Choice {
    /// Position in `choices`.
    pub index: usize,
    /// The answer.
    pub message: AssistantMessage,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Log-probabilities when requested, else `null`.
    pub logprobs: Option<ChoiceLogprobs>,
    /// The answer's content-filter annotation (only when a filter is configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_filter_results: Option<ContentFilterResults>,
}

/// The assistant's message in a [`Choice`].
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The generated text.
    pub content: String,
    /// Always `null`: this server does not call tools.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tool_calls: Option<Vec<serde_json::Value>>,
}

impl AssistantMessage {
    /// An assistant message with this text.
    pub fn new(content: String) -> Self {
        AssistantMessage { role: "assistant", content, tool_calls: None }
    }
}
