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
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use phi_server::{AppState, ServerConfig, WorkerConfig};

use crate::options::ModelArgs;

/// Environment variable with comma-separated API keys.
const KEYS_ENV: &str = "PHI_SERVE_API_KEYS";

/// Arguments of `phi-serve serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
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
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Serve without API keys on a non-loopback address.
    #[arg(long)]
    allow_unauthenticated: bool,
    /// Model name reported by /info and /v1/models (default: the last part of --model).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most sequences generated together in one batch (a request with `n` choices counts n).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    max_batch_size: u64,
    /// Most requests waiting for a place in the batch; more are answered 429.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    max_queue: u64,
    /// Largest request body in bytes; larger ones are answered 413.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Sleep after every engine step (testing only: makes a tiny model slow enough to observe
    /// queueing and disconnects).
    #[arg(long, hide = true, value_name = "MS")]
    step_delay_ms: Option<u64>,
}

/// Runs the subcommand until Ctrl-C or SIGTERM.
pub fn run(args: ServeArgs) -> Result<()> {
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

    let engine = Arc::new(args.model.load()?);
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
            step_delay: args.step_delay_ms.map(Duration::from_millis),
        },
        ..ServerConfig::new("")
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        let state = AppState::new(engine, config).context("cannot start the engine worker")?;
        println!("phi-serve listening on http://{addr}");
        std::io::stdout().flush()?;
        tracing::info!(%addr, "listening");
        phi_server::serve(listener, state, shutdown_signal()).await?;
        Ok(())
    })
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
