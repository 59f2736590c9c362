//! An index of the policy set by scope, so a decision evaluates only the
//! policies whose scope can match the request.
//!
//! Why it is exact: Cedar evaluates a policy as `principal-scope &&
//! action-scope && resource-scope && conditions`, left to right and
//! short-circuiting, and a scope test (`==`, `in`, `is`) never errors (an
//! entity missing from the data just has no ancestors). So a policy whose
//! scope fails is false without error: it is neither a reason nor an error,
//! and leaving it out changes nothing. The index only has to return a
//! superset of the policies whose scope holds; Cedar then evaluates those
//! as usual. Cedar evaluates a policy set in insertion order and lists
//! errors in that order, so a candidate set keeps the full set's order.
//!
//! Scope tests read the same data Cedar's evaluator does: the request's
//! uids and their ancestors in the `Entities` the decision evaluates
//! against (the action's groups included), so `in` is resolved exactly as
//! Cedar resolves it.
//!
//! Built once per policy set (off the hot path). A candidate set becomes a
//! Cedar `PolicySet` and then its compiled conditions (`CompiledPolicies`),
//! memoised per distinct candidate set in a bounded `moka` cache, so a
//! decision usually does lookups and no building.

use std::collections::HashMap;
use std::sync::Arc;

use cedar_policy::{
    ActionConstraint, Authorizer, Entities, EntityTypeName, EntityUid, Policy, PolicyId, PolicySet,
    PrincipalConstraint, Request, ResourceConstraint, Response,
};

use super::compiled_policies::CompiledPolicies;

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

pub use super::options::DEFAULT_POLICY_INDEX_MIN;

/// Policies held, in all, by the memoised candidate sets.
const CANDIDATE_SETS_CAPACITY: u64 = 262_144;

/// A principal or resource scope, over interned uids and types.
#[derive(Debug, Clone, Copy)]
enum Scope {
    Any,
    Eq(u32),
    In(u32),
    Is(u32),
    IsIn(u32, u32),
}

/// An action scope, over interned uids.
#[derive(Debug, Clone)]
enum ActionScope {
    Any,
    Eq(u32),
    In(Box<[u32]>),
}

#[derive(Debug, Clone)]
struct PolicyScope {
    principal: Scope,
    action: ActionScope,
    resource: Scope,
}

/// The policies of one scope position, by what their scope names.
#[derive(Debug, Default)]
struct Buckets {
    any: Vec<u32>,
    eq: Map<u32, Vec<u32>>,
    /// `in` and `is … in`, by the uid after `in`.
    within: Map<u32, Vec<u32>>,
    is: Map<u32, Vec<u32>>,
}

/// What a request's uid is, in interned terms: itself, itself and its
/// ancestors (sorted), its type. Uids and types no policy names are absent.
#[derive(Debug, Default)]
struct Keys {
    uid: Option<u32>,
    within: Vec<u32>,
    type_id: Option<u32>,
}

impl Keys {
    fn contains(&self, uid: u32) -> bool {
        self.within.binary_search(&uid).is_ok()
    }

    fn matches(&self, scope: Scope) -> bool {
        match scope {
            Scope::Any => true,
            Scope::Eq(uid) => self.uid == Some(uid),
            Scope::In(uid) => self.contains(uid),
            Scope::Is(type_id) => self.type_id == Some(type_id),
            Scope::IsIn(type_id, uid) => self.type_id == Some(type_id) && self.contains(uid),
        }
    }

    fn matches_action(&self, scope: &ActionScope) -> bool {
        match scope {
            ActionScope::Any => true,
            ActionScope::Eq(uid) => self.uid == Some(*uid),
            ActionScope::In(uids) => uids.iter().any(|uid| self.contains(*uid)),
        }
    }
}

impl Buckets {
    fn add(&mut self, scope: Scope, index: u32) {
        match scope {
            Scope::Any => self.any.push(index),
            Scope::Eq(uid) => self.eq.entry(uid).or_default().push(index),
            Scope::In(uid) | Scope::IsIn(_, uid) => self.within.entry(uid).or_default().push(index),
            Scope::Is(type_id) => self.is.entry(type_id).or_default().push(index),
        }
    }

    /// Every list that may hold a policy whose scope matches `keys`.
    fn lists<'a>(&'a self, keys: &'a Keys) -> impl Iterator<Item = &'a [u32]> + 'a {
        let eq = keys.uid.and_then(|uid| self.eq.get(&uid));
        let is = keys.type_id.and_then(|type_id| self.is.get(&type_id));
        let within = keys.within.iter().filter_map(|uid| self.within.get(uid));
        std::iter::once(&self.any)
            .chain(eq)
            .chain(is)
            .chain(within)
            .map(Vec::as_slice)
    }

    fn count(&self, keys: &Keys) -> usize {
        self.lists(keys).map(<[u32]>::len).sum()
    }
}

