//! `arbiter test`: runs data-driven decision fixtures against a policy set,
//! through the same loader and engine the server uses.
//!
//! A fixture file is JSON:
//!
//! ```json
//! { "description": "...",
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
//! `context` and `entities` are optional; an entity uid may also be written
//! as the string `Type::"id"`. A case passes when the decision and the *set*
//! of reasons (determining policy ids) both match.
//!
//! Where fixtures are found when `--tests` is not given: the `tests/`
//! directory next to the policies (`P/tests` for a directory `P`, `tests/`
//! beside a single policy file), and for the embedded default
//! `policies/tests` relative to the current directory.

use std::path::{Path, PathBuf};

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
    match run_fixtures(&snapshot, &paths) {
        Ok(report) => {
            for failure in &report.failures {
                println!("FAIL {failure}");
            }
            println!("{} passed, {} failed", report.passed, report.failed());
            if report.all_passed() {
                exit::OK
            } else {
                exit::DENY
            }
        }
        Err(error) => {
            eprintln!("error: {error}");
            exit::USAGE
        }
    }
}
