//! Why a choice ended, spelled as both SDKs expect.

use serde::Serialize;
use utoipa::ToSchema;

/// The `finish_reason` of a choice.
///
/// Exists as its own wire type (rather than reusing the engine's) because the API knows reasons
/// the engine never produces (`content_filter`, `tool_calls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string ended the choice.
    Stop,
    /// `max_tokens` or the context window ended the choice.
    Length,
    /// The output was filtered.
    ContentFilter,
    /// The model called a tool.
    ToolCalls,
}

impl FinishReason {
    /// The wire spelling, e.g. `content_filter`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

impl From<phi_engine::engine::FinishReason> for FinishReason {
    fn from(r: phi_engine::engine::FinishReason) -> Self {
        match r {
            phi_engine::engine::FinishReason::Stop => FinishReason::Stop,
            phi_engine::engine::FinishReason::Length => FinishReason::Length,
        }
    }
}
