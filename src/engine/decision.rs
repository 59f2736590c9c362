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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyEvaluationError {
    pub policy_id: String,
    pub message: String,
}
