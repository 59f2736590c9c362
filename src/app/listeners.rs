//! The gRPC listeners: TCP (plain or TLS, `TCP_NODELAY`) and, optionally,
//! a Unix socket. Both serve the same routes behind one admission layer
//! each, share one in-flight count, and drain together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

use crate::adapter::admission::{AdmissionConfig, AdmissionLayer};
use crate::adapter::connection::Unvectored;
use crate::adapter::ext_authz::ExtAuthzConfig;

use super::ServeError;
use super::stop::wait_for_stop;

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

/// Binds the TCP listener (port 0 picks a free port).
pub(super) async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// The gRPC listeners, bound, not yet serving.
#[derive(Debug)]
pub struct Listeners {
    config: ListenerConfig,
    tcp: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    uds: Option<UnixListener>,
}

impl Listeners {
    /// Reads the TLS files and binds the Unix socket beside the bound TCP
    /// listener.
    pub(super) fn bind(tcp: TcpListener, config: &ListenerConfig) -> Result<Self, ServeError> {
        let tls = config
            .tls
            .as_ref()
            .map(TlsConfig::server_config)
            .transpose()?;
        let uds = config.uds.as_ref().map(bind_uds).transpose()?;
        Ok(Listeners {
            config: config.clone(),
            tcp,
            tls,
            uds,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Serves `routes` on every listener until `stop` turns true; each
    /// listener then finishes its in-flight calls.
    pub(super) fn start(
        self,
        routes: tonic::service::Routes,
        stop: &watch::Receiver<bool>,
    ) -> Result<RunningListeners, ServeError> {
        let Listeners {
            config,
            tcp,
            tls,
            uds,
        } = self;
        // Both listeners share one in-flight count.
        let in_flight = Arc::new(AtomicUsize::new(0));
        let transport = &config.transport;
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
            &config.admission,
            in_flight.clone(),
        ));
        let tcp = tokio::spawn(
            builder
                .add_routes(routes.clone())
                .serve_with_incoming_shutdown(
                    nodelay(TcpListenerStream::new(tcp)),
                    wait_for_stop(stop.clone()),
                ),
        );
        // The same services on the Unix socket, drained with the TCP ones.
        let uds = uds.map(|listener| {
            tokio::spawn(
                server()
                    .layer(AdmissionLayer::new("uds", &config.admission, in_flight))
                    .add_routes(routes)
                    .serve_with_incoming_shutdown(
                        tokio_stream::StreamExt::map(UnixListenerStream::new(listener), |stream| {
                            stream.map(Unvectored)
                        }),
                        wait_for_stop(stop.clone()),
                    ),
            )
        });
        Ok(RunningListeners {
            tcp,
            uds,
            socket: config.uds.map(|uds| uds.path),
        })
    }
}

type Served = JoinHandle<Result<(), tonic::transport::Error>>;

/// Listeners that are serving.
#[derive(Debug)]
pub(super) struct RunningListeners {
    tcp: Served,
    uds: Option<Served>,
    /// Removed once the listeners have stopped.
    socket: Option<PathBuf>,
}

impl RunningListeners {
    /// Waits until both listeners have finished their calls (after `stop`);
    /// the TCP listener's outcome.
    pub(super) async fn stopped(&mut self) -> Result<(), ServeError> {
        let tcp = (&mut self.tcp).await;
        if let Some(uds) = self.uds.as_mut() {
            let _ = uds.await;
        }
        Ok(tcp??)
    }

    /// Removes the socket file, whether or not the calls finished.
    pub(super) fn remove_socket(&self) {
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds the Unix socket: a stale socket file from an earlier run is
/// replaced (any other file is left alone and is an error), then the
/// configured permissions are set.
fn bind_uds(config: &UdsConfig) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let error = |source| ServeError::BindUds {
        path: config.path.clone(),
        source,
    };
    if std::fs::symlink_metadata(&config.path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(&config.path).map_err(error)?;
    }
    let listener = UnixListener::bind(&config.path).map_err(error)?;
    std::fs::set_permissions(&config.path, std::fs::Permissions::from_mode(config.mode))
        .map_err(error)?;
    Ok(listener)
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
