//! A long chain of parents in the entities file: refused with the file and
//! the entity named, at start (exit 3, never an abort or a crash loop) and
//! on reload (the last good data keeps serving). Cedar's own closure over
//! such a chain recursed once per level and overflowed the stack.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use arbiter::engine::Sources;
use arbiter::proto::v1::Decision;
use common::{TestServer, saas};
use serde_json::{Value, json};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// The example entities with a chain of `n` roles appended (`chain-0` is
/// the child of `chain-1`, ...), none reachable from a user.
fn entities_with_chain(n: usize) -> String {
    let mut entities: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(example().join("entities.json")).unwrap())
            .unwrap();
    for i in 0..n {
        entities.push(json!({
            "uid": {"type": "Saas::Role", "id": format!("chain-{i}")},
            "attrs": {"name": format!("r{i}")},
            "parents": if i + 1 < n {
                json!([{"type": "Saas::Role", "id": format!("chain-{}", i + 1)}])
            } else {
                json!([])
            }
        }));
    }
    serde_json::to_string_pretty(&Value::Array(entities)).unwrap()
}

/// `arbiter SUBCOMMAND` on the example policies and schema with `entities`,
/// and `extra` flags.
fn arbiter_on(subcommand: &str, entities: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .arg(subcommand)
        .arg("--policies")
        .arg(example())
        .arg("--schema")
        .arg(example().join("schema.cedarschema"))
        .arg("--entities")
        .arg(entities)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn serve_refuses_a_chain_in_the_entities_file_at_start_with_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    for n in [4_000, 30_000] {
        let file = dir.path().join(format!("entities-{n}.json"));
        std::fs::write(&file, entities_with_chain(n)).unwrap();
        let listen = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
        let output = arbiter_on("serve", &file, &listen);
        let stderr = String::from_utf8_lossy(&output.stderr);
        // An exit code, not a signal (an abort has none).
        assert_eq!(output.status.code(), Some(3), "{n}: {stderr}");
        assert!(stderr.contains(&format!("entities-{n}.json")), "{stderr}");
        assert!(stderr.contains("`max_hierarchy_depth` is 32"), "{stderr}");
        assert!(stderr.contains("Saas::Role::\"chain-"), "{stderr}");
        // `arbiter validate` says the same, with the line of the entity.
        let output = arbiter_on("validate", &file, &[]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_ne!(output.status.code(), Some(0), "{text}");
        assert!(text.contains(&format!("entities-{n}.json:")), "{text}");
    }
    // A higher limit, within its ceiling, accepts a deeper chain.
    let file = dir.path().join("entities-100.json");
    std::fs::write(&file, entities_with_chain(100)).unwrap();
    let output = arbiter_on("validate", &file, &["--max-hierarchy-depth", "128"]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    // Above the ceiling the flag itself is refused.
    let output = Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(["validate", "--max-hierarchy-depth", "100000"])
        .output()
        .unwrap();
    assert!(!output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("0..=256"),
        "{output:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_in_a_reloaded_entities_file_keeps_the_last_good_data() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("entities.json");
    std::fs::write(&file, entities_with_chain(0)).unwrap();
    let server = TestServer::start(common::config(Sources {
        policies: Some(example()),
        schema: Some(example().join("schema.cedarschema")),
        entities: Some(file.clone()),
        ..Default::default()
    }))
    .await;
    let mut client = server.client().await;
    let request = saas("bob", "write", "Document", "acme-roadmap");
    let before = client.check(request.clone()).await.unwrap().into_inner();
    assert_eq!(before.decision(), Decision::Allow);

    std::fs::write(&file, entities_with_chain(30_000)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let (code, body) = server.admin_get("/ready").await;
        if body.contains("max_hierarchy_depth") {
            assert_eq!(code, 200, "the last good data still serves: {body}");
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "reload failure never reported: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(ready.contains("entities.json"), "{ready}");
    let after = client.check(request).await.unwrap().into_inner();
    assert_eq!(after.decision(), Decision::Allow);
    assert_eq!(after.data_revision, before.data_revision);
    server.stop().await.unwrap();
}
