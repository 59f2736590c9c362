//! The PostgreSQL identity source: a full snapshot at start, then the
//! change log (`deploy/postgres/schema.sql`) in commit order, woken by
//! LISTEN/NOTIFY, with periodic reconciliation.
//!
//! Positions: the change log's `seq`, which the schema's triggers hand out
//! in commit order (see the advisory lock in `arbiter_log_change`). A full
//! snapshot reads `max(seq)` and the entities in one REPEATABLE READ
//! transaction, so the store equals the database at that position. Each poll
//! reads every change after the last applied position and the current state
//! of each changed entity, again in one REPEATABLE READ transaction, and
//! publishes once. After a disconnect the loop reconnects with backoff and
//! resumes from the last applied position: nothing is lost (the log is
//! durable), nothing applied twice (positions only move forward) or out of
//! order (one reader, ordered by `seq`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::{Notify, watch};
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Row, Statement};

use super::{
    Applier, Change, Engine, IdentityError, MappedRow, RejectedRow, RowError, RowParser, SyncStatus,
};

/// `[identity.postgres]`. The URL (which may hold a password) comes from the
/// file, `ARBITER_POSTGRES_URL`, or `url_file`; never from a flag.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/db?sslmode=prefer` (libpq URL or key=value).
    pub url: Option<String>,
    /// A file holding the URL (a Kubernetes secret, say).
    pub url_file: Option<PathBuf>,
    /// A file holding the password, when it is not in the URL.
    pub password_file: Option<PathBuf>,
    /// Verify the server's TLS certificate [default: false: like libpq's
    /// `sslmode=prefer`/`require`, TLS is used when offered but not verified].
    pub tls_verify: Option<bool>,
    /// Full listing: rows of (entity_type text, entity_id text, attrs jsonb,
    /// parents jsonb) [default: `SELECT ... FROM arbiter_entities`].
    pub entities_query: Option<String>,
    /// One entity: the same columns for `$1` = type, `$2` = id.
    pub entity_query: Option<String>,
    /// The change-log table [default: `arbiter_change_log`].
    pub change_log: Option<String>,
    /// The NOTIFY channel [default: `arbiter_changes`].
    pub channel: Option<String>,
    /// Poll the change log at least this often, notification or not [default: 1000].
    pub poll_interval_ms: Option<u64>,
    /// Full reconciliation against the source every so often [default: 600].
    pub reconcile_interval_secs: Option<u64>,
}

const DEFAULT_ENTITIES_QUERY: &str =
    "SELECT entity_type, entity_id, attrs, parents FROM arbiter_entities";
const DEFAULT_ENTITY_QUERY: &str = "SELECT entity_type, entity_id, attrs, parents \
     FROM arbiter_entities WHERE entity_type = $1 AND entity_id = $2";

/// A [`PostgresConfig`] with every default applied and the URL resolved.
#[derive(Debug, Clone)]
pub struct PostgresSource {
    config: tokio_postgres::Config,
    tls_verify: bool,
    entities_query: String,
    entity_query: String,
    change_log: String,
    channel: String,
    poll_interval: Duration,
    reconcile_interval: Duration,
}

