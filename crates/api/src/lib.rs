//! phi-api: the wire format of phi-serve's HTTP API, with no I/O.
//!
//! Request parsing and validation ([`parse_chat_request`]) turns a chat-completions body into a
//! [`ChatRequest`] in the engine's terms, or an [`ApiError`] that names the parameter at fault and
//! knows its HTTP status. The response types serialize to exactly what the `azure-ai-inference`
//! and `openai` Python SDKs accept (see `shared/api/CONTRACT.md`).

pub mod chunk;
pub mod content_filter;
pub mod error;
pub mod extra_parameters;
pub mod finish_reason;
pub mod logprobs;
pub mod messages;
pub mod models;
pub mod parse;
pub mod request;
pub mod request_schema;
pub mod response;
pub mod sse;
pub mod usage;

pub use chunk::{ChatCompletionChunk, ChunkChoice, Delta};
pub use content_filter::{CategoryResult, ContentFilterResults, PromptFilterResult, Severity};
pub use error::{ApiError, ErrorBody};
pub use extra_parameters::ExtraParameters;
pub use finish_reason::FinishReason;
pub use logprobs::{ChoiceLogprobs, TokenLogprob, TopLogprob};
pub use models::{ModelCard, ModelInfo, ModelList};
pub use parse::parse_chat_request;
pub use request::ChatRequest;
pub use response::{AssistantMessage, ChatCompletion, Choice};
pub use usage::{PromptTokensDetails, Usage};
