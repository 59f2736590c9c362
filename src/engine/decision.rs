//! What the engine answers: a decision that carries its own diagnostics.

use std::sync::Arc;
use std::time::Duration;

/// The outcome of one authorization check. Errors in policy evaluation never
/// produce an allow on their own: Cedar skips an erroring policy, so a
/// decision is allow only when some permit was satisfied and no forbid was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Ids of the policies that determined the decision.
    pub reasons: Vec<String>,
    /// Policies whose evaluation errored, with Cedar's message.
    pub errors: Vec<PolicyEvaluationError>,
    /// Unique per decision (UUIDv7: time-ordered).
    pub decision_id: String,
    pub policy_revision: Arc<str>,
    pub data_revision: Arc<str>,
    /// Time spent evaluating (parsing included), for metrics and logs.
    pub elapsed: Duration,
    /// Answered from the snapshot's decision cache.
    pub cached: bool,
    /// What synced entity data was evaluated against.
    pub slice: SliceUse,
    /// The uids of the entities the request itself supplied
    /// (`entities_json`), in its order: the decision log records them.
    pub request_entities: Vec<String>,
}

/// Whether a decision over synced entity data built its slice of the store
/// or took a prepared one from the slice cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SliceUse {
    /// No slice: file data without request entities, a decision-cache hit,
    /// or a request refused before evaluation.
    #[default]
    None,
    /// Built for this decision (and cached, when the cache is on).
    Built,
    /// A prepared slice, still exact for this snapshot's store.
    Cached,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyEvaluationError {
    pub policy_id: String,
    pub message: String,
}
