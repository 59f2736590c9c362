//! The engine's part of `arbiter serve`: validation, the evaluation-error
//! mode, the caches, what a request's own entities may do, and the bounds
//! on requests and hierarchies. Resolves into [`LoadOptions`].

use crate::engine::loader::{DEFAULT_DECISION_CACHE_CAPACITY, DEFAULT_SLICE_CACHE_CAPACITY};
use crate::engine::{
    DEFAULT_HEAVY_QUEUE, DEFAULT_MAX_HIERARCHY_DEPTH, DEFAULT_MAX_REQUEST_ANCESTORS,
    DEFAULT_MAX_REQUEST_ENTITIES, DEFAULT_POLICY_INDEX_MIN, LoadOptions,
    MAX_HIERARCHY_DEPTH_CEILING, MAX_REQUEST_ENTITIES_CEILING, OnEvaluationError,
    RequestEntitiesMode, RequestLimits, default_heavy_workers,
};

use super::error::ConfigError;
use super::file::ConfigFile;

/// How policies are validated and decisions made, and the limits on them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EngineArgs {
    /// Do not require policies to pass strict validation against the schema.
    #[arg(long, env = "ARBITER_NO_VALIDATE")]
    pub no_validate: bool,
    /// Do not validate requests against the schema.
    #[arg(long, env = "ARBITER_NO_REQUEST_VALIDATION")]
    pub no_request_validation: bool,
    /// What a policy evaluation error does: `skip-permit` (the default:
    /// Cedar's decision, except that an erroring forbid denies), `deny` (any
    /// error denies) or `skip-policy` (Cedar's semantics: the erroring policy
    /// is ignored and the others decide).
    #[arg(long, env = "ARBITER_ON_EVALUATION_ERROR", value_name = "MODE")]
    pub on_evaluation_error: Option<OnEvaluationError>,
    /// Decisions remembered per policy/data snapshot; 0 turns the cache off
    /// [default: 65536]. A new snapshot always starts with an empty cache.
    #[arg(long, env = "ARBITER_DECISION_CACHE_SIZE", value_name = "N")]
    pub decision_cache_size: Option<u64>,
    /// Entities held in prepared slices of identity-synced data (a slice is
    /// what one principal/resource pair's decisions evaluate against,
    /// reused until an entity in it changes); 0 turns it off
    /// [default: 65536; a slice of ~33 entities takes ~45 KB].
    #[arg(long, env = "ARBITER_SLICE_CACHE_ENTITIES", value_name = "N")]
    pub slice_cache_entities: Option<u64>,
    /// Serve a policy set with no policies (everything denied); without it
    /// such a set is refused at start and on reload (the last good set
    /// keeps serving).
    #[arg(long, env = "ARBITER_ALLOW_EMPTY_POLICIES")]
    pub allow_empty_policies: bool,
    /// What a request's own entities (`entities_json`) may do: `add`
    /// entities the store does not hold (the default), `merge` (fill in
    /// attributes a stored entity lacks, add parents) or `replace` stored
    /// ones for the decision (deployments with no identity store).
    #[arg(long, env = "ARBITER_REQUEST_ENTITIES", value_name = "MODE")]
    pub request_entities: Option<RequestEntitiesMode>,
    /// Entities one request's `entities_json` may hold [default: 1000].
    #[arg(long, env = "ARBITER_MAX_REQUEST_ENTITIES", value_name = "N")]
    pub max_request_entities: Option<usize>,
    /// The longest chain of parents an entity may have, from any source
    /// (request, entities file, identity store) [default: 32, at most 256].
    #[arg(long, env = "ARBITER_MAX_HIERARCHY_DEPTH", value_name = "N")]
    pub max_hierarchy_depth: Option<u32>,
    /// (entity, ancestor) pairs among one request's entities [default: 10000].
    #[arg(long, env = "ARBITER_MAX_REQUEST_ANCESTORS", value_name = "N")]
    pub max_request_ancestors: Option<usize>,
    /// Threads that decide requests carrying their own entities
    /// [default: half the cores, at least 1].
    #[arg(long, env = "ARBITER_HEAVY_WORKERS", value_name = "N")]
    pub heavy_workers: Option<usize>,
    /// Such requests that may wait for a thread; more are answered
    /// RESOURCE_EXHAUSTED [default: 64].
    #[arg(long, env = "ARBITER_HEAVY_QUEUE", value_name = "N")]
    pub heavy_queue: Option<usize>,
}

