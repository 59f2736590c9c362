//! Cedar conformance: Arbiter must give the answers Cedar's own integration
//! tests expect (decision, reasons and errors), and must refuse a policy set
//! that fails strict validation unless validation is turned off.
//!
//! The corpus (see its `README.md`) is found at `$ARBITER_CONFORMANCE_DIR`,
//! else at `<crate>/../shared/conformance`; a missing corpus fails the tests.
//!
//! - `handwritten_and_sampled_corpus_through_grpc` runs the 22 handwritten
//!   tests and a deterministic sample (every 15th by name, 521 files) of the
//!   7,809 generated ones through a real in-process server over TCP.
//! - `whole_corpus_in_process` (ignored: it takes a while) runs every test
//!   through the engine directly:
//!
//!   ```text
//!   cargo test --release --test conformance -- --ignored --nocapture
//!   ```
//!
//! Both load with `OnEvaluationError::SkipPolicy` (Cedar's semantics), since
//! the expected answers are Cedar's. A `shouldValidate: false` test counts as
//! refused when the load with validation fails and the one without succeeds.
//!
//! The default mode, `OnEvaluationError::SkipPermit`, must give Cedar's
//! answer except where a forbid errored, and then deny with no reasons (the
//! errors unchanged): `sampled_corpus_skip_permit_in_process` checks that on
//! the handwritten tests and the sample, `whole_corpus_skip_permit_in_process`
//! (ignored) on every test. Which policies are forbids is read from the
//! policy text with Cedar's parser, not from the engine. The corpus has no
//! allow where a policy errored, where the modes differ, so both also run
//! each test that has erroring policies again with a permit-all policy
//! added (`check_case_with_permit_all`), against the engine's `skip-policy`
//! answer with the rule applied (in the sample: 212 such allows, 116 of them
//! with an erroring forbid).

//!
//! Template links (issue 20): the corpus has no templates, so
//! `sampled_corpus_as_template_links_in_process` (the sample; the whole
//! corpus in the ignored `whole_corpus_as_template_links_in_process`) and
//! `handwritten_as_template_links_through_grpc` rewrite every policy whose
//! principal or resource scope names a uid (`==`, `in`, `is … in`) as a
//! template with a slot there plus a link (`--template-links`) whose id is
//! the original policy id (`templated`), and expect Cedar's answers to the
//! original set: decision, reasons, errors, and the same validation outcome.

// Tests fail by panicking.
#![allow(clippy::panic)]

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arbiter::app::{ServeConfig, ServeError, Server};
use arbiter::engine::loader::{self, Inputs};
use arbiter::engine::{
    CheckInput, Engine, LoadOptions, OnEvaluationError, Snapshot, Sources, UidInput,
};
use arbiter::proto::v1 as pb;
use arbiter::proto::v1::authorizer_client::AuthorizerClient;
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Handwritten test files in `cedar-integration-tests/tests/*/`.
const HANDWRITTEN_FILES: usize = 22;
/// Generated test files in `corpus-tests.tar.gz`.
const GENERATED_FILES: usize = 7_809;
/// The gRPC test takes every `SAMPLE_STEP`-th generated file by sorted name.
const SAMPLE_STEP: usize = 15;
/// Test files checked at once through gRPC.
const GRPC_CONCURRENCY: usize = 4;
/// How long a server may take to start serving, or to stop.
const SERVER_TIMEOUT: Duration = Duration::from_secs(60);
/// Mismatches listed in a failure message.
const SHOWN_MISMATCHES: usize = 20;

// ---------------------------------------------------------------------------
// The corpus

/// The conformance folder: `cedar-integration-tests/` and `validation-warn-only.txt`.
fn corpus_dir() -> PathBuf {
    let dir = match std::env::var_os("ARBITER_CONFORMANCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance"),
    };
    let suite = dir.join("cedar-integration-tests");
    if !suite.join("tests").is_dir() || !suite.join("corpus-tests.tar.gz").is_file() {
        panic!(
            "the Cedar conformance corpus is missing: expected `{}` to hold \
             `cedar-integration-tests/tests/` and `cedar-integration-tests/corpus-tests.tar.gz`. \
             Put the `shared/` folder beside the repository or set ARBITER_CONFORMANCE_DIR \
             to the folder that holds `cedar-integration-tests/`.",
            dir.display()
        );
    }
    dir
}

