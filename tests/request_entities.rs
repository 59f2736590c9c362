//! A request's own entities (`entities_json`) through the real gRPC API:
//! each way a caller could raise its own access by describing stored
//! entities is refused by default (`request_entities = "add"`) and decided
//! as documented under `merge` and `replace`; long hierarchies and cycles
//! are refused before Cedar walks them, and the server keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use arbiter::engine::{RequestEntitiesMode, Sources};
use arbiter::proto::v1::{CheckRequest, Decision};
use common::{TestServer, saas};
use serde_json::{Value, json};
use tonic::Code;

fn user(id: &str, tenant: &str, status: &str, clearance: i64, parents: &[(&str, &str)]) -> Value {
    json!({
        "uid": {"type": "Saas::User", "id": id},
        "attrs": {
            "tenant": {"__entity": {"type": "Saas::Tenant", "id": tenant}},
            "email": format!("{id}@example.com"), "status": status,
            "department": "engineering", "clearance": clearance
        },
        "parents": parents.iter().map(|(t, i)| json!({"type": t, "id": i})).collect::<Vec<_>>()
    })
}

fn document(id: &str, owner: &str, classification: &str, folder: &str) -> Value {
    json!({
        "uid": {"type": "Saas::Document", "id": id},
        "attrs": {
            "tenant": {"__entity": {"type": "Saas::Tenant", "id": "acme"}},
            "owner": {"__entity": {"type": "Saas::User", "id": owner}},
            "name": id, "classification": classification, "shared_with": []
        },
        "parents": [{"type": "Saas::Folder", "id": folder}]
    })
}

/// One way to raise access by describing stored entities, with what
/// `merge` decides (stored attributes win, parents are added).
struct Escalation {
    name: &'static str,
    request: CheckRequest,
    entities: Value,
    /// The uid `add` names in its refusal.
    refused_uid: &'static str,
    merge: Decision,
}

fn escalations() -> Vec<Escalation> {
    let with = |principal: &str, action: &str, kind: &str, resource: &str| {
        saas(principal, action, kind, resource)
    };
    vec![
        Escalation {
            name: "a user given the parent Role::acme/admin",
            request: with("carol", "write", "Document", "acme-roadmap"),
            entities: json!([user(
                "carol",
                "acme",
                "active",
                1,
                &[("Saas::Role", "acme/admin")]
            )]),
            refused_uid: r#"Saas::User::"carol""#,
            merge: Decision::Allow,
        },
        Escalation {
            name: "a suspended user given status active",
            request: with("erin", "write", "Document", "acme-roadmap"),
            entities: json!([user(
                "erin",
                "acme",
                "active",
                2,
                &[("Saas::Role", "acme/editor")]
            )]),
            refused_uid: r#"Saas::User::"erin""#,
            merge: Decision::Deny,
        },
        Escalation {
            name: "a user of tenant globex given tenant acme",
            request: with("gina", "read", "Document", "acme-roadmap"),
            entities: json!([user(
                "gina",
                "acme",
                "active",
                3,
                &[("Saas::Role", "globex/admin")]
            )]),
            refused_uid: r#"Saas::User::"gina""#,
            merge: Decision::Deny,
        },
        Escalation {
            name: "clearance 3 for a confidential document",
            request: with("carol", "read", "Document", "acme-salaries"),
            entities: json!([user(
                "carol",
                "acme",
                "active",
                3,
                &[("Saas::Role", "acme/viewer")]
            )]),
            refused_uid: r#"Saas::User::"carol""#,
            merge: Decision::Deny,
        },
        Escalation {
            name: "a document given another owner",
            request: with("carol", "write", "Document", "acme-roadmap"),
            entities: json!([document("acme-roadmap", "carol", "internal", "acme-root")]),
            refused_uid: r#"Saas::Document::"acme-roadmap""#,
            merge: Decision::Deny,
        },
        Escalation {
            name: "a document given another folder",
            request: with("dave", "read", "Document", "acme-roadmap"),
            entities: json!([document(
                "acme-roadmap",
                "alice",
                "internal",
                "acme-engineering"
            )]),
            refused_uid: r#"Saas::Document::"acme-roadmap""#,
            merge: Decision::Allow,
        },
        Escalation {
            name: "a stored role given the parent admin",
            request: with("carol", "write", "Document", "acme-roadmap"),
            entities: json!([{
                "uid": {"type": "Saas::Role", "id": "acme/viewer"},
                "attrs": {"name": "Viewer", "tenant": {"__entity": {"type": "Saas::Tenant", "id": "acme"}}},
                "parents": [{"type": "Saas::Role", "id": "admin"}]
            }]),
            refused_uid: r#"Saas::Role::"acme/viewer""#,
            merge: Decision::Allow,
        },
        Escalation {
            name: "a tenant given plan enterprise",
            request: with("gina", "share", "Document", "globex-brochure"),
            entities: json!([{
                "uid": {"type": "Saas::Tenant", "id": "globex"},
                "attrs": {"name": "Globex", "plan": "enterprise", "suspended": false},
                "parents": []
            }]),
            refused_uid: r#"Saas::Tenant::"globex""#,
            merge: Decision::Deny,
        },
        Escalation {
            name: "a made-up user with parent admin",
            request: with("mallory", "write", "Document", "acme-roadmap"),
            entities: json!([user(
                "mallory",
                "acme",
                "active",
                3,
                &[("Saas::Role", "admin")]
            )]),
            refused_uid: r#"Saas::User::"mallory""#,
            // Not stored: merge takes it as the request wrote it.
            merge: Decision::Allow,
        },
    ]
}

