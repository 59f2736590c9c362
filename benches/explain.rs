//! What explaining a decision costs against deciding it, side by side in
//! one run, on the embedded example (20 policies, not indexed) without the
//! decision cache: `check/<case>` against `explain/<case>`.
//!
//! Run: `cargo bench --bench explain` (quicker: append
//! `-- --warm-up-time 1 --measurement-time 3`).

#![allow(clippy::expect_used)]

use std::hint::black_box;

use arbiter::engine::{CheckInput, Engine, LoadOptions, Sources, UidInput, loader};
use criterion::{Criterion, criterion_group, criterion_main};

const CONTEXT: &str = r#"{"mfa": true, "source_ip": "10.1.2.3"}"#;

fn input<'a>(principal: &'a str, action: &'a str, resource: &'a str) -> CheckInput<'a> {
    let uid = |type_name: &'a str, id: &'a str| Some(UidInput { type_name, id });
    CheckInput {
        principal: uid("Saas::User", principal),
        action: uid("Saas::Action", action),
        resource: uid("Saas::Document", resource),
        context_json: CONTEXT,
        entities_json: "",
    }
}

fn bench_explain(c: &mut Criterion) {
    let options = LoadOptions {
        decision_cache_capacity: 0,
        ..LoadOptions::default()
    };
    let (snapshot, _) = loader::load(&Sources::default(), options).expect("the example loads");
    let engine = Engine::new();
    engine.publish(snapshot);
    let cases = [
        ("allow", input("bob", "write", "acme-roadmap")),
        (
            "deny_forbid",
            input("frank", "delete", "acme-sales-pipeline"),
        ),
        ("deny_default", input("carol", "write", "acme-roadmap")),
    ];
    // The first explain derives the scope policies; measure the steady state.
    for (_, input) in &cases {
        engine.explain(input).expect("a valid request");
    }
    let mut group = c.benchmark_group("check");
    for (name, input) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| engine.check(black_box(input)).expect("a valid request"))
        });
    }
    group.finish();
    let mut group = c.benchmark_group("explain");
    for (name, input) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| engine.explain(black_box(input)).expect("a valid request"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_explain);
criterion_main!(benches);
