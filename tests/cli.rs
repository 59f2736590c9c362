//! The `arbiter` binary end to end: exit codes and messages of `validate`,
//! `test`, `fmt` and `check`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const UNFORMATTED: &str = "permit(principal,action,resource) when {   principal == resource};\n";

fn arbiter(args: &[&str]) -> Output {
    arbiter_in(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

fn arbiter_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(args)
        .current_dir(dir)
        .env_remove("ARBITER_LOG_JSON")
        .output()
        .expect("the arbiter binary runs")
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exited with a code")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        stdout(output),
        stderr(output)
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a test file");
    path
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

// ---- validate -------------------------------------------------------------

#[test]
fn validate_accepts_the_embedded_default() {
    let output = arbiter(&["validate"]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert!(stdout(&output).starts_with("ok: "), "{}", describe(&output));
}

#[test]
fn validate_locates_a_syntax_error() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write(
        dir.path(),
        "file.cedar",
        "permit(principal, action, resource);\n\npermit(principal action, resource);\n",
    );
    let output = arbiter(&["validate", "--policies", s(&policy)]);
    assert_eq!(code(&output), 3, "{}", describe(&output));
    assert!(
        stderr(&output).contains("file.cedar:3:18"),
        "{}",
        describe(&output)
    );
}

#[test]
fn validate_locates_a_strict_validation_error() {
    let dir = tempfile::tempdir().unwrap();
    let schema = write(
        dir.path(),
        "schema.cedarschema",
        "entity User = { name: String };\n\
         entity Doc;\n\
         action view appliesTo { principal: User, resource: Doc };\n",
    );
    let policy = write(
        dir.path(),
        "strict.cedar",
        "// reads an attribute the schema does not declare\n\
         permit(principal, action == Action::\"view\", resource)\n\
         when { principal.nickname == \"x\" };\n",
    );
    let output = arbiter(&["validate", "--policies", s(&policy), "--schema", s(&schema)]);
    assert_eq!(code(&output), 3, "{}", describe(&output));
    assert!(
        stderr(&output).contains("strict.cedar:3:"),
        "{}",
        describe(&output)
    );

    // The same policy is fine without strict validation.
    let output = arbiter(&[
        "validate",
        "--policies",
        s(&policy),
        "--schema",
        s(&schema),
        "--no-validate",
    ]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
}

// ---- test -----------------------------------------------------------------

#[test]
fn test_runs_the_fixtures_next_to_the_embedded_default() {
    let output = arbiter(&["test"]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    let out = stdout(&output);
    let last = out.lines().last().unwrap_or_default();
    let (passed, failed) = last.split_once(" passed, ").expect("summary line");
    assert!(passed.parse::<usize>().unwrap() >= 30, "{last}");
    assert_eq!(failed, "0 failed", "{}", describe(&output));
    assert!(!out.contains("FAIL"), "{}", describe(&output));
}

#[test]
fn test_with_explicit_sources_and_fixtures() {
    let output = arbiter(&[
        "test",
        "--policies",
        "policies",
        "--schema",
        "policies/schema.cedarschema",
        "--entities",
        "policies/entities.json",
        "--tests",
        "policies/tests/rbac.json",
    ]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert!(
        stdout(&output).trim_end().ends_with(" passed, 0 failed"),
        "{}",
        describe(&output)
    );
}

#[test]
fn test_reports_a_wrong_expectation() {
    let dir = tempfile::tempdir().unwrap();
    // frank owns acme-sales-pipeline (policies/tests/ownership.json), so this
    // is really an allow.
    let fixture = write(
        dir.path(),
        "wrong.json",
        r#"{
  "description": "a deliberately wrong expectation",
  "cases": [
    {
      "name": "owner write expected to be denied",
      "principal": {"type": "Saas::User", "id": "frank"},
      "action": {"type": "Saas::Action", "id": "write"},
      "resource": {"type": "Saas::Document", "id": "acme-sales-pipeline"},
      "context": {"mfa": true, "source_ip": "10.1.2.3"},
      "decision": "deny",
      "reasons": []
    }
  ]
}"#,
    );
    let output = arbiter(&["test", "--tests", s(&fixture)]);
    assert_eq!(code(&output), 2, "{}", describe(&output));
    let out = stdout(&output);
    assert!(
        out.contains(
            "wrong.json: owner write expected to be denied: expected deny [], \
             got allow [owner-full-control-document]"
        ),
        "{}",
        describe(&output)
    );
    assert!(out.contains("FAIL "), "{}", describe(&output));
    assert!(
        out.trim_end().ends_with("0 passed, 1 failed"),
        "{}",
        describe(&output)
    );
}

#[test]
fn test_rejects_a_malformed_fixture() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "broken.json",
        "{\n  \"cases\": [\n    {\"name\": \"x\",,}\n  ]\n}\n",
    );
    let output = arbiter(&["test", "--tests", s(dir.path())]);
    assert_eq!(code(&output), 64, "{}", describe(&output));
    let err = stderr(&output);
    assert!(err.contains("broken.json:3:"), "{}", describe(&output));
}

/// carol (a viewer) writing the roadmap: deny by the loaded entities.
const CAROL_WRITES: &str = r#"
      "principal": "Saas::User::\"carol\"",
      "action": {"type": "Saas::Action", "id": "write"},
      "resource": {"type": "Saas::Document", "id": "acme-roadmap"},
      "context": {"mfa": true, "source_ip": "10.1.2.3"}"#;

/// carol as an editor (`editor`) or as she is stored (`viewer`).
fn carol(role: &str) -> String {
    format!(
        r#"{{"uid": {{"type": "Saas::User", "id": "carol"}},
            "attrs": {{"tenant": {{"__entity": {{"type": "Saas::Tenant", "id": "acme"}}}},
                      "email": "carol@acme.example", "status": "active",
                      "department": "engineering", "clearance": 1}},
            "parents": [{{"type": "Saas::Role", "id": "acme/{role}"}}]}}"#
    )
}

