//! Identity sync from a real PostgreSQL (127.0.0.1:5432, trust auth), seen
//! through real gRPC decisions: snapshot, each kind of change, disconnect
//! and resume, bad rows, `min_data_revision`, readiness. Each test creates
//! its own database with `deploy/postgres/schema.sql` and drops it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use arbiter::engine::Sources;
use arbiter::identity::{IdentityConfig, PostgresConfig};
use arbiter::proto::v1::{CheckRequest, CheckResponse, Decision};
use common::{TestServer, config, uid};
use tokio_postgres::{Client, NoTls};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const SCHEMA_SQL: &str = include_str!("../deploy/postgres/schema.sql");

const POLICIES: &str = include_str!("../deploy/postgres/example.cedar");

const SEED: &str = include_str!("../deploy/postgres/example-data.sql");

fn server_url(database: &str) -> String {
    format!("postgres://postgres@127.0.0.1:5432/{database}")
}

async fn connect(database: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(&server_url(database), NoTls)
        .await
        .expect("connect to postgres on 127.0.0.1:5432");
    tokio::spawn(connection);
    client
}

/// A database of its own, with the reference schema.
struct TestDb {
    name: String,
    client: Client,
}

impl TestDb {
    async fn create(seed: &str) -> TestDb {
        let name = Self::create_empty().await;
        let client = connect(&name).await;
        client.batch_execute(SCHEMA_SQL).await.expect("schema");
        client.batch_execute(seed).await.expect("seed");
        TestDb { name, client }
    }

