//! `GET /metrics` in the Prometheus text format (version 0.0.4), written by hand: a handful of
//! counters, gauges and fixed-bucket histograms needs no client library.
//!
//! Counted here: requests by route and status (from [`crate::request_log::access_log`]), prompt
//! and generated tokens, finish reasons, and the histograms of time to first token, time per
//! output token and request latency (from [`crate::request_log::CompletionLog`]). The gauges
//! (queue length, running requests and sequences, KV-cache bytes) are read from the worker's
//! live counts when the page is rendered.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use phi_engine::engine::SamplingStats;
use phi_engine::prefix_cache::PrefixCacheStats;

use crate::worker::WorkerStats;

/// Upper bounds (seconds) of the time-to-first-token and request-latency buckets.
const LATENCY_BUCKETS: [f64; 14] =
    [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0];
/// Upper bounds (seconds) of the time-per-output-token buckets.
const TOKEN_BUCKETS: [f64; 12] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2];

/// A histogram with fixed buckets; observations are counted in microseconds.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, then the `+Inf` bucket (not cumulative; summed when rendered).
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.iter().position(|&b| secs <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = self.bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// Everything `/metrics` reports that is counted as it happens.
#[derive(Debug)]
pub struct Metrics {
    /// `(route, status)` -> requests.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// finish reason -> choices.
    finishes: Mutex<BTreeMap<&'static str, u64>>,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    ttft: Histogram,
    per_token: Histogram,
    latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            finishes: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            ttft: Histogram::new(&LATENCY_BUCKETS),
            per_token: Histogram::new(&TOKEN_BUCKETS),
            latency: Histogram::new(&LATENCY_BUCKETS),
        }
    }
}

/// What one finished (or abandoned) chat completion contributes.
#[derive(Debug, Clone, Copy)]
pub struct CompletionSample {
    /// Prompt tokens (once per request, whatever `n`).
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// Request start to the first text.
    pub ttft: Option<Duration>,
    /// Request start to the end of the answer.
    pub latency: Duration,
}

impl Metrics {
    /// Counts one response. `route` is the matched route (never a raw path, so that unknown
    /// paths cannot grow the label set).
    pub fn request(&self, route: &str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((route.to_string(), status)).or_default() += 1;
    }

