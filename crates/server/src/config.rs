//! Settings of the HTTP server that the command line decides.

use std::sync::Arc;

use crate::content_filter::ContentFilter;
use crate::worker::WorkerConfig;

/// Everything [`crate::router`] needs besides the engine.
///
/// Exists so the binary's flags map onto one plain value that tests can also build by hand.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The name reported by `/info`, `/v1/models` and the `model` field of answers.
    pub model_name: String,
    /// The publisher reported by `/info` and `/v1/models`.
    pub model_provider: String,
    /// Accepted API keys; empty means no authentication.
    pub api_keys: Vec<String>,
    /// Largest accepted request body (413 above).
    pub max_body_bytes: usize,
    /// Batching and queueing limits.
    pub worker: WorkerConfig,
    /// The content filter for prompts and answers; `None` filters nothing and annotates
    /// nothing.
    pub content_filter: Option<Arc<dyn ContentFilter>>,
    /// Origins whose browser pages may call the API (`*` for any); empty for none.
    pub cors_origins: Vec<String>,
    /// How long a chat request may take from its arrival: past it, a waiting request is
    /// answered 503 and a running one ends with `length`. `None` for no limit.
    pub request_timeout: Option<std::time::Duration>,
}

impl ServerConfig {
    /// Defaults for a model name: no keys, 4 MiB bodies, default batching.
    pub fn new(model_name: impl Into<String>) -> Self {
        ServerConfig {
            model_name: model_name.into(),
            model_provider: "Microsoft".into(),
            api_keys: Vec::new(),
            max_body_bytes: 4 << 20,
            worker: WorkerConfig::default(),
            content_filter: None,
            cors_origins: Vec::new(),
            request_timeout: None,
        }
    }
}
