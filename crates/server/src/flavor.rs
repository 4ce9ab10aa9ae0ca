//! Which route a generation request came in on: the chat routes differ only in how a stream
//! reports usage; the text-completions route answers in its own shape.

/// The API flavour of a generation route.
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
    /// `/v1/completions` (OpenAI's legacy text completions).
    OpenAiText,
}

impl Flavor {
    /// The route's path.
    pub fn path(self) -> &'static str {
        match self {
            Flavor::Azure => "/chat/completions",
            Flavor::OpenAi => "/v1/chat/completions",
            Flavor::OpenAiText => "/v1/completions",
        }
    }

    /// Whether the route is OpenAI's (usage with cached tokens, `stream_options` honoured).
    pub fn is_openai(self) -> bool {
        self != Flavor::Azure
    }
}
