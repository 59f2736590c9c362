//! Resolves when the process is asked to stop (SIGTERM or SIGINT). SIGHUP
//! does not stop it: the policy watcher reloads the files on it.

pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        // Listening for SIGHUP replaces its default action, which ends the
        // process at once (no drain, queued decision records lost); the
        // policy watcher reloads the files on it.
        let _hangup = signal(SignalKind::hangup());
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
