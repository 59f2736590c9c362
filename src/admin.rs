//! The admin HTTP listener: `/live`, `/ready` (with details as JSON) and
//! `/metrics` (Prometheus text).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::UNIX_EPOCH;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::engine::Engine;
use crate::identity::SyncStatus;
use crate::reload::LoadStatus;

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub engine: Arc<Engine>,
    pub status: Arc<LoadStatus>,
    /// False before the first load and while draining.
    pub serving: Arc<AtomicBool>,
    /// The identity sync, when a source is configured.
    pub identity: Option<Arc<SyncStatus>>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    // Not ready past the identity sync's maximum staleness; decisions
    // still continue from the cache (and say their data is stale).
    let identity_fresh = state
        .identity
        .as_ref()
        .is_none_or(|status| status.is_fresh());
    let serving = state.serving.load(Ordering::Acquire) && identity_fresh;
    let identity = state.identity.as_ref().map(|status| {
        serde_json::json!({
            "synced": status.is_synced(),
            "fresh": status.is_fresh(),
            "staleness_ms": status.staleness().as_millis() as u64,
            "max_staleness_ms": status.max_staleness.as_millis() as u64,
            "applied_position": status.applied_position(),
            "source_position": status.source_position(),
            "lag_positions": status.lag_positions(),
            "last_error": status.last_error.load_full().as_deref(),
        })
    });
    let snapshot = state.engine.snapshot();
    let last_error = state.status.last_error.load_full();
    let last_success = state
        .status
        .last_success
        .load_full()
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map(|since| since.as_secs());
    let body = serde_json::json!({
        "ready": serving,
        "policy_revision": snapshot.as_ref().map(|s| s.policies.revision.to_string()),
        "data_revision": snapshot.as_ref().map(|s| s.data.revision.to_string()),
        "policies": snapshot.as_ref().map(|s| s.policies.policy_count()),
        "entities": snapshot.as_ref().map(|s| s.data.len()),
        "last_reload_error": last_error.as_deref(),
        "last_load_unix_seconds": last_success,
        "identity": identity,
    });
    let code = if serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

async fn metrics() -> impl IntoResponse {
    let body = crate::telemetry::prometheus()
        .map(|handle| handle.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
