//! What every part of one answer shares: its id, timestamp, model name and the request options
//! that shape the response.

use std::sync::Arc;

use phi_engine::engine::Engine;

use crate::content_filter::FilterContext;
use crate::flavor::Flavor;

/// Per-request facts the response builders need.
///
/// Exists so the JSON and SSE builders take one value instead of a long argument list, and so
/// every chunk of a stream carries the same `id` and `created`.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    /// `chatcmpl-...` (`cmpl-...` for a text completion).
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// Number of choices (of all prompts).
    pub n: usize,
    /// Prompt length in tokens (of all prompts, for a text completion).
    pub prompt_tokens: usize,
    /// Prompt tokens reused from the prefix cache (of each prompt's first choice).
    pub cached_prompt_tokens: usize,
    /// Whether log-probabilities were requested.
    pub logprobs: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Which route the request came in on.
    pub flavor: Flavor,
    /// For token texts and stop-token ids.
    pub engine: Arc<Engine>,
    /// The content filter, when one is configured (answers are then annotated).
    pub filter: Option<FilterContext>,
}

impl ResponseMeta {
    /// The answer's `usage`: on the OpenAI routes with `prompt_tokens_details.cached_tokens`
    /// when the prefix cache served part of the prompt.
    pub fn usage(&self, completion_tokens: usize) -> phi_api::Usage {
        let cached = self.flavor.is_openai().then_some(self.cached_prompt_tokens);
        phi_api::Usage::new(self.prompt_tokens, completion_tokens).with_cached_tokens(cached)
    }

    /// `prompt_filter_results`, when a filter is configured.
    pub fn prompt_filter_results(&self) -> Option<Vec<phi_api::PromptFilterResult>> {
        self.filter.as_ref().map(|f| {
            vec![phi_api::PromptFilterResult { prompt_index: 0, content_filter_results: f.prompt }]
        })
    }
}
