//! The slice cache against the real engine and the real entity store, the
//! way the identity sync drives them (upserts, then `publish_data`): after
//! every kind of change, decisions with the cache on equal decisions with
//! it off, the changed ones change, and unchanged slices are still reused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;

use arbiter::engine::entity_store::{EntityStore, StoreWriter, StoredEntity};
use arbiter::engine::loader::{Inputs, SourceFile, build};
use arbiter::engine::{CheckInput, Decision, Engine, EntityData, LoadOptions, SliceUse, UidInput};
use cedar_policy::{Entity, EntityUid, RestrictedExpression};

const POLICIES: &str = r#"
permit (principal in Group::"top", action == Action::"read", resource);
permit (principal, action == Action::"view", resource) when { principal.clearance >= 2 };
permit (principal, action == Action::"edit", resource) when { resource.owner == principal };
permit (principal, action == Action::"approve", resource)
  when { principal has manager && principal.manager.clearance >= 3 };
forbid (principal, action, resource) when { principal.department == "blocked" };
"#;

const BIG: usize = 10_000;

fn uid(type_name: &str, id: &str) -> EntityUid {
    format!("{type_name}::\"{id}\"").parse().unwrap()
}

fn group(id: &str, parents: &[&str]) -> StoredEntity {
    let parents: Vec<EntityUid> = parents.iter().map(|p| uid("Group", p)).collect();
    let entity = Entity::new_no_attrs(uid("Group", id), parents.iter().cloned().collect());
    StoredEntity::from_entity(&entity, parents).unwrap()
}

fn user(id: &str, groups: &[&str], clearance: i64, manager: Option<&str>) -> StoredEntity {
    let parents: Vec<EntityUid> = groups.iter().map(|g| uid("Group", g)).collect();
    let mut attrs = HashMap::from([
        (
            "clearance".to_string(),
            RestrictedExpression::new_long(clearance),
        ),
        (
            "department".to_string(),
            RestrictedExpression::new_string("eng".into()),
        ),
    ]);
    if let Some(manager) = manager {
        attrs.insert(
            "manager".into(),
            RestrictedExpression::new_entity_uid(uid("User", manager)),
        );
    }
    let entity = Entity::new(uid("User", id), attrs, parents.iter().cloned().collect()).unwrap();
    StoredEntity::from_entity(&entity, parents).unwrap()
}

fn doc(id: &str, owner: &str) -> StoredEntity {
    let attrs = HashMap::from([(
        "owner".to_string(),
        RestrictedExpression::new_entity_uid(uid("User", owner)),
    )]);
    let entity = Entity::new(uid("Doc", id), attrs, Default::default()).unwrap();
    StoredEntity::from_entity(&entity, Vec::new()).unwrap()
}

fn engine(slice_cache_capacity: u64, store: &Arc<EntityStore>) -> Engine {
    let engine = Engine::with_external_data();
    publish_policies(&engine, slice_cache_capacity);
    engine.publish_data(EntityData::from_store(store.clone(), 1));
    engine
}

fn publish_policies(engine: &Engine, slice_cache_capacity: u64) {
    publish_policies_with(engine, 0, slice_cache_capacity);
}

fn publish_policies_with(engine: &Engine, decision_cache_capacity: u64, slice_cache_capacity: u64) {
    let inputs = Inputs {
        policy_files: vec![SourceFile {
            name: "policies.cedar".into(),
            text: Arc::from(POLICIES),
        }],
        single_file: true,
        schema: None,
        entities: None,
        template_links: None,
    };
    let options = LoadOptions {
        decision_cache_capacity,
        slice_cache_capacity,
        ..LoadOptions::default()
    };
    engine.publish(build(&inputs, options).unwrap().0);
}

/// The engine with the slice cache and one without, fed the same changes.
struct Pair {
    store: StoreWriter,
    position: u64,
    cached: Engine,
    reference: Engine,
}

impl Pair {
    fn new(entities: Vec<StoredEntity>) -> Pair {
        let (store, refused) = EntityStore::from_entities(entities);
        assert!(refused.is_empty(), "{refused:?}");
        let store = StoreWriter::new(store);
        Pair {
            cached: engine(1 << 20, store.store()),
            reference: engine(0, store.store()),
            store,
            position: 1,
        }
    }

    /// One applied batch, as the sync's `Applier` does it.
    fn apply(&mut self, upserts: Vec<StoredEntity>, deletes: &[EntityUid]) {
        self.store.write(|batch| {
            for entity in upserts {
                batch.upsert(entity).unwrap();
            }
            for uid in deletes {
                assert!(batch.remove(uid));
            }
        });
        self.position += 1;
        for engine in [&self.cached, &self.reference] {
            engine.publish_data(EntityData::from_store(
                self.store.store().clone(),
                self.position,
            ));
        }
    }

    /// The decision with the cache on, checked against the one without.
    fn decide(&self, principal: &str, action: &str, resource: &str) -> Decision {
        self.ask(principal, action, resource, true)
    }

