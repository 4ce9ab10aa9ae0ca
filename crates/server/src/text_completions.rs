//! `POST /v1/completions`: OpenAI's legacy text completions, the prompt continued as it is
//! (no chat template), for benchmark and evaluation tools and base-model style prompting.
//!
//! The same admission, prompt screening, queue, content filter, log and metrics as the chat
//! routes; only the parsing, the tokenization and the answer's shape differ.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use phi_api::{
    parse_completion_request, ApiError, ContentFilterResults, FinishReason, Prompt,
    PromptFilterResult, TextChoice, TextCompletion, TextLogprobs, TokenLogprob, Usage,
};
use phi_engine::engine::GeneratedToken;

use crate::admission::{admit, screen_prompt, submit, Admitted};
use crate::completion::collect_choices;
use crate::content_filter::FilterContext;
use crate::flavor::Flavor;
use crate::http_error::HttpError;
use crate::ids::random_id;
use crate::prepare::prepare_text;
use crate::request_id::RequestId;
use crate::request_log::{CompletionLog, LoggedByCompletion};
use crate::response_meta::ResponseMeta;
use crate::state::{unix_now, AppState};
use crate::stream::{sse_response, StreamShape};
use crate::token_logprobs::prompt_logprobs;
use crate::worker::Job;

/// Handler of the legacy text-completions route.
#[utoipa::path(post, path = "/v1/completions", tag = "openai", operation_id = "openai_completions",
    params(crate::openapi::ExtraParametersHeader),
    request_body(content = phi_api::request_schema::CompletionsRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The answer: JSON, or server-sent events when `stream` is true \
            (each `data:` line a `TextCompletion` holding what to append, then `data: [DONE]`).",
            content(
                (phi_api::TextCompletion = "application/json"),
                (phi_api::sse::TextCompletionEvent = "text/event-stream"),
            )),
        crate::openapi::ChatErrors,
    ),
    security((), ("api_key" = []), ("bearer" = [])))]
pub async fn openai_completions(
    State(state): State<AppState>,
    id: Option<Extension<RequestId>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let Admitted { started, body, extra } = admit(&state, &headers, body)?;
    let req = parse_completion_request(&body, extra)?;
    if !req.ignored_parameters.is_empty() {
        tracing::debug!(parameters = ?req.ignored_parameters, "ignoring extra parameters");
    }

    // The prompts are screened before anything else: a blocked one starts no generation.
    let verdict = match state.config().content_filter.clone() {
        None => None,
        Some(filter) => {
            let engine = state.engine().clone();
            let text: Vec<String> = req
                .prompts
                .iter()
                .map(|p| match p {
                    Prompt::Text(text) => text.clone(),
                    Prompt::Tokens(ids) => {
                        engine.tokenizer().decode(ids, false).unwrap_or_default()
                    }
                })
                .collect();
            Some((screen_prompt(filter.as_ref(), &text.join("\n")).await?, filter))
        }
    };
    let engine = state.engine().clone();
    let (req, prepared) = tokio::task::spawn_blocking(move || {
        let prepared = prepare_text(&engine, &req);
        (req, prepared)
    })
    .await
    .map_err(|_| ApiError::internal("preparing the prompt panicked"))?;
    let mut prepared = prepared?;
    let cached_prompt_tokens = prepared.cached_prompt_tokens();
    let echoes = std::mem::take(&mut prepared.echoes);
    let choices = prepared.sequences.len();
    let (job, events) = Job::new(prepared.sequences);
    let job = job.with_deadline(state.config().request_timeout.map(|t| started + t));
    let filter =
        verdict.map(|(prompt, filter)| FilterContext { filter, prompt, stopper: job.stopper() });

    let meta = ResponseMeta {
        id: random_id("cmpl-"),
        created: unix_now(),
        model: state.config().model_name.clone(),
        n: choices,
        prompt_tokens: prepared.prompt_tokens,
        cached_prompt_tokens,
        logprobs: req.sampling.logprobs,
        include_usage: req.include_usage,
        flavor: Flavor::OpenAiText,
        engine: state.engine().clone(),
        filter,
    };
    submit(&state, job, choices)?;
    let path = Flavor::OpenAiText.path();
    let log = CompletionLog::start(
        id.map(|e| e.0),
        path,
        req.stream,
        started,
        meta.prompt_tokens,
        choices,
    )
    .with_metrics(state.metrics().clone())
    .with_cached_tokens(cached_prompt_tokens);
    let scored = req.echo && req.sampling.logprobs;
    let mut res = if req.stream {
        sse_response(meta, events, log, TextEvents::new(echoes, choices, scored))
    } else {
        let completion = collect_text(&meta, echoes, events, log).await?;
        (StatusCode::OK, Json(completion)).into_response()
    };
    res.extensions_mut().insert(LoggedByCompletion);
    Ok(res)
}

