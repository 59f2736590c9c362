//! Arbiter's own entity store for data kept in sync with an identity source
//! (Postgres, SCIM): a persistent (structurally shared) map from uid to
//! entity with its direct parents and the entities its attributes reference.
//!
//! Why not one Cedar `Entities`: Cedar recomputes the transitive closure of
//! the whole store on every change, so one change costs in proportion to the
//! store. Here a change costs O(log n) plus a walk over the changed entity's
//! ancestors (to refuse cycles and dangling parents); cloning the store to
//! publish it is O(1). Ancestors are not materialised per entity: a decision
//! walks from its roots to their ancestors and referenced entities (a few
//! dozen lookups for users in a few nested groups) and hands that slice to
//! Cedar, so moving a group never fans out to its descendants.
//!
//! Invariants (kept by [`EntityStore::upsert`]): every parent of a stored
//! entity was stored when the edge was added, and the parent graph has no
//! cycle.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cedar_policy::{Entities, Entity, EntityUid};

use super::snapshot::entity_references;

/// One entity as stored: Cedar's entity (attributes already evaluated) and
/// the edges a slice follows.
#[derive(Debug, Clone)]
pub struct StoredEntity {
    pub entity: Entity,
    /// Direct parents. Once stored, each is the store's own key of that
    /// parent (shared, not a copy: 8 bytes an edge instead of a uid).
    pub parents: Box<[Arc<EntityUid>]>,
    /// Entities named by attributes and tags.
    pub references: Box<[EntityUid]>,
    /// Set when the entity is stored: unique in the process, so two stored
    /// entities with the same stamp are the same value (see [`Stamp`]).
    stamp: Stamp,
}

/// Identifies one stored version of an entity: every [`EntityStore::upsert`]
/// draws a new one from a process-wide counter. [`ABSENT`] stands for "no
/// such entity". A prepared slice records the stamps of every uid it looked
/// up, and is still exact for a store where those uids have the same stamps.
pub type Stamp = u64;

/// The stamp of a uid that is not stored.
pub const ABSENT: Stamp = 0;

static NEXT_STAMP: AtomicU64 = AtomicU64::new(1);

impl StoredEntity {
    /// `parents` must be the entity's direct parents.
    pub fn new(entity: Entity, parents: Vec<EntityUid>) -> Self {
        let mut references = Vec::new();
        entity_references(&entity, &mut references);
        StoredEntity {
            entity,
            parents: parents.into_iter().map(Arc::new).collect(),
            references: references.into_boxed_slice(),
            stamp: ABSENT,
        }
    }

    pub fn uid(&self) -> EntityUid {
        self.entity.uid()
    }

    /// The direct parents' uids.
    pub fn parent_uids(&self) -> impl Iterator<Item = &EntityUid> {
        self.parents.iter().map(|parent| &**parent)
    }
}

/// Why an entity was refused; the store keeps its previous state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("parent `{parent}` of `{uid}` does not exist")]
    MissingParent {
        uid: Box<EntityUid>,
        parent: Box<EntityUid>,
    },
    #[error("parent `{parent}` of `{uid}` would make a cycle in the hierarchy")]
    Cycle {
        uid: Box<EntityUid>,
        parent: Box<EntityUid>,
    },
    #[error("parent `{parent}` of `{uid}` was itself refused")]
    ParentRefused {
        uid: Box<EntityUid>,
        parent: Box<EntityUid>,
    },
}

impl StoreError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::MissingParent { .. } => "missing_parent",
            StoreError::Cycle { .. } => "cycle",
            StoreError::ParentRefused { .. } => "parent_refused",
        }
    }
}

/// The persistent map; clones share structure. Keys are behind an `Arc`
/// so that the nodes a write copies (copy on write) stay small.
#[derive(Debug, Clone, Default)]
pub struct EntityStore {
    entities: imbl::HashMap<Arc<EntityUid>, Arc<StoredEntity>>,
}

