//! `arbiter fmt`: formats `.cedar` files with `cedar-policy-formatter`
//! (line width 80, indent 2).
//!
//! Without `--check` changed files are rewritten in place (through a
//! temporary file and a rename, so a hot-reloading server never sees a half
//! written file) and listed; with `--check` the files that would change are
//! listed and the exit code is 1 if there are any. A parse error is printed
//! as `file:line:column: message` and exits 3. Formatting never changes the
//! meaning: the result is parsed again and every policy and template must be
//! equal (as Cedar JSON) to the original, otherwise nothing is written and
//! the exit code is 1.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::PolicySet;
use cedar_policy_formatter::{Config, policies_str_to_pretty};
use miette::Diagnostic;

use super::exit;
use crate::engine::loader::line_column;

#[derive(Debug, Clone, clap::Args)]
pub struct FmtArgs {
    /// Do not write: list the files that would change, exit 1 if any.
    #[arg(long)]
    pub check: bool,
    /// `.cedar` files, or directories searched recursively for `.cedar` files.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// One parse problem, located where Cedar gives a location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseProblem {
    /// 1-based line and column (in characters).
    pub location: Option<(usize, usize)>,
    pub message: String,
}

/// Why a text could not be formatted.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("the policies do not parse")]
    Parse(Vec<ParseProblem>),
    #[error("the formatter failed: {0}")]
    Formatter(String),
    #[error("formatting would change the policies, refusing to write: {0}")]
    MeaningChanged(String),
}

/// Formats Cedar policy text; the result is verified to hold the same
/// policies and templates (same ids, equal Cedar JSON) as the input.
pub fn format_policies(text: &str) -> Result<String, FormatError> {
    let before = parse(text).map_err(FormatError::Parse)?;
    // Nothing to format (empty, or comments only): leave the text alone, the
    // formatter would only prepend a blank line.
    if before.policies().next().is_none() && before.templates().next().is_none() {
        return Ok(text.to_owned());
    }
    let config = Config {
        line_width: 80,
        indent_width: 2,
    };
    let formatted = policies_str_to_pretty(text, &config)
        .map_err(|report| FormatError::Formatter(format!("{report:?}")))?;
    let after = parse(&formatted).map_err(|problems| {
        let messages: Vec<String> = problems.into_iter().map(|p| p.message).collect();
        FormatError::MeaningChanged(format!(
            "the formatted text does not parse: {}",
            messages.join("; ")
        ))
    })?;
    same_meaning(&before, &after).map_err(FormatError::MeaningChanged)?;
    Ok(formatted)
}

fn parse(text: &str) -> Result<PolicySet, Vec<ParseProblem>> {
    PolicySet::from_str(text).map_err(|errors| {
        errors
            .iter()
            .map(|error| {
                let mut message = error.to_string();
                if let Some(help) = error.help() {
                    message.push_str(&format!(" (help: {help})"));
                }
                let location = error
                    .labels()
                    .and_then(|mut labels| labels.next())
                    .map(|label| line_column(text, label.offset()));
                ParseProblem { location, message }
            })
            .collect()
    })
}

/// Same number of policies and templates, and each one's Cedar JSON equal.
fn same_meaning(before: &PolicySet, after: &PolicySet) -> Result<(), String> {
    let count = |set: &PolicySet| (set.policies().count(), set.templates().count());
    if count(before) != count(after) {
        return Err(format!(
            "{:?} (policies, templates) became {:?}",
            count(before),
            count(after)
        ));
    }
    for policy in before.policies() {
        let id = policy.id();
        let original = policy.to_json().map_err(|error| format!("{id}: {error}"))?;
        let formatted = after
            .policy(id)
            .ok_or_else(|| format!("policy {id} is missing after formatting"))?
            .to_json()
            .map_err(|error| format!("{id}: {error}"))?;
        if original != formatted {
            return Err(format!("policy {id} changed"));
        }
    }
    for template in before.templates() {
        let id = template.id();
        let original = template
            .to_json()
            .map_err(|error| format!("{id}: {error}"))?;
        let formatted = after
            .template(id)
            .ok_or_else(|| format!("template {id} is missing after formatting"))?
            .to_json()
            .map_err(|error| format!("{id}: {error}"))?;
        if original != formatted {
            return Err(format!("template {id} changed"));
        }
    }
    Ok(())
}

/// A path given to `fmt` that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct PathError {
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

/// The `.cedar` files named by `paths`: files as given, directories searched
/// recursively (sorted; Kubernetes `..data` entries skipped).
pub fn cedar_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, PathError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found = Vec::new();
            collect_cedar(path, &mut found)?;
            found.sort();
            files.extend(found);
        } else {
            // Surface a missing path as an error here rather than later.
            std::fs::metadata(path).map_err(|source| PathError {
                path: path.display().to_string(),
                source,
            })?;
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn collect_cedar(dir: &Path, found: &mut Vec<PathBuf>) -> Result<(), PathError> {
    let path_error = |source| PathError {
        path: dir.display().to_string(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(path_error)? {
        let entry = entry.map_err(path_error)?;
        if entry.file_name().to_string_lossy().starts_with("..") {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            collect_cedar(&path, found)?;
        } else if path.extension().is_some_and(|ext| ext == "cedar") {
            found.push(path);
        }
    }
    Ok(())
}

/// Replaces `path`'s contents through a temporary file in the same directory
/// and a rename, keeping the permissions. A symlink is followed, so the file
/// it points to is replaced.
fn write_in_place(path: &Path, text: &str) -> std::io::Result<()> {
    let target = std::fs::canonicalize(path)?;
    let permissions = std::fs::metadata(&target)?.permissions();
    let file_name = target
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = target.with_file_name(format!(".{file_name}.arbiter-fmt.tmp"));
    let result = std::fs::write(&temporary, text)
        .and_then(|()| std::fs::set_permissions(&temporary, permissions))
        .and_then(|()| std::fs::rename(&temporary, &target));
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

pub fn run(args: &FmtArgs) -> u8 {
    let files = match cedar_files(&args.paths) {
        Ok(files) => files,
        Err(error) => {
            eprintln!("error: {error}");
            return exit::USAGE;
        }
    };
    // The most severe outcome wins: usage, then invalid, then failure.
    let mut code = exit::OK;
    let mut raise = |new: u8| {
        let rank = |code: u8| match code {
            exit::USAGE => 3,
            exit::INVALID => 2,
            exit::FAILURE => 1,
            _ => 0,
        };
        if rank(new) > rank(code) {
            code = new;
        }
    };
    for path in &files {
        let name = path.display();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) => {
                eprintln!("error: {name}: cannot read: {error}");
                raise(exit::USAGE);
                continue;
            }
        };
        let formatted = match format_policies(&text) {
            Ok(formatted) => formatted,
            Err(FormatError::Parse(problems)) => {
                for problem in problems {
                    match problem.location {
                        Some((line, column)) => {
                            eprintln!("{name}:{line}:{column}: {}", problem.message)
                        }
                        None => eprintln!("{name}: {}", problem.message),
                    }
                }
                raise(exit::INVALID);
                continue;
            }
            Err(error) => {
                eprintln!("error: {name}: {error}");
                raise(exit::FAILURE);
                continue;
            }
        };
        if formatted == text {
            continue;
        }
        if args.check {
            println!("{name}");
            raise(exit::FAILURE);
        } else {
            match write_in_place(path, &formatted) {
                Ok(()) => println!("{name}"),
                Err(error) => {
                    eprintln!("error: {name}: cannot write: {error}");
                    raise(exit::FAILURE);
                }
            }
        }
    }
    code
}
