//! Builds every part of the server from a [`ServeConfig`], runs it, and
//! drains it on shutdown in Kubernetes order: report not serving, stop
//! accepting, finish in-flight calls, all under a grace timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

use crate::adapter::admission::{AdmissionConfig, AdmissionLayer};
use crate::adapter::authorizer::AuthorizerService;
use crate::adapter::connection::Unvectored;
use crate::adapter::decision_log::DecisionLogService;
use crate::adapter::ext_authz::{self, ExtAuthzConfig, ExtAuthzError};
use crate::admin::{self, AdminState};
use crate::decision_log::{DecisionLog, DecisionLogConfig, DecisionLogError};
use crate::engine::{Engine, LoadError, LoadOptions, Sources};
use crate::identity::{IdentityConfig, IdentityError, SyncStatus};
use crate::proto::v1::authorizer_server::AuthorizerServer;
use crate::proto::v1::decision_log_server::DecisionLogServer;
use crate::reload::{self, LoadStatus};
use crate::telemetry::{self, DecisionMetrics, ReloadMetrics};

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

/// The gRPC listeners: TCP (optionally TLS) and a Unix socket, each
/// serving every service, behind the same admission and limits.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub listen: SocketAddr,
    /// A Unix-domain socket serving the same gRPC services.
    pub uds: Option<UdsConfig>,
    /// TLS (and with a client CA, mTLS) on the gRPC TCP listener.
    pub tls: Option<TlsConfig>,
    /// Who may call, and the in-flight limit, on every gRPC listener.
    pub admission: AdmissionConfig,
    /// gRPC and HTTP/2 limits of every gRPC listener.
    pub transport: TransportLimits,
    /// `[ext_authz]`: serve `envoy.service.auth.v3.Authorization` with this
    /// mapping (not served when absent).
    pub ext_authz: Option<ExtAuthzConfig>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            uds: None,
            tls: None,
            admission: AdmissionConfig::default(),
            transport: TransportLimits::default(),
            ext_authz: None,
        }
    }
}

/// The admin HTTP listener: `/metrics`, `/live`, `/ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// gRPC and HTTP/2 limits, the same on every gRPC listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportLimits {
    /// The largest request message on both APIs; larger is `OUT_OF_RANGE`.
    pub max_message_bytes: usize,
    /// HTTP/2 streams one connection may have open.
    pub max_concurrent_streams: u32,
    /// HTTP/2 header list (the call's metadata) a client may send.
    pub max_header_list_bytes: u32,
    /// HTTP/2 PING interval, and how long an unanswered PING keeps the
    /// connection: a peer that vanished is dropped.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            // tonic's own default, stated.
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_streams: 256,
            max_header_list_bytes: 64 * 1024,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// TLS on the gRPC TCP listener, from PEM files. With `client_ca`, every
/// client must present a certificate that chains to it (mTLS), and the
/// decision log names the client by its SPIFFE id or subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl TlsConfig {
    /// Reads the files; any problem names the file.
    fn server_config(&self) -> Result<tonic::transport::ServerTlsConfig, ServeError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|error| ServeError::Tls {
                path: path.clone(),
                message: error.to_string(),
            })
        };
        let (cert, key) = (read(&self.cert)?, read(&self.key)?);
        for (path, text, what) in [
            (&self.cert, &cert, "CERTIFICATE"),
            (&self.key, &key, "PRIVATE KEY"),
        ] {
            if !String::from_utf8_lossy(text).contains(&format!("{what}-----")) {
                return Err(ServeError::Tls {
                    path: path.clone(),
                    message: format!("no PEM `{what}` block"),
                });
            }
        }
        let mut tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key));
        if let Some(ca) = &self.client_ca {
            let pem = read(ca)?;
            if !String::from_utf8_lossy(&pem).contains("CERTIFICATE-----") {
                return Err(ServeError::Tls {
                    path: ca.clone(),
                    message: "no PEM `CERTIFICATE` block".into(),
                });
            }
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(pem));
        }
        Ok(tls)
    }
}

/// A Unix-domain-socket gRPC listener (Envoy sidecars often use one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdsConfig {
    pub path: PathBuf,
    /// File permissions of the socket [default: 0o660].
    pub mode: u32,
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
    grpc: TcpListener,
    admin: TcpListener,
    uds: Option<tokio::net::UnixListener>,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

