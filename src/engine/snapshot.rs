//! The immutable state a decision reads: a policy set with its schema, and
//! the entity data. Built off the hot path, published by an atomic swap, and
//! read by reference: a decision never copies a whole policy set or store.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use super::compiled_policies::CompiledPolicies;
use super::decision_cache::DecisionCache;
use super::entity_store::EntityStore;
use super::error::RequestError;
use super::explain::scope_policies;
use super::options::{LoadOptions, OnEvaluationError, RequestEntitiesMode, RequestLimits};
use super::policy_index::PolicyIndex;
use super::request_schema::RequestSchema;
pub(crate) use super::slice::collect_uids;
use super::slice::{
    MaterializeError, SliceError, SliceGraph, entity_references, refuse_overlay_parent,
};
use super::slice_cache::SliceCache;
use cedar_policy::{
    Authorizer, Entities, Entity, EntityUid, Policy, PolicySet, Request, Response, Schema,
};

/// Everything one decision needs, swapped as one unit so that a request sees
/// the whole old state or the whole new state, never a mix.
#[derive(Debug)]
pub struct Snapshot {
    pub policies: Arc<PolicySnapshot>,
    pub data: Arc<EntityData>,
    /// Answers given from this state are cached under `generation`.
    pub(crate) decisions: Option<Arc<DecisionCache>>,
    /// Unique to this snapshot in the process.
    pub(crate) generation: u64,
    pub(crate) decision_cache_capacity: u64,
    /// Prepared slices of synced data; shared by the snapshots of one
    /// policy set (set by the engine, which owns it).
    pub(crate) slices: Option<Arc<SliceCache>>,
    pub(crate) slice_cache_capacity: u64,
}

impl Snapshot {
    /// `decision_cache_capacity` decisions are remembered (0: none);
    /// `slice_cache_capacity` entities of prepared slices, when the data is
    /// synced (0: none).
    pub fn new(
        policies: Arc<PolicySnapshot>,
        data: Arc<EntityData>,
        decision_cache_capacity: u64,
        slice_cache_capacity: u64,
    ) -> Self {
        let decisions = DecisionCache::new(decision_cache_capacity).map(Arc::new);
        Self::with_caches(
            policies,
            data,
            decisions,
            decision_cache_capacity,
            slice_cache_capacity,
        )
    }

    /// A snapshot that shares `decisions` (the engine's, for synced data).
    pub(crate) fn with_caches(
        policies: Arc<PolicySnapshot>,
        data: Arc<EntityData>,
        decisions: Option<Arc<DecisionCache>>,
        decision_cache_capacity: u64,
        slice_cache_capacity: u64,
    ) -> Self {
        static GENERATIONS: AtomicU64 = AtomicU64::new(0);
        Snapshot {
            policies,
            data,
            decisions,
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            decision_cache_capacity,
            slices: None,
            slice_cache_capacity,
        }
    }
}

/// A parsed, validated policy set and the schema it was validated against.
#[derive(Debug)]
pub struct PolicySnapshot {
    pub policies: PolicySet,
    pub schema: Option<Schema>,
    /// Changes whenever the policies or the schema change.
    pub revision: Arc<str>,
    /// Validate requests against the schema (when there is one).
    pub validate_requests: bool,
    pub on_evaluation_error: OnEvaluationError,
    /// How a request's own entities combine with the stored ones.
    pub request_entities: RequestEntitiesMode,
    /// Bounds on what one request may carry.
    pub limits: RequestLimits,
    /// Entities named literally in some policy: a request-scoped slice of the
    /// store must contain them, since a policy can reach them without going
    /// through the request.
    pub(crate) literal_uids: Box<[EntityUid]>,
    /// The actions the schema declares, to name an unknown action as such
    /// before its context is parsed against the schema.
    pub(crate) declared_actions: HashSet<EntityUid>,
    /// The schema's action entities (with their action groups), for data
    /// that does not carry them (synced identity data).
    pub(crate) action_entities: Option<Entities>,
    /// The policies by scope, when the set is large enough for it to pay.
    index: Option<PolicyIndex>,
    /// Each policy's scope as a policy of its own, derived on the first
    /// explain (never on the decision path).
    explain_scopes: OnceLock<Result<PolicySet, String>>,
    /// Type names and per-action request shapes, compiled from the schema.
    pub(crate) request_schema: RequestSchema,
    /// The whole set's conditions, when the set is not indexed.
    compiled: Option<CompiledPolicies>,
}

