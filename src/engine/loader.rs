//! Loads a policy set, its schema and the entities file into a [`Snapshot`],
//! collecting every problem as a located diagnostic. The server, the hot
//! reloader and every CLI subcommand load through here, so they can never
//! disagree about a policy set.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    Entities, Policy, PolicyId, PolicySet, Schema, Template, ValidationMode, Validator,
};
use miette::{Diagnostic, GraphicalReportHandler, GraphicalTheme, NamedSource};
use sha2::{Digest, Sha256};

use super::error::{LoadDiagnostic, LoadError};
use super::hierarchy;
pub use super::options::{
    DEFAULT_DECISION_CACHE_CAPACITY, DEFAULT_SLICE_CACHE_CAPACITY, LoadOptions, OnEvaluationError,
};
use super::request_overlay;
use super::snapshot::{EntityData, PolicySnapshot, Snapshot};
use super::template_links;

/// The example in `policies/`, compiled into the binary: `(relative path, text)`.
mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_policies.rs"));
}

/// Where a policy set comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// A `.cedar` file, or a directory searched recursively for `.cedar` files.
    /// `None` (with no schema and no entities either) means the embedded default.
    pub policies: Option<PathBuf>,
    /// A `.cedarschema` file, or a JSON schema (`.json`).
    pub schema: Option<PathBuf>,
    /// A Cedar entities JSON file.
    pub entities: Option<PathBuf>,
    /// The Cedar CLI's template-links JSON file (`template_links.rs`).
    pub template_links: Option<PathBuf>,
    /// Decision fixtures a new set must pass before it is served (`serve
    /// --tests`). The loader does not read them; they are here because they
    /// are watched and reloaded with the set.
    pub tests: Option<PathBuf>,
}

impl Sources {
    /// True when nothing is configured: the embedded default is served.
    pub fn is_embedded(&self) -> bool {
        self.policies.is_none()
            && self.schema.is_none()
            && self.entities.is_none()
            && self.template_links.is_none()
    }

    /// The files and directories whose changes must trigger a reload.
    pub fn watched_paths(&self) -> Vec<PathBuf> {
        [
            &self.policies,
            &self.schema,
            &self.entities,
            &self.template_links,
            &self.tests,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }
}

/// A text file as read, with the name diagnostics use for it.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub name: String,
    pub text: Arc<str>,
}

/// What a successful load produced besides the snapshot.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Validation warnings (they do not stop a load).
    pub warnings: Vec<LoadDiagnostic>,
}

/// Reads all configured files and builds a snapshot from them.
pub fn load(sources: &Sources, options: LoadOptions) -> Result<(Snapshot, LoadReport), LoadError> {
    let inputs = read_inputs(sources)?;
    build(&inputs, options)
}

/// The raw texts of one policy set, before parsing.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub policy_files: Vec<SourceFile>,
    /// True when `policy_files` came from one file given directly: Cedar's own
    /// positional ids (`policy0`, ...) then apply.
    pub single_file: bool,
    pub schema: Option<SourceFile>,
    pub entities: Option<SourceFile>,
    /// Template links (`template_links.rs`), linked after the policies.
    pub template_links: Option<SourceFile>,
}

/// Reads the texts named by `sources` (or the embedded default).
pub fn read_inputs(sources: &Sources) -> Result<Inputs, LoadError> {
    if sources.is_embedded() {
        return Ok(embedded_inputs());
    }
    let (policy_files, single_file) = match &sources.policies {
        // A schema or entities file without policies is a configuration
        // mistake: serving it would deny everything without a word.
        None => {
            return Err(LoadError::one(
                "<configuration>",
                "no policies configured: give `--policies` (or no source flags at all \
                 for the embedded example)",
            ));
        }
        Some(path) if path.is_dir() => (read_policy_dir(path)?, false),
        Some(path) => (vec![read_file(path)?], true),
    };
    let schema = sources.schema.as_deref().map(read_file).transpose()?;
    let entities = sources.entities.as_deref().map(read_file).transpose()?;
    let template_links = sources
        .template_links
        .as_deref()
        .map(read_file)
        .transpose()?;
    Ok(Inputs {
        policy_files,
        single_file,
        schema,
        entities,
        template_links,
    })
}

