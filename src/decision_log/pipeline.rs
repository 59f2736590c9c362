//! The running decision log: the pipeline thread that redacts, encodes and
//! spools records, one driver task per sink, and the drain at shutdown.
//!
//! The pipeline runs on its own OS thread ("arbiter-decision-log"): JSON,
//! hashing and `write(2)` never occupy a tokio worker that serves
//! decisions. Sink drivers are tokio tasks; their spool reads and cursor
//! writes go through `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use metrics::{Counter, Gauge};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use super::record::{self, DecisionEvent};
use super::redact::Redactor;
use super::sinks::{Sink, SinkConfig, SinkError};
use super::spool::{Frame, SpoolError, SpoolReader, SpoolShared, SpoolWriter};
use super::{
    DecisionLogConfig, DecisionLogger, Drops, Fsync, LoggerInner, Overflow, Queued, reason,
};

#[derive(Debug, thiserror::Error)]
pub enum DecisionLogError {
    #[error("invalid decision log settings: {}", .0.join("; "))]
    Config(Vec<String>),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("decision log sink `{name}`: {source}")]
    Sink { name: String, source: SinkError },
    #[error("cannot start the decision log thread: {0}")]
    Thread(std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Run,
    /// Deliver what is spooled, then end.
    Drain,
}

/// Per-sink progress, for tests and `/ready`-style reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkProgress {
    pub name: String,
    /// Records this sink has had acknowledged since start.
    pub delivered: u64,
    /// Records spooled and not yet acknowledged by this sink.
    pub lag: u64,
}

/// The running pipeline. [`DecisionLog::logger`] hands out the handle for
/// adapters; [`DecisionLog::shutdown`] drains.
#[derive(Debug)]
pub struct DecisionLog {
    logger: DecisionLogger,
    writer: Option<std::thread::JoinHandle<()>>,
    writer_stop: Arc<AtomicBool>,
    sinks: Vec<JoinHandle<()>>,
    sink_stop: watch::Sender<Stop>,
    shared: Option<Arc<SpoolShared>>,
    drops: Arc<Drops>,
    spool_dir: Option<PathBuf>,
    progress: Vec<(String, Arc<AtomicU64>)>,
    recovered: u64,
    tail: Option<broadcast::Sender<Bytes>>,
}

/// Records as they are spooled, for `arbiter.v1.DecisionLog/Tail`.
#[derive(Debug, Clone, Default)]
pub struct TailSource {
    sender: Option<broadcast::Sender<Bytes>>,
}

impl TailSource {
    /// `None` when decision logging is off.
    pub fn subscribe(&self) -> Option<broadcast::Receiver<Bytes>> {
        self.sender.as_ref().map(broadcast::Sender::subscribe)
    }
}

/// How long the pipeline waits for more records after a small batch.
const LINGER: Duration = Duration::from_millis(1);

/// How long a sink driver waits for a full batch before it sends a partial
/// one. Records are already safe in the spool, so waiting costs only
/// delivery latency; sending fewer, larger batches saves a sink round trip,
/// a spool read and a cursor write per batch, which under load would
/// otherwise run on the cores that serve decisions.
const SINK_LINGER: Duration = Duration::from_millis(5);

/// Records buffered per tailing reader before it starts skipping.
const TAIL_BUFFER: usize = 4096;

struct Writer {
    rx: mpsc::Receiver<Queued>,
    spool: SpoolWriter,
    redactor: Redactor,
    /// Every record is encoded here, then copied into the spool's buffer:
    /// one allocation for the life of the pipeline.
    scratch: Vec<u8>,
    overflow: Overflow,
    batch: usize,
    fsync: Fsync,
    fsync_interval: Duration,
    stop: Arc<AtomicBool>,
    handle: tokio::runtime::Handle,
    drops: Arc<Drops>,
    written: watch::Sender<u64>,
    spooled: Counter,
    spool_bytes: Gauge,
    tail: broadcast::Sender<Bytes>,
}

impl DecisionLog {
    /// Logging off: a disabled logger, nothing running.
    pub fn disabled() -> Self {
        let (sink_stop, _) = watch::channel(Stop::Run);
        DecisionLog {
            logger: DecisionLogger::disabled(),
            writer: None,
            writer_stop: Arc::new(AtomicBool::new(false)),
            sinks: Vec::new(),
            sink_stop,
            shared: None,
            drops: Arc::new(Drops::register()),
            spool_dir: None,
            progress: Vec::new(),
            recovered: 0,
            tail: None,
        }
    }

