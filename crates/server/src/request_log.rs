//! One structured log line per request (target `phi_server::access`, level `info`): request id,
//! method, path, status and duration for every request, and for a chat completion also its token
//! counts (prompt tokens served by the prefix cache included),
//! time to first token and how it ended. The line of a completion is written when the answer is
//! complete (for a stream: after its last event, or when the client went away), so it is written
//! by the answer's builder, and [`access_log`] writes the line of every other response.
//! Both run inside the request's span, which carries the request id.

use std::time::{Duration, Instant};

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use phi_api::FinishReason;

use crate::metrics::{CompletionSample, Metrics};
use crate::request_id::RequestId;
use crate::state::AppState;

/// Marks a response whose log line its answer's builder writes ([`CompletionLog`]).
#[derive(Debug, Clone, Copy)]
pub struct LoggedByCompletion;

/// Middleware: counts every response in the metrics, and writes the log line of every response
/// not marked [`LoggedByCompletion`].
pub async fn access_log(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // The route, not the path, labels the metrics: unknown paths must not grow the label set.
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string());
    let id = req.extensions().get::<RequestId>().cloned();
    let res = next.run(req).await;
    state.metrics().request(route.as_deref().unwrap_or("unmatched"), res.status().as_u16());
    if res.extensions().get::<LoggedByCompletion>().is_none() {
        tracing::info!(
            target: "phi_server::access",
            request_id = id.as_ref().map(RequestId::as_str),
            %method,
            path,
            status = res.status().as_u16(),
            duration_ms = millis(started.elapsed()),
            error_code = res.headers().get("x-ms-error-code").and_then(|v| v.to_str().ok()),
            "request"
        );
    }
    res
}

/// Timings and counts of one chat completion, from the moment its request arrived; its log line
/// is written when it is dropped, which is when the answer is complete or the client went away.
#[derive(Debug)]
pub struct CompletionLog {
    started: Instant,
    id: Option<RequestId>,
    path: &'static str,
    stream: bool,
    prompt_tokens: usize,
    cached_tokens: usize,
    first_text: Option<Duration>,
    /// Per choice: tokens so far and how it ended (`None` while it runs).
    choices: Vec<(usize, Option<FinishReason>)>,
    span: tracing::Span,
    /// Cleared when the answer became an error response, which [`access_log`] logs.
    enabled: bool,
    /// Set when the engine failed after the stream began: unfinished choices say `error`.
    failed: bool,
    /// Where the completion is counted, when the server keeps metrics.
    metrics: Option<Arc<Metrics>>,
}

impl CompletionLog {
    /// Starts the log of a request on `path` that arrived at `started`.
    pub fn start(
        id: Option<RequestId>,
        path: &'static str,
        stream: bool,
        started: Instant,
        prompt_tokens: usize,
        n: usize,
    ) -> Self {
        CompletionLog {
            started,
            id,
            path,
            stream,
            prompt_tokens,
            cached_tokens: 0,
            first_text: None,
            choices: vec![(0, None); n],
            span: tracing::Span::current(),
            enabled: true,
            failed: false,
            metrics: None,
        }
    }

    /// Notes how many prompt tokens the prefix cache served.
    pub fn with_cached_tokens(mut self, cached_tokens: usize) -> Self {
        self.cached_tokens = cached_tokens;
        self
    }

    /// Counts the completion in `metrics` too.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The engine failed after a stream's headers went out: unfinished choices are logged as
    /// `error` rather than as the client's disconnection.
    pub fn engine_failed(&mut self) {
        self.failed = true;
    }

    /// Writes no line: the answer became an error response, which [`access_log`] logs.
    pub fn discard(&mut self) {
        self.enabled = false;
    }

    /// Records a choice's progress: its tokens so far, whether this step produced text (the
    /// first that does fixes the time to first token), and its finish reason once it has one.
    pub fn update(
        &mut self,
        choice: usize,
        tokens: usize,
        produced_text: bool,
        finish: Option<FinishReason>,
    ) {
        if produced_text && self.first_text.is_none() {
            self.first_text = Some(self.started.elapsed());
        }
        if let Some(c) = self.choices.get_mut(choice) {
            *c = (tokens, finish);
        }
    }
}

impl Drop for CompletionLog {
    fn drop(&mut self) {
        if !self.enabled {
            return;
        }
        let elapsed = self.started.elapsed();
        let completion_tokens: usize = self.choices.iter().map(|c| c.0).sum();
        let finish: Vec<&'static str> = self
            .choices
            .iter()
            .map(|c| match c.1 {
                Some(f) => f.as_str(),
                None if self.failed => "error",
                None => "client_disconnected",
            })
            .collect();
        let decode = self.first_text.map(|t| elapsed.saturating_sub(t));
        let tokens_per_s = decode
            .filter(|d| !d.is_zero() && completion_tokens > 1)
            .map(|d| ((completion_tokens - 1) as f64 / d.as_secs_f64() * 10.0).round() / 10.0);
        if let Some(metrics) = &self.metrics {
            let sample = CompletionSample {
                prompt_tokens: self.prompt_tokens,
                completion_tokens,
                ttft: self.first_text,
                latency: elapsed,
            };
            metrics.completion(sample, &finish);
        }
        let _entered = self.span.enter();
        tracing::info!(
            target: "phi_server::access",
            request_id = self.id.as_ref().map(RequestId::as_str),
            method = "POST",
            path = self.path,
            status = 200u16,
            stream = self.stream,
            prompt_tokens = self.prompt_tokens,
            cached_tokens = self.cached_tokens,
            completion_tokens,
            finish_reason = finish.join(","),
            ttft_ms = self.first_text.map(millis),
            duration_ms = millis(elapsed),
            tokens_per_s,
            "request"
        );
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}
