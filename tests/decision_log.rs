//! Decision logs end to end, against real `nats-server` processes: delivery
//! exactly once with the sink up, nothing lost while the sink is down or
//! across `kill -9`, exact drop counts at the spool cap, redaction on the
//! wire, a down sink neither holding back another sink nor slowing
//! decisions.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter::decision_log::{
    DecisionEvent, DecisionLog, DecisionLogConfig, Overflow, SinkConfig, Transport, Uid,
    redact::SECRET_KEYS,
};
use arbiter::engine::{Decision, Sources};
use arbiter::proto::v1::authorizer_client::AuthorizerClient;
use arbiter::proto::v1::{CheckBatchRequest, CheckRequest};
use common::nats::{self, NatsServer};
use common::{TestServer, uid};
use tonic::transport::Channel;

const SUBJECT: &str = "audit.decisions";
const STREAM: &str = "AUDIT";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn write_policies(dir: &Path) -> Sources {
    std::fs::write(
        dir.join("policies.cedar"),
        "@id(\"allow-read\")\npermit (principal, action == Action::\"read\", resource);\n",
    )
    .unwrap();
    Sources {
        policies: Some(dir.join("policies.cedar")),
        schema: None,
        entities: None,
        ..Default::default()
    }
}

fn nats_sink(url: &str) -> SinkConfig {
    SinkConfig::Nats {
        name: None,
        url: Some(url.to_owned()),
        subject: Some(SUBJECT.into()),
        stream: Some(STREAM.into()),
        create_stream: None,
        ack_timeout_ms: Some(1000),
        records_per_message: None,
        max_message_bytes: None,
    }
}

fn log_config(spool: &Path, sinks: Vec<SinkConfig>) -> DecisionLogConfig {
    let mut config = DecisionLogConfig {
        spool_dir: Some(spool.to_path_buf()),
        sinks,
        ..DecisionLogConfig::default()
    };
    config.redact.drop = vec!["context.ssn".into()];
    config.redact.hash = vec!["context.email".into()];
    config.redact.hash_salt = "pepper".into();
    config
}

async fn start_server(dir: &Path, log: DecisionLogConfig) -> TestServer {
    let mut config = common::config(write_policies(dir));
    config.load.validate_policies = false;
    config.load.validate_requests = false;
    config.decision_log = log;
    TestServer::start(config).await
}

/// Request `n`: unique, with secrets in its context.
fn request(n: usize) -> CheckRequest {
    CheckRequest {
        principal: uid("User", &format!("u{n}")),
        action: uid("Action", "read"),
        resource: uid("Doc", "d1"),
        context_json: format!(
            r#"{{"n": {n}, "ssn": "078-05-1120", "email": "ann@example.com",
                "authorization": "Bearer sekrit-token", "headers": {{"cookie": "sid=sekrit"}}}}"#
        ),
        entities_json: String::new(),
        ..Default::default()
    }
}