/// One passing case, and one failing whose name and expectation need
/// escaping in XML.
fn mixed_fixture(dir: &Path) -> PathBuf {
    write(
        dir,
        "mixed.json",
        &format!(
            r#"{{"cases": [
  {{"name": "viewer cannot write", {CAROL_WRITES}, "decision": "deny", "reasons": []}},
  {{"name": "a <wrong> & \"quoted\" 'expectation'", {CAROL_WRITES},
    "decision": "allow", "reasons": ["editor-can-write"]}}
]}}"#
        ),
    )
}

#[test]
fn test_writes_junit_xml_that_parses() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = mixed_fixture(dir.path());
    let junit = dir.path().join("report.xml");
    let output = arbiter(&["test", "--tests", s(&fixture), "--junit", s(&junit)]);
    assert_eq!(code(&output), 2, "{}", describe(&output));
    // Parsed by Python's own XML parser, not ours.
    let script = r#"
import json, sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
cases = []
for case in root.iter("testcase"):
    failure = case.find("failure")
    cases.append({"name": case.get("name"), "classname": case.get("classname"),
                  "failure": None if failure is None else failure.get("message"),
                  "text": None if failure is None else failure.text})
print(json.dumps({"root": root.tag, "tests": root.get("tests"),
                  "failures": root.get("failures"), "cases": cases,
                  "out": root.findtext("system-out")}))
"#;
    let parsed = Command::new("python3")
        .args(["-c", script, s(&junit)])
        .output()
        .expect("python3 runs");
    assert!(parsed.status.success(), "{}", describe(&parsed));
    let report: serde_json::Value = serde_json::from_slice(&parsed.stdout).unwrap();
    assert_eq!(report["root"], "testsuites");
    assert_eq!(report["tests"], "2");
    assert_eq!(report["failures"], "1");
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2, "{report}");
    assert_eq!(cases[0]["name"], "viewer cannot write");
    assert!(cases[0]["failure"].is_null());
    assert!(
        cases[0]["classname"]
            .as_str()
            .unwrap()
            .ends_with("mixed.json")
    );
    assert_eq!(cases[1]["name"], "a <wrong> & \"quoted\" 'expectation'");
    assert_eq!(
        cases[1]["failure"],
        "expected allow [editor-can-write], got deny []"
    );
    assert_eq!(
        cases[1]["text"],
        "expected: allow [editor-can-write]\ngot: deny []"
    );
    assert!(
        report["out"]
            .as_str()
            .unwrap()
            .starts_with("never exercised: "),
        "{report}"
    );
}