    /// For the 10,000 members: every 50th also checked against the engine
    /// without the cache (a debug build evaluates slowly).
    fn decide_member(&self, n: usize, action: &str) -> Decision {
        self.ask(&format!("m{n}"), action, "d1", n.is_multiple_of(50))
    }

    fn ask(&self, principal: &str, action: &str, resource: &str, compare: bool) -> Decision {
        let input = CheckInput {
            principal: Some(UidInput {
                type_name: "User",
                id: principal,
            }),
            action: Some(UidInput {
                type_name: "Action",
                id: action,
            }),
            resource: Some(UidInput {
                type_name: "Doc",
                id: resource,
            }),
            context_json: "",
            entities_json: "",
        };
        let cached = self.cached.check(&input).unwrap();
        if !compare {
            return cached;
        }
        let reference = self.reference.check(&input).unwrap();
        assert_eq!(reference.slice, SliceUse::Built);
        assert_eq!(
            (cached.allowed, &cached.reasons, &cached.errors),
            (reference.allowed, &reference.reasons, &reference.errors),
            "{principal} {action} {resource}: cache on {cached:?}, off {reference:?}"
        );
        cached
    }

    fn allowed(&self, principal: &str, action: &str, resource: &str) -> bool {
        self.decide(principal, action, resource).allowed
    }

    /// Asks twice: the second answer must come from a prepared slice.
    fn warm(&self, principal: &str, action: &str, resource: &str) -> bool {
        let first = self.decide(principal, action, resource);
        let second = self.decide(principal, action, resource);
        assert_eq!(second.slice, SliceUse::Cached, "{principal} {action}");
        assert_eq!(first.allowed, second.allowed);
        first.allowed
    }
}

fn seed() -> Vec<StoredEntity> {
    let mut entities = vec![
        group("top", &[]),
        group("mid", &["top"]),
        group("other", &[]),
        group("leaf", &["mid"]),
        group("big", &["mid"]),
        user("ann", &["leaf"], 1, Some("mia")),
        user("bob", &["other"], 1, None),
        user("mia", &[], 2, None),
        doc("d1", "ann"),
    ];
    entities.extend((0..BIG).map(|n| user(&format!("m{n}"), &["big"], 0, None)));
    entities
}

#[test]
fn decisions_follow_every_kind_of_change_with_the_slice_cache_on() {
    let mut pair = Pair::new(seed());
    assert!(pair.warm("ann", "read", "d1"));
    assert!(!pair.warm("bob", "read", "d1"));
    assert!(!pair.warm("bob", "view", "d1"));
    assert!(pair.warm("ann", "edit", "d1"));
    assert!(!pair.warm("ann", "approve", "d1"));

    // An attribute of the principal.
    pair.apply(vec![user("bob", &["other"], 2, None)], &[]);
    assert!(pair.allowed("bob", "view", "d1"));
    // Slices without bob are still served.
    assert_eq!(pair.decide("ann", "read", "d1").slice, SliceUse::Cached);

    // An attribute of an entity reached through a reference (the manager).
    pair.apply(vec![user("mia", &[], 3, None)], &[]);
    assert!(pair.allowed("ann", "approve", "d1"));
    // An attribute of the resource.
    pair.apply(vec![doc("d1", "bob")], &[]);
    assert!(!pair.allowed("ann", "edit", "d1"));
    assert!(pair.warm("bob", "edit", "d1"));

    // Membership added and removed.
    pair.apply(vec![user("bob", &["other", "leaf"], 2, None)], &[]);
    assert!(pair.warm("bob", "read", "d1"));
    pair.apply(vec![user("bob", &["other"], 2, None)], &[]);
    assert!(!pair.warm("bob", "read", "d1"));

    // A nested group moves: out of `top` and back, and a group moved
    // under a group the principal is in.
    pair.apply(vec![group("mid", &[])], &[]);
    assert!(!pair.allowed("ann", "read", "d1"));
    assert!(!pair.allowed("m17", "read", "d1"));
    pair.apply(vec![group("mid", &["top"])], &[]);
    assert!(pair.warm("ann", "read", "d1"));
    assert!(!pair.warm("bob", "read", "d1"));
    pair.apply(vec![group("other", &["leaf"])], &[]);
    assert!(pair.allowed("bob", "read", "d1"));

    // A principal deleted, then one that was asked about while absent
    // appears.
    pair.apply(vec![], &[uid("User", "bob")]);
    assert!(!pair.warm("bob", "read", "d1"));
    pair.apply(vec![user("bob", &["leaf"], 0, None)], &[]);
    assert!(pair.allowed("bob", "read", "d1"));
    // The same for a group the principal names as parent: added later.
    pair.apply(
        vec![group("late", &[]), user("eve", &["late"], 0, None)],
        &[],
    );
    assert!(!pair.warm("eve", "read", "d1"));
    pair.apply(vec![group("late", &["top"])], &[]);
    assert!(pair.allowed("eve", "read", "d1"));
}