impl PostgresConfig {
    /// Resolves the URL (env `ARBITER_POSTGRES_URL` first, then `url`, then
    /// `url_file`) and the defaults.
    pub fn build(&self) -> Result<PostgresSource, IdentityError> {
        let url = match (
            std::env::var("ARBITER_POSTGRES_URL").ok(),
            &self.url,
            &self.url_file,
        ) {
            (Some(url), _, _) => url,
            (None, Some(url), _) => url.clone(),
            (None, None, Some(path)) => read_secret(path, "url_file")?,
            (None, None, None) => {
                return Err(IdentityError::Config {
                    key: "identity.postgres.url",
                    message: "no URL: set `url`, `url_file` or ARBITER_POSTGRES_URL".into(),
                });
            }
        };
        let mut config: tokio_postgres::Config =
            url.parse()
                .map_err(|error: tokio_postgres::Error| IdentityError::Config {
                    key: "identity.postgres.url",
                    message: error.to_string(),
                })?;
        if let Some(path) = &self.password_file {
            config.password(read_secret(path, "password_file")?);
        }
        if config.get_application_name().is_none() {
            config.application_name("arbiter");
        }
        config.connect_timeout(Duration::from_secs(10));
        let identifier = |key: &'static str, value: &Option<String>, default: &str| {
            let value = value.clone().unwrap_or_else(|| default.to_string());
            let valid = !value.is_empty()
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if valid {
                Ok(value)
            } else {
                Err(IdentityError::Config {
                    key,
                    message: format!("`{value}` is not a plain SQL identifier"),
                })
            }
        };
        let poll_ms = self.poll_interval_ms.unwrap_or(1000);
        let reconcile_secs = self.reconcile_interval_secs.unwrap_or(600);
        if poll_ms == 0 || reconcile_secs == 0 {
            return Err(IdentityError::Config {
                key: "identity.postgres",
                message:
                    "`poll_interval_ms` and `reconcile_interval_secs` must be greater than zero"
                        .into(),
            });
        }
        Ok(PostgresSource {
            config,
            tls_verify: self.tls_verify.unwrap_or(false),
            entities_query: self
                .entities_query
                .clone()
                .unwrap_or_else(|| DEFAULT_ENTITIES_QUERY.into()),
            entity_query: self
                .entity_query
                .clone()
                .unwrap_or_else(|| DEFAULT_ENTITY_QUERY.into()),
            change_log: identifier(
                "identity.postgres.change_log",
                &self.change_log,
                "arbiter_change_log",
            )?,
            channel: identifier(
                "identity.postgres.channel",
                &self.channel,
                "arbiter_changes",
            )?,
            poll_interval: Duration::from_millis(poll_ms),
            reconcile_interval: Duration::from_secs(reconcile_secs),
        })
    }
}

fn read_secret(path: &std::path::Path, key: &'static str) -> Result<String, IdentityError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_string())
        .map_err(|error| IdentityError::Config {
            key,
            message: format!("cannot read `{}`: {error}", path.display()),
        })
}

/// Runs the sync until `stop` changes: connects (retrying with backoff,
/// not ready until the first full sync), follows the change log, and
/// reconnects and resumes after any failure.
pub async fn run(
    source: PostgresSource,
    engine: Arc<Engine>,
    status: Arc<SyncStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let mut applier = Applier::new(engine, status.clone(), "postgres");
    let mut backoff = Duration::from_millis(100);
    loop {
        let session = Session::new(&source, &mut applier);
        let outcome = tokio::select! {
            outcome = session.run(&mut backoff) => outcome,
            _ = stop.changed() => return,
        };
        if let Err(error) = outcome {
            status.failed(&error);
            metrics::counter!("arbiter_identity_reconnects_total", "source" => "postgres")
                .increment(1);
            tracing::warn!(
                target: "arbiter::identity",
                position = applier.position(),
                retry_in = ?backoff,
                "postgres sync interrupted, serving from the cache: {error}"
            );
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

struct Session<'a> {
    source: &'a PostgresSource,
    applier: &'a mut Applier,
}

impl<'a> Session<'a> {
    fn new(source: &'a PostgresSource, applier: &'a mut Applier) -> Self {
        Session { source, applier }
    }

    async fn run(self, backoff: &mut Duration) -> Result<(), IdentityError> {
        let Session { source, applier } = self;
        let (client, wake, closed) = connect(source).await?;
        client
            .batch_execute(&format!("LISTEN {}", source.channel))
            .await?;
        let entity = client.prepare(&source.entity_query).await?;
        let head = client
            .prepare(&format!(
                "SELECT coalesce(max(seq), 0)::int8 FROM {}",
                source.change_log
            ))
            .await?;
        let changes = client
            .prepare(&format!(
                "SELECT seq, entity_type, entity_id, \
                 extract(epoch FROM clock_timestamp() - changed_at)::float8 \
                 FROM {} WHERE seq > $1 ORDER BY seq",
                source.change_log
            ))
            .await?;
        if applier.position().is_none() {
            full_sync(&client, source, applier).await?;
        }
        *backoff = Duration::from_millis(100);
        let mut reconcile = tokio::time::interval_at(
            tokio::time::Instant::now() + source.reconcile_interval,
            source.reconcile_interval,
        );
        loop {
            // Catch up first (this also covers anything missed while away).
            poll(&client, &head, &changes, &entity, applier).await?;
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(source.poll_interval) => {}
                _ = reconcile.tick() => full_sync(&client, source, applier).await?,
                () = closed.notified() => return Err(IdentityError::Closed),
            }
        }
    }
}

/// Connects (TLS when the server offers it) and drives the connection in a
/// task that turns notifications into `wake` and the end into `closed`.
async fn connect(
    source: &PostgresSource,
) -> Result<(Client, Arc<Notify>, Arc<Notify>), IdentityError> {
    let tls = super::tls::postgres_connector(source.tls_verify)?;
    let (client, mut connection) = source.config.connect(tls).await?;
    let wake = Arc::new(Notify::new());
    let closed = Arc::new(Notify::new());
    let (wake_tx, closed_tx) = (wake.clone(), closed.clone());
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => wake_tx.notify_one(),
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(target: "arbiter::identity", "postgres connection ended: {error}");
                    break;
                }
            }
        }
        closed_tx.notify_one();
    });
    Ok((client, wake, closed))
}

