//! The streaming answer: server-sent events built by hand (not axum's `Sse`, whose keep-alive
//! comments break the azure parser, CONTRACT.md (e).1). What happens when is the same for
//! every route; what an event holds is its [`StreamShape`]'s (a chat chunk, a text completion).
//!
//! For chat, the bytes are, in order: one role chunk per choice (`delta: {role: assistant, content: ""}`),
//! a content chunk for every step that released text, one final chunk per choice with `delta: {}`
//! and its `finish_reason`, then `data: [DONE]`. The last final chunk carries `usage`, except on
//! `/v1` with `stream_options.include_usage`, where every chunk has `"usage": null` and a
//! usage-only chunk with `choices: []` comes before `[DONE]`. A text completion has no role
//! chunk (but one with the prompt, with `echo`) and otherwise the same sequence. An engine failure after the headers
//! went out is reported as `data: {"error": {...}}` and the stream ends without `[DONE]`.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::Response;
use phi_api::{
    sse, ApiError, ChatCompletionChunk, ChoiceLogprobs, ChunkChoice, ContentFilterResults, Delta,
    FinishReason, PromptFilterResult, TokenLogprob, Usage,
};
use phi_engine::engine::GeneratedToken;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::choice_state::ChoiceState;
use crate::request_log::CompletionLog;
use crate::response_meta::ResponseMeta;
use crate::worker::WorkerEvent;

/// The 200 response whose body streams the request's events. When the client disconnects the
/// body is dropped, which drops the event receiver and so cancels the request in the worker.
pub fn sse_response<S: StreamShape>(
    meta: ResponseMeta,
    events: UnboundedReceiver<WorkerEvent>,
    log: CompletionLog,
    shape: S,
) -> Response {
    let stream =
        futures_util::stream::unfold(SseState::new(meta, events, log, shape), |mut s| async move {
            loop {
                if let Some(bytes) = s.out.pop_front() {
                    return Some((Ok::<_, Infallible>(bytes), s));
                }
                if s.done {
                    return None;
                }
                match s.events.recv().await {
                    Some(WorkerEvent::Step { choice, output }) => s.on_step(choice, &output).await,
                    Some(WorkerEvent::Failed(message)) => s.fail(ApiError::internal(message)),
                    Some(WorkerEvent::Expired) => s.fail(crate::completion::expired_error()),
                    None => s.fail(ApiError::internal(
                        "the engine stopped before the answer was complete",
                    )),
                }
            }
        });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(stream))
        .expect("static headers are valid")
}

/// What the events of one route's stream hold.
///
/// Exists so that the order of events, the content filter, usage and the log are written once
/// ([`SseState`]) for the chat and the text-completions streams.
pub trait StreamShape: Send + 'static {
    /// One choice's part of an event.
    type Choice: Serialize;
    /// One event's payload.
    type Event: Serialize;

    /// The part that opens choice `index` before anything is generated, if the shape has one.
    fn opening(&mut self, index: usize) -> Option<Self::Choice>;

    /// The part that carries choice `index`'s scored prompt (`scores`, one per prompt token),
    /// sent before the step's text, if the shape answers prompt log-probabilities.
    fn prompt_scored(
        &mut self,
        index: usize,
        meta: &ResponseMeta,
        scores: &[GeneratedToken],
    ) -> Option<Self::Choice> {
        let _ = (index, meta, scores);
        None
    }

    /// A choice's part with the text it released, its log-probabilities and filter verdict,
    /// and its finish reason on its last part.
    fn part(
        &mut self,
        index: usize,
        text: String,
        logprobs: Option<Vec<TokenLogprob>>,
        content_filter_results: Option<ContentFilterResults>,
        finish_reason: Option<FinishReason>,
    ) -> Self::Choice;

    /// An event of these choices; `usage` is absent, `null` or the counts.
    fn event(
        &self,
        meta: &ResponseMeta,
        prompt_filter_results: Option<Vec<PromptFilterResult>>,
        choices: Vec<Self::Choice>,
        usage: Option<Option<Usage>>,
    ) -> Self::Event;
}

/// The chat routes' events: [`ChatCompletionChunk`]s.
pub struct ChatChunks;

impl StreamShape for ChatChunks {
    type Choice = ChunkChoice;
    type Event = ChatCompletionChunk;

    fn opening(&mut self, index: usize) -> Option<ChunkChoice> {
        let delta = Delta { role: Some("assistant"), content: Some(String::new()) };
        Some(ChunkChoice {
            index,
            delta,
            finish_reason: None,
            logprobs: None,
            content_filter_results: None,
        })
    }

