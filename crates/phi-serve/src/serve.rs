//! `phi-serve serve`: load a model and serve the Azure AI Model Inference and OpenAI chat APIs
//! over HTTP.
//!
//! API keys come from `--api-key` (repeatable), `--api-key-file` (one per line) and the
//! environment variable `PHI_SERVE_API_KEYS` (comma-separated), all of them valid at once so a
//! key can be rotated without a restart window. The server refuses to listen beyond loopback
//! without a key unless told `--allow-unauthenticated`. Once listening it prints
//! `phi-serve listening on http://ADDR` on stdout, so callers that pass `--port 0` learn the port.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use phi_engine::engine::Engine;
use phi_server::content_filter::{BlocklistFilter, ContentFilter};
use phi_server::http_filter::HttpFilter;
use phi_server::loading::LoadingGate;
use phi_server::{AppState, ServerConfig, WorkerConfig};

use crate::memory::available_memory;
use crate::options::ModelArgs;

/// Environment variable with comma-separated API keys.
const KEYS_ENV: &str = "PHI_SERVE_API_KEYS";

/// Arguments of `phi-serve serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Address to listen on. Anything but loopback requires an API key (or
    /// --allow-unauthenticated).
    #[arg(long, env = "PHI_SERVE_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 picks a free one (the bound address is printed).
    #[arg(long, env = "PHI_SERVE_PORT", default_value_t = 8080)]
    port: u16,
    /// An accepted API key (repeat for several). Prefer --api-key-file or PHI_SERVE_API_KEYS:
    /// command lines are visible to other users of the machine.
    #[arg(long = "api-key", value_name = "KEY")]
    api_keys: Vec<String>,
    /// A file of accepted API keys, one per line (blank lines and `#` comments ignored).
    #[arg(long, value_name = "FILE", env = "PHI_SERVE_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Serve without API keys on a non-loopback address.
    #[arg(long, env = "PHI_SERVE_ALLOW_UNAUTHENTICATED")]
    allow_unauthenticated: bool,
    /// Model name reported by /info and /v1/models (default: the last part of --model).
    #[arg(long, env = "PHI_SERVE_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Most sequences generated together in one batch (a request with `n` choices counts n).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..), env = "PHI_SERVE_MAX_BATCH_SIZE")]
    max_batch_size: u64,
    /// Most requests waiting for a place in the batch; more are answered 429.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..), env = "PHI_SERVE_MAX_QUEUE")]
    max_queue: u64,
    /// Most prompt tokens (over all waiting requests' choices) in the queue; a request that
    /// would pass it is answered 429, except into an empty queue. Default: no bound beyond
    /// --max-queue.
    #[arg(long, env = "PHI_SERVE_MAX_QUEUE_TOKENS", value_parser = clap::value_parser!(u64).range(1..))]
    max_queue_tokens: Option<u64>,
    /// Token positions of the KV-cache pool, allocated at start-up in blocks of 16 that
    /// sequences take as they grow (and the prefix cache keeps for reuse). A request joins the
    /// batch when the blocks for its prompt are free; when running sequences run out of blocks
    /// the newest request is preempted and recomputed later; a request that could not run alone
    /// (prompt plus max_tokens, for each choice) is answered 400. Default on CPU: 80% of the
    /// memory available (within the cgroup's memory limit, in a container) once the model is
    /// loaded, at most 64 full contexts; on CUDA: 90% of the GPU memory free then.
    #[arg(long, env = "PHI_SERVE_KV_CACHE_TOKENS", value_parser = clap::value_parser!(u64).range(1..))]
    kv_cache_tokens: Option<u64>,
    /// Longest a chat request may take from its arrival: a request still waiting for a place
    /// in the batch then is answered 503, a running one ends as if at max_tokens
    /// (finish_reason `length`, its text so far kept). Default: no limit.
    #[arg(long, env = "PHI_SERVE_REQUEST_TIMEOUT_SECS", value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout_secs: Option<u64>,
    /// After SIGTERM or Ctrl-C: seconds that running and queued requests get to finish (new
    /// ones are answered 503 and /ready turns 503 meanwhile); then the process exits.
    #[arg(long, env = "PHI_SERVE_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    shutdown_grace_secs: u64,
    /// Largest request body in bytes; larger ones are answered 413.
    #[arg(long, default_value_t = 4 << 20, env = "PHI_SERVE_MAX_BODY_BYTES")]
    max_body_bytes: usize,
    /// Content filter for prompts and answers: `none`, `blocklist` (needs
    /// --content-filter-file) or `http` (needs --content-filter-url). A blocked prompt is
    /// answered 400 `content_filter`; a blocked answer ends with finish_reason `content_filter`.
    /// With a filter, answers carry `prompt_filter_results` and `content_filter_results`
    /// annotations. A filter that cannot answer fails closed (503 for a prompt).
    #[arg(long, value_enum, default_value_t = FilterKind::None, env = "PHI_SERVE_CONTENT_FILTER")]
    content_filter: FilterKind,
    /// The blocklist (JSON: `{"threshold": "medium", "categories": {"violence": {"terms":
    /// ["word", {"term": "w2", "severity": "low"}], "patterns": [{"regex": "(?i)a\\s+b",
    /// "severity": "high"}]}}}`; categories hate, self_harm, sexual, violence).
    #[arg(long, value_name = "FILE", env = "PHI_SERVE_CONTENT_FILTER_FILE")]
    content_filter_file: Option<PathBuf>,
    /// The moderation service of `--content-filter http`: every check POSTs `{"text": ...}`
    /// there and reads back Azure AI Content Safety's `categoriesAnalysis` answer or
    /// `{"violence": {"severity": "high", "filtered": true}, ...}`.
    #[arg(long, value_name = "URL", env = "PHI_SERVE_CONTENT_FILTER_URL")]
    content_filter_url: Option<String>,
    /// Severity at which `--content-filter http` blocks a category the service did not decide.
    #[arg(long, value_name = "SEVERITY", default_value = "medium",
          value_parser = ["low", "medium", "high"], env = "PHI_SERVE_CONTENT_FILTER_THRESHOLD")]
    content_filter_threshold: String,
    /// A header sent to the moderation service, `Name: value` (repeatable), e.g.
    /// `Ocp-Apim-Subscription-Key: KEY`.
    #[arg(
        long = "content-filter-header",
        value_name = "HEADER",
        env = "PHI_SERVE_CONTENT_FILTER_HEADERS"
    )]
    content_filter_headers: Vec<String>,
    /// How long one check of the moderation service may take.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 5000,
        env = "PHI_SERVE_CONTENT_FILTER_TIMEOUT_MS"
    )]
    content_filter_timeout_ms: u64,
    /// An origin whose browser pages may call the API, e.g. `https://app.example.com`, or `*`
    /// for any (repeatable; none by default, so browsers get no cross-origin access).
    #[arg(
        long = "cors-allow-origin",
        value_name = "ORIGIN",
        env = "PHI_SERVE_CORS_ALLOW_ORIGINS",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
    /// Sleep after every engine step (testing only: makes a tiny model slow enough to observe
    /// queueing and disconnects).
    #[arg(long, hide = true, value_name = "MS")]
    step_delay_ms: Option<u64>,
    /// Wait before loading the model (testing only: makes the 503-while-loading phase
    /// observable with a tiny model).
    #[arg(long, hide = true, value_name = "MS")]
    load_delay_ms: Option<u64>,
}

