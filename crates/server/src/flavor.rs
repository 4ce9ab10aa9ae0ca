//! Which API a chat request came in on; the two differ only in how a stream reports usage.

/// The API flavour of a chat-completions route.
///
/// Exists because the azure SDK's sample loop reads `choices[0]` of every chunk, so the Azure
/// route must never send a usage-only chunk with `choices: []`, while OpenAI clients ask for
/// exactly that with `stream_options.include_usage` (CONTRACT.md A6.8, B5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `/chat/completions` (Azure AI Model Inference).
    Azure,
    /// `/v1/chat/completions` (OpenAI).
    OpenAi,
}

impl Flavor {
    /// The route's path.
    pub fn path(self) -> &'static str {
        match self {
            Flavor::Azure => "/chat/completions",
            Flavor::OpenAi => "/v1/chat/completions",
        }
    }
}
