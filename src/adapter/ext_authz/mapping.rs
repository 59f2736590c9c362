//! The ext_authz mapping: configuration (`[ext_authz]` in the TOML file)
//! compiled once into a route table, and the per-request steps that turn an
//! HTTP request into a Cedar question: path normalisation, route matching
//! with captures, principal from claims, context fields.
//!
//! Invariants: a path is matched only after normalisation (percent-decoding
//! once, dot segments, duplicate slashes), so `/documents/../admin` can never
//! match `/documents/{id}`; an encoded `/`, `\` or NUL inside a segment is
//! refused rather than guessed at; anything that cannot be mapped is an
//! error, which the service turns into a deny.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use super::claims::ClaimsMapping;
pub use super::claims::MappingError;
use super::jwt::JwtConfig;
use super::wire::Headers;
use crate::engine::{EntityMerge, EntityRef, SealedMerge};

fn default_realm() -> String {
    "arbiter".into()
}
fn default_max_header_bytes() -> usize {
    16 * 1024
}
fn default_id_claim() -> String {
    "sub".into()
}
fn default_metadata_filter() -> String {
    "envoy.filters.http.jwt_authn".into()
}
fn default_metadata_key() -> String {
    "jwt_payload".into()
}
fn default_decision_header() -> String {
    "x-arbiter-decision-id".into()
}

/// `[ext_authz]`: how Envoy's `CheckRequest` becomes a Cedar request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtAuthzConfig {
    /// Realm named in `WWW-Authenticate` challenges [default: "arbiter"].
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Answer for a request that matches no route [default: deny].
    #[serde(default)]
    pub unmatched: Unmatched,
    /// Largest total size of request header names and values; larger
    /// requests are denied with 431 [default: 16384].
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Header carrying the decision id on every answer [default: "x-arbiter-decision-id"].
    #[serde(default = "default_decision_header")]
    pub decision_header: String,
    pub principal: PrincipalConfig,
    /// Context fields, in the order given.
    #[serde(default)]
    pub context: Vec<ContextFieldConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    #[default]
    Deny,
    Allow,
}

/// Where the principal comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalSource {
    /// A JWT already verified by Envoy's `jwt_authn` filter, read from
    /// `metadata_context.filter_metadata[metadata_filter][metadata_key]`.
    JwtAuthn,
    /// A bearer JWT that Arbiter verifies itself (`[ext_authz.principal.jwt]`).
    Jwt,
    /// The mTLS peer identity (`source.principal`, a SPIFFE id).
    Mtls,
    /// A header set by a trusted gateway (which must strip it from clients).
    Header,
}

/// `[ext_authz.principal]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    pub source: PrincipalSource,
    /// Entity type of the principal, e.g. `Saas::User`.
    #[serde(rename = "type")]
    pub entity_type: String,
    /// Claim that gives the principal id [default: "sub"].
    #[serde(default = "default_id_claim")]
    pub id_claim: String,
    /// Header that carries the principal id (source `header`).
    pub header: Option<String>,
    /// Filter name under `filter_metadata` [default: "envoy.filters.http.jwt_authn"].
    #[serde(default = "default_metadata_filter")]
    pub metadata_filter: String,
    /// `payload_in_metadata` of the `jwt_authn` provider [default: "jwt_payload"].
    #[serde(default = "default_metadata_key")]
    pub metadata_key: String,
    /// Token verification (source `jwt`).
    pub jwt: Option<JwtConfig>,
    /// Claims that become attributes of the principal for this request.
    #[serde(default)]
    pub attributes: Vec<ClaimAttributeConfig>,
    /// Claims (strings or arrays of strings) that become parents.
    #[serde(default)]
    pub parents: Vec<ClaimParentConfig>,
}

/// A claim that becomes an attribute, as a string (or the claim's own JSON
/// value) or, with `entity_type`, an entity reference.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimAttributeConfig {
    /// Claim name; `a.b` reads nested objects.
    pub claim: String,
    pub attribute: String,
    pub entity_type: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimParentConfig {
    pub claim: String,
    pub entity_type: String,
}

/// One context field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextFieldConfig {
    /// Name in the Cedar context.
    pub name: String,
    pub from: ContextSource,
    /// Header, query parameter or claim name (sources `header`, `query`, `claim`).
    pub key: Option<String>,
    /// The value (source `value`), in Cedar JSON.
    pub value: Option<Value>,
    /// Used when the header, parameter or claim is absent; without it the
    /// field is left out.
    pub default: Option<Value>,
    /// How a header or query string is read [default: string].
    #[serde(default, rename = "as")]
    pub value_type: ValueType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextSource {
    /// The source address as an `ipaddr`.
    SourceIp,
    /// The request time, seconds since the Unix epoch (`Long`).
    RequestTime,
    /// Whether the client connection used TLS (`Bool`).
    Tls,
    Header,
    Query,
    Claim,
    Value,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    #[default]
    String,
    Long,
    Bool,
    Ipaddr,
}