    fn part(
        &mut self,
        index: usize,
        text: String,
        logprobs: Option<Vec<TokenLogprob>>,
        content_filter_results: Option<ContentFilterResults>,
        finish_reason: Option<FinishReason>,
    ) -> ChunkChoice {
        // A choice's last chunk carries `delta: {}`.
        let content = (finish_reason.is_none() || !text.is_empty()).then_some(text);
        ChunkChoice {
            index,
            delta: Delta { role: None, content },
            finish_reason,
            logprobs: logprobs.map(|content| ChoiceLogprobs { content, refusal: None }),
            content_filter_results,
        }
    }

    fn event(
        &self,
        meta: &ResponseMeta,
        prompt_filter_results: Option<Vec<PromptFilterResult>>,
        choices: Vec<ChunkChoice>,
        usage: Option<Option<Usage>>,
    ) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: meta.id.clone(),
            object: ChatCompletionChunk::OBJECT,
            created: meta.created,
            model: meta.model.clone(),
            prompt_filter_results,
            choices,
            usage,
        }
    }
}

struct SseState<S> {
    meta: ResponseMeta,
    events: UnboundedReceiver<WorkerEvent>,
    choices: Vec<ChoiceState>,
    finished: usize,
    out: VecDeque<Bytes>,
    done: bool,
    /// Whether a chunk went out yet (the first carries `prompt_filter_results`).
    started: bool,
    /// Written when the stream ends or is dropped (client gone).
    log: CompletionLog,
    shape: S,
}

impl<S: StreamShape> SseState<S> {
    fn new(
        meta: ResponseMeta,
        events: UnboundedReceiver<WorkerEvent>,
        log: CompletionLog,
        shape: S,
    ) -> Self {
        let mut s = SseState {
            choices: vec![ChoiceState::default(); meta.n],
            meta,
            events,
            finished: 0,
            out: VecDeque::new(),
            done: false,
            started: false,
            log,
            shape,
        };
        for index in 0..s.meta.n {
            if let Some(choice) = s.shape.opening(index) {
                s.push_choice(choice, None);
            }
        }
        s
    }

    /// `usage: null` on every chunk when the client asked for a separate usage chunk.
    fn nulled_usage(&self) -> bool {
        self.meta.flavor.is_openai() && self.meta.include_usage
    }

    fn push_choice(&mut self, choice: S::Choice, usage: Option<Usage>) {
        let usage = match usage {
            Some(u) => Some(Some(u)),
            None if self.nulled_usage() => Some(None),
            None => None,
        };
        self.push_chunk(vec![choice], usage);
    }

    fn push_chunk(&mut self, choices: Vec<S::Choice>, usage: Option<Option<Usage>>) {
        let filter_results = if self.started { None } else { self.meta.prompt_filter_results() };
        let event = self.shape.event(&self.meta, filter_results, choices, usage);
        self.started = true;
        self.out.push_back(Bytes::from(sse::event(&event)));
    }

    async fn on_step(&mut self, index: usize, output: &phi_engine::engine::StepOutput) {
        let logprobs = self.meta.logprobs;
        let state = &mut self.choices[index];
        if state.finish.is_some() {
            // Stopped by the content filter; the worker may have stepped it once more.
            return;
        }
        if !output.prompt_logprobs.is_empty() {
            if let Some(choice) =
                self.shape.prompt_scored(index, &self.meta, &output.prompt_logprobs)
            {
                self.push_choice(choice, None);
            }
        }
        let state = &mut self.choices[index];
        let filter = self.meta.filter.as_ref();
        // With a filter, the answer so far is checked before any of this step's text is sent.
        let released =
            state.apply_filtered(&self.meta.engine, output, logprobs, false, filter, index).await;
        let results = state.filter_results;
        self.log.update(index, state.completion_tokens, !released.is_empty(), state.finish);
        if !released.is_empty() {
            let lp = logprobs.then(|| state.take_released_logprobs());
            let choice = self.shape.part(index, released, lp, results, None);
            self.push_choice(choice, None);
        }
        let Some(reason) = self.choices[index].finish else { return };
        self.finished += 1;
        let leftover = self.choices[index].take_released_logprobs();
        let lp = (!leftover.is_empty()).then_some(leftover);
        let last = self.finished == self.meta.n;
        let usage = self.usage();
        let final_usage = (last && !self.nulled_usage()).then_some(usage);
        let choice = self.shape.part(index, String::new(), lp, results, Some(reason));
        self.push_choice(choice, final_usage);
        if last {
            if self.nulled_usage() {
                self.push_chunk(Vec::new(), Some(Some(usage)));
            }
            self.out.push_back(Bytes::from_static(sse::DONE));
            self.done = true;
        }
    }

    fn usage(&self) -> Usage {
        self.meta.usage(self.choices.iter().map(|c| c.completion_tokens).sum())
    }

    fn fail(&mut self, error: ApiError) {
        tracing::error!(code = error.code, error = %error.message, "stream ended without an answer");
        self.log.engine_failed();
        self.out.push_back(Bytes::from(sse::event(&error.body())));
        self.done = true;
    }
}
