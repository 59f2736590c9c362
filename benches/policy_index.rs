//! The policy index on the multi-tenant shape (`examples/shared/tenants.rs`,
//! issue 18): uncached in-process decisions at 100, 10k and 100k policies
//! with the index, the whole set evaluated at 100 and 10k for comparison,
//! where the two cross (the default `policy_index_min`), and what building
//! a candidate policy set costs (the index's cache miss).
//!
//! Every request is checked once against the answer the generator expects
//! before anything is timed; the decision cache is off.
//!
//! Run: `cargo bench --bench policy_index` (quicker: append
//! `-- --warm-up-time 1 --measurement-time 3`).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[path = "../examples/shared/tenants.rs"]
mod tenants;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use arbiter::engine::loader::{Inputs, SourceFile, build};
use arbiter::engine::{CheckInput, Engine, LoadOptions, Snapshot, UidInput};
use cedar_policy::PolicySet;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// Distinct requests cycled through by a benchmark.
const REQUESTS: usize = 1024;

fn file(name: &str, text: String) -> SourceFile {
    SourceFile {
        name: name.to_owned(),
        text: Arc::from(text),
    }
}

/// The snapshot of `tenants` tenants; `index_min` as in `LoadOptions`.
fn snapshot(tenants: usize, index_min: usize) -> Snapshot {
    snapshot_of(tenants, index_min, false)
}

/// The inputs of `tenants` tenants, the shares static or as template links.
fn inputs(tenants: usize, linked: bool) -> Inputs {
    let (policies, links) = if linked {
        let (policies, links) = tenants::policies_linked(tenants);
        (policies, Some(file("links.json", links)))
    } else {
        (tenants::policies(tenants), None)
    };
    Inputs {
        policy_files: vec![file("tenants.cedar", policies)],
        single_file: true,
        schema: Some(file("tenants.cedarschema", tenants::SCHEMA.to_owned())),
        entities: Some(file("tenants.json", tenants::entities(tenants))),
        template_links: links,
    }
}

fn snapshot_of(tenants: usize, index_min: usize, linked: bool) -> Snapshot {
    let inputs = inputs(tenants, linked);
    let options = LoadOptions {
        decision_cache_capacity: 0,
        policy_index_min: index_min,
        ..LoadOptions::default()
    };
    let (snapshot, _) = build(&inputs, options).expect("the generated set loads");
    assert_eq!(
        snapshot.policies.policy_count(),
        tenants * tenants::PER_TENANT + tenants::GUARDRAILS
    );
    snapshot
}

struct Owned {
    principal: String,
    action: &'static str,
    resource: String,
    context: String,
    allowed: bool,
}

impl Owned {
    fn input(&self) -> CheckInput<'_> {
        CheckInput {
            principal: Some(UidInput {
                type_name: "User",
                id: &self.principal,
            }),
            action: Some(UidInput {
                type_name: "Action",
                id: self.action,
            }),
            resource: Some(UidInput {
                type_name: "Doc",
                id: &self.resource,
            }),
            context_json: &self.context,
            entities_json: "",
        }
    }
}

fn requests(tenants: usize) -> Vec<Owned> {
    let mut state = 18;
    (0..REQUESTS)
        .map(|_| {
            let request = tenants::request(&mut state, tenants);
            Owned {
                principal: request.principal,
                action: request.action,
                resource: request.resource,
                context: request.context,
                allowed: request.allowed,
            }
        })
        .collect()
}

/// Every request answered as the generator expects, without errors.
fn verify(engine: &Engine, snapshot: &Snapshot, requests: &[Owned]) {
    for request in requests {
        let decision = engine
            .check_against(snapshot, &request.input())
            .expect("a valid request");
        assert_eq!(
            decision.allowed, request.allowed,
            "{} {} {} {}",
            request.principal, request.action, request.resource, request.context
        );
        assert!(decision.errors.is_empty(), "{:?}", decision.errors);
    }
}