impl EntityStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entities.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entities.is_empty()
    }

    pub fn get(&self, uid: &EntityUid) -> Option<&Arc<StoredEntity>> {
        self.entities.get(uid)
    }

    pub fn contains(&self, uid: &EntityUid) -> bool {
        self.entities.contains_key(uid)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<StoredEntity>> {
        self.entities.values()
    }

    /// Inserts or replaces an entity. Refused (store unchanged) when a parent
    /// is not stored or when a parent is the entity itself or one of its
    /// descendants.
    pub fn upsert(&mut self, stored: StoredEntity) -> Result<(), StoreError> {
        self.upsert_reusing(stored, None)
    }

    /// [`EntityStore::upsert`], keeping `previous`'s version (and so its
    /// stamp) when it is equal: a full listing that changes nothing then
    /// leaves every prepared slice valid.
    fn upsert_reusing(
        &mut self,
        stored: StoredEntity,
        previous: Option<&EntityStore>,
    ) -> Result<(), StoreError> {
        let uid = stored.uid();
        for parent in stored.parent_uids() {
            if !self.entities.contains_key(parent) {
                return Err(StoreError::MissingParent {
                    uid: Box::new(uid),
                    parent: Box::new(parent.clone()),
                });
            }
            if *parent == uid || self.has_ancestor(parent, &uid) {
                return Err(StoreError::Cycle {
                    uid: Box::new(uid),
                    parent: Box::new(parent.clone()),
                });
            }
        }
        let kept = previous
            .and_then(|previous| previous.entities.get(&uid))
            .filter(|old| old.entity == stored.entity && old.parents == stored.parents)
            .cloned();
        let value = kept.unwrap_or_else(|| {
            // Every parent is stored (checked above): point at its key.
            let parents = stored
                .parents
                .iter()
                .map(|parent| match self.entities.get_key_value(&**parent) {
                    Some((key, _)) => key.clone(),
                    None => parent.clone(),
                })
                .collect();
            Arc::new(StoredEntity {
                stamp: NEXT_STAMP.fetch_add(1, Ordering::Relaxed),
                parents,
                ..stored
            })
        });
        self.entities.insert(Arc::new(uid), value);
        Ok(())
    }

    /// The stamp of the stored version of `uid`, [`ABSENT`] when not stored.
    pub fn stamp(&self, uid: &EntityUid) -> Stamp {
        self.entities.get(uid).map_or(ABSENT, |stored| stored.stamp)
    }

    /// Removes an entity; its children keep the edge to it (a dangling edge
    /// is harmless for Cedar, and the source sends their own changes).
    pub fn remove(&mut self, uid: &EntityUid) -> bool {
        self.entities.remove(uid).is_some()
    }

    /// True when `ancestor` is reachable from `start` through parents.
    pub fn has_ancestor(&self, start: &EntityUid, ancestor: &EntityUid) -> bool {
        let mut seen: HashSet<&EntityUid> = HashSet::new();
        let mut pending: Vec<&EntityUid> = vec![start];
        while let Some(uid) = pending.pop() {
            if !seen.insert(uid) {
                continue;
            }
            if let Some(entity) = self.entities.get(uid) {
                for parent in entity.parent_uids() {
                    if parent == ancestor {
                        return true;
                    }
                    pending.push(parent);
                }
            }
        }
        false
    }

    /// Builds a store from a full listing, in an order where parents come
    /// first. Entities whose parents are missing, refused, or on a cycle are
    /// refused and returned with the reason.
    pub fn from_entities(
        entities: impl IntoIterator<Item = StoredEntity>,
    ) -> (EntityStore, Vec<StoreError>) {
        Self::from_entities_reusing(entities, None)
    }

    /// [`EntityStore::from_entities`] for a reconciliation: entities equal
    /// to their version in `previous` keep it (and its stamp).
    pub fn from_entities_reusing(
        entities: impl IntoIterator<Item = StoredEntity>,
        previous: Option<&EntityStore>,
    ) -> (EntityStore, Vec<StoreError>) {
        let mut rows: HashMap<EntityUid, StoredEntity> = HashMap::new();
        for entity in entities {
            rows.insert(entity.uid(), entity);
        }
        // Kahn's algorithm over the parent edges inside the listing.
        let mut waiting: HashMap<EntityUid, usize> = HashMap::new();
        let mut children: HashMap<EntityUid, Vec<EntityUid>> = HashMap::new();
        let mut ready: Vec<EntityUid> = Vec::new();
        let mut refused = Vec::new();
        for (uid, entity) in &rows {
            let missing = entity
                .parent_uids()
                .find(|parent| !rows.contains_key(*parent));
            if let Some(parent) = missing {
                refused.push(StoreError::MissingParent {
                    uid: Box::new(uid.clone()),
                    parent: Box::new(parent.clone()),
                });
                continue;
            }
            let distinct: HashSet<&EntityUid> = entity.parent_uids().collect();
            waiting.insert(uid.clone(), distinct.len());
            for parent in distinct {
                children
                    .entry(parent.clone())
                    .or_default()
                    .push(uid.clone());
            }
            if entity.parents.is_empty() {
                ready.push(uid.clone());
            }
        }
        let mut store = EntityStore::new();
        while let Some(uid) = ready.pop() {
            let Some(entity) = rows.remove(&uid) else {
                continue;
            };
            if store.upsert_reusing(entity, previous).is_err() {
                continue;
            }
            for child in children.remove(&uid).unwrap_or_default() {
                if let Some(count) = waiting.get_mut(&child) {
                    *count -= 1;
                    if *count == 0 {
                        ready.push(child);
                    }
                }
            }
        }
        // Whatever is left sits on a cycle or waits on a refused parent.
        for (uid, entity) in &rows {
            if !waiting.contains_key(uid) {
                continue; // already refused for a missing parent
            }
            let parent = entity
                .parent_uids()
                .find(|parent| !store.contains(parent))
                .cloned()
                .unwrap_or_else(|| uid.clone());
            refused.push(if on_cycle(&rows, uid) {
                StoreError::Cycle {
                    uid: Box::new(uid.clone()),
                    parent: Box::new(parent),
                }
            } else {
                StoreError::ParentRefused {
                    uid: Box::new(uid.clone()),
                    parent: Box::new(parent),
                }
            });
        }
        (store, refused)
    }

    /// The entities reachable from `roots` through parents and attribute
    /// references, with `overlay` entities taking the place of stored ones.
    /// Cedar can reach no other entity from a request, so evaluating against
    /// this slice equals evaluating against the whole store.
    pub fn slice_with_overlay(
        &self,
        roots: impl IntoIterator<Item = EntityUid>,
        overlay: &Entities,
    ) -> Vec<Entity> {
        self.walk(roots, Some(overlay), |_, _| {})
    }
}

