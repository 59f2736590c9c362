//! Builds every part of the server from a [`ServeConfig`], runs it, and
//! drains it on shutdown in Kubernetes order: report not serving, stop
//! accepting, finish in-flight calls, all under a grace timeout.
//!
//! A server is made of these parts, one file each:
//!
//! | part | file | what it does |
//! | --- | --- | --- |
//! | [`Listeners`] | `listeners.rs` | gRPC on TCP (TLS) and a Unix socket, admission, HTTP/2 limits |
//! | `Services` | `services.rs` | the routes: health, reflection, Authorizer, DecisionLog, ext_authz |
//! | [`Admin`] | `admin.rs` | `/metrics`, `/live`, `/ready` |
//! | `Reloader` | `reloader.rs` | the first load of the files, then watching them |
//! | `IdentitySync` | `identity_sync.rs` | entity data from Postgres or SCIM, its freshness |
//! | [`DecisionLog`] | `crate::decision_log` | the record pipeline: queue, spool, sinks |
//! | `Health` | `health.rs` | gRPC health, the readiness latch |
//!
//! `Server::run` is the only place that wires them together, in order.

mod admin;
mod health;
mod identity_sync;
mod listeners;
mod reloader;
mod services;
mod stop;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tonic_health::ServingStatus;

use crate::adapter::ext_authz::ExtAuthzError;
use crate::admin::AdminState;
use crate::decision_log::{DecisionLog, DecisionLogConfig, DecisionLogError};
use crate::engine::{Engine, LoadError, LoadOptions};
use crate::identity::{IdentityConfig, IdentityError};
use crate::reload::LoadStatus;
use crate::telemetry::{self, DecisionMetrics, ReloadMetrics};

pub use admin::{Admin, AdminConfig};
pub use listeners::{ListenerConfig, Listeners, TlsConfig, TransportLimits, UdsConfig};
pub use reloader::ReloadConfig;

use health::Health;
use identity_sync::IdentitySync;
use reloader::Reloader;
use services::Services;