/// Diagnostics name embedded files `<embedded>/rbac.cedar`; policy ids do
/// not carry the prefix, so ids match those of the same files on disk.
const EMBEDDED_PREFIX: &str = "<embedded>/";

fn embedded_inputs() -> Inputs {
    let mut policy_files = Vec::new();
    let mut schema = None;
    let mut entities = None;
    for (name, text) in embedded::FILES {
        let file = SourceFile {
            name: format!("{EMBEDDED_PREFIX}{name}"),
            text: Arc::from(*text),
        };
        if name.ends_with(".cedar") {
            policy_files.push(file);
        } else if name.ends_with(".cedarschema") {
            schema = Some(file);
        } else if *name == "entities.json" {
            entities = Some(file);
        }
    }
    Inputs {
        policy_files,
        single_file: false,
        schema,
        entities,
        template_links: None,
    }
}

fn read_file(path: &Path) -> Result<SourceFile, LoadError> {
    let name = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(SourceFile {
            name,
            text: Arc::from(text),
        }),
        Err(error) => Err(LoadError::one(name, format!("cannot read file: {error}"))),
    }
}

/// Every `.cedar` file below `root`, sorted by path so ids are stable.
/// Names are relative to `root` with `/` separators.
fn read_policy_dir(root: &Path) -> Result<Vec<SourceFile>, LoadError> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|error| {
            LoadError::one(
                dir.display().to_string(),
                format!("cannot read directory: {error}"),
            )
        })?;
        for entry in entries {
            let entry = entry.map_err(|error| {
                LoadError::one(
                    dir.display().to_string(),
                    format!("cannot read directory: {error}"),
                )
            })?;
            let path = entry.path();
            let name = entry.file_name();
            // Kubernetes ConfigMap volumes hold `..data` and timestamped
            // `..2024_...` directories beside symlinks to them: reading the
            // symlinks alone sees every file exactly once.
            if name.to_string_lossy().starts_with("..") {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "cedar") {
                found.push(path);
            }
        }
    }
    found.sort();
    let mut files = Vec::with_capacity(found.len());
    for path in found {
        let mut file = read_file(&path)?;
        let relative = path.strip_prefix(root).unwrap_or(&path);
        file.name = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        files.push(file);
    }
    Ok(files)
}

