//! Identity store benchmarks (in-process, no database): the cost of
//! applying one change and of one decision, at a small and a large store.
//!
//! Users are in 10 leaf groups of a 3-level hierarchy (10 × 10 × 10 groups)
//! and have 3 attributes. `cargo bench --bench identity` uses 10k/1M users
//! for changes and 1k/1M for decisions (set `ARBITER_BENCH_LARGE` to change
//! the large size), and at the large size a decision that builds its slice
//! against one served from the slice cache; `cargo test --benches` runs
//! each once on small stores.
//! The resident memory of the large store is printed per user.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use arbiter::engine::entity_store::{EntityStore, StoreWriter, StoredEntity};
use arbiter::engine::loader::{Inputs, SourceFile, build};
use arbiter::engine::{CheckInput, Decision, Engine, EntityData, LoadOptions, SliceUse, UidInput};
use cedar_policy::{Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression};
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};

// The server's allocator (src/main.rs): what a change frees and allocates
// is part of its cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const POLICIES: &str = r#"
permit (principal in Group::"g-0-0-0", action == Action::"read", resource);
permit (principal, action == Action::"view", resource) when { principal.clearance >= 2 };
forbid (principal, action, resource) when { principal.department == "blocked" };
"#;

fn uid(text: String) -> EntityUid {
    text.parse().unwrap()
}

fn group_uid(a: usize, b: usize, c: usize) -> EntityUid {
    let id = match (b, c) {
        (usize::MAX, _) => format!("g-{a}"),
        (_, usize::MAX) => format!("g-{a}-{b}"),
        _ => format!("g-{a}-{b}-{c}"),
    };
    uid(format!("Group::\"{id}\""))
}

fn groups() -> Vec<StoredEntity> {
    let mut out = Vec::new();
    for a in 0..10 {
        out.push(entity(group_uid(a, usize::MAX, 0), vec![], HashMap::new()));
        for b in 0..10 {
            out.push(entity(
                group_uid(a, b, usize::MAX),
                vec![group_uid(a, usize::MAX, 0)],
                HashMap::new(),
            ));
            for c in 0..10 {
                out.push(entity(
                    group_uid(a, b, c),
                    vec![group_uid(a, b, usize::MAX)],
                    HashMap::new(),
                ));
            }
        }
    }
    out
}

fn entity(
    uid: EntityUid,
    parents: Vec<EntityUid>,
    attrs: HashMap<String, RestrictedExpression>,
) -> StoredEntity {
    let entity = Entity::new(uid, attrs, parents.iter().cloned().collect::<HashSet<_>>()).unwrap();
    StoredEntity::from_entity(&entity, parents).unwrap()
}

/// User `u<n>`, its uid of type `user_type`: as in the server, where one
/// `RowParser` per listing or batch parses each type name once and the
/// uids it makes share that type.
fn user(n: usize, clearance: i64, user_type: &EntityTypeName) -> StoredEntity {
    let mut seed = (n as u64)
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut parents = Vec::with_capacity(10);
    while parents.len() < 10 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let leaf = (seed >> 33) as usize % 1000;
        let group = group_uid(leaf / 100, (leaf / 10) % 10, leaf % 10);
        if !parents.contains(&group) {
            parents.push(group);
        }
    }
    let attrs = HashMap::from([
        (
            "email".to_string(),
            RestrictedExpression::new_string(format!("user{n}@example.test")),
        ),
        (
            "department".to_string(),
            RestrictedExpression::new_string(["eng", "sales", "ops"][n % 3].to_string()),
        ),
        (
            "clearance".to_string(),
            RestrictedExpression::new_long(clearance),
        ),
    ]);
    let uid = EntityUid::from_type_name_and_id(user_type.clone(), EntityId::new(format!("u{n}")));
    entity(uid, parents, attrs)
}

fn user_type() -> EntityTypeName {
    "User".parse().unwrap()
}

fn store(users: usize) -> EntityStore {
    let mut store = EntityStore::new();
    for group in groups() {
        store.upsert(group).unwrap();
    }
    let user_type = user_type();
    for n in 0..users {
        store.upsert(user(n, (n % 4) as i64, &user_type)).unwrap();
    }
    store
}

fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|text| text.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn engine_with(store: Arc<EntityStore>, slice_cache_capacity: u64) -> Arc<Engine> {
    engine_with_caches(store, 0, slice_cache_capacity)
}