    async fn create_empty() -> String {
        let name = format!("arbiter_test_{}", uuid::Uuid::now_v7().simple());
        let admin = connect("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        name
    }

    /// Runs `sql` in one transaction and returns the change-log position of
    /// its last write (`arbiter_write_position()`), as `min_data_revision`.
    async fn write(&self, sql: &str) -> String {
        self.client.batch_execute("BEGIN").await.unwrap();
        self.client.batch_execute(sql).await.unwrap();
        let position: i64 = self
            .client
            .query_one("SELECT arbiter_write_position()", &[])
            .await
            .unwrap()
            .get(0);
        self.client.batch_execute("COMMIT").await.unwrap();
        position.to_string()
    }

    async fn drop(self) {
        drop(self.client);
        drop_database(&self.name).await;
    }
}

async fn drop_database(name: &str) {
    let admin = connect("postgres").await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
}

fn identity(database: &str) -> IdentityConfig {
    IdentityConfig {
        max_staleness_secs: Some(2),
        // A deadline for the sync to apply a write the test waits for: it
        // bounds a hang, not the speed (a 10,000-row change took over 5 s
        // in a debug build on a loaded 2-core machine). The test of the
        // deadline itself sets its own.
        revision_wait_ms: Some(60_000),
        postgres: Some(PostgresConfig {
            url: Some(server_url(database)),
            poll_interval_ms: Some(200),
            reconcile_interval_secs: Some(3600),
            ..PostgresConfig::default()
        }),
        ..IdentityConfig::default()
    }
}

async fn start(dir: &tempfile::TempDir, identity: IdentityConfig) -> TestServer {
    let mut config = server_config(dir);
    config.identity = Some(identity);
    TestServer::start(config).await
}

fn server_config(dir: &tempfile::TempDir) -> arbiter::app::ServeConfig {
    let policies = dir.path().join("policies.cedar");
    std::fs::write(&policies, POLICIES).unwrap();
    config(Sources {
        policies: Some(policies),
        schema: None,
        entities: None,
        ..Default::default()
    })
}

fn request(principal: &str, action: &str, resource: (&str, &str), min: &str) -> CheckRequest {
    CheckRequest {
        principal: uid("Saas::User", principal),
        action: uid("Saas::Action", action),
        resource: uid(resource.0, resource.1),
        context_json: String::new(),
        entities_json: String::new(),
        min_data_revision: min.into(),
        ..Default::default()
    }
}

async fn check(server: &TestServer, request: CheckRequest) -> CheckResponse {
    server
        .client()
        .await
        .check(request)
        .await
        .expect("check")
        .into_inner()
}

/// Asks after the write at `min` is applied; true for allow.
async fn allowed(server: &TestServer, principal: &str, action: &str, min: &str) -> bool {
    let response = check(
        server,
        request(principal, action, ("Saas::Document", "d1"), min),
    )
    .await;
    assert!(
        min.is_empty() || response.data_revision.parse::<u64>().unwrap() >= min.parse().unwrap(),
        "{response:?}"
    );
    response.decision == Decision::Allow as i32
}

async fn enters(server: &TestServer, principal: &str, tenant: &str, min: &str) -> bool {
    let response = check(
        server,
        request(principal, "enter", ("Saas::Tenant", tenant), min),
    )
    .await;
    response.decision == Decision::Allow as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_each_kind_of_change_reaches_decisions() {
    let db = TestDb::create(SEED).await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, identity(&db.name)).await;

    // Snapshot: bob is in backend, which is in eng.
    assert!(allowed(&server, "bob", "read", "").await);
    assert!(!allowed(&server, "ann", "read", "").await);
    assert!(allowed(&server, "bob", "secret", "").await);
    // Tenants side by side; another tenant's data only where policies say.
    assert!(enters(&server, "bob", "acme", "").await);
    assert!(!enters(&server, "bob", "globex", "").await);
    assert!(enters(&server, "gina", "globex", "").await);
    let first = check(&server, request("bob", "read", ("Saas::Document", "d"), "")).await;
    assert!(first.data_revision.parse::<u64>().unwrap() > 0);

    // User insert.
    let rev = db
        .write("INSERT INTO users VALUES ('carl', 'acme', 'carl@acme.test', 'active', '{}'); INSERT INTO memberships VALUES ('carl', 'eng');")
        .await;
    assert!(allowed(&server, "carl", "read", &rev).await);
    // Attribute change.
    let rev = db
        .write("UPDATE users SET attributes = '{\"department\": \"eng\", \"clearance\": 1}' WHERE id = 'bob'")
        .await;
    assert!(!allowed(&server, "bob", "secret", &rev).await);
    // User update (status).
    let rev = db
        .write("UPDATE users SET status = 'suspended' WHERE id = 'bob'")
        .await;
    assert!(!allowed(&server, "bob", "read", &rev).await);
    let rev = db
        .write("UPDATE users SET status = 'active' WHERE id = 'bob'")
        .await;
    assert!(allowed(&server, "bob", "read", &rev).await);
    // Membership add and remove.
    let rev = db
        .write("INSERT INTO memberships VALUES ('ann', 'backend')")
        .await;
    assert!(allowed(&server, "ann", "read", &rev).await);
    let rev = db
        .write("DELETE FROM memberships WHERE user_id = 'ann'")
        .await;
    assert!(!allowed(&server, "ann", "read", &rev).await);
    // Role assignment through the role hierarchy.
    let rev = db
        .write("INSERT INTO role_assignments VALUES ('ann', 'acme/editor')")
        .await;
    assert!(allowed(&server, "ann", "write", &rev).await);
    // Moving a nested group out of eng and back.
    let rev = db
        .write("UPDATE groups SET parent_id = NULL WHERE id = 'backend'")
        .await;
    assert!(!allowed(&server, "bob", "read", &rev).await);
    let rev = db
        .write("UPDATE groups SET parent_id = 'eng' WHERE id = 'backend'")
        .await;
    assert!(allowed(&server, "bob", "read", &rev).await);
    // User delete.
    let rev = db.write("DELETE FROM users WHERE id = 'carl'").await;
    assert!(!allowed(&server, "carl", "read", &rev).await);
    // Tenant removal (cascades to its users).
    let rev = db.write("DELETE FROM tenants WHERE id = 'globex'").await;
    assert!(!enters(&server, "gina", "globex", &rev).await);
    assert!(allowed(&server, "bob", "read", &rev).await);

    server.stop().await.unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_disconnect_without_losing_a_change() {
    let db = TestDb::create(SEED).await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, identity(&db.name)).await;
    assert!(!allowed(&server, "ann", "read", "").await);

    let mut last = String::new();
    for round in 0..3 {
        // End Arbiter's connection from the server side, then write while
        // it is away.
        let ended: i64 = db
            .client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = 'arbiter'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ended >= 1 || round > 0, "arbiter had no connection to end");
        for i in 0..5 {
            last = db
                .write(&format!(
                    "INSERT INTO users VALUES ('u{round}-{i}', 'acme', 'u@acme.test', 'active', '{{}}'); \
                     INSERT INTO memberships VALUES ('u{round}-{i}', 'eng');"
                ))
                .await;
        }
    }
    last = {
        let rev = db
            .write("INSERT INTO memberships VALUES ('ann', 'backend')")
            .await;
        assert!(rev.parse::<u64>().unwrap() > last.parse::<u64>().unwrap());
        rev
    };
    assert!(allowed(&server, "ann", "read", &last).await);
    for round in 0..3 {
        for i in 0..5 {
            assert!(
                allowed(&server, &format!("u{round}-{i}"), "read", "").await,
                "u{round}-{i} lost"
            );
        }
    }
    let (_, metrics) = server.admin_get("/metrics").await;
    assert!(
        metrics.contains("arbiter_identity_reconnects_total"),
        "{metrics}"
    );
    server.stop().await.unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_refused_by_name_and_sync_goes_on() {
    let seed = format!(
        "{SEED}
         INSERT INTO users VALUES ('arrayattrs', 'acme', 'x@acme.test', 'active', '[1, 2]');
         INSERT INTO users VALUES ('nullattr', 'acme', 'y@acme.test', 'active', '{{\"clearance\": null}}');
         INSERT INTO memberships VALUES ('arrayattrs', 'eng'), ('nullattr', 'eng');"
    );
    let db = TestDb::create(&seed).await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, identity(&db.name)).await;