async fn server(mode: RequestEntitiesMode) -> TestServer {
    let mut config = common::config(Sources::default());
    config.load.request_entities = mode;
    TestServer::start(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_escalation_is_refused_by_default_and_decided_as_documented_in_each_mode() {
    let add = server(RequestEntitiesMode::Add).await;
    let merge = server(RequestEntitiesMode::Merge).await;
    let replace = server(RequestEntitiesMode::Replace).await;
    let (mut add_client, mut merge_client, mut replace_client) = (
        add.client().await,
        merge.client().await,
        replace.client().await,
    );
    for case in escalations() {
        let name = case.name;
        // Without the request's entities, each is a deny.
        let baseline = add_client.check(case.request.clone()).await.unwrap();
        assert_eq!(
            baseline.into_inner().decision(),
            Decision::Deny,
            "{name}: baseline"
        );
        let mut request = case.request.clone();
        request.entities_json = case.entities.to_string();

        let refused = add_client.check(request.clone()).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{name}: {refused:?}");
        assert!(
            refused.message().contains(case.refused_uid)
                && refused.message().contains("`entities_json`"),
            "{name}: {}",
            refused.message()
        );

        let merged = merge_client
            .check(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(merged.decision(), case.merge, "{name}: merge {merged:?}");

        // Today's behaviour, for deployments with no identity store.
        let replaced = replace_client.check(request).await.unwrap().into_inner();
        assert_eq!(
            replaced.decision(),
            Decision::Allow,
            "{name}: replace {replaced:?}"
        );
    }
    for server in [add, merge, replace] {
        server.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_lets_a_request_describe_entities_the_store_does_not_hold() {
    let server = server(RequestEntitiesMode::Add).await;
    let mut client = server.client().await;
    // A draft the caller describes, owned by carol, in a stored folder.
    let mut request = saas("carol", "write", "Document", "draft-1");
    request.entities_json =
        json!([document("draft-1", "carol", "internal", "acme-root")]).to_string();
    let answer = client.check(request.clone()).await.unwrap().into_inner();
    assert_eq!(answer.decision(), Decision::Allow, "{answer:?}");
    assert!(
        answer
            .reasons
            .contains(&"owner-full-control-document".to_string())
    );
    // Another user may not write it: the stored hierarchy still decides.
    request.principal = common::uid("Saas::User", "frank");
    let answer = client.check(request).await.unwrap().into_inner();
    assert_eq!(answer.decision(), Decision::Deny);
    // An action may not be described by a request.
    let mut request = saas("carol", "write", "Document", "acme-roadmap");
    request.entities_json = json!([{
        "uid": {"type": "Saas::Action", "id": "write"},
        "attrs": {}, "parents": [{"type": "Saas::Action", "id": "tenant_administration"}]
    }])
    .to_string();
    let refused = client.check(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains(r#"Saas::Action::"write""#),
        "{}",
        refused.message()
    );
    server.stop().await.unwrap();
}

/// Stored entities may name a parent the store does not hold (a group
/// removed while its members kept the edge). Under `add` a request may not
/// supply that parent: it would become a stored user's group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_refuses_a_request_entity_in_the_place_of_a_stored_entitys_parent() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let mut entities: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(root.join("entities.json")).unwrap())
            .unwrap();
    entities.push(user(
        "zed",
        "acme",
        "active",
        0,
        &[("Saas::Role", "acme/gone")],
    ));
    std::fs::write(
        dir.path().join("entities.json"),
        Value::Array(entities).to_string(),
    )
    .unwrap();
    let mut config = common::config(Sources {
        policies: Some(root.clone()),
        schema: Some(root.join("schema.cedarschema")),
        entities: Some(dir.path().join("entities.json")),
        ..Default::default()
    });
    config.load.request_entities = RequestEntitiesMode::Add;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let mut request = saas("zed", "write", "Document", "acme-roadmap");
    assert_eq!(
        client
            .check(request.clone())
            .await
            .unwrap()
            .into_inner()
            .decision(),
        Decision::Deny
    );
    request.entities_json = json!([{
        "uid": {"type": "Saas::Role", "id": "acme/gone"},
        "attrs": {"name": "Gone"}, "parents": [{"type": "Saas::Role", "id": "admin"}]
    }])
    .to_string();
    let refused = client.check(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains(r#"Saas::Role::"acme/gone""#)
            && refused.message().contains(r#"Saas::User::"zed""#),
        "{}",
        refused.message()
    );
    server.stop().await.unwrap();
}

/// A chain of `n` roles, each the parent of the one before, with valid
/// attributes; not reachable from the principal.
fn role_chain(n: usize) -> String {
    let items: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "uid": {"type": "Saas::Role", "id": format!("chain-{i}")},
                "attrs": {"name": format!("r{i}")},
                "parents": if i + 1 < n {
                    json!([{"type": "Saas::Role", "id": format!("chain-{}", i + 1)}])
                } else {
                    json!([])
                }
            })
        })
        .collect();
    Value::Array(items).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_chains_and_cycles_in_a_request_are_refused_and_the_server_keeps_serving() {
    // Entity count is not what refuses them here: the depth is.
    let mut config = common::config(Sources::default());
    config.load.request_entities = RequestEntitiesMode::Replace;
    config.load.limits.max_request_entities = 100_000;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let ordinary = saas("bob", "write", "Document", "acme-roadmap");
    for n in [4_000, 30_000] {
        let mut request = ordinary.clone();
        request.entities_json = role_chain(n);
        let started = Instant::now();
        let refused = client.check(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{n}: {refused:?}");
        assert!(
            refused.message().contains("`max_hierarchy_depth` is 32"),
            "{n}: {}",
            refused.message()
        );
        // Refused before any quadratic work: well under the 3.8 s a
        // 2,000-link chain took (a bound far above the cost, not a timing).
        assert!(started.elapsed() < Duration::from_secs(30), "{n}");
        let answer = client.check(ordinary.clone()).await.unwrap().into_inner();
        assert_eq!(
            answer.decision(),
            Decision::Allow,
            "still serving after {n}"
        );
    }
    // Within the limits, a chain is accepted and evaluated.
    let mut request = ordinary.clone();
    request.entities_json = role_chain(32);
    let answer = client.check(request).await.unwrap().into_inner();
    assert_eq!(answer.decision(), Decision::Allow);
    // Over the count limit of the default configuration.
    let default = TestServer::start(common::config(Sources::default())).await;
    let mut request = ordinary.clone();
    request.entities_json = role_chain(4_000);
    let refused = default.client().await.check(request).await.unwrap_err();
    assert!(
        refused
            .message()
            .contains("holds 4000 entities; at most 1000"),
        "{}",
        refused.message()
    );
    default.stop().await.unwrap();
    // A cycle.
    let mut request = ordinary.clone();
    request.entities_json = json!([
        {"uid": {"type": "Saas::Role", "id": "c1"}, "attrs": {"name": "1"}, "parents": [{"type": "Saas::Role", "id": "c2"}]},
        {"uid": {"type": "Saas::Role", "id": "c2"}, "attrs": {"name": "2"}, "parents": [{"type": "Saas::Role", "id": "c1"}]}
    ])
    .to_string();
    let refused = client.check(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("cycle"), "{}", refused.message());
    server.stop().await.unwrap();
}

/// A request entity can put a stored entity deeper than the limit (under
/// `replace`, a stored role given a chain of request roles above it): the
/// slice is measured before Cedar walks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_chain_above_stored_entities_is_measured_with_them() {
    let server = server(RequestEntitiesMode::Replace).await;
    let mut client = server.client().await;
    let mut request = saas("bob", "write", "Document", "acme-roadmap");
    // acme/editor (stored, bob's role) given request parents x0 .. x31:
    // 32 request levels above a stored role, 33 above bob.
    let mut items: Vec<Value> = (0..32)
        .map(|i| {
            json!({
                "uid": {"type": "Saas::Role", "id": format!("x{i}")},
                "attrs": {"name": "x"},
                "parents": if i < 31 { json!([{"type": "Saas::Role", "id": format!("x{}", i + 1)}]) } else { json!([]) }
            })
        })
        .collect();
    items.push(json!({
        "uid": {"type": "Saas::Role", "id": "acme/editor"},
        "attrs": {"name": "Editor", "tenant": {"__entity": {"type": "Saas::Tenant", "id": "acme"}}},
        "parents": [{"type": "Saas::Role", "id": "x0"}]
    }));
    request.entities_json = Value::Array(items).to_string();
    let refused = client.check(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("more than 32 ancestors"),
        "{}",
        refused.message()
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_log_records_the_uids_a_request_supplied() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("decisions.jsonl");
    let mut config = common::config(Sources::default());
    config.decision_log = arbiter::decision_log::DecisionLogConfig {
        spool_dir: Some(dir.path().join("spool")),
        sinks: vec![arbiter::decision_log::SinkConfig::File {
            name: None,
            path: file.clone(),
            max_bytes: None,
            max_files: None,
        }],
        ..arbiter::decision_log::DecisionLogConfig::default()
    };
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let mut request = saas("carol", "write", "Document", "draft-2");
    request.entities_json =
        json!([document("draft-2", "carol", "internal", "acme-root")]).to_string();
    let answer = client.check(request).await.unwrap().into_inner();
    let plain = client
        .check(saas("bob", "write", "Document", "acme-roadmap"))
        .await
        .unwrap()
        .into_inner();
    server.stop().await.unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |id: &str| {
        records
            .iter()
            .find(|r| r["decision_id"] == id)
            .unwrap_or_else(|| panic!("no record {id} in {text}"))
    };
    assert_eq!(
        find(&answer.decision_id)["request_entities"],
        json!([r#"Saas::Document::"draft-2""#])
    );
    assert!(find(&plain.decision_id).get("request_entities").is_none());
}
