//! Template links (`--template-links`): hand-written templates on the example
//! schema (a per-tenant admin template, a per-document share template,
//! `tests/fixtures/template_links/`), every kind of bad links file refused
//! with file, entry and field, the CLI subcommands, and hot reload of the
//! links file against a running server (a bad file keeps the last good set).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use arbiter::engine::loader;
use arbiter::engine::{CheckInput, Engine, LoadOptions, Snapshot, Sources, UidInput};
use arbiter::fixtures;
use arbiter::proto::v1::CheckRequest;
use common::{TestServer, config, uid};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture_dir() -> PathBuf {
    root().join("tests/fixtures/template_links")
}

/// The example set plus the templates, in a directory of their own.
fn example_with_templates(dir: &Path) -> Sources {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    for entry in std::fs::read_dir(root().join("policies")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "cedar") {
            std::fs::copy(&path, policies.join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(
        fixture_dir().join("templates.cedar"),
        policies.join("templates.cedar"),
    )
    .unwrap();
    std::fs::copy(fixture_dir().join("links.json"), dir.join("links.json")).unwrap();
    Sources {
        policies: Some(policies),
        schema: Some(root().join("policies/schema.cedarschema")),
        entities: Some(root().join("policies/entities.json")),
        template_links: Some(dir.join("links.json")),
        ..Default::default()
    }
}

fn load(sources: &Sources) -> Result<Snapshot, String> {
    loader::load(sources, LoadOptions::default())
        .map(|(snapshot, _)| snapshot)
        .map_err(|error| error.to_string())
}

fn decide(
    snapshot: &Snapshot,
    principal: (&str, &str),
    action: &str,
    resource: (&str, &str),
) -> Result<(bool, Vec<String>), String> {
    let input = CheckInput {
        principal: Some(UidInput {
            type_name: principal.0,
            id: principal.1,
        }),
        action: Some(UidInput {
            type_name: "Saas::Action",
            id: action,
        }),
        resource: Some(UidInput {
            type_name: resource.0,
            id: resource.1,
        }),
        context_json: r#"{"mfa": true, "source_ip": "10.1.2.3"}"#,
        entities_json: "",
    };
    Engine::new()
        .check_against(snapshot, &input)
        .map(|decision| {
            let mut reasons = decision.reasons;
            reasons.sort();
            (decision.allowed, reasons)
        })
        .map_err(|error| error.to_string())
}

#[test]
fn hand_written_templates_pass_their_fixtures_with_link_ids_as_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let sources = example_with_templates(dir.path());
    let snapshot = load(&sources).unwrap();
    // 20 policies of the example, 3 links (templates are not policies).
    assert_eq!(snapshot.policies.policy_count(), 23);
    let report = fixtures::run_fixtures(&snapshot, &[fixture_dir().join("cases.json")]).unwrap();
    let failures: Vec<String> = report.failures.iter().map(ToString::to_string).collect();
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(report.passed, 9);
    // The fixture file's own link was for its cases only.
    assert_eq!(
        decide(
            &snapshot,
            ("Saas::User", "dave"),
            "read",
            ("Saas::Document", "acme-salaries")
        ),
        Ok((false, Vec::new()))
    );
}

#[test]
fn links_decide_the_same_through_the_policy_index() {
    let dir = tempfile::tempdir().unwrap();
    let sources = example_with_templates(dir.path());
    let plain = loader::load(
        &sources,
        LoadOptions {
            policy_index_min: usize::MAX,
            ..LoadOptions::default()
        },
    )
    .unwrap()
    .0;
    let indexed = loader::load(
        &sources,
        LoadOptions {
            policy_index_min: 0,
            ..LoadOptions::default()
        },
    )
    .unwrap()
    .0;
    assert!(indexed.policies.indexed() && !plain.policies.indexed());
    for principal in ["alice", "dave", "hank", "jack", "carol"] {
        for action in ["read", "write", "admin", "manage_members"] {
            for resource in [
                ("Saas::Document", "acme-roadmap"),
                ("Saas::Tenant", "globex"),
                ("Saas::Tenant", "acme"),
            ] {
                let principal = ("Saas::User", principal);
                assert_eq!(
                    decide(&plain, principal, action, resource),
                    decide(&indexed, principal, action, resource),
                    "{principal:?} {action} {resource:?}"
                );
            }
        }
    }
}

/// A links file that must be refused, and what the refusal must say.
struct Bad {
    what: &'static str,
    links: String,
    needles: &'static [&'static str],
}

