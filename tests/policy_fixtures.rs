//! Runs every decision fixture in `policies/tests/` against the embedded
//! default policy set, through the same library function as `arbiter test`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use arbiter::cli::test::run_fixtures;
use arbiter::engine::{LoadOptions, Sources, loader};

#[test]
fn every_fixture_in_policies_tests_passes_against_the_embedded_default() {
    // As `arbiter test` loads: fixtures' entities are the author's data.
    let options = LoadOptions {
        request_entities: arbiter::engine::RequestEntitiesMode::Replace,
        ..LoadOptions::default()
    };
    let (snapshot, _) =
        loader::load(&Sources::default(), options).expect("the embedded default loads");
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("policies")
        .join("tests");
    let report = run_fixtures(&snapshot, &[fixtures]).expect("fixtures parse");

    let failures: Vec<String> = report.failures.iter().map(ToString::to_string).collect();
    assert!(
        report.all_passed(),
        "{} of {} fixture cases failed:\n{}",
        report.failed(),
        report.total(),
        failures.join("\n")
    );
    assert!(
        report.files.len() >= 4,
        "expected the four fixture files, ran {:?}",
        report.files
    );
    assert_eq!(report.results.len(), report.total());
    // Every policy of the example is made determining by some passing case.
    assert!(
        report.never_exercised.is_empty(),
        "never exercised: {:?}",
        report.never_exercised
    );
    assert!(
        report.total() >= 30,
        "expected at least 30 fixture cases, found {}",
        report.total()
    );
}
