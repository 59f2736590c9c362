//! Decision fixtures: data-driven cases (principal, action, resource,
//! context, entities, expected decision and reasons) run against a policy
//! set through the same engine the server uses. `arbiter test` runs them, and
//! `serve --tests` runs them on every candidate set before it is served.
//!
//! A fixture file is JSON:
//!
//! ```json
//! { "description": "...",
//!   "entities": [ ...Cedar entities for every case of this file... ],
//!   "template_links": [ ...links (the Cedar CLI's format) for this file... ],
//!   "cases": [ { "name": "...",
//!                "principal": {"type": "Saas::User", "id": "alice"},
//!                "action": {"type": "Saas::Action", "id": "read"},
//!                "resource": {"type": "Saas::Document", "id": "doc"},
//!                "context": {"mfa": true},
//!                "entities": [ ...request-only Cedar entities... ],
//!                "decision": "allow",
//!                "reasons": ["policy-id"] } ] }
//! ```
//!
//! `description`, `entities`, `template_links`, `context` and a case's
//! `entities` are optional; an entity uid may also be written as the string
//! `Type::"id"`. A case passes when the decision and the *set* of reasons
//! (determining policy ids) both match.
//!
//! Entities, entity by entity (same uid): a case's own entity wins over the
//! fixture file's, which wins over the loaded entities (`--entities`); the
//! winner replaces the other copy whole (attributes and parents). A file's
//! `template_links` are linked into the set for its cases only.
//!
//! A fixture file is checked whole before anything runs: a malformed file is
//! an error naming the file, the case (`cases[3] "name"`) and the field.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::engine::{CheckInput, Engine, RequestEntitiesMode, Snapshot, UidInput, loader};

/// One fixture file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureFile {
    #[serde(default)]
    pub description: Option<String>,
    /// Cedar entities JSON for every case of the file (a case's own win).
    #[serde(default)]
    pub entities: Option<Vec<serde_json::Value>>,
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
    /// Cedar entities JSON for this case only: over the file's, over the
    /// loaded entities.
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

/// One case as it ran, passed or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    pub file: String,
    pub case: String,
    pub expected: Outcome,
    pub actual: Actual,
    pub passed: bool,
}

