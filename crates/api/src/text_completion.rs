//! The legacy text-completions answer (`POST /v1/completions`), as the openai SDK's
//! `Completion` reads it: `{id, object: "text_completion", created, model, choices: [{index,
//! text, logprobs, finish_reason}], usage}`. A stream sends the same object for every event,
//! each choice holding the text to append.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use crate::content_filter::{ContentFilterResults, PromptFilterResult};
use crate::finish_reason::FinishReason;
use crate::logprobs::TokenLogprob;
use crate::usage::Usage;

/// A text-completions answer, or one event of a streamed one.
///
/// Exists as one type for both because the legacy API streams the same object (with the text
/// so far of each choice's step instead of all of it).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TextCompletion {
    /// `cmpl-...`, the same on every event of a stream.
    pub id: String,
    /// Always `text_completion`.
    pub object: &'static str,
    /// Unix seconds, the same on every event of a stream.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// The prompt's content-filter annotation (only when a filter is configured; on a stream,
    /// the first event only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_filter_results: Option<Vec<PromptFilterResult>>,
    /// The choices (in a stream, those this event advances; none in the include_usage event).
    pub choices: Vec<TextChoice>,
    /// Token counts: always in a JSON answer; in a stream absent, `null` (with
    /// `stream_options.include_usage`, on every event but the usage one) or the counts.
    #[schema(value_type = Option<Usage>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

impl TextCompletion {
    /// The `object` value.
    pub const OBJECT: &'static str = "text_completion";
}

/// One choice of a text completion.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TextChoice {
    /// Position in `choices`: prompt `i`'s choices are `i * n` to `i * n + n - 1`.
    pub index: usize,
    /// The generated text (after the prompt with `echo`); in a stream, what to append.
    pub text: String,
    /// Log-probabilities when `logprobs` was given, else `null`.
    pub logprobs: Option<TextLogprobs>,
    /// Why the choice ended; `null` in a stream until its last event.
    pub finish_reason: Option<FinishReason>,
    /// The answer's content-filter annotation (only when a filter is configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_filter_results: Option<ContentFilterResults>,
}

/// The legacy log-probabilities: four lists with one entry per token of the choice's text (with
/// `echo`, the prompt's tokens first, then the generated ones).
///
/// Exists because the legacy API predates chat's list of token objects; the openai SDK and
/// evaluation harnesses read these four lists.
#[derive(Debug, Clone, PartialEq, Default, Serialize, ToSchema)]
pub struct TextLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's natural-log probability under the model given the tokens before it; `null`
    /// for an echoed prompt's first token, which has none before it.
    pub token_logprobs: Vec<Option<f32>>,
    /// Per position, the `logprobs` most likely tokens and the position's own token, text to
    /// logprob; `null` where `token_logprobs` is.
    #[schema(value_type = Vec<Option<HashMap<String, f32>>>)]
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Where each token's text starts in the choice's text, in characters (counting the echoed
    /// prompt).
    pub text_offset: Vec<usize>,
}

impl TextLogprobs {
    /// The legacy form of `entries`, whose first token's text starts at character `offset`;
    /// advances `offset` past their text.
    pub fn from_entries(entries: &[TokenLogprob], offset: &mut usize) -> Self {
        let mut out = TextLogprobs::default();
        for e in entries {
            out.push(e, *offset);
            *offset += e.token.chars().count();
        }
        out
    }

    /// Adds a position: `entry`'s token, whose text starts at character `offset`.
    pub fn push(&mut self, entry: &TokenLogprob, offset: usize) {
        self.tokens.push(entry.token.clone());
        self.token_logprobs.push(Some(entry.logprob));
        let mut top: BTreeMap<String, f32> =
            entry.top_logprobs.iter().map(|t| (t.token.clone(), t.logprob)).collect();
        // OpenAI: "the API will always return the logprob of the sampled token".
        top.entry(entry.token.clone()).or_insert(entry.logprob);
        self.top_logprobs.push(Some(top));
        self.text_offset.push(offset);
    }

    /// Adds a position with no log-probability (an echoed prompt's first token).
    pub fn push_unscored(&mut self, token: String, offset: usize) {
        self.tokens.push(token);
        self.token_logprobs.push(None);
        self.top_logprobs.push(None);
        self.text_offset.push(offset);
    }

    /// Appends `other`'s positions after this one's (a scored prompt's, then its answer's).
    pub fn append(&mut self, mut other: TextLogprobs) {
        self.tokens.append(&mut other.tokens);
        self.token_logprobs.append(&mut other.token_logprobs);
        self.top_logprobs.append(&mut other.top_logprobs);
        self.text_offset.append(&mut other.text_offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logprobs::TopLogprob;

    fn entry(token: &str, logprob: f32, top: &[(&str, f32)]) -> TokenLogprob {
        TokenLogprob {
            token: token.into(),
            logprob,
            bytes: Some(token.as_bytes().to_vec()),
            top_logprobs: top
                .iter()
                .map(|&(t, l)| TopLogprob { token: t.into(), logprob: l, bytes: None })
                .collect(),
        }
    }

    #[test]
    fn four_lists_with_offsets_and_the_sampled_token_among_the_top() {
        let mut offset = 3;
        let lp = TextLogprobs::from_entries(
            &[entry(" hé", -0.5, &[(" hé", -0.5), (" a", -1.5)]), entry("!", -2.0, &[("?", -0.1)])],
            &mut offset,
        );
        assert_eq!(lp.tokens, [" hé", "!"]);
        assert_eq!(lp.token_logprobs, [Some(-0.5), Some(-2.0)]);
        assert_eq!(lp.text_offset, [3, 6]);
        assert_eq!(offset, 7);
        let want: Vec<Option<BTreeMap<String, f32>>> = vec![
            Some([(" hé".to_string(), -0.5), (" a".to_string(), -1.5)].into()),
            Some([("?".to_string(), -0.1), ("!".to_string(), -2.0)].into()),
        ];
        assert_eq!(lp.top_logprobs, want);
    }

    #[test]
    fn a_scored_prompt_starts_with_nulls_and_the_answer_follows() {
        let mut lp = TextLogprobs::default();
        lp.push_unscored("Once".into(), 0);
        lp.push(&entry(" upon", -3.0, &[(" a", -1.0)]), 4);
        let mut offset = 9;
        lp.append(TextLogprobs::from_entries(&[entry(" time", -0.25, &[])], &mut offset));
        assert_eq!(
            serde_json::to_value(&lp).unwrap(),
            serde_json::json!({"tokens": ["Once", " upon", " time"],
                "token_logprobs": [null, -3.0, -0.25],
                "top_logprobs": [null, {" a": -1.0, " upon": -3.0}, {" time": -0.25}],
                "text_offset": [0, 4, 9]})
        );
    }

    #[test]
    fn wire_shape() {
        let c = TextCompletion {
            id: "cmpl-1".into(),
            object: TextCompletion::OBJECT,
            created: 1,
            model: "m".into(),
            prompt_filter_results: None,
            choices: vec![TextChoice {
                index: 0,
                text: "x".into(),
                logprobs: None,
                finish_reason: None,
                content_filter_results: None,
            }],
            usage: None,
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"id": "cmpl-1", "object": "text_completion", "created": 1,
                "model": "m", "choices": [{"index": 0, "text": "x", "logprobs": null,
                "finish_reason": null}]})
        );
    }
}
