//! A chat-completions request after parsing and validation: what the server needs to run it,
//! already in the engine's terms.

use phi_engine::chat_template::ChatMessage;
use phi_engine::sampling::SamplingParams;

/// Most choices (`n`) one request may ask for; each choice is a sequence in the batch, so this
/// bounds what one request can take from everyone else.
pub const MAX_CHOICES: usize = 16;

/// A validated chat-completions request.
///
/// Exists so that everything the wire format allows in several spellings (content parts, stop as
/// string or list, `max_tokens` or `max_completion_tokens`, numbers as strings) is resolved in one
/// place, and the server only sees one form.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The conversation, flattened to role and text.
    pub messages: Vec<ChatMessage>,
    /// Sampling parameters, validated against the engine's ranges.
    pub sampling: SamplingParams,
    /// `max_completion_tokens`, else `max_tokens`; `None` for as many as the context allows.
    pub max_tokens: Option<usize>,
    /// Stop strings (at most four, none empty).
    pub stop: Vec<String>,
    /// How many choices to generate.
    pub n: usize,
    /// Answer as server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`: an extra usage-only chunk at the end of the stream.
    pub include_usage: bool,
    /// The `model` the client named (informational: the server serves one model).
    pub model: Option<String>,
    /// Body keys the API does not define that `drop` or `pass-through` let through (for logs).
    pub ignored_parameters: Vec<String>,
}