/// Names (`corpus-tests/<sha>.json`) of the tests whose `shouldValidate: false`
/// current Cedar only warns about. One name a line; `#` starts a comment.
fn warn_only(dir: &Path) -> HashSet<String> {
    let path = dir.join("validation-warn-only.txt");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read `{}`: {error}", path.display()));
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TestFileJson {
    policies: String,
    entities: String,
    schema: String,
    should_validate: bool,
    requests: Vec<RequestJson>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestJson {
    description: String,
    principal: UidJson,
    action: UidJson,
    resource: UidJson,
    #[serde(default)]
    context: serde_json::Value,
    #[serde(default = "default_true")]
    validate_request: bool,
    decision: String,
    #[serde(default)]
    reason: Vec<String>,
    #[serde(default)]
    errors: Vec<String>,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
struct UidJson {
    #[serde(rename = "type")]
    type_name: String,
    id: String,
}

/// One request, ready to send, with the answer Cedar gives.
#[derive(Debug, Clone)]
struct Request {
    description: String,
    principal: UidJson,
    action: UidJson,
    resource: UidJson,
    context_json: String,
    validate_request: bool,
    expected: Answer,
}

/// One test file with its files resolved.
#[derive(Debug)]
struct TestCase {
    /// The file's path relative to its root, e.g. `tests/ip/1.json` or
    /// `corpus-tests/<sha>.json` (the names `validation-warn-only.txt` uses).
    name: String,
    sources: Sources,
    should_validate: bool,
    /// Listed in `validation-warn-only.txt`: exempt from the refusal check.
    warn_only: bool,
    requests: Vec<Request>,
}

/// Reads the test `root/name`; its paths are relative to `root`.
fn read_case(root: &Path, name: &str, warn_only: &HashSet<String>) -> TestCase {
    let path = root.join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read `{}`: {error}", path.display()));
    let file: TestFileJson = serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("`{}` is not a test file: {error}", path.display()));
    let requests = file
        .requests
        .into_iter()
        .map(|request| {
            let context_json = if request.context.is_null() {
                String::from("{}")
            } else {
                request.context.to_string()
            };
            let allow = match request.decision.as_str() {
                "allow" | "Allow" => true,
                "deny" | "Deny" => false,
                other => panic!("`{}`: unknown decision `{other}`", path.display()),
            };
            Request {
                description: request.description,
                principal: request.principal,
                action: request.action,
                resource: request.resource,
                context_json,
                validate_request: request.validate_request,
                expected: Answer {
                    allow,
                    reasons: request.reason.into_iter().collect(),
                    errors: request.errors.into_iter().collect(),
                },
            }
        })
        .collect();
    TestCase {
        name: name.to_owned(),
        sources: Sources {
            policies: Some(root.join(&file.policies)),
            schema: Some(root.join(&file.schema)),
            entities: Some(root.join(&file.entities)),
            ..Default::default()
        },
        should_validate: file.should_validate,
        warn_only: warn_only.contains(name),
        requests,
    }
}

/// The handwritten tests, sorted by name.
fn handwritten(dir: &Path, warn_only: &HashSet<String>) -> Vec<TestCase> {
    let root = dir.join("cedar-integration-tests");
    let mut names = Vec::new();
    let tests = root.join("tests");
    for group in sorted_entries(&tests) {
        if !group.is_dir() {
            continue;
        }
        for file in sorted_entries(&group) {
            if file.extension().is_some_and(|ext| ext == "json")
                && let Ok(relative) = file.strip_prefix(&root)
            {
                names.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    assert_eq!(
        names.len(),
        HANDWRITTEN_FILES,
        "expected {HANDWRITTEN_FILES} handwritten tests under `{}`",
        tests.display()
    );
    names
        .iter()
        .map(|name| read_case(&root, name, warn_only))
        .collect()
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("cannot list `{}`: {error}", dir.display()));
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    paths
}

/// `corpus-tests.tar.gz` unpacked into a temporary directory (removed on drop).
struct Unpacked {
    dir: tempfile::TempDir,
    /// Test names (`corpus-tests/<sha>.json`), sorted.
    names: Vec<String>,
}

fn unpack_generated(dir: &Path) -> Unpacked {
    let archive = dir.join("cedar-integration-tests/corpus-tests.tar.gz");
    let temp = tempfile::Builder::new()
        .prefix("arbiter-conformance-")
        .tempdir()
        .unwrap_or_else(|error| panic!("cannot create a temporary directory: {error}"));
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(temp.path())
        .status()
        .unwrap_or_else(|error| panic!("cannot run `tar`: {error}"));
    assert!(
        status.success(),
        "`tar -xzf {}` failed: {status}",
        archive.display()
    );
    let names: Vec<String> = sorted_entries(&temp.path().join("corpus-tests"))
        .into_iter()
        .filter_map(|path| {
            let file = path.file_name()?.to_str()?.to_owned();
            let is_test = file.ends_with(".json") && !file.ends_with(".entities.json");
            is_test.then(|| format!("corpus-tests/{file}"))
        })
        .collect();
    assert_eq!(
        names.len(),
        GENERATED_FILES,
        "expected {GENERATED_FILES} generated tests in `{}`",
        archive.display()
    );
    Unpacked { dir: temp, names }
}

impl Unpacked {
    fn read(&self, names: &[String], warn_only: &HashSet<String>) -> Vec<TestCase> {
        names
            .iter()
            .map(|name| read_case(self.dir.path(), name, warn_only))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Comparing and counting

#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    allow: bool,
    reasons: BTreeSet<String>,
    errors: BTreeSet<String>,
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(",");
        write!(
            f,
            "{} reasons=[{}] errors=[{}]",
            if self.allow { "allow" } else { "deny" },
            list(&self.reasons),
            list(&self.errors)
        )
    }
}

#[derive(Debug)]
struct Mismatch {
    file: String,
    what: String,
    expected: String,
    got: String,
}

/// How a start with validation on ended.
enum ValidatedLoad {
    Loaded,
    Refused,
    /// Anything else (e.g. the server failed for another reason).
    Failed(String),
}

#[derive(Debug, Default)]
struct Tally {
    files: usize,
    requests: usize,
    decision_ok: usize,
    reasons_ok: usize,
    errors_ok: usize,
    all_ok: usize,
    /// `shouldValidate: false` tests whose refusal was checked, and how many
    /// of them were refused.
    refusal_checked: usize,
    refused: usize,
    /// `shouldValidate: false` tests exempt from the refusal check, and how
    /// many of them loaded with validation on anyway (warnings only).
    refusal_exempt: usize,
    exempt_loaded: usize,
    /// `shouldValidate: true` tests, and how many loaded with validation on.
    validated_expected: usize,
    validated_loaded: usize,
    /// Requests Cedar allows although a policy errored: `deny` would deny
    /// them; `skip-permit` keeps those where only permits errored.
    allows_with_errors: usize,
    /// Of those, the ones whose expected answer is a deny because a forbid
    /// errored (`skip-permit` only).
    forbid_error_denies: usize,
    mismatches: Vec<Mismatch>,
}

impl Tally {
    fn mismatch(
        &mut self,
        file: &str,
        what: impl Into<String>,
        expected: impl fmt::Display,
        got: impl fmt::Display,
    ) {
        self.mismatches.push(Mismatch {
            file: file.to_owned(),
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        });
    }

    /// Records a start with validation on; true when the answers may be
    /// taken from that server (it loaded and was expected to).
    fn validated_load(&mut self, case: &TestCase, load: ValidatedLoad) {
        let name = case.name.as_str();
        match (case.should_validate, case.warn_only, load) {
            (true, _, ValidatedLoad::Loaded) => {
                self.validated_expected += 1;
                self.validated_loaded += 1;
            }
            (true, _, ValidatedLoad::Refused) => {
                self.validated_expected += 1;
                self.mismatch(name, "load with validation", "loads", "refused");
            }
            (false, false, ValidatedLoad::Loaded) => {
                self.refusal_checked += 1;
                self.mismatch(name, "load with validation", "refused", "loaded");
            }
            (false, false, ValidatedLoad::Refused) => {
                self.refusal_checked += 1;
                self.refused += 1;
            }
            (false, true, ValidatedLoad::Loaded) => {
                self.refusal_exempt += 1;
                self.exempt_loaded += 1;
            }
            (false, true, ValidatedLoad::Refused) => self.refusal_exempt += 1,
            (should, _, ValidatedLoad::Failed(error)) => {
                if should {
                    self.validated_expected += 1;
                } else {
                    self.refusal_checked += 1;
                }
                self.mismatch(name, "load with validation", "loads or is refused", error);
            }
        }
    }

    /// Records the answer to one request (`Err`: the request was rejected).
    fn answer(
        &mut self,
        case: &TestCase,
        request: &Request,
        expected: &Answer,
        got: Result<Answer, String>,
    ) {
        self.requests += 1;
        let got = match got {
            Ok(got) => got,
            Err(error) => {
                self.mismatch(
                    &case.name,
                    &request.description,
                    expected,
                    format!("rejected: {error}"),
                );
                return;
            }
        };
        let decision = got.allow == expected.allow;
        let reasons = got.reasons == expected.reasons;
        let errors = got.errors == expected.errors;
        self.decision_ok += usize::from(decision);
        self.reasons_ok += usize::from(reasons);
        self.errors_ok += usize::from(errors);
        if decision && reasons && errors {
            self.all_ok += 1;
        } else {
            self.mismatch(&case.name, &request.description, expected, got);
        }
    }

    /// Records that no server could answer a test's requests.
    fn unanswered(&mut self, case: &TestCase, why: impl fmt::Display) {
        self.requests += case.requests.len();
        self.mismatch(
            &case.name,
            "answer the requests",
            "a loaded policy set",
            why,
        );
    }

    fn merge(&mut self, other: Tally) {
        self.files += other.files;
        self.requests += other.requests;
        self.decision_ok += other.decision_ok;
        self.reasons_ok += other.reasons_ok;
        self.errors_ok += other.errors_ok;
        self.all_ok += other.all_ok;
        self.refusal_checked += other.refusal_checked;
        self.refused += other.refused;
        self.refusal_exempt += other.refusal_exempt;
        self.exempt_loaded += other.exempt_loaded;
        self.validated_expected += other.validated_expected;
        self.validated_loaded += other.validated_loaded;
        self.allows_with_errors += other.allows_with_errors;
        self.forbid_error_denies += other.forbid_error_denies;
        self.mismatches.extend(other.mismatches);
    }

    /// Prints the figures, and fails listing the first mismatches if any.
    fn report(mut self, title: &str, elapsed: Duration) {
        let percent = |count: usize| {
            if self.requests == 0 {
                0.0
            } else {
                100.0 * count as f64 / self.requests as f64
            }
        };
        println!("== {title} ({:.1} s)", elapsed.as_secs_f64());
        println!("files: {}, requests: {}", self.files, self.requests);
        println!(
            "agreement: decision {}/{} ({:.2}%), reasons {} ({:.2}%), errors {} ({:.2}%), all three {} ({:.2}%)",
            self.decision_ok,
            self.requests,
            percent(self.decision_ok),
            self.reasons_ok,
            percent(self.reasons_ok),
            self.errors_ok,
            percent(self.errors_ok),
            self.all_ok,
            percent(self.all_ok),
        );
        println!(
            "shouldValidate=true: {}/{} loaded with validation on",
            self.validated_loaded, self.validated_expected
        );
        println!(
            "shouldValidate=false: refusal checked {} (refused {}), exempted {} (of which {} loaded with validation on)",
            self.refusal_checked, self.refused, self.refusal_exempt, self.exempt_loaded
        );
        println!(
            "Cedar allows with an erroring policy: {}, of which expected denies (an erroring forbid): {}",
            self.allows_with_errors, self.forbid_error_denies
        );
        if self.mismatches.is_empty() {
            return;
        }
        self.mismatches
            .sort_by(|a, b| (&a.file, &a.what).cmp(&(&b.file, &b.what)));
        let mut message = format!(
            "{title}: {} mismatches; the first ones:\n",
            self.mismatches.len()
        );
        for mismatch in self.mismatches.iter().take(SHOWN_MISMATCHES) {
            message.push_str(&format!(
                "- {} / {}:\n    expected {}\n    got      {}\n",
                mismatch.file, mismatch.what, mismatch.expected, mismatch.got
            ));
        }
        panic!("{message}");
    }
}

// ---------------------------------------------------------------------------
// Through gRPC

/// A server that started serving.
struct Running {
    addr: SocketAddr,
    channel: Channel,
    stop: oneshot::Sender<()>,
    handle: JoinHandle<Result<(), ServeError>>,
}

enum Started {
    Serving(Running),
    /// `run` returned before the server reported SERVING.
    Ended(Result<(), ServeError>),
}

/// Load options with Cedar's own semantics for evaluation errors (the
/// erroring policy is skipped): the expected answers are Cedar's.
fn cedar_options(validate_policies: bool, validate_requests: bool) -> LoadOptions {
    options_in(
        OnEvaluationError::SkipPolicy,
        validate_policies,
        validate_requests,
    )
}

fn options_in(
    mode: OnEvaluationError,
    validate_policies: bool,
    validate_requests: bool,
) -> LoadOptions {
    LoadOptions {
        validate_policies,
        validate_requests,
        on_evaluation_error: mode,
        // Every corpus set is far below the default size for the policy
        // index: index them all, so the corpus checks the index's answers.
        policy_index_min: 0,
        // The server's default: repeated requests in a test file are then
        // answered from the decision cache, which must agree too.
        ..LoadOptions::default()
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Starts a server in-process and waits until it is SERVING or has ended.
async fn start(sources: &Sources, validate_policies: bool) -> Result<Started, String> {
    let mut config = ServeConfig {
        load: cedar_options(validate_policies, true),
        shutdown_grace: Duration::from_secs(10),
        ..Default::default()
    };
    config.reload.sources = sources.clone();
    config.listeners.listen = loopback();
    config.admin.listen = loopback();
    let server = Server::bind(config)
        .await
        .map_err(|error| format!("bind: {error}"))?;
    let addr = server
        .local_addr()
        .map_err(|error| format!("local address: {error}"))?;
    let (stop, stopped) = oneshot::channel::<()>();
    let mut handle = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    tokio::select! {
        biased;
        ended = &mut handle => {
            let ended = ended.map_err(|error| format!("server task: {error}"))?;
            Ok(Started::Ended(ended))
        }
        serving = tokio::time::timeout(SERVER_TIMEOUT, wait_until_serving(addr)) => match serving {
            Ok(channel) => Ok(Started::Serving(Running { addr, channel, stop, handle })),
            Err(_) => {
                let _ = stop.send(());
                handle.abort();
                Err(format!("not SERVING within {SERVER_TIMEOUT:?}"))
            }
        },
    }
}

/// Polls gRPC health until the Authorizer is SERVING; returns the channel.
async fn wait_until_serving(addr: SocketAddr) -> Channel {
    let endpoint = match Endpoint::from_shared(format!("http://{addr}")) {
        Ok(endpoint) => endpoint.connect_timeout(Duration::from_secs(5)),
        Err(error) => panic!("bad endpoint for {addr}: {error}"),
    };
    loop {
        if let Ok(channel) = endpoint.connect().await {
            let mut health = HealthClient::new(channel.clone());
            let request = HealthCheckRequest {
                service: "arbiter.v1.Authorizer".to_owned(),
            };
            if let Ok(response) = health.check(request).await
                && response.get_ref().status == ServingStatus::Serving as i32
            {
                return channel;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Stops a server and waits for `run` to return.
async fn shut_down(running: Running) -> Result<(), String> {
    let Running {
        channel,
        stop,
        handle,
        ..
    } = running;
    drop(channel);
    let _ = stop.send(());
    match tokio::time::timeout(SERVER_TIMEOUT, handle).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(error))) => Err(format!("run returned an error: {error}")),
        Ok(Err(error)) => Err(format!("server task: {error}")),
        Err(_) => Err(format!("did not stop within {SERVER_TIMEOUT:?}")),
    }
}

fn uid(uid: &UidJson) -> Option<pb::EntityUid> {
    Some(pb::EntityUid {
        r#type: uid.type_name.clone(),
        id: uid.id.clone(),
    })
}

/// Sends every request of `case` to `running` and records the answers.
async fn ask_grpc(case: &TestCase, running: &Running, tally: &mut Tally) {
    let mut client = AuthorizerClient::new(running.channel.clone());
    for request in &case.requests {
        if !request.validate_request {
            tally.requests += 1;
            tally.mismatch(
                &case.name,
                &request.description,
                "validateRequest: true",
                "false (not supported by the gRPC check)",
            );
            continue;
        }
        let message = pb::CheckRequest {
            principal: uid(&request.principal),
            action: uid(&request.action),
            resource: uid(&request.resource),
            context_json: request.context_json.clone(),
            entities_json: String::new(),
            ..Default::default()
        };
        let got = match client.check(message).await {
            Ok(response) => {
                let response = response.into_inner();
                Ok(Answer {
                    allow: response.decision == pb::Decision::Allow as i32,
                    reasons: response.reasons.into_iter().collect(),
                    errors: response.errors.into_iter().map(|e| e.policy_id).collect(),
                })
            }
            Err(status) => Err(format!(
                "{:?} from {}: {}",
                status.code(),
                running.addr,
                status.message()
            )),
        };
        tally.answer(case, request, &request.expected, got);
    }
}

/// One test file through gRPC: the load with validation on, then the answers.
async fn check_case_grpc(case: &TestCase) -> Tally {
    let mut tally = Tally {
        files: 1,
        ..Tally::default()
    };
    let name = case.name.as_str();
    let validated = match start(&case.sources, true).await {
        Ok(started) => started,
        Err(error) => {
            tally.mismatch(name, "start with validation", "starts", error);
            tally.unanswered(case, "the server did not start");
            return tally;
        }
    };
    let (load, serving) = match validated {
        Started::Serving(running) => (ValidatedLoad::Loaded, Some(running)),
        Started::Ended(Err(ServeError::InitialLoad(_))) => (ValidatedLoad::Refused, None),
        Started::Ended(Err(error)) => (ValidatedLoad::Failed(error.to_string()), None),
        Started::Ended(Ok(())) => (
            ValidatedLoad::Failed("run returned Ok before serving".to_owned()),
            None,
        ),
    };
    tally.validated_load(case, load);
    // Answers come from the validated server when the test says it loads;
    // otherwise from one started with validation off.
    let running = match serving {
        Some(running) if case.should_validate => Some(running),
        Some(running) => {
            if let Err(error) = shut_down(running).await {
                tally.mismatch(name, "shut down", "stops", error);
            }
            None
        }
        None => None,
    };
    let running = match running {
        Some(running) => running,
        None if case.should_validate => {
            tally.unanswered(case, "refused with validation on");
            return tally;
        }
        None => match start(&case.sources, false).await {
            Ok(Started::Serving(running)) => running,
            Ok(Started::Ended(ended)) => {
                let why = match ended {
                    Ok(()) => "run returned Ok before serving".to_owned(),
                    Err(error) => error.to_string(),
                };
                tally.unanswered(case, format!("refused with validation off: {why}"));
                return tally;
            }
            Err(error) => {
                tally.unanswered(case, error);
                return tally;
            }
        },
    };
    ask_grpc(case, &running, &mut tally).await;
    if let Err(error) = shut_down(running).await {
        tally.mismatch(name, "shut down", "stops", error);
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handwritten_and_sampled_corpus_through_grpc() {
    let started = Instant::now();
    let dir = corpus_dir();
    let warn_only = warn_only(&dir);
    let mut cases = handwritten(&dir, &warn_only);
    let generated = unpack_generated(&dir);
    let sample: Vec<String> = generated
        .names
        .iter()
        .step_by(SAMPLE_STEP)
        .cloned()
        .collect();
    assert!(
        sample.len() >= 500,
        "the sample is too small: {}",
        sample.len()
    );
    cases.extend(generated.read(&sample, &warn_only));

    let cases = Arc::new(cases);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..GRPC_CONCURRENCY {
        let cases = cases.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while let Some(case) = cases.get(next.fetch_add(1, Ordering::Relaxed)) {
                tally.merge(check_case_grpc(case).await);
            }
            tally
        }));
    }
    let mut tally = Tally::default();
    for worker in workers {
        match worker.await {
            Ok(part) => tally.merge(part),
            Err(error) => panic!("a worker failed: {error}"),
        }
    }
    tally.report(
        "handwritten + sampled corpus through gRPC",
        started.elapsed(),
    );
}

// ---------------------------------------------------------------------------
// In-process, the whole corpus

fn input_uid(uid: &UidJson) -> UidInput<'_> {
    UidInput {
        type_name: uid.type_name.as_str(),
        id: uid.id.as_str(),
    }
}

/// The answer expected in `mode`: Cedar's, except that in `skip-permit` an
/// allow where a forbid errored is a deny without reasons. `forbids` are the
/// ids of the case's forbid policies.
fn expected_in(mode: OnEvaluationError, cedar: &Answer, forbids: &HashSet<String>) -> Answer {
    let forbid_errored = cedar.errors.iter().any(|id| forbids.contains(id));
    if mode == OnEvaluationError::SkipPermit && cedar.allow && forbid_errored {
        Answer {
            allow: false,
            reasons: BTreeSet::new(),
            errors: cedar.errors.clone(),
        }
    } else {
        cedar.clone()
    }
}

/// The ids of the forbid policies in a single policy file, by Cedar's own
/// parser (positional ids, as the loader gives a single file).
fn forbid_ids(case: &TestCase) -> HashSet<String> {
    let Some(path) = &case.sources.policies else {
        return HashSet::new();
    };
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("cannot read `{}`: {error}", path.display()));
    let policies: cedar_policy::PolicySet = text
        .parse()
        .unwrap_or_else(|error| panic!("`{}` does not parse: {error}", path.display()));
    policies
        .policies()
        .filter(|policy| policy.effect() == cedar_policy::Effect::Forbid)
        .map(|policy| policy.id().to_string())
        .collect()
}

/// Sends every request of `case` through the engine; `validateRequest:
/// false` requests go to `unvalidated`, a snapshot without request validation.
fn ask_in_process(
    case: &TestCase,
    mode: OnEvaluationError,
    snapshot: &Snapshot,
    unvalidated: Option<&Snapshot>,
    tally: &mut Tally,
) {
    let engine = Engine::new();
    let forbids = if mode == OnEvaluationError::SkipPermit {
        forbid_ids(case)
    } else {
        HashSet::new()
    };
    // Not a silent fallback to the whole set: the index answers.
    for snapshot in std::iter::once(snapshot).chain(unvalidated) {
        if snapshot.policies.policy_count() > 0 && !snapshot.policies.indexed() {
            panic!("`{}`: the policy set is not indexed", case.name);
        }
    }
    for request in &case.requests {
        let snapshot = match (request.validate_request, unvalidated) {
            (false, Some(unvalidated)) => unvalidated,
            _ => snapshot,
        };
        let input = CheckInput {
            principal: Some(input_uid(&request.principal)),
            action: Some(input_uid(&request.action)),
            resource: Some(input_uid(&request.resource)),
            context_json: &request.context_json,
            entities_json: "",
        };
        let got = engine
            .check_against(snapshot, &input)
            .map(|decision| Answer {
                allow: decision.allowed,
                reasons: decision.reasons.into_iter().collect(),
                errors: decision.errors.into_iter().map(|e| e.policy_id).collect(),
            })
            .map_err(|error| error.to_string());
        let expected = expected_in(mode, &request.expected, &forbids);
        tally.allows_with_errors +=
            usize::from(request.expected.allow && !request.expected.errors.is_empty());
        tally.forbid_error_denies += usize::from(expected.allow != request.expected.allow);
        tally.answer(case, request, &expected, got);
    }
}

/// One test file in-process: the load with validation on, then the answers.
fn check_case_in_process(case: &TestCase, mode: OnEvaluationError) -> Tally {
    match loader::read_inputs(&case.sources) {
        Ok(inputs) => check_inputs_in_process(case, &inputs, mode),
        Err(error) => {
            let mut tally = Tally {
                files: 1,
                ..Tally::default()
            };
            tally.unanswered(case, format!("cannot read: {}", error));
            tally
        }
    }
}

/// [`check_case_in_process`] on given texts (the corpus's, or rewritten).
fn check_inputs_in_process(case: &TestCase, inputs: &Inputs, mode: OnEvaluationError) -> Tally {
    let mut tally = Tally {
        files: 1,
        ..Tally::default()
    };
    let options = |validate_policies, validate_requests| {
        options_in(mode, validate_policies, validate_requests)
    };
    let (load, snapshot) = match loader::build(inputs, options(true, true)) {
        Ok((snapshot, _)) => (ValidatedLoad::Loaded, Some(snapshot)),
        Err(_) => (ValidatedLoad::Refused, None),
    };
    tally.validated_load(case, load);
    let snapshot = match snapshot {
        Some(snapshot) if case.should_validate => snapshot,
        _ if case.should_validate => {
            tally.unanswered(case, "refused with validation on");
            return tally;
        }
        _ => match loader::build(inputs, options(false, true)) {
            Ok((snapshot, _)) => snapshot,
            Err(error) => {
                let why = format!("refused with validation off: {}", error);
                tally.unanswered(case, why);
                return tally;
            }
        },
    };
    let unvalidated = if case.requests.iter().all(|request| request.validate_request) {
        None
    } else {
        match loader::build(inputs, options(false, false)) {
            Ok((snapshot, _)) => Some(snapshot),
            Err(error) => {
                let why = format!("refused with validation off: {}", error);
                tally.unanswered(case, why);
                return tally;
            }
        }
    };
    ask_in_process(case, mode, &snapshot, unvalidated.as_ref(), &mut tally);
    tally
}

/// Added to a corpus policy set to make errors matter: with it every request
/// is allowed unless a forbid is satisfied, or errors where `skip-permit`
/// denies.
const PERMIT_ALL: &str = "\n@id(\"arbiter-permit-all\")\npermit (principal, action, resource);\n";

/// `skip-permit` on a corpus test whose requests have erroring policies,
/// with [`PERMIT_ALL`] added: the corpus alone has no allow where a policy
/// errored, which is where the modes differ. The reference answer is the
/// engine's in `skip-policy` (Cedar's semantics, which the corpus checks)
/// on the same set, with the rule applied; its errors must be the corpus's.
fn check_case_with_permit_all(case: &TestCase) -> Tally {
    let mut tally = Tally {
        files: 1,
        ..Tally::default()
    };
    if case
        .requests
        .iter()
        .all(|request| request.expected.errors.is_empty())
    {
        return tally;
    }
    let mut inputs: Inputs = match loader::read_inputs(&case.sources) {
        Ok(inputs) => inputs,
        Err(error) => {
            tally.unanswered(case, format!("cannot read: {}", error));
            return tally;
        }
    };
    let Some(file) = inputs.policy_files.first_mut() else {
        tally.unanswered(case, "no policy file");
        return tally;
    };
    file.text = format!("{}{PERMIT_ALL}", file.text).into();
    let build = |mode, validate_requests| {
        loader::build(&inputs, options_in(mode, false, validate_requests))
            .map(|(snapshot, _)| snapshot)
            .map_err(|error| error.to_string())
    };
    let snapshots = [true, false].map(|validate_requests| {
        Ok::<_, String>((
            build(OnEvaluationError::SkipPolicy, validate_requests)?,
            build(OnEvaluationError::SkipPermit, validate_requests)?,
        ))
    });
    let [Ok(validated), Ok(unvalidated)] = snapshots else {
        tally.unanswered(case, "refused with the permit-all policy added");
        return tally;
    };
    let forbids = forbid_ids(case);
    let engine = Engine::new();
    for request in &case.requests {
        let (cedar, skip_permit) = if request.validate_request {
            &validated
        } else {
            &unvalidated
        };
        let input = CheckInput {
            principal: Some(input_uid(&request.principal)),
            action: Some(input_uid(&request.action)),
            resource: Some(input_uid(&request.resource)),
            context_json: &request.context_json,
            entities_json: "",
        };
        let ask = |snapshot: &Snapshot| {
            engine
                .check_against(snapshot, &input)
                .map(|decision| Answer {
                    allow: decision.allowed,
                    reasons: decision.reasons.into_iter().collect(),
                    errors: decision.errors.into_iter().map(|e| e.policy_id).collect(),
                })
                .map_err(|error| error.to_string())
        };
        let cedar = match ask(cedar) {
            Ok(cedar) => cedar,
            Err(error) => {
                tally.answer(case, request, &request.expected, Err(error));
                continue;
            }
        };
        if cedar.errors != request.expected.errors {
            tally.mismatch(
                &case.name,
                format!("{} (permit-all added): errors", request.description),
                format!("{:?}", request.expected.errors),
                format!("{:?}", cedar.errors),
            );
        }
        let expected = expected_in(OnEvaluationError::SkipPermit, &cedar, &forbids);
        tally.allows_with_errors += usize::from(cedar.allow && !cedar.errors.is_empty());
        tally.forbid_error_denies += usize::from(expected.allow != cedar.allow);
        tally.answer(case, request, &expected, ask(skip_permit));
    }
    tally
}

/// Checks `cases` in-process in `mode` on every core.
fn check_in_process(cases: &[TestCase], mode: OnEvaluationError) -> Tally {
    check_each(cases, |case| check_case_in_process(case, mode))
}

/// Runs `check` on each of `cases`, on every core.
fn check_each(cases: &[TestCase], check: impl Fn(&TestCase) -> Tally + Sync) -> Tally {
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut tally = Tally::default();
                    while let Some(case) = cases.get(next.fetch_add(1, Ordering::Relaxed)) {
                        tally.merge(check(case));
                    }
                    tally
                })
            })
            .collect();
        let mut tally = Tally::default();
        for worker in workers {
            match worker.join() {
                Ok(part) => tally.merge(part),
                Err(_) => panic!("a worker panicked"),
            }
        }
        tally
    })
}

