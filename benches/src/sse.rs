//! A streaming chat request timed from the client's side: when each piece of text arrived, and
//! the usage the server reported. Shared by the server-overhead benchmark and the load generator.

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// What one streamed answer looked like to its client.
#[derive(Debug, Clone, Default)]
pub struct StreamTimings {
    /// Request start to the first non-empty content delta.
    pub ttft: Duration,
    /// Between consecutive content deltas.
    pub gaps: Vec<Duration>,
    /// Content deltas received.
    pub texts: usize,
    /// `usage.completion_tokens`, when a chunk carried it.
    pub completion_tokens: Option<u64>,
    /// Request start to `[DONE]`.
    pub total: Duration,
}

/// Times the arrival of text events, starting at [`ArrivalClock::start`].
#[derive(Debug)]
pub struct ArrivalClock {
    start: Instant,
    last: Option<Instant>,
    timings: StreamTimings,
}

impl ArrivalClock {
    /// Starts the clock now.
    pub fn start() -> Self {
        ArrivalClock { start: Instant::now(), last: None, timings: StreamTimings::default() }
    }

    /// Notes that a piece of text arrived now.
    pub fn text(&mut self) {
        let now = Instant::now();
        match self.last {
            None => self.timings.ttft = now - self.start,
            Some(last) => self.timings.gaps.push(now - last),
        }
        self.last = Some(now);
        self.timings.texts += 1;
    }

    /// The timings so far, with the total measured now.
    pub fn finish(mut self) -> StreamTimings {
        self.timings.total = self.start.elapsed();
        self.timings
    }
}

/// POSTs `body` (which must ask for `"stream": true`) to `url` and reads the server-sent events
/// to `[DONE]`, timing every content delta.
pub fn stream_chat(
    client: &reqwest::blocking::Client,
    url: &str,
    api_key: Option<&str>,
    body: &Value,
) -> Result<StreamTimings> {
    let mut clock = ArrivalClock::start();
    let mut req = client.post(url).json(body);
    if let Some(key) = api_key {
        req = req.bearer_auth(key);
    }
    let mut res = req.send().with_context(|| format!("POST {url}"))?;
    if !res.status().is_success() {
        bail!("HTTP {}: {}", res.status(), res.text().unwrap_or_default());
    }
    let mut pending = Vec::new();
    let mut buf = [0u8; 8192];
    let mut usage = None;
    loop {
        let k = res.read(&mut buf)?;
        if k == 0 {
            bail!("the stream ended without [DONE]");
        }
        pending.extend_from_slice(&buf[..k]);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let data = std::str::from_utf8(&event)?.trim_end().trim_start_matches("data: ");
            if data == "[DONE]" {
                let mut timings = clock.finish();
                timings.completion_tokens = usage;
                return Ok(timings);
            }
            let chunk: Value = serde_json::from_str(data).context("an SSE event")?;
            if let Some(error) = chunk.get("error") {
                bail!("the stream failed: {error}");
            }
            if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
                usage = Some(n);
            }
            let content = chunk["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            if !content.is_empty() {
                clock.text();
            }
        }
    }
}

/// The `p`-th percentile (0-100, nearest rank) of `xs` in milliseconds; 0 for none.
pub fn percentile_ms(xs: &mut [Duration], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort();
    let i = ((xs.len() - 1) as f64 * p / 100.0).round() as usize;
    xs[i].as_secs_f64() * 1e3
}
