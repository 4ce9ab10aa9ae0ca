//! What every handler shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use phi_engine::engine::Engine;

use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::worker::{WorkerConfig, WorkerHandle};

/// Shared state of the router: the engine (for tokenizing and validating in handlers), the
/// worker's queue, the configuration, the metrics, and whether the server is draining.
///
/// Exists as one cheaply clonable value because axum hands state to handlers by clone.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    engine: Arc<Engine>,
    worker: WorkerHandle,
    config: ServerConfig,
    started: u64,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
}

impl AppState {
    /// Starts the engine worker and wraps everything up.
    pub fn new(engine: Arc<Engine>, config: ServerConfig) -> std::io::Result<Self> {
        let worker_config: WorkerConfig = config.worker.clone();
        let worker = WorkerHandle::spawn(engine.clone(), worker_config)?;
        let inner = Inner {
            engine,
            worker,
            config,
            started: unix_now(),
            metrics: Arc::default(),
            draining: AtomicBool::new(false),
        };
        Ok(AppState { inner: Arc::new(inner) })
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.inner.engine
    }

    /// The worker's queue.
    pub fn worker(&self) -> &WorkerHandle {
        &self.inner.worker
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// The counters behind `/metrics`.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Stops admitting chat requests (503 `shutting_down`; `/ready` answers 503) while the
    /// running ones finish.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    /// Whether [`start_draining`](Self::start_draining) was called.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// When the server started, in Unix seconds.
    pub fn started(&self) -> u64 {
        self.inner.started
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
