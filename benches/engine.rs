//! Engine micro-benchmarks on the embedded example policy set.
//!
//! Requests are taken from the fixtures in `policies/tests/*.json`, and each
//! one is checked once before measuring, so a benchmark never times an error
//! path or a wrong decision.
//!
//! Run: `cargo bench --bench engine` (quicker: append
//! `-- --warm-up-time 1 --measurement-time 3`).

#![allow(clippy::expect_used)]

use std::hint::black_box;

use arbiter::engine::{CheckInput, Engine, LoadOptions, Sources, UidInput, loader};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::Value;

/// The fixture files, compiled in so the bench works from any directory.
const FIXTURES: &[(&str, &str)] = &[
    (
        "guardrails.json",
        include_str!("../policies/tests/guardrails.json"),
    ),
    (
        "ownership.json",
        include_str!("../policies/tests/ownership.json"),
    ),
    ("rbac.json", include_str!("../policies/tests/rbac.json")),
    (
        "sharing.json",
        include_str!("../policies/tests/sharing.json"),
    ),
];

/// One fixture case, owned, so [`CheckInput`]s can borrow from it.
struct Case {
    name: String,
    principal: (String, String),
    action: (String, String),
    resource: (String, String),
    context_json: String,
    entities_json: String,
    allowed: bool,
}

impl Case {
    fn input(&self) -> CheckInput<'_> {
        fn uid((type_name, id): &(String, String)) -> Option<UidInput<'_>> {
            Some(UidInput { type_name, id })
        }
        CheckInput {
            principal: uid(&self.principal),
            action: uid(&self.action),
            resource: uid(&self.resource),
            context_json: &self.context_json,
            entities_json: &self.entities_json,
        }
    }
}

fn uid(case: &Value, field: &str) -> (String, String) {
    let uid = &case[field];
    let part = |key: &str| {
        uid[key]
            .as_str()
            .ok_or_else(|| format!("`{field}.{key}`"))
            .expect("entity uid parts are strings")
            .to_owned()
    };
    (part("type"), part("id"))
}

fn all_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (file, text) in FIXTURES {
        let fixture: Value = serde_json::from_str(text).expect("fixture is JSON");
        let list = fixture["cases"].as_array().expect("fixture has `cases`");
        for case in list {
            let name = case["name"].as_str().expect("case has a name");
            cases.push(Case {
                name: format!("{file}: {name}"),
                principal: uid(case, "principal"),
                action: uid(case, "action"),
                resource: uid(case, "resource"),
                context_json: case
                    .get("context")
                    .map(Value::to_string)
                    .unwrap_or_default(),
                entities_json: case
                    .get("entities")
                    .map(Value::to_string)
                    .unwrap_or_default(),
                allowed: case["decision"] == "allow",
            });
        }
    }
    cases
}

fn find<'a>(cases: &'a [Case], file: &str, name: &str) -> &'a Case {
    let wanted = format!("{file}: {name}");
    cases
        .iter()
        .find(|case| case.name == wanted)
        .ok_or(wanted)
        .expect("the fixture case exists")
}

/// The engine on the embedded set; `decision_cache_capacity` 0 makes every
/// check a full Cedar evaluation.
fn engine(decision_cache_capacity: u64) -> Engine {
    let options = LoadOptions {
        decision_cache_capacity,
        // The fixtures' entities are the author's data, as `arbiter test`
        // loads them (some restate or invent users).
        request_entities: arbiter::engine::RequestEntitiesMode::Replace,
        ..LoadOptions::default()
    };
    let (snapshot, _report) =
        loader::load(&Sources::default(), options).expect("the embedded policy set loads");
    let engine = Engine::new();
    engine.publish(snapshot);
    engine
}

/// Checks `case` once and insists on the fixture's decision (and, when
/// `reasons` is given, on the exact set of determining policies).
fn verified<'a>(engine: &Engine, case: &'a Case, reasons: Option<&[&str]>) -> CheckInput<'a> {
    let input = case.input();
    let decision = engine
        .check(&input)
        .map_err(|error| format!("`{}`: {error}", case.name))
        .expect("the fixture request is valid");
    assert_eq!(decision.allowed, case.allowed, "`{}`", case.name);
    assert!(
        decision.errors.is_empty(),
        "`{}`: {:?}",
        case.name,
        decision.errors
    );
    if let Some(reasons) = reasons {
        let mut got: Vec<&str> = decision.reasons.iter().map(String::as_str).collect();
        let mut want = reasons.to_vec();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "`{}`", case.name);
    }
    input
}

fn bench_engine(c: &mut Criterion) {
    let cached_engine = engine(LoadOptions::default().decision_cache_capacity);
    let engine = engine(0);
    let cases = all_cases();

    let allow = verified(
        &engine,
        find(&cases, "rbac.json", "viewer can read an internal document"),
        Some(&["viewer-can-read"]),
    );
    let forbid = verified(
        &engine,
        find(&cases, "guardrails.json", "suspended editor cannot write"),
        Some(&["suspended-user-denied"]),
    );
    let default_deny = verified(
        &engine,
        find(&cases, "rbac.json", "viewer cannot write (default deny)"),
        Some(&[]),
    );
    let overlay = verified(
        &engine,
        find(
            &cases,
            "guardrails.json",
            "user of a suspended tenant cannot read own document (request-only entities)",
        ),
        Some(&["suspended-tenant-denied"]),
    );
    assert!(!overlay.entities_json.is_empty());

    // Every fixture case (overlays included), cycled to 100 requests.
    let batch: Vec<CheckInput<'_>> = cases
        .iter()
        .map(|case| verified(&engine, case, None))
        .cycle()
        .take(100)
        .collect();

    let mut group = c.benchmark_group("check");
    group.throughput(Throughput::Elements(1));
    for (name, input) in [
        ("allow", &allow),
        ("deny_forbid", &forbid),
        ("deny_default", &default_deny),
        ("deny_forbid_entities_overlay", &overlay),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| engine.check(black_box(input)).expect("a valid request"))
        });
    }
    group.finish();

    // The same questions again and again: answered from the decision cache.
    let mut group = c.benchmark_group("check_cached");
    group.throughput(Throughput::Elements(1));
    for (name, input) in [("allow", &allow), ("deny_forbid", &forbid)] {
        cached_engine.check(input).expect("a valid request");
        group.bench_function(name, |b| {
            b.iter(|| {
                cached_engine
                    .check(black_box(input))
                    .expect("a valid request")
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("check_all");
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function("fixtures_x100", |b| {
        b.iter(|| engine.check_all(black_box(&batch)).expect("valid requests"))
    });
    group.finish();
}

criterion_group!(benches, bench_engine);
criterion_main!(benches);
