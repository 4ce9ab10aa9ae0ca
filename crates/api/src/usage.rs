//! Token counts of a request, as both SDKs read them.

use serde::Serialize;

/// The `usage` object.
///
/// Exists because callers read `usage.total_tokens` directly (a missing `usage` breaks typical
/// azure sample code, CONTRACT.md A5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Tokens in the rendered prompt (counted once, whatever `n` is).
    pub prompt_tokens: usize,
    /// Tokens generated over all choices.
    pub completion_tokens: usize,
    /// The sum of the two.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage from the two counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}
