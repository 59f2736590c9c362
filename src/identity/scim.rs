//! The SCIM 2.0 identity source (RFC 7643/7644): pulls `/Users` and
//! `/Groups` from a service provider.
//!
//! - Full listing (paginated with `startIndex`/`count`) at start and every
//!   `reconcile_interval_secs`: the only way to see deletions, since SCIM
//!   has no change feed. Differences are drift, repaired and counted.
//! - In between, every `poll_interval_ms`, the resources with
//!   `meta.lastModified gt` the newest time seen (minus a small overlap, so
//!   a resource stamped in the same instant is not missed; unchanged ones
//!   are recognised and skipped).
//! - Users are entities of `user_type` (id: the SCIM `id`), with core and
//!   enterprise-extension attributes; groups of `group_type`. Group
//!   `members` become parents: a user's groups, and a nested group's parent
//!   groups. A member that no longer exists (a deleted user still listed as
//!   a member, a known quirk) is ignored.
//!
//! The source keeps the raw resources it has seen, so a change to a group
//! re-derives exactly the entities whose parents it changes (its old and
//! new members), not the whole store.
//!
//! Position (`data_revision`): the newest `meta.lastModified` applied, in
//! Unix milliseconds, forced to grow by at least one per applied batch.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::watch;

use super::{Applier, Change, Engine, IdentityError, RowParser, SyncStatus, entity_uid};

const ENTERPRISE: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

/// `[identity.scim]`. The bearer token comes from `ARBITER_SCIM_TOKEN` or
/// `token_file`; never from a flag or the config file itself.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScimConfig {
    /// The service provider's base URL (`https://idp.example/scim/v2`).
    pub url: String,
    /// A file holding the bearer token.
    pub token_file: Option<PathBuf>,
    /// Cedar type of users [default: `Saas::User`].
    pub user_type: Option<String>,
    /// Cedar type of groups [default: `Saas::Group`].
    pub group_type: Option<String>,
    /// Incremental poll interval [default: 5000].
    pub poll_interval_ms: Option<u64>,
    /// Full listing interval, which also catches deletions [default: 300].
    pub reconcile_interval_secs: Option<u64>,
    /// Page size of listings [default: 100].
    pub page_size: Option<u32>,
}

/// A [`ScimConfig`] with defaults applied and the token read.
#[derive(Debug, Clone)]
pub struct ScimSource {
    url: String,
    token: Option<String>,
    user_type: String,
    group_type: String,
    poll_interval: Duration,
    reconcile_interval: Duration,
    page_size: u32,
}