#[test]
fn a_membership_change_of_a_group_with_10k_members_reaches_every_member() {
    let mut pair = Pair::new(seed());
    for n in 0..BIG {
        assert!(pair.decide_member(n, "read").allowed);
    }
    assert_eq!(pair.decide("m0", "read", "d1").slice, SliceUse::Cached);
    assert_eq!(pair.decide("ann", "read", "d1").slice, SliceUse::Built);

    // Every member leaves `big` in one batch: each member's parents change.
    let leaving: Vec<StoredEntity> = (0..BIG)
        .map(|n| user(&format!("m{n}"), &[], 0, None))
        .collect();
    pair.apply(leaving, &[]);
    for n in 0..BIG {
        let decision = pair.decide_member(n, "read");
        assert!(!decision.allowed, "m{n}");
        assert_eq!(decision.slice, SliceUse::Built, "m{n}");
    }
    // ann's slice did not contain them: still served.
    assert_eq!(pair.decide("ann", "read", "d1").slice, SliceUse::Cached);

    // Back in, then `big` itself moves out of the hierarchy: one change to
    // the group reaches all 10,000 cached slices through it.
    let joining: Vec<StoredEntity> = (0..BIG)
        .map(|n| user(&format!("m{n}"), &["big"], 0, None))
        .collect();
    pair.apply(joining, &[]);
    for n in 0..BIG {
        assert!(pair.decide_member(n, "read").allowed, "m{n}");
    }
    pair.apply(vec![group("big", &[])], &[]);
    for n in 0..BIG {
        let decision = pair.decide_member(n, "read");
        assert!(!decision.allowed, "m{n}");
        assert_eq!(decision.slice, SliceUse::Built, "m{n}");
    }
}

#[test]
fn a_decision_on_an_older_snapshot_never_takes_a_newer_slice() {
    let mut pair = Pair::new(seed());
    assert!(pair.warm("ann", "read", "d1"));
    let old = pair.cached.snapshot().unwrap();
    pair.apply(vec![user("ann", &[], 1, Some("mia"))], &[]);
    // The newer snapshot prepares its slice first ...
    assert!(!pair.warm("ann", "read", "d1"));
    // ... then a decision still holding the older one: built from its own
    // store, with its own answer.
    let input = CheckInput {
        principal: Some(UidInput {
            type_name: "User",
            id: "ann",
        }),
        action: Some(UidInput {
            type_name: "Action",
            id: "read",
        }),
        resource: Some(UidInput {
            type_name: "Doc",
            id: "d1",
        }),
        context_json: "",
        entities_json: "",
    };
    let decision = pair.cached.check_against(&old, &input).unwrap();
    assert!(decision.allowed);
    assert_eq!(decision.slice, SliceUse::Built);
    // And the newer one is not handed the older slice it just stored.
    assert!(!pair.allowed("ann", "read", "d1"));
}

#[test]
fn a_policy_publish_starts_an_empty_slice_cache() {
    let pair = Pair::new(seed());
    assert!(pair.warm("ann", "read", "d1"));
    publish_policies(&pair.cached, 1 << 20);
    assert_eq!(pair.decide("ann", "read", "d1").slice, SliceUse::Built);
    assert_eq!(pair.decide("ann", "read", "d1").slice, SliceUse::Cached);
}

/// With synced data the decision cache outlives a data publish (one per
/// policy set), so every answer is cached under its snapshot's generation:
/// a new snapshot never gets an answer decided against older data, even one
/// that a decision still running on an older snapshot caches after the
/// publish.
#[test]
fn the_decision_cache_never_answers_from_older_data() {
    let input = CheckInput {
        principal: Some(UidInput {
            type_name: "User",
            id: "bob",
        }),
        action: Some(UidInput {
            type_name: "Action",
            id: "view",
        }),
        resource: Some(UidInput {
            type_name: "Doc",
            id: "d1",
        }),
        context_json: "",
        entities_json: "",
    };
    let (store, refused) = EntityStore::from_entities(seed());
    assert!(refused.is_empty());
    let mut store = StoreWriter::new(store);
    let engine = Engine::with_external_data();
    publish_policies_with(&engine, 1024, 0);
    engine.publish_data(EntityData::from_store(store.store().clone(), 1));
    let ask = || engine.check(&input).unwrap();

    // bob's clearance is 1: denied, then the same answer from the cache.
    assert!(!ask().allowed && !ask().allowed);
    assert!(ask().cached);
    let before = engine.snapshot().unwrap();

    // Clearance 2: allowed, decided afresh, then cached.
    store.write(|batch| batch.upsert(user("bob", &["other"], 2, None)).unwrap());
    engine.publish_data(EntityData::from_store(store.store().clone(), 2));
    let after = ask();
    assert!(after.allowed && !after.cached, "{after:?}");
    assert!(ask().cached && ask().allowed);

    // A decision still on the older snapshot answers from its own data
    // and caches that; the current snapshot never sees it.
    for _ in 0..2 {
        assert!(!engine.check_against(&before, &input).unwrap().allowed);
    }
    assert!(ask().allowed);

    // A publish of the very same data (a reconciliation that found nothing)
    // still starts afresh.
    engine.publish_data(EntityData::from_store(store.store().clone(), 2));
    let again = ask();
    assert!(again.allowed && !again.cached, "{again:?}");
}
