//! Arbiter's own entity store for data kept in sync with an identity source
//! (Postgres, SCIM): a hash map from uid to entity with its direct parents,
//! in a compact form of its own, written through a [`StoreWriter`] that
//! keeps two copies (left-right).
//!
//! Why not one Cedar `Entities`: Cedar recomputes the transitive closure of
//! the whole store on every change, so one change costs in proportion to the
//! store. Here a change costs two hash-map writes (one per copy) plus a walk
//! over the changed entity's ancestors (to refuse cycles and dangling
//! parents). Ancestors are not materialised per entity: a decision
//! walks from its roots to their ancestors and referenced entities (a few
//! dozen lookups for users in a few nested groups) and hands that slice to
//! Cedar, so moving a group never fans out to its descendants.
//!
//! Why not Cedar's `Entity` as the stored value: it holds each attribute in
//! a `BTreeMap` node sized for eleven and each parent as a full uid in a
//! hash set, about 5.8 KB for a user with 3 attributes and 10 groups (see
//! README). A [`StoredEntity`] holds its attributes in one boxed slice of
//! [`StoredValue`]s and its parents as pointers to the parents' own uids;
//! the Cedar entity is built from it when a slice is built
//! ([`StoredEntity::to_entity`]), which the slice cache amortises.
//!
//! Why two copies and not a persistent map: a persistent map (we used
//! `imbl`'s) copies the path to a changed entry, and each copied node
//! bumps the reference counts of its 32 entries; at a million users those
//! sit in cold memory, so one change cost 2-2.5× what it cost at 10,000.
//! A decision holds the snapshot it started with; the writer changes the
//! copy no snapshot holds any more (the one published the time before
//! last), catching it up on the previous batch first. Decisions take no
//! lock and see one whole batch or none of it.
//!
//! Why a second, small map of the entities that are parents: see
//! [`EntityStore`]'s `parent_entities`.
//!
//! Invariants (kept by [`EntityStore::upsert`]): every parent of a stored
//! entity was stored when the edge was added, and the parent graph has no
//! cycle.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cedar_policy::{Entities, Entity, EntityUid, EvalResult, RestrictedExpression};

use super::hierarchy::DEFAULT_MAX_HIERARCHY_DEPTH;
pub use super::slice::{MaterializeError, SliceError};
use super::slice::{SliceGraph, entity_references, refuse_overlay_parent};
use smol_str::SmolStr;

/// An attribute or tag value as stored: Cedar's values, compactly. Short
/// strings and names (up to 23 bytes) sit inline, without an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredValue {
    Bool(bool),
    Long(i64),
    String(SmolStr),
    /// Shared with the other values naming it, when built by one
    /// [`UidInterner`].
    Entity(Arc<EntityUid>),
    Set(Box<[StoredValue]>),
    /// Fields in name order (as Cedar's record keeps them).
    Record(Box<[(SmolStr, StoredValue)]>),
    /// An extension value as Cedar writes it, e.g. `ip("10.0.0.1")`; Cedar
    /// guarantees the text parses back to the same value.
    Extension(Box<str>),
}

impl StoredValue {
    fn from_eval(value: EvalResult, uids: &mut UidInterner) -> Self {
        match value {
            EvalResult::Bool(value) => StoredValue::Bool(value),
            EvalResult::Long(value) => StoredValue::Long(value),
            EvalResult::String(value) => StoredValue::String(SmolStr::from(value)),
            EvalResult::EntityUid(uid) => StoredValue::Entity(uids.intern(uid)),
            EvalResult::Set(set) => StoredValue::Set(
                set.iter()
                    .map(|item| StoredValue::from_eval(item.clone(), uids))
                    .collect(),
            ),
            EvalResult::Record(record) => StoredValue::Record(
                record
                    .iter()
                    .map(|(name, value)| {
                        (
                            SmolStr::from(name),
                            StoredValue::from_eval(value.clone(), uids),
                        )
                    })
                    .collect(),
            ),
            EvalResult::ExtensionValue(text) => StoredValue::Extension(text.into_boxed_str()),
        }
    }

    fn to_expression(&self) -> Result<RestrictedExpression, MaterializeError> {
        Ok(match self {
            StoredValue::Bool(value) => RestrictedExpression::new_bool(*value),
            StoredValue::Long(value) => RestrictedExpression::new_long(*value),
            StoredValue::String(value) => RestrictedExpression::new_string(value.to_string()),
            StoredValue::Entity(uid) => RestrictedExpression::new_entity_uid((**uid).clone()),
            StoredValue::Set(items) => RestrictedExpression::new_set(
                items
                    .iter()
                    .map(StoredValue::to_expression)
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            StoredValue::Record(fields) => RestrictedExpression::new_record(
                fields
                    .iter()
                    .map(|(name, value)| Ok((name.to_string(), value.to_expression()?)))
                    .collect::<Result<Vec<_>, MaterializeError>>()?,
            )
            .map_err(|error| MaterializeError(error.to_string()))?,
            StoredValue::Extension(text) => {
                text.parse()
                    .map_err(|error: cedar_policy::RestrictedExpressionParseError| {
                        MaterializeError(error.to_string())
                    })?
            }
        })
    }

    /// Every entity uid inside the value (sets and records included).
    fn references<'a>(&'a self, out: &mut impl FnMut(&'a EntityUid)) {
        match self {
            StoredValue::Entity(uid) => out(uid),
            StoredValue::Set(items) => items.iter().for_each(|item| item.references(out)),
            StoredValue::Record(fields) => {
                fields.iter().for_each(|(_, item)| item.references(out));
            }
            StoredValue::Bool(_)
            | StoredValue::Long(_)
            | StoredValue::String(_)
            | StoredValue::Extension(_) => {}
        }
    }
}

/// Hands out one shared `Arc` per distinct uid.
#[derive(Debug, Default)]
pub struct UidInterner {
    uids: HashSet<Arc<EntityUid>, foldhash::fast::RandomState>,
}

impl UidInterner {
    pub fn intern(&mut self, uid: EntityUid) -> Arc<EntityUid> {
        if let Some(shared) = self.uids.get(&uid) {
            return shared.clone();
        }
        let shared = Arc::new(uid);
        self.uids.insert(shared.clone());
        shared
    }
}

/// An entity that cannot be stored: an attribute or tag that is not a
/// value (a residual of partial evaluation).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("attribute or tag `{name}` is not a value: {message}")]
pub struct NotAValue {
    pub name: String,
    pub message: String,
}

/// One entity as stored: its uid (shared with the map's key), attributes,
/// tags and direct parents.
#[derive(Debug, Clone)]
pub struct StoredEntity {
    uid: Arc<EntityUid>,
    attrs: Box<[(SmolStr, StoredValue)]>,
    tags: Box<[(SmolStr, StoredValue)]>,
    /// Direct parents. Once stored, each is the store's own key of that
    /// parent (shared, not a copy: 8 bytes an edge instead of a uid).
    pub parents: Box<[Arc<EntityUid>]>,
    /// Set when the entity is stored: unique in the process, so two stored
    /// entities with the same stamp are the same value (see [`Stamp`]).
    stamp: Stamp,
    /// The longest chain of parents above it when it was stored (0: no
    /// parents). A later move of an ancestor is not fanned out to it, so
    /// this may be lower than the present depth; a decision's slice is
    /// measured again before Cedar sees it.
    depth: u32,
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
    /// The compact form of Cedar's `entity` (its uid, attributes and tags)
    /// with `parents` as its direct parents (the entity's own parents are
    /// not read).
    pub fn from_entity(entity: &Entity, parents: Vec<EntityUid>) -> Result<Self, NotAValue> {
        Self::from_parts(
            Arc::new(entity.uid()),
            entity,
            parents.into_iter().map(Arc::new).collect(),
            &mut UidInterner::default(),
        )
    }

