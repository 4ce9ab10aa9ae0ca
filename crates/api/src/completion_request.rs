//! A legacy text-completions request (`POST /v1/completions`) after parsing and validation.

use phi_engine::sampling::SamplingParams;

/// Tokens a text completion generates when the request does not say (OpenAI's default).
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;

/// One prompt of a text-completions request.
///
/// Exists because the API takes prompts as text or as token ids already, and only text goes
/// through the tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Text, tokenized with the model's special tokens (BOS where its tokenizer adds one).
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// A validated text-completions request: raw prompts continued without a chat template.
///
/// Exists so that the several prompt spellings (a string, strings, token ids, lists of token
/// ids) and OpenAI's legacy `logprobs` integer reach the server in one form.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// The prompts; each gets `n` choices, prompt `i`'s being `choices[i * n..(i + 1) * n]`.
    pub prompts: Vec<Prompt>,
    /// Sampling parameters, validated against the engine's ranges (`logprobs: N` sets
    /// `logprobs` and `top_logprobs: N`).
    pub sampling: SamplingParams,
    /// Most tokens to generate per choice ([`DEFAULT_COMPLETION_TOKENS`] when not given).
    pub max_tokens: usize,
    /// Stop strings (at most four, none empty).
    pub stop: Vec<String>,
    /// Choices per prompt.
    pub n: usize,
    /// Answer as server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`: an extra usage-only chunk at the end of the stream.
    pub include_usage: bool,
    /// Put the prompt's text in front of each choice's text.
    pub echo: bool,
    /// The `model` the client named (informational: the server serves one model).
    pub model: Option<String>,
    /// Body keys the API does not define that `drop` or `pass-through` let through (for logs).
    pub ignored_parameters: Vec<String>,
}

impl CompletionRequest {
    /// How many choices the answer holds: `n` for every prompt.
    pub fn choices(&self) -> usize {
        self.prompts.len() * self.n
    }
}