impl EngineArgs {
    /// Flags (and env) over the file's top-level keys and `[limits]`.
    pub fn resolve(&self, file: &ConfigFile) -> Result<LoadOptions, ConfigError> {
        let on_evaluation_error = match (self.on_evaluation_error, &file.on_evaluation_error) {
            (Some(mode), _) => mode,
            (None, Some(text)) => text.parse().map_err(|message| ConfigError::Invalid {
                key: "on_evaluation_error",
                message,
            })?,
            (None, None) => OnEvaluationError::default(),
        };
        let request_entities = match (self.request_entities, &file.request_entities) {
            (Some(mode), _) => mode,
            (None, Some(text)) => text.parse().map_err(|message| ConfigError::Invalid {
                key: "request_entities",
                message,
            })?,
            (None, None) => RequestEntitiesMode::default(),
        };
        Ok(LoadOptions {
            validate_policies: !(self.no_validate || file.no_validate.unwrap_or(false)),
            validate_requests: !(self.no_request_validation
                || file.no_request_validation.unwrap_or(false)),
            on_evaluation_error,
            decision_cache_capacity: self
                .decision_cache_size
                .or(file.decision_cache_size)
                .unwrap_or(DEFAULT_DECISION_CACHE_CAPACITY),
            slice_cache_capacity: self
                .slice_cache_entities
                .or(file.slice_cache_entities)
                .unwrap_or(DEFAULT_SLICE_CACHE_CAPACITY),
            request_entities,
            limits: self.limits(file)?,
            policy_index_min: DEFAULT_POLICY_INDEX_MIN,
            allow_empty_policies: self.allow_empty_policies
                || file.allow_empty_policies.unwrap_or(false),
        })
    }

