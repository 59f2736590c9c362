//! Gated activation (`serve --tests DIR`): every candidate policy set runs
//! the decision fixtures before it is swapped in. A set that validates but
//! breaks a fixture keeps the last good set serving and is reported (log,
//! `/ready`, `arbiter_policy_reload_failures_total{reason="tests"}`); an edit
//! to a fixture file reruns them; at startup a failing fixture refuses to
//! start (exit 3, the failing case named).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use arbiter::app::ServeError;
use arbiter::proto::v1::{CheckRequest, Decision};
use common::{TestServer, config, file_sources, uid};

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

const POLICIES: &str = "@id(\"readers\")\npermit (principal, action == Action::\"read\", resource);\n\
     @id(\"no-writes\")\nforbid (principal, action == Action::\"write\", resource);\n";

/// The typo the issue describes: a `forbid` turned into a `permit` still
/// validates.
const TYPO: &str = "@id(\"readers\")\npermit (principal, action == Action::\"read\", resource);\n\
     @id(\"no-writes\")\npermit (principal, action == Action::\"write\", resource);\n";

fn fixture(write_decision: &str, write_reasons: &str) -> String {
    format!(
        r#"{{"cases": [
  {{"name": "ann reads d1", "principal": "User::\"ann\"", "action": "Action::\"read\"",
    "resource": "Doc::\"d1\"", "decision": "allow", "reasons": ["readers"]}},
  {{"name": "nobody writes", "principal": "User::\"ann\"", "action": "Action::\"write\"",
    "resource": "Doc::\"d1\"", "decision": "{write_decision}", "reasons": [{write_reasons}]}}
]}}"#
    )
}

fn write_set(dir: &Path, policies: &str) {
    std::fs::write(dir.join("schema.cedarschema"), SCHEMA).unwrap();
    std::fs::write(dir.join("entities.json"), ENTITIES).unwrap();
    std::fs::write(dir.join("policies.cedar"), policies).unwrap();
    std::fs::create_dir_all(dir.join("tests")).unwrap();
    std::fs::write(
        dir.join("tests/writes.json"),
        fixture("deny", "\"no-writes\""),
    )
    .unwrap();
}

fn save_by_rename(path: &Path, text: &str) {
    let aside = path.with_extension("tmp~");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

fn write_request() -> CheckRequest {
    CheckRequest {
        principal: uid("User", "ann"),
        action: uid("Action", "write"),
        resource: uid("Doc", "d1"),
        context_json: String::new(),
        entities_json: String::new(),
        min_data_revision: String::new(),
        ..Default::default()
    }
}

fn tests_failures(metrics: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with("arbiter_policy_reload_failures_total{reason=\"tests\"}"))
        .and_then(|line| line.split_whitespace().last())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_set_that_fails_a_fixture_is_not_served_and_a_fixture_edit_reruns_them() {
    let dir = tempfile::tempdir().unwrap();
    write_set(dir.path(), POLICIES);
    let mut sources = file_sources(dir.path());
    sources.tests = Some(dir.path().join("tests"));
    let server = TestServer::start(config(sources)).await;
    let mut client = server.client().await;
    let answer = client.check(write_request()).await.unwrap().into_inner();
    assert_eq!(answer.decision(), Decision::Deny);
    let (_, metrics) = server.admin_get("/metrics").await;
    assert_eq!(tests_failures(&metrics), 0.0, "{metrics}");

    // The typo validates, but breaks "nobody writes": refused.
    save_by_rename(&dir.path().join("policies.cedar"), TYPO);
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        let (code, body) = server.admin_get("/ready").await;
        if body.contains("\"last_reload_error\":\"") {
            assert_eq!(code, 200, "the last good set still serves: {body}");
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the refusal was not reported: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(ready.contains("nobody writes"), "{ready}");
    assert!(ready.contains("writes.json"), "{ready}");
    assert!(
        !ready.contains("ann reads d1"),
        "only failing cases are named: {ready}"
    );
    let (_, metrics) = server.admin_get("/metrics").await;
    assert_eq!(tests_failures(&metrics), 1.0, "{metrics}");
    let answer = client.check(write_request()).await.unwrap().into_inner();
    assert_eq!(
        answer.decision(),
        Decision::Deny,
        "the last good set serves"
    );
    assert_eq!(answer.reasons, ["no-writes"]);

    // The author meant it: the fixture is updated, which reruns the
    // fixtures against the same policy files, and the set goes live.
    save_by_rename(
        &dir.path().join("tests/writes.json"),
        &fixture("allow", "\"no-writes\""),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = client.check(write_request()).await.unwrap().into_inner();
        if answer.decision() == Decision::Allow {
            assert_eq!(answer.reasons, ["no-writes"]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fixed set was not served: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, ready) = server.admin_get("/ready").await;
    assert!(ready.contains("\"last_reload_error\":null"), "{ready}");

    // A fixture file that cannot be parsed is a refusal for the same reason.
    save_by_rename(&dir.path().join("tests/writes.json"), "{\"cases\": [");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        let (_, body) = server.admin_get("/ready").await;
        if body.contains("\"last_reload_error\":\"") {
            break body;
        }
        assert!(Instant::now() < deadline, "not reported: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(ready.contains("malformed fixture"), "{ready}");
    let (_, metrics) = server.admin_get("/metrics").await;
    assert_eq!(tests_failures(&metrics), 2.0, "{metrics}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_failing_fixture_at_startup_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    write_set(dir.path(), TYPO);
    let mut sources = file_sources(dir.path());
    sources.tests = Some(dir.path().join("tests"));
    let server = TestServer::spawn(config(sources)).await;
    let outcome = tokio::time::timeout(Duration::from_secs(60), server.handle)
        .await
        .unwrap()
        .unwrap();
    match outcome {
        Err(ServeError::InitialLoad(error)) => {
            let text = error.render();
            assert!(text.contains("nobody writes"), "{text}");
            assert!(!text.contains("ann reads d1"), "{text}");
        }
        other => panic!("expected a refused start, got {other:?}"),
    }
}

#[test]
fn the_binary_exits_3_naming_the_failing_case() {
    let dir = tempfile::tempdir().unwrap();
    write_set(dir.path(), TYPO);
    let output = Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--policies")
        .arg(dir.path().join("policies.cedar"))
        .arg("--schema")
        .arg(dir.path().join("schema.cedarschema"))
        .arg("--entities")
        .arg(dir.path().join("entities.json"))
        .arg("--tests")
        .arg(dir.path().join("tests"))
        .env_remove("ARBITER_LOG_JSON")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("nobody writes"), "{stderr}");
    assert!(stderr.contains("writes.json"), "{stderr}");
}