/// Every test in the corpus, handwritten first; the sample only when `step`
/// is given (every `step`-th generated test by name). The cases' files stay
/// while the returned `Unpacked` lives.
fn corpus_cases(step: Option<usize>) -> (Vec<TestCase>, Unpacked) {
    let dir = corpus_dir();
    let warn_only = warn_only(&dir);
    let mut cases = handwritten(&dir, &warn_only);
    let generated = unpack_generated(&dir);
    let names: Vec<String> = match step {
        Some(step) => generated.names.iter().step_by(step).cloned().collect(),
        None => generated.names.clone(),
    };
    cases.extend(generated.read(&names, &warn_only));
    (cases, generated)
}

#[test]
fn sampled_corpus_skip_permit_in_process() {
    let started = Instant::now();
    let (cases, _unpacked) = corpus_cases(Some(SAMPLE_STEP));
    let tally = check_in_process(&cases, OnEvaluationError::SkipPermit);
    tally.report(
        "handwritten + sampled corpus in process, skip-permit",
        started.elapsed(),
    );
    let started = Instant::now();
    let tally = check_each(&cases, check_case_with_permit_all);
    let (allows_with_errors, forbid_denies) = (tally.allows_with_errors, tally.forbid_error_denies);
    tally.report(
        "handwritten + sampled corpus in process, permit-all added, skip-permit",
        started.elapsed(),
    );
    // Both cases occur: an erroring permit beside a satisfied one (allow),
    // and an erroring forbid (deny).
    assert!(forbid_denies > 0, "no allow with an erroring forbid");
    assert!(
        allows_with_errors > forbid_denies,
        "no allow with only erroring permits"
    );
}