    fn limits(&self, file: &ConfigFile) -> Result<RequestLimits, ConfigError> {
        let from_file = file.limits.as_ref();
        let limits = RequestLimits {
            max_request_entities: self
                .max_request_entities
                .or(from_file.and_then(|l| l.max_request_entities))
                .unwrap_or(DEFAULT_MAX_REQUEST_ENTITIES),
            max_hierarchy_depth: self
                .max_hierarchy_depth
                .or(from_file.and_then(|l| l.max_hierarchy_depth))
                .unwrap_or(DEFAULT_MAX_HIERARCHY_DEPTH),
            max_request_ancestors: self
                .max_request_ancestors
                .or(from_file.and_then(|l| l.max_request_ancestors))
                .unwrap_or(DEFAULT_MAX_REQUEST_ANCESTORS),
            heavy_workers: self
                .heavy_workers
                .or(from_file.and_then(|l| l.heavy_workers))
                .unwrap_or_else(default_heavy_workers),
            heavy_queue: self
                .heavy_queue
                .or(from_file.and_then(|l| l.heavy_queue))
                .unwrap_or(DEFAULT_HEAVY_QUEUE),
        };
        if limits.heavy_workers == 0 {
            return Err(ConfigError::Zero {
                key: "heavy_workers",
            });
        }
        if limits.max_request_entities == 0 {
            return Err(ConfigError::Zero {
                key: "max_request_entities",
            });
        }
        if limits.max_request_entities > MAX_REQUEST_ENTITIES_CEILING {
            return Err(ConfigError::Invalid {
                key: "max_request_entities",
                message: format!(
                    "{} is more than {MAX_REQUEST_ENTITIES_CEILING}",
                    limits.max_request_entities
                ),
            });
        }
        if limits.max_hierarchy_depth > MAX_HIERARCHY_DEPTH_CEILING {
            return Err(ConfigError::Invalid {
                key: "max_hierarchy_depth",
                message: format!(
                    "{} is more than {MAX_HIERARCHY_DEPTH_CEILING}, the most Cedar's hierarchy walk is allowed",
                    limits.max_hierarchy_depth
                ),
            });
        }
        Ok(limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitsFile;

    #[test]
    fn switches_are_on_when_either_the_flag_or_the_file_says_so() {
        // A boolean flag can only be given, not negated: the file's `true`
        // stands when the flag is absent.
        let file = ConfigFile {
            no_validate: Some(true),
            allow_empty_policies: Some(true),
            ..ConfigFile::default()
        };
        let options = EngineArgs::default().resolve(&file).unwrap();
        assert!(!options.validate_policies);
        assert!(options.validate_requests);
        assert!(options.allow_empty_policies);
        let flag = EngineArgs {
            no_request_validation: true,
            ..EngineArgs::default()
        };
        let options = flag.resolve(&ConfigFile::default()).unwrap();
        assert!(options.validate_policies);
        assert!(!options.validate_requests);
        assert!(!options.allow_empty_policies);
    }

    #[test]
    fn modes_from_the_flag_else_parsed_from_the_file() {
        let file = ConfigFile {
            on_evaluation_error: Some("deny".into()),
            request_entities: Some("merge".into()),
            ..ConfigFile::default()
        };
        let options = EngineArgs::default().resolve(&file).unwrap();
        assert_eq!(options.on_evaluation_error, OnEvaluationError::Deny);
        assert_eq!(options.request_entities, RequestEntitiesMode::Merge);
        let flags = EngineArgs {
            on_evaluation_error: Some(OnEvaluationError::SkipPolicy),
            request_entities: Some(RequestEntitiesMode::Replace),
            ..EngineArgs::default()
        };
        let options = flags.resolve(&file).unwrap();
        assert_eq!(options.on_evaluation_error, OnEvaluationError::SkipPolicy);
        assert_eq!(options.request_entities, RequestEntitiesMode::Replace);
        // A bad word in the file names its key; a flag makes it moot.
        let bad = ConfigFile {
            on_evaluation_error: Some("allow".into()),
            ..ConfigFile::default()
        };
        let error = EngineArgs::default().resolve(&bad).unwrap_err().to_string();
        assert!(
            error.starts_with("invalid `on_evaluation_error`"),
            "{error}"
        );
        assert!(flags.resolve(&bad).is_ok());
        let defaults = EngineArgs::default()
            .resolve(&ConfigFile::default())
            .unwrap();
        assert_eq!(defaults.on_evaluation_error, OnEvaluationError::default());
        assert_eq!(defaults.request_entities, RequestEntitiesMode::default());
    }

    #[test]
    fn each_limit_from_its_flag_else_the_limits_table_else_its_default() {
        let file = ConfigFile {
            decision_cache_size: Some(10),
            limits: Some(LimitsFile {
                max_request_entities: Some(50),
                max_hierarchy_depth: Some(8),
                heavy_queue: Some(3),
                ..LimitsFile::default()
            }),
            ..ConfigFile::default()
        };
        let flags = EngineArgs {
            max_hierarchy_depth: Some(12),
            heavy_workers: Some(2),
            decision_cache_size: Some(0),
            ..EngineArgs::default()
        };
        let options = flags.resolve(&file).unwrap();
        assert_eq!(options.decision_cache_capacity, 0);
        assert_eq!(options.slice_cache_capacity, DEFAULT_SLICE_CACHE_CAPACITY);
        let limits = options.limits;
        assert_eq!(limits.max_request_entities, 50);
        assert_eq!(limits.max_hierarchy_depth, 12);
        assert_eq!(limits.max_request_ancestors, DEFAULT_MAX_REQUEST_ANCESTORS);
        assert_eq!(limits.heavy_workers, 2);
        assert_eq!(limits.heavy_queue, 3);
    }

    #[test]
    fn limits_out_of_range_are_refused_by_name() {
        let refused = |args: EngineArgs| {
            args.resolve(&ConfigFile::default())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            refused(EngineArgs {
                heavy_workers: Some(0),
                ..EngineArgs::default()
            }),
            "`heavy_workers` must be greater than zero"
        );
        assert_eq!(
            refused(EngineArgs {
                max_request_entities: Some(0),
                ..EngineArgs::default()
            }),
            "`max_request_entities` must be greater than zero"
        );
        assert!(
            refused(EngineArgs {
                max_request_entities: Some(MAX_REQUEST_ENTITIES_CEILING + 1),
                ..EngineArgs::default()
            })
            .starts_with("invalid `max_request_entities`")
        );
        assert!(
            refused(EngineArgs {
                max_hierarchy_depth: Some(MAX_HIERARCHY_DEPTH_CEILING + 1),
                ..EngineArgs::default()
            })
            .contains("the most Cedar's hierarchy walk is allowed")
        );
    }
}