/// The index of one policy set. Positions are those of
/// `PolicySet::policies()`, Cedar's evaluation order.
#[derive(Debug)]
pub(crate) struct PolicyIndex {
    uids: Map<EntityUid, u32>,
    types: Map<EntityTypeName, u32>,
    scopes: Box<[PolicyScope]>,
    ids: Box<[PolicyId]>,
    principals: Buckets,
    actions: Buckets,
    resources: Buckets,
    /// Candidate sets already built, by their sorted positions.
    sets: moka::sync::Cache<Box<[u32]>, Arc<CompiledPolicies>, foldhash::fast::RandomState>,
    empty: CompiledPolicies,
}

/// Interns uids and types while the index is built.
#[derive(Default)]
struct Interner {
    uids: Map<EntityUid, u32>,
    types: Map<EntityTypeName, u32>,
}

impl Interner {
    fn uid(&mut self, uid: EntityUid) -> u32 {
        let next = u32::try_from(self.uids.len()).unwrap_or(u32::MAX);
        *self.uids.entry(uid).or_insert(next)
    }

    fn type_id(&mut self, type_name: EntityTypeName) -> u32 {
        let next = u32::try_from(self.types.len()).unwrap_or(u32::MAX);
        *self.types.entry(type_name).or_insert(next)
    }

    fn principal(&mut self, constraint: PrincipalConstraint) -> Scope {
        match constraint {
            PrincipalConstraint::Any => Scope::Any,
            PrincipalConstraint::Eq(uid) => Scope::Eq(self.uid(uid)),
            PrincipalConstraint::In(uid) => Scope::In(self.uid(uid)),
            PrincipalConstraint::Is(type_name) => Scope::Is(self.type_id(type_name)),
            PrincipalConstraint::IsIn(type_name, uid) => {
                Scope::IsIn(self.type_id(type_name), self.uid(uid))
            }
        }
    }

    fn resource(&mut self, constraint: ResourceConstraint) -> Scope {
        match constraint {
            ResourceConstraint::Any => Scope::Any,
            ResourceConstraint::Eq(uid) => Scope::Eq(self.uid(uid)),
            ResourceConstraint::In(uid) => Scope::In(self.uid(uid)),
            ResourceConstraint::Is(type_name) => Scope::Is(self.type_id(type_name)),
            ResourceConstraint::IsIn(type_name, uid) => {
                Scope::IsIn(self.type_id(type_name), self.uid(uid))
            }
        }
    }

    fn action(&mut self, constraint: ActionConstraint) -> ActionScope {
        match constraint {
            ActionConstraint::Any => ActionScope::Any,
            ActionConstraint::Eq(uid) => ActionScope::Eq(self.uid(uid)),
            ActionConstraint::In(uids) => {
                ActionScope::In(uids.into_iter().map(|uid| self.uid(uid)).collect())
            }
        }
    }
}

impl PolicyIndex {
    /// Indexes every policy of `policies`, static and template-linked.
    /// `None` when the set is too large to number with `u32`.
    pub fn new(policies: &PolicySet) -> Option<Self> {
        let mut interner = Interner::default();
        let mut scopes = Vec::new();
        let mut ids = Vec::new();
        let mut principals = Buckets::default();
        let mut actions = Buckets::default();
        let mut resources = Buckets::default();
        for policy in policies.policies() {
            let index = u32::try_from(scopes.len()).ok()?;
            let scope = PolicyScope {
                principal: interner.principal(policy.principal_constraint()),
                action: interner.action(policy.action_constraint()),
                resource: interner.resource(policy.resource_constraint()),
            };
            principals.add(scope.principal, index);
            resources.add(scope.resource, index);
            match &scope.action {
                ActionScope::Any => actions.any.push(index),
                ActionScope::Eq(uid) => actions.eq.entry(*uid).or_default().push(index),
                ActionScope::In(uids) => {
                    for uid in uids {
                        actions.within.entry(*uid).or_default().push(index);
                    }
                }
            }
            scopes.push(scope);
            ids.push(policy.id().clone());
        }
        Some(PolicyIndex {
            uids: interner.uids,
            types: interner.types,
            scopes: scopes.into_boxed_slice(),
            ids: ids.into_boxed_slice(),
            principals,
            actions,
            resources,
            sets: moka::sync::Cache::<Box<[u32]>, Arc<CompiledPolicies>>::builder()
                .max_capacity(CANDIDATE_SETS_CAPACITY)
                .weigher(|key, _| u32::try_from(key.len() + 1).unwrap_or(u32::MAX))
                .build_with_hasher(foldhash::fast::RandomState::default()),
            empty: CompiledPolicies::new(&PolicySet::new()),
        })
    }