/// `--content-filter` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FilterKind {
    /// No filtering and no annotations.
    None,
    /// Terms and regular expressions per category, from --content-filter-file.
    Blocklist,
    /// The operator's moderation service at --content-filter-url.
    Http,
}

/// The configured content filter.
fn content_filter(args: &ServeArgs) -> Result<Option<Arc<dyn ContentFilter>>> {
    let file = args.content_filter_file.as_deref();
    let url = args.content_filter_url.as_deref();
    if file.is_some() && args.content_filter != FilterKind::Blocklist {
        bail!("--content-filter-file needs --content-filter blocklist");
    }
    if url.is_some() && args.content_filter != FilterKind::Http {
        bail!("--content-filter-url needs --content-filter http");
    }
    match args.content_filter {
        FilterKind::None => Ok(None),
        FilterKind::Blocklist => {
            let path = file.context("--content-filter blocklist needs --content-filter-file")?;
            Ok(Some(Arc::new(BlocklistFilter::from_file(path)?)))
        }
        FilterKind::Http => {
            let url = url.context("--content-filter http needs --content-filter-url")?;
            let threshold = serde_json::from_value(args.content_filter_threshold.clone().into())
                .context("--content-filter-threshold")?;
            let filter = HttpFilter::new(
                url,
                threshold,
                &args.content_filter_headers,
                Duration::from_millis(args.content_filter_timeout_ms.max(1)),
            )?;
            Ok(Some(Arc::new(filter)))
        }
    }
}