/// Waits for every choice and builds the JSON answer; with `echo`, each text starts with its
/// prompt.
async fn collect_text(
    meta: &ResponseMeta,
    echoes: Vec<String>,
    events: tokio::sync::mpsc::UnboundedReceiver<crate::worker::WorkerEvent>,
    log: CompletionLog,
) -> Result<TextCompletion, ApiError> {
    let states = collect_choices(meta, events, log).await?;
    let completion_tokens = states.iter().map(|c| c.completion_tokens).sum();
    let choices = states
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let echo = echoes.get(index).map_or("", String::as_str);
            let mut offset = echo.chars().count();
            let logprobs = meta.logprobs.then(|| {
                let tokenizer = meta.engine.tokenizer();
                let mut lp = prompt_logprobs(tokenizer, &c.prompt_logprobs, echo);
                lp.append(TextLogprobs::from_entries(&c.logprobs, &mut offset));
                lp
            });
            TextChoice {
                index,
                text: format!("{echo}{}", c.text),
                logprobs,
                finish_reason: Some(c.finish.unwrap_or(FinishReason::Stop)),
                content_filter_results: meta
                    .filter
                    .as_ref()
                    .map(|_| c.filter_results.unwrap_or_default()),
            }
        })
        .collect();
    Ok(TextCompletion {
        id: meta.id.clone(),
        object: TextCompletion::OBJECT,
        created: meta.created,
        model: meta.model.clone(),
        prompt_filter_results: meta.prompt_filter_results(),
        choices,
        usage: Some(Some(meta.usage(completion_tokens))),
    })
}

/// The events of a streamed text completion: each a [`TextCompletion`] with the text to append;
/// with `echo`, a choice's first event holds its prompt (with `logprobs`, once the prompt is
/// scored, with its tokens' log-probabilities).
struct TextEvents {
    /// Per choice, its prompt's text (empty without `echo`).
    echoes: Vec<String>,
    /// Per choice, where its next token's text starts, in characters.
    offsets: Vec<usize>,
    /// `echo` with `logprobs`: the prompt goes out when its scores come.
    scored: bool,
}

impl TextEvents {
    fn new(echoes: Vec<String>, choices: usize, scored: bool) -> Self {
        let offsets =
            (0..choices).map(|i| echoes.get(i).map_or(0, |e| e.chars().count())).collect();
        TextEvents { echoes, offsets, scored }
    }
}

impl StreamShape for TextEvents {
    type Choice = TextChoice;
    type Event = TextCompletion;

    fn opening(&mut self, index: usize) -> Option<TextChoice> {
        if self.scored {
            return None;
        }
        let echo = self.echoes.get_mut(index).filter(|e| !e.is_empty())?;
        Some(TextChoice {
            index,
            text: std::mem::take(echo),
            logprobs: None,
            finish_reason: None,
            content_filter_results: None,
        })
    }

    fn prompt_scored(
        &mut self,
        index: usize,
        meta: &ResponseMeta,
        scores: &[GeneratedToken],
    ) -> Option<TextChoice> {
        let echo = std::mem::take(self.echoes.get_mut(index)?);
        let logprobs = prompt_logprobs(meta.engine.tokenizer(), scores, &echo);
        Some(TextChoice {
            index,
            text: echo,
            logprobs: Some(logprobs),
            finish_reason: None,
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
    ) -> TextChoice {
        let logprobs =
            logprobs.map(|entries| TextLogprobs::from_entries(&entries, &mut self.offsets[index]));
        TextChoice { index, text, logprobs, finish_reason, content_filter_results }
    }

    fn event(
        &self,
        meta: &ResponseMeta,
        prompt_filter_results: Option<Vec<PromptFilterResult>>,
        choices: Vec<TextChoice>,
        usage: Option<Option<Usage>>,
    ) -> TextCompletion {
        TextCompletion {
            id: meta.id.clone(),
            object: TextCompletion::OBJECT,
            created: meta.created,
            model: meta.model.clone(),
            prompt_filter_results,
            choices,
            usage,
        }
    }
}
