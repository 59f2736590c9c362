//! A bounded cache of decisions.
//!
//! A sidecar sees the same question many times (the same user, action,
//! resource and context). Evaluating Cedar again gives the same answer as
//! long as the policies and the data are the same. Every
//! [`Snapshot`](super::Snapshot) has its own generation, and an answer is
//! cached under the generation of the snapshot it was decided against, so a
//! stale answer can never be served from a newer state. With synced data a
//! snapshot is published per change, so the cache is shared by the
//! snapshots of one policy set (a new one with every policy publish) and
//! emptied (`clear`) by each data publish: a new `moka` cache per publish
//! made applying one change cost twice as much (identity bench,
//! `server_caches`; ARCHITECTURE.md).
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

/// The largest request (uids and context text) whose answer is cached.
pub(crate) const MAX_KEY_BYTES: usize = 1024;

#[derive(Debug)]
pub(crate) struct DecisionCache {
    /// foldhash, not SipHash: keys are up to a KiB of request text, hashed
    /// on every decision (with the token cache, an ext_authz request's two
    /// lookups went from ~4,400 to ~1,400 instructions, callgrind);
    /// foldhash's per-cache random seed still keeps a caller from choosing
    /// colliding keys in advance.
    entries: moka::sync::Cache<DecisionKey, Arc<CachedOutcome>, foldhash::fast::RandomState>,
}

/// A request's key, under the generation of the snapshot that answers it.
pub(crate) type DecisionKey = (u64, Box<str>);

impl DecisionCache {
    /// `None` when `capacity` is zero (caching off).
    pub fn new(capacity: u64) -> Option<Self> {
        (capacity > 0).then(|| DecisionCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .build_with_hasher(foldhash::fast::RandomState::default()),
        })
    }

    /// The cache key of a request, or `None` when it must not be cached:
    /// requests with request-scoped entities, and requests whose key would
    /// exceed [`MAX_KEY_BYTES`] (so the cache's memory stays bounded by its
    /// entry count).
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
        let length: usize = parts.iter().map(|p| p.len() + 9).sum();
        if length > MAX_KEY_BYTES {
            return None;
        }
        let mut key = String::with_capacity(length);
        // Length-prefixed, so no two different requests share a key.
        for part in parts {
            super::request_entities::push_field(&mut key, part);
        }
        Some(key.into_boxed_str())
    }

    pub fn get(&self, key: &DecisionKey) -> Option<Arc<CachedOutcome>> {
        self.entries.get(key)
    }

    pub fn insert(&self, key: DecisionKey, outcome: CachedOutcome) {
        self.entries.insert(key, Arc::new(outcome));
    }

    /// Lets go of every answer given so far (they are under older
    /// generations: never served again, only taking room).
    pub fn clear(&self) {
        self.entries.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::UidInput;

    fn input<'a>(principal_id: &'a str, context_json: &'a str) -> CheckInput<'a> {
        let uid = |type_name, id| Some(UidInput { type_name, id });
        CheckInput {
            principal: uid("User", principal_id),
            action: uid("Action", "read"),
            resource: uid("Doc", "d"),
            context_json,
            entities_json: "",
        }
    }

    #[test]
    fn keys_are_unambiguous() {
        // Without length prefixes these two would collide.
        let a = DecisionCache::key(&input("a:b", "")).unwrap();
        let b = DecisionCache::key(&CheckInput {
            action: Some(UidInput {
                type_name: "b:Action",
                id: "read",
            }),
            ..input("a", "")
        })
        .unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn overlays_and_large_requests_are_not_cached() {
        let mut with_overlay = input("a", "{}");
        with_overlay.entities_json = "[]x";
        assert!(DecisionCache::key(&with_overlay).is_none());
        let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(MAX_KEY_BYTES));
        assert!(DecisionCache::key(&input("a", &big)).is_none());
        assert!(DecisionCache::key(&input("a", "{}")).is_some());
    }
}