    /// Opens the spool (replaying what an earlier run left in it), builds
    /// the sinks and starts the pipeline. `default_spool_dir` is used when
    /// the config names none. Must run inside a tokio runtime.
    pub async fn start(
        config: &DecisionLogConfig,
        default_spool_dir: &Path,
    ) -> Result<Self, DecisionLogError> {
        if !config.enabled {
            return Ok(Self::disabled());
        }
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(DecisionLogError::Config(problems));
        }
        describe();
        let dir = config
            .spool_dir
            .clone()
            .unwrap_or_else(|| default_spool_dir.to_path_buf());
        let names: Vec<String> = config.sinks.iter().map(SinkConfig::name).collect();
        let (spool, recovered) = {
            let dir = dir.clone();
            let names = names.clone();
            let (segment, cap) = (config.segment_bytes, config.spool_max_bytes);
            tokio::task::spawn_blocking(move || SpoolWriter::open(&dir, segment, cap, &names))
                .await
                .map_err(|e| DecisionLogError::Thread(std::io::Error::other(e)))??
        };
        if recovered.pending > 0 {
            tracing::info!(
                spool = %dir.display(),
                records = recovered.pending,
                "decision log: replaying records left in the spool by an earlier run"
            );
        }
        let shared = spool.shared();
        let drops = Arc::new(Drops::register());
        let (written_tx, written_rx) = watch::channel(shared.written.load(Ordering::Acquire));
        let (sink_stop, stop_rx) = watch::channel(Stop::Run);

        let mut sinks = Vec::new();
        let mut progress = Vec::new();
        for (index, sink_config) in config.sinks.iter().enumerate() {
            let name = names.get(index).cloned().unwrap_or_default();
            let sink = sink_config
                .build()
                .await
                .map_err(|source| DecisionLogError::Sink {
                    name: name.clone(),
                    source,
                })?;
            let delivered = Arc::new(AtomicU64::new(0));
            progress.push((name.clone(), delivered.clone()));
            let driver = Driver {
                reader: SpoolReader::new(&dir, &name, index, shared.clone()),
                delivered_metric: metrics::counter!("arbiter_decision_log_delivered_total", "sink" => name.clone()),
                errors: metrics::counter!("arbiter_decision_log_sink_errors_total", "sink" => name.clone()),
                lag: metrics::gauge!("arbiter_decision_log_sink_lag", "sink" => name.clone()),
                name,
                sink,
                timeout: sink_config.timeout(),
                batch: config.batch_size,
                written: written_rx.clone(),
                stop: stop_rx.clone(),
                delivered,
                drops: drops.clone(),
            };
            sinks.push(tokio::spawn(driver.run()));
        }

