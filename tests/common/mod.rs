//! Test harness: a real Arbiter server on `127.0.0.1:0`, in-process, and a
//! real gRPC client connected to it over TCP.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use arbiter::app::{ReloadConfig, ServeConfig, ServeError, Server};
use arbiter::engine::Sources;
use arbiter::proto::v1::authorizer_client::AuthorizerClient;
use arbiter::proto::v1::{CheckRequest, EntityUid};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub struct TestServer {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub handle: JoinHandle<Result<(), ServeError>>,
}

/// A config that listens on free ports and reloads quickly.
pub fn config(sources: Sources) -> ServeConfig {
    let mut config = ServeConfig {
        shutdown_grace: Duration::from_secs(10),
        // Tests that log decisions turn it on with their own temp spool.
        decision_log: arbiter::decision_log::DecisionLogConfig::disabled(),
        ..ServeConfig::default()
    };
    config.reload = ReloadConfig {
        sources,
        interval: Duration::from_millis(50),
    };
    config.listeners.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config
}

pub fn file_sources(dir: &Path) -> Sources {
    Sources {
        policies: Some(dir.join("policies.cedar")),
        schema: Some(dir.join("schema.cedarschema")),
        entities: Some(dir.join("entities.json")),
        ..Default::default()
    }
}

impl TestServer {
    /// Starts a server and returns once its listeners are bound (it may
    /// still be loading).
    pub async fn spawn(config: ServeConfig) -> TestServer {
        let server = Server::bind(config).await.expect("bind");
        let addr = server.local_addr().unwrap();
        let admin = server.admin_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            admin,
            stop: Some(stop),
            handle,
        }
    }

    /// Starts a server and waits until its health says SERVING.
    pub async fn start(config: ServeConfig) -> TestServer {
        let server = Self::spawn(config).await;
        server.wait_for(ServingStatus::Serving).await;
        server
    }

    pub async fn start_embedded() -> TestServer {
        Self::start(config(Sources::default())).await
    }

    pub async fn client(&self) -> AuthorizerClient<Channel> {
        AuthorizerClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
    }

    pub async fn health(&self) -> ServingStatus {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect health");
        let mut client = HealthClient::new(channel);
        let response = client
            .check(HealthCheckRequest {
                service: "arbiter.v1.Authorizer".into(),
            })
            .await
            .expect("health check");
        response.into_inner().status()
    }

    pub async fn wait_for(&self, status: ServingStatus) {
        self.wait_for_within(status, Duration::from_secs(20)).await;
    }

    pub async fn wait_for_within(&self, status: ServingStatus, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.health().await == status {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server never reported {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asks the server to drain and returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.handle).await.expect("server task")
    }

    /// Waits for the server to end on its own (e.g. a failed first load).
    pub async fn finished(mut self) -> Result<(), ServeError> {
        (&mut self.handle).await.expect("server task")
    }

    /// GET on the admin listener: (status code, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let text = String::from_utf8_lossy(&raw).to_string();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (code, body)
    }
}

pub fn uid(type_name: &str, id: &str) -> Option<EntityUid> {
    Some(EntityUid {
        r#type: type_name.into(),
        id: id.into(),
    })
}

/// A request against the embedded example (`Saas` namespace), with a
/// context that passes the MFA and network guardrails.
pub fn saas(principal: &str, action: &str, resource_type: &str, resource: &str) -> CheckRequest {
    CheckRequest {
        principal: uid("Saas::User", principal),
        action: uid("Saas::Action", action),
        resource: uid(&format!("Saas::{resource_type}"), resource),
        context_json: r#"{"mfa": true, "source_ip": "10.1.2.3"}"#.into(),
        entities_json: String::new(),
        ..Default::default()
    }
}
pub mod nats;
pub mod raw;

/// A gRPC channel to a server's Unix-domain socket.
pub async fn uds_channel(socket: &Path) -> Channel {
    let path = socket.to_path_buf();
    tonic::transport::Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// Whether a call that failed around SIGTERM was one the server never
/// started: refused as the drain began (HTTP/2 GOAWAY or REFUSED_STREAM for
/// a stream it had not read), not sent because the connection was closing
/// (hyper's `Canceled`), or sent on a new connection once the listener
/// closed. The client's clock cannot tell those from calls the server had
/// started (the request may still be in transit), so the failure itself
/// must say so.
pub fn never_started(status: &tonic::Status) -> bool {
    let text = format!("{status:?}");
    match status.code() {
        tonic::Code::Unavailable => {
            text.contains("refused stream") || text.contains("tcp connect error")
        }
        tonic::Code::Cancelled => text.contains("hyper::Error(Canceled"),
        tonic::Code::Internal => text.contains("GoAway("),
        _ => false,
    }
}

/// Reads the log of a spawned `arbiter serve` until it serves gRPC, and
/// returns the address it logged; the rest of the log stays in `lines`.
pub async fn served_grpc_address(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
) -> String {
    let mut grpc = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(rest) = line.split("grpc=").nth(1) {
            grpc = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.contains("serving arbiter.v1.Authorizer") {
            break;
        }
    }
    grpc.expect("the server logs its gRPC address")
}