impl PolicySnapshot {
    pub fn new(
        policies: PolicySet,
        schema: Option<Schema>,
        revision: Arc<str>,
        options: LoadOptions,
    ) -> Self {
        let mut literals: HashSet<EntityUid> = HashSet::new();
        for policy in policies.policies() {
            literals.extend(policy.entity_literals());
        }
        let index = (policies.num_of_policies() >= options.policy_index_min)
            .then(|| PolicyIndex::new(&policies))
            .flatten();
        let request_schema =
            RequestSchema::new(schema.as_ref(), literals.iter().map(EntityUid::type_name));
        let compiled = index.is_none().then(|| CompiledPolicies::new(&policies));
        PolicySnapshot {
            index,
            explain_scopes: OnceLock::new(),
            request_schema,
            compiled,
            declared_actions: schema
                .as_ref()
                .map(|schema| schema.actions().cloned().collect())
                .unwrap_or_default(),
            action_entities: schema
                .as_ref()
                .and_then(|schema| schema.action_entities().ok()),
            policies,
            schema,
            revision,
            validate_requests: options.validate_requests,
            on_evaluation_error: options.on_evaluation_error,
            request_entities: options.request_entities,
            limits: options.limits,
            literal_uids: literals.into_iter().collect(),
        }
    }

    pub fn policy_count(&self) -> usize {
        self.policies.num_of_policies()
    }

    /// An action the schema declares (or one of its action groups).
    pub(crate) fn is_action(&self, uid: &EntityUid) -> bool {
        self.declared_actions.contains(uid)
            || self
                .action_entities
                .as_ref()
                .is_some_and(|actions| actions.get(uid).is_some())
    }

    /// Cedar's answer to `request` from this policy set: the same as
    /// `authorizer.is_authorized(request, &self.policies, entities)`, from
    /// the policies whose scope can match when the set is indexed.
    pub(crate) fn authorize(
        &self,
        authorizer: &Authorizer,
        request: &Request,
        entities: &Entities,
    ) -> Response {
        match (&self.index, &self.compiled) {
            (Some(index), _) => index.authorize(authorizer, request, entities, &self.policies),
            (None, Some(compiled)) => compiled.authorize(request, entities),
            (None, None) => authorizer.is_authorized(request, &self.policies, entities),
        }
    }

    /// The policies whose scope can match `request` (the index's
    /// candidates, else the whole set), in the set's order. For explain.
    pub(crate) fn scope_candidates(&self, request: &Request, entities: &Entities) -> Vec<&Policy> {
        let ids = self
            .index
            .as_ref()
            .and_then(|index| index.candidate_ids(request, entities));
        match ids {
            Some(ids) => ids
                .into_iter()
                .filter_map(|id| self.policies.policy(id))
                .collect(),
            None => self.policies.policies().collect(),
        }
    }

    /// Each policy's scope as a policy of its own, for explain.
    pub(crate) fn explain_scopes(&self) -> Result<&PolicySet, RequestError> {
        self.explain_scopes
            .get_or_init(|| scope_policies(&self.policies))
            .as_ref()
            .map_err(|message| RequestError::Internal(message.clone()))
    }

    /// Whether decisions go through the policy index.
    pub fn indexed(&self) -> bool {
        self.index.is_some()
    }

    /// How many policies the index would evaluate for `request` (`None`
    /// when the set is not indexed or the request is not concrete). For
    /// tests and benchmarks.
    #[doc(hidden)]
    pub fn candidate_count(&self, request: &Request, entities: &Entities) -> Option<usize> {
        self.index
            .as_ref()?
            .candidates(request, entities)
            .map(|candidates| candidates.len())
    }
}

/// The entity data a decision reads: either one Cedar `Entities` read from a
/// file, or Arbiter's incremental [`EntityStore`] kept in sync with an
/// identity source.
#[derive(Debug)]
pub struct EntityData {
    /// Version of this data: a content hash for a file, the source position
    /// (e.g. the change-log sequence) for a synced source.
    pub revision: Arc<str>,
    /// The numeric source position, when the source has one; what
    /// `min_data_revision` compares against.
    pub position: Option<u64>,
    backing: Backing,
}

#[derive(Debug)]
enum Backing {
    Whole {
        entities: Entities,
        /// For every entity, the entities it leads to: its ancestors and the
        /// entities its attributes and tags reference. Precomputed so a
        /// request-scoped slice is a graph walk, not a scan of attribute values.
        references: HashMap<EntityUid, Box<[EntityUid]>>,
    },
    Store(Arc<EntityStore>),
}

