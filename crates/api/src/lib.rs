//! phi-api: the wire format of phi-serve's HTTP API, with no I/O.
//!
//! Request parsing and validation ([`parse_chat_request`]) turns a chat-completions body into a
//! [`ChatRequest`] in the engine's terms, or an [`ApiError`] that names the parameter at fault and
//! knows its HTTP status; [`parse_completion_request`] does the same for the legacy
//! text-completions body. The response types serialize to exactly what the `azure-ai-inference`
//! and `openai` Python SDKs accept (see `shared/api/CONTRACT.md`).

pub mod chunk;
pub mod completion_request;
pub mod content_filter;
pub mod error;
pub mod extra_parameters;
mod fields;
pub mod finish_reason;
pub mod logprobs;
pub mod messages;
pub mod models;
pub mod parse;
pub mod parse_completion;
pub mod request;
pub mod request_schema;
pub mod response;
pub mod sse;
pub mod text_completion;
pub mod usage;

pub use chunk::{ChatCompletionChunk, ChunkChoice, Delta};
pub use completion_request::{CompletionRequest, Prompt};
pub use content_filter::{CategoryResult, ContentFilterResults, PromptFilterResult, Severity};
pub use error::{ApiError, ErrorBody};
pub use extra_parameters::ExtraParameters;
pub use finish_reason::FinishReason;
pub use logprobs::{ChoiceLogprobs, TokenLogprob, TopLogprob};
pub use models::{ModelCard, ModelInfo, ModelList};
pub use parse::parse_chat_request;
pub use parse_completion::parse_completion_request;
pub use request::ChatRequest;
pub use response::{AssistantMessage, ChatCompletion, Choice};
pub use text_completion::{TextChoice, TextCompletion, TextLogprobs};
pub use usage::{PromptTokensDetails, Usage};