#[test]
#[ignore = "the whole corpus: cargo test --release --test conformance -- --ignored --nocapture"]
fn whole_corpus_skip_permit_in_process() {
    let started = Instant::now();
    let (cases, _unpacked) = corpus_cases(None);
    let tally = check_in_process(&cases, OnEvaluationError::SkipPermit);
    tally.report("whole corpus in process, skip-permit", started.elapsed());
    // The corpus has no allow where a policy errored (where the modes
    // differ): the same requests again with a permit-all policy added.
    let started = Instant::now();
    let tally = check_each(&cases, check_case_with_permit_all);
    let (allows_with_errors, forbid_denies) = (tally.allows_with_errors, tally.forbid_error_denies);
    tally.report(
        "whole corpus in process, permit-all added, skip-permit",
        started.elapsed(),
    );
    assert!(forbid_denies > 0, "no allow with an erroring forbid");
    assert!(
        allows_with_errors > forbid_denies,
        "no allow with only erroring permits"
    );
}

#[test]
#[ignore = "the whole corpus: cargo test --release --test conformance -- --ignored --nocapture"]
fn whole_corpus_in_process() {
    let started = Instant::now();
    let (cases, _unpacked) = corpus_cases(None);
    let tally = check_in_process(&cases, OnEvaluationError::SkipPolicy);
    tally.report("whole corpus in process", started.elapsed());
}