fn bench_decisions(
    c: &mut Criterion,
    group_name: &str,
    sizes: &[(usize, &str, usize)],
    sample_size: usize,
) {
    bench_decisions_of(
        c,
        group_name,
        sizes,
        sample_size,
        |tenants, side, index_min| snapshot_of(tenants, index_min, side == "links"),
    );
}

fn bench_decisions_of(
    c: &mut Criterion,
    group_name: &str,
    sizes: &[(usize, &str, usize)],
    sample_size: usize,
    make: impl Fn(usize, &str, usize) -> Snapshot,
) {
    // `cargo test --all-targets` (CI) runs each benchmark once, in a debug
    // build: there the large sets (seconds to load even in release) are
    // left out; `cargo bench` passes `--bench`.
    let measuring = std::env::args().any(|arg| arg == "--bench");
    // A filter on the command line that cannot match this group: skip
    // loading its sets too (at 100k policies that takes seconds).
    let filter = std::env::args().skip(1).find(|arg| !arg.starts_with('-'));
    if filter.is_some_and(|filter| !group_name.contains(filter.split('/').next().unwrap_or(""))) {
        return;
    }
    let engine = Engine::new();
    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Elements(1));
    group.sample_size(sample_size);
    for &(tenants, side, index_min) in sizes {
        if !measuring && tenants > 10 {
            continue;
        }
        let snapshot = make(tenants, side, index_min);
        let requests = requests(tenants);
        verify(&engine, &snapshot, &requests);
        let inputs: Vec<CheckInput<'_>> = requests.iter().map(Owned::input).collect();
        let policies = snapshot.policies.policy_count();
        group.bench_function(BenchmarkId::new(side, policies), |b| {
            let mut next = 0;
            b.iter(|| {
                next = (next + 1) % inputs.len();
                engine
                    .check_against(&snapshot, black_box(&inputs[next]))
                    .expect("a valid request")
            })
        });
    }
    group.finish();
}

/// Issue 20: 100k policies whose per-document shares are links of one
/// template against the same shares as static policies, index on, the same
/// requests and answers. Load time and memory per side: `tenant_load memory
/// 10000 index` against `tenant_load memory 10000 links` (one process each).
fn bench_links(c: &mut Criterion) {
    bench_decisions(
        c,
        "links_vs_static",
        &[
            (10, "static", 0),
            (10, "links", 0),
            (10_000, "static", 0),
            (10_000, "links", 0),
        ],
        100,
    );
}

fn bench_index(c: &mut Criterion) {
    // Index on (min 0) against the whole set (min usize::MAX).
    bench_decisions(
        c,
        "tenants_uncached",
        &[
            (10, "index", 0),
            (1_000, "index", 0),
            (10_000, "index", 0),
            (10, "whole", usize::MAX),
        ],
        100,
    );
    bench_decisions(
        c,
        "tenants_uncached_slow",
        &[(1_000, "whole", usize::MAX)],
        10,
    );
    // Where the index starts to pay.
    let mut sizes = Vec::new();
    for tenants in [2, 3, 4, 6, 10, 20] {
        sizes.push((tenants, "index", 0));
        sizes.push((tenants, "whole", usize::MAX));
    }
    bench_decisions(c, "threshold", &sizes, 50);

    // A cache miss of the index: a candidate set built from the loaded one
    // (what `PolicyIndex::build` does for static policies).
    let snapshot = snapshot(10, usize::MAX);
    let all: Vec<_> = snapshot.policies.policies.policies().cloned().collect();
    let mut group = c.benchmark_group("candidate_set_build");
    for count in [5, 50] {
        group.throughput(Throughput::Elements(count as u64));
        group.bench_function(BenchmarkId::from_parameter(count), |b| {
            b.iter(|| {
                let mut set = PolicySet::new();
                for policy in &all[..count] {
                    set.add(policy.clone()).unwrap();
                }
                set
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_index, bench_links
}
criterion_main!(benches);
