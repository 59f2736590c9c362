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
use crate::reload::LoadStatus;

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub engine: Arc<Engine>,
    pub status: Arc<LoadStatus>,
    /// False before the first load and while draining.
    pub serving: Arc<AtomicBool>,
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
    let serving = state.serving.load(Ordering::Acquire);
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
