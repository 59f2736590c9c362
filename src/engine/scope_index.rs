//! Policies grouped by the requests their scope can match.
//!
//! Cedar evaluates every policy of a set for every request. A policy whose
//! scope cannot match the request's principal type, action and resource type
//! evaluates to "not satisfied" without error, so leaving it out changes
//! neither the decision, nor the reasons, nor the errors; it only saves its
//! evaluation. With a schema the possible (principal type, action, resource
//! type) triples are known, so each gets its own policy set at load time.
//!
//! Only the scope is looked at (`==`, `is`, `in` on actions); conditions
//! are left to Cedar. Scope checks cannot error at run time, which is what
//! makes this exact.

use std::collections::HashMap;

use cedar_policy::{
    ActionConstraint, Entities, EntityTypeName, EntityUid, Policy, PolicySet, PrincipalConstraint,
    ResourceConstraint, Schema,
};

/// For each action, the policy set of each (principal type, resource type).
#[derive(Debug, Default)]
pub struct ScopeIndex {
    by_action: HashMap<EntityUid, Vec<ScopedSet>>,
}

#[derive(Debug)]
struct ScopedSet {
    principal_type: EntityTypeName,
    resource_type: EntityTypeName,
    policies: PolicySet,
}

impl ScopeIndex {
    /// `None` when the index cannot be exact: without a schema the request
    /// shapes are unknown, and template-linked policies are kept whole.
    pub fn build(policies: &PolicySet, schema: Option<&Schema>) -> Option<Self> {
        let schema = schema?;
        if policies.num_of_templates() > 0 {
            return None;
        }
        // Action groups come from the schema, and request-scoped entities
        // cannot change them (action entities must match the schema).
        let actions = schema.action_entities().ok()?;
        let mut index = ScopeIndex::default();
        for env in schema.request_envs() {
            let mut subset = PolicySet::new();
            for policy in policies.policies() {
                if scope_may_match(
                    policy,
                    env.principal(),
                    env.action(),
                    env.resource(),
                    &actions,
                ) {
                    subset.add(policy.clone()).ok()?;
                }
            }
            index
                .by_action
                .entry(env.action().clone())
                .or_default()
                .push(ScopedSet {
                    principal_type: env.principal().clone(),
                    resource_type: env.resource().clone(),
                    policies: subset,
                });
        }
        Some(index)
    }

    /// The policies that may apply to this request, if the index knows its
    /// shape.
    pub fn get(
        &self,
        principal: &EntityUid,
        action: &EntityUid,
        resource: &EntityUid,
    ) -> Option<&PolicySet> {
        self.by_action
            .get(action)?
            .iter()
            .find(|set| {
                &set.principal_type == principal.type_name()
                    && &set.resource_type == resource.type_name()
            })
            .map(|set| &set.policies)
    }
}

fn scope_may_match(
    policy: &Policy,
    principal_type: &EntityTypeName,
    action: &EntityUid,
    resource_type: &EntityTypeName,
    actions: &Entities,
) -> bool {
    let principal_ok = match policy.principal_constraint() {
        PrincipalConstraint::Any | PrincipalConstraint::In(_) => true,
        PrincipalConstraint::Eq(uid) => uid.type_name() == principal_type,
        PrincipalConstraint::Is(type_name) | PrincipalConstraint::IsIn(type_name, _) => {
            &type_name == principal_type
        }
    };
    let resource_ok = match policy.resource_constraint() {
        ResourceConstraint::Any | ResourceConstraint::In(_) => true,
        ResourceConstraint::Eq(uid) => uid.type_name() == resource_type,
        ResourceConstraint::Is(type_name) | ResourceConstraint::IsIn(type_name, _) => {
            &type_name == resource_type
        }
    };
    let action_ok = match policy.action_constraint() {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(uid) => &uid == action,
        ActionConstraint::In(groups) => groups
            .iter()
            .any(|group| group == action || actions.is_ancestor_of(group, action)),
    };
    principal_ok && resource_ok && action_ok
}