fn engine_with_caches(
    store: Arc<EntityStore>,
    decision_cache_capacity: u64,
    slice_cache_capacity: u64,
) -> Arc<Engine> {
    let engine = Arc::new(Engine::with_external_data());
    let inputs = Inputs {
        policy_files: vec![SourceFile {
            name: "bench.cedar".into(),
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
    let (snapshot, _) = build(&inputs, options).unwrap();
    engine.publish(snapshot);
    engine.publish_data(EntityData::from_store(store, 1));
    engine
}

fn sizes() -> (usize, usize, usize) {
    let bench = std::env::args().any(|arg| arg == "--bench");
    let large = std::env::var("ARBITER_BENCH_LARGE")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(if bench { 1_000_000 } else { 20_000 });
    if bench {
        (1_000, 10_000, large)
    } else {
        (100, 1_000, large)
    }
}

fn identity(c: &mut Criterion) {
    let (decide_small, change_small, large) = sizes();
    let started = Instant::now();
    let before = resident_bytes();
    let big = Arc::new(store(large));
    let after = resident_bytes();
    eprintln!(
        "identity bench: {large} users built in {:.1?}, resident {:.0} bytes per user",
        started.elapsed(),
        after.saturating_sub(before) as f64 / large as f64
    );

    // Decisions that build their slice (slice cache off, decision cache off).
    let mut decisions = c.benchmark_group("identity_decide");
    for (label, users) in [
        (decide_small, Arc::new(store(decide_small))),
        (large, big.clone()),
    ] {
        let engine = engine_with(users, 0);
        let ids = principals(label);
        let mut i = 0usize;
        decisions.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.iter(|| {
                i = (i + 1) % ids.len();
                decide(&engine, &ids[i])
            });
        });
    }
    decisions.finish();

    // The same 1,024 principals at the large size, slice built vs prepared
    // slice from the slice cache (after one round to fill it).
    let mut slices = c.benchmark_group("identity_decide_slice");
    let ids = principals(large);
    for (label, capacity) in [("built", 0), ("cached", 1 << 20)] {
        let engine = engine_with(big.clone(), capacity);
        for id in &ids {
            decide(&engine, id);
        }
        if capacity > 0 {
            // Memory of prepared slices: 10,000 more principals.
            let more = 10_000.min(large / 2);
            let before = resident_bytes();
            for n in 0..more {
                decide(&engine, &format!("u{}", large - 1 - n));
            }
            eprintln!(
                "identity bench: {more} more prepared slices, resident {:.0} bytes per slice",
                resident_bytes().saturating_sub(before) as f64 / more as f64
            );
        }
        let mut i = 0usize;
        slices.bench_function(BenchmarkId::new(label, large), |b| {
            b.iter(|| {
                i = (i + 1) % ids.len();
                let decision = decide(&engine, &ids[i]);
                let expected = if capacity == 0 {
                    SliceUse::Built
                } else {
                    SliceUse::Cached
                };
                assert_eq!(decision.slice, expected);
                decision
            });
        });
    }
    slices.finish();

    // Last, so that the large store is no longer shared with another
    // holder (the engines above are gone).
    drop(ids);
    let big = Arc::try_unwrap(big).unwrap_or_else(|shared| EntityStore::clone(&shared));
    // With caches off, and with the server's default caches (a publish
    // starts the snapshot's decision cache anew).
    let defaults = LoadOptions::default();
    let mut small = ChangeSide::new(change_small, store(change_small), None);
    let mut large = ChangeSide::new(large, big, None);
    let mut with_caches = ChangeSide::new(
        change_small,
        store(change_small),
        Some((
            defaults.decision_cache_capacity,
            defaults.slice_cache_capacity,
        )),
    );
    paired_change_ratio(&mut small, &mut large);
    let mut changes = c.benchmark_group("identity_apply_one_change");
    for (caches, side) in [
        ("", &mut small),
        ("", &mut large),
        ("server_caches/", &mut with_caches),
    ] {
        changes.bench_function(
            BenchmarkId::from_parameter(format!("{caches}{}", side.users)),
            |b| {
                b.iter_batched(
                    || side.changes.next(),
                    |(entity, position)| side.target.apply(entity, position),
                    BatchSize::SmallInput,
                );
            },
        );
    }
    changes.finish();
}

/// One store changed one user at a time, as `identity::Applier::apply` does
/// it: write the change through the store's writer (which first catches its
/// spare copy up on the previous change, freeing the version that one
/// replaced), upsert with the checks, and publish a snapshot, which frees
/// the snapshot before. The entity is built outside the timing (the
/// source's parsing). The writer is made as a full sync makes it, with its
/// spare copy (timed: the copy of the map).
struct ChangeSide {
    users: usize,
    changes: UserChanges,
    target: ChangeTarget,
}

/// The store's writer and the engine it publishes to.
struct ChangeTarget {
    writer: StoreWriter,
    engine: Arc<Engine>,
}

impl ChangeTarget {
    fn apply(&mut self, entity: StoredEntity, position: u64) {
        self.writer.write(|batch| batch.upsert(entity).unwrap());
        self.engine.publish_data(EntityData::from_store(
            self.writer.store().clone(),
            position,
        ));
    }
}

/// The next user to change (stepping through all of them) and position.
struct UserChanges {
    users: usize,
    position: u64,
    next_user: usize,
}

impl UserChanges {
    fn next(&mut self) -> (StoredEntity, u64) {
        self.next_user = (self.next_user + 7919) % self.users;
        self.position += 1;
        // A batch of one change: its own parser.
        let entity = user(self.next_user, (self.position % 4) as i64, &user_type());
        (entity, self.position)
    }
}

impl ChangeSide {
    /// `caches`: the decision and slice cache capacities (none: both off).
    fn new(users: usize, store: EntityStore, caches: Option<(u64, u64)>) -> Self {
        let started = Instant::now();
        let writer = StoreWriter::with_spare(store);
        eprintln!(
            "identity bench: the full sync's spare copy at {users} users took {:.1?}",
            started.elapsed()
        );
        let engine = match caches {
            None => engine_with(writer.store().clone(), 0),
            Some((decisions, slices)) => {
                engine_with_caches(writer.store().clone(), decisions, slices)
            }
        };
        ChangeSide {
            users,
            changes: UserChanges {
                users,
                position: 1,
                next_user: 0,
            },
            target: ChangeTarget { writer, engine },
        }
    }
}

/// The ratio of one change's cost at the large size to the small, side by
/// side: blocks of changes alternate between the two stores (the order
/// flips every round), so that the machine's drift (other guests on its
/// cores and caches) falls on both alike, and the ratio is taken per pair
/// of neighbouring blocks. Criterion's figures below time each size on
/// its own, seconds apart.
fn paired_change_ratio(small: &mut ChangeSide, large: &mut ChangeSide) {
    let bench = std::env::args().any(|arg| arg == "--bench");
    let (rounds, block) = if bench { (301, 200) } else { (3, 20) };
    let per_change = |side: &mut ChangeSide| {
        let changes: Vec<_> = (0..block).map(|_| side.changes.next()).collect();
        let started = Instant::now();
        for (entity, position) in changes {
            side.target.apply(entity, position);
        }
        started.elapsed().as_secs_f64() / block as f64
    };
    let (mut small_times, mut large_times, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (s, l) = if round % 2 == 0 {
            let s = per_change(small);
            (s, per_change(large))
        } else {
            let l = per_change(large);
            (per_change(small), l)
        };
        small_times.push(s);
        large_times.push(l);
        ratios.push(l / s);
    }
    eprintln!(
        "identity bench: one change, {rounds} alternating blocks of {block}: median {:.2} µs at {} users, {:.2} µs at {} users; median ratio of neighbouring blocks {:.2}× (quartiles {:.2}–{:.2})",
        quantile(&mut small_times, 0.5) * 1e6,
        small.users,
        quantile(&mut large_times, 0.5) * 1e6,
        large.users,
        quantile(&mut ratios, 0.5),
        quantile(&mut ratios, 0.25),
        quantile(&mut ratios, 0.75),
    );
}

fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let index = ((values.len() - 1) as f64 * q).round() as usize;
    values[index]
}

fn principals(users: usize) -> Vec<String> {
    (0..1024)
        .map(|i| format!("u{}", (i * 7919) % users))
        .collect()
}

fn decide(engine: &Engine, principal: &str) -> Decision {
    let input = CheckInput {
        principal: Some(UidInput {
            type_name: "User",
            id: principal,
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
    engine.check(&input).unwrap()
}

criterion_group!(benches, identity);
criterion_main!(benches);