/// Parses, names, validates and assembles a snapshot from raw texts.
pub fn build(inputs: &Inputs, options: LoadOptions) -> Result<(Snapshot, LoadReport), LoadError> {
    let mut diagnostics = Vec::new();
    let mut report = LoadReport::default();

    let schema = match &inputs.schema {
        None => None,
        Some(file) => match parse_schema(file) {
            Ok((schema, warnings)) => {
                report.warnings.extend(warnings);
                Some(schema)
            }
            Err(errors) => {
                diagnostics.extend(errors);
                None
            }
        },
    };

    let (mut policies, origins) = match assemble_policies(inputs) {
        Ok(assembled) => assembled,
        Err(errors) => {
            diagnostics.extend(errors);
            (PolicySet::new(), HashMap::new())
        }
    };
    // Link ids to their entry, to name the entry a validation error is about.
    let mut link_entries: HashMap<String, usize> = HashMap::new();
    if let (Some(file), true) = (&inputs.template_links, diagnostics.is_empty()) {
        let owner = |id: &str| origins.get(id).map(|file| file.name.clone());
        match template_links::parse(&file.name, &file.text).and_then(|links| {
            template_links::apply(&mut policies, &file.name, &links, owner).map(|()| links)
        }) {
            Ok(links) => {
                link_entries = links
                    .into_iter()
                    .map(|link| (link.link_id, link.index))
                    .collect();
            }
            Err(errors) => diagnostics.extend(errors),
        }
    }

    if !diagnostics.is_empty() {
        return Err(LoadError { diagnostics });
    }

    if let Some(schema) = &schema {
        let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        // A link's problem is reported against its entry in the links file:
        // Cedar's source span points into the template's text.
        let diagnose = |id: &PolicyId, error: &dyn Diagnostic| {
            let id = id.to_string();
            match (link_entries.get(&id), &inputs.template_links) {
                (Some(index), Some(file)) => LoadDiagnostic::plain(
                    &file.name,
                    format!(
                        "entry {index}: link `{id}` does not validate against the schema: {}",
                        super::error::error_chain(error)
                    ),
                ),
                _ => policy_diagnostic(origins.get(id.as_str()), error),
            }
        };
        for warning in result.validation_warnings() {
            // Cedar only warns that a link can never apply (a slot value of
            // a type its scope cannot take): for a link that is a mistake in
            // the links file, so it refuses the set.
            let is_link = link_entries.contains_key(&warning.policy_id().to_string());
            if is_link && options.validate_policies {
                diagnostics.push(diagnose(warning.policy_id(), warning));
            } else {
                report.warnings.push(diagnose(warning.policy_id(), warning));
            }
        }
        if options.validate_policies {
            for error in result.validation_errors() {
                diagnostics.push(diagnose(error.policy_id(), error));
            }
        }
        if !diagnostics.is_empty() {
            return Err(LoadError { diagnostics });
        }
    }

    let entities = parse_entities(
        inputs.entities.as_ref(),
        schema.as_ref(),
        options.limits.max_hierarchy_depth,
    )?;

    let policy_revision = revision(
        inputs
            .schema
            .iter()
            .chain(inputs.policy_files.iter())
            .chain(inputs.template_links.iter())
            .map(|file| (file.name.as_str(), &*file.text)),
    );
    let data_revision = revision(
        inputs
            .entities
            .iter()
            .map(|file| (file.name.as_str(), &*file.text)),
    );

    let policy_snapshot = PolicySnapshot::new(policies, schema, policy_revision, options);
    let entity_data = EntityData::new(entities, data_revision);
    Ok((
        Snapshot::new(
            Arc::new(policy_snapshot),
            Arc::new(entity_data),
            options.decision_cache_capacity,
            options.slice_cache_capacity,
        ),
        report,
    ))
}