    /// [`StoredEntity::from_entity`] with the uid and parents given, and the
    /// uids in attribute values shared through `uids`: a full listing
    /// builds a million entities naming the same few thousand groups, and a
    /// uid per edge would be most of its memory (and, freed after the
    /// build, scattered between what stays).
    pub fn from_parts(
        uid: Arc<EntityUid>,
        entity: &Entity,
        parents: Vec<Arc<EntityUid>>,
        uids: &mut UidInterner,
    ) -> Result<Self, NotAValue> {
        fn values<'a>(
            pairs: impl Iterator<
                Item = (
                    &'a str,
                    Result<EvalResult, cedar_policy::PartialValueToValueError>,
                ),
            >,
            uids: &mut UidInterner,
        ) -> Result<Box<[(SmolStr, StoredValue)]>, NotAValue> {
            pairs
                .map(|(name, value)| match value {
                    Ok(value) => Ok((SmolStr::from(name), StoredValue::from_eval(value, uids))),
                    Err(error) => Err(NotAValue {
                        name: name.to_string(),
                        message: error.to_string(),
                    }),
                })
                .collect()
        }
        Ok(StoredEntity {
            uid,
            attrs: values(entity.attrs(), uids)?,
            tags: values(entity.tags(), uids)?,
            parents: parents.into_boxed_slice(),
            stamp: ABSENT,
            depth: 0,
        })
    }

    pub fn uid(&self) -> &EntityUid {
        &self.uid
    }

    /// The uid as the store shares it (map key and children's edges).
    pub fn shared_uid(&self) -> &Arc<EntityUid> {
        &self.uid
    }

    /// The direct parents' uids.
    pub fn parent_uids(&self) -> impl Iterator<Item = &EntityUid> {
        self.parents.iter().map(|parent| &**parent)
    }

    /// The attribute named `name`.
    pub fn attr(&self, name: &str) -> Option<&StoredValue> {
        self.attrs
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value)
    }

    /// Every entity uid the attributes and tags name.
    pub fn references<'a>(&'a self, mut out: impl FnMut(&'a EntityUid)) {
        for (_, value) in self.attrs.iter().chain(self.tags.iter()) {
            value.references(&mut out);
        }
    }

    /// Same uid, attributes, tags and parents.
    pub fn same_content(&self, other: &StoredEntity) -> bool {
        self.uid == other.uid
            && self.attrs == other.attrs
            && self.tags == other.tags
            && self.parents == other.parents
    }

    /// Cedar's entity for this one, with its direct parents (Cedar computes
    /// the closure over the slice).
    pub fn to_entity(&self) -> Result<Entity, MaterializeError> {
        let parents = self.parents.iter().map(|parent| (**parent).clone());
        if self.attrs.is_empty() && self.tags.is_empty() {
            return Ok(Entity::new_no_attrs((*self.uid).clone(), parents.collect()));
        }
        fn expressions(
            pairs: &[(SmolStr, StoredValue)],
        ) -> Result<Vec<(String, RestrictedExpression)>, MaterializeError> {
            pairs
                .iter()
                .map(|(name, value)| Ok((name.to_string(), value.to_expression()?)))
                .collect()
        }
        Entity::new_with_tags(
            (*self.uid).clone(),
            expressions(&self.attrs)?,
            parents,
            expressions(&self.tags)?,
        )
        .map_err(|error| MaterializeError(error.to_string()))
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
    #[error(
        "parent `{parent}` of `{uid}` would give it a chain of more than {max} ancestors (`max_hierarchy_depth`)"
    )]
    TooDeep {
        uid: Box<EntityUid>,
        parent: Box<EntityUid>,
        max: u32,
    },
}

impl StoreError {
    /// The entity that was refused.
    pub fn uid(&self) -> &EntityUid {
        match self {
            StoreError::MissingParent { uid, .. }
            | StoreError::Cycle { uid, .. }
            | StoreError::ParentRefused { uid, .. }
            | StoreError::TooDeep { uid, .. } => uid,
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::MissingParent { .. } => "missing_parent",
            StoreError::Cycle { .. } => "cycle",
            StoreError::ParentRefused { .. } => "parent_refused",
            StoreError::TooDeep { .. } => "too_deep",
        }
    }
}

/// The uids a walk up the hierarchy has visited. A user's ancestors are a
/// few dozen groups: a short list beats hashing uids, past that a set.
#[derive(Default)]
struct Ancestors<'a> {
    few: Vec<&'a EntityUid>,
    many: HashSet<&'a EntityUid, foldhash::fast::RandomState>,
}

impl<'a> Ancestors<'a> {
    const FEW: usize = 32;

    /// False when `uid` was already there.
    fn insert(&mut self, uid: &'a EntityUid) -> bool {
        if self.many.is_empty() {
            if self
                .few
                .iter()
                .any(|seen| std::ptr::eq(*seen, uid) || *seen == uid)
            {
                return false;
            }
            if self.few.len() < Self::FEW {
                self.few.push(uid);
                return true;
            }
            self.many.extend(self.few.drain(..));
        }
        self.many.insert(uid)
    }
}

