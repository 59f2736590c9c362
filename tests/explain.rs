//! Explain through the engine in-process: an explained decision is the
//! plain decision, the policy index changes no explanation, explained
//! requests never touch the decision cache, and template-linked policies
//! are explained by their link id. The wire and the CLI are tested in
//! `tests/grpc_api.rs` and `tests/cli.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use arbiter::cli::test::{UidSpec, read_fixture};
use arbiter::engine::{
    CheckInput, Decision, Engine, EntityData, ExplainedPolicy, Explanation, LoadOptions,
    PolicyEffect, PolicySnapshot, RequestEntitiesMode, Snapshot, Sources, UidInput, loader,
};
use cedar_policy::{Entities, EntityUid, PolicyId, PolicySet, SlotId, Template};

/// One fixture case, owned, so `CheckInput` can borrow it.
struct Case {
    name: String,
    uids: Vec<(String, String)>,
    context: String,
    entities: String,
}

impl Case {
    fn input(&self) -> CheckInput<'_> {
        let uid = |index: usize| {
            let (type_name, id) = &self.uids[index];
            Some(UidInput { type_name, id })
        };
        CheckInput {
            principal: uid(0),
            action: uid(1),
            resource: uid(2),
            context_json: &self.context,
            entities_json: &self.entities,
        }
    }
}

fn owned(spec: &UidSpec) -> (String, String) {
    match spec {
        UidSpec::Object { type_name, id } => (type_name.clone(), id.clone()),
        UidSpec::Text(text) => {
            let (type_name, id) = arbiter::cli::check::split_uid(text).unwrap();
            (type_name.to_owned(), id)
        }
    }
}

/// Every case of `policies/tests/*.json`.
fn fixture_cases() -> Vec<Case> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies/tests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for file in files {
        for case in read_fixture(&file).unwrap().cases {
            cases.push(Case {
                name: case.name.clone(),
                uids: [&case.principal, &case.action, &case.resource]
                    .into_iter()
                    .map(owned)
                    .collect(),
                context: case
                    .context
                    .map(|context| serde_json::Value::Object(context).to_string())
                    .unwrap_or_default(),
                entities: case
                    .entities
                    .map(|entities| serde_json::Value::Array(entities).to_string())
                    .unwrap_or_default(),
            });
        }
    }
    cases
}

/// The embedded example, indexed from `policy_index_min` policies on.
fn example(policy_index_min: usize, decision_cache_capacity: u64) -> Snapshot {
    let options = LoadOptions {
        request_entities: RequestEntitiesMode::Replace,
        policy_index_min,
        decision_cache_capacity,
        ..LoadOptions::default()
    };
    loader::load(&Sources::default(), options).unwrap().0
}

/// What must agree between two explanations: the determining policies as
/// a set (Cedar keeps reasons in a hash set), the rest in order.
fn normalised(mut explanation: Explanation) -> Explanation {
    explanation.determining.sort();
    explanation
}

fn same_decision(explained: &Decision, plain: &Decision) -> bool {
    let set = |reasons: &[String]| reasons.iter().cloned().collect::<BTreeSet<_>>();
    explained.allowed == plain.allowed
        && set(&explained.reasons) == set(&plain.reasons)
        && explained.errors == plain.errors
}

#[test]
fn explained_decisions_equal_plain_ones_with_and_without_the_index() {
    let whole = example(usize::MAX, 0);
    let indexed = example(0, 0);
    assert!(indexed.policies.indexed() && !whole.policies.indexed());
    let engine = Engine::new();
    let cases = fixture_cases();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let (mut denies, mut near_misses, mut overridden) = (0, 0, 0);
    for case in &cases {
        let plain = engine.check_against(&whole, &case.input()).unwrap();
        let (decision, explanation) = engine.explain_against(&whole, &case.input()).unwrap();
        assert!(same_decision(&decision, &plain), "{}", case.name);
        let (indexed_decision, indexed_explanation) =
            engine.explain_against(&indexed, &case.input()).unwrap();
        assert!(same_decision(&indexed_decision, &plain), "{}", case.name);
        assert_eq!(
            normalised(indexed_explanation),
            normalised(explanation.clone()),
            "{}: the index changed the explanation",
            case.name
        );

        let determining: BTreeSet<&String> = explanation.determining.iter().collect();
        assert_eq!(determining, plain.reasons.iter().collect(), "{}", case.name);
        assert_eq!(explanation.errors, plain.errors, "{}", case.name);
        if plain.allowed {
            assert!(explanation.conditions_false.is_empty(), "{}", case.name);
            assert!(explanation.overridden_permits.is_empty(), "{}", case.name);
        } else {
            denies += 1;
            near_misses += usize::from(!explanation.conditions_false.is_empty());
            overridden += usize::from(!explanation.overridden_permits.is_empty());
            // A near miss is neither determining nor erroring nor overridden.
            for policy in &explanation.conditions_false {
                assert!(
                    !determining.contains(&policy.policy_id)
                        && !explanation.overridden_permits.contains(&policy.policy_id),
                    "{}: {policy:?}",
                    case.name
                );
            }
        }
    }
    assert!(
        denies > 0 && near_misses > 0 && overridden > 0,
        "{denies} denies, {near_misses} with near misses, {overridden} with overridden permits"
    );
}

