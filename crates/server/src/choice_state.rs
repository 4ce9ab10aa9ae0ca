//! What the server tracks per choice while a request runs: text, token count, log-probabilities
//! not yet sent, and how the choice ended. Shared by the JSON and the streaming answers.

use phi_api::{FinishReason, TokenLogprob};
use phi_engine::engine::{Engine, FinishReason as EngineFinish, StepOutput};

use crate::token_logprobs::token_logprob;

/// Progress of one choice.
#[derive(Debug, Clone, Default)]
pub struct ChoiceState {
    /// Text received so far (only kept for non-streaming answers).
    pub text: String,
    /// Tokens generated, a final stop token included (what `usage` counts).
    pub completion_tokens: usize,
    /// Log-probability entries not yet sent.
    pub logprobs: Vec<TokenLogprob>,
    /// Set by the choice's last step.
    pub finish: Option<FinishReason>,
}

impl ChoiceState {
    /// Records one step. With `logprobs`, the sampled token gets an entry, except a stop token
    /// that ended the choice (it is not part of the answer, as with OpenAI).
    pub fn apply(&mut self, engine: &Engine, output: &StepOutput, logprobs: bool, keep_text: bool) {
        if keep_text {
            self.text.push_str(&output.text);
        }
        if let Some(token) = &output.token {
            self.completion_tokens += 1;
            let is_stop_token = output.finish_reason == Some(EngineFinish::Stop)
                && engine.stop_token_ids().contains(&token.id);
            if logprobs && !is_stop_token {
                self.logprobs.push(token_logprob(engine.tokenizer(), token));
            }
        }
        if let Some(reason) = output.finish_reason {
            self.finish = Some(reason.into());
        }
    }
}
