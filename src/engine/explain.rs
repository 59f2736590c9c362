//! Explain: why a decision came out as it did, for a policy author. Reached
//! only when a request asks for it (`explain = true`), so an ordinary
//! decision does none of this work.
//!
//! Everything here is Cedar's own evaluation, not a re-implementation of its
//! semantics. For the policies whose scope can match the request (the
//! policy index's candidates, or the whole set when it is not indexed),
//! Cedar evaluates against the very request and entities the decision used:
//! - each policy's scope alone: the policy with its `when`/`unless`
//!   conditions dropped and its effect made `permit` (so that Cedar lists
//!   every satisfied one); a scope test never errors. These policies are
//!   derived once per policy set, on its first explain ([`scope_policies`]);
//! - the permits alone and the forbids alone, as written: the satisfied
//!   ones are those whose conditions held (with both effects in one set, a
//!   satisfied forbid would hide the satisfied permits), and the erroring
//!   ones error exactly as in the decision.
//!
//! A policy whose scope matched but that was neither satisfied nor erroring
//! had a condition that was false.

use std::collections::HashSet;

use cedar_policy::{Authorizer, Effect, Entities, Policy, PolicyId, PolicySet, Request};

use super::decision::{Decision, PolicyEvaluationError};
use super::error::RequestError;

/// Why a decision came out as it did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Explanation {
    /// The policies that determined the decision (its reasons), in the
    /// policy set's order.
    pub determining: Vec<String>,
    /// The policies whose evaluation errored, with Cedar's message.
    pub errors: Vec<PolicyEvaluationError>,
    /// For a deny: the policies whose scope matched the request but whose
    /// `when`/`unless` conditions were false (the near misses), in the
    /// policy set's order.
    pub conditions_false: Vec<ExplainedPolicy>,
    /// For a deny: the permits that were satisfied, so would have allowed
    /// had no forbid matched (or, failing closed, errored).
    pub overridden_permits: Vec<String>,
}

/// A policy named in an explanation, with its effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainedPolicy {
    pub policy_id: String,
    pub effect: PolicyEffect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyEffect {
    Permit,
    Forbid,
}

/// What Cedar said about each scope-matching candidate, gathered where the
/// decision's entities are; [`Evidence::explain`] finishes it once the
/// decision (after `on_evaluation_error`) is known.
#[derive(Debug)]
pub(crate) struct Evidence {
    /// The candidates, in the policy set's order, with their effects.
    candidates: Vec<(PolicyId, Effect)>,
    scope_matched: HashSet<PolicyId>,
    satisfied: HashSet<PolicyId>,
    errored: HashSet<PolicyId>,
}

/// Asks Cedar about each of `candidates` (policies of `all`, in its order) for
/// `request` against `entities` (the decision's own); `scopes` holds every
/// policy's scope ([`scope_policies`]).
pub(crate) fn gather(
    authorizer: &Authorizer,
    all: &PolicySet,
    candidates: &[&Policy],
    scopes: &PolicySet,
    request: &Request,
    entities: &Entities,
) -> Result<Evidence, RequestError> {
    let mut candidate_scopes = PolicySet::new();
    let mut permits = PolicySet::new();
    let mut forbids = PolicySet::new();
    for policy in candidates {
        let scope = scopes
            .policy(policy.id())
            .ok_or_else(|| internal(policy, &"its scope was not derived with the policy set"))?;
        candidate_scopes
            .add(scope.clone())
            .map_err(|error| internal(policy, &error))?;
        let same_effect = match policy.effect() {
            Effect::Permit => &mut permits,
            Effect::Forbid => &mut forbids,
        };
        add_policy(same_effect, policy, all).map_err(|error| internal(policy, &error))?;
    }
    let scoped = authorizer.is_authorized(request, &candidate_scopes, entities);
    let mut evidence = Evidence {
        candidates: candidates
            .iter()
            .map(|policy| (policy.id().clone(), policy.effect()))
            .collect(),
        scope_matched: scoped.diagnostics().reason().cloned().collect(),
        satisfied: HashSet::new(),
        errored: HashSet::new(),
    };
    for set in [&permits, &forbids] {
        let response = authorizer.is_authorized(request, set, entities);
        evidence
            .satisfied
            .extend(response.diagnostics().reason().cloned());
        evidence
            .errored
            .extend(response.diagnostics().errors().map(|error| match error {
                cedar_policy::AuthorizationError::PolicyEvaluationError(error) => {
                    error.policy_id().clone()
                }
            }));
    }
    Ok(evidence)
}