        let (tail, _) = broadcast::channel(TAIL_BUFFER);
        let (queue, rx) = mpsc::channel(config.queue_capacity);
        let writer_stop = Arc::new(AtomicBool::new(false));
        let redactor = Redactor::new(
            &config.redact.drop,
            &config.redact.hash,
            &config.redact.hash_salt,
        );
        // Without rules a record is the direct writer's work alone, cheap
        // enough for the deciding thread; rules may parse and hash.
        let encoder = (!redactor.has_rules()).then(|| Arc::new(redactor.clone()));
        let writer = Writer {
            rx,
            spool,
            scratch: Vec::with_capacity(4096),
            redactor,
            overflow: config.overflow,
            batch: config.batch_size,
            fsync: config.fsync,
            fsync_interval: Duration::from_millis(config.fsync_interval_ms),
            stop: writer_stop.clone(),
            handle: tokio::runtime::Handle::current(),
            drops: drops.clone(),
            written: written_tx,
            spooled: metrics::counter!("arbiter_decision_log_spooled_total"),
            spool_bytes: metrics::gauge!("arbiter_decision_log_spool_bytes"),
            tail: tail.clone(),
        };
        let writer = std::thread::Builder::new()
            .name("arbiter-decision-log".into())
            .spawn(move || writer.run())
            .map_err(DecisionLogError::Thread)?;
        let logger = DecisionLogger {
            inner: Some(Arc::new(LoggerInner {
                encoder,
                headers: (!config.headers.iter().any(|h| h == "*")).then(|| {
                    let mut names: Vec<String> = config
                        .headers
                        .iter()
                        .map(|h| h.to_ascii_lowercase())
                        .collect();
                    names.sort();
                    names.dedup();
                    names
                }),
                queue,
                overflow: config.overflow,
                block_timeout: config.block_timeout(),
                queued: metrics::counter!("arbiter_decision_log_queued_total"),
                drops: drops.clone(),
            })),
        };
        Ok(DecisionLog {
            logger,
            writer: Some(writer),
            writer_stop,
            sinks,
            sink_stop,
            shared: Some(shared),
            drops,
            spool_dir: Some(dir),
            progress,
            recovered: recovered.pending,
            tail: Some(tail),
        })
    }

    /// The handle adapters log through.
    pub fn logger(&self) -> DecisionLogger {
        self.logger.clone()
    }

    /// Records dropped, by reason.
    pub fn drops(&self) -> &Drops {
        &self.drops
    }

    /// Live records for `Tail`.
    pub fn tail_source(&self) -> TailSource {
        TailSource {
            sender: self.tail.clone(),
        }
    }

    /// The drop counters, which outlive [`Self::shutdown`].
    pub fn drops_handle(&self) -> Arc<Drops> {
        self.drops.clone()
    }

    /// Undelivered records found in the spool at start.
    pub fn recovered(&self) -> u64 {
        self.recovered
    }

    pub fn spool_dir(&self) -> Option<&Path> {
        self.spool_dir.as_deref()
    }

    /// Records spooled since the spool was created (the next sequence number).
    pub fn written(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.written.load(Ordering::Acquire))
    }

    pub fn progress(&self) -> Vec<SinkProgress> {
        let written = self.written();
        self.progress
            .iter()
            .enumerate()
            .map(|(index, (name, delivered))| SinkProgress {
                name: name.clone(),
                delivered: delivered.load(Ordering::Relaxed),
                lag: self
                    .shared
                    .as_ref()
                    .and_then(|s| s.cursors.get(index))
                    .map_or(0, |c| written.saturating_sub(c.load(Ordering::Acquire))),
            })
            .collect()
    }

    /// Stops taking records, spools what is queued, and lets every sink
    /// deliver what it can until `grace` is over; what is left stays in the
    /// spool for the next start. Returns the records left undelivered
    /// (by the slowest sink).
    pub async fn shutdown(mut self, grace: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + grace;
        self.writer_stop.store(true, Ordering::Release);
        if let Some(writer) = self.writer.take() {
            let joined = tokio::time::timeout_at(
                deadline,
                tokio::task::spawn_blocking(move || writer.join()),
            )
            .await;
            if joined.is_err() {
                tracing::warn!(
                    "decision log: the pipeline thread did not stop within the grace period"
                );
            }
        }
        let _ = self.sink_stop.send(Stop::Drain);
        for sink in &mut self.sinks {
            if tokio::time::timeout_at(deadline, &mut *sink).await.is_err() {
                sink.abort();
            }
        }
        let left = self.progress().iter().map(|p| p.lag).max().unwrap_or(0);
        if left > 0 {
            tracing::warn!(
                records = left,
                spool = ?self.spool_dir,
                "decision log: records left in the spool for the next start"
            );
        }
        left
    }
}

fn describe() {
    metrics::describe_counter!(
        "arbiter_decision_log_queued_total",
        "Decision records handed to the decision log queue"
    );
    metrics::describe_counter!(
        "arbiter_decision_log_spooled_total",
        "Decision records written to the on-disk spool"
    );
    metrics::describe_counter!(
        "arbiter_decision_log_delivered_total",
        "Decision records acknowledged by a sink"
    );
    metrics::describe_counter!(
        "arbiter_decision_log_sink_errors_total",
        "Failed sink batches (retried)"
    );
    metrics::describe_counter!(
        "arbiter_decision_log_dropped_total",
        "Decision records dropped, by reason"
    );
    metrics::describe_gauge!(
        "arbiter_decision_log_spool_bytes",
        "Bytes in the decision log spool"
    );
    metrics::describe_gauge!(
        "arbiter_decision_log_sink_lag",
        "Spooled records a sink has not acknowledged"
    );
}