#[test]
fn test_format_json_is_a_summary_machines_read() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = mixed_fixture(dir.path());
    let output = arbiter(&["test", "--tests", s(&fixture), "--format", "json"]);
    assert_eq!(code(&output), 2, "{}", describe(&output));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&output))
        .unwrap_or_else(|error| panic!("{error}: {}", describe(&output)));
    assert_eq!(summary["passed"], 1);
    assert_eq!(summary["failed"], 1);
    let cases = summary["cases"].as_array().unwrap();
    assert_eq!(cases[0]["passed"], true);
    assert_eq!(cases[1]["passed"], false);
    assert_eq!(cases[1]["expected_decision"], "allow");
    assert_eq!(
        cases[1]["expected_reasons"],
        serde_json::json!(["editor-can-write"])
    );
    assert_eq!(cases[1]["got_decision"], "deny");
    assert_eq!(cases[1]["got_reasons"], serde_json::json!([]));
    // No passing case made any policy determining (a default deny).
    let never: Vec<&str> = summary["never_exercised"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap())
        .collect();
    assert!(never.contains(&"editor-can-write"), "{never:?}");
    assert_eq!(never.len(), 20, "{never:?}");
}

#[test]
fn test_prints_the_policies_no_passing_case_exercised() {
    let output = arbiter(&["test", "--tests", "policies/tests/rbac.json"]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    let out = stdout(&output);
    let line = out
        .lines()
        .find(|line| line.starts_with("never exercised: "))
        .unwrap_or_else(|| panic!("{}", describe(&output)));
    let never: Vec<&str> = line["never exercised: ".len()..].split(", ").collect();
    // rbac.json exercises the role permits, not ownership or sharing.
    assert!(never.contains(&"owner-full-control-document"), "{line}");
    assert!(never.contains(&"shared-user-can-read"), "{line}");
    assert!(!never.contains(&"editor-can-write"), "{line}");
    // The whole example is exercised by its fixtures.
    let all = arbiter(&["test"]);
    assert!(
        stdout(&all).contains("never exercised: none\n"),
        "{}",
        describe(&all)
    );
}

#[test]
fn test_entities_overlays_case_over_file_over_loaded() {
    let dir = tempfile::tempdir().unwrap();
    // The file makes carol an editor for its cases; one case puts her back.
    let fixture = write(
        dir.path(),
        "overlay.json",
        &format!(
            r#"{{"entities": [{editor}],
  "cases": [
    {{"name": "the file's entities apply", {CAROL_WRITES},
      "decision": "allow", "reasons": ["editor-can-write"]}},
    {{"name": "a case's entities win over the file's", {CAROL_WRITES},
      "entities": [{viewer}], "decision": "deny", "reasons": []}}
  ]}}"#,
            editor = carol("editor"),
            viewer = carol("viewer")
        ),
    );
    // Without the overlay, the loaded entities say deny.
    let other = write(
        dir.path(),
        "plain.json",
        &format!(
            r#"{{"cases": [{{"name": "loaded entities", {CAROL_WRITES},
              "decision": "deny", "reasons": []}}]}}"#
        ),
    );
    let output = arbiter(&["test", "--tests", s(&fixture), "--tests", s(&other)]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert!(
        stdout(&output).trim_end().ends_with("3 passed, 0 failed"),
        "{}",
        describe(&output)
    );
}