    // Malformed attributes at snapshot: those users are refused, others not.
    assert!(!allowed(&server, "arrayattrs", "read", "").await);
    assert!(!allowed(&server, "nullattr", "read", "").await);
    assert!(allowed(&server, "bob", "read", "").await);

    // A cycle in group nesting: eng into backend (which is in eng).
    let rev = db
        .write("UPDATE groups SET parent_id = 'backend' WHERE id = 'eng'")
        .await;
    // eng keeps its last good state; bob is still in eng through backend.
    assert!(allowed(&server, "bob", "read", &rev).await);

    // A parent that does not exist (a database without the foreign key).
    db.client
        .batch_execute("ALTER TABLE memberships DROP CONSTRAINT memberships_group_id_fkey")
        .await
        .unwrap();
    let rev = db
        .write("INSERT INTO memberships VALUES ('ann', 'eng'), ('ann', 'ghost')")
        .await;
    assert!(!allowed(&server, "ann", "read", &rev).await);

    // Malformed attributes on an update.
    let rev = db
        .write("UPDATE users SET attributes = '\"text\"' WHERE id = 'gina'")
        .await;
    let response = check(
        &server,
        request("gina", "enter", ("Saas::Tenant", "globex"), &rev),
    )
    .await;
    // gina keeps her last good state.
    assert_eq!(response.decision, Decision::Allow as i32, "{response:?}");

    // Everything else keeps syncing.
    let rev = db
        .write(
            "INSERT INTO users VALUES ('dora', 'acme', 'd@acme.test', 'active', '{}'); \
                INSERT INTO memberships VALUES ('dora', 'eng');",
        )
        .await;
    assert!(allowed(&server, "dora", "read", &rev).await);

