//! The `arbiter` command line: one file per subcommand, each a library
//! function that returns an exit code. All of them load policies through
//! [`crate::engine::loader`], exactly as the server does.

pub mod check;
pub mod fmt;
pub mod serve;
pub mod tail;
pub mod test;
pub mod test_report;
pub mod validate;

use std::path::PathBuf;

use crate::engine::Sources;

/// Exit codes shared by the subcommands.
pub mod exit {
    /// Success (and, for `check`, an allow).
    pub const OK: u8 = 0;
    /// A failure of the tool or its environment (cannot bind, cannot read).
    pub const FAILURE: u8 = 1;
    /// `check`: the decision was deny. `test`: some case did not match.
    pub const DENY: u8 = 2;
    /// Policies, schema or entities are invalid.
    pub const INVALID: u8 = 3;
    /// The command line itself is wrong.
    pub const USAGE: u8 = 64;
}

/// Where to load policies from; with no flag at all, the embedded example.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SourceArgs {
    /// A `.cedar` file, or a directory searched recursively for `.cedar` files.
    #[arg(long, value_name = "PATH")]
    pub policies: Option<PathBuf>,
    /// Cedar schema (`.cedarschema`, or JSON in a `.json` file).
    #[arg(long, value_name = "PATH")]
    pub schema: Option<PathBuf>,
    /// Cedar entities JSON.
    #[arg(long, value_name = "PATH")]
    pub entities: Option<PathBuf>,
    /// Template-linked policies: the Cedar CLI's JSON array of
    /// `{"template_id", "link_id", "args": {"?principal": "T::\"id\""}}`.
    #[arg(long, env = "ARBITER_TEMPLATE_LINKS", value_name = "FILE")]
    pub template_links: Option<PathBuf>,
    /// Do not require policies to pass strict validation against the schema.
    #[arg(long)]
    pub no_validate: bool,
    /// The longest chain of parents an entity may have, as `serve` takes it
    /// [default: 32, at most 256].
    #[arg(long, env = "ARBITER_MAX_HIERARCHY_DEPTH", value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=crate::engine::MAX_HIERARCHY_DEPTH_CEILING as i64))]
    pub max_hierarchy_depth: Option<u32>,
}

impl SourceArgs {
    pub fn sources(&self) -> Sources {
        Sources {
            policies: self.policies.clone(),
            schema: self.schema.clone(),
            entities: self.entities.clone(),
            template_links: self.template_links.clone(),
            tests: None,
        }
    }

    pub fn options(&self) -> crate::engine::LoadOptions {
        crate::engine::LoadOptions {
            validate_policies: !self.no_validate,
            validate_requests: true,
            on_evaluation_error: crate::engine::OnEvaluationError::default(),
            // One-shot commands gain nothing from remembering answers.
            decision_cache_capacity: 0,
            slice_cache_capacity: 0,
            policy_index_min: crate::engine::DEFAULT_POLICY_INDEX_MIN,
            limits: crate::engine::RequestLimits {
                max_hierarchy_depth: self
                    .max_hierarchy_depth
                    .unwrap_or(crate::engine::DEFAULT_MAX_HIERARCHY_DEPTH),
                ..crate::engine::RequestLimits::default()
            },
            ..crate::engine::LoadOptions::default()
        }
    }
}