#[test]
fn test_names_file_case_and_field_of_a_malformed_fixture_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A good file sorts first: it must not run either.
    write(
        dir.path(),
        "a-good.json",
        &format!(
            r#"{{"cases": [{{"name": "fine", {CAROL_WRITES}, "decision": "deny", "reasons": []}}]}}"#
        ),
    );
    let cases = [
        (
            r#"{"name": "no decision", "principal": "Saas::User::\"carol\"",
                "action": "Saas::Action::\"read\"", "resource": "Saas::Document::\"x\"",
                "reasons": []}"#,
            r#"cases[1] "no decision": missing field `decision`"#,
        ),
        (
            r#"{"name": "typo", "principal": "Saas::User::\"carol\"",
                "action": "Saas::Action::\"read\"", "resource": "Saas::Document::\"x\"",
                "decision": "deny", "reason": []}"#,
            r#"cases[1] "typo": unknown field `reason`"#,
        ),
        (
            r#"{"name": "bad uid", "principal": "carol",
                "action": "Saas::Action::\"read\"", "resource": "Saas::Document::\"x\"",
                "decision": "deny", "reasons": []}"#,
            r#"cases[1] "bad uid": `principal`: `carol` is not an entity uid"#,
        ),
        (
            r#"{"name": "bad decision", "principal": "Saas::User::\"carol\"",
                "action": "Saas::Action::\"read\"", "resource": "Saas::Document::\"x\"",
                "decision": "alow", "reasons": []}"#,
            r#"cases[1] "bad decision": `decision`: unknown variant `alow`"#,
        ),
        (
            r#"{"name": "bad reasons", "principal": "Saas::User::\"carol\"",
                "action": "Saas::Action::\"read\"", "resource": "Saas::Document::\"x\"",
                "decision": "deny", "reasons": "none"}"#,
            r#"cases[1] "bad reasons": `reasons`: invalid type"#,
        ),
        (
            r#"{"name": "bad entities", "principal": "Saas::User::\"carol\"",
                "action": "Saas::Action::\"read\"", "resource": "Saas::Document::\"x\"",
                "decision": "deny", "reasons": [], "entities": [{"attrs": {}}]}"#,
            r#"cases[1] "bad entities": `entities[0]`: an entity is an object with a `uid`"#,
        ),
    ];
    for (case, message) in cases {
        let bad = write(
            dir.path(),
            "b-bad.json",
            &format!(
                r#"{{"cases": [{{"name": "ok", {CAROL_WRITES}, "decision": "deny", "reasons": []}},
                {case}]}}"#
            ),
        );
        let output = arbiter(&["test", "--tests", s(dir.path())]);
        assert_eq!(code(&output), 64, "{}", describe(&output));
        let expected = format!("{}: {message}", s(&bad));
        assert!(
            stderr(&output).contains(&expected),
            "expected `{expected}`\n{}",
            describe(&output)
        );
        assert!(stdout(&output).is_empty(), "{}", describe(&output));
    }
    write(dir.path(), "b-bad.json", r#"{"cases": {}}"#);
    let output = arbiter(&["test", "--tests", s(dir.path())]);
    assert_eq!(code(&output), 64, "{}", describe(&output));
    assert!(
        stderr(&output).contains("b-bad.json: top level: `cases` must be an array"),
        "{}",
        describe(&output)
    );
}

#[test]
fn test_without_fixtures_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    // No `policies/tests` under this directory.
    let output = arbiter_in(dir.path(), &["test"]);
    assert_eq!(code(&output), 64, "{}", describe(&output));
    assert!(
        stderr(&output).contains("policies/tests"),
        "{}",
        describe(&output)
    );
}

// ---- fmt ------------------------------------------------------------------