/// Runs the subcommand until Ctrl-C or SIGTERM.
pub fn run(args: ServeArgs) -> Result<()> {
    let filter = content_filter(&args)?;
    let api_keys =
        collect_keys(&args.api_keys, args.api_key_file.as_deref(), std::env::var(KEYS_ENV).ok())?;
    let loopback = is_loopback(&args.host, args.port)?;
    if api_keys.is_empty() && !loopback {
        if !args.allow_unauthenticated {
            bail!(
                "refusing to listen on {} without an API key: pass --api-key, --api-key-file or \
                 {KEYS_ENV}, or --allow-unauthenticated to serve anyone who can reach it",
                args.host
            );
        }
        tracing::warn!(host = %args.host, "serving without authentication on a non-loopback address");
    }

    let config = ServerConfig {
        model_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| default_model_name(&args.model.model)),
        api_keys,
        max_body_bytes: args.max_body_bytes,
        worker: WorkerConfig {
            max_batch: usize::try_from(args.max_batch_size).unwrap_or(usize::MAX),
            max_queue: usize::try_from(args.max_queue).unwrap_or(usize::MAX),
            max_queue_tokens: args
                .max_queue_tokens
                .map_or(usize::MAX, |t| usize::try_from(t).unwrap_or(usize::MAX)),
            step_delay: args.step_delay_ms.map(Duration::from_millis),
        },
        content_filter: filter,
        cors_origins: cors_origins(&args.cors_origins)?,
        request_timeout: args.request_timeout_secs.map(Duration::from_secs),
        ..ServerConfig::new("")
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (host, port, model, load_delay) =
        (args.host, args.port, args.model, args.load_delay_ms.map(Duration::from_millis));
    let grace = Duration::from_secs(args.shutdown_grace_secs);
    let kv_tokens = args.kv_cache_tokens.map(|t| usize::try_from(t).unwrap_or(usize::MAX));
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host.as_str(), port))
            .await
            .with_context(|| format!("cannot listen on {host}:{port}"))?;
        let addr = listener.local_addr()?;
        // Listening while the model loads: every route answers 503 until it is ready.
        println!("phi-serve loading the model, answering 503 on http://{addr}");
        std::io::stdout().flush()?;
        tracing::info!(%addr, model = %model.model, "loading the model (answering 503 until ready)");
        let gate = LoadingGate::new();
        // Set once the model is loaded: what a shutdown signal drains.
        let serving: Arc<OnceLock<AppState>> = Arc::default();
        let drained = Arc::new(tokio::sync::Notify::new());
        let shutdown = {
            let (serving, drained) = (serving.clone(), drained.clone());
            async move {
                shutdown_signal().await;
                if let Some(state) = serving.get() {
                    phi_server::drain::drain(state, grace).await;
                }
                drained.notify_one();
            }
        };
        let mut server = tokio::spawn(phi_server::serve_gated(listener, gate.clone(), shutdown));
        let loading = tokio::task::spawn_blocking(move || {
            if let Some(delay) = load_delay {
                std::thread::sleep(delay);
            }
            model.load()
        });
        tokio::select! {
            loaded = loading => {
                let engine = loaded.context("loading the model panicked")??;
                if let Some(tokens) = kv_cache_budget(&engine, kv_tokens) {
                    engine.set_kv_cache_tokens(tokens).context("cannot allocate the KV cache")?;
                }
                let engine = Arc::new(engine);
                let state = AppState::new(engine, config).context("cannot start the engine worker")?;
                let _ = serving.set(state.clone());
                gate.open(phi_server::router(state));
                println!("phi-serve listening on http://{addr}");
                std::io::stdout().flush()?;
                tracing::info!(%addr, "model loaded, serving");
                // After the drain, open connections get a moment to close; a stream cut off by
                // the grace period does not keep the process alive.
                let closing = async {
                    drained.notified().await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                };
                tokio::select! {
                    done = &mut server => done.context("the server task panicked")??,
                    () = closing => tracing::warn!("closing the connections still open"),
                }
            }
            stopped = &mut server => {
                stopped.context("the server task panicked")??;
                tracing::info!("stopped before the model was loaded");
            }
        }
        anyhow::Ok(())
    });
    // A load still running after a shutdown signal is abandoned, not waited for.
    runtime.shutdown_background();
    result
}

