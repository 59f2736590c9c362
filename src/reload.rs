//! Hot reload: watches the policy, schema, entity and template-link files
//! (and the `--tests` fixtures) and publishes a new snapshot when they
//! change; with `--tests`, only a set that passes every fixture. An invalid edit keeps the last good
//! snapshot serving and is reported (log, metric, `/ready` details).
//!
//! Watching is by polling a fingerprint (path, size, mtime, inode of every
//! file, symlinks followed) rather than by inotify: it sees saves by rename
//! and Kubernetes ConfigMap updates (which swap a `..data` symlink) alike,
//! and costs a few `stat` calls per interval.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use crate::engine::{Engine, LoadDiagnostic, LoadError, LoadOptions, Sources, loader};
use crate::fixtures;
use crate::telemetry::ReloadMetrics;

/// What the admin endpoints report about loading.
#[derive(Debug, Default)]
pub struct LoadStatus {
    /// The diagnostics of the last refused reload; cleared by a good one.
    pub last_error: ArcSwapOption<String>,
    pub last_success: ArcSwapOption<SystemTime>,
}

/// One file as seen by a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

/// The state of all watched files; any difference triggers a reload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint(Vec<Option<FileStamp>>);

impl Fingerprint {
    pub fn of(paths: &[PathBuf]) -> Self {
        let mut stamps = Vec::new();
        for path in paths {
            stamp_tree(path, &mut stamps);
        }
        Fingerprint(stamps)
    }
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let metadata = std::fs::metadata(path).ok()?;
    if !metadata.is_file() {
        // A pipe or device changes its timestamps on every write; only its
        // identity counts.
        return Some(FileStamp {
            path: path.to_path_buf(),
            len: 0,
            modified: None,
            inode: 0,
        });
    }
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&metadata);
    #[cfg(not(unix))]
    let inode = 0;
    Some(FileStamp {
        path: path.to_path_buf(),
        len: metadata.len(),
        modified: metadata.modified().ok(),
        inode,
    })
}

fn stamp_tree(path: &Path, stamps: &mut Vec<Option<FileStamp>>) {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
            Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(_) => {
                stamps.push(None);
                return;
            }
        };
        entries.sort();
        for entry in entries {
            let hidden = entry
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with(".."));
            if hidden {
                continue;
            }
            if entry.is_dir() {
                stamp_tree(&entry, stamps);
            } else if entry
                .extension()
                .is_some_and(|ext| ext == "cedar" || ext == "json")
            {
                // `.json`: fixture files in a `--tests` directory (a fixture
                // edit inside a policies directory reloads the same set).
                stamps.push(stamp(&entry));
            }
        }
    } else {
        stamps.push(stamp(path));
    }
}

/// Why a candidate policy set was refused (the `reason` label of
/// `arbiter_policy_reload_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The files do not load or validate.
    Invalid,
    /// The set loads, but a decision fixture (`serve --tests`) fails on it.
    Tests,
}

/// Loads and publishes a snapshot, updating metrics and status. Returns the
/// load error, already logged, when the files are invalid or the set fails
/// its fixtures.
pub fn load_and_publish(
    engine: &Engine,
    sources: &Sources,
    options: LoadOptions,
    metrics: &ReloadMetrics,
    status: &LoadStatus,
) -> Result<(), LoadError> {
    load_gated(engine, sources, options, metrics, status).map_err(|(_, error)| error)
}

/// Runs the fixtures at `tests` against a candidate set: every failing case
/// (or a fixture that cannot be read) becomes a diagnostic naming it.
fn gate(snapshot: &crate::engine::Snapshot, tests: &Path) -> Result<(), LoadError> {
    let report = fixtures::run_fixtures(snapshot, &[tests.to_path_buf()])
        .map_err(|error| LoadError::one(tests.display().to_string(), error))?;
    if report.all_passed() {
        return Ok(());
    }
    Err(LoadError {
        diagnostics: report
            .failures
            .iter()
            .map(|failure| {
                LoadDiagnostic::plain(
                    &failure.file,
                    format!("fixture failed: {}", failure_text(failure)),
                )
            })
            .collect(),
    })
}

/// A failure without its file name, which the diagnostic already carries.
fn failure_text(failure: &fixtures::CaseFailure) -> String {
    let full = failure.to_string();
    full.strip_prefix(&format!("{}: ", failure.file))
        .map_or(full.clone(), str::to_owned)
}

