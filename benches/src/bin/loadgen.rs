//! `loadgen`: a load generator for a running phi-serve (or any OpenAI-compatible server).
//!
//! For each concurrency level it keeps that many streaming chat requests in flight (one client
//! thread each) until the level's requests are done, and reports requests/s, output tokens/s,
//! time to first token and inter-token latency (p50, p99). Prompts are English-like text of
//! varying length, and each request asks for a number of tokens drawn from a range, both from a
//! fixed seed, so every run sends the same requests.
//!
//! All clients start at once, so every level begins with a burst of `concurrency` prompts that
//! queue for prefill together. Time to first token is reported over all requests and, as
//! "steady", over the requests each client sends after its first: those arrive when an earlier
//! one finishes, as requests to a busy endpoint do, and their TTFT p99 is the figure compared
//! with a lone request's TTFT (`p99/lone`).
//!
//! ```text
//! cargo run --release -p phi-serve-benches --bin loadgen -- \
//!     --url http://127.0.0.1:8080 --concurrency 1,4,16,64
//! ```
//!
//! `benches/load.sh` starts a server on a Phi-3-shaped random-weight model and runs this.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use phi_serve_benches::sse::{percentile_ms, stream_chat, StreamTimings};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

/// Sends concurrent streaming chat requests to a server and reports throughput and latency.
#[derive(Debug, Parser)]
struct Args {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API key, sent as `Authorization: Bearer`.
    #[arg(long, env = "PHI_SERVE_API_KEY")]
    api_key: Option<String>,
    /// Concurrency levels to sweep, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Requests per level (default: 3 per concurrent client, at least 4).
    #[arg(long)]
    requests: Option<usize>,
    /// Tokens to generate per request (`max_tokens`): one number, or the shortest and longest
    /// of a uniform range (`32,96`).
    #[arg(long, value_delimiter = ',', default_value = "32,96")]
    max_tokens: Vec<usize>,
    /// Shortest and longest prompt, in words (about 1.3 tokens each).
    #[arg(long, value_delimiter = ',', default_value = "24,96")]
    prompt_words: Vec<usize>,
    /// Seed of the prompts.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// The requests' `temperature` (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// The requests' `top_p`.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
}

/// Words the prompts are made of.
const WORDS: &[&str] = &[
    "the",
    "model",
    "server",
    "answers",
    "a",
    "question",
    "about",
    "weather",
    "in",
    "Paris",
    "please",
    "explain",
    "why",
    "memory",
    "bandwidth",
    "limits",
    "decode",
    "speed",
    "on",
    "CPUs",
    "write",
    "short",
    "poem",
    "river",
    "mountain",
    "and",
    "city",
    "lights",
    "summarize",
    "this",
    "report",
    "for",
    "an",
    "engineer",
    "who",
    "runs",
    "online",
    "endpoints",
    "with",
    "many",
    "users",
    "at",
    "once",
    "compare",
    "two",
    "ways",
    "to",
    "cache",
    "keys",
    "values",
    "list",
    "three",
    "ideas",
    "improve",
    "latency",
    "tell",
    "me",
    "story",
    "lighthouse",
    "keeper",
];

fn prompt(rng: &mut ChaCha8Rng, min: usize, max: usize) -> String {
    let span = (max - min + 1) as u64;
    let n = min + (rng.next_u64() % span) as usize;
    let words: Vec<&str> =
        (0..n).map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize]).collect();
    words.join(" ")
}

/// The results of one concurrency level.
struct Level {
    concurrency: usize,
    /// Each finished request, and whether it was its client's first.
    runs: Vec<(StreamTimings, bool)>,
    failures: usize,
    wall: Duration,
}

impl Level {
    fn output_tokens(&self) -> u64 {
        self.runs.iter().map(|(r, _)| r.completion_tokens.unwrap_or(r.texts as u64)).sum()
    }
}

