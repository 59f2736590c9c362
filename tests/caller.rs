//! The decision log names the caller as the transport knows it: the
//! verified mTLS client identity on a TLS listener (a SPIFFE id, from a
//! certificate chain made here with a real CA), the peer credentials on a
//! Unix socket. A client without a certificate, or with one from another
//! CA, gets no decision at all.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use arbiter::adapter::admission::CallerPattern;
use arbiter::app::{ServeConfig, TlsConfig, UdsConfig};
use arbiter::decision_log::{DecisionLogConfig, SinkConfig};
use arbiter::proto::v1::authorizer_client::AuthorizerClient;
use arbiter::proto::v1::decision_log_client::DecisionLogClient;
use arbiter::proto::v1::{CheckRequest, Decision, EntityUid, TailRequest};
use common::TestServer;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const SPIFFE_ID: &str = "spiffe://example.org/ns/docs/sa/frontend";

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// (certificate PEM, key PEM) issued by `ca`.
fn leaf(ca: &Ca, dns: &[&str], uri: Option<&str>, cn: &str) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    if let Some(uri) = uri {
        params
            .subject_alt_names
            .push(SanType::URI(uri.try_into().unwrap()));
    }
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A leaf valid only in 2020: expired.
fn expired_leaf(ca: &Ca, uri: &str) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "expired");
    params
        .subject_alt_names
        .push(SanType::URI(uri.try_into().unwrap()));
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 12, 31);
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn logged_config(dir: &Path) -> (ServeConfig, PathBuf) {
    let log = dir.join("decisions.jsonl");
    let mut config = common::config(Default::default());
    config.decision_log = DecisionLogConfig {
        spool_dir: Some(dir.join("spool")),
        sinks: vec![SinkConfig::File {
            name: None,
            path: log.clone(),
            max_bytes: None,
            max_files: None,
        }],
        ..DecisionLogConfig::default()
    };
    (config, log)
}

fn request() -> CheckRequest {
    let uid = |t: &str, id: &str| {
        Some(EntityUid {
            r#type: t.into(),
            id: id.into(),
        })
    };
    CheckRequest {
        principal: uid("Saas::User", "carol"),
        action: uid("Saas::Action", "read"),
        resource: uid("Saas::Document", "acme-roadmap"),
        context_json: r#"{"mfa": true, "source_ip": "10.1.2.3"}"#.into(),
        ..Default::default()
    }
}