impl ScimConfig {
    pub fn build(&self) -> Result<ScimSource, IdentityError> {
        let token = match (std::env::var("ARBITER_SCIM_TOKEN").ok(), &self.token_file) {
            (Some(token), _) => Some(token),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map(|text| text.trim().to_string())
                    .map_err(|error| IdentityError::Config {
                        key: "identity.scim.token_file",
                        message: format!("cannot read `{}`: {error}", path.display()),
                    })?,
            ),
            (None, None) => None,
        };
        let user_type = self
            .user_type
            .clone()
            .unwrap_or_else(|| "Saas::User".into());
        let group_type = self
            .group_type
            .clone()
            .unwrap_or_else(|| "Saas::Group".into());
        for (key, value) in [
            ("identity.scim.user_type", &user_type),
            ("identity.scim.group_type", &group_type),
        ] {
            entity_uid(value, "x").map_err(|error| IdentityError::Config {
                key,
                message: error.to_string(),
            })?;
        }
        let poll_ms = self.poll_interval_ms.unwrap_or(5000);
        let reconcile_secs = self.reconcile_interval_secs.unwrap_or(300);
        if poll_ms == 0 || reconcile_secs == 0 || self.page_size == Some(0) {
            return Err(IdentityError::Config {
                key: "identity.scim",
                message: "intervals and `page_size` must be greater than zero".into(),
            });
        }
        Ok(ScimSource {
            url: self.url.trim_end_matches('/').to_string(),
            token,
            user_type,
            group_type,
            poll_interval: Duration::from_millis(poll_ms),
            reconcile_interval: Duration::from_secs(reconcile_secs),
            page_size: self.page_size.unwrap_or(100),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScimError {
    #[error("request to `{url}` failed: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("`{url}` answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("`{url}` did not answer a SCIM list response: {message}")]
    Body { url: String, message: String },
    #[error(transparent)]
    Build(#[from] super::BuildError),
}

/// Runs the sync until `stop` changes; failures keep the cache serving and
/// are retried with backoff.
pub async fn run(
    source: ScimSource,
    engine: Arc<Engine>,
    status: Arc<SyncStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let mut applier = Applier::new(engine, status.clone(), "scim");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build();
    let client = match client {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(target: "arbiter::identity", "cannot build the SCIM HTTP client: {error}");
            return;
        }
    };
    let mut state = State::default();
    let mut backoff = Duration::from_millis(100);
    let mut next_reconcile = tokio::time::Instant::now();
    loop {
        let full = applier.position().is_none() || tokio::time::Instant::now() >= next_reconcile;
        let outcome = if full {
            state.full_sync(&client, &source, &mut applier).await
        } else {
            state.poll(&client, &source, &mut applier).await
        };
        let wait = match outcome {
            Ok(()) => {
                if full {
                    next_reconcile = tokio::time::Instant::now() + source.reconcile_interval;
                }
                backoff = Duration::from_millis(100);
                source.poll_interval
            }
            Err(error) => {
                let error = IdentityError::Scim(error);
                status.failed(&error);
                metrics::counter!("arbiter_identity_reconnects_total", "source" => "scim")
                    .increment(1);
                tracing::warn!(target: "arbiter::identity", retry_in = ?backoff, "scim sync failed, serving from the cache: {error}");
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The raw resources seen, and who is a member of what.
#[derive(Debug, Default)]
struct State {
    users: HashMap<String, Value>,
    groups: HashMap<String, Value>,
    /// Member id (user or group) → ids of the groups listing it.
    member_of: HashMap<String, BTreeSet<String>>,
    /// Newest `meta.lastModified` seen, Unix milliseconds.
    watermark: i64,
}

impl State {
    async fn full_sync(
        &mut self,
        client: &reqwest::Client,
        source: &ScimSource,
        applier: &mut Applier,
    ) -> Result<(), ScimError> {
        let users = list(client, source, "Users", None).await?;
        let groups = list(client, source, "Groups", None).await?;
        let mut fresh = State::default();
        for user in users {
            fresh.put_user(user);
        }
        for group in groups {
            fresh.put_group(group);
        }
        fresh.watermark = fresh.watermark.max(self.watermark);
        *self = fresh;
        let mut parser = RowParser::default();
        let rows = self
            .users
            .keys()
            .map(|id| (id.clone(), true))
            .chain(self.groups.keys().map(|id| (id.clone(), false)))
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|(id, is_user)| self.entity(source, &id, is_user, &mut parser))
            .collect();
        let position = self.next_position(applier);
        applier.replace_all(rows, position).await?;
        Ok(())
    }

    async fn poll(
        &mut self,
        client: &reqwest::Client,
        source: &ScimSource,
        applier: &mut Applier,
    ) -> Result<(), ScimError> {
        // One second of overlap: a resource stamped in the instant of the
        // watermark but listed after it is still seen.
        let since = chrono::DateTime::from_timestamp_millis(self.watermark - 1000)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let filter = format!("meta.lastModified gt \"{since}\"");
        let users = list(client, source, "Users", Some(&filter)).await?;
        let groups = list(client, source, "Groups", Some(&filter)).await?;
        let mut affected: Vec<(String, bool)> = Vec::new();
        for user in users {
            let Some(id) = id_of(&user) else { continue };
            if self.users.get(&id) == Some(&user) {
                continue;
            }
            self.put_user(user);
            affected.push((id, true));
        }
        for group in groups {
            let Some(id) = id_of(&group) else { continue };
            if self.groups.get(&id) == Some(&group) {
                continue;
            }
            // The old and the new members' parents change.
            for member in self.members(&id) {
                affected.push((member.clone(), !self.groups.contains_key(&member)));
            }
            self.put_group(group);
            for member in self.members(&id) {
                affected.push((member.clone(), !self.groups.contains_key(&member)));
            }
            affected.push((id, false));
        }
        if affected.is_empty() {
            applier.touch();
            return Ok(());
        }
        let mut seen = HashSet::new();
        let mut changes = Vec::new();
        let mut parser = RowParser::default();
        for (id, is_user) in affected {
            if !seen.insert(id.clone()) {
                continue;
            }
            let exists = if is_user {
                self.users.contains_key(&id)
            } else {
                self.groups.contains_key(&id)
            };
            if !exists {
                continue; // a listed member that no longer exists
            }
            if let Some(entity) = self.entity(source, &id, is_user, &mut parser) {
                changes.push(Change::Upsert(entity));
            }
        }
        let position = self.next_position(applier);
        applier.apply(changes, position);
        Ok(())
    }

    fn next_position(&self, applier: &Applier) -> u64 {
        let watermark = u64::try_from(self.watermark).unwrap_or(0);
        applier
            .position()
            .map_or(watermark, |position| watermark.max(position + 1))
    }

    fn put_user(&mut self, user: Value) {
        let Some(id) = id_of(&user) else { return };
        self.see(&user);
        self.users.insert(id, user);
    }

    fn put_group(&mut self, group: Value) {
        let Some(id) = id_of(&group) else { return };
        self.see(&group);
        for member in self.members(&id) {
            if let Some(groups) = self.member_of.get_mut(&member) {
                groups.remove(&id);
            }
        }
        let members: Vec<String> = group
            .get("members")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|member| member.get("value").and_then(Value::as_str))
            .map(str::to_string)
            .collect();
        for member in members {
            self.member_of.entry(member).or_default().insert(id.clone());
        }
        self.groups.insert(id, group);
    }

    /// The ids a group lists as members.
    fn members(&self, group: &str) -> Vec<String> {
        self.groups
            .get(group)
            .and_then(|group| group.get("members"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|member| member.get("value").and_then(Value::as_str))
            .map(str::to_string)
            .collect()
    }

    fn see(&mut self, resource: &Value) {
        let modified = resource
            .pointer("/meta/lastModified")
            .and_then(Value::as_str)
            .and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
            .map(|time| time.timestamp_millis());
        if let Some(modified) = modified {
            self.watermark = self.watermark.max(modified);
        }
    }

    /// The entity of a user or group, with the groups listing it as parents.
    fn entity(
        &self,
        source: &ScimSource,
        id: &str,
        is_user: bool,
        parser: &mut RowParser,
    ) -> Option<super::MappedRow> {
        let (type_name, resource) = if is_user {
            (&source.user_type, self.users.get(id)?)
        } else {
            (&source.group_type, self.groups.get(id)?)
        };
        let uid = parser.uid(type_name, id).ok()?;
        let parents: Vec<Value> = self
            .member_of
            .get(id)
            .into_iter()
            .flatten()
            .filter(|group| self.groups.contains_key(*group))
            .map(|group| serde_json::json!({"type": source.group_type, "id": group}))
            .collect();
        let attrs = if is_user {
            user_attrs(resource, &source.user_type)
        } else {
            group_attrs(resource)
        };
        Some(
            parser
                .entity(&uid, Value::Object(attrs), Value::Array(parents))
                .map_err(|error| Box::new(super::RejectedRow { uid, error })),
        )
    }
}

fn id_of(resource: &Value) -> Option<String> {
    resource
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Core and enterprise-extension user attributes, as Cedar attributes.
fn user_attrs(user: &Value, user_type: &str) -> Map<String, Value> {
    let mut attrs = Map::new();
    let mut copy = |name: &str, value: Option<&Value>| {
        if let Some(value) = value.filter(|value| value.is_string() || value.is_boolean()) {
            attrs.insert(name.to_string(), value.clone());
        }
    };
    copy("userName", user.get("userName"));
    copy("displayName", user.get("displayName"));
    copy("externalId", user.get("externalId"));
    copy("title", user.get("title"));
    copy("userType", user.get("userType"));
    copy("givenName", user.pointer("/name/givenName"));
    copy("familyName", user.pointer("/name/familyName"));
    let emails = user.get("emails").and_then(Value::as_array);
    let email = emails.and_then(|emails| {
        emails
            .iter()
            .find(|email| email.get("primary") == Some(&Value::Bool(true)))
            .or_else(|| emails.first())
    });
    copy("email", email.and_then(|email| email.get("value")));
    let enterprise = user.get(ENTERPRISE);
    for name in [
        "employeeNumber",
        "costCenter",
        "organization",
        "division",
        "department",
    ] {
        copy(name, enterprise.and_then(|e| e.get(name)));
    }
    let active = user.get("active").and_then(Value::as_bool).unwrap_or(true);
    attrs.insert("active".into(), Value::Bool(active));
    attrs.insert(
        "status".into(),
        Value::String(if active { "active" } else { "suspended" }.into()),
    );
    if let Some(manager) = enterprise
        .and_then(|e| e.pointer("/manager/value"))
        .and_then(Value::as_str)
    {
        attrs.insert(
            "manager".into(),
            serde_json::json!({"__entity": {"type": user_type, "id": manager}}),
        );
    }
    attrs
}

fn group_attrs(group: &Value) -> Map<String, Value> {
    let mut attrs = Map::new();
    for name in ["displayName", "externalId"] {
        if let Some(value) = group.get(name).filter(|value| value.is_string()) {
            attrs.insert(name.to_string(), value.clone());
        }
    }
    attrs
}

/// Every resource of an endpoint, page by page.
async fn list(
    client: &reqwest::Client,
    source: &ScimSource,
    endpoint: &str,
    filter: Option<&str>,
) -> Result<Vec<Value>, ScimError> {
    let url = format!("{}/{endpoint}", source.url);
    let mut resources = Vec::new();
    let mut start = 1u64;
    loop {
        let mut query = vec![
            ("startIndex", start.to_string()),
            ("count", source.page_size.to_string()),
        ];
        if let Some(filter) = filter {
            query.push(("filter", filter.to_string()));
        }
        let mut request = client
            .get(&url)
            .query(&query)
            .header("Accept", "application/scim+json");
        if let Some(token) = &source.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|source| ScimError::Http {
            url: url.clone(),
            source,
        })?;
        let status = response.status();
        let body = response.text().await.map_err(|source| ScimError::Http {
            url: url.clone(),
            source,
        })?;
        if !status.is_success() {
            return Err(ScimError::Status {
                url,
                status: status.as_u16(),
                body: body.chars().take(300).collect(),
            });
        }
        let page: Value = serde_json::from_str(&body).map_err(|error| ScimError::Body {
            url: url.clone(),
            message: error.to_string(),
        })?;
        let items = page
            .get("Resources")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let total = page
            .get("totalResults")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let got = items.len() as u64;
        resources.extend(items);
        if got == 0 || start + got > total {
            return Ok(resources);
        }
        start += got;
    }
}
