//! Server lifecycle end to end: health transitions, hot reload (good edit,
//! bad edit, saves by rename, ConfigMap symlink swaps, atomicity under
//! concurrent requests) and SIGTERM drain of the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arbiter::engine::Sources;
use arbiter::proto::v1::{CheckBatchRequest, CheckRequest, Decision};
use common::{TestServer, config, file_sources, uid};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const SCHEMA: &str = r#"
entity User = { level: Long };
entity Doc;
action read appliesTo { principal: User, resource: Doc, context: {} };
action write appliesTo { principal: User, resource: Doc, context: {} };
"#;

const ENTITIES: &str = r#"[
  {"uid": {"type": "User", "id": "ann"}, "attrs": {"level": 1}, "parents": []},
  {"uid": {"type": "Doc", "id": "d1"}, "attrs": {}, "parents": []}
]"#;

/// Two permits tagged with a version, so a response shows which set answered.
fn versioned_policies(version: u32) -> String {
    format!(
        "@id(\"v{version}-a\")\npermit (principal, action == Action::\"read\", resource);\n\
         @id(\"v{version}-b\")\npermit (principal, action == Action::\"read\", resource) when {{ principal.level > 0 }};\n"
    )
}

fn write_set(dir: &Path, policies: &str) {
    std::fs::write(dir.join("schema.cedarschema"), SCHEMA).unwrap();
    std::fs::write(dir.join("entities.json"), ENTITIES).unwrap();
    std::fs::write(dir.join("policies.cedar"), policies).unwrap();
}