/// `[[ext_authz.routes]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Exact host, `*.suffix`, or absent for any host (compared without port,
    /// case-insensitively).
    pub host: Option<String>,
    /// Methods; empty means any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path template: literal segments and `{capture}` segments.
    pub path: String,
    pub action: UidTemplateConfig,
    pub resource: ResourceConfig,
    /// Headers added to the upstream request on allow; values are templates
    /// over captures and `principal.type`, `principal.id`, `decision_id`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UidTemplateConfig {
    #[serde(rename = "type")]
    pub entity_type: String,
    /// Template over the route's captures, e.g. `{id}`.
    pub id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    #[serde(rename = "type")]
    pub entity_type: String,
    pub id: String,
    /// Attributes of the resource: a string template, or an entity
    /// `{ type = "...", id = "{capture}" }`. They fill in attributes the
    /// cached resource lacks (or make up a resource that is not cached) and
    /// never replace cached ones.
    #[serde(default)]
    pub attributes: BTreeMap<String, AttributeTemplateConfig>,
    #[serde(default)]
    pub parents: Vec<UidTemplateConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum AttributeTemplateConfig {
    String(String),
    Entity(UidTemplateConfig),
}

/// A configuration that cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum MappingConfigError {
    #[error("`ext_authz.routes[{route}].path`: {message}")]
    Path { route: usize, message: String },
    #[error(
        "`ext_authz.routes[{route}]`: template `{template}` names `{name}`, which is not a capture"
    )]
    UnknownCapture {
        route: usize,
        template: String,
        name: String,
    },
    #[error("`ext_authz.{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

// --- templates ------------------------------------------------------------

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    Var(String),
}

/// A string with `{name}` placeholders.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    parts: Vec<Part>,
}

impl Template {
    fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in `{text}`"))?;
            let name = &after[..close];
            if name.is_empty() || name.contains('{') {
                return Err(format!("empty or nested placeholder in `{text}`"));
            }
            parts.push(Part::Var(name.to_string()));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched `}}` in `{text}`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Template { parts })
    }

    fn vars(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Var(name) => Some(name.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Renders with `lookup`; `None` when a variable has no value.
    pub(crate) fn render<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> Option<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Var(name) => out.push_str(lookup(name)?),
            }
        }
        Some(out)
    }
}

// --- compiled mapping -------------------------------------------------------

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Capture(String),
}

#[derive(Debug, Clone)]
enum HostMatch {
    Any,
    Exact(String),
    Suffix(String),
}

impl HostMatch {
    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(exact) => host == exact,
            HostMatch::Suffix(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct UidTemplate {
    entity_type: String,
    id: Template,
}

#[derive(Debug, Clone)]
pub(crate) enum AttributeTemplate {
    String(Template),
    Entity(UidTemplate),
}

#[derive(Debug, Clone)]
pub(crate) struct Route {
    host: HostMatch,
    methods: Vec<String>,
    segments: Vec<Segment>,
    action: UidTemplate,
    resource: UidTemplate,
    resource_attributes: BTreeMap<String, AttributeTemplate>,
    resource_parents: Vec<UidTemplate>,
    pub headers: Vec<(String, Template)>,
    /// The route's sealed resource merges by capture values (routes whose
    /// resource has attributes or parents): building and sealing one per
    /// request was ~5,700 instructions (callgrind), a lookup with its key
    /// ~1,100-1,400.
    /// Never stale: a merge depends only on this route and the captures.
    resource_merges: moka::sync::Cache<Box<str>, Arc<SealedMerge>, foldhash::fast::RandomState>,
}

/// Sealed resource merges kept per route.
const RESOURCE_MERGES_PER_ROUTE: u64 = 10_000;

/// A route that matched, with its captures (borrowed from the route and
/// from the normalised path).
#[derive(Debug)]
pub(crate) struct Matched<'r, 't> {
    pub route: &'r Route,
    pub captures: Vec<(&'r str, &'t str)>,
}

impl Matched<'_, '_> {
    pub fn capture(&self, name: &str) -> Option<&str> {
        self.captures
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| *value)
    }

    /// The resource merge of [`Matched::resource_merge`], sealed, from the
    /// route's cache; `None` when the route gives the resource nothing.
    pub fn sealed_resource_merge(
        &self,
        uid: &EntityRef,
    ) -> Result<Option<Arc<SealedMerge>>, MappingError> {
        let route = self.route;
        if route.resource_attributes.is_empty() && route.resource_parents.is_empty() {
            return Ok(None);
        }
        // Every capture, length-prefixed: the uid and every template are
        // rendered from them.
        let mut key = String::with_capacity(64);
        for (_, value) in &self.captures {
            key.push_str(itoa::Buffer::new().format(value.len()));
            key.push(':');
            key.push_str(value);
        }
        if let Some(sealed) = route.resource_merges.get(key.as_str()) {
            return Ok(Some(sealed));
        }
        let sealed = self.resource_merge(uid.clone())?.seal();
        route
            .resource_merges
            .insert(key.into_boxed_str(), sealed.clone());
        Ok(Some(sealed))
    }

    fn render_uid(&self, template: &UidTemplate) -> Result<EntityRef, MappingError> {
        let id = template
            .id
            .render(|name| self.capture(name))
            .ok_or_else(|| MappingError::Unmappable("a capture has no value".into()))?;
        Ok(EntityRef::new(template.entity_type.clone(), id))
    }

    pub fn action(&self) -> Result<EntityRef, MappingError> {
        self.render_uid(&self.route.action)
    }

    pub fn resource(&self) -> Result<EntityRef, MappingError> {
        self.render_uid(&self.route.resource)
    }

    /// Attributes and parents the route gives the resource (possibly
    /// none). They fill in what the cached resource lacks and never replace
    /// cached attributes: a URL must not move a stored resource to another
    /// tenant.
    pub fn resource_merge(&self, uid: EntityRef) -> Result<EntityMerge, MappingError> {
        let mut merge = EntityMerge::fill_in(uid);
        for (name, template) in &self.route.resource_attributes {
            let value = match template {
                AttributeTemplate::String(template) => Value::String(
                    template
                        .render(|name| self.capture(name))
                        .ok_or_else(|| MappingError::Unmappable("a capture has no value".into()))?,
                ),
                AttributeTemplate::Entity(template) => entity_json(&self.render_uid(template)?),
            };
            merge.attrs.insert(name.clone(), value);
        }
        for parent in &self.route.resource_parents {
            merge.parents.push(self.render_uid(parent)?);
        }
        Ok(merge)
    }
}

fn entity_json(uid: &EntityRef) -> Value {
    json!({"__entity": {"type": uid.type_name, "id": uid.id}})
}

#[derive(Debug, Clone)]
pub(crate) struct ContextField {
    name: String,
    /// `name` as a JSON string followed by `:`, written once at compile time.
    name_json: String,
    source: ContextSource,
    key: String,
    /// JSON text of `value` (source `value`).
    value_text: Option<String>,
    /// JSON text of `default`.
    default_text: Option<String>,
    value_type: ValueType,
}

/// Inputs of the context, taken from the `CheckRequest` by the service.
#[derive(Debug, Default)]
pub(crate) struct RequestFacts<'a> {
    pub source_ip: Option<IpAddr>,
    pub request_time: Option<i64>,
    pub tls: bool,
    pub headers: Option<&'a Headers<'a>>,
    pub query: &'a [(Cow<'a, str>, Cow<'a, str>)],
    /// The mapped claims of the principal, when it came from a JWT.
    pub claims: Option<&'a ClaimsMapping>,
}

