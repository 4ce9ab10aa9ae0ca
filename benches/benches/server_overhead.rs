//! The server's own overhead: the same greedy chat request measured three ways, side by side in
//! one run, on the same loaded engine:
//!
//! - `engine`: the prompt rendered and tokenized, then the sequence stepped directly (no threads,
//!   no channels): what the model itself costs;
//! - `worker`: submitted to the engine worker thread the server uses (batching loop, channel);
//! - `http`: `POST /v1/chat/completions` with `"stream": true` to the real router (axum, auth,
//!   validation, SSE) served on loopback in this process, read by a blocking HTTP client.
//!
//! For each it reports the time to first token (request start to the first text) and the
//! inter-token latency (between consecutive texts), p50 and p99, and the difference to `engine`.
//! The three are interleaved, one request of each in turn, so that machine noise hits them alike.
//!
//! ```text
//! cargo bench -p phi-serve-benches --bench server_overhead            # 30 requests each
//! PHI_BENCH_SERVER_MODEL=438m cargo bench -p phi-serve-benches --bench server_overhead
//! ```
//!
//! The default model is the tiny random-weight spec (vocabulary 32064, 2 layers), whose step
//! takes a few milliseconds, so the overhead is not lost in the model's own time; `438m` uses the
//! benchmark model of `forward.rs`. Without `--bench` (as `cargo test --benches` runs it) it does
//! two requests of each, as a smoke test.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use phi_engine::chat_template::ChatMessage;
use phi_engine::checkpoint::ModelSource;
use phi_engine::engine::{Engine, GenerateOptions, LoadOptions};
use phi_engine::sampling::SamplingParams;
use phi_serve_benches::sse::{percentile_ms, stream_chat, ArrivalClock, StreamTimings};
use phi_serve_benches::{ensure_bench_model, BenchModelSpec};
use phi_server::worker::{Job, WorkerConfig, WorkerEvent, WorkerHandle};
use phi_server::{AppState, ServerConfig};
use serde_json::json;

const PROMPT: &str = "Write a short story about a lighthouse keeper and the storm.";
const MAX_TOKENS: usize = 32;

fn options() -> GenerateOptions {
    GenerateOptions {
        sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
        max_tokens: Some(MAX_TOKENS),
        ..GenerateOptions::default()
    }
}

fn engine_direct(engine: &Engine) -> Result<StreamTimings> {
    let mut clock = ArrivalClock::start();
    let ids = engine.encode_chat(&[ChatMessage::user(PROMPT)])?.ids;
    let mut seq = engine.new_sequence(&ids, &options())?;
    while !seq.is_finished() {
        let out = engine.step(&mut [&mut seq])?.remove(0);
        if !out.text.is_empty() {
            clock.text();
        }
    }
    Ok(clock.finish())
}

fn through_worker(engine: &Engine, worker: &WorkerHandle) -> Result<StreamTimings> {
    let mut clock = ArrivalClock::start();
    let ids = engine.encode_chat(&[ChatMessage::user(PROMPT)])?.ids;
    let (job, mut rx) = Job::new(vec![engine.new_sequence(&ids, &options())?]);
    worker.submit(job).map_err(|e| anyhow::anyhow!("submit: {e:?}"))?;
    while let Some(event) = rx.blocking_recv() {
        match event {
            WorkerEvent::Step { output, .. } => {
                if !output.text.is_empty() {
                    clock.text();
                }
                if output.finish_reason.is_some() {
                    break;
                }
            }
            WorkerEvent::Failed(m) => bail!("engine failed: {m}"),
            WorkerEvent::Expired => bail!("expired without a deadline"),
        }
    }
    Ok(clock.finish())
}

fn through_http(client: &reqwest::blocking::Client, url: &str) -> Result<StreamTimings> {
    let body = json!({"messages": [{"role": "user", "content": PROMPT}],
                      "max_tokens": MAX_TOKENS, "temperature": 0, "stream": true});
    stream_chat(client, url, None, &body)
}

fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let requests = if full { 30 } else { 2 };
    let spec = match std::env::var("PHI_BENCH_SERVER_MODEL").as_deref() {
        Ok("438m") => BenchModelSpec::phi3_438m(),
        Ok("tiny") | Err(_) => BenchModelSpec::tiny(),
        Ok(other) => bail!("PHI_BENCH_SERVER_MODEL={other}: use tiny or 438m"),
    };
    let dir = ensure_bench_model(&spec)?;
    let source = ModelSource::parse(dir.to_str().context("model path is not UTF-8")?, None)?;
    let engine = Arc::new(Engine::load(&source, &LoadOptions::default())?);

    let worker = WorkerHandle::spawn(engine.clone(), WorkerConfig::default())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let state = AppState::new(engine.clone(), ServerConfig::new("bench"))?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let url = format!("http://{}/v1/chat/completions", listener.local_addr()?);
    runtime.spawn(phi_server::serve(listener, state, std::future::pending()));
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(600)).build()?;

    // One of each first, unmeasured: page in the weights, warm the allocator and the connection.
    engine_direct(&engine)?;
    through_worker(&engine, &worker)?;
    through_http(&client, &url)?;

    let mut runs: [Vec<StreamTimings>; 3] = Default::default();
    for _ in 0..requests {
        runs[0].push(engine_direct(&engine)?);
        runs[1].push(through_worker(&engine, &worker)?);
        runs[2].push(through_http(&client, &url)?);
    }
    let texts: Vec<usize> = runs.iter().map(|r| r[0].texts).collect();
    if texts.iter().any(|&t| t != texts[0]) {
        bail!("the three paths produced different numbers of texts: {texts:?}");
    }

    println!(
        "\nserver overhead: model {} ({:.1}M parameters), {requests} requests of each path, \
         {MAX_TOKENS} tokens max ({} texts each), f32 on CPU",
        spec.name,
        spec.num_parameters() as f64 / 1e6,
        texts[0]
    );
    println!(
        "{:<8} {:>12} {:>12} {:>14} {:>14} {:>16} {:>16}",
        "path",
        "ttft p50",
        "ttft p99",
        "inter-tok p50",
        "inter-tok p99",
        "ttft overhead",
        "inter overhead"
    );
    let mut base = (0.0, 0.0);
    for (name, rs) in ["engine", "worker", "http"].iter().zip(&runs) {
        let mut ttft: Vec<Duration> = rs.iter().map(|r| r.ttft).collect();
        let mut gaps: Vec<Duration> = rs.iter().flat_map(|r| r.gaps.iter().copied()).collect();
        let (t50, t99) = (percentile_ms(&mut ttft, 50.0), percentile_ms(&mut ttft, 99.0));
        let (g50, g99) = (percentile_ms(&mut gaps, 50.0), percentile_ms(&mut gaps, 99.0));
        if *name == "engine" {
            base = (t50, g50);
        }
        println!(
            "{name:<8} {t50:>9.2} ms {t99:>9.2} ms {g50:>11.3} ms {g99:>11.3} ms {:>+10.2} ms {:>4.2}x {:>+9.3} ms {:>4.2}x",
            t50 - base.0,
            t50 / base.0,
            g50 - base.1,
            g50 / base.1,
        );
    }
    println!("(overheads: p50 minus the engine's p50, and the ratio to it)");
    Ok(())
}
