//! Token counts of a request, as both SDKs read them.

use serde::Serialize;
use utoipa::ToSchema;

/// The `usage` object.
///
/// Exists because callers read `usage.total_tokens` directly (a missing `usage` breaks typical
/// azure sample code, CONTRACT.md A5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Usage {
    /// Tokens in the rendered prompt (counted once, whatever `n` is).
    pub prompt_tokens: usize,
    /// Tokens generated over all choices.
    pub completion_tokens: usize,
    /// The sum of the two.
    pub total_tokens: usize,
    /// OpenAI's breakdown of the prompt: how many of its tokens were served from a cache.
    /// Present only when some were (and only on the OpenAI route).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values were reused rather than computed.
    pub cached_tokens: usize,
}

impl Usage {
    /// Usage from the two counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
        }
    }

    /// Reports `cached_tokens` when there are any.
    pub fn with_cached_tokens(mut self, cached_tokens: Option<usize>) -> Self {
        self.prompt_tokens_details = cached_tokens
            .filter(|&n| n > 0)
            .map(|cached_tokens| PromptTokensDetails { cached_tokens });
        self
    }
}