/// The compiled `[ext_authz]` table.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub(crate) realm: String,
    pub(crate) unmatched: Unmatched,
    pub(crate) max_header_bytes: usize,
    pub(crate) decision_header: String,
    pub(crate) principal: PrincipalConfig,
    context: Vec<ContextField>,
    routes: Vec<Route>,
}

const HEADER_VARS: [&str; 3] = ["principal.type", "principal.id", "decision_id"];

impl Mapping {
    pub fn compile(config: &ExtAuthzConfig) -> Result<Self, MappingConfigError> {
        let principal = &config.principal;
        let invalid = |field: &str, message: &str| MappingConfigError::Invalid {
            field: field.into(),
            message: message.into(),
        };
        check_type(&principal.entity_type, "principal.type")?;
        match principal.source {
            PrincipalSource::Header if principal.header.is_none() => {
                return Err(invalid(
                    "principal.header",
                    "is required for source `header`",
                ));
            }
            PrincipalSource::Jwt if principal.jwt.is_none() => {
                return Err(invalid(
                    "principal.jwt",
                    "is required for source `jwt` (jwks_file or jwks_url, issuers, audiences)",
                ));
            }
            _ => {}
        }
        for attribute in &principal.attributes {
            if let Some(entity_type) = &attribute.entity_type {
                check_type(entity_type, "principal.attributes.entity_type")?;
            }
        }
        for parent in &principal.parents {
            check_type(&parent.entity_type, "principal.parents.entity_type")?;
        }
        let mut context = Vec::new();
        let mut names = HashSet::new();
        for field in &config.context {
            // The context is written as JSON text in field order; a repeated
            // name would be a repeated key.
            if !names.insert(field.name.as_str()) {
                return Err(invalid(
                    &format!("context `{}`", field.name),
                    "is given twice; each context field needs its own name",
                ));
            }
            let needs_key = matches!(
                field.from,
                ContextSource::Header | ContextSource::Query | ContextSource::Claim
            );
            let key = match (&field.key, needs_key) {
                (Some(key), true) => key.clone(),
                (None, true) => {
                    return Err(invalid(
                        &format!("context `{}`", field.name),
                        "`key` is required for sources header, query and claim",
                    ));
                }
                (_, false) => String::new(),
            };
            if field.from == ContextSource::Value && field.value.is_none() {
                return Err(invalid(
                    &format!("context `{}`", field.name),
                    "`value` is required for source value",
                ));
            }
            let mut name_json = String::new();
            push_json_string(&mut name_json, &field.name);
            name_json.push(':');
            context.push(ContextField {
                name: field.name.clone(),
                name_json,
                source: field.from,
                // Envoy hands headers over lower-cased.
                key: if field.from == ContextSource::Header {
                    key.to_ascii_lowercase()
                } else {
                    key
                },
                value_text: field.value.as_ref().map(Value::to_string),
                default_text: field.default.as_ref().map(Value::to_string),
                value_type: field.value_type,
            });
        }
        let mut routes = Vec::new();
        for (index, route) in config.routes.iter().enumerate() {
            routes.push(compile_route(index, route)?);
        }
        Ok(Mapping {
            realm: config.realm.clone(),
            unmatched: config.unmatched,
            max_header_bytes: config.max_header_bytes,
            decision_header: config.decision_header.to_ascii_lowercase(),
            // Envoy sends header names lower-cased: the name is lower-cased
            // once here, not per request.
            principal: PrincipalConfig {
                header: principal.header.as_deref().map(str::to_ascii_lowercase),
                ..principal.clone()
            },
            context,
            routes,
        })
    }

