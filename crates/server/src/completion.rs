//! The non-streaming answer: wait for every choice to finish and build one JSON body.

use phi_api::{ApiError, AssistantMessage, ChatCompletion, Choice, ChoiceLogprobs, FinishReason};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::choice_state::ChoiceState;
use crate::request_log::CompletionLog;
use crate::response_meta::ResponseMeta;
use crate::worker::WorkerEvent;

/// Collects the worker's events for a chat request into a [`ChatCompletion`]. Dropping the
/// future (client gone) drops the receiver, which cancels the request in the worker.
pub async fn collect(
    meta: &ResponseMeta,
    events: UnboundedReceiver<WorkerEvent>,
    log: CompletionLog,
) -> Result<ChatCompletion, ApiError> {
    let choices = collect_choices(meta, events, log).await?;
    let completion_tokens = choices.iter().map(|c| c.completion_tokens).sum();
    Ok(ChatCompletion {
        id: meta.id.clone(),
        object: ChatCompletion::OBJECT,
        created: meta.created,
        model: meta.model.clone(),
        prompt_filter_results: meta.prompt_filter_results(),
        choices: choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| Choice {
                index,
                message: AssistantMessage::new(c.text),
                finish_reason: c.finish.unwrap_or(FinishReason::Stop),
                logprobs: meta
                    .logprobs
                    .then_some(ChoiceLogprobs { content: c.logprobs, refusal: None }),
                content_filter_results: meta
                    .filter
                    .as_ref()
                    .map(|_| c.filter_results.unwrap_or_default()),
            })
            .collect(),
        usage: meta.usage(completion_tokens),
    })
}

/// Waits for every choice of a request to finish, whatever the route's answer looks like.
pub async fn collect_choices(
    meta: &ResponseMeta,
    mut events: UnboundedReceiver<WorkerEvent>,
    mut log: CompletionLog,
) -> Result<Vec<ChoiceState>, ApiError> {
    let mut choices = vec![ChoiceState::default(); meta.n];
    let mut finished = 0;
    while finished < meta.n {
        match events.recv().await {
            Some(WorkerEvent::Step { choice, output }) => {
                let state = &mut choices[choice];
                if state.finish.is_some() {
                    // Stopped by the content filter; the worker may have stepped it once more.
                    continue;
                }
                let filter = meta.filter.as_ref();
                let released = state
                    .apply_filtered(&meta.engine, &output, meta.logprobs, true, filter, choice)
                    .await;
                log.update(choice, state.completion_tokens, !released.is_empty(), state.finish);
                if state.finish.is_some() {
                    finished += 1;
                }
            }
            Some(WorkerEvent::Failed(message)) => {
                log.discard();
                return Err(ApiError::internal(message));
            }
            Some(WorkerEvent::Expired) => {
                log.discard();
                return Err(expired_error());
            }
            None => {
                log.discard();
                return Err(ApiError::internal(
                    "the engine stopped before the answer was complete",
                ));
            }
        }
    }
    Ok(choices)
}

/// The answer to a request whose deadline passed before it got a place in the batch: the
/// server is overloaded (503, retried by the SDKs after `Retry-After`).
pub fn expired_error() -> ApiError {
    ApiError::unavailable(
        "the server was too busy to start this request within --request-timeout-secs; retry later",
    )
}