// ---------------------------------------------------------------------------
// Template links: the corpus again, its scoped policies as linked templates

/// A corpus policy set rewritten: every policy whose principal or resource
/// scope names a uid (`==`, `in`, `is … in`) becomes a template with a slot
/// there (`@id("<id>.template")`) and a link with the original uid, whose
/// id is the original policy id. Other policies stay as they are, with their
/// id made explicit. Every request must get the same answer, reasons and
/// errors included.
struct Templated {
    policies: String,
    links: String,
    templates: usize,
}

fn templated(policies_text: &str) -> Result<Templated, String> {
    use cedar_policy::{PolicyId, PrincipalConstraint, ResourceConstraint, Template};
    let set: cedar_policy::PolicySet = policies_text.parse().map_err(|e| format!("{e}"))?;
    let count = set.num_of_policies();
    let mut text = String::new();
    let mut links = Vec::new();
    for position in 0..count {
        let positional = PolicyId::new(format!("policy{position}"));
        let policy = set
            .policy(&positional)
            .ok_or_else(|| format!("no `{positional}` in a single file"))?;
        let id = policy
            .annotation("id")
            .map_or_else(|| positional.to_string(), str::to_owned);
        let principal = match policy.principal_constraint() {
            PrincipalConstraint::Eq(uid)
            | PrincipalConstraint::In(uid)
            | PrincipalConstraint::IsIn(_, uid) => Some(uid),
            _ => None,
        };
        let resource = match policy.resource_constraint() {
            ResourceConstraint::Eq(uid)
            | ResourceConstraint::In(uid)
            | ResourceConstraint::IsIn(_, uid) => Some(uid),
            _ => None,
        };
        if principal.is_none() && resource.is_none() {
            if policy.annotation("id").is_none() {
                text.push_str(&format!("@id({:?})\n", id));
            }
            text.push_str(&format!("{policy}\n"));
            continue;
        }
        let mut json = policy.to_json().map_err(|e| format!("{e}"))?;
        let mut args = serde_json::Map::new();
        for (part, slot, uid) in [
            ("principal", "?principal", principal),
            ("resource", "?resource", resource),
        ] {
            let Some(uid) = uid else { continue };
            let scope = &mut json[part];
            let target = if scope.get("in").is_some() && scope.get("entity_type").is_some() {
                &mut scope["in"]
            } else {
                scope
            };
            let object = target
                .as_object_mut()
                .ok_or_else(|| format!("`{id}`: {part} scope is not an object"))?;
            object.remove("entity");
            object.insert("slot".into(), slot.into());
            args.insert(slot.into(), uid.to_string().into());
        }
        let template_id = format!("{id}.template");
        json["annotations"]["id"] = template_id.clone().into();
        let template = Template::from_json(Some(PolicyId::new(&template_id)), json)
            .map_err(|e| format!("`{id}`: {e}"))?;
        text.push_str(&format!("{template}\n"));
        links.push(serde_json::json!({
            "template_id": template_id,
            "link_id": id,
            "args": args,
        }));
    }
    Ok(Templated {
        policies: text,
        templates: links.len(),
        links: serde_json::Value::Array(links).to_string(),
    })
}