impl Writer {
    fn run(mut self) {
        let mut events = Vec::with_capacity(self.batch);
        let mut last_sync = Instant::now();
        loop {
            let stopping = self.stop.load(Ordering::Acquire);
            events.clear();
            let closed = if stopping {
                self.take_ready(&mut events);
                events.is_empty()
            } else {
                let rx = &mut self.rx;
                let batch = self.batch;
                let received = self.handle.block_on(async {
                    tokio::time::timeout(
                        Duration::from_millis(100),
                        rx.recv_many(&mut events, batch),
                    )
                    .await
                });
                if matches!(received, Ok(n) if n > 0 && n < batch / 2) {
                    // Linger a moment so that under load records are
                    // written, read and sent in batches, not one by one:
                    // fewer syscalls, wake-ups and sink round trips.
                    std::thread::sleep(LINGER);
                    self.take_ready(&mut events);
                }
                matches!(received, Ok(0))
            };
            let mut spooled = 0;
            for item in events.drain(..) {
                spooled += u64::from(match item {
                    Queued::Encoded(record) => {
                        self.spool_one(record.id(), record.payload(), || record.payload_bytes())
                    }
                    Queued::Event(event) => self.append(&event),
                });
            }
            // Once per batch: the counter is shared with every scrape.
            self.spooled.increment(spooled);
            if let Err(error) = self.spool.flush() {
                tracing::error!(%error, "decision log: cannot write to the spool");
                let lost = self.spool.discard_buffer();
                self.drops.add(reason::SPOOL_ERROR, lost);
            }
            let written = self.spool.shared().written.load(Ordering::Acquire);
            self.written.send_if_modified(|w| {
                let changed = *w != written;
                *w = written;
                changed
            });
            let due = match self.fsync {
                Fsync::Always => true,
                Fsync::Interval => last_sync.elapsed() >= self.fsync_interval,
                Fsync::Never => false,
            };
            if due {
                if let Err(error) = self.spool.sync() {
                    tracing::warn!(%error, "decision log: spool fsync failed");
                }
                last_sync = Instant::now();
            }
            self.spool.gc();
            self.spool_bytes.set(self.spool.bytes() as f64);
            if closed {
                break;
            }
        }
        if let Err(error) = self.spool.sync() {
            tracing::warn!(%error, "decision log: spool fsync failed");
        }
    }

    /// What the queue holds now, up to a batch, without waiting (the
    /// semaphore's permits returned once, not per record).
    fn take_ready(&mut self, events: &mut Vec<Queued>) {
        let room = self.batch.saturating_sub(events.len());
        if room > 0 {
            let _ = self.rx.recv_many(events, room).now_or_never();
        }
    }

    /// Encodes and buffers one record; false if it was dropped.
    fn append(&mut self, event: &DecisionEvent) -> bool {
        let mut payload = std::mem::take(&mut self.scratch);
        payload.clear();
        record::encode_into(event, &self.redactor, &mut payload);
        let spooled = self.spool_one(event.decision.decision_id.as_str(), &payload, || {
            Bytes::copy_from_slice(&payload)
        });
        self.scratch = payload;
        spooled
    }

    /// Buffers one encoded record; false if it was dropped. `shared` gives
    /// the payload for `Tail`, asked only while someone tails.
    fn spool_one(&mut self, id: &str, payload: &[u8], shared: impl FnOnce() -> Bytes) -> bool {
        if !self.spool.has_room(id, payload) {
            self.spool.gc();
        }
        if !self.spool.has_room(id, payload) && !self.make_room(id, payload) {
            self.drops.add(reason::SPOOL_FULL, 1);
            return false;
        }
        if self.tail.receiver_count() > 0 {
            let _ = self.tail.send(shared());
        }
        self.spool.push(id, payload);
        true
    }

