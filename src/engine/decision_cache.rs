//! A bounded cache of decisions, owned by one [`Snapshot`](super::Snapshot).
//!
//! A sidecar sees the same question many times (the same user, action,
//! resource and context). Evaluating Cedar again gives the same answer as
//! long as the policies and the data are the same, and they are: the cache
//! lives inside the immutable snapshot, so publishing a new snapshot starts
//! an empty cache and a stale answer cannot outlive the state it came from.
//! Only well-formed requests without request-scoped entities are cached;
//! every answer still gets its own decision id.

use std::sync::Arc;

use super::CheckInput;
use super::decision::PolicyEvaluationError;

/// The part of a decision that depends only on the request and the snapshot.
#[derive(Debug)]
pub(crate) struct CachedOutcome {
    pub allowed: bool,
    pub reasons: Vec<String>,
    pub errors: Vec<PolicyEvaluationError>,
}

#[derive(Debug)]
pub(crate) struct DecisionCache {
    entries: moka::sync::Cache<Box<str>, Arc<CachedOutcome>>,
}

impl DecisionCache {
    /// `None` when `capacity` is zero (caching off).
    pub fn new(capacity: u64) -> Option<Self> {
        (capacity > 0).then(|| DecisionCache {
            entries: moka::sync::Cache::new(capacity),
        })
    }

    /// The cache key of a request, or `None` when it must not be cached.
    pub fn key(input: &CheckInput<'_>) -> Option<Box<str>> {
        if !input.entities_json.trim().is_empty() {
            return None;
        }
        let (principal, action, resource) = (input.principal?, input.action?, input.resource?);
        let parts = [
            principal.type_name,
            principal.id,
            action.type_name,
            action.id,
            resource.type_name,
            resource.id,
            input.context_json,
        ];
        let mut key = String::with_capacity(parts.iter().map(|p| p.len() + 9).sum());
        // Length-prefixed, so no two different requests share a key.
        for part in parts {
            key.push_str(&part.len().to_string());
            key.push(':');
            key.push_str(part);
        }
        Some(key.into_boxed_str())
    }

    pub fn get(&self, key: &str) -> Option<Arc<CachedOutcome>> {
        self.entries.get(key)
    }

    pub fn insert(&self, key: Box<str>, outcome: CachedOutcome) {
        self.entries.insert(key, Arc::new(outcome));
    }
}