fn run_level(args: &Args, concurrency: usize, bodies: &[Value]) -> Level {
    let url = format!("{}/v1/chat/completions", args.url.trim_end_matches('/'));
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    let failures = AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..concurrency {
            scope.spawn(|| {
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(3600))
                    .build()
                    .expect("an HTTP client");
                let mut first = true;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    let sent_first = std::mem::replace(&mut first, false);
                    match stream_chat(&client, &url, args.api_key.as_deref(), body) {
                        Ok(t) => results.lock().unwrap().push((t, sent_first)),
                        Err(e) => {
                            eprintln!("request {i} failed: {e:#}");
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    Level {
        concurrency,
        runs: results.into_inner().unwrap(),
        failures: failures.into_inner(),
        wall: start.elapsed(),
    }
}

fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let [min_words, max_words] = args.prompt_words[..] else {
        bail!("--prompt-words takes two numbers: shortest,longest");
    };
    if min_words == 0 || min_words > max_words {
        bail!("--prompt-words {min_words},{max_words}: need 1 <= shortest <= longest");
    }
    let (min_out, max_out) = match args.max_tokens[..] {
        [n] => (n, n),
        [a, b] => (a, b),
        _ => bail!("--max-tokens takes one number or two: shortest,longest"),
    };
    if min_out == 0 || min_out > max_out {
        bail!("--max-tokens {min_out},{max_out}: need 1 <= shortest <= longest");
    }
    let mut levels = Vec::new();
    for &c in &args.concurrency {
        if c == 0 {
            bail!("a concurrency level must be at least 1");
        }
        let n = args.requests.unwrap_or((3 * c).max(4));
        // The same seed for every level: level k's requests are a prefix of level k+1's.
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
        let bodies: Vec<Value> = (0..n)
            .map(|_| {
                let content = prompt(&mut rng, min_words, max_words);
                let max_tokens =
                    min_out + (rng.next_u64() % (max_out - min_out + 1) as u64) as usize;
                json!({"model": "phi", "stream": true, "stream_options": {"include_usage": true},
                       "temperature": args.temperature, "top_p": args.top_p,
                       "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": content}]})
            })
            .collect();
        eprintln!("concurrency {c}: {n} requests ...");
        let level = run_level(&args, c, &bodies);
        eprintln!("  done in {:.1} s", level.wall.as_secs_f64());
        levels.push(level);
    }

    println!(
        "\nload: {} , max_tokens {min_out}-{max_out}, prompts of {min_words}-{max_words} words, streaming",
        args.url
    );
    println!(
        "{:>5} {:>5} {:>4} {:>8} {:>10} {:>7} {:>10} {:>10} {:>12} {:>9} {:>9} {:>10}",
        "conc",
        "reqs",
        "fail",
        "req/s",
        "out tok/s",
        "vs c=1",
        "ttft p50",
        "ttft p99",
        "steady p99",
        "itl p50",
        "itl p99",
        "p99/lone"
    );
    let base_tps = levels.first().map(|l| l.output_tokens() as f64 / l.wall.as_secs_f64());
    let mut lone_ttft = None;
    for l in &levels {
        let secs = l.wall.as_secs_f64();
        let tps = l.output_tokens() as f64 / secs;
        let mut ttft: Vec<Duration> = l.runs.iter().map(|(r, _)| r.ttft).collect();
        let mut steady: Vec<Duration> =
            l.runs.iter().filter(|(_, first)| !first).map(|(r, _)| r.ttft).collect();
        let mut itl: Vec<Duration> =
            l.runs.iter().flat_map(|(r, _)| r.gaps.iter().copied()).collect();
        let (t50, t99) = (percentile_ms(&mut ttft, 50.0), percentile_ms(&mut ttft, 99.0));
        let s99 = (!steady.is_empty()).then(|| percentile_ms(&mut steady, 99.0));
        if l.concurrency == 1 {
            lone_ttft = Some(t50);
        }
        println!(
            "{:>5} {:>5} {:>4} {:>8.2} {:>10.1} {:>6.2}x {:>7.0} ms {:>7.0} ms {:>12} {:>6.0} ms {:>6.0} ms {:>9}",
            l.concurrency,
            l.runs.len(),
            l.failures,
            l.runs.len() as f64 / secs,
            tps,
            base_tps.map_or(0.0, |b| tps / b),
            t50,
            t99,
            s99.map_or("-".to_string(), |s| format!("{s:.0} ms")),
            percentile_ms(&mut itl, 50.0),
            percentile_ms(&mut itl, 99.0),
            match (lone_ttft, s99) {
                (Some(lone), Some(s)) => format!("{:.2}x", s / lone),
                _ => "-".to_string(),
            },
        );
    }
    println!(
        "(vs c=1: output tokens/s over the first level's; steady p99: TTFT p99 of the requests \
         sent after each client's first; p99/lone: steady p99 over the c=1 TTFT p50)"
    );
    if levels.iter().any(|l| l.failures > 0) {
        bail!("some requests failed");
    }
    Ok(())
}