    /// Applies the overflow policy; true when the record now fits.
    fn make_room(&mut self, id: &str, payload: &[u8]) -> bool {
        match self.overflow {
            Overflow::DropNewest => false,
            Overflow::DropOldest => {
                while !self.spool.has_room(id, payload) {
                    match self.spool.drop_oldest() {
                        Ok(Some(dropped)) => self.drops.add(reason::SPOOL_FULL_OLDEST, dropped),
                        Ok(None) => return false,
                        Err(error) => {
                            tracing::error!(%error, "decision log: cannot drop a spool segment");
                            return false;
                        }
                    }
                }
                true
            }
            Overflow::Block => {
                // Make what is buffered visible so sinks can make progress,
                // then wait for them; the queue fills meanwhile and
                // `DecisionLogger::log` applies `block_timeout_ms`.
                if self.spool.flush().is_ok() {
                    let written = self.spool.shared().written.load(Ordering::Acquire);
                    self.written.send_replace(written);
                }
                while !self.spool.has_room(id, payload) {
                    if self.stop.load(Ordering::Acquire) {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    self.spool.gc();
                    self.spool_bytes.set(self.spool.bytes() as f64);
                }
                true
            }
        }
    }
}

struct Driver {
    name: String,
    sink: Sink,
    reader: SpoolReader,
    timeout: Duration,
    batch: usize,
    written: watch::Receiver<u64>,
    stop: watch::Receiver<Stop>,
    delivered: Arc<AtomicU64>,
    delivered_metric: Counter,
    errors: Counter,
    lag: Gauge,
    drops: Arc<Drops>,
}

impl Driver {
    async fn run(mut self) {
        let mut corrupt_seen = 0;
        loop {
            self.written.borrow_and_update();
            let pending = self.reader.lag();
            if pending > 0 && pending < self.batch as u64 && *self.stop.borrow() == Stop::Run {
                tokio::select! {
                    () = tokio::time::sleep(SINK_LINGER) => {}
                    _ = self.stop.changed() => {}
                }
            }
            let Some(frames) = self.read().await else {
                return;
            };
            if self.reader.skipped > corrupt_seen {
                self.drops
                    .add(reason::CORRUPT, self.reader.skipped - corrupt_seen);
                corrupt_seen = self.reader.skipped;
            }
            self.lag.set(self.reader.lag() as f64);
            let Some(last) = frames.last().map(|f| f.seq) else {
                if *self.stop.borrow() == Stop::Drain {
                    return;
                }
                tokio::select! {
                    changed = self.written.changed() => if changed.is_err() && *self.stop.borrow() != Stop::Run { return },
                    _ = self.stop.changed() => {}
                }
                continue;
            };
            let n = self.deliver(frames).await;
            self.commit(last + 1).await;
            self.delivered.fetch_add(n, Ordering::Relaxed);
            self.delivered_metric.increment(n);
            self.lag.set(self.reader.lag() as f64);
        }
    }

    /// The next batch from the spool; `None` if the blocking pool is gone.
    async fn read(&mut self) -> Option<Vec<Frame>> {
        // A caught-up sink reads from memory: no hop to the blocking pool
        // (two thread wake-ups per batch).
        if let Some(frames) = self.reader.read_memory(self.batch) {
            return Some(frames);
        }
        loop {
            let mut reader = std::mem::replace(
                &mut self.reader,
                SpoolReader::new(Path::new(""), "", usize::MAX, Arc::new(placeholder())),
            );
            let batch = self.batch;
            let (reader, result) = tokio::task::spawn_blocking(move || {
                let result = reader.read(batch);
                (reader, result)
            })
            .await
            .ok()?;
            self.reader = reader;
            match result {
                Ok(frames) => return Some(frames),
                Err(error) => {
                    tracing::warn!(sink = %self.name, %error, "decision log: cannot read the spool");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Sends until the sink acknowledges; retries with backoff. Records
    /// that `drop_oldest` dropped (and counted) meanwhile are not retried.
    /// Returns how many were delivered.
    async fn deliver(&mut self, mut frames: Vec<Frame>) -> u64 {
        let mut backoff = Duration::from_millis(50);
        let mut failures = 0u64;
        loop {
            if failures > 0 {
                let floor = self.reader.floor();
                frames.retain(|f| f.seq >= floor);
                if frames.is_empty() {
                    break;
                }
            }
            let error = match tokio::time::timeout(self.timeout, self.sink.send(&frames)).await {
                Ok(Ok(())) => break,
                Ok(Err(error)) => error,
                Err(_) => SinkError::Timeout(self.timeout),
            };
            self.errors.increment(1);
            if failures == 0 {
                tracing::warn!(sink = %self.name, %error, "decision log sink failed; records wait in the spool");
            }
            failures += 1;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        if failures > 0 {
            tracing::info!(sink = %self.name, failures, "decision log sink recovered");
        }
        frames.len() as u64
    }

    async fn commit(&mut self, next: u64) {
        let mut reader = std::mem::replace(
            &mut self.reader,
            SpoolReader::new(Path::new(""), "", usize::MAX, Arc::new(placeholder())),
        );
        let joined = tokio::task::spawn_blocking(move || {
            let result = reader.commit(next);
            (reader, result)
        })
        .await;
        if let Ok((reader, result)) = joined {
            self.reader = reader;
            if let Err(error) = result {
                tracing::warn!(sink = %self.name, %error, "decision log: cannot persist the sink cursor");
            }
        }
    }
}

fn placeholder() -> SpoolShared {
    SpoolShared {
        written: AtomicU64::new(0),
        floor: AtomicU64::new(0),
        cursors: Vec::new(),
        bytes: AtomicU64::new(0),
        recent: std::sync::Mutex::new(Default::default()),
    }
}