/// `base` with a fixture file's own `links` added, the links validated
/// against the schema as a load validates them (only the links: the rest of
/// the set was validated when it loaded), and request entities combined per
/// `request_entities`. What the cases of that file run against.
pub fn with_fixture_links(
    base: &Snapshot,
    file: &str,
    links: &[serde_json::Value],
    request_entities: super::RequestEntitiesMode,
) -> Result<Snapshot, LoadError> {
    let policies = &base.policies;
    let parsed = template_links::parse_values(file, links)
        .map_err(|diagnostics| LoadError { diagnostics })?;
    let mut set = policies.policies.clone();
    template_links::apply(&mut set, file, &parsed, |_| None)
        .map_err(|diagnostics| LoadError { diagnostics })?;
    if let Some(schema) = &policies.schema {
        let mut only_links = PolicySet::new();
        for link in &parsed {
            let template_id = PolicyId::new(&link.template_id);
            if only_links.template(&template_id).is_none()
                && let Some(template) = set.template(&template_id)
            {
                let _ = only_links.add_template(template.clone());
            }
            let _ = only_links.link(
                template_id,
                PolicyId::new(&link.link_id),
                link.values.clone(),
            );
        }
        let result = Validator::new(schema.clone()).validate(&only_links, ValidationMode::Strict);
        let entry = |id: &PolicyId| {
            parsed
                .iter()
                .find(|link| link.link_id == id.to_string())
                .map_or(0, |link| link.index)
        };
        // As at load, a link that can never apply is an error.
        let problems = result
            .validation_errors()
            .map(|error| (error.policy_id(), super::error::error_chain(error)))
            .chain(
                result
                    .validation_warnings()
                    .map(|warning| (warning.policy_id(), super::error::error_chain(warning))),
            );
        let diagnostics: Vec<LoadDiagnostic> = problems
            .filter(|(id, _)| set.template(id).is_none())
            .map(|(id, message)| {
                LoadDiagnostic::plain(
                    file,
                    format!(
                        "entry {}: link `{id}` does not validate against the schema: {message}",
                        entry(id),
                    ),
                )
            })
            .collect();
        if !diagnostics.is_empty() {
            return Err(LoadError { diagnostics });
        }
    }
    let options = LoadOptions {
        validate_requests: policies.validate_requests,
        on_evaluation_error: policies.on_evaluation_error,
        request_entities,
        limits: policies.limits,
        policy_index_min: if policies.indexed() { 0 } else { usize::MAX },
        decision_cache_capacity: 0,
        slice_cache_capacity: 0,
        ..LoadOptions::default()
    };
    let snapshot = PolicySnapshot::new(
        set,
        policies.schema.clone(),
        policies.revision.clone(),
        options,
    );
    Ok(Snapshot::new(Arc::new(snapshot), base.data.clone(), 0, 0))
}

/// Where each policy id came from, for diagnostics.
type Origins<'a> = HashMap<String, &'a SourceFile>;

fn assemble_policies(inputs: &Inputs) -> Result<(PolicySet, Origins<'_>), Vec<LoadDiagnostic>> {
    let mut combined = PolicySet::new();
    let mut origins: Origins<'_> = HashMap::new();
    let mut diagnostics = Vec::new();
    for file in &inputs.policy_files {
        let parsed = match PolicySet::from_str(&file.text) {
            Ok(parsed) => parsed,
            Err(errors) => {
                diagnostics.extend(errors.iter().map(|error| located(file, error)));
                continue;
            }
        };
        // Cedar names the policies of one parsed file `policy0`, `policy1`,
        // ... in file order; keep that for a single file, qualify it by the
        // file's path inside a directory (`rbac.cedar#policy0`).
        let default_id = |id: &PolicyId| -> String {
            if inputs.single_file {
                id.to_string()
            } else {
                let name = file
                    .name
                    .strip_prefix(EMBEDDED_PREFIX)
                    .unwrap_or(&file.name);
                format!("{name}#{id}")
            }
        };
        let mut add_id = |id: String, diagnostics: &mut Vec<LoadDiagnostic>| -> Option<PolicyId> {
            if let Some(previous) = origins.get(&id) {
                diagnostics.push(LoadDiagnostic::plain(
                    &file.name,
                    format!(
                        "duplicate policy id `{id}` (also used in {})",
                        previous.name
                    ),
                ));
                return None;
            }
            origins.insert(id.clone(), file);
            Some(PolicyId::new(id))
        };
        for template in parsed.templates() {
            let id = template
                .annotation("id")
                .map(str::to_owned)
                .unwrap_or_else(|| default_id(template.id()));
            if let Some(id) = add_id(id, &mut diagnostics) {
                let renamed: Template = template.new_id(id);
                if let Err(error) = combined.add_template(renamed) {
                    diagnostics.push(LoadDiagnostic::plain(&file.name, error));
                }
            }
        }
        for policy in parsed.policies() {
            let id = policy
                .annotation("id")
                .map(str::to_owned)
                .unwrap_or_else(|| default_id(policy.id()));
            if let Some(id) = add_id(id, &mut diagnostics) {
                let renamed: Policy = policy.new_id(id);
                if let Err(error) = combined.add(renamed) {
                    diagnostics.push(LoadDiagnostic::plain(&file.name, error));
                }
            }
        }
    }
    if diagnostics.is_empty() {
        Ok((combined, origins))
    } else {
        Err(diagnostics)
    }
}