    let (_, metrics) = server.admin_get("/metrics").await;
    for needle in [
        "arbiter_identity_rejected_rows_total",
        "arrayattrs",
        "nullattr",
        "reason=\"cycle\"",
        "reason=\"missing_parent\"",
        "reason=\"attributes\"",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }
    server.stop().await.unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_data_revision_waits_for_the_write_or_fails() {
    let db = TestDb::create(SEED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut identity = identity(&db.name);
    identity.revision_wait_ms = Some(3000);
    // Slow polling: only NOTIFY or the wait can make this prompt.
    identity.postgres.as_mut().unwrap().poll_interval_ms = Some(60_000);
    let server = start(&dir, identity).await;

    // A write not yet committed: the check waits for it.
    db.client.batch_execute("BEGIN").await.unwrap();
    db.client
        .batch_execute("INSERT INTO memberships VALUES ('ann', 'eng')")
        .await
        .unwrap();
    let rev: i64 = db
        .client
        .query_one("SELECT arbiter_write_position()", &[])
        .await
        .unwrap()
        .get(0);
    let mut client = server.client().await;
    let waiting = tokio::spawn(async move {
        client
            .check(request(
                "ann",
                "read",
                ("Saas::Document", "d"),
                &rev.to_string(),
            ))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    db.client.batch_execute("COMMIT").await.unwrap();
    let response = waiting.await.unwrap().expect("check").into_inner();
    assert_eq!(response.decision, Decision::Allow as i32, "{response:?}");

    // A revision that never comes: FAILED_PRECONDITION after the wait.
    let started = std::time::Instant::now();
    let error = server
        .client()
        .await
        .check(request(
            "ann",
            "read",
            ("Saas::Document", "d"),
            &(rev + 1000).to_string(),
        ))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    assert!(started.elapsed() >= Duration::from_secs(3));
    // Not a revision at all.
    let error = server
        .client()
        .await
        .check(request("ann", "read", ("Saas::Document", "d"), "abc"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");

    server.stop().await.unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_first_sync_and_reports_staleness() {
    // The database does not exist yet: the sync retries, not ready.
    let name = format!("arbiter_test_{}", uuid::Uuid::now_v7().simple());
    let dir = tempfile::tempdir().unwrap();
    let mut config = server_config(&dir);
    config.identity = Some(identity(&name));
    let server = TestServer::spawn(config).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(server.health().await, ServingStatus::NotServing);
    assert_eq!(server.admin_get("/ready").await.0, 503);

    // The store appears: first full sync, then SERVING.
    let admin = connect("postgres").await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let client = connect(&name).await;
    client.batch_execute(SCHEMA_SQL).await.unwrap();
    client.batch_execute(SEED).await.unwrap();
    drop(client);
    server.wait_for(ServingStatus::Serving).await;
    assert_eq!(server.admin_get("/ready").await.0, 200);
    let response = check(&server, request("bob", "read", ("Saas::Document", "d"), "")).await;
    assert_eq!(response.decision, Decision::Allow as i32);
    assert!(!response.data_stale);

    // The store goes away: past max staleness (2 s), not ready, while
    // decisions continue from the cache and say so.
    drop_database(&name).await;
    server.wait_for(ServingStatus::NotServing).await;
    assert_eq!(server.admin_get("/ready").await.0, 503);
    let response = check(&server, request("bob", "read", ("Saas::Document", "d"), "")).await;
    assert_eq!(response.decision, Decision::Allow as i32);
    assert!(response.data_stale);

    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_repairs_and_reports_drift() {
    let db = TestDb::create(SEED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut identity = identity(&db.name);
    identity.postgres.as_mut().unwrap().reconcile_interval_secs = Some(1);
    let server = start(&dir, identity).await;
    assert!(allowed(&server, "bob", "read", "").await);

    // A change the change log never sees (triggers off): drift.
    db.client
        .batch_execute(
            "ALTER TABLE memberships DISABLE TRIGGER arbiter_track; \
             DELETE FROM memberships WHERE user_id = 'bob'; \
             ALTER TABLE memberships ENABLE TRIGGER arbiter_track;",
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while allowed(&server, "bob", "read", "").await {
        assert!(std::time::Instant::now() < deadline, "drift never repaired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = server.admin_get("/metrics").await;
    assert!(
        metrics.contains("arbiter_identity_drift_total"),
        "{metrics}"
    );
    server.stop().await.unwrap();
    db.drop().await;
}

/// Measurement, not a timed test: from COMMIT to the first decision that
/// reflects it (NOTIFY-driven; `ARBITER_LATENCY_SAMPLES` writes, 500 by
/// default, each way), and a membership change of a group with 10,000
/// members. Prints the figures; asserts only correctness.
/// `cargo test --release --test identity_postgres -- --ignored --nocapture latency`
///
/// `ARBITER_LATENCY_DATABASE=arbiter_load_1000000` runs it against a
/// database kept by `KEEP_DB=1 bash benches/identity_pg_load.sh` (1M users)
/// instead of the small example data: the test adds the rows it writes and
/// removes them at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn latency_commit_to_decision() {
    let kept = std::env::var("ARBITER_LATENCY_DATABASE").ok();
    let db = match &kept {
        Some(name) => {
            let client = connect(name).await;
            client.batch_execute(LATENCY_CLEANUP).await.unwrap();
            client
                .batch_execute(
                    "INSERT INTO groups VALUES ('eng', 'acme', 'Engineering', NULL); \
                     INSERT INTO users VALUES ('ann', 'acme', 'ann@acme.test', 'active', '{}');",
                )
                .await
                .unwrap();
            TestDb {
                name: name.clone(),
                client,
            }
        }
        None => TestDb::create(SEED).await,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut identity = identity(&db.name);
    // Only NOTIFY makes changes prompt.
    identity.postgres.as_mut().unwrap().poll_interval_ms = Some(60_000);
    let loading = std::time::Instant::now();
    let mut config = server_config(&dir);
    config.identity = Some(identity);
    let server = TestServer::spawn(config).await;
    // A million users take about 40 s to sync.
    server
        .wait_for_within(ServingStatus::Serving, Duration::from_secs(300))
        .await;
    println!("server ready on {} in {:?}", db.name, loading.elapsed());
    let mut client = server.client().await;
    let mut ask = async |principal: &str| {
        client
            .check(request(principal, "read", ("Saas::Document", "d"), ""))
            .await
            .unwrap()
            .into_inner()
            .decision
            == Decision::Allow as i32
    };

    // Two ways to see a write: asking until the answer changes (a client
    // that polls), and one check with `min_data_revision` (read your
    // writes: the server answers as soon as sync has applied it).
    let count: usize = std::env::var("ARBITER_LATENCY_SAMPLES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(500);
    let toggle = |i: usize| {
        if i.is_multiple_of(2) {
            (true, "INSERT INTO memberships VALUES ('ann', 'eng')")
        } else {
            (false, "DELETE FROM memberships WHERE user_id = 'ann'")
        }
    };
    let mut polled = Vec::new();
    for i in 0..count {
        let (expected, sql) = toggle(i);
        db.client.batch_execute(sql).await.unwrap();
        let committed = std::time::Instant::now();
        while ask("ann").await != expected {
            assert!(committed.elapsed() < Duration::from_secs(10));
        }
        polled.push(committed.elapsed());
    }
    let mut waited = Vec::new();
    let mut wait_client = server.client().await;
    for i in 0..count {
        let (expected, sql) = toggle(i);
        let rev = db.write(sql).await;
        let committed = std::time::Instant::now();
        let response = wait_client
            .check(request("ann", "read", ("Saas::Document", "d"), &rev))
            .await
            .unwrap()
            .into_inner();
        waited.push(committed.elapsed());
        assert_eq!(response.decision == Decision::Allow as i32, expected);
    }
    for (name, mut samples) in [
        ("asking until it changes", polled),
        ("one check with min_data_revision", waited),
    ] {
        samples.sort();
        println!(
            "COMMIT -> decision ({name}): p50 {:?}, p99 {:?}, max {:?}, slowest 5 {:?} ({} samples)",
            samples[samples.len() / 2],
            samples[samples.len() * 99 / 100],
            samples[samples.len() - 1],
            &samples[samples.len() - 5..],
            samples.len()
        );
    }

    // A group of 10,000 members moved out of eng: every member's decision
    // changes with one change-log row.
    let started = std::time::Instant::now();
    db.client
        .batch_execute(
            "INSERT INTO groups VALUES ('big', 'acme', 'Big', 'eng'); \
             INSERT INTO users SELECT 'm' || n, 'acme', 'm@acme.test', 'active', '{}' \
               FROM generate_series(1, 10000) AS n; \
             INSERT INTO memberships SELECT 'm' || n, 'big' FROM generate_series(1, 10000) AS n;",
        )
        .await
        .unwrap();
    while !ask("m10000").await {
        assert!(started.elapsed() < Duration::from_secs(60));
    }
    println!("10,000 new members synced in {:?}", started.elapsed());
    db.client
        .batch_execute("UPDATE groups SET parent_id = NULL WHERE id = 'big'")
        .await
        .unwrap();
    let committed = std::time::Instant::now();
    while ask("m5000").await {
        assert!(committed.elapsed() < Duration::from_secs(10));
    }
    let first = committed.elapsed();
    assert!(!ask("m1").await && !ask("m10000").await);
    println!("moving a group of 10,000 members: visible in {first:?}");
    server.stop().await.unwrap();
    if kept.is_some() {
        db.client.batch_execute(LATENCY_CLEANUP).await.unwrap();
    } else {
        db.drop().await;
    }
}

/// What `latency_commit_to_decision` adds to a kept load database.
const LATENCY_CLEANUP: &str = "DELETE FROM memberships WHERE user_id = 'ann' OR user_id LIKE 'm%'; \
     DELETE FROM users WHERE id = 'ann' OR id LIKE 'm%'; \
     DELETE FROM groups WHERE id IN ('big', 'eng');";

/// The embedded example policies (with their schema and action groups)
/// over identity data from Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_schema_and_action_groups_over_synced_data() {
    let seed = format!(
        "{SEED}
         INSERT INTO roles VALUES ('admin', NULL, 'admin', 'editor'), ('acme/admin', 'acme', 'admin', 'admin');
         INSERT INTO role_assignments VALUES ('bob', 'acme/admin');"
    );
    let db = TestDb::create(&seed).await;
    let mut config = config(Sources::default());
    config.identity = Some(identity(&db.name));
    let server = TestServer::start(config).await;
    let admin = |mfa: bool, tenant: &str| CheckRequest {
        principal: uid("Saas::User", "bob"),
        action: uid("Saas::Action", "admin"),
        resource: uid("Saas::Tenant", tenant),
        context_json: format!(r#"{{"mfa": {mfa}, "source_ip": "10.1.2.3"}}"#),
        entities_json: String::new(),
        ..Default::default()
    };
    // `action in Saas::Action::"tenant_administration"` needs the schema's
    // action groups, which synced data does not carry.
    let response = check(&server, admin(true, "acme")).await;
    assert_eq!(response.decision, Decision::Allow as i32, "{response:?}");
    assert_eq!(response.reasons, ["admin-can-administer-tenant"]);
    let response = check(&server, admin(false, "acme")).await;
    assert_eq!(response.decision, Decision::Deny as i32, "{response:?}");
    assert!(
        response
            .reasons
            .contains(&"admin-actions-require-mfa".to_string())
    );
    let response = check(&server, admin(true, "globex")).await;
    assert_eq!(response.decision, Decision::Deny as i32, "{response:?}");
    server.stop().await.unwrap();
    db.drop().await;
}

/// The identity part of `/ready`.
async fn identity_status(server: &TestServer) -> serde_json::Value {
    let (_, body) = server.admin_get("/ready").await;
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    ready["identity"].clone()
}

/// Lag in positions: while the sync is held up between seeing the newest
/// change-log position and applying it, `/ready` and `/metrics` show how
/// many positions the served data is behind; once applied, zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_in_positions_while_the_sync_is_held_up() {
    let db = TestDb::create(SEED).await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, identity(&db.name)).await;
    let status = identity_status(&server).await;
    let applied = status["applied_position"].as_u64().unwrap();
    assert!(applied > 0, "{status}");
    assert_eq!(status["lag_positions"], 0, "{status}");

    // Another session locks `users`: the sync can read the change log but
    // not the mapping view, so it stops between the two.
    let blocker = connect(&db.name).await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // Three changes that do not touch `users` themselves.
    let rev = db
        .write(
            "INSERT INTO roles VALUES ('r1', 'acme', 'r1', NULL), ('r2', 'acme', 'r2', NULL), \
             ('r3', 'acme', 'r3', NULL)",
        )
        .await;
    let newest: u64 = rev.parse().unwrap();
    assert_eq!(newest, applied + 3);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = identity_status(&server).await;
        if status["lag_positions"] == 3 {
            assert_eq!(status["source_position"], newest, "{status}");
            assert_eq!(status["applied_position"], applied, "{status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lag never reported: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, metrics) = server.admin_get("/metrics").await;
    for needle in [
        "arbiter_identity_lag_positions{source=\"postgres\"}",
        "arbiter_identity_source_position{source=\"postgres\"}",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }

    // The lock goes: the changes are applied and the lag is gone.
    blocker.batch_execute("COMMIT").await.unwrap();
    assert!(allowed(&server, "bob", "read", &rev).await);
    // The status follows the engine's swap by a few instructions.
    loop {
        let status = identity_status(&server).await;
        if status["lag_positions"] == 0 {
            assert_eq!(status["applied_position"], newest, "{status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline + Duration::from_secs(10),
            "lag never cleared: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(blocker);
    server.stop().await.unwrap();
    db.drop().await;
}

/// With the slice cache on (the default): prepared slices of 10,000
/// members of one group, then the group's membership changes, and then
/// the group moves out of `eng`; every sampled member's decision follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slice_cache_follows_a_group_of_10k_members() {
    let db = TestDb::create(SEED).await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, identity(&db.name)).await;
    let rev = db
        .write(
            "INSERT INTO groups VALUES ('big', 'acme', 'Big', 'eng'); \
             INSERT INTO users SELECT 'm' || n, 'acme', 'm@acme.test', 'active', '{}' \
               FROM generate_series(1, 10000) AS n; \
             INSERT INTO memberships SELECT 'm' || n, 'big' FROM generate_series(1, 10000) AS n;",
        )
        .await;
    let sample: Vec<String> = (1..=10_000).step_by(97).map(|n| format!("m{n}")).collect();
    for member in &sample {
        assert!(allowed(&server, member, "read", &rev).await, "{member}");
    }
    // Another data publish empties the decision cache, not the slices.
    let rev = db
        .write("UPDATE users SET email = 'x@acme.test' WHERE id = 'ann'")
        .await;
    for member in &sample {
        assert!(allowed(&server, member, "read", &rev).await, "{member}");
    }
    let (_, metrics) = server.admin_get("/metrics").await;
    assert!(
        metrics.contains("arbiter_slice_cache_hits_total"),
        "{metrics}"
    );

    // The group moves out of eng: one change, every member's slice.
    let rev = db
        .write("UPDATE groups SET parent_id = NULL WHERE id = 'big'")
        .await;
    for member in &sample {
        assert!(!allowed(&server, member, "read", &rev).await, "{member}");
    }
    // Back in, then all 10,000 memberships go in one transaction.
    let rev = db
        .write("UPDATE groups SET parent_id = 'eng' WHERE id = 'big'")
        .await;
    for member in &sample {
        assert!(allowed(&server, member, "read", &rev).await, "{member}");
    }
    let rev = db
        .write("DELETE FROM memberships WHERE group_id = 'big'")
        .await;
    for member in &sample {
        assert!(!allowed(&server, member, "read", &rev).await, "{member}");
    }
    assert!(allowed(&server, "bob", "read", &rev).await);
    server.stop().await.unwrap();
    db.drop().await;
}

/// Group nesting 10,000 deep: the store keeps the groups within
/// `max_hierarchy_depth` (32) of the top and refuses the rest by name, so
/// users near the top are decided as before and users below are denied;
/// a deeper chain written later is refused the same way. Nothing grows
/// with the chain but the refusals (Cedar's closure over such a chain
/// recursed once per level and overflowed the stack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_nesting_ten_thousand_deep_is_refused_below_the_depth_limit() {
    // n0 is in eng (depth 1), n{i} in n{i-1} (depth i + 1).
    let seed = format!(
        "{SEED}
         INSERT INTO groups SELECT 'n' || i, 'acme', 'N', CASE WHEN i = 0 THEN 'eng' ELSE 'n' || (i - 1) END
           FROM generate_series(0, 9999) AS i;
         INSERT INTO users VALUES ('near', 'acme', 'n@acme.test', 'active', '{{}}'),
                                  ('edge', 'acme', 'e@acme.test', 'active', '{{}}'),
                                  ('far', 'acme', 'f@acme.test', 'active', '{{}}');
         INSERT INTO memberships VALUES ('near', 'n20'), ('edge', 'n30'), ('far', 'n9999');"
    );
    let db = TestDb::create(&seed).await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, identity(&db.name)).await;

    // near: n20 is 21 deep, near 22; edge: n30 is 31 deep, edge 32.
    assert!(allowed(&server, "near", "read", "").await);
    assert!(allowed(&server, "edge", "read", "").await);
    assert!(!allowed(&server, "far", "read", "").await);
    assert!(allowed(&server, "bob", "read", "").await);
    let (_, ready) = server.admin_get("/ready").await;
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    // 2 tenants, 2 roles, eng, backend, n0..n31 (n31 is 32 deep), 3
    // example users, near, edge.
    assert_eq!(ready["entities"], 2 + 2 + 2 + 32 + 3 + 2, "{ready}");

    // Changes: a user joining the deepest stored group (n31, 32 deep) would
    // be 33 deep: refused, not stored.
    let rev = db
        .write(
            "INSERT INTO users VALUES ('deep', 'acme', 'd@acme.test', 'active', '{}');
             INSERT INTO memberships VALUES ('deep', 'n31');",
        )
        .await;
    assert!(!allowed(&server, "deep", "read", &rev).await);
    // A new chain of 100 under n10 in one transaction: the part within the
    // limit syncs, the rest is refused.
    let rev = db
        .write(
            "INSERT INTO groups SELECT 'm' || i, 'acme', 'M', CASE WHEN i = 0 THEN 'n10' ELSE 'm' || (i - 1) END
               FROM generate_series(0, 99) AS i;
             INSERT INTO users VALUES ('m-ok', 'acme', 'm@acme.test', 'active', '{}'),
                                      ('m-no', 'acme', 'o@acme.test', 'active', '{}');
             INSERT INTO memberships VALUES ('m-ok', 'm5'), ('m-no', 'm99');",
        )
        .await;
    assert!(allowed(&server, "m-ok", "read", &rev).await);
    assert!(!allowed(&server, "m-no", "read", &rev).await);
    let (_, metrics) = server.admin_get("/metrics").await;
    assert!(metrics.contains("reason=\"too_deep\""), "{metrics}");
    server.stop().await.unwrap();
    db.drop().await;
}

/// Whether the server this test talks to has TLS on (Debian's cluster has,
/// with its self-signed "snakeoil" certificate); the TLS tests need it.
async fn server_has_tls() {
    let admin = connect("postgres").await;
    let ssl: String = admin.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    assert_eq!(
        ssl, "on",
        "the TLS tests need `ssl = on` in the PostgreSQL on 127.0.0.1:5432"
    );
}

/// TLS to the identity store is rustls (`identity::tls`): with
/// `sslmode=require` and no verification (the default) the session is
/// encrypted; with `tls_verify` a certificate that no trusted root issued is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_rustls_encrypts_and_verifies_only_when_asked() {
    server_has_tls().await;
    let url = format!("{}?sslmode=require", server_url("postgres"));
    let config: tokio_postgres::Config = url.parse().unwrap();

    let tls = arbiter::identity::tls::postgres_connector(false).unwrap();
    let (client, connection) = config.connect(tls).await.unwrap();
    let connection = tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the session is not encrypted");
    assert!(row.get::<_, Option<String>>(1).is_some());
    drop(client);
    connection.await.unwrap().unwrap();

    // The server's self-signed certificate is in no trusted root store.
    let tls = arbiter::identity::tls::postgres_connector(true).unwrap();
    let error = config.connect(tls).await.err().expect("verification fails");
    let text = format!("{error:?}");
    assert!(
        text.contains("UnknownIssuer") || text.contains("NotValidForName"),
        "{text}"
    );
}

/// The server syncs over `sslmode=require`, and its session is encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_over_tls_with_sslmode_require() {
    server_has_tls().await;
    let db = TestDb::create(SEED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut identity = identity(&db.name);
    if let Some(postgres) = identity.postgres.as_mut() {
        postgres.url = Some(format!("{}?sslmode=require", server_url(&db.name)));
    }
    let server = start(&dir, identity).await;
    assert!(allowed(&server, "bob", "read", "").await);
    let encrypted: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = current_database() AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "no encrypted session to {}", db.name);
    server.stop().await.unwrap();
    db.drop().await;
}