    /// Cedar's answer for `request` from `policies` (the set this index was
    /// built from), evaluating only the candidates.
    pub fn authorize(
        &self,
        authorizer: &Authorizer,
        request: &Request,
        entities: &Entities,
        policies: &PolicySet,
    ) -> Response {
        let Some(candidates) = self.candidates(request, entities) else {
            return authorizer.is_authorized(request, policies, entities);
        };
        if candidates.is_empty() {
            return self.empty.authorize(request, entities);
        }
        // A set nearly as large as the whole one is not worth building.
        if candidates.len() * 2 > self.scopes.len() {
            return authorizer.is_authorized(request, policies, entities);
        }
        if let Some(set) = self.sets.get(candidates.as_slice()) {
            return set.authorize(request, entities);
        }
        match self.build(&candidates, policies) {
            Some(set) => {
                let set = Arc::new(CompiledPolicies::new(&set));
                let response = set.authorize(request, entities);
                self.sets.insert(candidates.into_boxed_slice(), set);
                response
            }
            // Cannot happen for a set built from `policies`; if it did, the
            // whole set still gives the exact answer.
            None => authorizer.is_authorized(request, policies, entities),
        }
    }

    /// The positions of the policies whose scope can match `request`,
    /// sorted; `None` when the request has no concrete principal, action or
    /// resource.
    pub fn candidates(&self, request: &Request, entities: &Entities) -> Option<Vec<u32>> {
        let principal = self.keys(request.principal()?, entities);
        let action = self.keys(request.action()?, entities);
        let resource = self.keys(request.resource()?, entities);
        // Walk the smallest position's lists; check the whole scope of each.
        let counts = [
            self.principals.count(&principal),
            self.actions.count(&action),
            self.resources.count(&resource),
        ];
        let smallest = (0..3).min_by_key(|&at| counts[at]).unwrap_or(0);
        let mut out = Vec::new();
        let mut gather = |lists: &mut dyn Iterator<Item = &[u32]>| {
            for list in lists {
                for &index in list {
                    let Some(scope) = self.scopes.get(index as usize) else {
                        continue;
                    };
                    if principal.matches(scope.principal)
                        && action.matches_action(&scope.action)
                        && resource.matches(scope.resource)
                    {
                        out.push(index);
                    }
                }
            }
        };
        match smallest {
            0 => gather(&mut self.principals.lists(&principal)),
            1 => gather(&mut self.actions.lists(&action)),
            _ => gather(&mut self.resources.lists(&resource)),
        }
        out.sort_unstable();
        // `action in [a, b]` is listed under both a and b.
        out.dedup();
        Some(out)
    }

    /// The ids of [`Self::candidates`], in the same order.
    pub fn candidate_ids(&self, request: &Request, entities: &Entities) -> Option<Vec<&PolicyId>> {
        let candidates = self.candidates(request, entities)?;
        Some(
            candidates
                .into_iter()
                .filter_map(|index| self.ids.get(index as usize))
                .collect(),
        )
    }

    fn keys(&self, uid: &EntityUid, entities: &Entities) -> Keys {
        let mut within: Vec<u32> = entities
            .ancestors(uid)
            .into_iter()
            .flatten()
            .chain(std::iter::once(uid))
            .filter_map(|uid| self.uids.get(uid).copied())
            .collect();
        within.sort_unstable();
        within.dedup();
        Keys {
            uid: self.uids.get(uid).copied(),
            within,
            type_id: self.types.get(uid.type_name()).copied(),
        }
    }

    /// The candidates as a Cedar policy set, in the whole set's order.
    fn build(&self, candidates: &[u32], policies: &PolicySet) -> Option<PolicySet> {
        let mut set = PolicySet::new();
        for &index in candidates {
            let policy: &Policy = policies.policy(self.ids.get(index as usize)?)?;
            match policy.template_id() {
                None => set.add(policy.clone()).ok()?,
                Some(template_id) => {
                    if set.template(template_id).is_none() {
                        set.add_template(policies.template(template_id)?.clone())
                            .ok()?;
                    }
                    set.link(
                        template_id.clone(),
                        policy.id().clone(),
                        policy.template_links()?,
                    )
                    .ok()?;
                }
            }
        }
        Some(set)
    }
}