fn parse_schema(file: &SourceFile) -> Result<(Schema, Vec<LoadDiagnostic>), Vec<LoadDiagnostic>> {
    if file.name.ends_with(".json") {
        return Schema::from_json_str(&file.text)
            .map(|schema| (schema, Vec::new()))
            .map_err(|error| vec![located(file, &error)]);
    }
    match Schema::from_cedarschema_str(&file.text) {
        Ok((schema, warnings)) => {
            let warnings = warnings.map(|warning| located(file, &warning)).collect();
            Ok((schema, warnings))
        }
        Err(error) => Err(vec![located(file, &error)]),
    }
}

/// Parses an entities file (or none) with the schema; the schema's action
/// entities are always included.
pub(crate) fn parse_entities(
    file: Option<&SourceFile>,
    schema: Option<&Schema>,
    max_depth: u32,
) -> Result<Entities, LoadError> {
    let (name, text) = match file {
        Some(file) => (file.name.as_str(), &*file.text),
        None => ("<no entities>", "[]"),
    };
    check_hierarchy(name, text, max_depth)?;
    Entities::from_json_str(text, schema).map_err(|error| {
        let file = SourceFile {
            name: name.to_owned(),
            text: Arc::from(text),
        };
        let mut diagnostic = located(&file, &error);
        if diagnostic.location.is_none() {
            diagnostic.location = locate_entity_error(text, &diagnostic.message);
        }
        LoadError {
            diagnostics: vec![diagnostic],
        }
    })
}

/// Measures the file's hierarchy before Cedar computes its closure (which
/// recurses once per level: a long chain of parents aborted the process at
/// every start). What is not an array of entities is left to Cedar's
/// diagnostics.
fn check_hierarchy(name: &str, text: &str, max_depth: u32) -> Result<(), LoadError> {
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str(text) else {
        return Ok(());
    };
    let refuse = |message: String| {
        let mut diagnostic = LoadDiagnostic::plain(name, &message);
        diagnostic.location = locate_entity_error(text, &message);
        LoadError {
            diagnostics: vec![diagnostic],
        }
    };
    let (nodes, parents) = request_overlay::graph(&items).map_err(refuse)?;
    hierarchy::check(&nodes, |at| parents[at].iter(), |_| 0, max_depth)
        .map_err(|error| refuse(error.to_string()))
}

/// Cedar's entity errors carry no source span. Find the line anyway: from
/// serde's `at line L column C`, or from the first entity uid the message
/// names (`Type::"id"`), located at its `"id"` in the file.
fn locate_entity_error(text: &str, message: &str) -> Option<(usize, usize)> {
    if let Some(rest) = message.split(" at line ").nth(1) {
        let mut words = rest.split_whitespace();
        let line = words.next()?.parse().ok()?;
        let column = match (words.next(), words.next()) {
            (Some("column"), Some(column)) => column
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .unwrap_or(1),
            _ => 1,
        };
        return Some((line, column.max(1)));
    }
    let start = message.find("::\"")? + 3;
    let end = start + message.get(start..)?.find('"')?;
    let id = serde_json::to_string(message.get(start..end)?).ok()?;
    let mut from = 0;
    while let Some(found) = text.get(from..).and_then(|rest| rest.find(&id)) {
        let at = from + found;
        let before = text.get(..at).unwrap_or("").trim_end();
        if before.ends_with(':') && before.trim_end_matches(':').trim_end().ends_with("\"id\"") {
            return Some(line_column(text, at));
        }
        from = at + id.len();
    }
    None
}