    /// The first route that matches, in configuration order.
    pub(crate) fn route<'m, 't>(
        &'m self,
        host: &str,
        method: &str,
        segments: &'t [Cow<'t, str>],
    ) -> Option<Matched<'m, 't>> {
        let host = host_without_port(host);
        let host = if host.bytes().any(|byte| byte.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        self.routes.iter().find_map(|route| {
            if !route.host.matches(&host) {
                return None;
            }
            if !route.methods.is_empty() && !route.methods.iter().any(|m| m == method) {
                return None;
            }
            if route.segments.len() != segments.len() {
                return None;
            }
            let mut captures = Vec::new();
            for (pattern, segment) in route.segments.iter().zip(segments) {
                match pattern {
                    Segment::Literal(literal) if literal == segment => {}
                    Segment::Literal(_) => return None,
                    Segment::Capture(name) => captures.push((name.as_str(), segment.as_ref())),
                }
            }
            Some(Matched { route, captures })
        })
    }

    /// What verified claims map to: the principal uid, its request-scoped
    /// attributes and parents, and the claim context fields.
    pub(crate) fn map_claims(&self, claims: &Value) -> Result<ClaimsMapping, MappingError> {
        let principal = &self.principal;
        let id = match claim(claims, &principal.id_claim) {
            Some(Value::String(id)) if !id.is_empty() => id.clone(),
            Some(Value::Number(number)) => number.to_string(),
            _ => {
                return Err(MappingError::InvalidCredentials(format!(
                    "the token has no `{}` claim",
                    principal.id_claim
                )));
            }
        };
        let uid = EntityRef::new(principal.entity_type.clone(), id);
        let mut merge = EntityMerge::new(uid.clone());
        for attribute in &principal.attributes {
            let Some(value) = claim(claims, &attribute.claim) else {
                continue;
            };
            let value = match (&attribute.entity_type, value) {
                (Some(entity_type), Value::String(id)) => {
                    entity_json(&EntityRef::new(entity_type.clone(), id.clone()))
                }
                (Some(_), _) => {
                    return Err(MappingError::InvalidCredentials(format!(
                        "claim `{}` must be a string",
                        attribute.claim
                    )));
                }
                (None, value) => value.clone(),
            };
            merge.attrs.insert(attribute.attribute.clone(), value);
        }
        for parent in &principal.parents {
            let ids: Vec<&str> = match claim(claims, &parent.claim) {
                None => Vec::new(),
                Some(Value::String(id)) => id.split(' ').filter(|id| !id.is_empty()).collect(),
                Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
                Some(_) => {
                    return Err(MappingError::InvalidCredentials(format!(
                        "claim `{}` must be a string or an array of strings",
                        parent.claim
                    )));
                }
            };
            for id in ids {
                merge
                    .parents
                    .push(EntityRef::new(parent.entity_type.clone(), id));
            }
        }
        let context_claims = self
            .context
            .iter()
            .map(|field| match field.source {
                ContextSource::Claim => claim(claims, &field.key).map(Value::to_string),
                _ => None,
            })
            .collect();
        Ok(ClaimsMapping {
            uid,
            merge: merge.seal(),
            context_claims,
        })
    }

    /// The Cedar context (JSON text) for one request: the fields in the
    /// order given, written directly (building a `Value` and printing it
    /// was ~9,000 instructions per request, callgrind).
    pub(crate) fn context(&self, facts: &RequestFacts<'_>) -> Result<String, MappingError> {
        let mut out = String::with_capacity(128);
        out.push('{');
        let mut first = true;
        for (index, field) in self.context.iter().enumerate() {
            let start = out.len();
            if !first {
                out.push(',');
            }
            out.push_str(&field.name_json);
            let written = match field.source {
                ContextSource::SourceIp => facts.source_ip.is_some_and(|ip| {
                    push_ip(&mut out, ip);
                    true
                }),
                ContextSource::RequestTime => facts.request_time.is_some_and(|time| {
                    out.push_str(itoa::Buffer::new().format(time));
                    true
                }),
                ContextSource::Tls => {
                    out.push_str(if facts.tls { "true" } else { "false" });
                    true
                }
                ContextSource::Value => push_text(&mut out, field.value_text.as_deref()),
                ContextSource::Claim => push_text(
                    &mut out,
                    facts
                        .claims
                        .and_then(|claims| claims.context_claims.get(index))
                        .and_then(Option::as_deref),
                ),
                ContextSource::Header => match facts.headers.and_then(|h| h.get(&field.key)) {
                    Some(text) => {
                        push_typed(&mut out, text, field)?;
                        true
                    }
                    None => false,
                },
                ContextSource::Query => {
                    match facts.query.iter().find(|(key, _)| *key == field.key) {
                        Some((_, text)) => {
                            push_typed(&mut out, text, field)?;
                            true
                        }
                        None => false,
                    }
                }
            };
            if written || push_text(&mut out, field.default_text.as_deref()) {
                first = false;
            } else {
                out.truncate(start);
            }
        }
        out.push('}');
        Ok(out)
    }
}

/// Appends `text` when there is one; whether it did.
fn push_text(out: &mut String, text: Option<&str>) -> bool {
    text.is_some_and(|text| {
        out.push_str(text);
        true
    })
}

/// A JSON string, escaped as `serde_json` escapes it.
fn push_json_string(out: &mut String, text: &str) {
    // Serializing a `str` cannot fail.
    out.push_str(&serde_json::to_string(text).unwrap_or_default());
}