type EntityMap = HashMap<Arc<EntityUid>, Arc<StoredEntity>, foldhash::fast::RandomState>;

/// One copy of the store. Keys are the entities' own uids (one allocation
/// per uid, shared by the children's edges). Hashed with foldhash: a lookup
/// hashes a type name and an id, and a decision's walk does a few dozen.
/// `Clone` copies the maps (the entities are shared).
#[derive(Debug, Clone)]
pub struct EntityStore {
    entities: EntityMap,
    /// The stored entities that are a parent of a stored entity (or were,
    /// since an edge to them was added), with the same keys and values as
    /// in `entities`: every lookup tries this map first. Why: a change
    /// looks up its entity's parents and their ancestors, a decision its
    /// principal's; those are the few thousand groups, roles and tenants,
    /// and in a map of a million users a perf profile put most of what one
    /// change cost more than at ten thousand users in those lookups'
    /// control-byte loads, slots and key compares (cold memory). In a map
    /// of their own they are few and often used: one change cost 1.36–1.43×
    /// at a million users what it cost at ten thousand, 1.06–1.11× with
    /// this map (README).
    parent_entities: EntityMap,
    /// An entity whose chain of ancestors would be longer is refused.
    max_depth: u32,
}

impl Default for EntityStore {
    fn default() -> Self {
        EntityStore {
            entities: EntityMap::default(),
            parent_entities: EntityMap::default(),
            max_depth: DEFAULT_MAX_HIERARCHY_DEPTH,
        }
    }
}

