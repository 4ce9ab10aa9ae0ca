//! Log-probabilities in the OpenAI shape (CONTRACT.md B6):
//! `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
//! "refusal": null}`.

use serde::Serialize;
use utoipa::ToSchema;

/// The `logprobs` object of a choice (or of one streamed chunk's choice).
///
/// Exists because the openai SDK's strict mode requires `token`, `logprob` and `top_logprobs`
/// on every entry, and the azure SDK hands the raw dict to callers.
#[derive(Debug, Clone, PartialEq, Serialize, Default, ToSchema)]
pub struct ChoiceLogprobs {
    /// One entry per generated token (in a chunk: the tokens of that chunk's delta).
    pub content: Vec<TokenLogprob>,
    /// Always `null`: this server never refuses.
    pub refusal: Option<String>,
}

/// One generated token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TokenLogprob {
    /// The token's text.
    pub token: String,
    /// Natural log of its probability under the model.
    pub logprob: f32,
    /// The token's UTF-8 bytes (a byte-fallback token may hold part of a character).
    pub bytes: Option<Vec<u8>>,
    /// The `top_logprobs` most likely tokens at this position (empty unless requested).
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative at a position.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Natural log of its probability under the model.
    pub logprob: f32,
    /// The token's UTF-8 bytes.
    pub bytes: Option<Vec<u8>>,
}
