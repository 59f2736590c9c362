//! What a policy that errors does to a decision, in each
//! `on_evaluation_error` mode, through the engine in-process. The whole
//! Cedar corpus checks the same rule in `tests/conformance.rs`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use arbiter::engine::loader::{self, Inputs, SourceFile};
use arbiter::engine::{CheckInput, Decision, Engine, LoadOptions, OnEvaluationError, UidInput};

/// Every principal may do anything.
const EVERYONE: &str = "@id(\"everyone\")\npermit (principal, action, resource);\n";
/// Errors: the principal is not in the (empty) entity data, so its
/// attribute cannot be read.
const ERRORING_PERMIT: &str =
    "@id(\"senior\")\npermit (principal, action, resource) when { principal.level > 3 };\n";
const ERRORING_FORBID: &str =
    "@id(\"suspended\")\nforbid (principal, action, resource) when { principal.suspended };\n";

fn decide(policies: &str, mode: OnEvaluationError) -> Decision {
    let inputs = Inputs {
        policy_files: vec![SourceFile {
            name: "policies.cedar".to_owned(),
            text: Arc::from(policies),
        }],
        single_file: true,
        schema: None,
        entities: None,
        template_links: None,
    };
    let options = LoadOptions {
        on_evaluation_error: mode,
        ..LoadOptions::default()
    };
    let (snapshot, _) = loader::build(&inputs, options).unwrap();
    let input = CheckInput {
        principal: Some(UidInput {
            type_name: "User",
            id: "alice",
        }),
        action: Some(UidInput {
            type_name: "Action",
            id: "read",
        }),
        resource: Some(UidInput {
            type_name: "Document",
            id: "handbook",
        }),
        context_json: "{}",
        entities_json: "",
    };
    Engine::new().check_against(&snapshot, &input).unwrap()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|id| (*id).to_owned()).collect()
}

fn reasons(decision: &Decision) -> BTreeSet<String> {
    decision.reasons.iter().cloned().collect()
}

fn errors(decision: &Decision) -> BTreeSet<String> {
    decision
        .errors
        .iter()
        .map(|error| error.policy_id.clone())
        .collect()
}

#[test]
fn default_mode_is_skip_permit() {
    assert_eq!(OnEvaluationError::default(), OnEvaluationError::SkipPermit);
    assert_eq!(
        LoadOptions::default().on_evaluation_error,
        OnEvaluationError::SkipPermit
    );
    assert_eq!(
        "skip-permit".parse::<OnEvaluationError>(),
        Ok(OnEvaluationError::SkipPermit)
    );
}

#[test]
fn skip_permit_skips_an_erroring_permit_next_to_a_satisfied_one() {
    let decision = decide(
        &format!("{EVERYONE}{ERRORING_PERMIT}"),
        OnEvaluationError::SkipPermit,
    );
    assert!(decision.allowed, "{decision:?}");
    assert_eq!(reasons(&decision), set(&["everyone"]));
    // The erroring permit is still reported.
    assert_eq!(errors(&decision), set(&["senior"]));
    assert!(
        decision
            .errors
            .iter()
            .all(|error| !error.message.is_empty())
    );
}

#[test]
fn skip_permit_denies_when_a_forbid_errors() {
    let decision = decide(
        &format!("{EVERYONE}{ERRORING_FORBID}"),
        OnEvaluationError::SkipPermit,
    );
    assert!(!decision.allowed, "{decision:?}");
    assert!(reasons(&decision).is_empty(), "{decision:?}");
    assert_eq!(errors(&decision), set(&["suspended"]));

    // An erroring permit beside it does not change that.
    let decision = decide(
        &format!("{EVERYONE}{ERRORING_PERMIT}{ERRORING_FORBID}"),
        OnEvaluationError::SkipPermit,
    );
    assert!(!decision.allowed, "{decision:?}");
    assert_eq!(errors(&decision), set(&["senior", "suspended"]));
}

#[test]
fn skip_permit_without_another_permit_is_cedars_deny() {
    let decision = decide(ERRORING_PERMIT, OnEvaluationError::SkipPermit);
    assert!(!decision.allowed, "{decision:?}");
    assert_eq!(errors(&decision), set(&["senior"]));
}

#[test]
fn deny_mode_denies_on_any_error() {
    for policies in [
        format!("{EVERYONE}{ERRORING_PERMIT}"),
        format!("{EVERYONE}{ERRORING_FORBID}"),
    ] {
        let decision = decide(&policies, OnEvaluationError::Deny);
        assert!(!decision.allowed, "{policies}: {decision:?}");
        assert!(reasons(&decision).is_empty(), "{decision:?}");
        assert_eq!(errors(&decision).len(), 1, "{decision:?}");
    }
}

#[test]
fn skip_policy_mode_is_cedar_and_skips_an_erroring_forbid() {
    for (policies, errored) in [
        (format!("{EVERYONE}{ERRORING_PERMIT}"), "senior"),
        (format!("{EVERYONE}{ERRORING_FORBID}"), "suspended"),
    ] {
        let decision = decide(&policies, OnEvaluationError::SkipPolicy);
        assert!(decision.allowed, "{policies}: {decision:?}");
        assert_eq!(reasons(&decision), set(&["everyone"]));
        assert_eq!(errors(&decision), set(&[errored]));
    }
}
