//! A bounded cache of prepared slices of synced entity data: for a
//! request's roots (principal, action, resource, the context's entity
//! references), the Cedar `Entities` a decision evaluates against, with its
//! transitive closure already computed. Building one costs a graph walk,
//! copies of a few dozen entities and Cedar's closure; reusing one costs a
//! lookup and a check of its stamps.
//!
//! Exactness without invalidation work: each slice records every uid its
//! walk looked up, found or not, with the [`Stamp`] of the stored version
//! it saw. A slice is a function of exactly those entries, so it is served
//! only when the deciding snapshot's store still has the same stamps for
//! all of them; otherwise it is rebuilt from that store and replaces the
//! entry. So a change invalidates exactly the slices that contain (or
//! looked for) a changed entity: a membership change of a group with 10,000
//! members re-stamps those members, a move of a nested group re-stamps that
//! group, and every slice that walked through either is rebuilt on its next
//! use. Applying a change does no work here, and a slice built from an older
//! store (a decision that started before a publish) can never be served for
//! a newer one, since it is checked against the store of the snapshot that
//! decides.
//!
//! The cache lives as long as the policies: the slice includes the schema's
//! action entities and the policies' entity literals, so a policy publish
//! starts an empty one.

use std::sync::Arc;

use cedar_policy::{Entities, EntityUid};

use super::entity_store::{EntityStore, Stamp};

/// The most roots a cached slice may have (principal, action, resource and
/// a few context references); requests with more are not cached.
pub(crate) const MAX_KEY_UIDS: usize = 16;

/// One prepared slice and what it was built from.
#[derive(Debug)]
pub(crate) struct PreparedSlice {
    pub entities: Entities,
    looked_up: Box<[(EntityUid, Stamp)]>,
}

impl PreparedSlice {
    pub fn new(entities: Entities, looked_up: Vec<(EntityUid, Stamp)>) -> Self {
        PreparedSlice {
            entities,
            looked_up: looked_up.into_boxed_slice(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct SliceCache {
    entries: moka::sync::Cache<Box<[EntityUid]>, Arc<PreparedSlice>>,
}

impl SliceCache {
    /// A cache holding slices of at most `capacity` entities in all (each
    /// slice weighs the number of entities it looked up); `None` when
    /// `capacity` is zero (caching off).
    pub fn new(capacity: u64) -> Option<Self> {
        (capacity > 0).then(|| SliceCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .weigher(|_, slice: &Arc<PreparedSlice>| {
                    u32::try_from(slice.looked_up.len()).unwrap_or(u32::MAX)
                })
                .build(),
        })
    }

    /// The slice for `roots`, when one was prepared and `store` still has
    /// every entity it was built from.
    pub fn get(&self, roots: &[EntityUid], store: &EntityStore) -> Option<Arc<PreparedSlice>> {
        self.entries
            .get(roots)
            .filter(|slice| store.unchanged(&slice.looked_up))
    }

    pub fn insert(&self, roots: &[EntityUid], slice: Arc<PreparedSlice>) {
        if roots.len() <= MAX_KEY_UIDS {
            self.entries.insert(roots.into(), slice);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::entity_store::tests::{entity, uid};

    fn prepare(cache: &SliceCache, store: &EntityStore, roots: &[EntityUid]) {
        let mut looked_up = Vec::new();
        let slice = store
            .slice_recording(roots.iter().cloned(), &mut looked_up)
            .unwrap();
        let entities = Entities::from_entities(slice, None).unwrap();
        cache.insert(roots, Arc::new(PreparedSlice::new(entities, looked_up)));
    }

    #[test]
    fn a_slice_is_served_until_an_entity_it_looked_up_changes() {
        let (mut store, _) = EntityStore::from_entities([
            entity(r#"G::"top""#, &[]),
            entity(r#"G::"a""#, &[r#"G::"top""#]),
            entity(r#"G::"b""#, &[]),
            entity(r#"U::"u""#, &[r#"G::"a""#]),
            entity(r#"U::"v""#, &[r#"G::"b""#]),
        ]);
        let cache = SliceCache::new(1000).unwrap();
        let roots = [uid(r#"U::"u""#), uid(r#"D::"doc""#)];
        prepare(&cache, &store, &roots);
        assert!(cache.get(&roots, &store).is_some());

        // An entity outside the slice: still served.
        store.upsert(entity(r#"U::"v""#, &[])).unwrap();
        assert!(cache.get(&roots, &store).is_some());
        // An ancestor changes (a nested group moves): not served.
        store.upsert(entity(r#"G::"a""#, &[r#"G::"b""#])).unwrap();
        assert!(cache.get(&roots, &store).is_none());
        prepare(&cache, &store, &roots);
        assert!(cache.get(&roots, &store).is_some());
        // A root that was absent appears: not served.
        store.upsert(entity(r#"D::"doc""#, &[])).unwrap();
        assert!(cache.get(&roots, &store).is_none());
        prepare(&cache, &store, &roots);
        // The principal goes away: not served.
        assert!(store.remove(&uid(r#"U::"u""#)));
        assert!(cache.get(&roots, &store).is_none());
    }

    #[test]
    fn a_full_listing_keeps_the_slices_of_what_it_did_not_change() {
        let listing = |ann_parents: &[&str]| {
            [
                entity(r#"G::"a""#, &[]),
                entity(r#"G::"b""#, &[]),
                entity(r#"U::"ann""#, ann_parents),
                entity(r#"U::"bob""#, &[r#"G::"b""#]),
            ]
        };
        let (store, _) = EntityStore::from_entities(listing(&[r#"G::"a""#]));
        let cache = SliceCache::new(1000).unwrap();
        let (ann, bob) = ([uid(r#"U::"ann""#)], [uid(r#"U::"bob""#)]);
        prepare(&cache, &store, &ann);
        prepare(&cache, &store, &bob);
        // Reconciliation: ann moved from a to b, bob unchanged.
        let (relisted, _) =
            EntityStore::from_entities_reusing(listing(&[r#"G::"b""#]).into(), Some(&store), 32);
        assert!(cache.get(&ann, &relisted).is_none());
        assert!(cache.get(&bob, &relisted).is_some());
        // Without reuse, everything is new.
        let (fresh, _) = EntityStore::from_entities(listing(&[r#"G::"b""#]));
        assert!(cache.get(&bob, &fresh).is_none());
    }

    #[test]
    fn an_older_store_never_gets_a_newer_slice_nor_the_reverse() {
        let (old, _) = EntityStore::from_entities([
            entity(r#"G::"a""#, &[]),
            entity(r#"U::"u""#, &[r#"G::"a""#]),
        ]);
        let mut new = old.clone();
        new.upsert(entity(r#"U::"u""#, &[])).unwrap();
        let cache = SliceCache::new(1000).unwrap();
        let roots = [uid(r#"U::"u""#)];
        prepare(&cache, &new, &roots);
        assert!(cache.get(&roots, &old).is_none());
        prepare(&cache, &old, &roots);
        assert!(cache.get(&roots, &new).is_none());
        assert!(cache.get(&roots, &old).is_some());
    }
}
