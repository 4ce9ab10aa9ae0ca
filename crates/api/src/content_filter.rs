//! Content-filter annotations in the Azure OpenAI shape (CONTRACT.md C7): per category
//! (`hate`, `self_harm`, `sexual`, `violence`) `{"filtered": bool, "severity": "safe|low|medium|high"}`,
//! on the prompt (`prompt_filter_results`) and on each choice (`content_filter_results`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How severe a category's match is. Ordered: `Safe < Low < Medium < High`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Nothing found.
    #[default]
    Safe,
    /// Low severity.
    Low,
    /// Medium severity.
    Medium,
    /// High severity.
    High,
}

/// One category's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, ToSchema)]
pub struct CategoryResult {
    /// Whether this category blocked the text.
    pub filtered: bool,
    /// The highest severity found.
    pub severity: Severity,
}

/// The four categories' results (`content_filter_results` / `content_filter_result`).
///
/// Exists as one wire type so the prompt's annotation, each choice's annotation and the
/// `innererror` of a blocked prompt share one shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, ToSchema)]
pub struct ContentFilterResults {
    /// Hate and fairness.
    pub hate: CategoryResult,
    /// Self-harm.
    pub self_harm: CategoryResult,
    /// Sexual content.
    pub sexual: CategoryResult,
    /// Violence.
    pub violence: CategoryResult,
}

impl ContentFilterResults {
    /// Whether any category blocked the text.
    pub fn filtered(&self) -> bool {
        self.hate.filtered
            || self.self_harm.filtered
            || self.sexual.filtered
            || self.violence.filtered
    }
}

/// One entry of `prompt_filter_results`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct PromptFilterResult {
    /// Always 0: the whole conversation is one prompt.
    pub prompt_index: usize,
    /// The prompt's results.
    pub content_filter_results: ContentFilterResults,
}