fn link(template: &str, id: &str, args: &str) -> String {
    format!(r#"{{"template_id": "{template}", "link_id": "{id}", "args": {{{args}}}}}"#)
}

const DAVE: &str = r#""?principal": "Saas::User::\"dave\"""#;
const ROADMAP: &str = r#""?resource": "Saas::Document::\"acme-roadmap\"""#;

fn bad_files() -> Vec<Bad> {
    let good = link("document-share", "ok", &format!("{DAVE}, {ROADMAP}"));
    let both = format!("{DAVE}, {ROADMAP}");
    vec![
        Bad {
            what: "not an array",
            links: "{}".into(),
            needles: &["JSON array"],
        },
        Bad {
            what: "malformed JSON",
            links: "[\n  {\"template_id\": }\n]".into(),
            needles: &["malformed template links", ":2:"],
        },
        Bad {
            what: "a missing template",
            links: format!("[{good}, {}]", link("no-such-template", "l1", &both)),
            needles: &[
                "entry 1",
                "`template_id`",
                "no-such-template",
                "names no template",
            ],
        },
        Bad {
            what: "a static policy as template",
            links: format!("[{}]", link("viewer-can-read", "l1", &both)),
            needles: &["entry 0", "`template_id`", "static policy"],
        },
        Bad {
            what: "a missing slot value",
            links: format!("[{good}, {}]", link("document-share", "l1", DAVE)),
            needles: &["entry 1", "no value for `?resource`"],
        },
        Bad {
            what: "a value for a slot the template lacks",
            links: format!("[{}]", link("one-slot", "l1", &both)),
            needles: &["entry 0", "`args.?resource`", "no such slot"],
        },
        Bad {
            what: "an unknown slot name",
            links: format!(
                "[{}]",
                link(
                    "document-share",
                    "l1",
                    &format!("{both}, \"?owner\": \"Saas::User::\\\"x\\\"\"")
                )
            ),
            needles: &["entry 0", "`args.?owner`", "not a slot"],
        },
        Bad {
            what: "a malformed uid",
            links: format!(
                "[{}]",
                link(
                    "document-share",
                    "l1",
                    &format!("\"?principal\": \"dave\", {ROADMAP}")
                )
            ),
            needles: &[
                "entry 0",
                "`args.?principal`",
                "`dave` is not an entity uid",
            ],
        },
        Bad {
            what: "a missing field",
            links: r#"[{"template_id": "document-share", "args": {}}]"#.into(),
            needles: &["entry 0", "`link_id` is missing"],
        },
        Bad {
            what: "an unknown field",
            links: format!("[{good}, {{\"template\": \"x\"}}]"),
            needles: &["entry 1", "unknown field `template`"],
        },
        Bad {
            what: "a duplicate link id",
            links: format!("[{good}, {good}]"),
            needles: &[
                "entry 1",
                "`link_id`",
                "duplicate link id `ok` (also entry 0)",
            ],
        },
        Bad {
            what: "a link id that is a policy id",
            links: format!("[{}]", link("document-share", "viewer-can-read", &both)),
            needles: &[
                "entry 0",
                "`link_id`",
                "already a policy or template id",
                "rbac.cedar",
            ],
        },
        Bad {
            what: "a link id that is a template id",
            links: format!("[{}]", link("document-share", "tenant-admin", &both)),
            needles: &["entry 0", "`link_id`", "already a policy or template id"],
        },
        Bad {
            what: "a slot value of a type the scope cannot take",
            links: format!(
                "[{good}, {}]",
                link(
                    "document-share",
                    "doc-as-principal",
                    &format!("\"?principal\": \"Saas::Document::\\\"acme-roadmap\\\"\", {ROADMAP}")
                )
            ),
            needles: &[
                "entry 1",
                "link `doc-as-principal` does not validate against the schema",
            ],
        },
    ]
}

#[test]
fn bad_links_files_are_refused_naming_file_entry_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let sources = example_with_templates(dir.path());
    std::fs::write(
        sources.policies.as_ref().unwrap().join("one_slot.cedar"),
        "@id(\"one-slot\")\npermit (principal == ?principal, action, resource);\n",
    )
    .unwrap();
    assert!(load(&sources).is_ok());
    let links = sources.template_links.clone().unwrap();
    for bad in bad_files() {
        std::fs::write(&links, &bad.links).unwrap();
        let error = match load(&sources) {
            Ok(_) => panic!("{}: loaded", bad.what),
            Err(error) => error,
        };
        assert!(error.contains("links.json"), "{}: {error}", bad.what);
        for needle in bad.needles {
            assert!(
                error.contains(needle),
                "{}: lacks {needle:?}: {error}",
                bad.what
            );
        }
    }
}

