//! phi-server: the HTTP server of phi-serve.
//!
//! It speaks the Azure AI Model Inference API (`/info`, `/chat/completions`) and the OpenAI API
//! (`/v1/models`, `/v1/chat/completions`) exactly as the `azure-ai-inference` and `openai` SDKs
//! need (see `shared/api/CONTRACT.md`). Requests are validated by `phi-api`, then handed to one
//! engine worker thread that steps every running request together in one batched forward pass
//! per token ([`worker`]).

pub mod admission;
pub mod auth;
pub mod chat;
pub mod choice_state;
pub mod completion;
pub mod config;
pub mod content_filter;
pub mod drain;
pub mod fallback;
pub mod flavor;
pub mod http_error;
pub mod http_filter;
pub mod ids;
pub mod info;
pub mod loading;
pub mod metrics;
pub mod openapi;
pub mod prepare;
pub mod request_id;
pub mod request_log;
pub mod response_meta;
pub mod routes;
pub mod state;
pub mod stream;
pub mod text_completions;
pub mod token_logprobs;
pub mod worker;

use std::future::Future;

use axum::serve::{ListenerExt, TapIo};
use tokio::net::{TcpListener, TcpStream};

pub use config::ServerConfig;
pub use routes::router;
pub use state::AppState;
pub use worker::WorkerConfig;

/// Serves the API on `listener` until `shutdown` resolves, then lets open requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(no_delay(listener), router(state)).with_graceful_shutdown(shutdown).await
}

/// Serves `gate` on `listener` (503 until the gate is opened with the real router) until
/// `shutdown` resolves, then lets open requests finish.
pub async fn serve_gated(
    listener: tokio::net::TcpListener,
    gate: loading::LoadingGate,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(no_delay(listener), gate.router()).with_graceful_shutdown(shutdown).await
}

/// The listener with `TCP_NODELAY` on every connection: a stream writes one small event per
/// token, and Nagle's algorithm would hold each behind the client's delayed ACK (up to 40 ms).
fn no_delay(listener: TcpListener) -> TapIo<TcpListener, fn(&mut TcpStream)> {
    fn set(tcp: &mut TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    }
    listener.tap_io(set as fn(&mut TcpStream))
}
