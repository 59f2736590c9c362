//! A policy set evaluated without Cedar's partial-evaluation bookkeeping:
//! each policy's condition is built once (Cedar's `Policy::condition()`
//! builds it again on every evaluation), and a concrete request is
//! evaluated by Cedar's own evaluator.
//!
//! Why it is exact: `Authorizer::is_authorized` evaluates every policy of
//! the set, in the set's order, as `Evaluator::partial_evaluate`, which
//! interprets `policy.condition()` in the policy's slot environment; with a
//! concrete request nothing is a residual, so each policy is satisfied,
//! not, or an error. The decision is Allow when some permit is satisfied
//! and no forbid is; the determining policies are the satisfied forbids if
//! any, else the satisfied permits; the errors are listed in the set's
//! order. That is what this module does, with the same conditions.

use std::collections::HashSet;

use cedar_policy::{Entities, PolicySet, Request, Response};
use cedar_policy_core::ast::{self, Effect, Expr, Literal, ValueKind};
use cedar_policy_core::authorizer::{self, AuthorizationError, Decision};
use cedar_policy_core::evaluator::Evaluator;
use cedar_policy_core::extensions::Extensions;

#[derive(Debug)]
struct CompiledPolicy {
    policy: ast::Policy,
    condition: Expr,
}

/// Every policy of a set with its condition, in the set's order.
#[derive(Debug)]
pub(crate) struct CompiledPolicies {
    policies: Box<[CompiledPolicy]>,
}

impl CompiledPolicies {
    pub(crate) fn new(policies: &PolicySet) -> Self {
        let set: &ast::PolicySet = policies.as_ref();
        CompiledPolicies {
            policies: set
                .policies()
                .map(|policy| CompiledPolicy {
                    condition: policy.condition(),
                    policy: policy.clone(),
                })
                .collect(),
        }
    }

    /// The same as `Authorizer::is_authorized(request, <the set>, entities)`.
    pub(crate) fn authorize(&self, request: &Request, entities: &Entities) -> Response {
        let request: &ast::Request = request.as_ref();
        let evaluator = Evaluator::new(
            request.clone(),
            entities.as_ref(),
            Extensions::all_available(),
        );
        let mut permits = Vec::new();
        let mut forbids = Vec::new();
        let mut errors = Vec::new();
        for compiled in self.policies.iter() {
            let policy = &compiled.policy;
            let satisfied = match evaluator.interpret(&compiled.condition, policy.env()) {
                Ok(value) => match value.value_kind() {
                    ValueKind::Lit(Literal::Bool(satisfied)) => Ok(*satisfied),
                    // A condition is a conjunction, so always a boolean;
                    // were it not, Cedar's own call reports the error.
                    _ => evaluator.evaluate(policy),
                },
                Err(error) => Err(error),
            };
            match satisfied {
                Ok(true) => match policy.effect() {
                    Effect::Permit => permits.push(policy.id()),
                    Effect::Forbid => forbids.push(policy.id()),
                },
                Ok(false) => {}
                Err(error) => errors.push(AuthorizationError::PolicyEvaluationError {
                    id: policy.id().clone(),
                    error,
                }),
            }
        }
        let (decision, determining) = if !forbids.is_empty() {
            (Decision::Deny, forbids)
        } else if !permits.is_empty() {
            (Decision::Allow, permits)
        } else {
            (Decision::Deny, Vec::new())
        };
        let reason: HashSet<ast::PolicyID> = determining.into_iter().cloned().collect();
        Response::from(authorizer::Response::new(decision, reason, errors))
    }
}
