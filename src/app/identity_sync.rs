//! The identity sync of a running server: entity data from one identity
//! store (`[identity.postgres]` or `[identity.scim]`) instead of the
//! entities file. Nothing is served before its first full sync; past the
//! maximum staleness, health reports `NOT_SERVING` (decisions continue from
//! the cache and say so).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;

use crate::engine::Engine;
use crate::identity::postgres::PostgresSource;
use crate::identity::scim::ScimSource;
use crate::identity::{IdentityConfig, IdentityError, SyncStatus};

use super::ServeError;
use super::health::Health;

/// The configured source, built (its settings checked), not yet running.
/// (Boxed: built once, and much larger than the other.)
enum Source {
    Postgres(Box<PostgresSource>),
    Scim(ScimSource),
}

/// The identity sync, when a source is configured.
pub(super) struct IdentitySync {
    source: Source,
    status: Arc<SyncStatus>,
    revision_wait: Duration,
}

impl IdentitySync {
    /// `None` without a source (the entities file, if any, is the data).
    pub(super) fn build(config: Option<&IdentityConfig>) -> Result<Option<Self>, ServeError> {
        let Some(identity) = config.filter(|identity| identity.has_source()) else {
            return Ok(None);
        };
        let source = match (&identity.postgres, &identity.scim) {
            (Some(postgres), None) => Source::Postgres(Box::new(postgres.build()?)),
            (None, Some(scim)) => Source::Scim(scim.build()?),
            _ => {
                return Err(ServeError::Identity(IdentityError::Config {
                    key: "identity",
                    message: "configure one source: `[identity.postgres]` or `[identity.scim]`"
                        .into(),
                }));
            }
        };
        Ok(Some(IdentitySync {
            source,
            status: Arc::new(SyncStatus::new(identity.max_staleness())),
            revision_wait: identity.revision_wait(),
        }))
    }

    pub(super) fn status(&self) -> &Arc<SyncStatus> {
        &self.status
    }

    /// How long a request's `min_data_revision` may wait for the sync.
    pub(super) fn revision_wait(&self) -> Duration {
        self.revision_wait
    }

    /// Runs the sync (with its own retries and backoff) until `stop`.
    pub(super) fn start(self, engine: Arc<Engine>, stop: &watch::Receiver<bool>) -> RunningSync {
        let stop = stop.clone();
        let status = self.status.clone();
        let task = match self.source {
            Source::Postgres(source) => tokio::spawn(crate::identity::postgres::run(
                *source,
                engine,
                status.clone(),
                stop,
            )),
            Source::Scim(source) => tokio::spawn(crate::identity::scim::run(
                source,
                engine,
                status.clone(),
                stop,
            )),
        };
        RunningSync { task, status }
    }
}

/// A sync that is running.
pub(super) struct RunningSync {
    task: JoinHandle<()>,
    status: Arc<SyncStatus>,
}

impl RunningSync {
    /// Completes after the first full sync.
    pub(super) async fn synced(&self) {
        while !self.status.is_synced() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reports health `NOT_SERVING` while the data is staler than allowed,
    /// `SERVING` again when it is fresh, until `stop`.
    pub(super) fn watch_freshness(
        &self,
        health: Health,
        stop: &watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let status = self.status.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut fresh = true;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = stop.changed() => return,
                }
                let now = status.is_fresh();
                if now != fresh {
                    fresh = now;
                    tracing::warn!(target: "arbiter::identity", fresh, staleness = ?status.staleness(), "identity data freshness changed");
                    health
                        .set(if fresh {
                            ServingStatus::Serving
                        } else {
                            ServingStatus::NotServing
                        })
                        .await;
                }
            }
        })
    }

    pub(super) fn shutdown(self) {
        self.task.abort();
    }
}