    /// Counts one chat completion and each choice's finish reason.
    pub fn completion(&self, sample: CompletionSample, finishes: &[&'static str]) {
        self.prompt_tokens.fetch_add(sample.prompt_tokens as u64, Ordering::Relaxed);
        self.generated_tokens.fetch_add(sample.completion_tokens as u64, Ordering::Relaxed);
        if let Some(ttft) = sample.ttft {
            self.ttft.observe(ttft);
            // Time per output token after the first, over all choices of the request.
            if sample.completion_tokens > 1 {
                let decode = sample.latency.saturating_sub(ttft);
                self.per_token.observe(decode / (sample.completion_tokens as u32 - 1));
            }
        }
        self.latency.observe(sample.latency);
        let mut map = self.finishes.lock().unwrap_or_else(|e| e.into_inner());
        for f in finishes {
            *map.entry(f).or_default() += 1;
        }
    }

    /// The exposition text, with the worker's live gauges and the engine's prefix cache and
    /// sampling counts.
    pub fn render(
        &self,
        worker: &WorkerStats,
        draining: bool,
        prefix: Option<PrefixCacheStats>,
        sampled: SamplingStats,
    ) -> String {
        let mut out = String::new();
        if let Some(p) = prefix {
            for (name, help, kind, v) in [
                ("hits_total", "Prompts that reused a cached prefix.", "counter", p.hits),
                ("misses_total", "Prompts that found no prefix to reuse.", "counter", p.misses),
                (
                    "reused_tokens_total",
                    "Prompt tokens reused instead of computed.",
                    "counter",
                    p.reused_tokens,
                ),
                ("entries", "Finished sequences held for reuse.", "gauge", p.entries as u64),
                ("bytes", "Bytes of keys and values held for reuse.", "gauge", p.bytes as u64),
            ] {
                let name = format!("phi_serve_prefix_cache_{name}");
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
            }
        }
        let gauges = [
            ("queue_length", "Requests waiting for a place in the batch.", worker.queued()),
            ("queued_prompt_tokens", "Prompt tokens of the waiting requests.", worker.queued_tokens()),
            (
                "running_requests",
                "Requests in the batch (or preempted from it, waiting to resume).",
                worker.running(),
            ),
            (
                "preempted_requests",
                "Requests whose KV blocks were given to others, waiting to resume.",
                worker.preempted(),
            ),
            ("running_sequences", "Sequences (choices) stepped together.", worker.running_sequences()),
            (
                "kv_cache_bytes",
                "Bytes of KV-pool blocks held by the running sequences (shared blocks counted by each).",
                worker.cache_bytes(),
            ),
            ("kv_cache_budget_tokens", "Token positions of the KV pool.", worker.budget_tokens()),
            ("kv_cache_blocks_total", "Blocks of the KV pool (16 positions each).", worker.blocks_total()),
            ("kv_cache_blocks_used", "KV-pool blocks held by sequences.", worker.blocks_used()),
            ("kv_cache_blocks_free", "KV-pool blocks no one holds.", worker.blocks_free()),
            (
                "kv_cache_blocks_cached",
                "KV-pool blocks held only by the prefix cache (given up when sequences need them).",
                worker.blocks_cached(),
            ),
            ("draining", "1 after SIGTERM, while running requests finish.", usize::from(draining)),
        ];
        for (name, help, value) in gauges {
            let name = format!("phi_serve_{name}");
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }

        let preemptions = worker.preemptions();
        let name = "phi_serve_preemptions_total";
        let help = "Requests taken out of the batch to free KV blocks (recomputed later).";
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {preemptions}");
        let shared = worker.shared_prompt_tokens();
        let name = "phi_serve_shared_prompt_tokens_total";
        let help = "Prompt tokens taken from another running sequence instead of computed.";
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {shared}");
        let name = "phi_serve_sampled_tokens_total";
        let help = "Tokens picked from the logits: on the device that holds them (a GPU's \
                    sampling kernels), or on the host (the CPU, and rows a GPU leaves to it).";
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{on=\"device\"}} {}\n\
             {name}{{on=\"host\"}} {}",
            sampled.on_device, sampled.on_host
        );
        let _ = writeln!(
            out,
            "# HELP phi_serve_requests_total HTTP responses by route and status.\n\
             # TYPE phi_serve_requests_total counter"
        );
        for ((route, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                out,
                "phi_serve_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        let _ = writeln!(
            out,
            "# HELP phi_serve_finish_reason_total Choices by how they ended.\n\
             # TYPE phi_serve_finish_reason_total counter"
        );
        for (reason, n) in self.finishes.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "phi_serve_finish_reason_total{{reason=\"{reason}\"}} {n}");
        }
        for (name, help, v) in [
            (
                "phi_serve_prompt_tokens_total",
                "Prompt tokens of chat completions.",
                &self.prompt_tokens,
            ),
            ("phi_serve_generated_tokens_total", "Tokens generated.", &self.generated_tokens),
        ] {
            let v = v.load(Ordering::Relaxed);
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        self.ttft.render(
            &mut out,
            "phi_serve_time_to_first_token_seconds",
            "Request arrival to the first generated text.",
        );
        self.per_token.render(
            &mut out,
            "phi_serve_time_per_output_token_seconds",
            "Mean time between generated tokens after the first, per request.",
        );
        self.latency.render(
            &mut out,
            "phi_serve_request_latency_seconds",
            "Chat completion request arrival to its last byte.",
        );
        out
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&TOKEN_BUCKETS);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"3.2\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n") && out.contains("x_sum 10.0035\n"), "{out}");
    }

    #[test]
    fn requests_and_completions_are_counted() {
        let m = Metrics::default();
        m.request("/v1/chat/completions", 200);
        m.request("/v1/chat/completions", 200);
        m.request("unmatched", 404);
        let sample = CompletionSample {
            prompt_tokens: 5,
            completion_tokens: 11,
            ttft: Some(Duration::from_millis(40)),
            latency: Duration::from_millis(240),
        };
        m.completion(sample, &["stop", "length"]);
        let prefix = PrefixCacheStats { hits: 3, reused_tokens: 120, ..Default::default() };
        let sampled = SamplingStats { on_device: 7, on_host: 2 };
        let text = m.render(&WorkerStats::default(), false, Some(prefix), sampled);
        assert!(text.contains("phi_serve_sampled_tokens_total{on=\"device\"} 7\n"));
        assert!(text.contains("phi_serve_sampled_tokens_total{on=\"host\"} 2\n"));
        assert!(text.contains("phi_serve_prefix_cache_hits_total 3\n"));
        assert!(text.contains("phi_serve_prefix_cache_reused_tokens_total 120\n"));
        assert!(text.contains(
            "phi_serve_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 2\n"
        ));
        assert!(text.contains("phi_serve_requests_total{route=\"unmatched\",status=\"404\"} 1\n"));
        assert!(text.contains("phi_serve_prompt_tokens_total 5\n"));
        assert!(text.contains("phi_serve_generated_tokens_total 11\n"));
        assert!(text.contains("phi_serve_finish_reason_total{reason=\"length\"} 1\n"));
        // 200 ms over 10 tokens: 20 ms per token, in the 25 ms bucket.
        assert!(text.contains("phi_serve_time_per_output_token_seconds_bucket{le=\"0.01\"} 0\n"));
        assert!(text.contains("phi_serve_time_per_output_token_seconds_bucket{le=\"0.025\"} 1\n"));
        assert!(text.contains("phi_serve_queue_length 0\n"));
        assert!(text.contains("phi_serve_draining 0\n"));
    }
}
