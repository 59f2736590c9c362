//! Decision logs: every decision streamed to audit sinks, none lost, never
//! slowing a decision.
//!
//! ```text
//! adapter ─ DecisionEvent ─▶ DecisionLogger::log ─▶ bounded queue ─▶ pipeline thread
//!   (moves strings)    (no redact rules: the JSON line,      append to spool (WAL)
//!                       encoded into this thread's buffer;   (+ redact + JSON if rules)
//!                       try_send, never waits unless                 │ `written`
//!                       overflow=block and the spool is full)        ▼
//!                                            one driver task per sink: read from its cursor,
//!                                            send batch, on ack persist cursor; on error retry
//!                                            with backoff (the others go on)
//! ```
//!
//! Invariants:
//! - the decision path does one `try_send` on a bounded queue: no lock, no
//!   IO, no allocation in the common case, no hashing (records that
//!   redaction rules apply to are encoded by the pipeline thread);
//! - every record is redacted before it is written anywhere
//!   ([`redact`]), and written to the spool before any sink sees it;
//! - each sink gets every spooled record at least once, in spool order, and
//!   a slow or failed sink never holds back another one;
//! - records are dropped only when the spool is at its cap (then by the
//!   overflow policy), when the queue is full, or at shutdown after the
//!   grace period; each drop is counted in `arbiter_decision_log_dropped_total{reason}`.
//!
//! Layout: [`record`] (the event and its JSON form), [`redact`], [`spool`]
//! (segments, cursors, recovery), [`pipeline`] (the writer thread, sink
//! drivers, drain), [`sinks`].

pub mod pipeline;
pub mod record;
pub mod redact;
pub mod sinks;
pub mod spool;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::Counter;
use serde::Deserialize;
use tokio::sync::mpsc;

pub use pipeline::{DecisionLog, DecisionLogError, TailSource};
pub use record::{Caller, DecisionEvent, Transport, Uid};
pub use sinks::SinkConfig;

/// What happens to a new record when the spool is at its cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// The new record is dropped (the default): the audit trail keeps its
    /// oldest, undelivered history.
    #[default]
    DropNewest,
    /// The oldest spool segment is deleted to make room.
    DropOldest,
    /// The decision waits for room, up to `block_timeout_ms`, then its
    /// record is dropped.
    Block,
}

/// When the spool is `fsync`ed. Records are written (`write(2)`) to the
/// spool as soon as the pipeline takes them, so a crash or `kill -9` of the
/// process loses only what is still in the in-memory queue; `fsync`
/// protects against a crash of the machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// Every `fsync_interval_ms` (the default).
    #[default]
    Interval,
    /// After every batch.
    Always,
    /// Only when a segment is full and at shutdown.
    Never,
}

/// `[decision_log.redact]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactConfig {
    /// Record paths removed (`context.ssn`, `context.*.password`, `headers.x-user`).
    #[serde(default)]
    pub drop: Vec<String>,
    /// Record paths replaced by `sha256:<hex>` of `hash_salt` + the value's JSON.
    #[serde(default)]
    pub hash: Vec<String>,
    /// [default: ""]
    #[serde(default)]
    pub hash_salt: String,
}

/// `[decision_log]` in the config file. Every field has a default; the
/// default is logging on, to stdout.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecisionLogConfig {
    /// [default: true]
    pub enabled: bool,
    /// Records waiting for the pipeline thread [default: 65536].
    pub queue_capacity: usize,
    /// Records per spool write and per sink batch [default: 512].
    pub batch_size: usize,
    /// [default: `$TMPDIR/arbiter-spool-<gRPC port>`]
    pub spool_dir: Option<PathBuf>,
    /// Cap on the spool's size on disk [default: 1 GiB].
    pub spool_max_bytes: u64,
    /// Segment size [default: 16 MiB, at most a quarter of the cap].
    pub segment_bytes: u64,
    /// [default: `drop_newest`]
    pub overflow: Overflow,
    /// With `overflow = "block"`: the longest a decision waits [default: 50].
    pub block_timeout_ms: u64,
    /// [default: `interval`]
    pub fsync: Fsync,
    /// [default: 1000]
    pub fsync_interval_ms: u64,
    /// [default: one `stdout` sink]
    pub sinks: Vec<SinkConfig>,
    /// ext_authz request headers copied into records, by name
    /// (case-insensitive); `["*"]` copies all. Secrets (authorization,
    /// cookies, ...) are never logged either way. The Cedar context, which
    /// holds what the policies saw, is always logged.
    /// [default: `["x-request-id", "user-agent"]`]
    pub headers: Vec<String>,
    pub redact: RedactConfig,
}

