//! Limits on the gRPC listeners (issue 22, point 4): the message size, the
//! calls in flight (shed, never queued), an expired deadline, and the
//! bounded quoting of input in error messages. Each against a real server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::raw::RawCodec;

use std::time::Duration;

use arbiter::proto::v1::{CheckRequest, Decision};
use common::TestServer;
use prost::Message;
use tonic::transport::Channel;

const CHECK: &str = "/arbiter.v1.Authorizer/Check";

async fn channel(server: &TestServer) -> Channel {
    Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn allowed() -> CheckRequest {
    common::saas("bob", "write", "Document", "acme-roadmap")
}

/// `arbiter_requests_shed_total{reason=...}` as /metrics shows it.
async fn shed_count(server: &TestServer, reason: &str) -> u64 {
    let (_, metrics) = server.admin_get("/metrics").await;
    let series = format!("arbiter_requests_shed_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test]
async fn a_message_one_byte_over_the_limit_is_out_of_range() {
    const LIMIT: usize = 64 * 1024;
    let mut config = common::config(Default::default());
    config.listeners.transport.max_message_bytes = LIMIT;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let sized = |len: usize| {
        let mut request = allowed();
        let base = request.encoded_len();
        // The context's length prefix grows with it: adjust until exact.
        let mut pad = len - base;
        loop {
            request.context_json = format!("{{\"pad\":\"{}\"}}", "x".repeat(pad));
            match request.encoded_len().cmp(&len) {
                std::cmp::Ordering::Equal => return request,
                std::cmp::Ordering::Greater => pad -= request.encoded_len() - len,
                std::cmp::Ordering::Less => pad += len - request.encoded_len(),
            }
        }
    };
    let at_limit = client.check(sized(LIMIT)).await.unwrap_err();
    // Read, then refused for its content, not its size.
    assert_eq!(
        at_limit.code(),
        tonic::Code::InvalidArgument,
        "{at_limit:?}"
    );
    let over = client.check(sized(LIMIT + 1)).await.unwrap_err();
    assert_eq!(over.code(), tonic::Code::OutOfRange, "{over:?}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_max_in_flight_are_shed_at_once() {
    let mut config = common::config(Default::default());
    config.listeners.admission.max_in_flight = 1;
    let server = TestServer::start(config).await;
    // A call whose message never comes holds its slot.
    let mut grpc = tonic::client::Grpc::new(channel(&server).await);
    grpc.ready().await.unwrap();
    let held = tokio::spawn(async move {
        grpc.client_streaming(
            tonic::Request::new(tokio_stream::pending::<Vec<u8>>()),
            tonic::codegen::http::uri::PathAndQuery::from_static(CHECK),
            RawCodec,
        )
        .await
    });
    let mut client = server.client().await;
    // Once the held call has arrived, the next is shed.
    let shed = loop {
        match client.check(allowed()).await {
            Ok(_) => tokio::task::yield_now().await,
            Err(status) => break status,
        }
    };
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");
    assert!(
        shed.message().contains("max_in_flight"),
        "{}",
        shed.message()
    );
    assert!(shed_count(&server, "in_flight").await >= 1);
    // Gone, it gives its slot back.
    held.abort();
    let answer = loop {
        match client.check(allowed()).await {
            Ok(answer) => break answer.into_inner(),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    assert_eq!(answer.decision(), Decision::Allow);
    server.stop().await.unwrap();
}

/// A Check sent over plain HTTP/2 with this `grpc-timeout` (tonic's
/// client ends a call with an expired deadline itself, never sending it);
/// the answer's `grpc-status`.
async fn check_with_timeout(server: &TestServer, timeout: &str) -> String {
    check_with_timeout_on(server, timeout, None).await
}

/// As [`check_with_timeout`]; with `streams`, also checks the server's
/// announced `SETTINGS_MAX_CONCURRENT_STREAMS` once the answer is in.
async fn check_with_timeout_on(
    server: &TestServer,
    timeout: &str,
    streams: Option<usize>,
) -> String {
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let announced = client.clone();
    let request = tonic::codegen::http::Request::post(format!("http://{}{CHECK}", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    let message = allowed().encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    body.send_data(frame.into(), true).unwrap();
    let response = response.await.unwrap();
    if let Some(streams) = streams {
        assert_eq!(announced.current_max_send_streams(), streams);
    }
    if let Some(status) = response.headers().get("grpc-status") {
        return status.to_str().unwrap().to_owned();
    }
    let mut body = response.into_body();
    while body.data().await.is_some() {}
    let trailers = body.trailers().await.unwrap().unwrap();
    trailers["grpc-status"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_call_whose_deadline_has_passed_is_not_evaluated() {
    let server = TestServer::start(common::config(Default::default())).await;
    // DEADLINE_EXCEEDED is 4, answered by the admission layer before any
    // service sees the call (the metrics recorder is shared by the tests of
    // this binary, so the decision count cannot show it here).
    assert_eq!(check_with_timeout(&server, "0n").await, "4");
    assert!(shed_count(&server, "deadline").await >= 1);
    // A live deadline is served (OK is 0).
    assert_eq!(check_with_timeout(&server, "30S").await, "0");
    server.stop().await.unwrap();
}

/// The example set in a temp directory: a policies directory, the schema
/// and the entities file.
fn example_set(dir: &std::path::Path) -> arbiter::engine::Sources {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let policies = dir.join("policies");
    std::fs::create_dir(&policies).unwrap();
    for entry in std::fs::read_dir(&repo).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cedar") {
            std::fs::copy(&path, policies.join(path.file_name().unwrap())).unwrap();
        }
    }
    for file in ["schema.cedarschema", "entities.json"] {
        std::fs::copy(repo.join(file), dir.join(file)).unwrap();
    }
    arbiter::engine::Sources {
        policies: Some(policies),
        schema: Some(dir.join("schema.cedarschema")),
        entities: Some(dir.join("entities.json")),
        ..Default::default()
    }
}

async fn ready(server: &TestServer) -> serde_json::Value {
    serde_json::from_str(&server.admin_get("/ready").await.1).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_no_policies_is_refused_unless_allowed() {
    for allow in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let sources = example_set(dir.path());
        let policies = sources.policies.clone().unwrap();
        let mut config = common::config(sources);
        config.load.allow_empty_policies = allow;
        let server = TestServer::start(config).await;
        let loaded = ready(&server).await["policies"].as_u64().unwrap();
        assert!(loaded > 0);
        // The volume is emptied (an unmounted ConfigMap).
        for entry in std::fs::read_dir(&policies).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            let status = ready(&server).await;
            let settled = if allow {
                status["policies"] == 0
            } else {
                !status["last_reload_error"].is_null()
            };
            if settled {
                break status;
            }
            assert!(tokio::time::Instant::now() < deadline, "{status}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let answer = server
            .client()
            .await
            .check(allowed())
            .await
            .unwrap()
            .into_inner();
        if allow {
            assert_eq!(answer.decision(), Decision::Deny);
        } else {
            assert!(
                status["last_reload_error"]
                    .as_str()
                    .unwrap()
                    .contains("no policies"),
                "{status}"
            );
            assert_eq!(status["policies"].as_u64(), Some(loaded));
            assert_eq!(answer.decision(), Decision::Allow);
        }
        server.stop().await.unwrap();
    }
}

#[tokio::test]
async fn errors_quote_a_bounded_prefix_of_large_inputs() {
    let server = TestServer::start(common::config(Default::default())).await;
    let mut client = server.client().await;
    // Over the context limit (3 MB), under it but invalid (200 KB, which
    // Cedar's diagnostic quotes), and a 1 MB id.
    let mut huge_ip = allowed();
    huge_ip.context_json = format!(
        r#"{{"mfa": true, "source_ip": "{}"}}"#,
        "1".repeat(3 * 1024 * 1024)
    );
    let mut large_ip = allowed();
    large_ip.context_json = format!(
        r#"{{"mfa": true, "source_ip": "{}"}}"#,
        "1".repeat(200 * 1024)
    );
    let mut long_id = allowed();
    long_id.principal.as_mut().unwrap().id = "b".repeat(1024 * 1024);
    for (request, field) in [
        (huge_ip, "context_json"),
        (large_ip, "context_json"),
        (long_id, "principal"),
    ] {
        let status = client.check(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(&format!("`{field}`")),
            "{}",
            &status.message()[..status.message().len().min(300)]
        );
        assert!(
            status.message().len() <= 2 * 1024,
            "a {} byte message",
            status.message().len()
        );
    }
    server.stop().await.unwrap();
}

async fn raw_check(server: &TestServer, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel(server).await);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(CHECK),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn undecodable_messages_are_invalid_argument() {
    let server = TestServer::start(common::config(Default::default())).await;
    let good = allowed().encode_to_vec();
    // Field 4 (`context_json`, a string) holding bytes that are not UTF-8.
    let mut not_utf8 = good.clone();
    not_utf8.extend_from_slice(&[4 << 3 | 2, 2, 0xff, 0xfe]);
    let truncated = good[..good.len() - 3].to_vec();
    // Bytes no CheckRequest starts with: field 0 is invalid.
    let random = vec![0x00, 0x9c, 0x11, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
    for (name, body) in [
        ("invalid UTF-8", not_utf8),
        ("truncated", truncated),
        ("random", random),
    ] {
        let status = raw_check(&server, body).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{name}: {status:?}"
        );
        assert!(
            status.message().contains("cannot be decoded"),
            "{name}: {}",
            status.message()
        );
    }
    // The same bytes, whole, are answered.
    let answer = raw_check(&server, good).await.unwrap();
    let answer = arbiter::proto::v1::CheckResponse::decode(answer.as_slice()).unwrap();
    assert_eq!(answer.decision(), Decision::Allow);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn http2_limits_are_what_the_server_announces() {
    let mut config = common::config(Default::default());
    config.listeners.transport.max_concurrent_streams = 7;
    config.listeners.transport.max_header_list_bytes = 8 * 1024;
    let server = TestServer::start(config).await;
    // One call over plain HTTP/2, then the server's SETTINGS are known.
    assert_eq!(check_with_timeout_on(&server, "30S", Some(7)).await, "0");
    // Metadata over the header list limit is refused; under it, served.
    let mut client = server.client().await;
    let mut big = tonic::Request::new(allowed());
    big.metadata_mut()
        .insert("x-padding", "p".repeat(16 * 1024).parse().unwrap());
    assert!(client.check(big).await.is_err());
    let mut small = tonic::Request::new(allowed());
    small
        .metadata_mut()
        .insert("x-padding", "p".repeat(1024).parse().unwrap());
    assert!(client.check(small).await.is_ok());
    server.stop().await.unwrap();
}

/// `arbiter_decisions_total{outcome="invalid_request"}` as /metrics shows it.
async fn invalid_requests(server: &TestServer) -> u64 {
    let (_, metrics) = server.admin_get("/metrics").await;
    let series = "arbiter_decisions_total{outcome=\"invalid_request\"} ";
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// A context nested deeper than `MAX_CONTEXT_DEPTH` is refused before it is
/// parsed, naming the field and the limit, and counted; one at the limit
/// passes that check (and is then judged by the schema as any other).
/// Brackets inside strings do not count.
#[tokio::test]
async fn context_nesting_beyond_the_limit_is_invalid_argument() {
    use arbiter::engine::MAX_CONTEXT_DEPTH;
    let server = TestServer::start(common::config(Default::default())).await;
    let mut client = server.client().await;
    // `{"mfa": true, "source_ip": "10.1.2.3", "extra": [[...]]}`: the
    // outer object is one level.
    let nested = |levels: usize| {
        let mut request = allowed();
        request.context_json = format!(
            r#"{{"mfa": true, "source_ip": "10.1.2.3", "extra": {}0{}}}"#,
            "[".repeat(levels - 1),
            "]".repeat(levels - 1)
        );
        request
    };
    let before = invalid_requests(&server).await;
    for levels in [MAX_CONTEXT_DEPTH + 1, 100_000] {
        let status = client.check(nested(levels)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with("`context_json`")
                && status
                    .message()
                    .contains(&format!("nests deeper than {MAX_CONTEXT_DEPTH} levels")),
            "{}",
            status.message()
        );
    }
    assert_eq!(invalid_requests(&server).await, before + 2);
    // At the limit the nesting is accepted; the schema then refuses the
    // unknown `extra` attribute, which is another message.
    let status = client.check(nested(MAX_CONTEXT_DEPTH)).await.unwrap_err();
    assert!(!status.message().contains("nests deeper"), "{status:?}");
    // Brackets in a string are text, not nesting.
    let mut in_string = allowed();
    in_string.context_json = format!(
        r#"{{"mfa": true, "source_ip": "10.1.2.3{}"}}"#,
        "[{\\\"".repeat(100)
    );
    let status = client.check(in_string).await.unwrap_err();
    assert!(!status.message().contains("nests deeper"), "{status:?}");
    // And an ordinary context still decides.
    let answer = client.check(allowed()).await.unwrap().into_inner();
    assert_eq!(answer.decision(), Decision::Allow);
    server.stop().await.unwrap();
}
