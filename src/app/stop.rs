//! The one stop signal every part of a running server watches.

use tokio::sync::watch;

/// Completes once `stop` is true (or its sender is gone).
pub(super) async fn wait_for_stop(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}
