//! One server-sent event of a streamed answer:
//! `{id, object: "chat.completion.chunk", created, model, choices: [{index, delta,
//! finish_reason}], usage?}`.

use serde::Serialize;
use utoipa::ToSchema;

use crate::content_filter::{ContentFilterResults, PromptFilterResult};
use crate::finish_reason::FinishReason;
use crate::logprobs::ChoiceLogprobs;
use crate::usage::Usage;

/// A streamed chunk.
///
/// Exists so the stream's invariants are visible in one type: every chunk of a response shares
/// `id` and `created`, every choice carries a `delta` object (the openai SDK requires it, and the
/// azure sample loop reads `choices[0].delta`), and `usage` is either absent, `null` (with
/// `stream_options.include_usage`, on every chunk but the last) or the counts.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    /// Same as every other chunk of the response.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    /// Same as every other chunk of the response.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// The prompt's content-filter annotation, on the first chunk only (when a filter is
    /// configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_filter_results: Option<Vec<PromptFilterResult>>,
    /// The choices this chunk advances (empty only in the include_usage chunk).
    pub choices: Vec<ChunkChoice>,
    /// Absent (`None`), `null` (`Some(None)`) or the counts.
    #[schema(value_type = Option<Usage>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

impl ChatCompletionChunk {
    /// The `object` value.
    pub const OBJECT: &'static str = "chat.completion.chunk";
}

/// One choice's part of a chunk.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChunkChoice {
    /// Which choice.
    pub index: usize,
    /// What to append (`{}` on the final chunk of a choice).
    pub delta: Delta,
    /// `null` until the choice's last chunk.
    pub finish_reason: Option<FinishReason>,
    /// Log-probabilities of the tokens in this delta, when requested.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<ChoiceLogprobs>,
    /// The content-filter annotation of the text so far (when a filter is configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_filter_results: Option<ContentFilterResults>,
}

/// The `delta` object.
#[derive(Debug, Clone, PartialEq, Serialize, Default, ToSchema)]
pub struct Delta {
    /// `assistant` in the first chunk of each choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// Text to append.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}