fn revision<'a>(parts: impl Iterator<Item = (&'a str, &'a str)>) -> Arc<str> {
    let mut hasher = Sha256::new();
    for (name, text) in parts {
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update((text.len() as u64).to_le_bytes());
        hasher.update(text.as_bytes());
    }
    let digest = hasher.finalize();
    let hex: String = digest
        .iter()
        .take(8)
        .map(|byte| format!("{byte:02x}"))
        .collect();
    Arc::from(hex)
}

impl LoadDiagnostic {
    pub(crate) fn plain(file: &str, message: impl fmt::Display) -> Self {
        let message = message.to_string();
        LoadDiagnostic {
            file: file.to_owned(),
            location: None,
            rendered: message.clone(),
            message,
        }
    }
}

fn policy_diagnostic(origin: Option<&&SourceFile>, error: &dyn Diagnostic) -> LoadDiagnostic {
    match origin {
        Some(file) => located(file, error),
        None => LoadDiagnostic::plain("<policies>", error),
    }
}

/// Turns a Cedar diagnostic about `file` into a located, rendered one.
fn located(file: &SourceFile, error: &dyn Diagnostic) -> LoadDiagnostic {
    let mut message = super::error::error_chain(error);
    if let Some(help) = error.help() {
        message.push_str(&format!(" (help: {help})"));
    }
    let location = error
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| line_column(&file.text, label.offset()));
    let wrapper = WithSource {
        inner: error,
        source: NamedSource::new(file.name.clone(), file.text.to_string()),
    };
    let mut rendered = String::new();
    let handler = GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor());
    if handler.render_report(&mut rendered, &wrapper).is_err() {
        rendered = message.clone();
    }
    LoadDiagnostic {
        file: file.name.clone(),
        location,
        message,
        rendered,
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |index| index + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// A Cedar diagnostic shown against the file it is about.
struct WithSource<'a> {
    inner: &'a dyn Diagnostic,
    source: NamedSource<String>,
}

impl fmt::Debug for WithSource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.inner, f)
    }
}

impl fmt::Display for WithSource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.inner, f)
    }
}

impl std::error::Error for WithSource<'_> {}