/// A test with its policies rewritten as linked templates, in `dir`.
fn templated_case(case: &TestCase, dir: &Path) -> Result<(TestCase, usize), String> {
    let Some(path) = &case.sources.policies else {
        return Err("no policies".into());
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{e}"))?;
    let rewritten = templated(&text)?;
    let policies = dir.join("policies.cedar");
    let links = dir.join("links.json");
    std::fs::write(&policies, &rewritten.policies).map_err(|e| format!("{e}"))?;
    std::fs::write(&links, &rewritten.links).map_err(|e| format!("{e}"))?;
    let case = TestCase {
        name: case.name.clone(),
        sources: Sources {
            policies: Some(policies),
            template_links: Some(links),
            ..case.sources.clone()
        },
        should_validate: case.should_validate,
        warn_only: case.warn_only,
        requests: case.requests.clone(),
    };
    Ok((case, rewritten.templates))
}

/// One test in-process with its policies as linked templates.
fn check_case_templated(case: &TestCase, templates: &AtomicUsize) -> Tally {
    let mut tally = Tally {
        files: 1,
        ..Tally::default()
    };
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(error) => {
            tally.unanswered(case, format!("no temporary directory: {error}"));
            return tally;
        }
    };
    match templated_case(case, dir.path()) {
        Ok((templated, count)) => {
            templates.fetch_add(count, Ordering::Relaxed);
            check_case_in_process(&templated, OnEvaluationError::SkipPolicy)
        }
        Err(error) => {
            tally.unanswered(case, format!("cannot rewrite as templates: {error}"));
            tally
        }
    }
}