/// Adds `policy` (of `all`) to `set`; a template-linked one is linked
/// anew, with its template added first.
fn add_policy(set: &mut PolicySet, policy: &Policy, all: &PolicySet) -> Result<(), String> {
    let Some(template_id) = policy.template_id() else {
        return set.add(policy.clone()).map_err(|error| error.to_string());
    };
    if set.template(template_id).is_none() {
        let template = all
            .template(template_id)
            .ok_or_else(|| format!("its template `{template_id}` is not in the set"))?;
        set.add_template(template.clone())
            .map_err(|error| error.to_string())?;
    }
    let values = policy
        .template_links()
        .ok_or_else(|| "a linked policy without slot values".to_owned())?;
    set.link(template_id.clone(), policy.id().clone(), values)
        .map_err(|error| error.to_string())
}

/// Every policy of `policies` as its scope alone: conditions dropped,
/// effect `permit`, same id. Rewritten on Cedar's JSON form (a
/// template-linked policy's is the linked policy's, slots filled in).
pub(crate) fn scope_policies(policies: &PolicySet) -> Result<PolicySet, String> {
    let failed = |policy: &Policy, error: &dyn std::fmt::Display| {
        format!("explain: policy `{}`: {error}", policy.id())
    };
    let mut scopes = PolicySet::new();
    for policy in policies.policies() {
        let mut json = policy.to_json().map_err(|error| failed(policy, &error))?;
        let Some(fields) = json.as_object_mut() else {
            return Err(failed(policy, &"its JSON form is not an object"));
        };
        fields.insert("effect".into(), "permit".into());
        fields.insert("conditions".into(), serde_json::Value::Array(Vec::new()));
        let scope = Policy::from_json(Some(policy.id().clone()), json)
            .map_err(|error| failed(policy, &error))?;
        scopes.add(scope).map_err(|error| failed(policy, &error))?;
    }
    Ok(scopes)
}

fn internal(policy: &Policy, error: &dyn std::fmt::Display) -> RequestError {
    RequestError::Internal(format!("explain: policy `{}`: {error}", policy.id()))
}

impl Evidence {
    /// The explanation of `decision`, the answer this evidence was
    /// gathered for.
    pub(crate) fn explain(self, decision: &Decision) -> Explanation {
        // The determining policies in the set's order, as the others.
        let reasons: HashSet<&str> = decision.reasons.iter().map(String::as_str).collect();
        let mut determining: Vec<String> = self
            .candidates
            .iter()
            .map(|(id, _)| id.to_string())
            .filter(|id| reasons.contains(id.as_str()))
            .collect();
        if determining.len() != decision.reasons.len() {
            // Cannot happen (reasons come from the candidates); the decision's
            // own list is the truth if it does.
            determining = decision.reasons.clone();
        }
        let mut explanation = Explanation {
            determining,
            errors: decision.errors.clone(),
            ..Explanation::default()
        };
        if decision.allowed {
            return explanation;
        }
        for (id, effect) in &self.candidates {
            let effect = match effect {
                Effect::Permit => PolicyEffect::Permit,
                Effect::Forbid => PolicyEffect::Forbid,
            };
            if self.satisfied.contains(id) {
                if effect == PolicyEffect::Permit {
                    explanation.overridden_permits.push(id.to_string());
                }
            } else if self.scope_matched.contains(id) && !self.errored.contains(id) {
                explanation.conditions_false.push(ExplainedPolicy {
                    policy_id: id.to_string(),
                    effect,
                });
            }
        }
        explanation
    }
}
