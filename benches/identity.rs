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
use cedar_policy::{Entity, EntityUid, RestrictedExpression};
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

fn user(n: usize, clearance: i64) -> StoredEntity {
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
    entity(uid(format!("User::\"u{n}\"")), parents, attrs)
}

fn store(users: usize) -> EntityStore {
    let mut store = EntityStore::new();
    for group in groups() {
        store.upsert(group).unwrap();
    }
    for n in 0..users {
        store.upsert(user(n, (n % 4) as i64)).unwrap();
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
    let mut changes = c.benchmark_group("identity_apply_one_change");
    // With caches off, and with the server's default caches (a publish
    // starts the snapshot's decision cache anew).
    let defaults = LoadOptions::default();
    let runs = [
        ("", change_small, store(change_small)),
        ("", large, big),
        ("server_caches/", change_small, store(change_small)),
    ];
    for (caches, label, users) in runs {
        // What `identity::Applier::apply` does for one change: write it
        // through the store's writer (which first catches its spare copy up
        // on the previous change, freeing the version that one replaced),
        // upsert with the checks, and publish a snapshot, which frees the
        // snapshot before. The entity is built outside the timing (the
        // source's parsing). The writer is made as a full sync makes it,
        // with its spare copy (timed here: the copy of the map).
        let started = Instant::now();
        let mut writer = StoreWriter::with_spare(users);
        eprintln!(
            "identity bench: the full sync's spare copy at {label} users took {:.1?}",
            started.elapsed()
        );
        let engine = if caches.is_empty() {
            engine_with(writer.store().clone(), 0)
        } else {
            engine_with_caches(
                writer.store().clone(),
                defaults.decision_cache_capacity,
                defaults.slice_cache_capacity,
            )
        };
        let mut position = 1;
        let mut n = 0usize;
        changes.bench_function(
            BenchmarkId::from_parameter(format!("{caches}{label}")),
            |b| {
                b.iter_batched(
                    || {
                        n = (n + 7919) % label;
                        position += 1;
                        (user(n, (position % 4) as i64), position)
                    },
                    |(entity, position)| {
                        writer.write(|batch| batch.upsert(entity).unwrap());
                        engine
                            .publish_data(EntityData::from_store(writer.store().clone(), position));
                    },
                    BatchSize::SmallInput,
                );
            },
        );
    }
    changes.finish();
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