impl Server {
    /// Binds the gRPC and admin listeners (port 0 picks a free port).
    pub async fn bind(config: ServeConfig) -> Result<Self, ServeError> {
        let grpc = TcpListener::bind(config.listeners.listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: config.listeners.listen,
                source,
            })?;
        let admin = TcpListener::bind(config.admin.listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: config.admin.listen,
                source,
            })?;
        let tls = config
            .listeners
            .tls
            .as_ref()
            .map(TlsConfig::server_config)
            .transpose()?;
        let uds = match &config.listeners.uds {
            Some(uds) => Some(bind_uds(uds)?),
            None => None,
        };
        Ok(Server {
            config,
            grpc,
            admin,
            uds,
            tls,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.grpc.local_addr()
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
            grpc,
            admin,
            uds,
            tls,
        } = self;
        // The recorder must exist before any handle is registered.
        telemetry::prometheus();
        let decision_metrics = Arc::new(DecisionMetrics::register());
        let reload_metrics = Arc::new(ReloadMetrics::register());
        // With an identity source the entity data comes from the sync, and
        // nothing is served before its first full sync.
        let identity = config.identity.clone().filter(IdentityConfig::has_source);
        if identity
            .as_ref()
            .is_some_and(|identity| identity.postgres.is_some() && identity.scim.is_some())
        {
            return Err(ServeError::Identity(IdentityError::Config {
                key: "identity",
                message: "configure one source: `[identity.postgres]` or `[identity.scim]`".into(),
            }));
        }
        let postgres = identity
            .as_ref()
            .and_then(|identity| identity.postgres.as_ref())
            .map(|postgres| postgres.build())
            .transpose()?;
        let scim = identity
            .as_ref()
            .and_then(|identity| identity.scim.as_ref())
            .map(|scim| scim.build())
            .transpose()?;
        let sync_status = identity
            .as_ref()
            .map(|identity| Arc::new(SyncStatus::new(identity.max_staleness())));
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
        let default_spool = std::env::temp_dir().join(format!(
            "arbiter-spool-{}",
            grpc.local_addr()
                .map_or(config.listeners.listen.port(), |a| a.port())
        ));
        let decision_log = DecisionLog::start(&config.decision_log, &default_spool).await?;
        let status = Arc::new(LoadStatus::default());
        let serving = Arc::new(AtomicBool::new(false));

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        set_health(&health_reporter, ServingStatus::NotServing).await;

        let mut reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        // Reflection lists the services of the files it holds: Envoy's only
        // when its service is mounted.
        if config.listeners.ext_authz.is_some() {
            reflection = reflection.register_encoded_file_descriptor_set(
                crate::proto::ENVOY_EXT_AUTHZ_FILE_DESCRIPTOR_SET,
            );
        }
        let reflection = reflection
            .build_v1()
            .map_err(|error| ServeError::InitialLoad(LoadError::one("<reflection>", error)))?;

        let grpc_addr = grpc.local_addr().map_or_else(
            |_| config.listeners.listen.to_string(),
            |addr| addr.to_string(),
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let grpc_stop = wait_for_stop(stop_rx.clone());
        let mut authorizer = AuthorizerService::new(engine.clone(), decision_metrics.clone())
            .with_decision_log(decision_log.logger())
            .with_heavy_pool(crate::adapter::heavy::HeavyPool::new(
                config.load.limits.heavy_workers,
                config.load.limits.heavy_queue,
            ));
        if let (Some(identity), Some(status)) = (&identity, &sync_status) {
            authorizer = authorizer.with_identity(status.clone(), identity.revision_wait());
        }
        let mut routes = tonic::service::Routes::new(health_service)
            .add_service(reflection)
            .add_service(
                AuthorizerServer::new(authorizer)
                    .max_decoding_message_size(config.listeners.transport.max_message_bytes),
            )
            .add_service(
                DecisionLogServer::new(DecisionLogService::new(
                    decision_log.tail_source(),
                    stop_rx.clone(),
                ))
                .max_decoding_message_size(config.listeners.transport.max_message_bytes),
            );
        if let Some(ext_authz) = &config.listeners.ext_authz {
            let service = ext_authz
                .build(engine.clone(), decision_metrics.clone())?
                .with_decision_log(decision_log.logger());
            routes = routes.add_service(
                service
                    .into_server()
                    .max_decoding_message_size(config.listeners.transport.max_message_bytes),
            );
        }
        // Both listeners share one in-flight count.
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let transport = &config.listeners.transport;
        let server = || {
            tonic::transport::Server::builder()
                .max_concurrent_streams(transport.max_concurrent_streams)
                .http2_max_header_list_size(transport.max_header_list_bytes)
                .http2_keepalive_interval(Some(transport.keepalive_interval))
                .http2_keepalive_timeout(Some(transport.keepalive_timeout))
        };
        let mut builder = server();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        let mut builder = builder.layer(AdmissionLayer::new(
            "tcp",
            &config.listeners.admission,
            in_flight.clone(),
        ));
        let grpc_server = tokio::spawn(
            builder
                .add_routes(routes.clone())
                .serve_with_incoming_shutdown(nodelay(TcpListenerStream::new(grpc)), grpc_stop),
        );
        // The same services on the Unix socket, drained with the TCP ones.
        let uds_server = uds.map(|listener| {
            tokio::spawn(
                server()
                    .layer(AdmissionLayer::new(
                        "uds",
                        &config.listeners.admission,
                        in_flight,
                    ))
                    .add_routes(routes)
                    .serve_with_incoming_shutdown(
                        tokio_stream::StreamExt::map(
                            tokio_stream::wrappers::UnixListenerStream::new(listener),
                            |stream| stream.map(Unvectored),
                        ),
                        wait_for_stop(stop_rx.clone()),
                    ),
            )
        });
        let admin_state = AdminState {
            engine: engine.clone(),
            status: status.clone(),
            serving: serving.clone(),
            identity: sync_status.clone(),
        };
        let admin_server = tokio::spawn(admin::serve(
            admin,
            admin_state,
            wait_for_stop(stop_rx.clone()),
        ));

        let sync = match (postgres, scim, &sync_status) {
            (Some(source), _, Some(status)) => Some(tokio::spawn(crate::identity::postgres::run(
                source,
                engine.clone(),
                status.clone(),
                stop_rx.clone(),
            ))),
            (None, Some(source), Some(status)) => Some(tokio::spawn(crate::identity::scim::run(
                source,
                engine.clone(),
                status.clone(),
                stop_rx.clone(),
            ))),
            _ => None,
        };

        // First load, off the async workers: files may be large or slow. The
        // watcher's baseline is taken first, so no edit falls in between.
        let baseline = {
            let paths = config.reload.sources.watched_paths();
            tokio::task::spawn_blocking(move || reload::Fingerprint::of(&paths)).await?
        };
        let initial = {
            let engine = engine.clone();
            let sources = config.reload.sources.clone();
            let metrics = reload_metrics.clone();
            let status = status.clone();
            let options = config.load;
            tokio::task::spawn_blocking(move || {
                reload::load_and_publish(&engine, &sources, options, &metrics, &status)
            })
        };
        tokio::pin!(shutdown);
        let loaded = tokio::select! {
            loaded = initial => Some(loaded?),
            () = &mut shutdown => None,
        };
        // Readiness also waits for the first full identity sync (the sync
        // retries with backoff meanwhile).
        let loaded = match (loaded, &sync_status) {
            (Some(Ok(())), Some(status)) => {
                let synced = async {
                    while !status.is_synced() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                };
                tokio::select! {
                    () = synced => Some(Ok(())),
                    () = &mut shutdown => None,
                }
            }
            (loaded, _) => loaded,
        };
        match loaded {
            Some(Err(error)) => {
                end_health_watches(health_reporter).await;
                let _ = stop_tx.send(true);
                let stopped = tokio::time::timeout(config.shutdown_grace, async {
                    let _ = grpc_server.await;
                    let _ = admin_server.await;
                })
                .await;
                if stopped.is_err() {
                    tracing::warn!("listeners did not close within the grace period");
                }
                decision_log.shutdown(Duration::from_secs(1)).await;
                return Err(ServeError::InitialLoad(error));
            }
            Some(Ok(())) => {
                serving.store(true, Ordering::Release);
                set_health(&health_reporter, ServingStatus::Serving).await;
                tracing::info!(
                    listen = %grpc_addr,
                    "serving arbiter.v1.Authorizer{}",
                    if config.reload.sources.is_embedded() { " on the embedded default policy set" } else { "" }
                );
                let watcher = tokio::spawn(reload::watch_files(
                    baseline,
                    engine.clone(),
                    config.reload.sources.clone(),
                    config.load,
                    config.reload.interval,
                    reload_metrics.clone(),
                    status.clone(),
                    stop_rx.clone(),
                ));
                // Past the maximum staleness, health reports NOT_SERVING
                // (decisions continue from the cache and say so).
                let freshness = sync_status.clone().map(|status| {
                    let reporter = health_reporter.clone();
                    let mut stop = stop_rx.clone();
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
                                set_health(&reporter, if fresh { ServingStatus::Serving } else { ServingStatus::NotServing }).await;
                            }
                        }
                    })
                });
                shutdown.await;
                drop(watcher);
                if let Some(freshness) = freshness {
                    freshness.abort();
                }
            }
            None => {}
        }

        if let Some(sync) = sync {
            sync.abort();
        }
        tracing::info!("shutting down: draining in-flight calls");
        serving.store(false, Ordering::Release);
        set_health(&health_reporter, ServingStatus::NotServing).await;
        // Watchers (kubelet, Envoy) have now seen NOT_SERVING; end their
        // streams so open health watches do not hold the drain open.
        end_health_watches(health_reporter).await;
        let _ = stop_tx.send(true);
        let drain_started = tokio::time::Instant::now();
        let drained = tokio::time::timeout(config.shutdown_grace, async {
            let grpc = grpc_server.await;
            if let Some(uds_server) = uds_server {
                let _ = uds_server.await;
            }
            let _ = admin_server.await;
            grpc
        })
        .await;
        if let Some(uds) = &config.listeners.uds {
            let _ = std::fs::remove_file(&uds.path);
        }
        let outcome = match drained {
            Ok(result) => result
                .map_err(ServeError::from)
                .and_then(|served| served.map_err(ServeError::from)),
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

async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status("arbiter.v1.Authorizer", status)
        .await;
    reporter
        .set_service_status(ext_authz::SERVICE_NAME, status)
        .await;
}