impl EntityStore {
    /// Like [`EntityStore::slice_with_overlay`] without an overlay, also
    /// recording every uid looked up (found or not) with its stamp: the
    /// slice is a function of exactly those entries, so it is still the
    /// slice of any store where they carry the same stamps.
    pub fn slice_recording(
        &self,
        roots: impl IntoIterator<Item = EntityUid>,
        looked_up: &mut Vec<(EntityUid, Stamp)>,
    ) -> Vec<Entity> {
        self.walk(roots, None, |uid, stamp| {
            looked_up.push((uid.clone(), stamp.unwrap_or(ABSENT)));
        })
    }

    /// The one traversal behind both slices: overlay entities first, then
    /// stored ones; `stored_lookup` sees every uid looked up in the store
    /// with its stamp (`None`: not there).
    fn walk(
        &self,
        roots: impl IntoIterator<Item = EntityUid>,
        overlay: Option<&Entities>,
        mut stored_lookup: impl FnMut(&EntityUid, Option<Stamp>),
    ) -> Vec<Entity> {
        let mut seen: HashSet<EntityUid> = HashSet::new();
        let mut pending: Vec<EntityUid> = roots.into_iter().collect();
        let mut slice = Vec::new();
        while let Some(uid) = pending.pop() {
            if seen.contains(&uid) {
                continue;
            }
            if let Some(entity) = overlay.and_then(|overlay| overlay.get(&uid)) {
                let mut out = Vec::new();
                entity_references(entity, &mut out);
                if let Some(overlay) = overlay {
                    out.extend(overlay.ancestors(&uid).into_iter().flatten().cloned());
                }
                pending.extend(out.into_iter().filter(|uid| !seen.contains(uid)));
                slice.push(entity.clone());
            } else {
                let stored = self.entities.get(&uid);
                stored_lookup(&uid, stored.map(|stored| stored.stamp));
                if let Some(stored) = stored {
                    for next in stored.parent_uids().chain(stored.references.iter()) {
                        if !seen.contains(next) {
                            pending.push(next.clone());
                        }
                    }
                    slice.push(stored.entity.clone());
                }
            }
            seen.insert(uid);
        }
        slice
    }

