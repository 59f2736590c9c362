//! Identity sync from a real SCIM 2.0 service provider (`scim2-server` from
//! PyPI, started here on a free port with a bearer token), seen through real
//! gRPC decisions: snapshot, nested groups, membership, attribute, status and
//! nesting changes, and a deleted user that stays listed as a member.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use arbiter::engine::Sources;
use arbiter::identity::{IdentityConfig, ScimConfig};
use arbiter::proto::v1::{CheckRequest, Decision};
use common::{TestServer, config, uid};
use serde_json::{Value, json};

const TOKEN: &str = "arbiter-test-token";
const ENTERPRISE: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

/// A `scim2-server` child process, killed on drop.
struct Scim {
    _child: tokio::process::Child,
    url: String,
    http: reqwest::Client,
}

impl Scim {
    async fn start() -> Scim {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new("scim2-server")
            .args(["--hostname", "127.0.0.1", "--port", &port.to_string()])
            .args(["--bearer-token", TOKEN])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("scim2-server (pip install scim2-server; tests/run.sh does it)");
        let scim = Scim {
            _child: child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let up = scim
                .http
                .get(format!("{}/ServiceProviderConfig", scim.url))
                .bearer_auth(TOKEN)
                .send()
                .await
                .is_ok_and(|response| response.status().is_success());
            if up {
                return scim;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "scim2-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .http
            .request(method, format!("{}/{path}", self.url))
            .bearer_auth(TOKEN)
            .header("Content-Type", "application/scim+json");
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let response = request.send().await.unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        let text = response.text().await.unwrap();
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        }
    }

    async fn create_user(&self, name: &str, department: &str) -> String {
        let user = self
            .send(
                reqwest::Method::POST,
                "Users",
                Some(user_body(name, department, true)),
            )
            .await;
        user["id"].as_str().unwrap().to_string()
    }

    async fn put_user(&self, id: &str, name: &str, department: &str, active: bool) {
        self.send(
            reqwest::Method::PUT,
            &format!("Users/{id}"),
            Some(user_body(name, department, active)),
        )
        .await;
    }

    async fn create_group(&self, name: &str, members: &[(&str, &str)]) -> String {
        let group = self
            .send(
                reqwest::Method::POST,
                "Groups",
                Some(group_body(name, members)),
            )
            .await;
        group["id"].as_str().unwrap().to_string()
    }

    async fn put_group(&self, id: &str, name: &str, members: &[(&str, &str)]) {
        self.send(
            reqwest::Method::PUT,
            &format!("Groups/{id}"),
            Some(group_body(name, members)),
        )
        .await;
    }
}

fn user_body(name: &str, department: &str, active: bool) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", ENTERPRISE],
        "userName": name,
        "active": active,
        "emails": [{"value": format!("{name}@example.test"), "primary": true}],
        ENTERPRISE: {"department": department, "employeeNumber": "7"},
    })
}

fn group_body(name: &str, members: &[(&str, &str)]) -> Value {
    let members: Vec<Value> = members
        .iter()
        .map(|(id, kind)| json!({"value": id, "type": kind}))
        .collect();
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "displayName": name,
        "members": members,
    })
}

fn request(principal: &str, action: &str) -> CheckRequest {
    CheckRequest {
        principal: uid("Saas::User", principal),
        action: uid("Saas::Action", action),
        resource: uid("Saas::Document", "d1"),
        context_json: String::new(),
        entities_json: String::new(),
        ..Default::default()
    }
}

async fn allowed(server: &TestServer, principal: &str, action: &str) -> bool {
    let response = server
        .client()
        .await
        .check(request(principal, action))
        .await
        .unwrap()
        .into_inner();
    assert!(
        response.data_revision.parse::<u64>().is_ok(),
        "{response:?}"
    );
    response.decision == Decision::Allow as i32
}