/// Cedar's `ip("...")` extension value, in its JSON form.
fn push_ip(out: &mut String, ip: IpAddr) {
    out.push_str(r#"{"__extn":{"fn":"ip","arg":""#);
    match ip {
        // The common case, without the formatting machinery.
        IpAddr::V4(v4) => {
            for (index, octet) in v4.octets().into_iter().enumerate() {
                if index > 0 {
                    out.push('.');
                }
                out.push_str(itoa::Buffer::new().format(octet));
            }
        }
        IpAddr::V6(v6) => out.push_str(&v6.to_string()),
    }
    out.push_str(r#""}}"#);
}

/// A header or query value read as its field's type.
fn push_typed(out: &mut String, text: &str, field: &ContextField) -> Result<(), MappingError> {
    let bad = || {
        MappingError::Unmappable(format!(
            "context `{}`: `{text}` is not a {:?}",
            field.name, field.value_type
        ))
    };
    match field.value_type {
        ValueType::String => push_json_string(out, text),
        ValueType::Long => {
            let number = text.trim().parse::<i64>().map_err(|_| bad())?;
            out.push_str(itoa::Buffer::new().format(number));
        }
        ValueType::Bool => {
            let flag = text.trim().parse::<bool>().map_err(|_| bad())?;
            out.push_str(if flag { "true" } else { "false" });
        }
        ValueType::Ipaddr => push_ip(out, text.trim().parse().map_err(|_| bad())?),
    }
    Ok(())
}

/// A claim by name; `a.b` reads a nested object when there is no claim
/// named `a.b` itself.
fn claim<'v>(claims: &'v Value, name: &str) -> Option<&'v Value> {
    if let Some(value) = claims.get(name) {
        return Some(value);
    }
    let mut value = claims;
    for part in name.split('.') {
        value = value.get(part)?;
    }
    Some(value)
}

fn check_type(entity_type: &str, field: &str) -> Result<(), MappingConfigError> {
    entity_type
        .parse::<cedar_policy::EntityTypeName>()
        .map(|_| ())
        .map_err(|error| MappingConfigError::Invalid {
            field: field.into(),
            message: format!("`{entity_type}` is not an entity type: {error}"),
        })
}

fn compile_uid(
    index: usize,
    config: &UidTemplateConfig,
    captures: &[String],
    field: &str,
) -> Result<UidTemplate, MappingConfigError> {
    check_type(
        &config.entity_type,
        &format!("routes[{index}].{field}.type"),
    )?;
    let id = Template::parse(&config.id).map_err(|message| MappingConfigError::Invalid {
        field: format!("routes[{index}].{field}.id"),
        message,
    })?;
    check_vars(index, &config.id, &id, captures, &[])?;
    Ok(UidTemplate {
        entity_type: config.entity_type.clone(),
        id,
    })
}

fn check_vars(
    index: usize,
    text: &str,
    template: &Template,
    captures: &[String],
    extra: &[&str],
) -> Result<(), MappingConfigError> {
    for name in template.vars() {
        if !captures.iter().any(|c| c == name) && !extra.contains(&name) {
            return Err(MappingConfigError::UnknownCapture {
                route: index,
                template: text.into(),
                name: name.into(),
            });
        }
    }
    Ok(())
}

fn compile_route(index: usize, route: &RouteConfig) -> Result<Route, MappingConfigError> {
    let path_error = |message: String| MappingConfigError::Path {
        route: index,
        message,
    };
    if !route.path.starts_with('/') {
        return Err(path_error(format!("`{}` must start with `/`", route.path)));
    }
    let mut segments = Vec::new();
    let mut captures: Vec<String> = Vec::new();
    for segment in route.path.split('/').filter(|s| !s.is_empty()) {
        if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            if name.is_empty() || name.contains(['{', '}']) {
                return Err(path_error(format!("bad capture `{segment}`")));
            }
            if captures.iter().any(|c| c == name) {
                return Err(path_error(format!("capture `{name}` appears twice")));
            }
            captures.push(name.to_string());
            segments.push(Segment::Capture(name.to_string()));
        } else if segment.contains(['{', '}']) {
            return Err(path_error(format!(
                "`{segment}`: a capture must be a whole segment"
            )));
        } else if segment == "." || segment == ".." || segment.contains('%') {
            return Err(path_error(format!(
                "`{segment}`: templates are written normalised (no dot segments, no percent-encoding)"
            )));
        } else {
            segments.push(Segment::Literal(segment.to_string()));
        }
    }
    let host = match route.host.as_deref().map(str::to_ascii_lowercase) {
        None => HostMatch::Any,
        Some(host) if host == "*" => HostMatch::Any,
        Some(host) => match host.strip_prefix('*') {
            Some(suffix) if suffix.starts_with('.') => HostMatch::Suffix(suffix.to_string()),
            Some(_) => {
                return Err(MappingConfigError::Invalid {
                    field: format!("routes[{index}].host"),
                    message: format!("`{host}`: only `*.suffix` wildcards are supported"),
                });
            }
            None => HostMatch::Exact(host),
        },
    };
    let mut resource_attributes = BTreeMap::new();
    for (name, attribute) in &route.resource.attributes {
        let compiled = match attribute {
            AttributeTemplateConfig::String(text) => {
                let template =
                    Template::parse(text).map_err(|message| MappingConfigError::Invalid {
                        field: format!("routes[{index}].resource.attributes.{name}"),
                        message,
                    })?;
                check_vars(index, text, &template, &captures, &[])?;
                AttributeTemplate::String(template)
            }
            AttributeTemplateConfig::Entity(uid) => AttributeTemplate::Entity(compile_uid(
                index,
                uid,
                &captures,
                &format!("resource.attributes.{name}"),
            )?),
        };
        resource_attributes.insert(name.clone(), compiled);
    }
    let mut resource_parents = Vec::new();
    for parent in &route.resource.parents {
        resource_parents.push(compile_uid(index, parent, &captures, "resource.parents")?);
    }
    let mut headers = Vec::new();
    for (name, text) in &route.headers {
        let template = Template::parse(text).map_err(|message| MappingConfigError::Invalid {
            field: format!("routes[{index}].headers.{name}"),
            message,
        })?;
        check_vars(index, text, &template, &captures, &HEADER_VARS)?;
        headers.push((name.to_ascii_lowercase(), template));
    }
    Ok(Route {
        host,
        methods: route
            .methods
            .iter()
            .map(|m| m.to_ascii_uppercase())
            .collect(),
        segments,
        action: compile_uid(index, &route.action, &captures, "action")?,
        resource: compile_uid(
            index,
            &UidTemplateConfig {
                entity_type: route.resource.entity_type.clone(),
                id: route.resource.id.clone(),
            },
            &captures,
            "resource",
        )?,
        resource_attributes,
        resource_parents,
        headers,
        resource_merges: moka::sync::Cache::builder()
            .max_capacity(RESOURCE_MERGES_PER_ROUTE)
            .build_with_hasher(foldhash::fast::RandomState::default()),
    })
}

fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host.split_once(']').map_or(host, |(v6, _)| &v6[1..]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

// --- paths ------------------------------------------------------------------

/// A request target split into normalised path segments and decoded query
/// parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalisedTarget<'a> {
    pub segments: Vec<Cow<'a, str>>,
    pub query: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl NormalisedTarget<'_> {
    pub fn path(&self) -> String {
        let mut path = String::from("/");
        path.push_str(&self.segments.join("/"));
        path
    }
}

/// Normalises a request target (`:path`, query included): drops the
/// fragment, collapses duplicate slashes, percent-decodes each segment once,
/// and resolves `.` and `..` (also when encoded as `%2e`). A segment that
/// decodes to something containing `/`, `\` or NUL, or that is not UTF-8,
/// is refused.
pub fn normalise(target: &str) -> Result<NormalisedTarget<'_>, MappingError> {
    // One pass over the bytes finds the segments and whether any needs the
    // careful path (with `str::split` and the checks per segment this was
    // ~2,000 instructions for a four-segment path, now ~1,400, callgrind).
    // Every cut is at an ASCII byte, so every slice is on a char boundary.
    let bytes = target.as_bytes();
    let end = bytes
        .iter()
        .position(|&byte| matches!(byte, b'?' | b'#'))
        .unwrap_or(bytes.len());
    let query = match bytes.get(end) {
        Some(b'?') => {
            let rest = target.get(end + 1..).unwrap_or_default();
            rest.split_once('#').map_or(rest, |(before, _)| before)
        }
        _ => "",
    };
    let path = target.get(..end).unwrap_or_default();
    if !path.starts_with('/') {
        return Err(MappingError::Unmappable(format!(
            "the path `{path}` does not start with `/`"
        )));
    }
    let mut segments: Vec<Cow<'_, str>> = Vec::with_capacity(8);
    let mut start = 1;
    let mut careful = false;
    let mut segment_ends = |index: usize, careful: bool| -> Result<(), MappingError> {
        let raw = path.get(start..index).unwrap_or_default();
        start = index + 1;
        if careful {
            push_careful_segment(&mut segments, raw)
        } else {
            // Nothing to decode or resolve (the common case): borrowed;
            // empty (a duplicate slash): skipped.
            if !raw.is_empty() {
                segments.push(Cow::Borrowed(raw));
            }
            Ok(())
        }
    };
    for (index, &byte) in path.as_bytes().iter().enumerate().skip(1) {
        if byte == b'/' {
            segment_ends(index, careful)?;
            careful = false;
        } else {
            // `%` needs decoding; `.` may make a dot segment; `\` and NUL
            // are refused.
            careful |= matches!(byte, b'%' | b'.' | b'\\' | b'\0');
        }
    }
    segment_ends(path.len(), careful)?;
    let mut params = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        params.push((decode_query(key)?, decode_query(value)?));
    }
    Ok(NormalisedTarget {
        segments,
        query: params,
    })
}

/// A segment that may need decoding, may be a dot segment, or may hold a
/// byte that is refused.
fn push_careful_segment<'a>(
    segments: &mut Vec<Cow<'a, str>>,
    raw: &'a str,
) -> Result<(), MappingError> {
    let segment = if raw.as_bytes().contains(&b'%') {
        let bytes = percent_decode(raw.as_bytes(), false)
            .ok_or_else(|| MappingError::Unmappable(format!("bad percent-encoding in `{raw}`")))?;
        Cow::Owned(
            String::from_utf8(bytes)
                .map_err(|_| MappingError::Unmappable(format!("`{raw}` is not UTF-8")))?,
        )
    } else {
        Cow::Borrowed(raw)
    };
    if segment
        .bytes()
        .any(|byte| matches!(byte, b'/' | b'\\' | b'\0'))
    {
        return Err(MappingError::Unmappable(format!(
            "the segment `{raw}` encodes a separator or NUL"
        )));
    }
    match segment.as_ref() {
        "." => {}
        ".." => {
            segments.pop();
        }
        _ => segments.push(segment),
    }
    Ok(())
}