/// The result of running fixtures.
#[derive(Debug, Clone, Default)]
pub struct FixtureReport {
    /// Fixture files read, in the order they ran.
    pub files: Vec<String>,
    pub passed: usize,
    pub failures: Vec<CaseFailure>,
    /// Every case, in the order it ran.
    pub results: Vec<CaseResult>,
    /// The policies of the set that no passing case had among its reasons,
    /// in the set's order.
    pub never_exercised: Vec<String>,
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
    #[error("{path}: `template_links` refused: {message}")]
    Links { path: String, message: String },
    #[error("{path}: no fixture files (`*.json`) found")]
    NoFixtures { path: String },
    /// Well-formed JSON that is not a fixture: names the entry (`cases[3]
    /// "name"`, or the file's top level) and the field.
    #[error("{path}: {entry}: {message}")]
    Invalid {
        path: String,
        entry: String,
        message: String,
    },
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
    let mut exercised: BTreeSet<String> = BTreeSet::new();
    for (name, fixture) in &fixtures {
        report.files.push(name.clone());
        let own = fixture_snapshot(snapshot, name, fixture)?;
        let file_snapshot = own.as_ref().unwrap_or(snapshot);
        for case in &fixture.cases {
            let result = run_case(
                &engine,
                file_snapshot,
                name,
                fixture.entities.as_deref(),
                case,
            );
            if result.passed {
                report.passed += 1;
                exercised.extend(result.expected.reasons.iter().cloned());
            } else {
                report.failures.push(CaseFailure {
                    file: result.file.clone(),
                    case: result.case.clone(),
                    expected: result.expected.clone(),
                    actual: result.actual.clone(),
                });
            }
            report.results.push(result);
        }
    }
    report.never_exercised = snapshot
        .policies
        .policies
        .policies()
        .map(|policy| policy.id().to_string())
        .filter(|id| !exercised.contains(id))
        .collect();
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
        && (fixture.entities.is_some() || fixture.cases.iter().any(|case| case.entities.is_some()));
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

/// Parses fixture text; `name` is used in errors. The JSON syntax first
/// (errors with line and column), then every field of every case, so an
/// error names the case and the field.
pub fn parse_fixture(name: &str, text: &str) -> Result<FixtureFile, FixtureError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|error| {
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
    })?;
    let invalid = |entry: &str, message: String| FixtureError::Invalid {
        path: name.to_owned(),
        entry: entry.to_owned(),
        message,
    };
    let serde_json::Value::Object(mut top) = value else {
        return Err(invalid(
            "top level",
            "a fixture file is a JSON object with `cases`".into(),
        ));
    };
    let top_level = "top level";
    let cases = match top.remove("cases") {
        Some(serde_json::Value::Array(cases)) => cases,
        Some(_) => return Err(invalid(top_level, "`cases` must be an array".into())),
        None => return Err(invalid(top_level, "missing field `cases`".into())),
    };
    let mut fields = Fields::new(top, &["description", "entities", "template_links", "cases"])
        .map_err(|message| invalid(top_level, message))?;
    let description = fields
        .optional("description")
        .map_err(|message| invalid(top_level, message))?;
    let entities = fields
        .optional::<Vec<serde_json::Value>>("entities")
        .map_err(|message| invalid(top_level, message))?;
    if let Some(entities) = &entities {
        check_entities(entities).map_err(|message| invalid(top_level, message))?;
    }
    let template_links = fields
        .optional::<Vec<serde_json::Value>>("template_links")
        .map_err(|message| invalid(top_level, message))?;
    let mut parsed = Vec::with_capacity(cases.len());
    for (index, case) in cases.into_iter().enumerate() {
        let entry = match case.get("name").and_then(serde_json::Value::as_str) {
            Some(case_name) => format!("cases[{index}] {}", serde_json::Value::from(case_name)),
            None => format!("cases[{index}]"),
        };
        parsed.push(parse_case(case).map_err(|message| invalid(&entry, message))?);
    }
    Ok(FixtureFile {
        description,
        entities,
        template_links,
        cases: parsed,
    })
}

/// The fields of one JSON object, taken one by one so an error names its
/// field.
struct Fields(serde_json::Map<String, serde_json::Value>);

