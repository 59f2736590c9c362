//! `arbiter.v1.Authorizer` end to end: a real server on 127.0.0.1:0 and a real
//! gRPC client, on the embedded example policy set unless said otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;

use arbiter::proto::v1::{CheckBatchRequest, CheckRequest, Decision};
use common::{TestServer, saas, uid};
use tonic::Code;

fn reasons(response: &arbiter::proto::v1::CheckResponse) -> BTreeSet<String> {
    response.reasons.iter().cloned().collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn allow_deny_and_forbid_override() {
    let server = TestServer::start_embedded().await;
    let mut client = server.client().await;

    let allow = client
        .check(saas("bob", "write", "Document", "acme-roadmap"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allow.decision(), Decision::Allow);
    assert_eq!(reasons(&allow), set(&["editor-can-write"]));
    assert!(allow.errors.is_empty());
    assert!(!allow.decision_id.is_empty());
    assert!(!allow.policy_revision.is_empty());
    assert!(!allow.data_revision.is_empty());

    // Default deny: no permit applies, so no reasons.
    let deny = client
        .check(saas("carol", "write", "Document", "acme-roadmap"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deny.decision(), Decision::Deny);
    assert!(deny.reasons.is_empty());
    assert_ne!(
        deny.decision_id, allow.decision_id,
        "decision ids are unique"
    );
    assert_eq!(deny.policy_revision, allow.policy_revision);

    // Owner permit is satisfied, but the step-up forbid wins.
    let mut request = saas("frank", "delete", "Document", "acme-sales-pipeline");
    let permitted = client.check(request.clone()).await.unwrap().into_inner();
    assert_eq!(permitted.decision(), Decision::Deny);
    assert_eq!(reasons(&permitted), set(&["delete-requires-step-up-auth"]));
    request.context_json = r#"{"mfa": true, "source_ip": "10.1.2.3", "auth_level": 2}"#.into();
    let stepped_up = client.check(request).await.unwrap().into_inner();
    assert_eq!(stepped_up.decision(), Decision::Allow);
    assert_eq!(reasons(&stepped_up), set(&["owner-full-control-document"]));

    server.stop().await.unwrap();
}

#[tokio::test]
async fn evaluation_errors_fail_closed_and_are_reported() {
    let server = TestServer::start_embedded().await;
    let mut client = server.client().await;
    // `ghost` is not in the store: every policy that reads `principal.tenant`
    // errors, the guardrail forbids included. Cedar alone would skip them and
    // let `public-documents-readable` allow; by default (`skip-permit`) an
    // erroring forbid denies.
    let response = client
        .check(saas("ghost", "read", "Document", "acme-handbook"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.decision(), Decision::Deny);
    assert!(!response.errors.is_empty());
    let errored: BTreeSet<&str> = response
        .errors
        .iter()
        .map(|e| e.policy_id.as_str())
        .collect();
    assert!(errored.contains("tenant-isolation"), "{errored:?}");
    assert!(response.errors.iter().all(|e| !e.message.is_empty()));
    assert!(response.reasons.is_empty(), "{response:?}");
    server.stop().await.unwrap();

    // With Cedar's semantics chosen explicitly, the erroring policies are
    // skipped and the public-document permit decides.
    let mut config = common::config(Default::default());
    config.load.on_evaluation_error = arbiter::engine::OnEvaluationError::SkipPolicy;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let response = client
        .check(saas("ghost", "read", "Document", "acme-handbook"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.decision(), Decision::Allow);
    assert_eq!(reasons(&response), set(&["public-documents-readable"]));
    assert!(!response.errors.is_empty());
    server.stop().await.unwrap();
}

/// `explain = true` answers why: allow, a forbid overriding a permit, a
/// deny with near misses, and erroring policies; a request without it gets
/// no explanation, in `Check` and per item in `CheckBatch`.
#[tokio::test]
async fn explain_answers_why_only_when_asked() {
    use arbiter::proto::v1::{Effect, ExplainedPolicy};
    let server = TestServer::start_embedded().await;
    let mut client = server.client().await;
    let explained = |mut request: CheckRequest| {
        request.explain = true;
        request
    };
    let near_miss = |id: &str, effect: Effect| ExplainedPolicy {
        policy_id: id.into(),
        effect: effect as i32,
    };

    // Without explain: no explanation, as before.
    let plain = client
        .check(saas("frank", "delete", "Document", "acme-sales-pipeline"))
        .await
        .unwrap()
        .into_inner();
    assert!(plain.explanation.is_none(), "{plain:?}");

    let allow = client
        .check(explained(saas("bob", "write", "Document", "acme-roadmap")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allow.decision(), Decision::Allow);
    let why = allow.explanation.expect("explained");
    assert_eq!(why.determining, ["editor-can-write"]);
    assert!(why.errors.is_empty() && why.conditions_false.is_empty());
    assert!(why.overridden_permits.is_empty());

    // The owner's permit is satisfied, the step-up forbid wins.
    let overridden = client
        .check(explained(saas(
            "frank",
            "delete",
            "Document",
            "acme-sales-pipeline",
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(overridden.decision(), Decision::Deny);
    let why = overridden.explanation.expect("explained");
    assert_eq!(why.determining, ["delete-requires-step-up-auth"]);
    assert_eq!(why.overridden_permits, ["owner-full-control-document"]);
    assert!(
        why.conditions_false
            .contains(&near_miss("tenant-isolation", Effect::Forbid)),
        "{why:?}"
    );

    // Default deny: the owner permit's scope matched, its condition did not.
    let near = client
        .check(explained(saas(
            "carol",
            "write",
            "Document",
            "acme-roadmap",
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(near.decision(), Decision::Deny);
    let why = near.explanation.expect("explained");
    assert!(why.determining.is_empty() && why.overridden_permits.is_empty());
    assert!(
        why.conditions_false
            .contains(&near_miss("owner-full-control-document", Effect::Permit)),
        "{why:?}"
    );
    assert!(
        !why.conditions_false
            .iter()
            .any(|policy| policy.policy_id == "editor-can-write"),
        "carol is not an editor: the scope did not match: {why:?}"
    );

    // ghost is not in the data: the guardrails error, failing closed.
    let erroring = client
        .check(explained(saas(
            "ghost",
            "read",
            "Document",
            "acme-handbook",
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erroring.decision(), Decision::Deny);
    let why = erroring.explanation.expect("explained");
    assert_eq!(why.errors, erroring.errors);
    assert!(
        why.errors
            .iter()
            .any(|error| error.policy_id == "tenant-isolation" && !error.message.is_empty()),
        "{why:?}"
    );
    assert_eq!(why.overridden_permits, ["public-documents-readable"]);

    // A batch explains the items that ask, and only those.
    let batch = client
        .check_batch(CheckBatchRequest {
            checks: vec![
                saas("carol", "write", "Document", "acme-roadmap"),
                explained(saas("carol", "write", "Document", "acme-roadmap")),
                explained(saas("bob", "write", "Document", "acme-roadmap")),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.results.len(), 3);
    assert!(batch.results[0].explanation.is_none());
    let why = batch.results[1].explanation.as_ref().expect("explained");
    assert!(
        why.conditions_false
            .contains(&near_miss("owner-full-control-document", Effect::Permit))
    );
    let why = batch.results[2].explanation.as_ref().expect("explained");
    assert_eq!(why.determining, ["editor-can-write"]);

    // A malformed explained request is refused as any other.
    let mut bad = explained(saas("carol", "fly", "Document", "acme-roadmap"));
    bad.context_json = "{}".into();
    let status = client.check(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn entities_overlay_applies_to_one_decision_only() {
    // Replacing stored entities is the operator's choice (the default,
    // `add`, refuses it: tests/request_entities.rs).
    let server = replacing_server().await;
    let mut client = server.client().await;

    // carol is a viewer: she cannot write the roadmap.
    let base = saas("carol", "write", "Document", "acme-roadmap");
    let before = client.check(base.clone()).await.unwrap().into_inner();
    assert_eq!(before.decision(), Decision::Deny);

    // For this one request carol's copy says she is an editor.
    let overlay = r#"[{"uid": {"type": "Saas::User", "id": "carol"},
        "attrs": {"tenant": {"__entity": {"type": "Saas::Tenant", "id": "acme"}},
                  "email": "carol@acme.example", "status": "active",
                  "department": "sales", "clearance": 1},
        "parents": [{"type": "Saas::Role", "id": "acme/editor"}]}]"#;
    let mut with_overlay = base.clone();
    with_overlay.entities_json = overlay.into();
    let during = client.check(with_overlay).await.unwrap().into_inner();
    assert_eq!(during.decision(), Decision::Allow, "{during:?}");
    assert_eq!(reasons(&during), set(&["editor-can-write"]));

    // A request-only entity that is not in the store at all.
    let mut new_user = saas("zoe", "read", "Document", "acme-handbook");
    new_user.entities_json = r#"[{"uid": {"type": "Saas::User", "id": "zoe"},
        "attrs": {"tenant": {"__entity": {"type": "Saas::Tenant", "id": "acme"}},
                  "email": "zoe@acme.example", "status": "active",
                  "department": "eng", "clearance": 0},
        "parents": [{"type": "Saas::Role", "id": "acme/viewer"}]}]"#
        .into();
    let zoe = client.check(new_user).await.unwrap().into_inner();
    assert_eq!(zoe.decision(), Decision::Allow, "{zoe:?}");

    // Never stored: the next request without overlay sees the cached data.
    let after = client.check(base).await.unwrap().into_inner();
    assert_eq!(after.decision(), Decision::Deny);
    assert_eq!(after.data_revision, before.data_revision);
    server.stop().await.unwrap();
}

/// The embedded example with `request_entities = "replace"`.
async fn replacing_server() -> TestServer {
    let mut config = common::config(arbiter::engine::Sources::default());
    config.load.request_entities = arbiter::engine::RequestEntitiesMode::Replace;
    TestServer::start(config).await
}

/// Every kind of malformed input gets INVALID_ARGUMENT naming the field.
#[tokio::test]
async fn malformed_input_is_invalid_argument_naming_the_field() {
    let server = TestServer::start_embedded().await;
    let mut client = server.client().await;
    let good = saas("bob", "read", "Document", "acme-roadmap");

    let mut cases: Vec<(&str, CheckRequest, &str)> = Vec::new();
    let mut r = good.clone();
    r.principal = None;
    cases.push(("missing principal", r, "`principal`"));
    let mut r = good.clone();
    r.action = uid("", "read");
    cases.push(("empty action type", r, "`action`"));
    let mut r = good.clone();
    r.resource = uid("Saas::::Document", "x");
    cases.push(("unparsable resource type", r, "`resource`"));
    let mut r = good.clone();
    r.principal = uid("Saas::User\"", "bob");
    cases.push(("quote in type", r, "`principal`"));
    let mut r = good.clone();
    r.context_json = "{not json".into();
    cases.push(("invalid context JSON", r, "`context_json`"));
    let mut r = good.clone();
    r.context_json = "[1, 2]".into();
    cases.push(("context not an object", r, "`context_json`"));
    let mut r = good.clone();
    r.context_json = r#"{"mfa": "yes", "source_ip": "10.1.2.3"}"#.into();
    cases.push(("context type mismatch", r, "`context_json`"));
    let mut r = good.clone();
    r.context_json = r#"{"mfa": true}"#.into();
    cases.push(("context missing attribute", r, "`context_json`"));
    let mut r = good.clone();
    r.context_json = r#"{"mfa": true, "source_ip": "not-an-ip"}"#.into();
    cases.push(("context bad ipaddr", r, "`context_json`"));
    let mut r = good.clone();
    r.entities_json = "{".into();
    cases.push(("invalid entities JSON", r, "`entities_json`"));
    let mut r = good.clone();
    r.entities_json =
        r#"[{"uid": {"type": "Saas::User", "id": "x"}, "attrs": {"nope": 1}, "parents": []}]"#
            .into();
    cases.push(("entities not matching schema", r, "`entities_json`"));
    let mut r = good.clone();
    r.entities_json =
        r#"[{"uid": {"type": "Saas::User", "id": "x"}, "attrs": {"nope": 1}, "parents": []}]"#
            .into();
    cases.push(("the cause is in the message", r, "nope"));
    let mut r = good.clone();
    r.principal = uid("Saas::Document", "acme-roadmap");
    cases.push((
        "principal type the action does not apply to",
        r,
        "`principal`",
    ));
    let mut r = good.clone();
    r.action = uid("Saas::Action", "fly");
    cases.push(("unknown action", r, "`action`"));
    let mut r = good.clone();
    r.resource = uid("Saas::Spaceship", "x");
    cases.push(("unknown resource type", r, "`resource`"));

    for (name, request, field) in cases {
        let status = client
            .check(request)
            .await
            .expect_err(&format!("{name}: must be refused, not answered"));
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().contains(field),
            "{name}: message `{}` should name {field}",
            status.message()
        );
    }
    // The server is still healthy and answering.
    let ok = client.check(good).await.unwrap().into_inner();
    assert_eq!(ok.decision(), Decision::Allow);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn batch_answers_in_order_and_refuses_bad_or_oversize_batches() {
    let server = TestServer::start_embedded().await;
    let mut client = server.client().await;
    let checks = vec![
        saas("bob", "write", "Document", "acme-roadmap"),
        saas("carol", "write", "Document", "acme-roadmap"),
        saas("gina", "read", "Document", "acme-roadmap"),
        saas("carol", "read", "Document", "acme-roadmap"),
    ];
    let batch = client
        .check_batch(CheckBatchRequest {
            checks: checks.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let decisions: Vec<Decision> = batch.results.iter().map(|r| r.decision()).collect();
    assert_eq!(
        decisions,
        vec![
            Decision::Allow,
            Decision::Deny,
            Decision::Deny,
            Decision::Allow
        ]
    );
    assert_eq!(reasons(&batch.results[2]), set(&["tenant-isolation"]));
    let ids: BTreeSet<&str> = batch
        .results
        .iter()
        .map(|r| r.decision_id.as_str())
        .collect();
    assert_eq!(ids.len(), 4, "every batch item has its own decision id");

    // A malformed item fails the whole batch and is named by index.
    let mut bad = checks.clone();
    bad[2].context_json = "{".into();
    let status = client
        .check_batch(CheckBatchRequest { checks: bad })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("checks[2]"),
        "{}",
        status.message()
    );

    // The documented maximum is accepted; one more is refused.
    let max = arbiter::adapter::authorizer::MAX_BATCH_CHECKS;
    let full = vec![checks[0].clone(); max];
    let answered = client
        .check_batch(CheckBatchRequest { checks: full })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answered.results.len(), max);
    let status = client
        .check_batch(CheckBatchRequest {
            checks: vec![checks[0].clone(); max + 1],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("at most"), "{}", status.message());

    // An empty batch is answered with no results.
    let empty = client
        .check_batch(CheckBatchRequest { checks: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.results.is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_count_decisions_by_outcome() {
    let server = TestServer::start_embedded().await;
    let mut client = server.client().await;
    client
        .check(saas("bob", "write", "Document", "acme-roadmap"))
        .await
        .unwrap();
    client
        .check(saas("carol", "write", "Document", "acme-roadmap"))
        .await
        .unwrap();
    let (code, body) = server.admin_get("/metrics").await;
    assert_eq!(code, 200);
    for needle in [
        "arbiter_decisions_total{outcome=\"allow\"}",
        "arbiter_decisions_total{outcome=\"deny\"}",
        "arbiter_decision_duration_seconds_bucket",
        "arbiter_policies_loaded 20",
        "arbiter_policy_reload_failures_total",
    ] {
        assert!(body.contains(needle), "/metrics lacks {needle}:\n{body}");
    }
    server.stop().await.unwrap();
}

/// Repeated questions are answered from the snapshot's decision cache, each
/// answer with its own decision id; request-scoped entities bypass it.
#[tokio::test]
async fn repeated_requests_hit_the_decision_cache() {
    let server = replacing_server().await;
    let mut client = server.client().await;
    let hits = |body: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with("arbiter_decision_cache_hits_total"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let request = saas("bob", "write", "Document", "acme-roadmap");
    let first = client.check(request.clone()).await.unwrap().into_inner();
    let (_, before) = server.admin_get("/metrics").await;
    let mut ids = BTreeSet::new();
    for _ in 0..5 {
        let again = client.check(request.clone()).await.unwrap().into_inner();
        assert_eq!(again.decision(), first.decision());
        assert_eq!(again.reasons, first.reasons);
        assert_eq!(again.policy_revision, first.policy_revision);
        ids.insert(again.decision_id);
    }
    assert_eq!(ids.len(), 5, "cached answers still get fresh decision ids");
    let (_, after) = server.admin_get("/metrics").await;
    assert!(
        hits(&after) >= hits(&before) + 5.0,
        "5 repeats should be cache hits: {} -> {}",
        hits(&before),
        hits(&after)
    );

    // The same question with an overlay is evaluated, not served from cache.
    let mut with_overlay = saas("carol", "write", "Document", "acme-roadmap");
    client.check(with_overlay.clone()).await.unwrap();
    with_overlay.entities_json = r#"[{"uid": {"type": "Saas::User", "id": "carol"},
        "attrs": {"tenant": {"__entity": {"type": "Saas::Tenant", "id": "acme"}},
                  "email": "carol@acme.example", "status": "active",
                  "department": "sales", "clearance": 1},
        "parents": [{"type": "Saas::Role", "id": "acme/editor"}]}]"#
        .into();
    let overlaid = client.check(with_overlay).await.unwrap().into_inner();
    assert_eq!(overlaid.decision(), Decision::Allow);
    server.stop().await.unwrap();
}

/// gRPC reflection lists the services, so reflection-aware clients need no
/// `.proto` files.
#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = TestServer::start_embedded().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "arbiter.v1.Authorizer",
        "arbiter.v1.DecisionLog",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.contains(service), "{service} not in {names:?}");
    }
    // Envoy's service is served, and listed, only with ext_authz on
    // (`tests/ext_authz.rs`).
    assert!(
        !names.contains("envoy.service.auth.v3.Authorization"),
        "{names:?}"
    );
    server.stop().await.unwrap();
}