/// The KV pool's size in tokens: `flag`, else on CPU 80% of the memory available now (the
/// model loaded), on CUDA 90% of the GPU's free memory (the rest is left to activations); the
/// prefix cache keeps its blocks in the same pool. Logged with what it holds; `None` (the
/// engine's default pool) when the memory cannot be read.
fn kv_cache_budget(engine: &Engine, flag: Option<usize>) -> Option<usize> {
    let per_token = engine.kv_bytes_per_token().max(1);
    let context = engine.context_length();
    let tokens = match flag {
        Some(t) => t,
        None if engine.model().device().is_cuda() => match engine.device_memory() {
            Some((free, _)) => free / 10 * 9 / per_token,
            None => {
                tracing::warn!("cannot read the GPU's free memory: default KV pool");
                return None;
            }
        },
        None => match available_memory() {
            // At most 64 full-context sequences: more than a batch can use.
            Some(bytes) => ((bytes / 5 * 4) as usize / per_token).min(64 * context),
            None => {
                tracing::warn!("cannot read the available memory: default KV pool");
                return None;
            }
        },
    };
    let tokens = tokens.next_multiple_of(phi_engine::kv_pool::BLOCK_SIZE);
    tracing::info!(
        tokens,
        blocks = tokens / phi_engine::kv_pool::BLOCK_SIZE,
        gib = format!("{:.2}", (tokens * per_token) as f64 / (1u64 << 30) as f64),
        bytes_per_token = per_token,
        full_context_sequences = tokens / context.next_multiple_of(16),
        context,
        "KV cache budget"
    );
    Some(tokens)
}

/// The `--cors-allow-origin` values, each checked to be `*` or `scheme://host[:port]`.
fn cors_origins(origins: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for o in origins.iter().map(|o| o.trim().trim_end_matches('/')).filter(|o| !o.is_empty()) {
        let ok = o == "*"
            || o.split_once("://").is_some_and(|(scheme, host)| {
                matches!(scheme, "http" | "https")
                    && !host.is_empty()
                    && !host.contains(['/', ' ', '*'])
                    && o.is_ascii()
            });
        if !ok {
            bail!(
                "--cors-allow-origin {o:?} is not `*` or an origin such as https://app.example.com"
            );
        }
        out.push(o.to_string());
    }
    Ok(out)
}

/// Keys from the flags, the key file and the environment, trimmed, without blanks and
/// duplicates.
fn collect_keys(flags: &[String], file: Option<&Path>, env: Option<String>) -> Result<Vec<String>> {
    let mut keys: Vec<String> = flags.iter().map(|k| k.trim().to_string()).collect();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --api-key-file {}", path.display()))?;
        keys.extend(text.lines().map(str::trim).filter(|l| !l.starts_with('#')).map(String::from));
        if keys.iter().all(String::is_empty) {
            bail!("--api-key-file {} holds no key", path.display());
        }
    }
    if let Some(env) = env {
        keys.extend(env.split(',').map(|k| k.trim().to_string()));
    }
    keys.retain(|k| !k.is_empty());
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// Whether every address `host` stands for is a loopback address.
fn is_loopback(host: &str, port: u16) -> Result<bool> {
    if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok(ip.is_loopback());
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve --host {host}"))?
        .collect();
    Ok(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()))
}

/// `models/tiny/phi3-mini-4k` -> `phi3-mini-4k`; `microsoft/Phi-3-mini-4k-instruct` ->
/// `Phi-3-mini-4k-instruct`.
fn default_model_name(model: &str) -> String {
    model.trim_end_matches('/').rsplit('/').next().unwrap_or(model).to_string()
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_every_source() {
        let dir = std::env::temp_dir().join(format!("phi-serve-keys-{}", std::process::id()));
        std::fs::write(&dir, "# comment\n\n  k2  \nk3\n").unwrap();
        let keys = collect_keys(&["k1".into()], Some(&dir), Some(" k4, ,k1".into())).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(keys, ["k1", "k2", "k3", "k4"]);
        assert!(collect_keys(&[], None, None).unwrap().is_empty());
    }

    #[test]
    fn cors_origins_are_checked() {
        let ok = cors_origins(&["https://a.example.com/".into(), "http://localhost:3000".into()]);
        assert_eq!(ok.unwrap(), ["https://a.example.com", "http://localhost:3000"]);
        assert_eq!(cors_origins(&["*".into()]).unwrap(), ["*"]);
        for bad in ["a.example.com", "https://", "ftp://x", "https://x/path", "https://*.x"] {
            assert!(cors_origins(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("127.0.0.1", 0).unwrap());
        assert!(is_loopback("::1", 0).unwrap());
        assert!(is_loopback("[::1]", 0).unwrap());
        assert!(is_loopback("localhost", 0).unwrap());
        assert!(!is_loopback("0.0.0.0", 0).unwrap());
        assert!(!is_loopback("::", 0).unwrap());
    }

    #[test]
    fn model_names() {
        assert_eq!(default_model_name("models/tiny/phi3-mini-4k/"), "phi3-mini-4k");
        assert_eq!(
            default_model_name("microsoft/Phi-3-mini-4k-instruct"),
            "Phi-3-mini-4k-instruct"
        );
    }
}