/// Reads the whole mapping and `max(seq)` in one snapshot and replaces the
/// store with it.
async fn full_sync(
    client: &Client,
    source: &PostgresSource,
    applier: &mut Applier,
) -> Result<(), IdentityError> {
    applier.contacting();
    let mut client_tx = ReadSnapshot::begin(client).await?;
    let position: i64 = client_tx
        .client
        .query_one(
            &format!(
                "SELECT coalesce(max(seq), 0)::int8 FROM {}",
                source.change_log
            ),
            &[],
        )
        .await?
        .try_get(0)?;
    // Streamed: each row becomes its compact entity as it arrives, so the
    // listing's raw rows (about 1 KB each for a reference-schema user) are
    // never all held at once.
    let stream = client_tx
        .client
        .query_raw(&source.entities_query, std::iter::empty::<&str>())
        .await?;
    let mut stream = std::pin::pin!(stream);
    let mut rows = Vec::new();
    let mut parser = RowParser::default();
    while let Some(row) = stream.next().await {
        if let Some(entity) = row_to_entity(&row?, &mut parser) {
            rows.push(entity);
        }
    }
    client_tx.commit().await?;
    applier.replace_all(rows, position.max(0) as u64).await?;
    Ok(())
}

/// Applies every change after the applied position, reading each changed
/// entity's state in the same snapshot as the change log.
async fn poll(
    client: &Client,
    head: &Statement,
    changes: &Statement,
    entity: &Statement,
    applier: &mut Applier,
) -> Result<(), IdentityError> {
    // The newest position first, outside the snapshot (one index probe): if
    // reading or applying what follows stalls or fails, the lag in positions
    // shows how far the served data is behind.
    let newest: i64 = client.query_one(head, &[]).await?.try_get(0)?;
    applier.saw_source_position(newest.max(0) as u64);
    let after = applier.position().unwrap_or(0) as i64;
    applier.contacting();
    let mut tx = ReadSnapshot::begin(client).await?;
    let rows = tx.client.query(changes, &[&after]).await?;
    let Some(last) = rows.last() else {
        tx.commit().await?;
        applier.touch();
        metrics::gauge!("arbiter_identity_lag_seconds", "source" => "postgres").set(0.0);
        return Ok(());
    };
    let position: i64 = last.try_get(0)?;
    let oldest_age: f64 = rows[0].try_get(3).unwrap_or(0.0);
    // Each changed entity once, in the order of its first change.
    let mut uids: Vec<(String, String)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for row in &rows {
        let type_name: String = row.try_get(1)?;
        let id: String = row.try_get(2)?;
        if seen.insert((type_name.clone(), id.clone())) {
            uids.push((type_name, id));
        }
    }
    // Pipelined over the one connection.
    let mut states = Vec::with_capacity(uids.len());
    for chunk in uids.chunks(256) {
        let params: Vec<[&(dyn ToSql + Sync); 2]> = chunk
            .iter()
            .map(|(type_name, id)| [type_name as &(dyn ToSql + Sync), id])
            .collect();
        let queries = params.iter().map(|params| tx.client.query(entity, params));
        states.extend(futures_util::future::try_join_all(queries).await?);
    }
    tx.commit().await?;
    let mut batch = Vec::with_capacity(uids.len());
    let mut parser = RowParser::default();
    for ((type_name, id), state) in uids.iter().zip(states) {
        let uid = match parser.uid(type_name, id) {
            Ok(uid) => uid,
            Err(error) => {
                tracing::error!(target: "arbiter::identity", entity_type = %type_name, entity_id = %id, "change refused: {error}");
                continue;
            }
        };
        if state.len() > 1 {
            tracing::warn!(target: "arbiter::identity", entity = %uid, rows = state.len(), "the entity query returned several rows; the first is used");
        }
        batch.push(
            match state
                .first()
                .and_then(|row| row_to_entity(row, &mut parser))
            {
                Some(entity) => Change::Upsert(entity),
                None => Change::Delete(uid),
            },
        );
    }
    applier.apply(batch, position.max(0) as u64);
    metrics::gauge!("arbiter_identity_lag_seconds", "source" => "postgres").set(oldest_age);
    metrics::counter!("arbiter_identity_changes_total", "source" => "postgres")
        .increment(rows.len() as u64);
    Ok(())
}

