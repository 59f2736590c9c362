//! Logging and metrics set-up, and the metric handles of the decision path.
//! Handles are registered once at start, so recording a decision is a few
//! atomic operations and no registry lookup.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::engine::{Decision, SliceUse};

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often histogram samples are folded into their buckets when nobody
/// scrapes `/metrics` (the exporter's own default for its installed mode).
pub const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder once per process and returns the handle
/// that renders `/metrics`; `None` when another recorder was installed first.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_duration_seconds".into()),
                    &[
                        0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5,
                        0.001, 0.002_5, 0.005, 0.01, 0.05, 0.1,
                    ],
                )
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            spawn_upkeep(handle.clone());
            Some(handle)
        })
        .as_ref()
}

/// A recorder made by `build_recorder` keeps every histogram sample until
/// something drains it: a scrape of `/metrics`, or this. Without it a
/// release server that nobody scrapes grew by about 17 bytes per decision
/// (from 37 to 58 MB resident over 1.2M decisions). `tests/metrics_upkeep.rs`
/// checks the drain.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("arbiter-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(METRICS_UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(
            %error,
            "metrics upkeep thread not started: histogram samples are drained by scrapes only"
        );
    }
}

fn describe() {
    metrics::describe_counter!("arbiter_decisions_total", "Decisions made, by outcome");
    metrics::describe_histogram!(
        "arbiter_decision_duration_seconds",
        metrics::Unit::Seconds,
        "Time to evaluate one decision"
    );
    metrics::describe_counter!(
        "arbiter_decision_cache_hits_total",
        "Decisions answered from the per-snapshot decision cache"
    );
    metrics::describe_counter!(
        "arbiter_slice_cache_hits_total",
        "Decisions over synced data evaluated against a prepared slice from the slice cache"
    );
    metrics::describe_counter!(
        "arbiter_slice_builds_total",
        "Decisions over synced data that built their slice of the store"
    );
    metrics::describe_gauge!("arbiter_policies_loaded", "Policies in the active set");
    metrics::describe_gauge!("arbiter_entities_loaded", "Entities in the active store");
    metrics::describe_counter!("arbiter_policy_reloads_total", "Successful policy reloads");
    metrics::describe_counter!(
        "arbiter_policy_reload_failures_total",
        "Reloads refused: reason=\"invalid\" (files that do not load or validate) or \
         reason=\"tests\" (a decision fixture failed, `serve --tests`)"
    );
}

/// Handles for the metrics every decision touches.
#[derive(Debug)]
pub struct DecisionMetrics {
    allowed: Counter,
    denied: Counter,
    rejected: Counter,
    cache_hits: Counter,
    slice_hits: Counter,
    slice_builds: Counter,
    duration: Histogram,
}

impl DecisionMetrics {
    pub fn register() -> Self {
        DecisionMetrics {
            allowed: metrics::counter!("arbiter_decisions_total", "outcome" => "allow"),
            denied: metrics::counter!("arbiter_decisions_total", "outcome" => "deny"),
            rejected: metrics::counter!("arbiter_decisions_total", "outcome" => "invalid_request"),
            cache_hits: metrics::counter!("arbiter_decision_cache_hits_total"),
            slice_hits: metrics::counter!("arbiter_slice_cache_hits_total"),
            slice_builds: metrics::counter!("arbiter_slice_builds_total"),
            duration: metrics::histogram!("arbiter_decision_duration_seconds"),
        }
    }

    pub fn record(&self, decision: &Decision) {
        if decision.allowed {
            self.allowed.increment(1);
        } else {
            self.denied.increment(1);
        }
        if decision.cached {
            self.cache_hits.increment(1);
        }
        match decision.slice {
            SliceUse::None => {}
            SliceUse::Built => self.slice_builds.increment(1),
            SliceUse::Cached => self.slice_hits.increment(1),
        }
        self.duration.record(decision.elapsed.as_secs_f64());
    }

    pub fn record_rejected(&self) {
        self.rejected.increment(1);
    }
}

/// Handles for the state of the loaded policy set.
#[derive(Debug)]
pub struct ReloadMetrics {
    pub policies_loaded: Gauge,
    pub entities_loaded: Gauge,
    pub reloads: Counter,
    /// Refused because the files are invalid (`reason="invalid"`).
    pub reload_failures: Counter,
    /// Refused because a decision fixture failed (`reason="tests"`).
    pub reload_failures_tests: Counter,
}

impl ReloadMetrics {
    pub fn register() -> Self {
        ReloadMetrics {
            policies_loaded: metrics::gauge!("arbiter_policies_loaded"),
            entities_loaded: metrics::gauge!("arbiter_entities_loaded"),
            reloads: metrics::counter!("arbiter_policy_reloads_total"),
            reload_failures: metrics::counter!("arbiter_policy_reload_failures_total", "reason" => "invalid"),
            reload_failures_tests: metrics::counter!("arbiter_policy_reload_failures_total", "reason" => "tests"),
        }
    }
}

/// Logs to stderr; `RUST_LOG` (or `ARBITER_LOG`) selects levels, `info` by default.
pub fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("ARBITER_LOG")
        .ok()
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr (log shipper gone) must not turn a log line into a
        // panic of the server.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