async fn check(client: &mut AuthorizerClient<Channel>, n: usize) -> (String, Duration) {
    let mut call = tonic::Request::new(request(n));
    call.metadata_mut()
        .insert("traceparent", TRACEPARENT.parse().unwrap());
    let started = Instant::now();
    let response = client.check(call).await.unwrap().into_inner();
    (response.decision_id, started.elapsed())
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

/// Asserts the stream holds exactly `expected`, in order, once each.
async fn assert_delivered_exactly(url: &str, expected: &[String]) -> Vec<serde_json::Value> {
    let got = nats::messages(url, STREAM).await;
    let ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "duplicates on the stream");
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    assert_eq!(ids.len(), expected.len(), "records on the stream");
    assert!(ids == expected, "records out of order");
    for (id, record) in &got {
        assert_eq!(record["decision_id"], id.as_str());
    }
    got.into_iter().map(|(_, record)| record).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_sink_up_delivers_every_decision_exactly_once_in_order_redacted() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(
        dir.path(),
        log_config(&dir.path().join("spool"), vec![nats_sink(&nats.url())]),
    )
    .await;
    let mut client = server.client().await;
    let mut expected = Vec::new();
    for n in 0..500 {
        expected.push(check(&mut client, n).await.0);
    }
    // Each item of a batch is a record of its own.
    let batch = client
        .check_batch(CheckBatchRequest {
            checks: (500..510).map(request).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    expected.extend(batch.results.into_iter().map(|r| r.decision_id));

    let n = expected.len() as u64;
    let got = nats::wait_for_count(&nats.url(), STREAM, n, Duration::from_secs(30)).await;
    assert_eq!(got, n);
    // Give a duplicate (if any) time to show up before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = assert_delivered_exactly(&nats.url(), &expected).await;
    println!("sink up: {n} decisions, {n} records delivered, 0 lost, 0 duplicates");

    // The record, as it went over the wire.
    let first = &records[0];
    assert_eq!(first["transport"], "grpc");
    assert_eq!(first["decision"], "allow");
    assert_eq!(first["reasons"], serde_json::json!(["allow-read"]));
    assert_eq!(
        first["principal"],
        serde_json::json!({"type": "User", "id": "u0"})
    );
    assert_eq!(
        first["action"],
        serde_json::json!({"type": "Action", "id": "read"})
    );
    assert_eq!(first["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(
        first["caller"]["peer_address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(first["evaluation_latency_us"].is_u64());
    assert!(!first["policy_revision"].as_str().unwrap().is_empty());
    assert_eq!(first["context"]["n"], 0);
    assert!(first["context"].get("ssn").is_none());
    assert!(
        first["context"]["email"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(first["context"]["headers"], serde_json::json!({}));
    for record in &records {
        let text = record.to_string();
        for secret in ["078-05-1120", "ann@example.com", "sekrit", "Bearer"] {
            assert!(!text.contains(secret), "`{secret}` leaked: {text}");
        }
        for key in SECRET_KEYS {
            assert!(
                !text.contains(&format!("\"{key}\"")),
                "`{key}` leaked: {text}"
            );
        }
    }
    server.stop().await.unwrap();
}

/// Concurrent decisions are packed several to a message (default), and
/// `records_per_message = 1` sends each alone; both lose and repeat nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_sink_packs_records_into_messages_unless_told_one_per_message() {
    for records_per_message in [None, Some(1)] {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let mut sink = nats_sink(&nats.url());
        if let SinkConfig::Nats {
            records_per_message: r,
            ..
        } = &mut sink
        {
            *r = records_per_message;
        }
        let server = start_server(
            dir.path(),
            log_config(&dir.path().join("spool"), vec![sink]),
        )
        .await;
        let mut tasks = Vec::new();
        for task in 0..8 {
            let mut client = server.client().await;
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in 0..50 {
                    ids.push(check(&mut client, task * 50 + n).await.0);
                }
                ids
            }));
        }
        let mut expected = HashSet::new();
        for task in tasks {
            expected.extend(task.await.unwrap());
        }
        let n = expected.len() as u64;
        assert_eq!(n, 400);
        let got = nats::wait_for_count(&nats.url(), STREAM, n, Duration::from_secs(30)).await;
        assert_eq!(got, n);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // `messages` checks each message's id and record count.
        let records = nats::messages(&nats.url(), STREAM).await;
        let ids: Vec<String> = records.into_iter().map(|(id, _)| id).collect();
        let unique: HashSet<String> = ids.iter().cloned().collect();
        assert_eq!(ids.len(), unique.len(), "duplicates on the stream");
        assert_eq!(unique, expected);
        let messages = nats::message_count(&nats.url(), STREAM).await;
        println!("records_per_message {records_per_message:?}: {n} records in {messages} messages");
        match records_per_message {
            Some(1) => assert_eq!(messages, n),
            _ => assert!(
                messages < n,
                "{n} records were not packed: {messages} messages"
            ),
        }
        server.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_for_the_middle_third_loses_nothing_and_keeps_order() {
    let mut nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(
        dir.path(),
        log_config(&dir.path().join("spool"), vec![nats_sink(&nats.url())]),
    )
    .await;
    let mut client = server.client().await;
    const THIRD: usize = 400;
    let mut expected = Vec::new();
    let mut up = Vec::new();
    let mut down = Vec::new();
    for n in 0..THIRD {
        let (id, took) = check(&mut client, n).await;
        expected.push(id);
        up.push(took);
    }
    nats.stop();
    for n in THIRD..2 * THIRD {
        let (id, took) = check(&mut client, n).await;
        expected.push(id);
        down.push(took);
    }
    nats.restart();
    for n in 2 * THIRD..3 * THIRD {
        let (id, took) = check(&mut client, n).await;
        expected.push(id);
        up.push(took);
    }
    let n = expected.len() as u64;
    let got = nats::wait_for_count(&nats.url(), STREAM, n, Duration::from_secs(60)).await;
    assert_eq!(got, n, "records delivered after the sink came back");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_delivered_exactly(&nats.url(), &expected).await;

    let (up50, up99) = (percentile(&mut up, 0.5), percentile(&mut up, 0.99));
    let (down50, down99) = (percentile(&mut down, 0.5), percentile(&mut down, 0.99));
    println!(
        "sink down for the middle third: {n} decisions, {n} delivered in order, 0 lost, 0 duplicates; \
         latency sink up p50 {up50:?} p99 {up99:?}, sink down p50 {down50:?} p99 {down99:?}"
    );
    // The latencies are printed, not asserted: on a loaded machine they
    // measure the scheduler. What keeps a down sink off the decision path
    // is that a decision only hands its record to the queue (`try_send`),
    // shown above by every record arriving: none was dropped for a full
    // queue while the sink was down.
    server.stop().await.unwrap();
}

fn event(n: usize) -> DecisionEvent {
    let decision = Decision {
        allowed: n.is_multiple_of(2),
        reasons: vec!["p".into()],
        errors: Vec::new(),
        decision_id: format!("id-{n:06}"),
        policy_revision: Arc::from("r1"),
        data_revision: Arc::from("d1"),
        elapsed: Duration::from_micros(7),
        cached: false,
        slice: arbiter::engine::SliceUse::None,
        request_entities: Vec::new(),
    };
    let mut event = DecisionEvent::new(Transport::Grpc, decision);
    event.principal = Some(Uid {
        type_name: "User".into(),
        id: format!("u{n}"),
    });
    event.context_json = format!(r#"{{"n": {n}, "pad": "{}"}}"#, "x".repeat(100));
    event
}

async fn until(within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_cap_drops_are_counted_exactly_for_both_drop_policies() {
    for overflow in [Overflow::DropNewest, Overflow::DropOldest] {
        let mut nats = NatsServer::stopped();
        let dir = tempfile::tempdir().unwrap();
        let mut config = log_config(&dir.path().join("spool"), vec![nats_sink(&nats.url())]);
        config.spool_max_bytes = 64 * 1024;
        config.segment_bytes = 8 * 1024;
        config.overflow = overflow;
        let log = DecisionLog::start(&config, dir.path()).await.unwrap();
        let logger = log.logger();
        const N: usize = 2000;
        for n in 0..N {
            logger.log(event(n)).await;
        }
        let drops = || log.drops().get("spool_full") + log.drops().get("spool_full_oldest");
        // Every record is either spooled, or dropped and counted.
        until(Duration::from_secs(10), || match overflow {
            Overflow::DropNewest => log.written() + drops() == N as u64,
            _ => log.written() == N as u64,
        })
        .await;
        let dropped = drops();
        assert!(dropped > 0, "the cap was never reached");
        assert_eq!(log.drops().get("queue_full"), 0);

        nats.restart();
        let delivered = N as u64 - dropped;
        let got =
            nats::wait_for_count(&nats.url(), STREAM, delivered, Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let records = nats::messages(&nats.url(), STREAM).await;
        println!(
            "{overflow:?}: {N} logged with the sink down and a 64 KiB spool: \
             {dropped} dropped (counted), {got} delivered, {} unaccounted",
            N as u64 - dropped - records.len() as u64
        );
        assert_eq!(
            records.len() as u64,
            delivered,
            "delivered + dropped == logged"
        );
        let ids: Vec<String> = records.iter().map(|(id, _)| id.clone()).collect();
        let kept: Vec<String> = match overflow {
            // The oldest records are kept, the newest dropped...
            Overflow::DropNewest => (0..delivered as usize)
                .map(|n| format!("id-{n:06}"))
                .collect(),
            // ...or the other way round.
            _ => (dropped as usize..N)
                .map(|n| format!("id-{n:06}"))
                .collect(),
        };
        assert_eq!(ids, kept);
        log.shutdown(Duration::from_secs(5)).await;
    }
}

fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    let mut files = vec![path.to_path_buf()];
    for n in 1..1000 {
        let rotated = path.with_extension(format!("jsonl.{n}"));
        if !rotated.exists() {
            break;
        }
        files.push(rotated);
    }
    for file in files.into_iter().rev() {
        if let Ok(text) = std::fs::read_to_string(&file) {
            lines.extend(text.lines().map(|l| serde_json::from_str(l).unwrap()));
        }
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_sink_holds_back_no_other_sink_and_its_records_are_replayed_at_start() {
    let mut nats = NatsServer::stopped();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out").join("decisions.jsonl");
    let spool = dir.path().join("spool");
    let sinks = vec![
        SinkConfig::File {
            name: None,
            path: file.clone(),
            max_bytes: Some(16 * 1024),
            max_files: Some(100),
        },
        nats_sink(&nats.url()),
    ];
    let config = log_config(&spool, sinks);
    let log = DecisionLog::start(&config, dir.path()).await.unwrap();
    const N: usize = 1000;
    for n in 0..N {
        log.logger().log(event(n)).await;
    }
    // The file sink gets everything while NATS is down.
    until(Duration::from_secs(10), || {
        log.progress()
            .iter()
            .any(|p| p.name == "file" && p.delivered == N as u64)
    })
    .await;
    let left = log.shutdown(Duration::from_millis(500)).await;
    assert_eq!(left, N as u64, "NATS's records stay in the spool");
    let lines = read_lines(&file);
    assert_eq!(lines.len(), N);
    assert!(file.with_extension("jsonl.1").exists(), "the file rotated");
    for (n, line) in lines.iter().enumerate() {
        assert_eq!(line["decision_id"], format!("id-{n:06}"));
    }

    // Next start, NATS up: the spool is replayed; the file sink gets nothing twice.
    nats.restart();
    let log = DecisionLog::start(&config, dir.path()).await.unwrap();
    assert_eq!(log.recovered(), N as u64);
    let got = nats::wait_for_count(&nats.url(), STREAM, N as u64, Duration::from_secs(30)).await;
    assert_eq!(got, N as u64);
    let expected: Vec<String> = (0..N).map(|n| format!("id-{n:06}")).collect();
    assert_delivered_exactly(&nats.url(), &expected).await;
    assert_eq!(read_lines(&file).len(), N);
    let left = log.shutdown(Duration::from_secs(5)).await;
    assert_eq!(left, 0);
    // Everything acknowledged everywhere: the spool is down to its empty active segment.
    let bytes: u64 = std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(bytes < 16 * 1024, "spool not collected: {bytes} bytes");
}

async fn admin_metric(admin: std::net::SocketAddr, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.ok()?;
    raw.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

fn spawn_binary(config: &Path, grpc: u16, admin: u16) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(["serve", "--config"])
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn connect(grpc: u16) -> AuthorizerClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut client) = AuthorizerClient::connect(format!("http://127.0.0.1:{grpc}")).await
            && client.check(request(0)).await.is_ok()
        {
            return client;
        }
        assert!(Instant::now() < deadline, "the server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_then_restart_delivers_the_spooled_records() {
    let mut nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    write_policies(dir.path());
    let config = dir.path().join("arbiter.toml");
    std::fs::write(
        &config,
        format!(
            r#"policies = "policies.cedar"
no_validate = true
no_request_validation = true

[decision_log]
spool_dir = "spool"

[decision_log.redact]
drop = ["context.ssn"]

[[decision_log.sinks]]
type = "nats"
url = "{}"
subject = "{SUBJECT}"
stream = "{STREAM}"
ack_timeout_ms = 1000
"#,
            nats.url()
        ),
    )
    .unwrap();
    let (grpc, admin) = (nats::free_port(), nats::free_port());
    let mut child = spawn_binary(&config, grpc, admin);
    let mut client = connect(grpc).await;
    // `connect` made one decision (n = 0) too.
    let mut expected = Vec::new();
    let mut made = 1;
    for n in 1..300 {
        expected.push(check(&mut client, n).await.0);
    }
    made += 299;
    let delivered_before =
        nats::wait_for_count(&nats.url(), STREAM, made, Duration::from_secs(30)).await;
    assert_eq!(delivered_before, made);
    nats.stop();
    for n in 300..600 {
        expected.push(check(&mut client, n).await.0);
    }
    made += 300;
    // Wait until the records are in the spool, then kill -9.
    let deadline = Instant::now() + Duration::from_secs(10);
    while admin_metric(
        std::net::SocketAddr::from(([127, 0, 0, 1], admin)),
        "arbiter_decision_log_spooled_total",
    )
    .await
        < Some(made as f64)
    {
        assert!(Instant::now() < deadline, "records were not spooled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();

    nats.restart();
    let mut child = spawn_binary(&config, grpc, admin);
    let got = nats::wait_for_count(&nats.url(), STREAM, made, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = nats::messages(&nats.url(), STREAM).await;
    let ids: Vec<String> = records.iter().map(|(id, _)| id.clone()).collect();
    let unique: HashSet<&String> = ids.iter().collect();
    println!(
        "kill -9 with 300 records spooled: {made} decisions, {got} delivered after restart, \
         {} lost, {} duplicates",
        made - got.min(made),
        ids.len() - unique.len()
    );
    assert_eq!(got, made);
    assert_eq!(unique.len(), ids.len(), "duplicates on the stream");
    // The first decision came from `connect`; the rest in order.
    assert!(ids[1..] == expected[..], "records out of order");
    for (_, record) in &records {
        assert!(record["context"].get("ssn").is_none());
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

/// `overflow = "block"` at the spool cap. The sink is down throughout the
/// logging, so the spool never drains: once the pipeline waits at the cap
/// the queue never empties, and a `log()` that returns was ended by its
/// deadline. Nothing here is bounded by the wall clock except a hang
/// (30 s): on a loaded machine a call may return late, because its task
/// was not scheduled, but never early and never without counting its drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_overflow_waits_at_most_the_deadline_and_counts_every_drop() {
    let mut nats = NatsServer::stopped();
    let dir = tempfile::tempdir().unwrap();
    let mut config = log_config(&dir.path().join("spool"), vec![nats_sink(&nats.url())]);
    config.spool_max_bytes = 32 * 1024;
    config.segment_bytes = 8 * 1024;
    config.queue_capacity = 16;
    config.overflow = Overflow::Block;
    config.block_timeout_ms = 20;
    let deadline = config.block_timeout();
    let log = DecisionLog::start(&config, dir.path()).await.unwrap();
    let logger = log.logger();
    let drops = log.drops_handle();
    const N: usize = 400;
    let mut slowest = Duration::ZERO;
    for n in 0..N {
        let timeouts_before = drops.get("block_timeout");
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(30), logger.log(event(n)))
            .await
            .expect("log() waited for room that never comes, not for its deadline");
        let waited = started.elapsed();
        // Only `log()` counts `block_timeout`, and only this one is running.
        if drops.get("block_timeout") > timeouts_before {
            assert!(
                waited >= deadline,
                "record {n} was dropped after {waited:?}, before its deadline"
            );
        }
        slowest = slowest.max(waited);
    }
    let timeouts = drops.get("block_timeout");
    assert!(timeouts > 0, "the spool never filled");
    // Bring the sink up, so the shutdown's drain ends when the sink has
    // caught up (an event), not when a grace period that a loaded machine
    // may need more of runs out. Each record is then delivered, or was
    // dropped and counted: queued or held ones the pipeline could not
    // spool when it stopped are counted at shutdown.
    nats.restart();
    let left = log.shutdown(Duration::from_secs(60)).await;
    assert_eq!(left, 0, "records left in the spool after the drain");
    let records = nats::messages(&nats.url(), STREAM).await;
    let unique: HashSet<&String> = records.iter().map(|(id, _)| id).collect();
    assert_eq!(unique.len(), records.len(), "duplicates on the stream");
    let delivered = records.len() as u64;
    println!(
        "overflow=block: {N} logged, {delivered} delivered, {timeouts} dropped after waiting \
         {deadline:?}, {} dropped at shutdown, slowest log() {slowest:?}",
        drops.total() - timeouts
    );
    assert_eq!(
        delivered + drops.total(),
        N as u64,
        "delivered + dropped == logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_streams_filtered_redacted_records_and_the_cli_prints_them() {
    let dir = tempfile::tempdir().unwrap();
    let sinks = vec![SinkConfig::File {
        name: None,
        path: dir.path().join("decisions.jsonl"),
        max_bytes: None,
        max_files: None,
    }];
    let server = start_server(dir.path(), log_config(&dir.path().join("spool"), sinks)).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tail = arbiter::proto::v1::decision_log_client::DecisionLogClient::new(channel)
        .tail(arbiter::proto::v1::TailRequest {
            decision: arbiter::proto::v1::Decision::Deny as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(["tail", "--server", &format!("http://{}", server.addr)])
        .args(["--principal", "User::\"u7\"", "--count", "1"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut cli_stdout = cli.stdout.take().unwrap();

    // The CLI subscribes when it has started, which a loaded machine may
    // delay: decide for u7 until it has printed a record (it exits after
    // `--count 1`), instead of guessing how long its start takes.
    let mut client = server.client().await;
    let started = Instant::now();
    let status = loop {
        check(&mut client, 7).await;
        if let Ok(status) = tokio::time::timeout(Duration::from_millis(100), cli.wait()).await {
            break status.unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "`arbiter tail` printed nothing"
        );
    };
    assert!(status.success());
    let mut write = request(8);
    write.action = uid("Action", "write");
    let denied = client.check(write).await.unwrap().into_inner();
    assert_eq!(denied.decision(), arbiter::proto::v1::Decision::Deny);

    let record = tokio::time::timeout(Duration::from_secs(10), tail.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let record: serde_json::Value = serde_json::from_str(&record.record_json).unwrap();
    assert_eq!(record["decision_id"], denied.decision_id.as_str());
    assert!(record["context"].get("ssn").is_none());

    let mut output = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut cli_stdout, &mut output)
        .await
        .unwrap();
    let line: serde_json::Value = serde_json::from_str(output.trim()).unwrap();
    assert_eq!(line["principal"]["id"], "u7");
    drop(tail);
    server.stop().await.unwrap();
}

/// A test audit collector: stores what it is sent; refuses the first calls.
#[derive(Clone, Default)]
struct Collector {
    stored: Arc<std::sync::Mutex<Vec<(u64, String)>>>,
    refuse: Arc<std::sync::atomic::AtomicUsize>,
}

#[tonic::async_trait]
impl arbiter::proto::v1::decision_log_collector_server::DecisionLogCollector for Collector {
    async fn publish(
        &self,
        request: tonic::Request<tonic::Streaming<arbiter::proto::v1::PublishRecord>>,
    ) -> Result<tonic::Response<arbiter::proto::v1::PublishAck>, tonic::Status> {
        use std::sync::atomic::Ordering;
        if self
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(tonic::Status::unavailable("not now"));
        }
        let mut stream = request.into_inner();
        let mut batch = Vec::new();
        while let Some(record) = stream.message().await? {
            let json: serde_json::Value = serde_json::from_str(&record.record_json).unwrap();
            assert_eq!(json["decision_id"], record.decision_id.as_str());
            batch.push((record.sequence, record.decision_id));
        }
        let accepted = batch.len() as u64;
        self.stored.lock().unwrap().extend(batch);
        Ok(tonic::Response::new(arbiter::proto::v1::PublishAck {
            accepted,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_collector_sink_gets_every_record_in_order_after_downtime_and_refusals() {
    let port = nats::free_port();
    let dir = tempfile::tempdir().unwrap();
    let sinks = vec![SinkConfig::Grpc {
        name: None,
        url: format!("http://127.0.0.1:{port}"),
        ack_timeout_ms: Some(1000),
    }];
    let log = DecisionLog::start(&log_config(&dir.path().join("spool"), sinks), dir.path())
        .await
        .unwrap();
    const N: usize = 1000;
    for n in 0..N / 2 {
        log.logger().log(event(n)).await;
    }
    // The collector comes up late, and refuses its first three calls.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let collector = Collector::default();
    collector
        .refuse
        .store(3, std::sync::atomic::Ordering::SeqCst);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                arbiter::proto::v1::decision_log_collector_server::DecisionLogCollectorServer::new(
                    collector.clone(),
                ),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    for n in N / 2..N {
        log.logger().log(event(n)).await;
    }
    until(Duration::from_secs(30), || {
        collector.stored.lock().unwrap().len() >= N
    })
    .await;
    let left = log.shutdown(Duration::from_secs(5)).await;
    assert_eq!(left, 0);
    let stored = collector.stored.lock().unwrap().clone();
    let ids: Vec<String> = stored.iter().map(|(_, id)| id.clone()).collect();
    let expected: Vec<String> = (0..N).map(|n| format!("id-{n:06}")).collect();
    assert_eq!(ids, expected, "every record once, in order");
    assert!(stored.windows(2).all(|w| w[0].0 < w[1].0));
    server.abort();
}