/// A read-only REPEATABLE READ transaction on a shared client.
struct ReadSnapshot<'a> {
    client: &'a Client,
}

impl<'a> ReadSnapshot<'a> {
    async fn begin(client: &'a Client) -> Result<Self, IdentityError> {
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        Ok(ReadSnapshot { client })
    }

    async fn commit(&mut self) -> Result<(), IdentityError> {
        self.client.batch_execute("COMMIT").await?;
        Ok(())
    }
}

/// A mapped row as (uid, entity or why not). `None` when even the uid is
/// unreadable (logged).
fn row_to_entity(row: &Row, parser: &mut RowParser) -> Option<MappedRow> {
    let type_name: Result<String, _> = row.try_get(0);
    let id: Result<String, _> = row.try_get(1);
    let (type_name, id) = match (type_name, id) {
        (Ok(type_name), Ok(id)) => (type_name, id),
        (Err(error), _) | (_, Err(error)) => {
            tracing::error!(target: "arbiter::identity", "mapped row without a readable type and id refused: {error}");
            super::count_rejected_row("postgres", "<unreadable>".to_owned(), "column");
            return None;
        }
    };
    let uid = match parser.uid(&type_name, &id) {
        Ok(uid) => uid,
        Err(error) => {
            tracing::error!(target: "arbiter::identity", entity_type = %type_name, entity_id = %id, "mapped row refused: {error}");
            super::count_rejected_row("postgres", format!("{type_name}::{id:?}"), error.kind());
            return None;
        }
    };
    let attrs = row
        .try_get::<_, Option<serde_json::Value>>(2)
        .map_err(|error| RowError::Column(format!("attrs: {error}")));
    let parents = row
        .try_get::<_, Option<serde_json::Value>>(3)
        .map_err(|error| RowError::Column(format!("parents: {error}")));
    let entity = match (attrs, parents) {
        (Ok(attrs), Ok(parents)) => parser.entity(
            &uid,
            attrs.unwrap_or_else(|| serde_json::json!({})),
            parents.unwrap_or(serde_json::Value::Null),
        ),
        (Err(error), _) | (_, Err(error)) => Err(error),
    };
    Some(entity.map_err(|error| Box::new(RejectedRow { uid, error })))
}