    /// True when every recorded uid still has the recorded stamp here.
    pub fn unchanged(&self, looked_up: &[(EntityUid, Stamp)]) -> bool {
        looked_up
            .iter()
            .all(|(uid, stamp)| self.stamp(uid) == *stamp)
    }
}

/// True when `start` reaches itself through parents inside `rows`.
fn on_cycle(rows: &HashMap<EntityUid, StoredEntity>, start: &EntityUid) -> bool {
    let mut seen: HashSet<&EntityUid> = HashSet::new();
    let mut pending: Vec<&EntityUid> = vec![start];
    while let Some(uid) = pending.pop() {
        let Some(entity) = rows.get(uid) else {
            continue;
        };
        for parent in entity.parent_uids() {
            if parent == start {
                return true;
            }
            if seen.insert(parent) {
                pending.push(parent);
            }
        }
    }
    false
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn uid(text: &str) -> EntityUid {
        text.parse().unwrap()
    }

    pub(crate) fn entity(id: &str, parents: &[&str]) -> StoredEntity {
        let parents: Vec<EntityUid> = parents.iter().map(|p| uid(p)).collect();
        let entity = Entity::new_no_attrs(uid(id), parents.iter().cloned().collect());
        StoredEntity::new(entity, parents)
    }

    #[test]
    fn refuses_missing_parents_and_cycles() {
        let mut store = EntityStore::new();
        store.upsert(entity(r#"G::"a""#, &[])).unwrap();
        store.upsert(entity(r#"G::"b""#, &[r#"G::"a""#])).unwrap();
        let missing = store.upsert(entity(r#"U::"u""#, &[r#"G::"zz""#]));
        assert_eq!(missing.unwrap_err().kind(), "missing_parent");
        let cycle = store.upsert(entity(r#"G::"a""#, &[r#"G::"b""#]));
        assert_eq!(cycle.unwrap_err().kind(), "cycle");
        assert!(store.get(&uid(r#"G::"a""#)).unwrap().parents.is_empty());
    }

    #[test]
    fn stored_parents_share_the_parents_keys() {
        let (mut store, _) = EntityStore::from_entities([
            entity(r#"G::"a""#, &[]),
            entity(r#"U::"u""#, &[r#"G::"a""#]),
        ]);
        store.upsert(entity(r#"U::"v""#, &[r#"G::"a""#])).unwrap();
        let (key, _) = store.entities.get_key_value(&uid(r#"G::"a""#)).unwrap();
        for user in [r#"U::"u""#, r#"U::"v""#] {
            let stored = store.get(&uid(user)).unwrap();
            assert!(Arc::ptr_eq(&stored.parents[0], key), "{user}");
        }
    }

    #[test]
    fn full_listing_refuses_cycles_and_their_descendants() {
        let (store, refused) = EntityStore::from_entities([
            entity(r#"G::"a""#, &[r#"G::"b""#]),
            entity(r#"G::"b""#, &[r#"G::"a""#]),
            entity(r#"G::"c""#, &[]),
            entity(r#"U::"u""#, &[r#"G::"c""#]),
            entity(r#"U::"v""#, &[r#"G::"a""#]),
            entity(r#"U::"w""#, &[r#"G::"nope""#]),
        ]);
        assert_eq!(store.len(), 2);
        assert_eq!(refused.len(), 4);
    }

    #[test]
    fn slice_follows_ancestors() {
        let (store, _) = EntityStore::from_entities([
            entity(r#"G::"a""#, &[]),
            entity(r#"G::"b""#, &[r#"G::"a""#]),
            entity(r#"U::"u""#, &[r#"G::"b""#]),
            entity(r#"U::"other""#, &[]),
        ]);
        let slice = store.slice_with_overlay([uid(r#"U::"u""#)], &Entities::empty());
        assert_eq!(slice.len(), 3);
    }
}
