//! The settings a load and a decision take (`LoadOptions`), with their
//! modes, limits and defaults: plain data at the bottom of the engine, so
//! the snapshot that carries them and the loader that fills them both
//! import them from here (neither imports the other for them).

use super::hierarchy::DEFAULT_MAX_HIERARCHY_DEPTH;

/// Switches that change what a load accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Require policies to pass strict validation against the schema.
    pub validate_policies: bool,
    /// Validate every request against the schema.
    pub validate_requests: bool,
    /// What a policy evaluation error does to the decision.
    pub on_evaluation_error: OnEvaluationError,
    /// Decisions remembered per snapshot (0 turns the cache off).
    pub decision_cache_capacity: u64,
    /// Entities held in prepared slices of synced data, across all cached
    /// slices (0 turns the slice cache off).
    pub slice_cache_capacity: u64,
    /// How a request's own entities combine with the stored ones.
    pub request_entities: RequestEntitiesMode,
    /// Bounds on requests and on every entity hierarchy.
    pub limits: RequestLimits,
    /// Policy count from which decisions evaluate only the policies whose
    /// scope can match (the policy index); 0 indexes every set.
    pub policy_index_min: usize,
    /// Serve a set with no policies (everything denied). Off by default: an
    /// unmounted ConfigMap must not turn every answer into deny silently.
    pub allow_empty_policies: bool,
}

/// The default size of the per-snapshot decision cache.
pub const DEFAULT_DECISION_CACHE_CAPACITY: u64 = 65_536;

/// The default size of the slice cache, in entities: about 2,000 slices of
/// a user in 10 groups of a 3-level hierarchy (~33 entities each), ~90 MB
/// (`benches/identity.rs` measured 45.6 KB resident per such slice).
pub const DEFAULT_SLICE_CACHE_CAPACITY: u64 = 65_536;

/// What a policy that errors during evaluation does to a decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnEvaluationError {
    /// Cedar's decision, except that an erroring forbid denies: an erroring
    /// permit is skipped (it grants nothing, so skipping it cannot let a
    /// request through that another policy does not allow), while a
    /// guardrail that could not be evaluated must not let a request
    /// through. The default.
    #[default]
    SkipPermit,
    /// Fail closed on any error: an allow reached while any policy errored
    /// becomes a deny, even when the erroring policy was a permit.
    Deny,
    /// Cedar's own semantics: the erroring policy is skipped and the others
    /// decide. An erroring forbid then no longer blocks a satisfied permit.
    SkipPolicy,
}

impl std::str::FromStr for OnEvaluationError {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "skip-permit" => Ok(OnEvaluationError::SkipPermit),
            "deny" => Ok(OnEvaluationError::Deny),
            "skip-policy" => Ok(OnEvaluationError::SkipPolicy),
            other => Err(format!(
                "`{other}` is not an evaluation error mode; expected `skip-permit`, `deny` or `skip-policy`"
            )),
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            validate_policies: true,
            validate_requests: true,
            on_evaluation_error: OnEvaluationError::default(),
            decision_cache_capacity: DEFAULT_DECISION_CACHE_CAPACITY,
            slice_cache_capacity: DEFAULT_SLICE_CACHE_CAPACITY,
            request_entities: RequestEntitiesMode::default(),
            limits: RequestLimits::default(),
            policy_index_min: DEFAULT_POLICY_INDEX_MIN,
            allow_empty_policies: false,
        }
    }
}

/// The default of `max_request_entities`.
pub const DEFAULT_MAX_REQUEST_ENTITIES: usize = 1_000;

/// How a request's entities combine with the stored ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RequestEntitiesMode {
    /// A request may add entities the store does not hold (a resource the
    /// caller describes, a context entity). It may not describe a stored
    /// entity, an action, or the request's principal, and an entity it adds
    /// may not be a parent of a stored entity. The default.
    #[default]
    Add,
    /// A request's copy of a stored entity only adds the attributes the
    /// stored one lacks, and adds its parents to the stored parents (the
    /// adapters' fill-in merge). Actions stay the schema's.
    Merge,
    /// A request's copy replaces the stored one for this decision: for
    /// deployments with no identity store, where the caller is the source.
    Replace,
}

impl RequestEntitiesMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestEntitiesMode::Add => "add",
            RequestEntitiesMode::Merge => "merge",
            RequestEntitiesMode::Replace => "replace",
        }
    }
}

impl std::str::FromStr for RequestEntitiesMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "add" => Ok(RequestEntitiesMode::Add),
            "merge" => Ok(RequestEntitiesMode::Merge),
            "replace" => Ok(RequestEntitiesMode::Replace),
            other => Err(format!(
                "`{other}` is not a request entities mode; expected `add`, `merge` or `replace`"
            )),
        }
    }
}

/// What one request may carry, and how deep any hierarchy may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Entities in one request's `entities_json`.
    pub max_request_entities: usize,
    /// The longest chain of parents any entity may have, wherever it comes
    /// from (request, entities file, identity store).
    pub max_hierarchy_depth: u32,
    /// (entity, ancestor) pairs among one request's entities: the size of
    /// the closure Cedar computes over them.
    pub max_request_ancestors: usize,
    /// Threads that decide requests carrying their own entities (the
    /// adapters' bounded pool; the engine itself runs where it is called).
    pub heavy_workers: usize,
    /// Such requests that may wait for one of those threads; more are shed.
    pub heavy_queue: usize,
}

/// The default of `max_request_ancestors`: a thousand resources, each in
/// a folder path ten deep, fit.
pub const DEFAULT_MAX_REQUEST_ANCESTORS: usize = 10_000;

/// The most `max_request_entities` may be set to: the closure count takes
/// a bit per pair of a request's entities (12.5 MB at this ceiling).
pub const MAX_REQUEST_ENTITIES_CEILING: usize = 10_000;

/// The default of `heavy_queue`.
pub const DEFAULT_HEAVY_QUEUE: usize = 64;

/// The default of `heavy_workers`: half the cores (at least one), so that
/// heavy requests leave the other half to ordinary ones.
pub fn default_heavy_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| (cores.get() / 2).max(1))
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_request_entities: DEFAULT_MAX_REQUEST_ENTITIES,
            max_hierarchy_depth: DEFAULT_MAX_HIERARCHY_DEPTH,
            max_request_ancestors: DEFAULT_MAX_REQUEST_ANCESTORS,
            heavy_workers: default_heavy_workers(),
            heavy_queue: DEFAULT_HEAVY_QUEUE,
        }
    }
}

/// From this many policies on, decisions go through the index; below it the
/// whole set is evaluated. The smallest multi-tenant set measured, 23
/// policies, already gained (27 against 37 µs per uncached decision,
/// `benches/policy_index.rs`, "threshold"); smaller sets were not measured
/// and keep Cedar's plain path (the embedded example set, 20 policies,
/// among them).
pub const DEFAULT_POLICY_INDEX_MIN: usize = 23;