impl Fields {
    /// Refuses a field not in `known` first: a typo (`reason`) is then
    /// named as such, not as the field it leaves missing.
    fn new(
        map: serde_json::Map<String, serde_json::Value>,
        known: &[&str],
    ) -> Result<Self, String> {
        match map.keys().find(|field| !known.contains(&field.as_str())) {
            None => Ok(Fields(map)),
            Some(field) => Err(format!(
                "unknown field `{field}`; expected one of {}",
                known
                    .iter()
                    .map(|name| format!("`{name}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    fn optional<T: DeserializeOwned>(&mut self, field: &str) -> Result<Option<T>, String> {
        match self.0.remove(field) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(value) => serde_json::from_value(value)
                .map(Some)
                .map_err(|error| format!("`{field}`: {error}")),
        }
    }

    fn required<T: DeserializeOwned>(&mut self, field: &str) -> Result<T, String> {
        self.optional(field)?
            .ok_or_else(|| format!("missing field `{field}`"))
    }
}

fn parse_case(case: serde_json::Value) -> Result<FixtureCase, String> {
    let serde_json::Value::Object(map) = case else {
        return Err("a case is a JSON object".into());
    };
    let mut fields = Fields::new(
        map,
        &[
            "name",
            "principal",
            "action",
            "resource",
            "context",
            "entities",
            "decision",
            "reasons",
        ],
    )?;
    let parsed = FixtureCase {
        name: fields.required("name")?,
        principal: fields.required("principal")?,
        action: fields.required("action")?,
        resource: fields.required("resource")?,
        context: fields.optional("context")?,
        entities: fields.optional("entities")?,
        decision: fields.required("decision")?,
        reasons: fields.required("reasons")?,
    };
    for (field, spec) in [
        ("principal", &parsed.principal),
        ("action", &parsed.action),
        ("resource", &parsed.resource),
    ] {
        if let (None, UidSpec::Text(text)) = (spec.parts(), spec) {
            return Err(format!(
                "`{field}`: `{text}` is not an entity uid like `Type::\"id\"`"
            ));
        }
    }
    if let Some(entities) = &parsed.entities {
        check_entities(entities)?;
    }
    Ok(parsed)
}

/// Entities are Cedar's to judge, but each must at least be an object with
/// a `uid`, so that overlays can be merged by uid.
fn check_entities(entities: &[serde_json::Value]) -> Result<(), String> {
    for (index, entity) in entities.iter().enumerate() {
        if entity_uid(entity).is_none() {
            return Err(format!(
                "`entities[{index}]`: an entity is an object with a `uid` \
                 ({{\"type\": ..., \"id\": ...}})"
            ));
        }
    }
    Ok(())
}

/// An entity's uid as (type, id), from `{"type", "id"}` or
/// `{"__entity": {"type", "id"}}`.
fn entity_uid(entity: &serde_json::Value) -> Option<(&str, &str)> {
    let uid = entity.get("uid")?;
    let uid = uid.get("__entity").unwrap_or(uid);
    Some((uid.get("type")?.as_str()?, uid.get("id")?.as_str()?))
}

/// The file's entities with the case's over them, by uid (`None` when
/// there are none).
fn overlay_entities(
    file: Option<&[serde_json::Value]>,
    case: Option<&[serde_json::Value]>,
) -> Option<Vec<serde_json::Value>> {
    let case = case.unwrap_or_default();
    let file = file.unwrap_or_default();
    if case.is_empty() && file.is_empty() {
        return None;
    }
    let overridden: BTreeSet<(&str, &str)> = case.iter().filter_map(entity_uid).collect();
    let mut merged: Vec<serde_json::Value> = file
        .iter()
        .filter(|entity| entity_uid(entity).is_none_or(|uid| !overridden.contains(&uid)))
        .cloned()
        .collect();
    merged.extend(case.iter().cloned());
    Some(merged)
}

/// Evaluates one case (without file-level entities); `None` when it passes.
pub fn evaluate_case(
    engine: &Engine,
    snapshot: &Snapshot,
    file: &str,
    case: &FixtureCase,
) -> Option<CaseFailure> {
    let result = run_case(engine, snapshot, file, None, case);
    (!result.passed).then_some(CaseFailure {
        file: result.file,
        case: result.case,
        expected: result.expected,
        actual: result.actual,
    })
}

/// Evaluates one case, with `file_entities` (the fixture file's) under its
/// own.
pub fn run_case(
    engine: &Engine,
    snapshot: &Snapshot,
    file: &str,
    file_entities: Option<&[serde_json::Value]>,
    case: &FixtureCase,
) -> CaseResult {
    let expected = Outcome {
        allowed: case.decision == Expected::Allow,
        reasons: case.reasons.iter().cloned().collect(),
    };
    let result = |actual: Actual| {
        let passed = matches!(&actual, Actual::Decision { outcome, .. } if *outcome == expected);
        CaseResult {
            file: file.to_owned(),
            case: case.name.clone(),
            expected: expected.clone(),
            actual,
            passed,
        }
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
                return result(Actual::Rejected(format!(
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
    let entities_json = overlay_entities(file_entities, case.entities.as_deref())
        .map(|entities| serde_json::Value::Array(entities).to_string())
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
            let errors = decision
                .errors
                .iter()
                .map(|error| format!("{}: {}", error.policy_id, error.message))
                .collect();
            result(Actual::Decision { outcome, errors })
        }
        Err(error) => result(Actual::Rejected(error.to_string())),
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
