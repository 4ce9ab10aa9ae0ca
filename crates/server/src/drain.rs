//! Graceful shutdown (SIGTERM, as Kubernetes and `docker stop` send it): stop admitting, let
//! what runs and waits finish within a grace period, then let the process exit.

use std::time::{Duration, Instant};

use crate::state::AppState;

/// How often [`drain`] looks at the worker.
const POLL: Duration = Duration::from_millis(20);

/// Marks the server draining (new chat requests get 503, `/ready` answers 503 so a load balancer
/// sends traffic elsewhere) and waits until nothing runs or waits, or `grace` has passed.
/// Returns whether everything finished in time.
pub async fn drain(state: &AppState, grace: Duration) -> bool {
    state.start_draining();
    let stats = state.worker().stats();
    tracing::info!(
        running = stats.running(),
        queued = stats.queued(),
        grace_s = grace.as_secs_f64(),
        "draining: no new requests; waiting for the running ones"
    );
    let deadline = Instant::now() + grace;
    while !stats.is_idle() {
        if Instant::now() >= deadline {
            tracing::warn!(
                running = stats.running(),
                queued = stats.queued(),
                "grace period over: cutting off the requests still running"
            );
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
    tracing::info!("drained");
    true
}
