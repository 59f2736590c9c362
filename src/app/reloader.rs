//! The served files of a running server: the first load, off the async
//! workers (files may be large or slow), then polling for changes
//! (`crate::reload`). The watcher's baseline is taken before the first
//! load, so no edit falls in between.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::engine::{Engine, LoadError, LoadOptions, Sources};
use crate::reload::{self, Fingerprint, LoadStatus};
use crate::telemetry::ReloadMetrics;

use super::ServeError;

/// What is loaded at start and reloaded when it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadConfig {
    pub sources: Sources,
    /// How often the policy, schema and entity files are checked for changes.
    pub interval: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            sources: Sources::default(),
            interval: Duration::from_millis(250),
        }
    }
}

/// Loads the files into the engine and keeps them loaded.
pub(super) struct Reloader {
    pub(super) config: ReloadConfig,
    pub(super) options: LoadOptions,
    pub(super) engine: Arc<Engine>,
    pub(super) metrics: Arc<ReloadMetrics>,
    pub(super) status: Arc<LoadStatus>,
}

impl Reloader {
    /// The first load: the watcher's baseline, then the files. The result
    /// is the load's; the baseline is for [`Reloader::watch`].
    pub(super) async fn initial_load(
        &self,
    ) -> Result<(Fingerprint, Result<(), LoadError>), ServeError> {
        let baseline = {
            let paths = self.config.sources.watched_paths();
            tokio::task::spawn_blocking(move || Fingerprint::of(&paths)).await?
        };
        let engine = self.engine.clone();
        let sources = self.config.sources.clone();
        let metrics = self.metrics.clone();
        let status = self.status.clone();
        let options = self.options;
        let loaded = tokio::task::spawn_blocking(move || {
            reload::load_and_publish(&engine, &sources, options, &metrics, &status)
        })
        .await?;
        Ok((baseline, loaded))
    }

    /// Polls the files from `baseline` on and reloads on change, until `stop`.
    pub(super) fn watch(
        self,
        baseline: Fingerprint,
        stop: &watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(reload::watch_files(
            baseline,
            self.engine,
            self.config.sources,
            self.options,
            self.config.interval,
            self.metrics,
            self.status,
            stop.clone(),
        ))
    }
}