/// Everything `arbiter serve` needs, after flags, env and file are merged:
/// one part per part of the server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The policy, schema and entity files, and how often they are checked.
    pub reload: ReloadConfig,
    /// How policies are validated and decisions made, and their limits.
    pub load: LoadOptions,
    /// The gRPC listeners and what they serve.
    pub listeners: ListenerConfig,
    /// The admin HTTP listener.
    pub admin: AdminConfig,
    /// Entity data synced from an identity store instead of the entities file.
    pub identity: Option<IdentityConfig>,
    /// `[decision_log]`. Off in `ServeConfig::default()` (embedders and
    /// tests opt in); `arbiter serve` resolves it on, to stdout, by default.
    pub decision_log: DecisionLogConfig,
    /// How long in-flight calls may take to finish after SIGTERM (and the
    /// decision log to flush after them).
    pub shutdown_grace: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            reload: ReloadConfig::default(),
            load: LoadOptions::default(),
            listeners: ListenerConfig::default(),
            admin: AdminConfig::default(),
            identity: None,
            decision_log: DecisionLogConfig::disabled(),
            shutdown_grace: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on `{addr}`: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the policy set could not be loaded:\n{}", .0.render())]
    InitialLoad(LoadError),
    #[error("TLS file `{path}`: {message}")]
    Tls { path: PathBuf, message: String },
    #[error("cannot listen on `{path}`: {source}")]
    BindUds {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid `[ext_authz]`: {0}")]
    ExtAuthz(#[from] ExtAuthzError),
    #[error("{0}")]
    Identity(#[from] IdentityError),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("{0}")]
    DecisionLog(#[from] DecisionLogError),
}

/// A server with its listeners bound, not yet serving.
#[derive(Debug)]
pub struct Server {
    config: ServeConfig,
    listeners: Listeners,
    admin: Admin,
}

impl Server {
    /// Binds the gRPC and admin listeners (port 0 picks a free port).
    pub async fn bind(config: ServeConfig) -> Result<Self, ServeError> {
        // In this order, so that of several problems the same one is
        // reported: the gRPC port, the admin port, the TLS files, the socket.
        let tcp = listeners::bind_tcp(config.listeners.listen).await?;
        let admin = Admin::bind(&config.admin).await?;
        let listeners = Listeners::bind(tcp, &config.listeners)?;
        Ok(Server {
            config,
            listeners,
            admin,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listeners.local_addr()
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// Serves until `shutdown` completes, then drains. Health is
    /// `NOT_SERVING` until the first policy set is loaded; a policy set that
    /// cannot be loaded at start ends the server with its diagnostics.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let Server {
            config,
            listeners,
            admin,
        } = self;
        // The recorder must exist before any handle is registered.
        telemetry::prometheus();
        let decision_metrics = Arc::new(DecisionMetrics::register());
        let reload_metrics = Arc::new(ReloadMetrics::register());
        // With an identity source the entity data comes from the sync, and
        // nothing is served before its first full sync.
        let identity = IdentitySync::build(config.identity.as_ref())?;
        let engine = Arc::new(
            if identity.is_some() {
                Engine::with_external_data()
            } else {
                Engine::new()
            }
            .with_max_hierarchy_depth(config.load.limits.max_hierarchy_depth),
        );
        // The decision log starts first, so records an earlier run left in
        // the spool are on their way while the policies load.
        let grpc_addr = listeners.local_addr().ok();
        let default_spool = std::env::temp_dir().join(format!(
            "arbiter-spool-{}",
            grpc_addr.map_or(config.listeners.listen.port(), |a| a.port())
        ));
        let decision_log = DecisionLog::start(&config.decision_log, &default_spool).await?;
        let status = Arc::new(LoadStatus::default());
        let serving = Arc::new(AtomicBool::new(false));
        let (health, health_service) = Health::not_serving().await;

        let (stop_tx, stop_rx) = watch::channel(false);
        let routes = Services {
            engine: &engine,
            metrics: &decision_metrics,
            decision_log: &decision_log,
            identity: identity
                .as_ref()
                .map(|sync| (sync.status().clone(), sync.revision_wait())),
            limits: &config.load.limits,
            ext_authz: config.listeners.ext_authz.as_ref(),
            max_message_bytes: config.listeners.transport.max_message_bytes,
            stop: &stop_rx,
        }
        .routes(health_service)?;
        let mut grpc = listeners.start(routes, &stop_rx)?;
        let admin = admin.start(
            AdminState {
                engine: engine.clone(),
                status: status.clone(),
                serving: serving.clone(),
                identity: identity.as_ref().map(|sync| sync.status().clone()),
            },
            &stop_rx,
        );
        let sync = identity.map(|sync| sync.start(engine.clone(), &stop_rx));

        let reloader = Reloader {
            config: config.reload.clone(),
            options: config.load,
            engine: engine.clone(),
            metrics: reload_metrics,
            status,
        };
        tokio::pin!(shutdown);
        let loaded = tokio::select! {
            loaded = reloader.initial_load() => Some(loaded?),
            () = &mut shutdown => None,
        };
        // Readiness also waits for the first full identity sync (the sync
        // retries with backoff meanwhile).
        let loaded = match (loaded, &sync) {
            (Some((baseline, Ok(()))), Some(sync)) => tokio::select! {
                () = sync.synced() => Some((baseline, Ok(()))),
                () = &mut shutdown => None,
            },
            (loaded, _) => loaded,
        };
        match loaded {
            Some((_, Err(error))) => {
                health.end_watches().await;
                let _ = stop_tx.send(true);
                let stopped = tokio::time::timeout(config.shutdown_grace, async {
                    let _ = grpc.stopped().await;
                    let _ = admin.await;
                })
                .await;
                if stopped.is_err() {
                    tracing::warn!("listeners did not close within the grace period");
                }
                grpc.remove_socket();
                decision_log.shutdown(Duration::from_secs(1)).await;
                return Err(ServeError::InitialLoad(error));
            }
            Some((baseline, Ok(()))) => {
                serving.store(true, Ordering::Release);
                health.set(ServingStatus::Serving).await;
                tracing::info!(
                    listen = %grpc_addr.map_or_else(|| config.listeners.listen.to_string(), |addr| addr.to_string()),
                    "serving arbiter.v1.Authorizer{}",
                    if config.reload.sources.is_embedded() { " on the embedded default policy set" } else { "" }
                );
                let watcher = reloader.watch(baseline, &stop_rx);
                let freshness = sync
                    .as_ref()
                    .map(|sync| sync.watch_freshness(health.clone(), &stop_rx));
                shutdown.await;
                drop(watcher);
                if let Some(freshness) = freshness {
                    freshness.abort();
                }
            }
            None => {}
        }

        if let Some(sync) = sync {
            sync.shutdown();
        }
        tracing::info!("shutting down: draining in-flight calls");
        serving.store(false, Ordering::Release);
        health.set(ServingStatus::NotServing).await;
        // Watchers (kubelet, Envoy) have now seen NOT_SERVING; end their
        // streams so open health watches do not hold the drain open.
        health.end_watches().await;
        let _ = stop_tx.send(true);
        let drain_started = tokio::time::Instant::now();
        let drained = tokio::time::timeout(config.shutdown_grace, async {
            let served = grpc.stopped().await;
            let _ = admin.await;
            served
        })
        .await;
        grpc.remove_socket();
        let outcome = match drained {
            Ok(served) => served,
            Err(_) => {
                tracing::warn!(
                    grace = ?config.shutdown_grace,
                    "grace period over with calls still in flight"
                );
                Ok(())
            }
        };
        // Calls are finished: no more records. Flush what can be delivered
        // in the rest of the grace period; the rest stays in the spool.
        let left = config
            .shutdown_grace
            .saturating_sub(drain_started.elapsed());
        decision_log.shutdown(left).await;
        outcome?;
        tracing::info!("stopped");
        Ok(())
    }
}
