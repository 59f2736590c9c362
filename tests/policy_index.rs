//! The policy index against Cedar on the whole set: random policy sets
//! (every scope form, templates with links, `when`/`unless`, forbids,
//! conditions that error), random entity hierarchies and random requests,
//! each decided by an engine whose snapshot is indexed and by one whose
//! snapshot is not. Decision, reasons and errors (policy ids and messages,
//! in order) must be equal for every request, and so must explanations
//! (`explain`, every tenth request).
//!
//! CI runs a fixed seed for a few rounds; `benches/index_differential.sh`
//! runs more (`ARBITER_INDEX_DIFF_ROUNDS`, `ARBITER_INDEX_DIFF_SEED`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use arbiter::engine::{
    CheckInput, Decision, Engine, EntityData, LoadOptions, OnEvaluationError, PolicySnapshot,
    Snapshot, UidInput,
};
use cedar_policy::{
    Context, Entities, EntityUid, Policy, PolicyId, PolicySet, Request, SlotId, Template,
};

/// splitmix64: small, seeded, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// The entities of one round, as `Type::"id"` texts by type.
struct World {
    users: Vec<String>,
    groups: Vec<String>,
    tenants: Vec<String>,
    docs: Vec<String>,
    folders: Vec<String>,
    actions: Vec<String>,
    json: String,
}

const ACTIONS: [(&str, &[&str]); 7] = [
    ("read", &["readers"]),
    ("list", &["readers"]),
    ("write", &["writers"]),
    ("delete", &["all"]),
    ("readers", &["all"]),
    ("writers", &["all"]),
    ("all", &[]),
];