#[test]
fn links_without_policies_are_a_configuration_error() {
    let sources = Sources {
        template_links: Some(fixture_dir().join("links.json")),
        ..Default::default()
    };
    let error = load(&sources).unwrap_err();
    assert!(error.contains("no policies configured"), "{error}");
}

// ---- the CLI ---------------------------------------------------------------

fn arbiter(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(args)
        .current_dir(root())
        .env_remove("ARBITER_LOG_JSON")
        .env_remove("ARBITER_TEMPLATE_LINKS")
        .output()
        .unwrap()
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn validate_test_and_check_take_template_links() {
    let dir = tempfile::tempdir().unwrap();
    let sources = example_with_templates(dir.path());
    let policies = sources
        .policies
        .as_ref()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let links = sources
        .template_links
        .as_ref()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let set = [
        "--policies",
        policies.as_str(),
        "--schema",
        "policies/schema.cedarschema",
        "--entities",
        "policies/entities.json",
        "--template-links",
        links.as_str(),
    ];

    let output = arbiter(&[&["validate"], &set[..]].concat());
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("23 policies"),
        "{}",
        describe(&output)
    );

    let cases = fixture_dir().join("cases.json");
    let output = arbiter(&[&["test"], &set[..], &["--tests", cases.to_str().unwrap()]].concat());
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("9 passed, 0 failed"),
        "{}",
        describe(&output)
    );

    let output = arbiter(
        &[
            &["check"],
            &set[..],
            &[
                "--principal",
                "Saas::User::\"dave\"",
                "--action",
                "Saas::Action::\"read\"",
                "--resource",
                "Saas::Document::\"acme-roadmap\"",
                "--context",
                r#"{"mfa": true, "source_ip": "10.1.2.3"}"#,
            ],
        ]
        .concat(),
    );
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("share-roadmap-with-dave"),
        "{}",
        describe(&output)
    );

    // A bad links file: exit 3 (invalid), naming file, entry and field.
    std::fs::write(&links, format!("[{}]", link("nope", "l", DAVE))).unwrap();
    let output = arbiter(&[&["validate"], &set[..]].concat());
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("links.json")
            && stderr.contains("entry 0")
            && stderr.contains("`template_id`"),
        "{}",
        describe(&output)
    );
}

// ---- hot reload --------------------------------------------------------------

fn read_roadmap(principal: &str) -> CheckRequest {
    CheckRequest {
        principal: uid("Saas::User", principal),
        action: uid("Saas::Action", "read"),
        resource: uid("Saas::Document", "acme-roadmap"),
        context_json: r#"{"mfa": true, "source_ip": "10.1.2.3"}"#.into(),
        entities_json: String::new(),
        min_data_revision: String::new(),
        ..Default::default()
    }
}