#[test]
fn the_four_kinds_of_answer_on_the_example() {
    let snapshot = example(usize::MAX, 0);
    let engine = Engine::new();
    let context = r#"{"mfa": true, "source_ip": "10.1.2.3"}"#;
    let explain = |principal: &str, action: &str, resource: &str| {
        let input = CheckInput {
            principal: Some(UidInput {
                type_name: "Saas::User",
                id: principal,
            }),
            action: Some(UidInput {
                type_name: "Saas::Action",
                id: action,
            }),
            resource: Some(UidInput {
                type_name: "Saas::Document",
                id: resource,
            }),
            context_json: context,
            entities_json: "",
        };
        engine.explain_against(&snapshot, &input).unwrap()
    };
    let forbid = |id: &str| ExplainedPolicy {
        policy_id: id.to_owned(),
        effect: PolicyEffect::Forbid,
    };
    let permit = |id: &str| ExplainedPolicy {
        policy_id: id.to_owned(),
        effect: PolicyEffect::Permit,
    };

    // Allow: the determining permit, nothing else.
    let (decision, explanation) = explain("bob", "write", "acme-roadmap");
    assert!(decision.allowed);
    assert_eq!(explanation.determining, ["editor-can-write"]);
    assert!(explanation.conditions_false.is_empty() && explanation.overridden_permits.is_empty());

    // A forbid overrides the owner's permit.
    let (decision, explanation) = explain("frank", "delete", "acme-sales-pipeline");
    assert!(!decision.allowed);
    assert_eq!(explanation.determining, ["delete-requires-step-up-auth"]);
    assert_eq!(
        explanation.overridden_permits,
        ["owner-full-control-document"]
    );
    assert!(
        !explanation
            .conditions_false
            .iter()
            .any(|policy| policy.policy_id == "owner-full-control-document")
    );

    // Default deny with near misses: the owner permit's scope matched
    // (any principal, any action, a document) but carol is not the owner;
    // `editor-can-write` is not listed (carol is not in Role::"editor").
    let (decision, explanation) = explain("carol", "write", "acme-roadmap");
    assert!(!decision.allowed && explanation.determining.is_empty());
    assert!(
        explanation
            .conditions_false
            .contains(&permit("owner-full-control-document")),
        "{explanation:?}"
    );
    assert!(
        explanation
            .conditions_false
            .contains(&forbid("tenant-isolation")),
        "{explanation:?}"
    );
    let listed: Vec<&str> = explanation
        .conditions_false
        .iter()
        .map(|policy| policy.policy_id.as_str())
        .collect();
    assert!(!listed.contains(&"editor-can-write"), "{listed:?}");
    assert!(!listed.contains(&"viewer-can-read"), "{listed:?}");
    assert!(explanation.overridden_permits.is_empty());

    // Erroring forbids (ghost is not in the data) fail the public-document
    // permit closed: the permit is overridden, the errors carry messages.
    let (decision, explanation) = explain("ghost", "read", "acme-handbook");
    assert!(!decision.allowed && explanation.determining.is_empty());
    let errored: Vec<&str> = explanation
        .errors
        .iter()
        .map(|error| error.policy_id.as_str())
        .collect();
    assert!(errored.contains(&"tenant-isolation"), "{errored:?}");
    assert!(
        explanation
            .errors
            .iter()
            .all(|error| !error.message.is_empty())
    );
    assert_eq!(
        explanation.overridden_permits,
        ["public-documents-readable"]
    );
    assert!(
        !explanation
            .conditions_false
            .iter()
            .any(|policy| errored.contains(&policy.policy_id.as_str())),
        "an erroring policy is not a near miss: {explanation:?}"
    );
}