/// A query key or value, decoded (`+` is a space); borrowed when there is
/// nothing to decode.
fn decode_query(text: &str) -> Result<Cow<'_, str>, MappingError> {
    if !text.bytes().any(|byte| matches!(byte, b'%' | b'+')) {
        return Ok(Cow::Borrowed(text));
    }
    percent_decode(text.as_bytes(), true)
        .map(|bytes| Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()))
        .ok_or_else(|| {
            MappingError::Unmappable(format!("bad percent-encoding in the query `{text}`"))
        })
}

fn percent_decode(input: &[u8], plus_is_space: bool) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'%' => {
                let hex = input.get(i + 1..i + 3)?;
                let text = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(text, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(path: &str) -> Vec<String> {
        normalise(path)
            .unwrap()
            .segments
            .into_iter()
            .map(Cow::into_owned)
            .collect()
    }

    #[test]
    fn normalisation() {
        assert_eq!(segments("/documents/../admin"), ["admin"]);
        assert_eq!(segments("//documents///x/"), ["documents", "x"]);
        assert_eq!(segments("/documents/%2e%2E/admin"), ["admin"]);
        assert_eq!(segments("/a/./b/%41?x=1"), ["a", "b", "A"]);
        assert_eq!(segments("/../../etc"), ["etc"]);
        assert_eq!(segments("/doc%20one"), ["doc one"]);
        assert!(normalise("/a%2Fb").is_err());
        assert!(normalise("/a%5Cb").is_err());
        assert!(normalise("/a%00").is_err());
        assert!(normalise("/a%zz").is_err());
        assert!(normalise("/a%").is_err());
        assert!(normalise("/%ff").is_err());
        assert!(normalise("relative").is_err());
        let target = normalise("/x?a=1&b=two+words&c=%26&a=2#frag").unwrap();
        // Undecoded keys and values are borrowed from the path.
        assert!(matches!(
            target.query[0],
            (Cow::Borrowed(_), Cow::Borrowed(_))
        ));
        assert!(matches!(target.query[1].1, Cow::Owned(_)));
        assert!(matches!(target.segments[0], Cow::Borrowed("x")));
        let query: Vec<(String, String)> = target
            .query
            .into_iter()
            .map(|(key, value)| (key.into_owned(), value.into_owned()))
            .collect();
        assert_eq!(
            query,
            [
                ("a".to_string(), "1".to_string()),
                ("b".into(), "two words".into()),
                ("c".into(), "&".into()),
                ("a".into(), "2".into())
            ]
        );
    }

    /// Segments and query parameters, owned.
    type Normalised = (Vec<String>, Vec<(String, String)>);

    /// The split-based normalisation the one-pass [`normalise`] replaced,
    /// kept as the reference it must agree with.
    fn reference(target: &str) -> Result<Normalised, ()> {
        let target = target.split_once('#').map_or(target, |(before, _)| before);
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if !path.starts_with('/') {
            return Err(());
        }
        let mut segments = Vec::new();
        for raw in path.split('/').filter(|raw| !raw.is_empty()) {
            let segment = if raw.contains('%') {
                String::from_utf8(percent_decode(raw.as_bytes(), false).ok_or(())?)
                    .map_err(|_| ())?
            } else {
                raw.to_owned()
            };
            if segment.contains(['/', '\\', '\0']) {
                return Err(());
            }
            match segment.as_str() {
                "." => {}
                ".." => {
                    segments.pop();
                }
                _ => segments.push(segment),
            }
        }
        let mut params = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |text| decode_query(text).map(Cow::into_owned).map_err(|_| ());
            params.push((decode(key)?, decode(value)?));
        }
        Ok((segments, params))
    }

    #[test]
    fn one_pass_normalisation_agrees_with_the_split_reference_on_every_short_path() {
        let alphabet = [
            "/", "a", ".", "%", "2", "e", "F", "?", "#", "\\", "\0", "é", "&", "=", "+",
        ];
        let mut paths = vec![String::new()];
        let mut checked = 0;
        for _ in 0..5 {
            let mut longer = Vec::with_capacity(paths.len() * alphabet.len());
            for path in &paths {
                for piece in alphabet {
                    longer.push(format!("{path}{piece}"));
                }
            }
            for path in &longer {
                for target in [format!("/{path}"), path.clone()] {
                    let ours = normalise(&target)
                        .map(|t| {
                            let owned = |(key, value): (Cow<'_, str>, Cow<'_, str>)| {
                                (key.into_owned(), value.into_owned())
                            };
                            (
                                t.segments.into_iter().map(Cow::into_owned).collect(),
                                t.query.into_iter().map(owned).collect(),
                            )
                        })
                        .map_err(|_| ());
                    assert_eq!(ours, reference(&target), "{target:?}");
                    checked += 1;
                }
            }
            paths = longer;
        }
        assert!(checked > 1_000_000, "{checked}");
    }

    #[test]
    fn templates() {
        let t = Template::parse("{tenant}/{id}.x").unwrap();
        let out = t.render(|name| match name {
            "tenant" => Some("acme"),
            "id" => Some("7"),
            _ => None,
        });
        assert_eq!(out.as_deref(), Some("acme/7.x"));
        assert!(Template::parse("{a").is_err());
        assert!(Template::parse("a}").is_err());
        assert!(Template::parse("{}").is_err());
    }

    #[test]
    fn hosts() {
        assert_eq!(host_without_port("Example.com:8080"), "Example.com");
        assert_eq!(host_without_port("[::1]:443"), "::1");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert!(HostMatch::Suffix(".example.com".into()).matches("a.example.com"));
        assert!(!HostMatch::Suffix(".example.com".into()).matches("example.com"));
    }

    fn mapping(context: &str) -> Result<Mapping, MappingConfigError> {
        let text = format!(
            r#"
            [principal]
            source = "jwt_authn"
            type = "Saas::User"
            attributes = [{{ claim = "tenant", attribute = "tenant", entity_type = "Saas::Tenant" }}]
            parents = [{{ claim = "roles", entity_type = "Saas::Role" }}]
            {context}
            "#
        );
        let config: ExtAuthzConfig = toml::from_str(&text).unwrap();
        Mapping::compile(&config)
    }

    #[test]
    fn context_is_written_in_field_order_with_defaults_and_types() {
        let mapping = mapping(
            r#"
            [[context]]
            name = "source_ip"
            from = "source_ip"
            [[context]]
            name = "absent"
            from = "header"
            key = "X-Missing"
            [[context]]
            name = "mfa"
            from = "claim"
            key = "mfa"
            default = false
            [[context]]
            name = "level"
            from = "claim"
            key = "auth.level"
            [[context]]
            name = "retries"
            from = "header"
            key = "X-Retries"
            as = "long"
            [[context]]
            name = "note"
            from = "query"
            key = "note"
            [[context]]
            name = "fixed"
            from = "value"
            value = { a = [1, "two"] }
            [[context]]
            name = "tls"
            from = "tls"
            [[context]]
            name = "time"
            from = "request_time"
            "#,
        )
        .unwrap();
        let claims = serde_json::json!({"sub": "carol", "auth": {"level": 2}});
        let mapped = mapping.map_claims(&claims).unwrap();
        let headers = Headers::from_pairs([("x-retries", " 3 ")]);
        let query = [(Cow::Borrowed("note"), Cow::Borrowed("say \"hi\"\n"))];
        let facts = RequestFacts {
            source_ip: Some("10.1.2.3".parse().unwrap()),
            request_time: Some(1_700_000_000),
            tls: true,
            headers: Some(&headers),
            query: &query,
            claims: Some(&mapped),
        };
        let text = mapping.context(&facts).unwrap();
        assert_eq!(
            text,
            r#"{"source_ip":{"__extn":{"fn":"ip","arg":"10.1.2.3"}},"mfa":false,"level":2,"retries":3,"note":"say \"hi\"\n","fixed":{"a":[1,"two"]},"tls":true,"time":1700000000}"#
        );
        // It is JSON, equal to what a `Value` would print.
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value.to_string(), text);

        // Nothing but the first field present: no stray commas.
        let facts = RequestFacts {
            source_ip: Some("::1".parse().unwrap()),
            ..RequestFacts::default()
        };
        let text = mapping.context(&facts).unwrap();
        assert_eq!(
            text,
            r#"{"source_ip":{"__extn":{"fn":"ip","arg":"::1"}},"mfa":false,"fixed":{"a":[1,"two"]},"tls":false}"#
        );
        // A header that is not of its declared type fails the mapping.
        let headers = Headers::from_pairs([("x-retries", "many")]);
        let facts = RequestFacts {
            headers: Some(&headers),
            ..RequestFacts::default()
        };
        assert!(matches!(
            mapping.context(&facts),
            Err(MappingError::Unmappable(message)) if message.contains("`many`")
        ));
    }

    #[test]
    fn a_context_name_given_twice_is_refused() {
        let error = mapping(
            r#"
            [[context]]
            name = "mfa"
            from = "claim"
            key = "mfa"
            [[context]]
            name = "mfa"
            from = "tls"
            "#,
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("context `mfa`") && error.to_string().contains("twice"),
            "{error}"
        );
    }

    #[test]
    fn claims_map_to_the_principal_once_for_all_requests() {
        let mapping = mapping("").unwrap();
        let claims = serde_json::json!({"sub": "carol", "tenant": "acme", "roles": ["a", "b"]});
        let mapped = mapping.map_claims(&claims).unwrap();
        assert_eq!(mapped.uid, EntityRef::new("Saas::User", "carol"));
        let merge = mapped.merge.merge();
        assert_eq!(
            merge.attrs["tenant"],
            serde_json::json!({"__entity": {"type": "Saas::Tenant", "id": "acme"}})
        );
        assert_eq!(
            merge.parents,
            [
                EntityRef::new("Saas::Role", "a"),
                EntityRef::new("Saas::Role", "b")
            ]
        );
        assert!(matches!(
            mapping.map_claims(&serde_json::json!({"tenant": "acme"})),
            Err(MappingError::InvalidCredentials(_))
        ));
        assert!(matches!(
            mapping.map_claims(&serde_json::json!({"sub": "c", "roles": 7})),
            Err(MappingError::InvalidCredentials(_))
        ));
    }
}