#[test]
fn fmt_check_then_rewrite_then_check_again() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write(dir.path(), "messy.cedar", UNFORMATTED);

    let output = arbiter(&["fmt", "--check", s(dir.path())]);
    assert_eq!(code(&output), 1, "{}", describe(&output));
    assert!(
        stdout(&output).contains("messy.cedar"),
        "{}",
        describe(&output)
    );
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), UNFORMATTED);

    let output = arbiter(&["fmt", s(&policy)]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert!(
        stdout(&output).contains("messy.cedar"),
        "{}",
        describe(&output)
    );
    let formatted = std::fs::read_to_string(&policy).unwrap();
    assert_ne!(formatted, UNFORMATTED);
    assert!(formatted.contains("principal == resource"), "{formatted}");

    let output = arbiter(&["fmt", "--check", s(&policy)]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert_eq!(stdout(&output), "", "{}", describe(&output));

    // Formatting an already formatted file writes nothing.
    let output = arbiter(&["fmt", s(&policy)]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert_eq!(stdout(&output), "", "{}", describe(&output));
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), formatted);
}

#[test]
fn fmt_reports_a_parse_error_and_leaves_the_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let text = "permit(principal,action,resource);\npermit(principal action, resource);\n";
    let policy = write(dir.path(), "broken.cedar", text);
    let output = arbiter(&["fmt", s(&policy)]);
    assert_eq!(code(&output), 3, "{}", describe(&output));
    assert!(
        stderr(&output).contains("broken.cedar:2:18"),
        "{}",
        describe(&output)
    );
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), text);
}

#[test]
fn fmt_of_a_missing_path_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.cedar");
    let output = arbiter(&["fmt", s(&missing)]);
    assert_eq!(code(&output), 64, "{}", describe(&output));
    assert!(
        stderr(&output).contains("missing.cedar"),
        "{}",
        describe(&output)
    );
}

// ---- check ----------------------------------------------------------------

#[test]
fn check_allow_and_deny_against_the_embedded_default() {
    // Both from policies/tests/ownership.json.
    let allow = arbiter(&[
        "check",
        "--principal",
        "Saas::User::\"frank\"",
        "--action",
        "Saas::Action::\"write\"",
        "--resource",
        "Saas::Document::\"acme-sales-pipeline\"",
        "--context",
        r#"{"mfa": true, "source_ip": "10.1.2.3"}"#,
    ]);
    assert_eq!(code(&allow), 0, "{}", describe(&allow));
    assert!(stdout(&allow).starts_with("ALLOW"), "{}", describe(&allow));
    assert!(
        stdout(&allow).contains("owner-full-control-document"),
        "{}",
        describe(&allow)
    );

    let deny = arbiter(&[
        "check",
        "--principal",
        "Saas::User::\"frank\"",
        "--action",
        "Saas::Action::\"delete\"",
        "--resource",
        "Saas::Document::\"acme-sales-pipeline\"",
        "--context",
        r#"{"mfa": true, "source_ip": "10.1.2.3"}"#,
    ]);
    assert_eq!(code(&deny), 2, "{}", describe(&deny));
    assert!(stdout(&deny).starts_with("DENY"), "{}", describe(&deny));
    assert!(
        stdout(&deny).contains("delete-requires-step-up-auth"),
        "{}",
        describe(&deny)
    );
}

#[test]
fn check_explain_lists_determining_overridden_and_near_miss_policies() {
    let deny = arbiter(&[
        "check",
        "--explain",
        "--principal",
        "Saas::User::\"frank\"",
        "--action",
        "Saas::Action::\"delete\"",
        "--resource",
        "Saas::Document::\"acme-sales-pipeline\"",
        "--context",
        r#"{"mfa": true, "source_ip": "10.1.2.3"}"#,
    ]);
    assert_eq!(code(&deny), 2, "{}", describe(&deny));
    let out = stdout(&deny);
    for line in [
        "explain:",
        "  determining: delete-requires-step-up-auth",
        "  errored: none",
        "  permits overridden: owner-full-control-document",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "{line}\n{}",
            describe(&deny)
        );
    }
    assert!(
        out.contains("  scope matched, conditions false: forbid tenant-isolation"),
        "{}",
        describe(&deny)
    );

    // Without the flag: no explanation.
    let plain = arbiter(&[
        "check",
        "--principal",
        "Saas::User::\"frank\"",
        "--action",
        "Saas::Action::\"delete\"",
        "--resource",
        "Saas::Document::\"acme-sales-pipeline\"",
        "--context",
        r#"{"mfa": true, "source_ip": "10.1.2.3"}"#,
    ]);
    assert_eq!(code(&plain), 2, "{}", describe(&plain));
    assert!(!stdout(&plain).contains("explain:"), "{}", describe(&plain));
}