#[test]
fn sampled_corpus_as_template_links_in_process() {
    let started = Instant::now();
    let (cases, _unpacked) = corpus_cases(Some(SAMPLE_STEP));
    let templates = AtomicUsize::new(0);
    let tally = check_each(&cases, |case| check_case_templated(case, &templates));
    let templates = templates.into_inner();
    println!("policies rewritten as template + link: {templates}");
    tally.report(
        "handwritten + sampled corpus as template links, in process",
        started.elapsed(),
    );
    // 202 in the sample: enough that links are what is being checked.
    assert!(templates >= 150, "too few policies rewritten: {templates}");
}

#[test]
#[ignore = "the whole corpus: cargo test --release --test conformance -- --ignored --nocapture"]
fn whole_corpus_as_template_links_in_process() {
    let started = Instant::now();
    let (cases, _unpacked) = corpus_cases(None);
    let templates = AtomicUsize::new(0);
    let tally = check_each(&cases, |case| check_case_templated(case, &templates));
    println!(
        "policies rewritten as template + link: {}",
        templates.into_inner()
    );
    tally.report(
        "whole corpus as template links, in process",
        started.elapsed(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handwritten_as_template_links_through_grpc() {
    let started = Instant::now();
    let dir = corpus_dir();
    let cases = handwritten(&dir, &warn_only(&dir));
    let mut tally = Tally::default();
    let mut templates = 0;
    for case in &cases {
        let temp = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
        let (templated, count) = templated_case(case, temp.path())
            .unwrap_or_else(|error| panic!("`{}`: {error}", case.name));
        templates += count;
        tally.merge(check_case_grpc(&templated).await);
    }
    println!("policies rewritten as template + link: {templates}");
    tally.report(
        "handwritten corpus as template links through gRPC",
        started.elapsed(),
    );
    assert!(templates >= 20, "too few policies rewritten: {templates}");
}