/// Replaces a file the way editors and `kubectl cp` do: write aside, rename.
fn save_by_rename(path: &Path, text: &str) {
    let aside = path.with_extension("tmp~");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

fn read_request(action: &str) -> CheckRequest {
    CheckRequest {
        principal: uid("User", "ann"),
        action: uid("Action", action),
        resource: uid("Doc", "d1"),
        context_json: String::new(),
        entities_json: String::new(),
        ..Default::default()
    }
}

fn reason_set(response: &arbiter::proto::v1::CheckResponse) -> BTreeSet<String> {
    response.reasons.iter().cloned().collect()
}

fn versioned(version: u32) -> BTreeSet<String> {
    [format!("v{version}-a"), format!("v{version}-b")].into()
}

/// Polls until `pred` holds for a response, or fails after `within`.
async fn eventually(
    server: &TestServer,
    within: Duration,
    pred: impl Fn(&arbiter::proto::v1::CheckResponse) -> bool,
) -> Duration {
    let mut client = server.client().await;
    let started = Instant::now();
    loop {
        let response = client
            .check(read_request("read"))
            .await
            .unwrap()
            .into_inner();
        if pred(&response) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "not seen within {within:?}: {response:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn good_edit_goes_live_and_bad_edit_keeps_last_good_set() {
    let dir = tempfile::tempdir().unwrap();
    write_set(dir.path(), &versioned_policies(1));
    let mut cfg = config(file_sources(dir.path()));
    // The default interval: this is what operators get.
    cfg.reload.interval = arbiter::app::ReloadConfig::default().interval;
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;
    let first = client
        .check(read_request("read"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reason_set(&first), versioned(1));

    // A good edit, written in place.
    std::fs::write(dir.path().join("policies.cedar"), versioned_policies(2)).unwrap();
    // Live after one poll (250 ms) and a load; the bound only catches a
    // reload that never comes: a loaded machine may take over a second.
    let took = eventually(&server, Duration::from_secs(30), |r| {
        reason_set(r) == versioned(2)
    })
    .await;
    eprintln!("good edit live after {took:?}");
    let second = client
        .check(read_request("read"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(second.policy_revision, first.policy_revision);

    // A bad edit: syntax error on line 2.
    std::fs::write(
        dir.path().join("policies.cedar"),
        "@id(\"broken\")\npermit (principal, action, resource) when { principal.level > };\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let ready = loop {
        let (code, body) = server.admin_get("/ready").await;
        if body.contains("\"last_reload_error\":\"") {
            assert_eq!(code, 200, "the last good set still serves");
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "reload failure never reported: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        ready.contains("policies.cedar:2:"),
        "health details name file and line: {ready}"
    );
    let still = client
        .check(read_request("read"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reason_set(&still),
        versioned(2),
        "last good set keeps serving"
    );
    assert_eq!(still.policy_revision, second.policy_revision);
    let (_, metrics) = server.admin_get("/metrics").await;
    let failures: f64 = metrics
        .lines()
        .find(|l| l.starts_with("arbiter_policy_reload_failures_total{reason=\"invalid\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(failures >= 1.0, "{metrics}");

    // A schema edit that makes the policies invalid is refused as well.
    std::fs::write(
        dir.path().join("schema.cedarschema"),
        SCHEMA.replace("level: Long", "rank: Long"),
    )
    .unwrap();
    save_by_rename(&dir.path().join("policies.cedar"), &versioned_policies(3));
    // Wait for that reload to be refused (its error replaces the syntax
    // error), not for a guessed time: then ask.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = server.admin_get("/ready").await;
        if body.contains("\"last_reload_error\":\"") && !body.contains("policies.cedar:2:") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the schema edit was never refused: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after_schema = client
        .check(read_request("read"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reason_set(&after_schema),
        versioned(2),
        "invalid against the new schema"
    );

    // Fixing the schema activates v3 and clears the error.
    std::fs::write(dir.path().join("schema.cedarschema"), SCHEMA).unwrap();
    eventually(&server, Duration::from_secs(30), |r| {
        reason_set(r) == versioned(3)
    })
    .await;
    let (_, ready) = server.admin_get("/ready").await;
    assert!(ready.contains("\"last_reload_error\":null"), "{ready}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn entities_edit_changes_data_revision() {
    let dir = tempfile::tempdir().unwrap();
    write_set(dir.path(), &versioned_policies(1));
    let server = TestServer::start(config(file_sources(dir.path()))).await;
    let mut client = server.client().await;
    let before = client
        .check(read_request("read"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reason_set(&before), versioned(1));
    save_by_rename(
        &dir.path().join("entities.json"),
        &ENTITIES.replace("\"level\": 1", "\"level\": 0"),
    );
    eventually(&server, Duration::from_secs(2), |r| {
        reason_set(r) == ["v1-a".to_string()].into()
    })
    .await;
    let after = client
        .check(read_request("read"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(after.data_revision, before.data_revision);
    assert_eq!(after.policy_revision, before.policy_revision);
    server.stop().await.unwrap();
}

/// Kubernetes mounts a ConfigMap as symlinks into `..data`, itself a symlink
/// to a timestamped directory that an update replaces atomically.
#[cfg(unix)]
#[tokio::test]
async fn configmap_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let mount = tempfile::tempdir().unwrap();
    let m = mount.path();
    let first = m.join("..2026_11_29_00_00_00.1");
    std::fs::create_dir(&first).unwrap();
    write_set(&first, &versioned_policies(1));
    symlink("..2026_11_29_00_00_00.1", m.join("..data")).unwrap();
    for name in ["policies.cedar", "schema.cedarschema", "entities.json"] {
        symlink(format!("..data/{name}"), m.join(name)).unwrap();
    }
    // The mount directory itself is the policies path: the timestamped
    // directories must not be read twice.
    let sources = Sources {
        policies: Some(m.to_path_buf()),
        schema: Some(m.join("schema.cedarschema")),
        entities: Some(m.join("entities.json")),
        ..Default::default()
    };
    let server = TestServer::start(config(sources)).await;
    let mut client = server.client().await;
    let before = client
        .check(read_request("read"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reason_set(&before), versioned(1));

    let second = m.join("..2026_11_29_00_05_00.2");
    std::fs::create_dir(&second).unwrap();
    write_set(&second, &versioned_policies(2));
    symlink("..2026_11_29_00_05_00.2", m.join("..data_tmp")).unwrap();
    std::fs::rename(m.join("..data_tmp"), m.join("..data")).unwrap();
    std::fs::remove_dir_all(&first).unwrap();
    eventually(&server, Duration::from_secs(2), |r| {
        reason_set(r) == versioned(2)
    })
    .await;
    server.stop().await.unwrap();
}

/// Under concurrent requests while the set flips back and forth, every
/// response comes from one whole set: both reasons of the same version, and
/// a policy revision that belongs to that version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_is_atomic_under_concurrent_requests() {
    let dir = tempfile::tempdir().unwrap();
    write_set(dir.path(), &versioned_policies(1));
    let server = TestServer::start(config(file_sources(dir.path()))).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let mut client = server.client().await;
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut seen: Vec<(BTreeSet<String>, String)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let response = client
                    .check(read_request("read"))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(response.decision(), Decision::Allow);
                seen.push((reason_set(&response), response.policy_revision));
            }
            seen
        }));
    }
    let policies = dir.path().join("policies.cedar");
    for round in 0..16u32 {
        save_by_rename(&policies, &versioned_policies(1 + round % 2 + 1));
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut revision_of: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut total = 0;
    let mut versions_seen = BTreeSet::new();
    for worker in workers {
        for (reasons, revision) in worker.await.unwrap() {
            total += 1;
            let version = (1..=3).find(|v| reasons == versioned(*v));
            assert!(
                version.is_some(),
                "mixed or partial set answered: {reasons:?}"
            );
            versions_seen.insert(version);
            let known = revision_of
                .entry(revision.clone())
                .or_insert_with(|| reasons.clone());
            assert_eq!(known, &reasons, "revision {revision} answered by two sets");
        }
    }
    eprintln!("{total} responses, versions seen: {versions_seen:?}");
    assert!(
        versions_seen.len() >= 2,
        "the set never flipped during the test"
    );
    server.stop().await.unwrap();
}

/// Health is NOT_SERVING until policies and entities are loaded, then
/// SERVING, then NOT_SERVING while draining. The entities file here is a
/// FIFO, so the test decides when loading can finish.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_transitions_follow_loading_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    write_set(dir.path(), &versioned_policies(1));
    let fifo = dir.path().join("entities.fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let sources = Sources {
        entities: Some(fifo.clone()),
        ..file_sources(dir.path())
    };
    let server = TestServer::spawn(config(sources)).await;
    assert_eq!(server.health().await, ServingStatus::NotServing);
    let status = server
        .client()
        .await
        .check(read_request("read"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let (code, _) = server.admin_get("/ready").await;
    assert_eq!(code, 503);
    let (code, _) = server.admin_get("/live").await;
    assert_eq!(code, 200);

    // Let the loader read the entities.
    let writer = std::thread::spawn(move || std::fs::write(fifo, ENTITIES).unwrap());
    server.wait_for(ServingStatus::Serving).await;
    writer.join().unwrap();
    let (code, _) = server.admin_get("/ready").await;
    assert_eq!(code, 200);
    let ok = server
        .client()
        .await
        .check(read_request("read"))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().decision(), Decision::Allow);

    // Watch health while the server drains.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut updates = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "arbiter.v1.Authorizer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = updates.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let stopping = tokio::spawn(server.stop());
    let mut saw_not_serving = false;
    while let Ok(Some(update)) = updates.message().await {
        if update.status() == ServingStatus::NotServing {
            saw_not_serving = true;
            break;
        }
    }
    assert!(
        saw_not_serving,
        "health never reported NOT_SERVING while draining"
    );
    stopping.await.unwrap().unwrap();
}

#[tokio::test]
async fn invalid_policies_at_start_stop_the_server_with_diagnostics() {
    let dir = tempfile::tempdir().unwrap();
    write_set(
        dir.path(),
        "@id(\"typo\")\npermit (principal, action, resource)\nwhen { principal.levle > 0 };\n",
    );
    let server = TestServer::spawn(config(file_sources(dir.path()))).await;
    let error = tokio::time::timeout(Duration::from_secs(10), server.finished())
        .await
        .expect("a server whose policies are invalid stops by itself")
        .unwrap_err();
    let text = error.to_string();
    assert!(text.contains("policies.cedar:3:"), "{text}");
    assert!(text.contains("levle"), "{text}");
}

/// SIGTERM: stop accepting, finish in-flight calls, exit 0.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_and_exits_zero() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            // The batches below restate a stored user to force a slice per
            // check, which the default (`add`) refuses.
            "--request-entities",
            "replace",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = common::served_grpc_address(&mut lines).await;
    let log_tail = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push(line);
        }
        rest
    });

    // Heavy batches (overlay entities force a per-check slice) keep calls in flight.
    let mut item = common::saas("bob", "write", "Document", "acme-roadmap");
    item.entities_json = r#"[{"uid": {"type": "Saas::User", "id": "bob"},
        "attrs": {"tenant": {"__entity": {"type": "Saas::Tenant", "id": "acme"}},
                  "email": "bob@acme.example", "status": "active",
                  "department": "eng", "clearance": 1},
        "parents": [{"type": "Saas::Role", "id": "acme/editor"}]}]"#
        .into();
    let batch = CheckBatchRequest {
        checks: vec![item; 256],
    };
    const CALLERS: usize = 6;
    let (running_tx, mut running) = tokio::sync::mpsc::channel::<()>(CALLERS);
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let batch = batch.clone();
        let addr = addr.clone();
        let running_tx = running_tx.clone();
        callers.push(tokio::spawn(async move {
            let mut client = arbiter::proto::v1::authorizer_client::AuthorizerClient::connect(
                format!("http://{addr}"),
            )
            .await
            .unwrap();
            let mut calls = Vec::new();
            loop {
                let started = Instant::now();
                let result = client.check_batch(batch.clone()).await;
                let ended = Instant::now();
                let outcome = result.map(|r| r.into_inner().results.len());
                let refused = outcome.is_err();
                calls.push((started, ended, outcome));
                if refused {
                    return calls;
                }
                // This caller's calls are flowing (said once).
                if calls.len() == 1 {
                    let _ = running_tx.send(()).await;
                }
            }
        }));
    }
    // SIGTERM once every caller has had a call answered, so calls are in
    // flight on every connection: an event, not a guess at how long
    // connecting and the first batch take on a loaded machine.
    for _ in 0..CALLERS {
        tokio::time::timeout(Duration::from_secs(60), running.recv())
            .await
            .expect("every caller gets a first answer")
            .expect("a caller ended before its first answer");
    }
    let pid = child.id().unwrap().to_string();
    let sigterm = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    // A hang bound, not a speed test: the drain may take the whole default
    // grace (20 s) and the decision log's flush after it on a loaded
    // machine (this bound was the grace itself and failed once under load).
    let exit = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("the server exits after draining")
        .unwrap();
    assert_eq!(exit.code(), Some(0), "clean exit after SIGTERM");
    let mut in_flight = 0;
    let mut completed = 0;
    for caller in callers {
        for (started, ended, outcome) in caller.await.unwrap() {
            match outcome {
                Ok(n) => {
                    assert_eq!(n, 256);
                    completed += 1;
                    in_flight += usize::from(started < sigterm && ended > sigterm);
                }
                // A call sent before SIGTERM may fail only if the server
                // never started it (`common::never_started`); calls sent
                // after SIGTERM may fail in any way.
                Err(status) if started < sigterm => {
                    assert!(
                        common::never_started(&status),
                        "a call sent before SIGTERM failed though the server may have started it: {status:?}"
                    );
                }
                Err(_) => {}
            }
        }
    }
    eprintln!("{completed} batches completed, {in_flight} in flight at SIGTERM");
    assert!(
        in_flight > 0,
        "no call was in flight at SIGTERM; the test proved nothing"
    );
    let log = log_tail.await.unwrap().join("\n");
    assert!(log.contains("draining"), "{log}");
}