fn entity_json(uid: &str, attrs: &str, parents: &[String]) -> String {
    let (type_name, id) = split(uid);
    let parents: Vec<String> = parents
        .iter()
        .map(|parent| {
            let (type_name, id) = split(parent);
            format!(r#"{{"type":"{type_name}","id":"{id}"}}"#)
        })
        .collect();
    format!(
        r#"{{"uid":{{"type":"{type_name}","id":"{id}"}},"attrs":{{{attrs}}},"parents":[{}]}}"#,
        parents.join(",")
    )
}

fn split(uid: &str) -> (&str, &str) {
    let (type_name, rest) = uid.split_once("::").unwrap();
    (type_name, rest.trim_matches('"'))
}

fn uid_ref(uid: &str) -> String {
    let (type_name, id) = split(uid);
    format!(r#"{{"__entity":{{"type":"{type_name}","id":"{id}"}}}}"#)
}

fn some(rng: &mut Rng, from: &[String], most: usize) -> Vec<String> {
    if from.is_empty() {
        return Vec::new();
    }
    let count = rng.below(most + 1);
    let mut out: Vec<String> = (0..count).map(|_| rng.pick(from).clone()).collect();
    out.sort();
    out.dedup();
    out
}

fn world(rng: &mut Rng) -> World {
    let named = |prefix: &str, count: usize| -> Vec<String> {
        (0..count)
            .map(|i| format!(r#"{}::"{}{i}""#, prefix, prefix.to_lowercase()))
            .collect()
    };
    let tenants = named("Tenant", 3);
    let groups = named("Group", 3 + rng.below(8));
    let users = named("User", 4 + rng.below(12));
    let folders = named("Folder", 2 + rng.below(6));
    let docs = named("Doc", 4 + rng.below(12));
    let mut entities = Vec::new();
    for tenant in &tenants {
        entities.push(entity_json(tenant, "", &[]));
    }
    // Parents only among earlier groups and folders: the graph has no cycle.
    for (i, group) in groups.iter().enumerate() {
        let mut parents = some(rng, &groups[..i], 2);
        parents.extend(some(rng, &tenants, 1));
        entities.push(entity_json(group, "", &parents));
    }
    for (i, folder) in folders.iter().enumerate() {
        let mut parents = some(rng, &folders[..i], 1);
        parents.extend(some(rng, &tenants, 1));
        entities.push(entity_json(folder, "", &parents));
    }
    for user in &users {
        let mut parents = some(rng, &groups, 3);
        if rng.chance(10) {
            parents.extend(some(rng, &tenants, 1));
        }
        let mut attrs = Vec::new();
        if rng.chance(70) {
            attrs.push(format!(r#""level":{}"#, rng.below(6)));
        }
        if rng.chance(80) {
            attrs.push(format!(
                r#""tenant":{}"#,
                uid_ref(rng.pick(&tenants).as_str())
            ));
        }
        entities.push(entity_json(user, &attrs.join(","), &parents));
    }
    for doc in &docs {
        let mut parents = some(rng, &folders, 2);
        parents.extend(some(rng, &tenants, 1));
        let mut attrs = Vec::new();
        if rng.chance(70) {
            attrs.push(format!(r#""owner":{}"#, uid_ref(rng.pick(&users).as_str())));
        }
        if rng.chance(80) {
            attrs.push(format!(
                r#""tenant":{}"#,
                uid_ref(rng.pick(&tenants).as_str())
            ));
        }
        entities.push(entity_json(doc, &attrs.join(","), &parents));
    }
    let mut actions = Vec::new();
    for (id, parents) in ACTIONS {
        let uid = format!(r#"Action::"{id}""#);
        let parents: Vec<String> = parents
            .iter()
            .map(|parent| format!(r#"Action::"{parent}""#))
            .collect();
        entities.push(entity_json(&uid, "", &parents));
        actions.push(uid);
    }
    World {
        users,
        groups,
        tenants,
        docs,
        folders,
        actions,
        json: format!("[{}]", entities.join(",")),
    }
}

const GHOSTS: [&str; 3] = [r#"User::"ghost""#, r#"Doc::"ghost""#, r#"Action::"ghost""#];
const TYPES: [&str; 5] = ["User", "Group", "Tenant", "Doc", "Folder"];

impl World {
    fn principal_like(&self, rng: &mut Rng) -> String {
        match rng.below(10) {
            0..=4 => rng.pick(&self.users).clone(),
            5..=7 => rng.pick(&self.groups).clone(),
            8 => rng.pick(&self.tenants).clone(),
            _ => rng.pick(&GHOSTS).to_string(),
        }
    }

    fn resource_like(&self, rng: &mut Rng) -> String {
        match rng.below(10) {
            0..=4 => rng.pick(&self.docs).clone(),
            5..=6 => rng.pick(&self.folders).clone(),
            7 => rng.pick(&self.tenants).clone(),
            8 => rng.pick(&self.users).clone(),
            _ => rng.pick(&GHOSTS).to_string(),
        }
    }

    fn action_like(&self, rng: &mut Rng) -> String {
        if rng.chance(5) {
            GHOSTS[2].to_string()
        } else {
            rng.pick(&self.actions).clone()
        }
    }

    /// A principal or resource scope; `slot` is `Some("?principal")` for a
    /// template's scope, which then names the slot instead of a uid.
    fn scope(&self, rng: &mut Rng, var: &str, slot: Option<&str>) -> String {
        let uid = |rng: &mut Rng| match slot {
            Some(slot) => slot.to_string(),
            None if var == "principal" => self.principal_like(rng),
            None => self.resource_like(rng),
        };
        let form = if slot.is_some() {
            rng.below(3)
        } else {
            rng.below(5)
        };
        match form {
            0 => format!("{var} == {}", uid(rng)),
            1 => format!("{var} in {}", uid(rng)),
            2 => format!("{var} is {} in {}", rng.pick(&TYPES), uid(rng)),
            3 => format!("{var} is {}", rng.pick(&TYPES)),
            _ => var.to_string(),
        }
    }

    fn action_scope(&self, rng: &mut Rng) -> String {
        match rng.below(4) {
            0 => format!("action == {}", self.action_like(rng)),
            1 | 2 => {
                let count = 1 + rng.below(3);
                let list: Vec<String> = (0..count).map(|_| self.action_like(rng)).collect();
                format!("action in [{}]", list.join(", "))
            }
            _ => "action".to_string(),
        }
    }

    fn condition(&self, rng: &mut Rng) -> String {
        let mut out = String::new();
        for _ in 0..rng.below(3) {
            let keyword = if rng.chance(70) { "when" } else { "unless" };
            let body = match rng.below(10) {
                // Errors when the principal has no `level` (groups never do).
                0 => format!("principal.level > {}", rng.below(5)),
                1 => "resource.owner == principal".to_string(),
                // Errors when either side lacks `tenant`.
                2 => "principal.tenant == resource.tenant".to_string(),
                // Errors when the context has no `risk`.
                3 => format!("context.risk < {}", rng.below(10)),
                4 => format!("principal has level && principal.level >= {}", rng.below(5)),
                5 => format!("principal in {}", self.principal_like(rng)),
                6 => "resource has owner && principal in resource.owner".to_string(),
                7 => "true".to_string(),
                8 => "false".to_string(),
                _ => format!("resource in {}", self.resource_like(rng)),
            };
            let _ = write!(out, " {keyword} {{ {body} }}");
        }
        out
    }

    fn effect(rng: &mut Rng) -> &'static str {
        if rng.chance(30) { "forbid" } else { "permit" }
    }
}

/// A random policy set: static policies and links to random templates, in
/// a random order.
fn policy_set(rng: &mut Rng, world: &World, size: usize) -> PolicySet {
    let mut set = PolicySet::new();
    let mut templates: Vec<(PolicyId, bool, bool)> = Vec::new();
    for t in 0..1 + rng.below(6) {
        let (principal_slot, resource_slot) = match rng.below(3) {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        let principal = world.scope(rng, "principal", principal_slot.then_some("?principal"));
        let resource = world.scope(rng, "resource", resource_slot.then_some("?resource"));
        let text = format!(
            "{}({principal}, {}, {resource}){};",
            World::effect(rng),
            world.action_scope(rng),
            world.condition(rng)
        );
        let id = PolicyId::new(format!("t{t}"));
        let template = Template::parse(Some(id.clone()), &text)
            .unwrap_or_else(|error| panic!("template `{text}`: {error}"));
        set.add_template(template).unwrap();
        templates.push((id, principal_slot, resource_slot));
    }
    for i in 0..size {
        if rng.chance(35) {
            let (template, principal_slot, resource_slot) = rng.pick(&templates).clone();
            let mut values = HashMap::new();
            if principal_slot {
                values.insert(
                    SlotId::principal(),
                    world.principal_like(rng).parse::<EntityUid>().unwrap(),
                );
            }
            if resource_slot {
                values.insert(
                    SlotId::resource(),
                    world.resource_like(rng).parse::<EntityUid>().unwrap(),
                );
            }
            set.link(template, PolicyId::new(format!("link{i}")), values)
                .unwrap();
        } else {
            let text = format!(
                "{}({}, {}, {}){};",
                World::effect(rng),
                world.scope(rng, "principal", None),
                world.action_scope(rng),
                world.scope(rng, "resource", None),
                world.condition(rng)
            );
            let policy = Policy::parse(Some(PolicyId::new(format!("p{i}"))), &text)
                .unwrap_or_else(|error| panic!("policy `{text}`: {error}"));
            set.add(policy).unwrap();
        }
    }
    set
}

fn snapshot(set: &PolicySet, entities: &Entities, mode: OnEvaluationError, min: usize) -> Snapshot {
    let options = LoadOptions {
        validate_policies: false,
        validate_requests: false,
        on_evaluation_error: mode,
        decision_cache_capacity: 0,
        slice_cache_capacity: 0,
        policy_index_min: min,
        // The requests' own entities may describe any entity here: the
        // test compares evaluations, not what callers may claim.
        request_entities: arbiter::engine::RequestEntitiesMode::Replace,
        limits: arbiter::engine::RequestLimits::default(),
        allow_empty_policies: true,
    };
    let policies = PolicySnapshot::new(set.clone(), None, Arc::from("policies"), options);
    let data = EntityData::new(entities.clone(), Arc::from("data"));
    Snapshot::new(Arc::new(policies), Arc::new(data), 0, 0)
}

/// What must be equal: reasons as a set (Cedar keeps them in a hash set),
/// errors in order.
#[derive(Debug, PartialEq)]
struct Outcome {
    allowed: bool,
    reasons: Vec<String>,
    errors: Vec<(String, String)>,
}

fn outcome(decision: Decision) -> Outcome {
    let mut reasons = decision.reasons;
    reasons.sort();
    Outcome {
        allowed: decision.allowed,
        reasons,
        errors: decision
            .errors
            .into_iter()
            .map(|error| (error.policy_id, error.message))
            .collect(),
    }
}

fn input(uid: &str) -> UidInput<'_> {
    let (type_name, id) = split(uid);
    UidInput { type_name, id }
}

#[derive(Debug, Default)]
struct Seen {
    requests: u64,
    allows: u64,
    with_reasons: u64,
    with_errors: u64,
    overlays: u64,
    candidates: u64,
    policies: u64,
    explained: u64,
}

fn round(seed: u64, seen: &mut Seen) {
    let mut rng = Rng(seed);
    let world = world(&mut rng);
    let entities = Entities::from_json_str(&world.json, None).unwrap();
    let size = 10 + rng.below(150);
    let set = policy_set(&mut rng, &world, size);
    let mode = if rng.chance(50) {
        OnEvaluationError::SkipPolicy
    } else {
        OnEvaluationError::Deny
    };
    let indexed = snapshot(&set, &entities, mode, 0);
    let whole = snapshot(&set, &entities, mode, usize::MAX);
    assert!(indexed.policies.indexed() && !whole.policies.indexed());
    let engine = Engine::new();
    for _ in 0..150 {
        let principal = world.principal_like(&mut rng);
        let action = world.action_like(&mut rng);
        let resource = world.resource_like(&mut rng);
        let context = match rng.below(4) {
            0 => String::new(),
            1 => "{}".to_string(),
            _ => format!(r#"{{"risk":{}}}"#, rng.below(10)),
        };
        // Request data that changes the principal's groups and attributes:
        // the decision then evaluates against a slice, not the whole data.
        let overlay = if principal.starts_with("User") && rng.chance(20) {
            seen.overlays += 1;
            let attrs = format!(r#""level":{}"#, rng.below(6));
            format!(
                "[{}]",
                entity_json(&principal, &attrs, &some(&mut rng, &world.groups, 2))
            )
        } else {
            String::new()
        };
        let check = CheckInput {
            principal: Some(input(&principal)),
            action: Some(input(&action)),
            resource: Some(input(&resource)),
            context_json: &context,
            entities_json: &overlay,
        };
        let expected = engine.check_against(&whole, &check).map(outcome);
        let got = engine.check_against(&indexed, &check).map(outcome);
        match (&expected, &got) {
            (Ok(expected), Ok(got)) => {
                if expected != got {
                    panic!(
                        "seed {seed}: the index disagrees with the whole set\n\
                         request: {principal} {action} {resource} context `{context}` \
                         overlay `{overlay}`\nwhole:   {expected:?}\nindexed: {got:?}\n\
                         policies:\n{set}\nentities: {}",
                        world.json
                    );
                }
                seen.requests += 1;
                seen.allows += u64::from(expected.allowed);
                seen.with_reasons += u64::from(!expected.reasons.is_empty());
                seen.with_errors += u64::from(!expected.errors.is_empty());
            }
            (Err(expected), Err(got)) => assert_eq!(expected.to_string(), got.to_string()),
            _ => panic!("seed {seed}: {expected:?} against {got:?}"),
        }
        // Explain asks Cedar about the index's candidates only: it must
        // explain every tenth request as the whole set does.
        if let (Ok(expected), true) = (&expected, seen.requests.is_multiple_of(10)) {
            let explain = |snapshot: &Snapshot| {
                let (decision, mut explanation) = engine.explain_against(snapshot, &check).unwrap();
                explanation.determining.sort();
                (outcome(decision), explanation)
            };
            let (whole_outcome, whole_explanation) = explain(&whole);
            let (indexed_outcome, indexed_explanation) = explain(&indexed);
            assert_eq!(&whole_outcome, expected, "seed {seed}");
            assert_eq!(indexed_outcome, whole_outcome, "seed {seed}");
            assert_eq!(
                indexed_explanation, whole_explanation,
                "seed {seed}: explain differs with the index\n\
                 request: {principal} {action} {resource} context `{context}`\n\
                 policies:\n{set}"
            );
            seen.explained += 1;
        }
        if overlay.is_empty() {
            let request = Request::new(
                principal.parse().unwrap(),
                action.parse().unwrap(),
                resource.parse().unwrap(),
                Context::empty(),
                None,
            )
            .unwrap();
            let count = indexed.policies.candidate_count(&request, &entities);
            seen.candidates += count.unwrap() as u64;
            seen.policies += set.num_of_policies() as u64;
        }
    }
}

#[test]
fn index_answers_as_the_whole_set() {
    let rounds = env_or("ARBITER_INDEX_DIFF_ROUNDS", 12);
    let seed = env_or("ARBITER_INDEX_DIFF_SEED", 0x18_18_18);
    let mut seen = Seen::default();
    for round_number in 0..rounds {
        round(seed.wrapping_add(round_number), &mut seen);
    }
    eprintln!("{seen:?}");
    // The rounds covered what can differ: allows, reasons, errors, slices.
    assert!(seen.allows > 0 && seen.allows < seen.requests, "{seen:?}");
    assert!(seen.with_reasons > seen.allows, "{seen:?}");
    assert!(seen.with_errors > 0 && seen.overlays > 0, "{seen:?}");
    assert!(seen.explained > 0, "{seen:?}");
    // And the index left most policies out.
    assert!(seen.candidates * 3 < seen.policies, "{seen:?}");
}
