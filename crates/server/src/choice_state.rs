//! What the server tracks per choice while a request runs: text, token count, log-probabilities
//! not yet sent, and how the choice ended. Shared by the JSON and the streaming answers.

use phi_api::{ContentFilterResults, FinishReason, TokenLogprob};
use phi_engine::engine::{Engine, FinishReason as EngineFinish, GeneratedToken, StepOutput};

use crate::content_filter::{FilterContext, TextKind};
use crate::token_logprobs::token_logprob;

/// Progress of one choice.
#[derive(Debug, Clone, Default)]
pub struct ChoiceState {
    /// Text received so far (kept for non-streaming answers, and always with a content filter).
    pub text: String,
    /// With a content filter: how much of `text` was judged and let out (sent, for a stream).
    pub released: usize,
    /// Tokens generated, a final stop token included (what `usage` counts).
    pub completion_tokens: usize,
    /// Log-probability entries not yet sent.
    pub logprobs: Vec<TokenLogprob>,
    /// With a content filter: for each entry of `logprobs`, the length of `text` once its
    /// token's text was in, so an entry goes out with its text and not before.
    logprob_ends: Vec<usize>,
    /// Set by the choice's last step.
    pub finish: Option<FinishReason>,
    /// The content filter's latest verdict on `text` (only with a filter).
    pub filter_results: Option<ContentFilterResults>,
    /// A scored prompt's tokens (a text completion's `echo` with `logprobs`), once computed.
    pub prompt_logprobs: Vec<GeneratedToken>,
}

impl ChoiceState {
    /// [`apply`](Self::apply) and, with a filter, the screening of the answer; returns the text
    /// this step lets out.
    ///
    /// Without a filter that is the step's text. With one, the whole answer so far is checked
    /// after every step that added text; the filter's
    /// [`holdback`](crate::content_filter::ContentFilter::holdback)
    /// (the last, possibly unfinished word) stays unreleased until it is complete or the choice
    /// ends, so no beginning of a blocked word goes out. When the answer is blocked, or the
    /// filter could not judge it (fail closed), the text is cut back to what was released, the
    /// choice finishes with `content_filter` and its sequence is stopped in the worker.
    pub async fn apply_filtered(
        &mut self,
        engine: &Engine,
        output: &StepOutput,
        logprobs: bool,
        keep_text: bool,
        filter: Option<&FilterContext>,
        choice: usize,
    ) -> String {
        let Some(ctx) = filter else {
            self.apply(engine, output, logprobs, keep_text);
            return output.text.clone();
        };
        self.apply(engine, output, logprobs, true);
        // A new entry's token's text ends where the text now ends.
        self.logprob_ends.resize(self.logprobs.len(), self.text.len());
        // A step that added no text leaves the verdict as it was.
        if !output.text.is_empty() || self.filter_results.is_none() {
            let (verdict, judged) = match ctx.filter.check(&self.text, TextKind::Completion).await {
                Ok(verdict) => (verdict, true),
                Err(e) => {
                    tracing::error!(error = %e, "the content filter could not judge an answer");
                    (self.filter_results.unwrap_or_default(), false)
                }
            };
            self.filter_results = Some(verdict);
            if !judged || verdict.filtered() {
                self.block(ctx, choice);
                return String::new();
            }
        }
        let hold = if self.finish.is_some() { 0 } else { ctx.filter.holdback(&self.text) };
        let upto = self.text.len().saturating_sub(hold).max(self.released);
        let out = self.text[self.released..upto].to_string();
        self.released = upto;
        out
    }

    /// Ends the choice with `content_filter`, keeping only the released text and its
    /// log-probabilities.
    fn block(&mut self, ctx: &FilterContext, choice: usize) {
        self.text.truncate(self.released);
        let keep = self.logprob_ends.iter().take_while(|&&end| end <= self.released).count();
        self.logprobs.truncate(keep);
        self.logprob_ends.truncate(keep);
        self.finish = Some(FinishReason::ContentFilter);
        ctx.stopper.stop(choice);
    }

    /// The log-probability entries whose text is out (all of them without a filter, or once the
    /// choice has finished), removed from the pending ones.
    pub fn take_released_logprobs(&mut self) -> Vec<TokenLogprob> {
        if self.logprob_ends.is_empty() || self.finish.is_some() {
            self.logprob_ends.clear();
            return std::mem::take(&mut self.logprobs);
        }
        let n = self.logprob_ends.iter().take_while(|&&end| end <= self.released).count();
        self.logprob_ends.drain(..n);
        self.logprobs.drain(..n).collect()
    }

    /// Records one step. With `logprobs`, the sampled token gets an entry, except a stop token
    /// that ended the choice (it is not part of the answer, as with OpenAI).
    pub fn apply(&mut self, engine: &Engine, output: &StepOutput, logprobs: bool, keep_text: bool) {
        if keep_text {
            self.text.push_str(&output.text);
        }
        if !output.prompt_logprobs.is_empty() {
            self.prompt_logprobs = output.prompt_logprobs.clone();
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
