//! Identity sync: keeps the engine's entity data equal to an identity store
//! (PostgreSQL or a SCIM 2.0 service provider), incrementally, off the
//! request path.
//!
//! ```text
//! source (postgres.rs, scim.rs) ─▶ Change::{Upsert,Delete} at a position ─▶ Applier ─▶ EntityStore
//!                                                                    └▶ Engine::publish_data (atomic swap)
//! ```
//!
//! Invariants:
//! - identity writes the engine's entity data and nothing else, and is never
//!   called per request;
//! - changes are applied in source (commit) order; a published position P
//!   means every change up to P is in the data;
//! - a bad row (malformed attributes, a cycle, a missing parent) is refused
//!   with a log line and a metric naming it; everything else keeps syncing.

pub mod postgres;
pub mod scim;
pub mod tls;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use cedar_policy::{Entity, EntityId, EntityTypeName, EntityUid};
use serde::Deserialize;

use crate::engine::entity_store::{
    EntityStore, StoreError, StoreWriter, StoredEntity, UidInterner,
};
use crate::engine::{Engine, EntityData};

pub use postgres::PostgresConfig;
pub use scim::ScimConfig;

/// The `[identity]` table of the config file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Past this many seconds without a successful sync, readiness reports
    /// not ready and decisions say their data is stale [default: 60].
    pub max_staleness_secs: Option<u64>,
    /// How long a check with `min_data_revision` may wait for sync to reach
    /// it before failing with `FAILED_PRECONDITION` [default: 5000].
    pub revision_wait_ms: Option<u64>,
    pub postgres: Option<PostgresConfig>,
    pub scim: Option<ScimConfig>,
}

impl IdentityConfig {
    pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(60);
    pub const DEFAULT_REVISION_WAIT: Duration = Duration::from_secs(5);

    pub fn max_staleness(&self) -> Duration {
        self.max_staleness_secs
            .map_or(Self::DEFAULT_MAX_STALENESS, Duration::from_secs)
    }

    pub fn revision_wait(&self) -> Duration {
        self.revision_wait_ms
            .map_or(Self::DEFAULT_REVISION_WAIT, Duration::from_millis)
    }