impl Default for DecisionLogConfig {
    fn default() -> Self {
        DecisionLogConfig {
            enabled: true,
            queue_capacity: 65_536,
            batch_size: 512,
            spool_dir: None,
            spool_max_bytes: 1024 * 1024 * 1024,
            segment_bytes: 16 * 1024 * 1024,
            overflow: Overflow::default(),
            block_timeout_ms: 50,
            fsync: Fsync::default(),
            fsync_interval_ms: 1000,
            sinks: vec![SinkConfig::Stdout { name: None }],
            headers: vec!["x-request-id".into(), "user-agent".into()],
            redact: RedactConfig::default(),
        }
    }
}

impl DecisionLogConfig {
    /// Logging off.
    pub fn disabled() -> Self {
        DecisionLogConfig {
            enabled: false,
            ..Self::default()
        }
    }

    /// Every problem with the settings, one message each.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.enabled {
            return problems;
        }
        if self.queue_capacity == 0 {
            problems.push("`decision_log.queue_capacity` must be greater than zero".into());
        }
        if self.batch_size == 0 {
            problems.push("`decision_log.batch_size` must be greater than zero".into());
        }
        if self.segment_bytes == 0 || self.segment_bytes > self.spool_max_bytes / 4 {
            problems.push(
                "`decision_log.segment_bytes` must be greater than zero and at most a quarter of `spool_max_bytes`".into(),
            );
        }
        if self.sinks.is_empty() {
            problems.push(
                "`decision_log.sinks` is empty; set `enabled = false` to turn logging off".into(),
            );
        }
        for sink in &self.sinks {
            if let SinkConfig::Nats {
                records_per_message,
                max_message_bytes,
                ..
            } = sink
                && (*records_per_message == Some(0) || *max_message_bytes == Some(0))
            {
                problems.push(format!(
                    "sink `{}`: `records_per_message` and `max_message_bytes` must be greater than zero",
                    sink.name()
                ));
            }
        }
        let mut names: Vec<String> = self.sinks.iter().map(SinkConfig::name).collect();
        for name in &names {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                problems.push(format!(
                    "sink name `{name}` must be non-empty ASCII letters, digits, `-` or `_`"
                ));
            }
        }
        names.sort();
        for pair in names.windows(2) {
            if pair[0] == pair[1] {
                problems.push(format!(
                    "two sinks are named `{}`; give each a distinct `name`",
                    pair[0]
                ));
            }
        }
        problems
    }

    /// Resolves the spool directory and file sink paths against `base`
    /// (the config file's directory).
    pub fn make_paths_relative_to(&mut self, base: &std::path::Path) {
        if let Some(dir) = self.spool_dir.as_mut().filter(|d| d.is_relative()) {
            *dir = base.join(&*dir);
        }
        for sink in &mut self.sinks {
            if let SinkConfig::File { path, .. } = sink
                && path.is_relative()
            {
                *path = base.join(&*path);
            }
        }
    }

    pub fn block_timeout(&self) -> Duration {
        Duration::from_millis(self.block_timeout_ms)
    }
}

/// Drop reasons, the `reason` label of `arbiter_decision_log_dropped_total`.
pub mod reason {
    /// The in-memory queue was full (the pipeline thread fell behind).
    pub const QUEUE_FULL: &str = "queue_full";
    /// The spool was at its cap (`overflow = "drop_newest"`).
    pub const SPOOL_FULL: &str = "spool_full";
    /// Oldest spool segment deleted (`overflow = "drop_oldest"`).
    pub const SPOOL_FULL_OLDEST: &str = "spool_full_oldest";
    /// `overflow = "block"` waited `block_timeout_ms` in vain.
    pub const BLOCK_TIMEOUT: &str = "block_timeout";
    /// Logged after the pipeline closed (shutdown).
    pub const CLOSED: &str = "closed";
    /// A corrupt spool frame was skipped.
    pub const CORRUPT: &str = "corrupt";
    /// Could not be written to the spool (disk error).
    pub const SPOOL_ERROR: &str = "spool_error";
}

