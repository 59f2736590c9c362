//! Histogram samples of a server that nobody scrapes are drained by the
//! upkeep thread that `telemetry::prometheus` starts, so memory does not
//! grow with every decision. Its own test binary: the recorder is global
//! to the process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use arbiter::telemetry::{METRICS_UPKEEP_INTERVAL, prometheus};

fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|text| text.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Far more samples than a real server records between two upkeeps, so
/// that what they hold stands out of the process's other memory.
fn record(samples: usize) {
    let histogram = metrics::histogram!("arbiter_decision_duration_seconds");
    for n in 0..samples {
        histogram.record(n as f64 * 1e-9);
    }
}

#[test]
fn histogram_samples_are_drained_without_a_scrape() {
    assert!(prometheus().is_some(), "the recorder was not installed");
    // Recorded well within the first upkeep interval, even on a slow
    // machine (about a second in a debug build here).
    const SAMPLES: usize = 2_000_000;
    const MIB: u64 = 1 << 20;

    let before = resident_bytes();
    record(SAMPLES);
    let held = resident_bytes().saturating_sub(before);
    // Until the next upkeep the samples are held: about 16 bytes each
    // here, some 30 MiB. Without that this test could not tell a drain from
    // nothing.
    assert!(
        held > 12 * MIB,
        "{SAMPLES} samples added only {} KiB",
        held / 1024
    );

    std::thread::sleep(METRICS_UPKEEP_INTERVAL + std::time::Duration::from_secs(1));
    let drained = resident_bytes();
    record(SAMPLES);
    let grown = resident_bytes().saturating_sub(drained);
    // Drained, their memory is reused by the next samples; without the
    // upkeep the process would grow by `held` again.
    assert!(
        grown < held / 4,
        "after an upkeep interval, {SAMPLES} more samples grew the process by {} MiB (the first {SAMPLES} by {} MiB)",
        grown / MIB,
        held / MIB
    );
}