/// Waits until the decision is `expected` (sync is polling).
async fn eventually(server: &TestServer, principal: &str, action: &str, expected: bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while allowed(server, principal, action).await != expected {
        assert!(
            std::time::Instant::now() < deadline,
            "{principal} {action}: never became {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scim_users_and_nested_groups_reach_decisions() {
    let scim = Scim::start().await;
    let bob = scim.create_user("bob", "eng").await;
    let ann = scim.create_user("ann", "sales").await;
    let eng = scim.create_group("eng", &[(&bob, "User")]).await;
    let all = scim.create_group("all", &[(&eng, "Group")]).await;

    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.cedar");
    std::fs::write(
        &policies,
        format!(
            r#"
@id("all-read")
permit (principal in Saas::Group::"{all}", action == Saas::Action::"read", resource);
@id("eng-deploy")
permit (principal, action == Saas::Action::"deploy", resource)
when {{ principal has department && principal.department == "eng" }};
@id("active-only")
forbid (principal, action, resource)
when {{ principal has status && principal.status != "active" }};
"#
        ),
    )
    .unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let mut config = config(Sources {
        policies: Some(policies),
        schema: None,
        entities: None,
        ..Default::default()
    });
    config.identity = Some(IdentityConfig {
        scim: Some(ScimConfig {
            url: scim.url.clone(),
            token_file: Some(token_file),
            poll_interval_ms: Some(200),
            reconcile_interval_secs: Some(2),
            page_size: Some(1),
            ..ScimConfig::default()
        }),
        ..IdentityConfig::default()
    });
    let server = TestServer::start(config).await;

    // Snapshot (paginated one by one): bob is in eng, nested in all.
    assert!(allowed(&server, &bob, "read").await);
    assert!(allowed(&server, &bob, "deploy").await);
    assert!(!allowed(&server, &ann, "read").await);
    assert!(!allowed(&server, &ann, "deploy").await);

    // Membership add, then remove.
    scim.put_group(&eng, "eng", &[(&bob, "User"), (&ann, "User")])
        .await;
    eventually(&server, &ann, "read", true).await;
    scim.put_group(&eng, "eng", &[(&bob, "User")]).await;
    eventually(&server, &ann, "read", false).await;
    // Enterprise attribute change.
    scim.put_user(&ann, "ann", "eng", true).await;
    eventually(&server, &ann, "deploy", true).await;
    // Deactivation.
    scim.put_user(&ann, "ann", "eng", false).await;
    eventually(&server, &ann, "deploy", false).await;
    // Moving the nested group out of `all`, and back.
    scim.put_group(&all, "all", &[]).await;
    eventually(&server, &bob, "read", false).await;
    scim.put_group(&all, "all", &[(&eng, "Group")]).await;
    eventually(&server, &bob, "read", true).await;
    // A new user, added to the nested group.
    let carl = scim.create_user("carl", "ops").await;
    scim.put_group(&eng, "eng", &[(&bob, "User"), (&carl, "User")])
        .await;
    eventually(&server, &carl, "read", true).await;
    // Deleting a user: scim2-server still lists bob as a member of eng; the
    // full reconciliation removes him all the same.
    scim.send(reqwest::Method::DELETE, &format!("Users/{bob}"), None)
        .await;
    eventually(&server, &bob, "deploy", false).await;
    eventually(&server, &bob, "read", false).await;
    assert!(allowed(&server, &carl, "read").await);

    server.stop().await.unwrap();
}

/// Groups nested 10,000 deep in the SCIM server (each group a member of the
/// one above): the groups within `max_hierarchy_depth` (32) of the top
/// sync and decide; the rest are refused by name and a user at the bottom
/// is denied, with the server serving throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_nested_ten_thousand_deep_are_refused_below_the_depth_limit() {
    const DEPTH: usize = 10_000;
    let scim = Scim::start().await;
    let near = scim.create_user("near", "eng").await;
    let far = scim.create_user("far", "eng").await;
    // Bottom up: g{i} holds g{i+1}; `near` is in g5 (6 ancestors), `far`
    // in the last group.
    let mut below = scim
        .create_group(&format!("g{}", DEPTH - 1), &[(&far, "User")])
        .await;
    let mut top = String::new();
    for i in (0..DEPTH - 1).rev() {
        let mut members = vec![(below.as_str(), "Group")];
        if i == 5 {
            members.push((near.as_str(), "User"));
        }
        let id = scim.create_group(&format!("g{i}"), &members).await;
        below = id.clone();
        top = id;
    }
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.cedar");
    std::fs::write(
        &policies,
        format!(
            r#"@id("top-read")
permit (principal in Saas::Group::"{top}", action == Saas::Action::"read", resource);
"#
        ),
    )
    .unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let mut config = config(Sources {
        policies: Some(policies),
        schema: None,
        entities: None,
        ..Default::default()
    });
    config.identity = Some(IdentityConfig {
        scim: Some(ScimConfig {
            url: scim.url.clone(),
            token_file: Some(token_file),
            poll_interval_ms: Some(500),
            reconcile_interval_secs: Some(3600),
            ..ScimConfig::default()
        }),
        ..IdentityConfig::default()
    });
    let server = TestServer::start(config).await;
    assert!(allowed(&server, &near, "read").await);
    assert!(!allowed(&server, &far, "read").await);
    let (_, ready) = server.admin_get("/ready").await;
    let ready: Value = serde_json::from_str(&ready).unwrap();
    // g0 .. g32 (g32 has 32 ancestors) and near; far and g33.. refused.
    assert_eq!(ready["entities"], 33 + 1, "{ready}");
    let (_, metrics) = server.admin_get("/metrics").await;
    assert!(metrics.contains("reason=\"too_deep\""), "{metrics}");
    server.stop().await.unwrap();
}