fn save_by_rename(path: &Path, text: &str) {
    let aside = path.with_extension("tmp~");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// The failures counted under `reason`.
fn failures(metrics: &str, reason: &str) -> f64 {
    let prefix = format!("arbiter_policy_reload_failures_total{{reason=\"{reason}\"}}");
    metrics
        .lines()
        .find(|line| line.starts_with(&prefix))
        .and_then(|line| line.split_whitespace().last())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn links_reload_with_the_policies_and_a_bad_file_keeps_the_last_good_set() {
    let dir = tempfile::tempdir().unwrap();
    let sources = example_with_templates(dir.path());
    let links = sources.template_links.clone().unwrap();
    let server = TestServer::start(config(sources)).await;
    let mut client = server.client().await;

    let answer = client
        .check(read_roadmap("dave"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.decision(), arbiter::proto::v1::Decision::Allow);
    assert_eq!(answer.reasons, ["share-roadmap-with-dave"]);

    // A bad edit: a link to a template that does not exist.
    let original = std::fs::read_to_string(&links).unwrap();
    save_by_rename(
        &links,
        &original.replace(
            "\"template_id\": \"document-share\"",
            "\"template_id\": \"document-shares\"",
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        let (_, body) = server.admin_get("/ready").await;
        if body.contains("\"last_reload_error\":\"") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the bad links file was not reported: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        ready.contains("links.json") && ready.contains("entry 1"),
        "{ready}"
    );
    let answer = client
        .check(read_roadmap("dave"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.reasons,
        ["share-roadmap-with-dave"],
        "the last good set serves"
    );
    let (_, metrics) = server.admin_get("/metrics").await;
    assert!(failures(&metrics, "invalid") >= 1.0, "{metrics}");

    // A good edit: the share gets a new link id, which becomes the reason.
    save_by_rename(
        &links,
        &original.replace("share-roadmap-with-dave", "share-roadmap-with-dave-again"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = client
            .check(read_roadmap("dave"))
            .await
            .unwrap()
            .into_inner();
        if answer.reasons == ["share-roadmap-with-dave-again"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the good edit was not served: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, body) = server.admin_get("/ready").await;
    assert!(body.contains("\"last_reload_error\":null"), "{body}");

    // Policies and links are one set: renaming the template refuses the set
    // (its links name the old id) until the links file follows.
    let templates = dir.path().join("policies/templates.cedar");
    let text = std::fs::read_to_string(&templates).unwrap();
    save_by_rename(
        &templates,
        &text.replace("@id(\"document-share\")", "@id(\"doc-share\")"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = server.admin_get("/ready").await;
        if body.contains("document-share") && body.contains("names no template") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the half-edited set was not refused: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = client
        .check(read_roadmap("dave"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.reasons, ["share-roadmap-with-dave-again"]);
    save_by_rename(
        &links,
        &original
            .replace("share-roadmap-with-dave", "share-roadmap-with-dave-3")
            .replace(
                "\"template_id\": \"document-share\"",
                "\"template_id\": \"doc-share\"",
            ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = client
            .check(read_roadmap("dave"))
            .await
            .unwrap()
            .into_inner();
        if answer.reasons == ["share-roadmap-with-dave-3"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the completed edit was not served: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await.unwrap();
}

#[test]
fn a_fixture_files_own_bad_links_are_refused_naming_the_file_and_entry() {
    let dir = tempfile::tempdir().unwrap();
    let sources = example_with_templates(dir.path());
    let snapshot = load(&sources).unwrap();
    let fixture = dir.path().join("own-links.json");
    let case = r#"{"name": "n", "principal": "Saas::User::\"dave\"", "action": "Saas::Action::\"read\"",
        "resource": "Saas::Document::\"acme-roadmap\"", "context": {"mfa": true, "source_ip": "10.1.2.3"},
        "decision": "allow", "reasons": ["share-roadmap-with-dave"]}"#;
    for (links, needles) in [
        (
            format!(
                "[{}]",
                link(
                    "document-share",
                    "share-roadmap-with-dave",
                    &format!("{DAVE}, {ROADMAP}")
                )
            ),
            &["entry 0", "already a policy or template id"][..],
        ),
        (
            format!(
                "[{}, {}]",
                link("document-share", "x", &format!("{DAVE}, {ROADMAP}")),
                link("nope", "y", DAVE)
            ),
            &["entry 1", "`template_id`", "names no template"][..],
        ),
        (
            format!(
                "[{}]",
                link(
                    "document-share",
                    "z",
                    &format!("\"?principal\": \"Saas::Tenant::\\\"acme\\\"\", {ROADMAP}")
                )
            ),
            &["entry 0", "does not validate against the schema"][..],
        ),
    ] {
        std::fs::write(
            &fixture,
            format!(r#"{{"template_links": {links}, "cases": [{case}]}}"#),
        )
        .unwrap();
        let error = fixtures::run_fixtures(&snapshot, std::slice::from_ref(&fixture))
            .unwrap_err()
            .to_string();
        assert!(error.contains("own-links.json"), "{error}");
        for needle in needles {
            assert!(error.contains(needle), "lacks {needle:?}: {error}");
        }
    }
}