fn load_gated(
    engine: &Engine,
    sources: &Sources,
    options: LoadOptions,
    metrics: &ReloadMetrics,
    status: &LoadStatus,
) -> Result<(), (Refusal, LoadError)> {
    let loaded = loader::load(sources, options)
        .map_err(|error| (Refusal::Invalid, error))
        .and_then(|(snapshot, report)| {
            if snapshot.policies.policy_count() == 0 && !options.allow_empty_policies {
                let name = sources
                    .policies
                    .as_ref()
                    .map_or_else(|| "<policies>".to_owned(), |p| p.display().to_string());
                return Err((
                    Refusal::Invalid,
                    LoadError::one(
                        &name,
                        "no policies: every request would be denied (an unmounted volume?); \
                 set `allow_empty_policies = true` to serve an empty set",
                    ),
                ));
            }
            // After validation, before the swap: a set that breaks its author's
            // fixtures is never served.
            if let Some(tests) = &sources.tests {
                gate(&snapshot, tests).map_err(|error| (Refusal::Tests, error))?;
            }
            Ok((snapshot, report))
        });
    match loaded {
        Ok((snapshot, report)) => {
            for warning in &report.warnings {
                tracing::warn!(target: "arbiter::policy", "{warning}");
            }
            metrics
                .policies_loaded
                .set(snapshot.policies.policy_count() as f64);
            metrics.entities_loaded.set(snapshot.data.len() as f64);
            tracing::info!(
                policy_revision = %snapshot.policies.revision,
                data_revision = %snapshot.data.revision,
                policies = snapshot.policies.policy_count(),
                entities = snapshot.data.len(),
                "policy set activated"
            );
            // Status first: whoever sees a decision from the new set must
            // also see the error of the set it replaced cleared.
            status.last_error.store(None);
            status.last_success.store(Some(Arc::new(SystemTime::now())));
            engine.publish(snapshot);
            Ok(())
        }
        Err((refusal, error)) => {
            let rendered = error.render();
            let why = match refusal {
                Refusal::Invalid => "",
                Refusal::Tests => " (decision fixtures failed)",
            };
            tracing::error!(target: "arbiter::policy", "policy set refused{why}:\n{rendered}");
            status.last_error.store(Some(Arc::new(error.to_string())));
            Err((refusal, error))
        }
    }
}

/// Polls the watched files every `interval` until `stop` changes, reloading
/// on every change.
/// `baseline` is the fingerprint taken before the snapshot now serving was
/// read, so an edit made while it loaded is not missed.
#[allow(clippy::too_many_arguments)]
pub async fn watch_files(
    baseline: Fingerprint,
    engine: Arc<Engine>,
    sources: Sources,
    options: LoadOptions,
    interval: Duration,
    metrics: Arc<ReloadMetrics>,
    status: Arc<LoadStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let paths = sources.watched_paths();
    if paths.is_empty() {
        return;
    }
    let mut last = baseline;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hangup = Hangup::new();
    loop {
        let forced = tokio::select! {
            _ = ticker.tick() => false,
            () = hangup.recv() => true,
            _ = stop.changed() => return,
        };
        if forced {
            tracing::info!(target: "arbiter::policy", "SIGHUP received: reloading the files");
        }
        let paths_now = paths.clone();
        let Ok(current) = tokio::task::spawn_blocking(move || Fingerprint::of(&paths_now)).await
        else {
            continue;
        };
        if current == last && !forced {
            continue;
        }
        last = current;
        let engine = engine.clone();
        let sources = sources.clone();
        let metrics = metrics.clone();
        let status = status.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let outcome = load_gated(&engine, &sources, options, &metrics, &status);
            match &outcome {
                Ok(_) => metrics.reloads.increment(1),
                Err((Refusal::Invalid, _)) => metrics.reload_failures.increment(1),
                Err((Refusal::Tests, _)) => metrics.reload_failures_tests.increment(1),
            }
            outcome.is_ok()
        })
        .await;
        if !matches!(outcome, Ok(true)) {
            tracing::warn!("keeping the last good policy set");
        }
    }
}

/// SIGHUP, the conventional "reload your files" signal: a reload even when
/// no file's stamp changed (an edit that kept size and mtime).
struct Hangup(#[cfg(unix)] Option<tokio::signal::unix::Signal>);

impl Hangup {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Hangup(signal(SignalKind::hangup()).ok())
        }
        #[cfg(not(unix))]
        {
            Hangup()
        }
    }

    /// Resolves at the next SIGHUP; never when it cannot be listened for.
    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.0
            && signal.recv().await.is_some()
        {
            return;
        }
        std::future::pending::<()>().await;
    }
}
