//! Decision fixtures: data-driven cases (principal, action, resource,
//! context, entities, expected decision and reasons) run against a policy
//! set through the same engine the server uses. `arbiter test` runs them, and
//! `serve --tests` runs them on every candidate set before it is served.
//!
//! A fixture file may carry its own `template_links` (the Cedar CLI's links
//! format), linked into the set for its cases only.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::{CheckInput, Engine, RequestEntitiesMode, Snapshot, UidInput, loader};

/// One fixture file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureFile {
    #[serde(default)]
    pub description: Option<String>,
    /// Template links (the Cedar CLI's format) added to the set for this
    /// file's cases only.
    #[serde(default)]
    pub template_links: Option<Vec<serde_json::Value>>,
    pub cases: Vec<FixtureCase>,
}

/// One decision the policies are expected to make.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureCase {
    pub name: String,
    pub principal: UidSpec,
    pub action: UidSpec,
    pub resource: UidSpec,
    /// Cedar JSON context object; absent means `{}`.
    #[serde(default)]
    pub context: Option<serde_json::Map<String, serde_json::Value>>,
    /// Cedar entities JSON, merged over the store for this case only.
    #[serde(default)]
    pub entities: Option<Vec<serde_json::Value>>,
    pub decision: Expected,
    pub reasons: Vec<String>,
}

/// An entity uid: `{"type": "Saas::User", "id": "alice"}` or `Saas::User::"alice"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum UidSpec {
    Object {
        #[serde(rename = "type")]
        type_name: String,
        id: String,
    },
    Text(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expected {
    Allow,
    Deny,
}

/// A decision reduced to what fixtures compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    pub reasons: BTreeSet<String>,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "allow" } else { "deny" };
        let reasons: Vec<&str> = self.reasons.iter().map(String::as_str).collect();
        write!(f, "{verdict} [{}]", reasons.join(","))
    }
}

/// What a failing case got instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actual {
    /// A decision that differs from the expected one; `errors` lists policies
    /// whose evaluation errored (`id: message`).
    Decision {
        outcome: Outcome,
        errors: Vec<String>,
    },
    /// The request itself was rejected (bad uid, context not matching the
    /// schema, ...).
    Rejected(String),
}

/// One case that did not match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseFailure {
    pub file: String,
    pub case: String,
    pub expected: Outcome,
    pub actual: Actual,
}

impl fmt::Display for CaseFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: expected {}, got ",
            self.file, self.case, self.expected
        )?;
        match &self.actual {
            Actual::Decision { outcome, errors } => {
                write!(f, "{outcome}")?;
                if !errors.is_empty() {
                    write!(f, " (evaluation errors: {})", errors.join("; "))?;
                }
                Ok(())
            }
            Actual::Rejected(message) => write!(f, "request error: {message}"),
        }
    }
}

/// The result of running fixtures.
#[derive(Debug, Clone, Default)]
pub struct FixtureReport {
    /// Fixture files read, in the order they ran.
    pub files: Vec<String>,
    pub passed: usize,
    pub failures: Vec<CaseFailure>,
}

impl FixtureReport {
    pub fn failed(&self) -> usize {
        self.failures.len()
    }

    pub fn total(&self) -> usize {
        self.passed + self.failures.len()
    }

    pub fn all_passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Fixtures that cannot be found, read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("{path}: cannot read fixture: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: malformed fixture: {message}")]
    Json {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: no fixture files (`*.json`) found")]
    NoFixtures { path: String },
    #[error("{path}: `template_links` refused: {message}")]
    Links { path: String, message: String },
}

/// Reads every fixture file named by `paths` (files, or directories searched
/// recursively for `*.json`) and evaluates each case against `snapshot`.
pub fn run_fixtures(snapshot: &Snapshot, paths: &[PathBuf]) -> Result<FixtureReport, FixtureError> {
    let mut fixtures = Vec::new();
    for path in fixture_files(paths)? {
        let fixture = read_fixture(&path)?;
        fixtures.push((path.display().to_string(), fixture));
    }
    let engine = Engine::new();
    let mut report = FixtureReport::default();
    for (name, fixture) in &fixtures {
        report.files.push(name.clone());
        let own = fixture_snapshot(snapshot, name, fixture)?;
        let snapshot = own.as_ref().unwrap_or(snapshot);
        for case in &fixture.cases {
            match evaluate_case(&engine, snapshot, name, case) {
                None => report.passed += 1,
                Some(failure) => report.failures.push(failure),
            }
        }
    }
    Ok(report)
}