/// The first record in the file sink whose decision id is `id`.
async fn record(log: &Path, id: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(record) = text
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .find(|record| record["decision_id"] == id)
        {
            return record;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} never logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ready(server: &TestServer) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while server.admin_get("/ready").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn tls_channel(
    server: &TestServer,
    ca_pem: &str,
    client: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_callers_are_named_by_their_spiffe_id_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("arbiter test CA");
    let (server_cert, server_key) = leaf(&ca, &["localhost"], None, "arbiter");
    let (mut config, log) = logged_config(dir.path());
    config.listeners.tls = Some(TlsConfig {
        cert: write(dir.path(), "server.pem", &server_cert),
        key: write(dir.path(), "server.key", &server_key),
        client_ca: Some(write(dir.path(), "ca.pem", &ca.pem)),
    });
    let server = TestServer::spawn(config).await;
    ready(&server).await;

    // A workload certificate with a SPIFFE id (and a DNS name, which loses).
    let frontend = leaf(&ca, &["frontend.docs.svc"], Some(SPIFFE_ID), "frontend");
    let mut client = AuthorizerClient::new(
        tls_channel(&server, &ca.pem, Some(&frontend))
            .await
            .unwrap(),
    );
    let answer = client.check(request()).await.unwrap().into_inner();
    assert_eq!(answer.decision(), Decision::Allow);
    let logged = record(&log, &answer.decision_id).await;
    assert_eq!(logged["caller"]["tls_identity"], SPIFFE_ID);
    assert!(
        logged["caller"]["peer_address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );

    // Without a SPIFFE id: the DNS name, then the subject.
    for (dns, expected) in [
        (&["batch.docs.svc"][..], "dns:batch.docs.svc"),
        (&[][..], "cn:reporting"),
    ] {
        let cert = leaf(&ca, dns, None, "reporting");
        let mut client =
            AuthorizerClient::new(tls_channel(&server, &ca.pem, Some(&cert)).await.unwrap());
        let answer = client.check(request()).await.unwrap().into_inner();
        let logged = record(&log, &answer.decision_id).await;
        assert_eq!(logged["caller"]["tls_identity"], expected);
    }

    // No client certificate, a certificate from another CA, plaintext:
    // no decision is made.
    let stranger_ca = new_ca("someone else's CA");
    let stranger = leaf(&stranger_ca, &[], Some(SPIFFE_ID), "frontend");
    for client_cert in [None, Some(&stranger)] {
        let refused = match tls_channel(&server, &ca.pem, client_cert).await {
            Err(_) => true,
            Ok(channel) => AuthorizerClient::new(channel)
                .check(request())
                .await
                .is_err(),
        };
        assert!(
            refused,
            "a client without a valid certificate got an answer"
        );
    }
    let plaintext = match AuthorizerClient::connect(format!("http://{}", server.addr)).await {
        Err(_) => true,
        Ok(mut client) => client.check(request()).await.is_err(),
    };
    assert!(
        plaintext,
        "a plaintext client got an answer from the TLS listener"
    );
    server.stop().await.unwrap();
}

/// `arbiter_callers_refused_total{listener=...}` as /metrics shows it.
async fn refused_count(server: &TestServer, listener: &str) -> u64 {
    let (_, metrics) = server.admin_get("/metrics").await;
    let series = format!("arbiter_callers_refused_total{{listener=\"{listener}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_callers_get_answers_on_the_tls_listener() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("arbiter test CA");
    let (server_cert, server_key) = leaf(&ca, &["localhost"], None, "arbiter");
    let mut config = common::config(Default::default());
    config.listeners.tls = Some(TlsConfig {
        cert: write(dir.path(), "server.pem", &server_cert),
        key: write(dir.path(), "server.key", &server_key),
        client_ca: Some(write(dir.path(), "ca.pem", &ca.pem)),
    });
    config.listeners.admission.allowed_callers = Some(
        [
            SPIFFE_ID,
            "spiffe://example.org/ns/batch/*",
            "*.reports.svc",
        ]
        .iter()
        .map(|p| CallerPattern::parse(p).unwrap())
        .collect(),
    );
    let server = TestServer::spawn(config).await;
    ready(&server).await;

    // Allowed: the exact SPIFFE id, a URI prefix, a DNS wildcard.
    for cert in [
        leaf(&ca, &[], Some(SPIFFE_ID), "frontend"),
        leaf(
            &ca,
            &[],
            Some("spiffe://example.org/ns/batch/sa/nightly"),
            "nightly",
        ),
        leaf(&ca, &["weekly.reports.svc"], None, "weekly"),
    ] {
        let mut client =
            AuthorizerClient::new(tls_channel(&server, &ca.pem, Some(&cert)).await.unwrap());
        let answer = client.check(request()).await.unwrap().into_inner();
        assert_eq!(answer.decision(), Decision::Allow);
    }
    assert_eq!(refused_count(&server, "tcp").await, 0);

    // Signed by the CA, but not allowed: refused naming what it presented,
    // on every call (the verdict is cached, the refusal still counted).
    let intruder_id = "spiffe://example.org/ns/docs/sa/intruder";
    let intruder = leaf(&ca, &["reports.svc"], Some(intruder_id), "intruder");
    let mut client = AuthorizerClient::new(
        tls_channel(&server, &ca.pem, Some(&intruder))
            .await
            .unwrap(),
    );
    for _ in 0..2 {
        let status = client.check(request()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status.message().contains(intruder_id),
            "{}",
            status.message()
        );
        assert!(status.message().contains("tls.allowed_callers"));
    }
    // The decision-log tail is behind the same check.
    let tail = DecisionLogClient::new(
        tls_channel(&server, &ca.pem, Some(&intruder))
            .await
            .unwrap(),
    )
    .tail(TailRequest::default())
    .await
    .unwrap_err();
    assert_eq!(tail.code(), tonic::Code::PermissionDenied);
    assert_eq!(refused_count(&server, "tcp").await, 3);

    // Expired, or from another CA: refused at the handshake, whatever the
    // SAN says.
    let stranger_ca = new_ca("someone else's CA");
    for cert in [
        expired_leaf(&ca, SPIFFE_ID),
        leaf(&stranger_ca, &[], Some(SPIFFE_ID), "frontend"),
    ] {
        let refused = match tls_channel(&server, &ca.pem, Some(&cert)).await {
            Err(_) => None,
            Ok(channel) => Some(AuthorizerClient::new(channel).check(request()).await),
        };
        match refused {
            None => {}
            Some(Err(status)) => assert_ne!(status.code(), tonic::Code::PermissionDenied),
            Some(Ok(_)) => panic!("a certificate the handshake should refuse got an answer"),
        }
    }
    // Health needs no allowed certificate (probes).
    let health = tonic_health::pb::health_client::HealthClient::new(
        tls_channel(&server, &ca.pem, Some(&intruder))
            .await
            .unwrap(),
    )
    .check(tonic_health::pb::HealthCheckRequest::default())
    .await;
    assert!(health.is_ok());
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_uids_get_answers_on_the_unix_socket() {
    // The peer is this process: allowed when its uid is listed, refused
    // when only another uid is.
    let dir = tempfile::tempdir().unwrap();
    let own_uid = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir.path()).unwrap().uid()
    };
    for (allowed, admitted) in [
        (vec![own_uid + 1, own_uid], true),
        (vec![own_uid + 1], false),
    ] {
        let socket = dir.path().join(format!("arbiter-{admitted}.sock"));
        let mut config = common::config(Default::default());
        config.listeners.uds = Some(UdsConfig {
            path: socket.clone(),
            mode: 0o600,
        });
        config.listeners.admission.allowed_uids = Some(allowed);
        let server = TestServer::start(config).await;
        let answer = AuthorizerClient::new(common::uds_channel(&socket).await)
            .check(request())
            .await;
        if admitted {
            assert_eq!(answer.unwrap().into_inner().decision(), Decision::Allow);
            assert_eq!(refused_count(&server, "uds").await, 0);
        } else {
            let status = answer.unwrap_err();
            assert_eq!(status.code(), tonic::Code::PermissionDenied);
            assert!(
                status.message().contains(&format!("uid={own_uid}")),
                "{}",
                status.message()
            );
            assert!(refused_count(&server, "uds").await >= 1);
        }
        // The TCP listener has no uid check.
        let tcp = server.client().await.check(request()).await;
        assert!(tcp.is_ok());
        server.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_callers_are_named_by_their_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("arbiter.sock");
    let (mut config, log) = logged_config(dir.path());
    config.listeners.uds = Some(UdsConfig {
        path: socket.clone(),
        mode: 0o600,
    });
    let server = TestServer::start(config).await;
    let channel = common::uds_channel(&socket).await;
    let answer = AuthorizerClient::new(channel)
        .check(request())
        .await
        .unwrap()
        .into_inner();
    let logged = record(&log, &answer.decision_id).await;
    // This test process is the peer.
    let uid = std::fs::metadata(dir.path()).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid()
    });
    let expected = format!("pid={} uid={}", std::process::id(), uid.unwrap());
    let uds_peer = logged["caller"]["uds_peer"].as_str().unwrap();
    assert!(uds_peer.starts_with(&expected), "{uds_peer} vs {expected}");
    assert!(logged["caller"].get("peer_address").is_none());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn bad_tls_files_are_refused_at_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("arbiter test CA");
    let (cert, key) = leaf(&ca, &["localhost"], None, "arbiter");
    let cert = write(dir.path(), "server.pem", &cert);
    let key = write(dir.path(), "server.key", &key);
    let missing = dir.path().join("missing.key");
    let not_pem = write(dir.path(), "ca.txt", "hello");
    for (tls, named) in [
        (
            TlsConfig {
                cert: cert.clone(),
                key: missing.clone(),
                client_ca: None,
            },
            &missing,
        ),
        (
            TlsConfig {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: Some(not_pem.clone()),
            },
            &not_pem,
        ),
        (
            TlsConfig {
                cert: not_pem.clone(),
                key: key.clone(),
                client_ca: None,
            },
            &not_pem,
        ),
    ] {
        let mut config = common::config(Default::default());
        config.listeners.tls = Some(tls);
        let error = arbiter::app::Server::bind(config).await.unwrap_err();
        let message = error.to_string();
        assert!(message.contains(&named.display().to_string()), "{message}");
    }
}