impl Diagnostic for WithSource<'_> {
    fn code<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.inner.code()
    }
    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.inner.help()
    }
    fn severity(&self) -> Option<miette::Severity> {
        self.inner.severity()
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        self.inner.labels()
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, text).unwrap();
    }

    fn ids(snapshot: &Snapshot) -> Vec<String> {
        let mut ids: Vec<String> = snapshot
            .policies
            .policies
            .policies()
            .map(|p| p.id().to_string())
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn single_file_keeps_cedar_positional_ids_and_annotations_win() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "p.cedar",
            "permit (principal, action, resource);\n@id(\"named\")\npermit (principal, action, resource);\npermit (principal, action, resource);\n",
        );
        let sources = Sources {
            policies: Some(dir.path().join("p.cedar")),
            ..Sources::default()
        };
        let (snapshot, _) = load(&sources, LoadOptions::default()).unwrap();
        assert_eq!(ids(&snapshot), ["named", "policy0", "policy2"]);
    }

    #[test]
    fn directory_ids_are_derived_from_relative_path_and_position() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.cedar",
            "permit (principal, action, resource);\n",
        );
        write(
            dir.path(),
            "team/b.cedar",
            "forbid (principal, action, resource);\npermit (principal, action, resource);\n",
        );
        write(dir.path(), "notes.txt", "not a policy");
        let sources = Sources {
            policies: Some(dir.path().to_path_buf()),
            ..Sources::default()
        };
        let (snapshot, _) = load(&sources, LoadOptions::default()).unwrap();
        assert_eq!(
            ids(&snapshot),
            [
                "a.cedar#policy0",
                "team/b.cedar#policy0",
                "team/b.cedar#policy1"
            ]
        );
    }

    #[test]
    fn duplicate_ids_are_a_load_error_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.cedar",
            "@id(\"same\")\npermit (principal, action, resource);\n",
        );
        write(
            dir.path(),
            "b.cedar",
            "@id(\"same\")\nforbid (principal, action, resource);\n",
        );
        let sources = Sources {
            policies: Some(dir.path().to_path_buf()),
            ..Sources::default()
        };
        let error = load(&sources, LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("duplicate policy id `same`"), "{error}");
        assert!(
            error.contains("a.cedar") && error.contains("b.cedar"),
            "{error}"
        );
    }

    #[test]
    fn json_schema_format_is_accepted_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "schema.json",
            r#"{"": {"entityTypes": {"User": {"shape": {"type": "Record", "attributes": {"level": {"type": "Long"}}}}, "Doc": {}},
                    "actions": {"read": {"appliesTo": {"principalTypes": ["User"], "resourceTypes": ["Doc"]}}}}}"#,
        );
        write(
            dir.path(),
            "ok.cedar",
            "permit (principal, action, resource) when { principal.level > 1 };\n",
        );
        write(
            dir.path(),
            "bad.cedar",
            "permit (principal, action, resource) when { principal.rank > 1 };\n",
        );
        let with = |policies: &str| Sources {
            policies: Some(dir.path().join(policies)),
            schema: Some(dir.path().join("schema.json")),
            entities: None,
            ..Default::default()
        };
        assert!(load(&with("ok.cedar"), LoadOptions::default()).is_ok());
        let error = load(&with("bad.cedar"), LoadOptions::default()).unwrap_err();
        let first = &error.diagnostics[0];
        assert!(first.file.ends_with("bad.cedar"), "{first}");
        assert_eq!(first.location.map(|(line, _)| line), Some(1), "{first}");
    }

    #[test]
    fn schema_or_entities_without_policies_is_refused() {
        let sources = Sources {
            schema: Some(PathBuf::from("schema.cedarschema")),
            ..Sources::default()
        };
        let error = load(&sources, LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("no policies configured"), "{error}");
    }

    #[test]
    fn entity_errors_name_the_entity_line_and_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "schema.cedarschema",
            "entity User = { level: Long };\n",
        );
        write(
            dir.path(),
            "p.cedar",
            "permit (principal, action, resource);\n",
        );
        write(
            dir.path(),
            "entities.json",
            "[\n  {\"uid\": {\"type\": \"User\", \"id\": \"ann\"}, \"attrs\": {\"level\": 1}, \"parents\": []},\n  {\"uid\": {\"type\": \"User\",\n           \"id\": \"bo\"}, \"attrs\": {\"level\": \"high\"}, \"parents\": []}\n]\n",
        );
        write(dir.path(), "broken.json", "[\n  {\"uid\": \n");
        let with = |entities: &str| Sources {
            policies: Some(dir.path().join("p.cedar")),
            schema: Some(dir.path().join("schema.cedarschema")),
            entities: Some(dir.path().join(entities)),
            ..Default::default()
        };
        let error = load(&with("entities.json"), LoadOptions::default()).unwrap_err();
        let first = &error.diagnostics[0];
        assert_eq!(first.location.map(|(line, _)| line), Some(4), "{first}");
        assert!(
            first.message.contains("level"),
            "the cause is kept: {first}"
        );
        let error = load(&with("broken.json"), LoadOptions::default()).unwrap_err();
        let first = &error.diagnostics[0];
        assert!(first.location.is_some(), "{first}");
        assert!(first.to_string().contains("broken.json:"), "{first}");
    }

    #[test]
    fn line_column_counts_characters_from_one() {
        assert_eq!(line_column("ab\ncdé\nx", 0), (1, 1));
        assert_eq!(line_column("ab\ncdé\nx", 3), (2, 1));
        assert_eq!(line_column("ab\ncdé\nx", 8), (3, 1));
        assert_eq!(line_column("ab\ncdé\nx", 7), (2, 4));
    }
}