impl EntityData {
    pub fn new(entities: Entities, revision: Arc<str>) -> Self {
        let mut references = HashMap::with_capacity(entities.len());
        for entity in entities.iter() {
            let uid = entity.uid();
            let mut out = Vec::new();
            out.extend(entities.ancestors(&uid).into_iter().flatten().cloned());
            entity_references(entity, &mut out);
            if !out.is_empty() {
                references.insert(uid, out.into_boxed_slice());
            }
        }
        EntityData {
            revision,
            position: None,
            backing: Backing::Whole {
                entities,
                references,
            },
        }
    }

    /// Data from a synced source at `position` (its revision is the position).
    pub fn from_store(store: Arc<EntityStore>, position: u64) -> Self {
        EntityData {
            revision: Arc::from(position.to_string()),
            position: Some(position),
            backing: Backing::Store(store),
        }
    }

    /// The whole store as one Cedar `Entities`, for file data.
    pub fn whole(&self) -> Option<&Entities> {
        match &self.backing {
            Backing::Whole { entities, .. } => Some(entities),
            Backing::Store(_) => None,
        }
    }

    /// The synced store, when the data is not one Cedar `Entities`.
    pub(crate) fn store(&self) -> Option<&EntityStore> {
        match &self.backing {
            Backing::Whole { .. } => None,
            Backing::Store(store) => Some(store),
        }
    }

    /// One stored entity, as Cedar's entity.
    pub fn get(&self, uid: &EntityUid) -> Result<Option<Entity>, MaterializeError> {
        match &self.backing {
            Backing::Whole { entities, .. } => Ok(entities.get(uid).cloned()),
            Backing::Store(store) => store.get(uid).map(|stored| stored.to_entity()).transpose(),
        }
    }

    /// Whether `uid` is stored.
    pub fn contains(&self, uid: &EntityUid) -> bool {
        match &self.backing {
            Backing::Whole { entities, .. } => entities.get(uid).is_some(),
            Backing::Store(store) => store.contains(uid),
        }
    }

    pub fn len(&self) -> usize {
        match &self.backing {
            Backing::Whole { entities, .. } => entities.len(),
            Backing::Store(store) => store.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entities reachable from `roots`, with `overlay` entities taking
    /// the place of stored ones with the same uid. Evaluating against this
    /// slice gives the same answer as evaluating against the whole store with
    /// the overlay merged in, because Cedar can reach an entity only from the
    /// request, the context, policy literals, or another reachable entity.
    /// The slice's hierarchy is measured against `max_depth` (file data; a
    /// synced store has its own limit) before Cedar computes its closure.
    /// Unless `may_parent_stored`, an overlay entity that a stored entity
    /// names as a parent (an edge left dangling in the store) is refused.
    pub fn slice_with_overlay(
        &self,
        roots: impl IntoIterator<Item = EntityUid>,
        overlay: &Entities,
        max_depth: u32,
        may_parent_stored: bool,
    ) -> Result<Vec<Entity>, SliceError> {
        let (entities, references) = match &self.backing {
            Backing::Whole {
                entities,
                references,
            } => (entities, references),
            Backing::Store(store) => {
                return store.slice_with_overlay(roots, overlay, may_parent_stored);
            }
        };
        let mut seen: HashSet<EntityUid> = HashSet::new();
        let mut pending: Vec<EntityUid> = roots.into_iter().collect();
        let mut slice = Vec::new();
        let mut graph = SliceGraph::default();
        while let Some(uid) = pending.pop() {
            if !seen.insert(uid.clone()) {
                continue;
            }
            if let Some(entity) = overlay.get(&uid) {
                // The request's copy wins; follow its own references, and
                // its parents so their ancestors join the closure.
                let mut out = Vec::new();
                entity_references(entity, &mut out);
                let ancestors: Vec<EntityUid> = overlay
                    .ancestors(&uid)
                    .into_iter()
                    .flatten()
                    .cloned()
                    .collect();
                out.extend(ancestors.iter().cloned());
                pending.extend(out.into_iter().filter(|uid| !seen.contains(uid)));
                graph.add(uid, ancestors);
                slice.push(entity.clone());
            } else if let Some(entity) = entities.get(&uid) {
                if let Some(references) = references.get(&uid) {
                    pending.extend(
                        references
                            .iter()
                            .filter(|uid| !seen.contains(*uid))
                            .cloned(),
                    );
                }
                let ancestors: Vec<EntityUid> = entities
                    .ancestors(&uid)
                    .into_iter()
                    .flatten()
                    .cloned()
                    .collect();
                if !may_parent_stored {
                    refuse_overlay_parent(&uid, &ancestors, overlay)?;
                }
                if !ancestors.is_empty() {
                    graph.add(uid, ancestors);
                }
                slice.push(entity.clone());
            }
        }
        graph.check(max_depth)?;
        Ok(slice)
    }
}