/// Drop counters: the metric, and an exact in-process total for `/ready` and tests.
#[derive(Debug)]
pub struct Drops {
    counters: Vec<(&'static str, Counter, AtomicU64)>,
}

impl Drops {
    fn register() -> Self {
        let counters = [
            reason::QUEUE_FULL,
            reason::SPOOL_FULL,
            reason::SPOOL_FULL_OLDEST,
            reason::BLOCK_TIMEOUT,
            reason::CLOSED,
            reason::CORRUPT,
            reason::SPOOL_ERROR,
        ]
        .into_iter()
        .map(|r| {
            (
                r,
                metrics::counter!("arbiter_decision_log_dropped_total", "reason" => r),
                AtomicU64::new(0),
            )
        })
        .collect();
        Drops { counters }
    }

    pub fn add(&self, reason: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        if let Some((_, counter, total)) = self.counters.iter().find(|(r, _, _)| *r == reason) {
            counter.increment(n);
            total.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Records dropped for `reason` by this process so far.
    pub fn get(&self, reason: &str) -> u64 {
        self.counters
            .iter()
            .find(|(r, _, _)| *r == reason)
            .map_or(0, |(_, _, total)| total.load(Ordering::Relaxed))
    }

    /// All drops so far.
    pub fn total(&self) -> u64 {
        self.counters
            .iter()
            .map(|(_, _, t)| t.load(Ordering::Relaxed))
            .sum()
    }
}

/// The handle adapters log through: a cheap clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct DecisionLogger {
    inner: Option<Arc<LoggerInner>>,
}

/// The request headers decision-log records carry (`decision_log.headers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoggedHeaders<'a> {
    /// Every header (`["*"]`); secrets are still dropped by the redactor.
    All,
    /// These, lower-cased, each once.
    Named(&'a [String]),
}

/// What the decision path hands to the pipeline thread.
#[derive(Debug)]
enum Queued {
    /// The redacted JSON line, encoded by the thread that decided (the
    /// common case: no `[decision_log.redact]` rules).
    Encoded(record::Encoded),
    /// Encoded by the pipeline thread: redaction rules may hash and parse.
    Event(Box<DecisionEvent>),
}

#[derive(Debug)]
struct LoggerInner {
    /// Lower-cased names from `decision_log.headers`; `None` = all.
    headers: Option<Vec<String>>,
    /// `Some` when the deciding thread encodes records itself.
    encoder: Option<Arc<redact::Redactor>>,
    queue: mpsc::Sender<Queued>,
    overflow: Overflow,
    block_timeout: Duration,
    queued: Counter,
    drops: Arc<Drops>,
}

impl DecisionLogger {
    /// A logger that logs nothing (decision logging off).
    pub fn disabled() -> Self {
        DecisionLogger { inner: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Which request headers records carry (ext_authz).
    pub fn logged_headers(&self) -> LoggedHeaders<'_> {
        match &self.inner {
            None => LoggedHeaders::Named(&[]),
            Some(inner) => inner
                .headers
                .as_deref()
                .map_or(LoggedHeaders::All, LoggedHeaders::Named),
        }
    }

    /// Hands one decision to the pipeline. Returns at once (encodes the
    /// record into this thread's buffer, one `try_send`), except with
    /// `overflow = "block"` when the queue is full because the spool is at
    /// its cap: then it waits up to `block_timeout_ms`.
    pub async fn log(&self, event: DecisionEvent) {
        let Some(inner) = &self.inner else {
            return;
        };
        // Encoded where the event's strings are still in this core's cache
        // and freed by the thread that allocated them, so no per-record
        // allocation crosses threads. Its own share of the saving was not
        // measured apart from the other changes (benches/README.md).
        let item = match &inner.encoder {
            Some(redactor) => Queued::Encoded(record::Encoded::new(&event, redactor)),
            None => Queued::Event(Box::new(event)),
        };
        match inner.queue.try_send(item) {
            Ok(()) => inner.queued.increment(1),
            Err(mpsc::error::TrySendError::Full(event)) => {
                if inner.overflow == Overflow::Block {
                    match inner.queue.send_timeout(event, inner.block_timeout).await {
                        Ok(()) => inner.queued.increment(1),
                        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                            inner.drops.add(reason::BLOCK_TIMEOUT, 1);
                        }
                        Err(mpsc::error::SendTimeoutError::Closed(_)) => {
                            inner.drops.add(reason::CLOSED, 1);
                        }
                    }
                } else {
                    inner.drops.add(reason::QUEUE_FULL, 1);
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => inner.drops.add(reason::CLOSED, 1),
        }
    }
}