impl EntityStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that refuses entities with more than `max_depth`
    /// ancestors in a chain.
    pub fn with_max_depth(max_depth: u32) -> Self {
        EntityStore {
            max_depth,
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.entities.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entities.is_empty()
    }

    pub fn get(&self, uid: &EntityUid) -> Option<&Arc<StoredEntity>> {
        self.entry(uid).map(|(_, entity)| entity)
    }

    pub fn contains(&self, uid: &EntityUid) -> bool {
        self.entry(uid).is_some()
    }

    /// The stored key and entity of `uid`: among the parents first.
    fn entry(&self, uid: &EntityUid) -> Option<(&Arc<EntityUid>, &Arc<StoredEntity>)> {
        self.parent_entities
            .get_key_value(uid)
            .or_else(|| self.entities.get_key_value(uid))
    }

    /// Stores `value` in both maps (in the parents' when it is one there),
    /// and enters its parents that are not yet entered: `value` was checked
    /// (or replays a change checked on the other copy), so each is stored.
    fn put(&mut self, value: &Arc<StoredEntity>) {
        self.entities.insert(value.uid.clone(), value.clone());
        if let Some(slot) = self.parent_entities.get_mut(&*value.uid) {
            *slot = value.clone();
        }
        for parent in value.parents.iter() {
            if !self.parent_entities.contains_key(&**parent)
                && let Some((key, entity)) = self.entities.get_key_value(&**parent)
            {
                self.parent_entities.insert(key.clone(), entity.clone());
            }
        }
    }

    /// Removes `uid` from both maps; its key, if it was stored.
    fn take(&mut self, uid: &EntityUid) -> Option<Arc<EntityUid>> {
        self.parent_entities.remove(uid);
        self.entities.remove_entry(uid).map(|(key, _)| key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<StoredEntity>> {
        self.entities.values()
    }

    /// Inserts or replaces an entity. Refused (store unchanged) when a parent
    /// is not stored or when a parent is the entity itself or one of its
    /// descendants.
    pub fn upsert(&mut self, stored: StoredEntity) -> Result<(), StoreError> {
        self.upsert_reusing(stored, None).map(|_| ())
    }

    /// [`EntityStore::upsert`], keeping `previous`'s version (and so its
    /// stamp) when it is equal: a full listing that changes nothing then
    /// leaves every prepared slice valid.
    fn upsert_reusing(
        &mut self,
        stored: StoredEntity,
        previous: Option<&EntityStore>,
    ) -> Result<Arc<StoredEntity>, StoreError> {
        let uid: &EntityUid = &stored.uid;
        // One lookup per parent tells that it is stored and gives its key
        // (the edge points at it); then one walk up from the parents, with
        // the ancestors seen shared between them, refuses a cycle: `uid`
        // among a parent's ancestors.
        let mut parent_keys: Vec<Arc<EntityUid>> = Vec::with_capacity(stored.parents.len());
        let mut seen = Ancestors::default();
        let mut depth = 0;
        for parent in stored.parent_uids() {
            let Some((key, entity)) = self.entry(parent) else {
                return Err(StoreError::MissingParent {
                    uid: Box::new(uid.clone()),
                    parent: Box::new(parent.clone()),
                });
            };
            // Before the walk up: it then never goes deeper than the limit
            // (as far as the stored depths are current).
            depth = depth.max(entity.depth.saturating_add(1));
            if depth > self.max_depth {
                return Err(StoreError::TooDeep {
                    uid: Box::new(uid.clone()),
                    parent: Box::new(parent.clone()),
                    max: self.max_depth,
                });
            }
            if parent == uid || self.reaches(entity, uid, &mut seen) {
                return Err(StoreError::Cycle {
                    uid: Box::new(uid.clone()),
                    parent: Box::new(parent.clone()),
                });
            }
            parent_keys.push(key.clone());
        }
        let kept = previous
            .and_then(|previous| previous.get(uid))
            .filter(|old| old.same_content(&stored) && old.depth == depth)
            .cloned();
        let value = match kept {
            Some(old) => old,
            None => {
                // One allocation per uid: an entity that is replaced keeps
                // the key its children's edges already point at.
                let key = self
                    .entry(uid)
                    .or_else(|| previous.and_then(|previous| previous.entry(uid)))
                    .map_or_else(|| stored.uid.clone(), |(key, _)| key.clone());
                // Parents interned with the store's keys are kept as they
                // are (no second allocation per entity in a full listing).
                let parents = if stored
                    .parents
                    .iter()
                    .zip(&parent_keys)
                    .all(|(given, key)| Arc::ptr_eq(given, key))
                {
                    stored.parents
                } else {
                    parent_keys.into_boxed_slice()
                };
                Arc::new(StoredEntity {
                    uid: key,
                    stamp: NEXT_STAMP.fetch_add(1, Ordering::Relaxed),
                    parents,
                    attrs: stored.attrs,
                    tags: stored.tags,
                    depth,
                })
            }
        };
        self.put(&value);
        Ok(value)
    }

    /// The stamp of the stored version of `uid`, [`ABSENT`] when not stored.
    pub fn stamp(&self, uid: &EntityUid) -> Stamp {
        self.get(uid).map_or(ABSENT, |stored| stored.stamp)
    }

    /// Removes an entity; its children keep the edge to it (a dangling edge
    /// is harmless for Cedar, and the source sends their own changes).
    pub fn remove(&mut self, uid: &EntityUid) -> bool {
        self.take(uid).is_some()
    }

    /// Applies a change already applied (and checked) on the other copy.
    fn replay(&mut self, change: &Replay) {
        match change {
            Replay::Upsert(value) => self.put(value),
            Replay::Remove(uid) => {
                self.take(uid);
            }
        }
    }

    /// True when `ancestor` is among the ancestors of `entity` that are not
    /// in `seen`; adds those it visits to `seen` (an ancestor seen before
    /// was already found not to lead to `ancestor`).
    fn reaches<'a>(
        &'a self,
        entity: &'a StoredEntity,
        ancestor: &EntityUid,
        seen: &mut Ancestors<'a>,
    ) -> bool {
        let mut pending: Vec<&EntityUid> = entity.parent_uids().collect();
        while let Some(uid) = pending.pop() {
            if uid == ancestor {
                return true;
            }
            if !seen.insert(uid) {
                continue;
            }
            if let Some(entity) = self.get(uid) {
                pending.extend(entity.parent_uids());
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
        Self::from_entities_reusing(
            entities.into_iter().collect(),
            None,
            DEFAULT_MAX_HIERARCHY_DEPTH,
        )
    }

    /// [`EntityStore::from_entities`] for a reconciliation: entities equal
    /// to their version in `previous` keep it (and its stamp).
    pub fn from_entities_reusing(
        entities: Vec<StoredEntity>,
        previous: Option<&EntityStore>,
        max_depth: u32,
    ) -> (EntityStore, Vec<StoreError>) {
        // Rows by index (the last listing of a uid wins), in the listing's
        // own allocation. Nothing here grows by doubling: an outgrown copy
        // is left behind freed but resident, tens of megabytes at a million
        // entities.
        let mut rows: Vec<Option<StoredEntity>> = entities.into_iter().map(Some).collect();
        let mut index: HashMap<Arc<EntityUid>, u32, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(rows.len(), Default::default());
        for at in 0..rows.len() {
            let Some(uid) = rows[at].as_ref().map(|row| row.uid.clone()) else {
                continue;
            };
            // u32 indices: a listing of 2^32 entities would need hundreds of
            // gigabytes before it got here.
            if let Some(before) = index.insert(uid, at as u32) {
                rows[before as usize] = None;
            }
        }
        let mut refused = Vec::new();
        // Every row must have its parents in the listing.
        for row in &mut rows {
            let Some(entity) = row else { continue };
            let missing = entity
                .parent_uids()
                .find(|parent| !index.contains_key(*parent))
                .cloned();
            if let Some(parent) = missing {
                refused.push(StoreError::MissingParent {
                    uid: Box::new(entity.uid().clone()),
                    parent: Box::new(parent),
                });
                *row = None;
            }
        }
        // Parents before children: a depth-first walk up from each row
        // stores its parents first, then the row. It needs a mark per row
        // and a stack as deep as the hierarchy, where a graph of child
        // lists (Kahn's algorithm) took ten million edges for a million
        // users in ten groups each.
        let mut marks = vec![Mark::New; rows.len()];
        // (row, its first parent in `parents`, the next one to look at)
        let mut stack: Vec<(u32, usize, usize)> = Vec::new();
        let mut parents: Vec<u32> = Vec::new();
        let mut store = EntityStore {
            entities: HashMap::with_capacity_and_hasher(rows.len(), Default::default()),
            parent_entities: EntityMap::default(),
            max_depth,
        };
        // Puts row `at` on the walk, its parents' rows after those of the
        // rows below it.
        let open = |at: u32,
                    entity: &StoredEntity,
                    marks: &mut [Mark],
                    parents: &mut Vec<u32>,
                    stack: &mut Vec<(u32, usize, usize)>| {
            let first = parents.len();
            parents.extend(
                entity
                    .parent_uids()
                    .filter_map(|parent| index.get(parent).copied()),
            );
            marks[at as usize] = Mark::Open;
            stack.push((at, first, first));
        };
        for root in 0..rows.len() {
            if marks[root] != Mark::New {
                continue;
            }
            let Some(entity) = &rows[root] else { continue };
            open(root as u32, entity, &mut marks, &mut parents, &mut stack);
            while let Some(&mut (at, first, ref mut next)) = stack.last_mut() {
                if let Some(&parent) = parents.get(*next) {
                    match (marks[parent as usize], &rows[parent as usize]) {
                        (Mark::New, Some(entity)) => {
                            open(parent, entity, &mut marks, &mut parents, &mut stack);
                        }
                        // On a cycle (open: below on this walk), or refused.
                        (Mark::New | Mark::Open | Mark::Left, _) => {
                            marks[at as usize] = Mark::Left;
                            *next += 1;
                        }
                        (Mark::Stored, _) => *next += 1,
                    }
                    continue;
                }
                // Every parent looked at.
                stack.pop();
                parents.truncate(first);
                let at = at as usize;
                if marks[at] == Mark::Left {
                    continue; // left in `rows`, reported below
                }
                // Its parents are stored, so the upsert refuses it only
                // when it would be too deep.
                let stored = match rows[at].take().map(|e| store.upsert_reusing(e, previous)) {
                    Some(Ok(_)) => true,
                    Some(Err(error)) => {
                        refused.push(error);
                        false
                    }
                    None => false,
                };
                marks[at] = if stored { Mark::Stored } else { Mark::Left };
            }
        }
        drop(marks);
        // Whatever is left sits on a cycle or waits on a refused parent.
        let cycles = on_cycles(&rows, &index);
        for (at, entity) in rows.iter().enumerate() {
            let Some(entity) = entity else { continue };
            let uid = entity.uid();
            let parent = entity
                .parent_uids()
                .find(|parent| !store.contains(parent))
                .cloned()
                .unwrap_or_else(|| uid.clone());
            refused.push(if cycles[at] {
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
        may_parent_stored: bool,
    ) -> Result<Vec<Entity>, SliceError> {
        self.walk(roots, Some(overlay), may_parent_stored, |_, _| {})
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
    ) -> Result<Vec<Entity>, SliceError> {
        self.walk(roots, None, true, |uid, stamp| {
            looked_up.push((uid.clone(), stamp.unwrap_or(ABSENT)));
        })
    }

    /// The one traversal behind both slices: overlay entities first, then
    /// stored ones; `stored_lookup` sees every uid looked up in the store
    /// with its stamp (`None`: not there). The slice's hierarchy is
    /// measured before it is returned (Cedar's closure over it recurses
    /// once per level): a stored depth can be out of date after an
    /// ancestor moved, and request entities can put stored ones deeper.
    fn walk(
        &self,
        roots: impl IntoIterator<Item = EntityUid>,
        overlay: Option<&Entities>,
        may_parent_stored: bool,
        mut stored_lookup: impl FnMut(&EntityUid, Option<Stamp>),
    ) -> Result<Vec<Entity>, SliceError> {
        let mut seen: HashSet<EntityUid> = HashSet::new();
        let mut pending: Vec<EntityUid> = roots.into_iter().collect();
        let mut slice = Vec::new();
        let mut graph = SliceGraph::default();
        while let Some(uid) = pending.pop() {
            if seen.contains(&uid) {
                continue;
            }
            if let Some(entity) = overlay.and_then(|overlay| overlay.get(&uid)) {
                let mut out = Vec::new();
                entity_references(entity, &mut out);
                let ancestors: Vec<EntityUid> = overlay
                    .into_iter()
                    .flat_map(|overlay| overlay.ancestors(&uid).into_iter().flatten())
                    .cloned()
                    .collect();
                out.extend(ancestors.iter().cloned());
                pending.extend(out.into_iter().filter(|uid| !seen.contains(uid)));
                graph.add(uid.clone(), ancestors);
                slice.push(entity.clone());
            } else {
                let stored = self.get(&uid);
                stored_lookup(&uid, stored.map(|stored| stored.stamp));
                if let Some(stored) = stored {
                    let mut follow = |next: &EntityUid| {
                        if !seen.contains(next) {
                            pending.push(next.clone());
                        }
                    };
                    stored.parent_uids().for_each(&mut follow);
                    stored.references(follow);
                    if let (Some(overlay), false) = (overlay, may_parent_stored) {
                        refuse_overlay_parent(&uid, stored.parent_uids(), overlay)?;
                    }
                    if !stored.parents.is_empty() {
                        graph.add(uid.clone(), stored.parent_uids().cloned().collect());
                    }
                    slice.push(stored.to_entity()?);
                }
            }
            seen.insert(uid);
        }
        graph.check(self.max_depth)?;
        Ok(slice)
    }

    /// True when every recorded uid still has the recorded stamp here.
    pub fn unchanged(&self, looked_up: &[(EntityUid, Stamp)]) -> bool {
        looked_up
            .iter()
            .all(|(uid, stamp)| self.stamp(uid) == *stamp)
    }
}

/// A change as applied to one copy, to apply to the other: the stored
/// value itself, so both copies share it (and its stamp).
#[derive(Debug)]
enum Replay {
    Upsert(Arc<StoredEntity>),
    Remove(Arc<EntityUid>),
}

/// How long a write waits for the last decisions on the spare copy to
/// finish before it copies the live one instead (decisions take
/// microseconds; this bounds the sync's stall on a descheduled one).
const SPARE_WAIT: Duration = Duration::from_millis(2);

/// The one writer of a store that decisions read while it changes: the
/// copy published last (`live`) and a spare one behind it by the last
/// batch. See the module documentation.
#[derive(Debug, Default)]
pub struct StoreWriter {
    live: Arc<EntityStore>,
    spare: Option<Arc<EntityStore>>,
    /// The last batch: applied to `live`, not yet to `spare`.
    behind: Vec<Replay>,
}

impl StoreWriter {
    pub fn new(store: EntityStore) -> Self {
        StoreWriter {
            live: Arc::new(store),
            spare: None,
            behind: Vec::new(),
        }
    }

    /// The copy to publish: it has every batch written so far.
    pub fn store(&self) -> &Arc<EntityStore> {
        &self.live
    }

    /// A writer whose spare copy is made now: for a full sync, off the
    /// runtime's workers, so that the first change after it does not copy
    /// the map (a tenth of a second at a million entities, on the sync's
    /// path between that change's commit and its decisions).
    pub fn with_spare(store: EntityStore) -> Self {
        metrics::counter!("arbiter_identity_store_copies_total").increment(1);
        let spare = Arc::new(store.clone());
        StoreWriter {
            live: Arc::new(store),
            spare: Some(spare),
            behind: Vec::new(),
        }
    }

    /// Writes one batch on the spare copy and makes it the live one. The
    /// copy that was live becomes the spare, to catch up on this batch at
    /// the next write.
    pub fn write<R>(&mut self, batch: impl FnOnce(&mut StoreBatch<'_>) -> R) -> R {
        let mut copy = match self.spare.take().map(exclusive) {
            Some(Ok(mut spare)) => {
                // Ours alone now: `make_mut` copies nothing.
                let store = Arc::make_mut(&mut spare);
                for change in &self.behind {
                    store.replay(change);
                }
                spare
            }
            // No spare (a writer made by `new`), or a snapshot still holds it.
            Some(Err(_)) | None => {
                metrics::counter!("arbiter_identity_store_copies_total").increment(1);
                Arc::new(EntityStore::clone(&self.live))
            }
        };
        let mut changes = Vec::new();
        let result = batch(&mut StoreBatch {
            store: Arc::make_mut(&mut copy),
            changes: &mut changes,
        });
        self.behind = changes;
        self.spare = Some(std::mem::replace(&mut self.live, copy));
        result
    }
}

/// The spare copy once no snapshot holds it, or back when one still does
/// after [`SPARE_WAIT`].
fn exclusive(mut spare: Arc<EntityStore>) -> Result<Arc<EntityStore>, Arc<EntityStore>> {
    let deadline = Instant::now() + SPARE_WAIT;
    loop {
        if Arc::get_mut(&mut spare).is_some() {
            return Ok(spare);
        }
        if Instant::now() >= deadline {
            return Err(spare);
        }
        std::thread::yield_now();
    }
}

/// One batch being written: [`EntityStore::upsert`] and
/// [`EntityStore::remove`] on the copy being written, recorded for the
/// other one.
pub struct StoreBatch<'a> {
    store: &'a mut EntityStore,
    changes: &'a mut Vec<Replay>,
}

impl StoreBatch<'_> {
    pub fn upsert(&mut self, stored: StoredEntity) -> Result<(), StoreError> {
        let value = self.store.upsert_reusing(stored, None)?;
        self.changes.push(Replay::Upsert(value));
        Ok(())
    }

    pub fn remove(&mut self, uid: &EntityUid) -> bool {
        match self.store.take(uid) {
            Some(key) => {
                self.changes.push(Replay::Remove(key));
                true
            }
            None => false,
        }
    }
}

/// Where a row of a full listing is in [`EntityStore::from_entities_reusing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    New,
    /// On the walk: its parents are being stored.
    Open,
    Stored,
    /// Refused, or waiting on a parent that is refused or on a cycle.
    Left,
}

/// For each row left in `rows`, whether it is on a cycle of parents among
/// the rows left (Tarjan's strongly connected components, with a stack of
/// its own). Linear: a walk up from each row was quadratic in a long chain
/// left below a refused entity.
fn on_cycles(
    rows: &[Option<StoredEntity>],
    index: &HashMap<Arc<EntityUid>, u32, foldhash::fast::RandomState>,
) -> Vec<bool> {
    const UNSEEN: u32 = u32::MAX;
    struct Walk {
        order: Vec<u32>,
        low: Vec<u32>,
        on_stack: Vec<bool>,
        component: Vec<u32>,
        next_order: u32,
        // (row, its parents, the next parent to look at)
        path: Vec<(u32, Vec<u32>, usize)>,
    }
    impl Walk {
        fn enter(&mut self, at: u32, parents: Vec<u32>) {
            self.order[at as usize] = self.next_order;
            self.low[at as usize] = self.next_order;
            self.next_order += 1;
            self.on_stack[at as usize] = true;
            self.component.push(at);
            self.path.push((at, parents, 0));
        }
    }
    let parents_of = |at: usize| -> Vec<u32> {
        rows[at]
            .iter()
            .flat_map(|entity| entity.parent_uids())
            .filter_map(|parent| index.get(parent).copied())
            .filter(|&parent| rows[parent as usize].is_some())
            .collect()
    };
    let mut on_cycle = vec![false; rows.len()];
    let mut walk = Walk {
        order: vec![UNSEEN; rows.len()],
        low: vec![0; rows.len()],
        on_stack: vec![false; rows.len()],
        component: Vec::new(),
        next_order: 0,
        path: Vec::new(),
    };
    for (root, row) in rows.iter().enumerate() {
        if row.is_none() || walk.order[root] != UNSEEN {
            continue;
        }
        walk.enter(root as u32, parents_of(root));
        while let Some((at, parents, next)) = walk.path.last_mut() {
            let at = *at as usize;
            if let Some(&parent) = parents.get(*next) {
                *next += 1;
                let p = parent as usize;
                if p == at {
                    on_cycle[at] = true;
                }
                if walk.order[p] == UNSEEN {
                    walk.enter(parent, parents_of(p));
                } else if walk.on_stack[p] {
                    walk.low[at] = walk.low[at].min(walk.order[p]);
                }
                continue;
            }
            walk.path.pop();
            if let Some((child, _, _)) = walk.path.last() {
                let child = *child as usize;
                walk.low[child] = walk.low[child].min(walk.low[at]);
            }
            if walk.low[at] == walk.order[at] {
                // `at` roots a component: everything above it on the stack.
                let mut members = Vec::new();
                while let Some(member) = walk.component.pop() {
                    walk.on_stack[member as usize] = false;
                    members.push(member);
                    if member as usize == at {
                        break;
                    }
                }
                if members.len() > 1 {
                    for member in members {
                        on_cycle[member as usize] = true;
                    }
                }
            }
        }
    }
    on_cycle
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
        StoredEntity::from_entity(&entity, parents).unwrap()
    }

    #[test]
    fn every_kind_of_value_comes_back_as_the_same_cedar_entity() {
        let json = serde_json::json!({
            "uid": {"type": "App::User", "id": "alice"},
            "attrs": {
                "active": true,
                "level": -7,
                "email": "a-long-address-past-the-inline-limit@example.test",
                "short": "eng",
                "manager": {"__entity": {"type": "App::User", "id": "bob"}},
                "groups": [{"__entity": {"type": "G", "id": "a"}}, "x", 3],
                "address": {"city": "Oslo", "zip": {"code": 150, "extra": []}},
                "net": {"__extn": {"fn": "ip", "arg": "10.0.0.0/8"}},
                "limit": {"__extn": {"fn": "decimal", "arg": "12.5000"}},
                "since": {"__extn": {"fn": "datetime", "arg": "2026-01-02"}},
                "ttl": {"__extn": {"fn": "duration", "arg": "1h30m"}}
            },
            "parents": [{"type": "G", "id": "a"}],
            "tags": {"owner": "team-1", "scope": {"__entity": {"type": "T", "id": "t1"}}}
        });
        let original = Entity::from_json_value(json, None).unwrap();
        let parents = vec![uid(r#"G::"a""#)];
        let stored = StoredEntity::from_entity(&original, parents).unwrap();
        let rebuilt = stored.to_entity().unwrap();
        assert_eq!(
            rebuilt.to_json_value().unwrap(),
            original.to_json_value().unwrap()
        );
        let mut references = Vec::new();
        stored.references(|uid| references.push(uid.to_string()));
        references.sort();
        assert_eq!(
            references,
            [r#"App::User::"bob""#, r#"G::"a""#, r#"T::"t1""#]
        );
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
        // A diamond: two parents share the ancestors the walk visits once;
        // a cycle found through the second parent names that parent.
        store.upsert(entity(r#"G::"c""#, &[r#"G::"a""#])).unwrap();
        store
            .upsert(entity(r#"G::"d""#, &[r#"G::"b""#, r#"G::"c""#]))
            .unwrap();
        store.upsert(entity(r#"G::"e""#, &[r#"G::"d""#])).unwrap();
        let cycle = store.upsert(entity(r#"G::"c""#, &[r#"G::"b""#, r#"G::"e""#]));
        assert_eq!(
            cycle.unwrap_err(),
            StoreError::Cycle {
                uid: Box::new(uid(r#"G::"c""#)),
                parent: Box::new(uid(r#"G::"e""#)),
            }
        );
        store.upsert(entity(r#"G::"c""#, &[r#"G::"b""#])).unwrap();
    }

    #[test]
    fn a_writer_made_with_its_spare_writes_without_copying_and_keeps_both_in_step() {
        let (store, _) = EntityStore::from_entities([entity(r#"G::"a""#, &[])]);
        let mut writer = StoreWriter::with_spare(store);
        let first = writer.store().clone();
        let spare = writer.spare.clone().unwrap();
        assert!(!Arc::ptr_eq(&first, &spare));
        assert_eq!(spare.len(), 1);
        drop((first, spare));
        writer.write(|batch| batch.upsert(entity(r#"U::"u1""#, &[r#"G::"a""#])).unwrap());
        writer.write(|batch| batch.upsert(entity(r#"U::"u2""#, &[r#"G::"a""#])).unwrap());
        // Both copies are the two made at the start (nothing copied since),
        // and the spare is one batch behind.
        let live = writer.store().clone();
        let spare = writer.spare.clone().unwrap();
        assert_eq!((live.len(), spare.len()), (3, 2));
        drop((live, spare));
        writer.write(|_| ());
        let live = writer.store().clone();
        assert_eq!(live.len(), 3);
        assert!(live.contains(&uid(r#"U::"u2""#)));
    }

    #[test]
    fn the_writer_never_changes_a_published_copy_and_both_copies_converge() {
        let (store, _) = EntityStore::from_entities([entity(r#"G::"a""#, &[])]);
        let mut writer = StoreWriter::new(store);
        let user = |name: &str| uid(&format!(r#"U::"{name}""#));
        writer.write(|batch| batch.upsert(entity(r#"U::"u1""#, &[r#"G::"a""#])).unwrap());
        let held = writer.store().clone();
        writer.write(|batch| batch.upsert(entity(r#"U::"u2""#, &[r#"G::"a""#])).unwrap());
        // `held` is the spare now and still held: the write copies the live
        // one instead of waiting for it.
        writer.write(|batch| {
            batch.upsert(entity(r#"U::"u3""#, &[])).unwrap();
            assert!(batch.remove(&user("u1")));
            assert!(!batch.remove(&user("nobody")));
        });
        assert!(held.contains(&user("u1")) && !held.contains(&user("u2")));
        assert_eq!(held.len(), 2);
        let before_last = writer.store().clone();
        drop(held);
        drop(before_last);
        // The spare is free again: caught up on the batch before, then written.
        let refused = writer.write(|batch| batch.upsert(entity(r#"U::"u4""#, &[r#"G::"zz""#])));
        assert_eq!(refused.unwrap_err().kind(), "missing_parent");
        writer.write(|batch| batch.upsert(entity(r#"U::"u4""#, &[r#"G::"a""#])).unwrap());
        let live = writer.store().clone();
        let names = |store: &EntityStore| {
            let mut names: Vec<String> = store.iter().map(|e| e.uid().to_string()).collect();
            names.sort();
            names
        };
        assert_eq!(
            names(&live),
            [r#"G::"a""#, r#"U::"u2""#, r#"U::"u3""#, r#"U::"u4""#]
        );
        // The next write starts from the other copy: the same entities, the
        // very same stored values (so the same stamps).
        let spare_before = Arc::as_ptr(writer.spare.as_ref().unwrap());
        writer.write(|_| {});
        assert_eq!(Arc::as_ptr(writer.store()), spare_before);
        assert_eq!(names(writer.store()), names(&live));
        for entity in live.iter() {
            let other = writer.store().get(entity.uid()).unwrap();
            assert!(Arc::ptr_eq(entity, other), "{}", entity.uid());
        }
    }

    #[test]
    fn parents_looked_up_first_are_the_stored_versions_in_both_copies() {
        let (store, _) = EntityStore::from_entities([
            entity(r#"G::"a""#, &[]),
            entity(r#"G::"b""#, &[]),
            entity(r#"U::"u""#, &[r#"G::"b""#]),
        ]);
        let mut writer = StoreWriter::with_spare(store);
        let parents_of = |store: &EntityStore, id: &str| -> Option<Vec<String>> {
            let stored = store.get(&uid(id))?;
            Some(stored.parent_uids().map(ToString::to_string).collect())
        };
        // Each step is written, then checked on the live copy and, after an
        // empty write that replays it, on the other copy.
        let mut check =
            |step: &dyn Fn(&mut StoreBatch<'_>), b: Option<&[&str]>, edge_accepted: bool| {
                writer.write(|batch| step(batch));
                for _ in 0..2 {
                    let store = writer.store().clone();
                    let expected = b.map(|b| b.iter().map(ToString::to_string).collect());
                    assert_eq!(parents_of(&store, r#"G::"b""#), expected);
                    assert_eq!(store.contains(&uid(r#"G::"b""#)), b.is_some());
                    assert_eq!(store.stamp(&uid(r#"G::"b""#)) != ABSENT, b.is_some());
                    let child = store
                        .slice_with_overlay([uid(r#"U::"u""#)], &Entities::empty(), true)
                        .unwrap();
                    // The user, then `b` and its parents when `b` is stored.
                    assert_eq!(child.len(), 1 + b.map_or(0, |b| 1 + b.len()));
                    drop(store);
                    writer.write(|_| {});
                }
                let accepted = writer
                    .write(|batch| batch.upsert(entity(r#"U::"v""#, &[r#"G::"b""#])))
                    .is_ok();
                assert_eq!(accepted, edge_accepted);
            };
        // A parent changes: the new version is seen, through its children
        // too.
        check(
            &|batch| batch.upsert(entity(r#"G::"b""#, &[r#"G::"a""#])).unwrap(),
            Some(&[r#"G::"a""#]),
            true,
        );
        // Removed: gone, and a new edge to it is refused.
        check(
            &|batch| assert!(batch.remove(&uid(r#"G::"b""#))),
            None,
            false,
        );
        // Stored again: found, and edges to it are accepted again.
        check(
            &|batch| batch.upsert(entity(r#"G::"b""#, &[])).unwrap(),
            Some(&[]),
            true,
        );
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
        let mut kinds: Vec<(String, &str)> = refused
            .iter()
            .map(|error| (error.uid().to_string(), error.kind()))
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            [
                (r#"G::"a""#.to_string(), "cycle"),
                (r#"G::"b""#.to_string(), "cycle"),
                (r#"U::"v""#.to_string(), "parent_refused"),
                (r#"U::"w""#.to_string(), "missing_parent"),
            ]
        );
    }

    #[test]
    fn full_listing_in_any_order_stores_parents_first_and_the_last_listing_wins() {
        // A chain listed child first, a row listed twice, a self-loop, and
        // the child of a row whose parent is missing.
        let (store, refused) = EntityStore::from_entities([
            entity(r#"U::"u""#, &[r#"G::"c""#, r#"G::"a""#]),
            entity(r#"G::"c""#, &[r#"G::"b""#]),
            entity(r#"G::"b""#, &[r#"G::"a""#]),
            entity(r#"G::"a""#, &[]),
            entity(r#"U::"twice""#, &[r#"G::"nope""#]),
            entity(r#"U::"twice""#, &[r#"G::"b""#]),
            entity(r#"G::"self""#, &[r#"G::"self""#]),
            entity(r#"G::"orphan""#, &[r#"G::"nope""#]),
            entity(r#"U::"x""#, &[r#"G::"orphan""#]),
        ]);
        let kinds: Vec<&str> = refused.iter().map(StoreError::kind).collect();
        assert_eq!(refused.len(), 3, "{refused:?}");
        assert!(kinds.contains(&"cycle") && kinds.contains(&"missing_parent"));
        assert!(kinds.contains(&"parent_refused"));
        assert_eq!(store.len(), 5);
        let parents = |id: &str| -> Vec<String> {
            store
                .get(&uid(id))
                .unwrap()
                .parent_uids()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(parents(r#"U::"twice""#), [r#"G::"b""#]);
        assert_eq!(parents(r#"U::"u""#), [r#"G::"c""#, r#"G::"a""#]);
        // Edges point at the parents' own keys.
        let (c_key, _) = store.entities.get_key_value(&uid(r#"G::"c""#)).unwrap();
        assert!(Arc::ptr_eq(
            &store.get(&uid(r#"U::"u""#)).unwrap().parents[0],
            c_key
        ));
    }

    #[test]
    fn slice_follows_ancestors() {
        let (store, _) = EntityStore::from_entities([
            entity(r#"G::"a""#, &[]),
            entity(r#"G::"b""#, &[r#"G::"a""#]),
            entity(r#"U::"u""#, &[r#"G::"b""#]),
            entity(r#"U::"other""#, &[]),
        ]);
        let slice = store
            .slice_with_overlay([uid(r#"U::"u""#)], &Entities::empty(), true)
            .unwrap();
        assert_eq!(slice.len(), 3);
    }

    /// A chain `G::"g0"` (top) .. `G::"g{n-1}"`, parents first.
    fn chain(n: usize) -> Vec<StoredEntity> {
        (0..n)
            .map(|i| {
                let parent = format!(r#"G::"g{}""#, i.wrapping_sub(1));
                let parents: Vec<&str> = if i == 0 { vec![] } else { vec![&parent] };
                entity(&format!(r#"G::"g{i}""#), &parents)
            })
            .collect()
    }

    #[test]
    fn a_listing_deeper_than_the_limit_is_refused_below_it() {
        // 10,000 levels: the 33rd and below are refused, not stored, in
        // one linear pass (a walk of every chain took quadratic time).
        let (store, refused) = EntityStore::from_entities_reusing(chain(10_000), None, 32);
        assert_eq!(store.len(), 33);
        assert_eq!(refused.len(), 10_000 - 33);
        let too_deep: Vec<_> = refused.iter().filter(|e| e.kind() == "too_deep").collect();
        assert_eq!(too_deep.len(), 1, "{too_deep:?}");
        assert_eq!(too_deep[0].uid(), &uid(r#"G::"g33""#));
        assert!(too_deep[0].to_string().contains("more than 32 ancestors"));
        assert!(
            refused
                .iter()
                .all(|e| matches!(e.kind(), "too_deep" | "parent_refused"))
        );
        // A change that would go deeper is refused the same way.
        let mut store = store;
        let error = store
            .upsert(entity(r#"U::"u""#, &[r#"G::"g32""#]))
            .unwrap_err();
        assert_eq!(error.kind(), "too_deep");
        store.upsert(entity(r#"U::"u""#, &[r#"G::"g31""#])).unwrap();
    }

    #[test]
    fn a_slice_made_too_deep_by_a_moved_ancestor_is_refused_not_handed_to_cedar() {
        // Two chains of 20 each within the limit; then the top of one is put
        // under the bottom of the other. Its descendants' stored depths are
        // now out of date (a move does not fan out), and their true chain
        // is 40 long: the slice's own measure catches it.
        let mut store = EntityStore::with_max_depth(32);
        for i in 0..20 {
            let parent = format!(r#"A::"{}""#, i as i64 - 1);
            let parents: Vec<&str> = if i == 0 { vec![] } else { vec![&parent] };
            store
                .upsert(entity(&format!(r#"A::"{i}""#), &parents))
                .unwrap();
            let parent = format!(r#"B::"{}""#, i as i64 - 1);
            let parents: Vec<&str> = if i == 0 { vec![] } else { vec![&parent] };
            store
                .upsert(entity(&format!(r#"B::"{i}""#), &parents))
                .unwrap();
        }
        store.upsert(entity(r#"A::"0""#, &[r#"B::"19""#])).unwrap();
        let error = store
            .slice_with_overlay([uid(r#"A::"19""#)], &Entities::empty(), true)
            .unwrap_err();
        assert!(
            matches!(
                error,
                SliceError::Hierarchy(crate::engine::hierarchy::HierarchyError::TooDeep {
                    max: 32,
                    ..
                })
            ),
            "{error}"
        );
        // A slice that stays within the limit is served.
        assert_eq!(
            store
                .slice_with_overlay([uid(r#"B::"19""#)], &Entities::empty(), true)
                .unwrap()
                .len(),
            20
        );
    }
}
