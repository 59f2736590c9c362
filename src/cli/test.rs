//! `arbiter test`: runs data-driven decision fixtures against a policy set,
//! through the same loader and engine the server uses, and reports them for
//! people (text) or machines (`--junit`, `--format json`). The fixture format
//! and the runner are in `crate::fixtures`.
//!
//! Where fixtures are found when `--tests` is not given: the `tests/`
//! directory next to the policies (`P/tests` for a directory `P`, `tests/`
//! beside a single policy file), and for the embedded default
//! `policies/tests` relative to the current directory.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::test_report::{CaseReport, Summary};
use super::{SourceArgs, exit};
use crate::engine::{Sources, loader};
// The runner lives below `cli` so that the server can gate reloads on it.
pub use crate::fixtures::*;

#[derive(Debug, Clone, clap::Args)]
pub struct TestArgs {
    #[command(flatten)]
    pub sources: SourceArgs,
    /// A fixture file, or a directory searched recursively for `*.json`
    /// fixtures; may be repeated. Default: the `tests/` directory next to the
    /// policies (`policies/tests` in the current directory for the embedded
    /// default).
    #[arg(long = "tests", value_name = "PATH")]
    pub tests: Vec<PathBuf>,
    /// Also write a JUnit XML report to FILE (one testcase per fixture case),
    /// for CI systems.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// `text` for people; `json` writes a machine-readable summary to stdout
    /// (every case with expected and got, and the coverage).
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Where fixtures are looked for when `--tests` is not given: `tests/` next
/// to the policies, or `policies/tests` (relative to the current directory)
/// for the embedded default. `None` when no policies path is configured.
pub fn default_tests_path(sources: &Sources) -> Option<PathBuf> {
    if sources.is_embedded() {
        return Some(PathBuf::from("policies").join("tests"));
    }
    let policies = sources.policies.as_deref()?;
    if policies.is_dir() {
        Some(policies.join("tests"))
    } else {
        Some(policies.parent().unwrap_or(Path::new("")).join("tests"))
    }
}

pub fn run(args: &TestArgs) -> u8 {
    let sources = args.sources.sources();
    let paths = if args.tests.is_empty() {
        match default_tests_path(&sources) {
            Some(path) if path.exists() => vec![path],
            Some(path) => {
                eprintln!(
                    "error: no fixtures: `{}` does not exist (pass --tests PATH)",
                    path.display()
                );
                return exit::USAGE;
            }
            None => {
                eprintln!("error: no fixtures: pass --tests PATH (or --policies)");
                return exit::USAGE;
            }
        }
    } else {
        args.tests.clone()
    };
    // A fixture's entities are the author's test data, not a caller's
    // claim about stored entities: they describe whatever the case needs.
    let options = crate::engine::LoadOptions {
        request_entities: crate::engine::RequestEntitiesMode::Replace,
        ..args.sources.options()
    };
    let snapshot = match loader::load(&sources, options) {
        Ok((snapshot, report)) => {
            for warning in &report.warnings {
                eprintln!("warning: {warning}");
            }
            snapshot
        }
        Err(error) => {
            eprint!("{}", error.render());
            eprintln!("error: the policy set could not be loaded");
            return exit::INVALID;
        }
    };
    let report = match run_fixtures(&snapshot, &paths) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("error: {error}");
            return exit::USAGE;
        }
    };
    let summary = summary(&report);
    if let Some(path) = &args.junit
        && let Err(error) = std::fs::write(path, summary.junit())
    {
        eprintln!("error: cannot write `{}`: {error}", path.display());
        return exit::FAILURE;
    }
    // A reader that stops early (`| head`) is not an error of the run.
    let mut out = std::io::stdout().lock();
    let _ = match args.format {
        OutputFormat::Text => {
            let mut text = String::new();
            for failure in &report.failures {
                text.push_str(&format!("FAIL {failure}\n"));
            }
            text.push_str(&format!(
                "{}\n{} passed, {} failed\n",
                summary.coverage_line(),
                report.passed,
                report.failed()
            ));
            out.write_all(text.as_bytes())
        }
        OutputFormat::Json => writeln!(out, "{}", summary.json()),
    };
    if report.all_passed() {
        exit::OK
    } else {
        exit::DENY
    }
}

/// The report as the report writers take it.
pub fn summary(report: &FixtureReport) -> Summary {
    let decision = |allowed: bool| if allowed { "allow" } else { "deny" };
    let cases = report
        .results
        .iter()
        .map(|result| {
            let (got_decision, got_reasons, errors, request_error) = match &result.actual {
                Actual::Decision { outcome, errors } => (
                    Some(decision(outcome.allowed)),
                    outcome.reasons.iter().cloned().collect(),
                    errors.clone(),
                    None,
                ),
                Actual::Rejected(message) => (None, Vec::new(), Vec::new(), Some(message.clone())),
            };
            CaseReport {
                file: result.file.clone(),
                name: result.case.clone(),
                passed: result.passed,
                expected_decision: decision(result.expected.allowed),
                expected_reasons: result.expected.reasons.iter().cloned().collect(),
                got_decision,
                got_reasons,
                errors,
                request_error,
            }
        })
        .collect();
    Summary {
        files: report.files.clone(),
        passed: report.passed,
        failed: report.failed(),
        cases,
        never_exercised: report.never_exercised.clone(),
    }
}