#[test]
fn an_explained_request_neither_reads_nor_fills_the_decision_cache() {
    let snapshot = example(usize::MAX, 1_000);
    let engine = Engine::new();
    let case = Case {
        name: "carol write".into(),
        uids: vec![
            ("Saas::User".into(), "carol".into()),
            ("Saas::Action".into(), "write".into()),
            ("Saas::Document".into(), "acme-roadmap".into()),
        ],
        context: r#"{"mfa": true, "source_ip": "10.1.2.3"}"#.into(),
        entities: String::new(),
    };
    let (explained, explanation) = engine.explain_against(&snapshot, &case.input()).unwrap();
    assert!(!explained.cached && !explanation.conditions_false.is_empty());
    // Nothing was stored by the explained request.
    let first = engine.check_against(&snapshot, &case.input()).unwrap();
    assert!(!first.cached, "{}: explain filled the cache", case.name);
    let second = engine.check_against(&snapshot, &case.input()).unwrap();
    assert!(second.cached, "the plain check is cached");
    // And the cached answer is not what an explained request gets.
    let (again, explanation_again) = engine.explain_against(&snapshot, &case.input()).unwrap();
    assert!(!again.cached);
    assert_eq!(explanation_again, explanation);
}

#[test]
fn template_linked_policies_are_explained_by_their_link_id() {
    let mut set = PolicySet::new();
    let template = Template::parse(
        Some(PolicyId::new("editor-of")),
        "permit (principal == ?principal, action, resource in ?resource) \
         when { context.approved };",
    )
    .unwrap();
    set.add_template(template).unwrap();
    let link = |set: &mut PolicySet, id: &str, principal: &str, resource: &str| {
        let values: HashMap<SlotId, EntityUid> = [
            (SlotId::principal(), principal.parse().unwrap()),
            (SlotId::resource(), resource.parse().unwrap()),
        ]
        .into();
        set.link(PolicyId::new("editor-of"), PolicyId::new(id), values)
            .unwrap();
    };
    link(
        &mut set,
        "alice-on-plans",
        r#"User::"alice""#,
        r#"Folder::"plans""#,
    );
    link(
        &mut set,
        "bob-on-plans",
        r#"User::"bob""#,
        r#"Folder::"plans""#,
    );
    link(
        &mut set,
        "alice-on-other",
        r#"User::"alice""#,
        r#"Folder::"other""#,
    );
    let entities = Entities::from_json_str(
        r#"[{"uid": {"type": "Folder", "id": "plans"}, "attrs": {}, "parents": []},
            {"uid": {"type": "Doc", "id": "q3"}, "attrs": {},
             "parents": [{"type": "Folder", "id": "plans"}]}]"#,
        None,
    )
    .unwrap();
    for index_min in [0, usize::MAX] {
        let options = LoadOptions {
            validate_policies: false,
            validate_requests: false,
            policy_index_min: index_min,
            ..LoadOptions::default()
        };
        let policies = PolicySnapshot::new(set.clone(), None, Arc::from("p"), options);
        let data = EntityData::new(entities.clone(), Arc::from("d"));
        let snapshot = Snapshot::new(Arc::new(policies), Arc::new(data), 0, 0);
        let input = |context: &'static str| CheckInput {
            principal: Some(UidInput {
                type_name: "User",
                id: "alice",
            }),
            action: Some(UidInput {
                type_name: "Action",
                id: "edit",
            }),
            resource: Some(UidInput {
                type_name: "Doc",
                id: "q3",
            }),
            context_json: context,
            entities_json: "",
        };
        let engine = Engine::new();
        let (denied, explanation) = engine
            .explain_against(&snapshot, &input(r#"{"approved": false}"#))
            .unwrap();
        assert!(!denied.allowed);
        assert_eq!(
            explanation.conditions_false,
            [ExplainedPolicy {
                policy_id: "alice-on-plans".into(),
                effect: PolicyEffect::Permit,
            }],
            "index_min {index_min}"
        );
        let (allowed, explanation) = engine
            .explain_against(&snapshot, &input(r#"{"approved": true}"#))
            .unwrap();
        assert!(allowed.allowed);
        assert_eq!(explanation.determining, ["alice-on-plans"]);
    }
}