/// The set a fixture file's cases run against when it is not `snapshot`
/// itself: with the file's own template links, and with request entities
/// that replace stored ones (a fixture's entities are the author's test data,
/// not a caller's claim, so the server's gated run agrees with `arbiter
/// test`). `None` when `snapshot` serves as it is.
fn fixture_snapshot(
    snapshot: &Snapshot,
    name: &str,
    fixture: &FixtureFile,
) -> Result<Option<Snapshot>, FixtureError> {
    let replace = RequestEntitiesMode::Replace;
    let needs_replace = snapshot.policies.request_entities != replace
        && fixture.cases.iter().any(|case| case.entities.is_some());
    let links = fixture.template_links.as_deref().unwrap_or_default();
    if links.is_empty() && !needs_replace {
        return Ok(None);
    }
    let file = format!("{name} (template_links)");
    loader::with_fixture_links(snapshot, &file, links, replace)
        .map(Some)
        .map_err(|error| FixtureError::Links {
            path: name.to_owned(),
            message: error
                .diagnostics
                .iter()
                .map(|diagnostic| diagnostic.message.clone())
                .collect::<Vec<_>>()
                .join("; "),
        })
}

/// Parses one fixture file.
pub fn read_fixture(path: &Path) -> Result<FixtureFile, FixtureError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| FixtureError::Read {
        path: name.clone(),
        source,
    })?;
    parse_fixture(&name, &text)
}

/// Parses fixture text; `name` is used in errors.
pub fn parse_fixture(name: &str, text: &str) -> Result<FixtureFile, FixtureError> {
    serde_json::from_str(text).map_err(|error| {
        let (line, column) = (error.line(), error.column());
        let full = error.to_string();
        let suffix = format!(" at line {line} column {column}");
        let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
        FixtureError::Json {
            path: name.to_owned(),
            line,
            column,
            message,
        }
    })
}

/// Evaluates one case; `None` when it passes.
pub fn evaluate_case(
    engine: &Engine,
    snapshot: &Snapshot,
    file: &str,
    case: &FixtureCase,
) -> Option<CaseFailure> {
    let expected = Outcome {
        allowed: case.decision == Expected::Allow,
        reasons: case.reasons.iter().cloned().collect(),
    };
    let failure = |actual| {
        Some(CaseFailure {
            file: file.to_owned(),
            case: case.name.clone(),
            expected: expected.clone(),
            actual,
        })
    };
    let mut uids = Vec::with_capacity(3);
    for (field, spec) in [
        ("principal", &case.principal),
        ("action", &case.action),
        ("resource", &case.resource),
    ] {
        match spec.parts() {
            Some(parts) => uids.push(parts),
            None => {
                return failure(Actual::Rejected(format!(
                    "`{field}` is not an entity uid like `Type::\"id\"`"
                )));
            }
        }
    }
    let uid = |index: usize| {
        uids.get(index).map(|(type_name, id)| UidInput {
            type_name,
            id: id.as_str(),
        })
    };
    let context_json = case
        .context
        .as_ref()
        .map(|context| serde_json::Value::Object(context.clone()).to_string())
        .unwrap_or_default();
    let entities_json = case
        .entities
        .as_ref()
        .map(|entities| serde_json::Value::Array(entities.clone()).to_string())
        .unwrap_or_default();
    let input = CheckInput {
        principal: uid(0),
        action: uid(1),
        resource: uid(2),
        context_json: &context_json,
        entities_json: &entities_json,
    };
    match engine.check_against(snapshot, &input) {
        Ok(decision) => {
            let outcome = Outcome {
                allowed: decision.allowed,
                reasons: decision.reasons.into_iter().collect(),
            };
            if outcome == expected {
                None
            } else {
                let errors = decision
                    .errors
                    .iter()
                    .map(|error| format!("{}: {}", error.policy_id, error.message))
                    .collect();
                failure(Actual::Decision { outcome, errors })
            }
        }
        Err(error) => failure(Actual::Rejected(error.to_string())),
    }
}

impl UidSpec {
    /// The type name and the (unescaped) id.
    fn parts(&self) -> Option<(&str, String)> {
        match self {
            UidSpec::Object { type_name, id } => Some((type_name.as_str(), id.clone())),
            UidSpec::Text(text) => split_uid(text),
        }
    }
}

/// The fixture files named by `paths`, each directory expanded to its
/// `*.json` files (recursively, sorted by path).
pub fn fixture_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, FixtureError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found = Vec::new();
            collect_json(path, &mut found)?;
            if found.is_empty() {
                return Err(FixtureError::NoFixtures {
                    path: path.display().to_string(),
                });
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn collect_json(dir: &Path, found: &mut Vec<PathBuf>) -> Result<(), FixtureError> {
    let read_error = |source| FixtureError::Read {
        path: dir.display().to_string(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let path = entry.path();
        // Same rule as the policy loader: skip Kubernetes ConfigMap `..data`.
        if entry.file_name().to_string_lossy().starts_with("..") {
            continue;
        }
        if path.is_dir() {
            collect_json(&path, found)?;
        } else if path.extension().is_some_and(|ext| ext == "json") {
            found.push(path);
        }
    }
    Ok(())
}

/// `Type::"id"` split into the type name and the unescaped id.
pub fn split_uid(text: &str) -> Option<(&str, String)> {
    let (type_name, quoted) = text.rsplit_once("::\"")?;
    let id = quoted.strip_suffix('"')?;
    let id: String = serde_json::from_str(&format!("\"{id}\"")).ok()?;
    Some((type_name, id))
}