/// `arbiter serve` on the embedded default, on free ports, its stderr piped.
fn spawn_embedded_server() -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// [`spawn_embedded_server`], once it serves: the server, its gRPC URL (read
/// from its log) and a thread that collects the rest of its log.
fn start_embedded_server() -> (
    std::process::Child,
    String,
    std::thread::JoinHandle<Vec<String>>,
) {
    use std::io::{BufRead, BufReader};
    let mut server = spawn_embedded_server();
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.split("grpc=").nth(1) {
            addr = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.contains("serving arbiter.v1.Authorizer") {
            break;
        }
    }
    let url = format!("http://{}", addr.expect("the server logs its address"));
    let log = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    (server, url, log)
}

/// The README's quick start: `arbiter serve` on the embedded default, then
/// `arbiter check --server` as the client, one allow and one deny.
#[test]
fn quick_start_allow_and_deny_through_a_running_server() {
    let (mut server, url, log) = start_embedded_server();
    let ask = |principal: &str, action: &str| {
        Command::new(env!("CARGO_BIN_EXE_arbiter"))
            .args(["check", "--server", &url])
            .args(["--principal", principal, "--action", action])
            .args(["--resource", "Saas::Document::\"acme-roadmap\""])
            .args(["--context", r#"{"mfa": true, "source_ip": "10.1.2.3"}"#])
            .output()
            .unwrap()
    };
    let allow = ask("Saas::User::\"bob\"", "Saas::Action::\"write\"");
    let deny = ask("Saas::User::\"gina\"", "Saas::Action::\"read\"");
    let malformed = ask("Saas::User::\"bob\"", "Saas::Action::\"fly\"");
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let exit = server.wait().unwrap();
    let log = log.join().unwrap().join("\n");

    let allow_out = String::from_utf8_lossy(&allow.stdout);
    assert_eq!(allow.status.code(), Some(0), "{allow_out}");
    assert!(
        allow_out.contains("ALLOW") && allow_out.contains("editor-can-write"),
        "{allow_out}"
    );
    let deny_out = String::from_utf8_lossy(&deny.stdout);
    assert_eq!(deny.status.code(), Some(2), "{deny_out}");
    assert!(
        deny_out.contains("DENY") && deny_out.contains("tenant-isolation"),
        "{deny_out}"
    );
    let malformed_err = String::from_utf8_lossy(&malformed.stderr);
    assert_eq!(malformed.status.code(), Some(64), "{malformed_err}");
    assert!(malformed_err.contains("InvalidArgument"), "{malformed_err}");
    assert_eq!(exit.code(), Some(0), "{log}");
}

/// `check --explain --server` prints what `check --explain` prints
/// locally, for an allow, a forbid override, a near miss and errors.
#[test]
fn check_explain_through_a_server_matches_the_local_answer() {
    let (mut server, url, log) = start_embedded_server();
    let ask = |server: Option<&str>, principal: &str, action: &str, resource: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_arbiter"));
        command.current_dir(env!("CARGO_MANIFEST_DIR")).arg("check");
        if let Some(url) = server {
            command.args(["--server", url]);
        }
        command
            .args(["--explain", "--principal", principal, "--action", action])
            .args(["--resource", resource])
            .args(["--context", r#"{"mfa": true, "source_ip": "10.1.2.3"}"#])
            .output()
            .unwrap()
    };
    let cases = [
        (
            "Saas::User::\"bob\"",
            "Saas::Action::\"write\"",
            "Saas::Document::\"acme-roadmap\"",
        ),
        (
            "Saas::User::\"frank\"",
            "Saas::Action::\"delete\"",
            "Saas::Document::\"acme-sales-pipeline\"",
        ),
        (
            "Saas::User::\"carol\"",
            "Saas::Action::\"write\"",
            "Saas::Document::\"acme-roadmap\"",
        ),
        (
            "Saas::User::\"ghost\"",
            "Saas::Action::\"read\"",
            "Saas::Document::\"acme-handbook\"",
        ),
    ];
    let answers: Vec<(Output, Output)> = cases
        .iter()
        .map(|(principal, action, resource)| {
            (
                ask(None, principal, action, resource),
                ask(Some(&url), principal, action, resource),
            )
        })
        .collect();
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let exit = server.wait().unwrap();
    let log = log.join().unwrap().join("\n");
    for (local, remote) in &answers {
        assert!(stdout(local).contains("explain:"), "{}", describe(local));
        assert_eq!(code(local), code(remote), "{}", describe(remote));
        assert_eq!(stdout(local), stdout(remote), "{}", describe(remote));
    }
    assert!(stdout(&answers[3].1).contains("  errored: tenant-isolation"));
    assert!(stdout(&answers[2].1).contains("permit owner-full-control-document"));
    assert_eq!(exit.code(), Some(0), "{log}");
}

/// A log shipper that goes away closes the server's stderr: logging must not
/// crash the server, which still drains and exits 0 on SIGTERM.
#[test]
fn closed_stderr_does_not_crash_the_server() {
    use std::io::{BufRead, BufReader};
    let mut server = spawn_embedded_server();
    {
        let lines = BufReader::new(server.stderr.take().unwrap()).lines();
        for line in lines {
            if line.unwrap().contains("serving arbiter.v1.Authorizer") {
                break;
            }
        }
    } // the read end closes here
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    assert_eq!(server.wait().unwrap().code(), Some(0));
}

/// `ARBITER_*` environment variables configure `serve`; a policy set that
/// does not validate stops it at start with file, line and column (exit 3).
#[test]
fn serve_reads_env_and_refuses_invalid_policies_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("schema.cedarschema"),
        "entity User = { level: Long };\nentity Doc;\naction read appliesTo { principal: User, resource: Doc };\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("p.cedar"),
        "@id(\"typo\")\npermit (principal, action, resource)\nwhen { principal.levle > 0 };\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .arg("serve")
        .env("ARBITER_POLICIES", dir.path().join("p.cedar"))
        .env("ARBITER_SCHEMA", dir.path().join("schema.cedarschema"))
        .env("ARBITER_LISTEN", "127.0.0.1:0")
        .env("ARBITER_ADMIN_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("p.cedar:3:"), "{stderr}");
    assert!(stderr.contains("levle"), "{stderr}");

    // The flag wins over the env: with --no-validate the same set loads.
    let mut server = Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(["serve", "--no-validate"])
        .env("ARBITER_POLICIES", dir.path().join("p.cedar"))
        .env("ARBITER_SCHEMA", dir.path().join("schema.cedarschema"))
        .env("ARBITER_LISTEN", "127.0.0.1:0")
        .env("ARBITER_ADMIN_LISTEN", "127.0.0.1:0")
        .env("ARBITER_NO_VALIDATE", "false")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::{BufRead, BufReader};
    let mut served = false;
    for line in BufReader::new(server.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("serving arbiter.v1.Authorizer") {
            served = true;
            break;
        }
        if line.contains("error") {
            break;
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let _ = server.wait();
    assert!(served, "--no-validate should let the set load");
}

/// One TLS stack: the binary links no OpenSSL (`libssl`, `libcrypto`), so
/// a minimal image needs none. `ldd` lists what the dynamic loader would
/// load; rustls is linked in statically.
#[test]
fn the_binary_links_no_openssl() {
    let output = Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_arbiter"))
        .output()
        .expect("run ldd (libc-bin)");
    let libraries = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(libraries.contains("libc.so"), "{libraries}");
    for openssl in ["libssl", "libcrypto"] {
        assert!(!libraries.contains(openssl), "{openssl} in:\n{libraries}");
    }
}