/// Binds the Unix socket: a stale socket file from an earlier run is
/// replaced (any other file is left alone and is an error), then the
/// configured permissions are set.
fn bind_uds(config: &UdsConfig) -> Result<tokio::net::UnixListener, ServeError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let error = |source| ServeError::BindUds {
        path: config.path.clone(),
        source,
    };
    if std::fs::symlink_metadata(&config.path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(&config.path).map_err(error)?;
    }
    let listener = tokio::net::UnixListener::bind(&config.path).map_err(error)?;
    std::fs::set_permissions(&config.path, std::fs::Permissions::from_mode(config.mode))
        .map_err(error)?;
    Ok(listener)
}

/// Ends every open health `Watch` stream (after they were told NOT_SERVING).
async fn end_health_watches(mut reporter: tonic_health::server::HealthReporter) {
    tokio::task::yield_now().await;
    reporter.clear_service_status("").await;
    reporter.clear_service_status("arbiter.v1.Authorizer").await;
    reporter.clear_service_status(ext_authz::SERVICE_NAME).await;
}

/// Accepted TCP connections with `TCP_NODELAY`: a gRPC answer written in
/// more than one segment (ext_authz responses with headers and metadata)
/// must not wait ~40 ms for a delayed ACK (Nagle). `serve_with_incoming`
/// does not set it.
/// Also unvectored, so that h2 batches small answers ([`Unvectored`]).
fn nodelay(
    incoming: TcpListenerStream,
) -> impl tokio_stream::Stream<Item = std::io::Result<Unvectored<tokio::net::TcpStream>>> {
    use tokio_stream::StreamExt;
    incoming.map(|stream| {
        let stream = stream?;
        stream.set_nodelay(true)?;
        Ok(Unvectored(stream))
    })
}

async fn wait_for_stop(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}