    /// True when a source is configured (the engine then takes its data
    /// from the sync, not from the entities file).
    pub fn has_source(&self) -> bool {
        self.postgres.is_some() || self.scim.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid identity configuration `{key}`: {message}")]
    Config { key: &'static str, message: String },
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("scim: {0}")]
    Scim(#[from] scim::ScimError),
    #[error("the connection to the identity store closed")]
    Closed,
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// The task building the store from a full listing did not finish (the
/// runtime is shutting down); the store served is unchanged.
#[derive(Debug, thiserror::Error)]
#[error("building the store from the full listing failed: {0}")]
pub struct BuildError(String);

/// What the sync reports to readiness and to the adapter.
#[derive(Debug)]
pub struct SyncStatus {
    /// Set once, when the first full sync is published.
    synced: AtomicBool,
    /// Unix milliseconds of the last successful contact with the source.
    last_success_ms: AtomicU64,
    /// The newest position the source reported when last asked (Postgres:
    /// `max(seq)` of the change log, read before each poll).
    source_position: AtomicU64,
    /// The position of the data published to the engine.
    applied_position: AtomicU64,
    pub max_staleness: Duration,
    pub last_error: ArcSwapOption<String>,
}

impl SyncStatus {
    pub fn new(max_staleness: Duration) -> Self {
        SyncStatus {
            synced: AtomicBool::new(false),
            last_success_ms: AtomicU64::new(0),
            source_position: AtomicU64::new(0),
            applied_position: AtomicU64::new(0),
            max_staleness,
            last_error: ArcSwapOption::empty(),
        }
    }

    /// The first full sync is in.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Synced, and in contact with the source within `max_staleness`.
    pub fn is_fresh(&self) -> bool {
        self.is_synced() && self.staleness() <= self.max_staleness
    }

    /// Time since the last successful contact with the source.
    pub fn staleness(&self) -> Duration {
        let last = self.last_success_ms.load(Ordering::Acquire);
        Duration::from_millis(now_ms().saturating_sub(last))
    }

    /// The newest position the source had when last asked.
    pub fn source_position(&self) -> u64 {
        self.source_position.load(Ordering::Acquire)
    }

    /// The position of the data the engine serves.
    pub fn applied_position(&self) -> u64 {
        self.applied_position.load(Ordering::Acquire)
    }

    /// How many positions the source is ahead of the served data (0 when
    /// caught up). Postgres: change-log sequence numbers, so a rolled-back
    /// writer's unused numbers count too (an upper bound on pending changes).
    pub fn lag_positions(&self) -> u64 {
        self.source_position()
            .saturating_sub(self.applied_position())
    }

    /// The source was reached at `at` (Unix ms): what was read then is
    /// served now. Never moves back (a slow read finishing late).
    fn succeeded(&self, at: u64) {
        let last = self.last_success_ms.fetch_max(at, Ordering::AcqRel).max(at);
        self.last_error.store(None);
        metrics::gauge!("arbiter_identity_last_success_timestamp_seconds")
            .set(last as f64 / 1000.0);
    }

    fn failed(&self, error: &IdentityError) {
        self.last_error.store(Some(Arc::new(error.to_string())));
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// One row of a full listing made into an entity, or the uid of a row that
/// could not be and why. Boxed: a listing holds a million of these at once,
/// and a rejected row is rare (the `Ok` side is all it costs).
pub type MappedRow = Result<StoredEntity, Box<RejectedRow>>;

#[derive(Debug)]
pub struct RejectedRow {
    pub uid: EntityUid,
    pub error: RowError,
}

/// A row that could not become an entity.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("entity type `{0}` is not a valid Cedar type name")]
    Type(String),
    #[error("malformed parents: {0}")]
    Parents(String),
    #[error("malformed attributes: {0}")]
    Attributes(String),
    #[error("unreadable row: {0}")]
    Column(String),
}

impl RowError {
    pub fn kind(&self) -> &'static str {
        match self {
            RowError::Type(_) => "entity_type",
            RowError::Parents(_) => "parents",
            RowError::Attributes(_) => "attributes",
            RowError::Column(_) => "column",
        }
    }
}

/// Parses `type` into an entity uid.
pub fn entity_uid(type_name: &str, id: &str) -> Result<EntityUid, RowError> {
    RowParser::default().uid(type_name, id)
}

/// Turns the rows of one listing or batch into entities, parsing each
/// entity type name once and sharing equal uids (a million users' edges
/// to the same groups are then pointers to one uid each, not a parsed
/// copy per edge).
#[derive(Debug, Default)]
pub struct RowParser {
    types: HashMap<String, EntityTypeName>,
    uids: UidInterner,
}

impl RowParser {
    /// Parses `type` into an entity uid.
    pub fn uid(&mut self, type_name: &str, id: &str) -> Result<EntityUid, RowError> {
        let parsed = match self.types.get(type_name) {
            Some(parsed) => parsed.clone(),
            None => {
                let parsed: EntityTypeName = type_name
                    .parse()
                    .map_err(|_| RowError::Type(type_name.to_string()))?;
                self.types.insert(type_name.to_string(), parsed.clone());
                parsed
            }
        };
        Ok(EntityUid::from_type_name_and_id(parsed, EntityId::new(id)))
    }

    /// Builds a stored entity from a mapped row: `attrs` a Cedar attribute
    /// object (JSON entity format), `parents` an array of `{"type", "id"}`.
    pub fn entity(
        &mut self,
        uid: &EntityUid,
        attrs: serde_json::Value,
        parents: serde_json::Value,
    ) -> Result<StoredEntity, RowError> {
        let list = match &parents {
            serde_json::Value::Array(list) => list,
            serde_json::Value::Null => &Vec::new(),
            other => {
                return Err(RowError::Parents(format!(
                    "expected an array, got `{other}`"
                )));
            }
        };
        let mut parent_uids = Vec::with_capacity(list.len());
        for parent in list {
            let type_name = parent.get("type").and_then(|t| t.as_str());
            let id = parent.get("id").and_then(|t| t.as_str());
            match (type_name, id) {
                (Some(type_name), Some(id)) => {
                    let parent = self
                        .uid(type_name, id)
                        .map_err(|error| RowError::Parents(error.to_string()))?;
                    parent_uids.push(self.uids.intern(parent));
                }
                _ => {
                    return Err(RowError::Parents(format!(
                        "expected {{\"type\": ..., \"id\": ...}}, got `{parent}`"
                    )));
                }
            }
        }
        if !attrs.is_object() {
            return Err(RowError::Attributes(format!(
                "expected a JSON object, got `{attrs}`"
            )));
        }
        // Cedar reads the attributes (its JSON format: `__entity`, `__extn`);
        // the parents were read above and are not given to it again.
        let type_name = uid.type_name().to_string();
        let id: &str = uid.id().unescaped();
        let json = serde_json::json!({
            "uid": {"type": type_name, "id": id},
            "attrs": attrs,
            "parents": [],
        });
        let entity = Entity::from_json_value(json, None)
            .map_err(|error| RowError::Attributes(render(&error)))?;
        let shared = self.uids.intern(uid.clone());
        StoredEntity::from_parts(shared, &entity, parent_uids, &mut self.uids)
            .map_err(|error| RowError::Attributes(error.to_string()))
    }
}

/// Cedar's error with its causes on one line.
fn render(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// One entity change from a source.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "nearly every change is an upsert"
)]
pub enum Change {
    /// The entity's current state (or why its row could not be read).
    Upsert(MappedRow),
    Delete(EntityUid),
}

/// Applies changes to the store and publishes it to the engine.
#[derive(Debug)]
pub struct Applier {
    engine: Arc<Engine>,
    status: Arc<SyncStatus>,
    source: &'static str,
    store: StoreWriter,
    /// The last position applied; `None` before the first full sync.
    position: Option<u64>,
    /// When the read being applied began (Unix ms), see [`Self::contacting`].
    contact_ms: Option<u64>,
}

impl Applier {
    pub fn new(engine: Arc<Engine>, status: Arc<SyncStatus>, source: &'static str) -> Self {
        Applier {
            store: StoreWriter::new(EntityStore::with_max_depth(engine.max_hierarchy_depth())),
            engine,
            status,
            source,
            position: None,
            contact_ms: None,
        }
    }

    /// A read of the source begins: the data it returns is as of now, and
    /// freshness counts from now, not from when the read completes (a slow
    /// store returns data already old; found by the chaos run).
    pub fn contacting(&mut self) {
        self.contact_ms = Some(now_ms());
    }

    fn contacted_at(&mut self) -> u64 {
        self.contact_ms.take().unwrap_or_else(now_ms)
    }

    pub fn position(&self) -> Option<u64> {
        self.position
    }

    pub fn store(&self) -> &EntityStore {
        self.store.store()
    }

    /// Replaces the whole store with a full listing taken at `position`.
    /// On a reconciliation (not the first sync) differences with the store
    /// are drift: counted, logged, and repaired by the replacement.
    ///
    /// Building the store and comparing it with the one served take seconds
    /// of CPU at a million entities: that runs on tokio's blocking pool, so
    /// that a reconciliation does not hold one of the runtime's workers (the
    /// decisions' threads) meanwhile. Decisions go on from the current
    /// store until the new one is published.
    pub async fn replace_all(
        &mut self,
        rows: Vec<MappedRow>,
        position: u64,
    ) -> Result<(), BuildError> {
        let previous = self.position.is_some().then(|| self.store.store().clone());
        let started = std::time::Instant::now();
        let max_depth = self.engine.max_hierarchy_depth();
        let listing =
            tokio::task::spawn_blocking(move || Listing::build(rows, previous, max_depth))
                .await
                .map_err(|error| BuildError(error.to_string()))?;
        for rejected in &listing.rejected {
            self.reject_row(&rejected.uid, &rejected.error);
        }
        for error in &listing.refused {
            self.reject_store(error);
        }
        if let Some(drift) = listing.drift {
            if drift > 0 {
                tracing::warn!(
                    target: "arbiter::identity",
                    source = self.source,
                    drift,
                    "reconciliation found entities that differ from the source; repaired"
                );
                metrics::counter!("arbiter_identity_drift_total", "source" => self.source)
                    .increment(drift as u64);
            }
            metrics::counter!("arbiter_identity_reconciliations_total", "source" => self.source)
                .increment(1);
        }
        let old = std::mem::replace(&mut self.store, listing.store);
        self.publish(position);
        // Dropping the old maps touches every entry (a reference count each,
        // in cold memory): a tenth of a second at a million entities.
        drop(tokio::task::spawn_blocking(move || drop(old)));
        tracing::info!(
            target: "arbiter::identity",
            source = self.source,
            position,
            entities = self.store.store().len(),
            refused = listing.refused.len() + listing.rejected.len(),
            build_ms = started.elapsed().as_millis() as u64,
            "identity data synced in full"
        );
        Ok(())
    }

    /// Applies a batch of changes up to `position`, then publishes once.
    /// Upserts whose parents arrive later in the same batch are retried
    /// until no more progress is made; deletions come last.
    pub fn apply(&mut self, changes: Vec<Change>, position: u64) {
        let mut pending = Vec::new();
        let mut deletes = Vec::new();
        for change in changes {
            match change {
                Change::Upsert(Ok(entity)) => pending.push(entity),
                Change::Upsert(Err(row)) => self.reject_row(&row.uid, &row.error),
                Change::Delete(uid) => deletes.push(uid),
            }
        }
        let failures = self.store.write(|batch| {
            let mut failures: Vec<StoreError> = Vec::new();
            loop {
                let before = pending.len();
                failures.clear();
                let mut retry = Vec::new();
                for entity in pending {
                    match batch.upsert(entity.clone()) {
                        Ok(()) => {}
                        Err(error) => {
                            failures.push(error);
                            retry.push(entity);
                        }
                    }
                }
                pending = retry;
                if pending.is_empty() || pending.len() == before {
                    break;
                }
            }
            for uid in deletes {
                batch.remove(&uid);
            }
            failures
        });
        for error in &failures {
            self.reject_store(error);
        }
        self.publish(position);
    }

    /// The source was reached and had nothing new.
    pub fn touch(&mut self) {
        let at = self.contacted_at();
        self.status.succeeded(at);
    }

    /// The source's newest position, read before applying what comes
    /// before it: until that is applied, the difference is the lag in
    /// positions (`arbiter_identity_lag_positions`).
    pub fn saw_source_position(&self, position: u64) {
        self.status
            .source_position
            .store(position, Ordering::Release);
        self.report_lag();
    }

    fn report_lag(&self) {
        metrics::gauge!("arbiter_identity_source_position", "source" => self.source)
            .set(self.status.source_position() as f64);
        metrics::gauge!("arbiter_identity_lag_positions", "source" => self.source)
            .set(self.status.lag_positions() as f64);
    }

    fn publish(&mut self, position: u64) {
        self.position = Some(position);
        self.engine
            .publish_data(EntityData::from_store(self.store.store().clone(), position));
        // The source had at least what was just read from it.
        self.status
            .source_position
            .fetch_max(position, Ordering::AcqRel);
        self.status
            .applied_position
            .store(position, Ordering::Release);
        metrics::gauge!("arbiter_identity_entities", "source" => self.source)
            .set(self.store.store().len() as f64);
        metrics::gauge!("arbiter_identity_applied_position", "source" => self.source)
            .set(position as f64);
        self.report_lag();
        let at = self.contacted_at();
        self.status.succeeded(at);
        self.status.synced.store(true, Ordering::Release);
    }

    fn reject_row(&self, uid: &EntityUid, error: &RowError) {
        self.refuse(uid, error.kind(), error);
    }

    fn reject_store(&self, error: &StoreError) {
        self.refuse(error.uid(), error.kind(), error);
    }

    /// One refused row: a log line and a metric, both naming the entity.
    fn refuse(&self, uid: &EntityUid, reason: &'static str, error: &dyn std::fmt::Display) {
        tracing::error!(
            target: "arbiter::identity",
            source = self.source,
            entity = %uid,
            reason,
            "identity row refused: {error}"
        );
        count_rejected_row(self.source, uid.to_string(), reason);
    }
}

/// How many distinct entities get their own `entity` label on
/// `arbiter_identity_rejected_rows_total`: a label per rejected row names
/// it, but a mapping that rejects every row of a million-user store must
/// not make a million series (in this process's registry and in whatever
/// scrapes it). Rejections past the cap are counted under
/// [`OTHER_ENTITIES`]; the log line names every row.
pub const NAMED_REJECTED_ENTITIES: usize = 1_000;

/// The `entity` label of rejections past [`NAMED_REJECTED_ENTITIES`].
pub const OTHER_ENTITIES: &str = "<other>";

/// The entities that have an `entity` label so far (bounded).
#[derive(Debug)]
pub struct RejectionLabels {
    named: std::sync::Mutex<std::collections::BTreeSet<String>>,
    cap: usize,
}

impl RejectionLabels {
    pub const fn new(cap: usize) -> Self {
        RejectionLabels {
            named: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            cap,
        }
    }

    /// The label for `entity`: itself while fewer than the cap are named
    /// (or when it already is), [`OTHER_ENTITIES`] after.
    pub fn label(&self, entity: String) -> String {
        // Off the decision path (a refused row); a poisoned lock still
        // holds a valid set.
        let mut named = self
            .named
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if named.contains(&entity) {
            return entity;
        }
        if named.len() < self.cap {
            named.insert(entity.clone());
            return entity;
        }
        OTHER_ENTITIES.to_owned()
    }
}

/// The process's labels (the metrics registry is the process's too).
static REJECTION_LABELS: RejectionLabels = RejectionLabels::new(NAMED_REJECTED_ENTITIES);

/// Counts one refused row in `arbiter_identity_rejected_rows_total`.
pub(crate) fn count_rejected_row(source: &'static str, entity: String, reason: &'static str) {
    metrics::counter!(
        "arbiter_identity_rejected_rows_total",
        "source" => source,
        "entity" => REJECTION_LABELS.label(entity),
        "reason" => reason
    )
    .increment(1);
}

/// A full listing made into a store, off the async workers.
struct Listing {
    /// The new store, with its spare copy made.
    store: StoreWriter,
    /// Rows the source could not map.
    rejected: Vec<RejectedRow>,
    /// Entities the store refused (missing parent, cycle).
    refused: Vec<StoreError>,
    /// Entities that differ from the store served before; `None` on the
    /// first full sync.
    drift: Option<usize>,
}

impl Listing {
    fn build(rows: Vec<MappedRow>, previous: Option<Arc<EntityStore>>, max_depth: u32) -> Listing {
        let mut rejected = Vec::new();
        // std collects this in place when the layouts allow it, reusing
        // the rows' allocation.
        let good: Vec<StoredEntity> = rows
            .into_iter()
            .filter_map(|row| row.map_err(|row| rejected.push(*row)).ok())
            .collect();
        // Unchanged entities keep their stored version, so prepared slices
        // of them stay valid across a reconciliation.
        let (store, refused) =
            EntityStore::from_entities_reusing(good, previous.as_deref(), max_depth);
        let drift = previous.map(|previous| drift(&previous, &store));
        Listing {
            store: StoreWriter::with_spare(store),
            rejected,
            refused,
            drift,
        }
    }
}

/// How many entities differ between two stores.
fn drift(old: &EntityStore, new: &EntityStore) -> usize {
    let changed = new
        .iter()
        .filter(|entity| match old.get(entity.uid()) {
            Some(previous) => !previous.same_content(entity),
            None => true,
        })
        .count();
    let removed = old
        .iter()
        .filter(|entity| !new.contains(entity.uid()))
        .count();
    changed + removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::entity_store::StoredValue;
    use serde_json::json;

    /// Freshness counts from when a read began: data that took longer
    /// than the maximum staleness to arrive is stale when it arrives.
    #[tokio::test]
    async fn a_read_slower_than_the_maximum_staleness_is_stale_on_arrival() {
        let engine = Arc::new(Engine::with_external_data());
        let status = Arc::new(SyncStatus::new(Duration::from_millis(50)));
        let mut applier = Applier::new(engine, status.clone(), "test");
        applier.contacting();
        applier.replace_all(Vec::new(), 1).await.unwrap();
        assert!(status.is_synced());
        // A poll against a slow store: begun, answered later.
        applier.contacting();
        std::thread::sleep(Duration::from_millis(100));
        applier.touch();
        assert!(!status.is_fresh(), "data read 100 ms ago passed for fresh");
        // A prompt read is fresh again; a late one never moves it back.
        applier.contacting();
        applier.touch();
        assert!(status.is_fresh());
        let last = status.last_success_ms.load(Ordering::Acquire);
        status.succeeded(last - 1_000);
        assert_eq!(status.last_success_ms.load(Ordering::Acquire), last);
    }

    #[test]
    fn rejected_rows_are_named_up_to_the_cap_then_counted_as_other() {
        let labels = RejectionLabels::new(2);
        assert_eq!(labels.label("User::\"a\"".into()), "User::\"a\"");
        assert_eq!(labels.label("User::\"b\"".into()), "User::\"b\"");
        assert_eq!(labels.label("User::\"c\"".into()), OTHER_ENTITIES);
        // A row already named keeps its label (its series goes on counting).
        assert_eq!(labels.label("User::\"a\"".into()), "User::\"a\"");
        assert_eq!(labels.label("User::\"d\"".into()), OTHER_ENTITIES);
    }

    #[test]
    fn a_listing_shares_one_uid_per_entity_between_rows_and_the_store() {
        let mut parser = RowParser::default();
        let group = parser.uid("App::Group", "g").unwrap();
        let user = |parser: &mut RowParser, id: &str| {
            let uid = parser.uid("App::User", id).unwrap();
            parser
                .entity(
                    &uid,
                    json!({"team": {"__entity": {"type": "App::Group", "id": "g"}}}),
                    json!([{"type": "App::Group", "id": "g"}]),
                )
                .unwrap()
        };
        let rows = vec![
            parser.entity(&group, json!({}), json!(null)).unwrap(),
            user(&mut parser, "a"),
            user(&mut parser, "b"),
        ];
        let (store, refused) = EntityStore::from_entities(rows);
        assert!(refused.is_empty());
        let key = store.get(&group).unwrap();
        for id in ["a", "b"] {
            let stored = store.get(&parser.uid("App::User", id).unwrap()).unwrap();
            assert!(Arc::ptr_eq(&stored.parents[0], key.shared_uid()), "{id}");
            match stored.attr("team") {
                Some(StoredValue::Entity(team)) => assert!(Arc::ptr_eq(team, &stored.parents[0])),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            parser.entity(&group, json!([]), json!(null)),
            Err(RowError::Attributes(_))
        ));
        assert!(matches!(
            parser.entity(&group, json!({}), json!([{"type": "App::Group"}])),
            Err(RowError::Parents(_))
        ));
    }
}
