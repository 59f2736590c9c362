//! `envoy.service.auth.v3.Authorization/Check`: Envoy's (and Istio's)
//! external authorizer, answered with Cedar decisions.
//!
//! One call: the HTTP attributes are mapped by the compiled [`Mapping`]
//! (route → action and resource, principal source → principal and its
//! request-scoped attributes, context fields), the engine decides with
//! [`Engine::check_with`], and the decision becomes an `OkHttpResponse` or a
//! `DeniedHttpResponse`.
//!
//! Invariants:
//! - fail closed: a mapping failure, a missing or invalid credential, an
//!   unmatched route (unless `unmatched = "allow"`), a malformed Cedar request
//!   and an evaluation error that `on_evaluation_error` turns into a deny (by
//!   default an erroring forbid) all deny; a well-formed `CheckRequest` never
//!   gets a gRPC error, always an HTTP answer for Envoy to send;
//! - deny bodies carry the decision id and a fixed reason word, never
//!   internal details (those go to the debug log with the decision id);
//! - headers Arbiter adds upstream overwrite any the client sent.

pub mod answer;
pub mod claims;
pub mod grpc;
pub mod jwt;
pub mod mapping;
pub mod wire;

use std::net::IpAddr;
use std::sync::Arc;

use envoy_types::pb::google::protobuf::{Value as PbValue, value::Kind};
use serde_json::Value;

pub use answer::Answer;
use answer::MetadataValue;
pub use grpc::AuthorizationServer;
pub use jwt::{JwksError, JwtConfig, JwtVerifier};
pub use mapping::{ExtAuthzConfig, Mapping, MappingConfigError, MappingError, normalise};
pub use wire::{AddressView, AttributesView, CheckView, Headers, HttpView, WireError};

use crate::decision_log::{Caller, DecisionEvent, DecisionLogger, LoggedHeaders, Transport, Uid};
use crate::engine::{CheckInput, Decision, Engine, EntityRef, RequestEntities, UidInput};
use crate::telemetry::DecisionMetrics;
use claims::ClaimsMapping;
use mapping::{PrincipalSource, RequestFacts, Unmatched};

/// The gRPC service name, for health checks.
pub const SERVICE_NAME: &str = "envoy.service.auth.v3.Authorization";

// gRPC codes in `CheckResponse.status`, as Envoy reads them.
const PERMISSION_DENIED: i32 = 7;
const UNAUTHENTICATED: i32 = 16;

/// An `[ext_authz]` table that cannot be built into a service.
#[derive(Debug, thiserror::Error)]
pub enum ExtAuthzError {
    #[error(transparent)]
    Mapping(#[from] MappingConfigError),
    #[error("`ext_authz.principal.jwt`: {0}")]
    Jwks(#[from] JwksError),
}

/// Serves `Check` from the engine's current snapshot.
#[derive(Debug, Clone)]
pub struct ExtAuthzService {
    engine: Arc<Engine>,
    metrics: Arc<DecisionMetrics>,
    mapping: Arc<Mapping>,
    jwt: Option<Arc<JwtVerifier>>,
    jwt_header: String,
    log: DecisionLogger,
}

impl ExtAuthzConfig {
    /// Compiles the mapping and, for source `jwt`, loads the keys and starts
    /// their refresh (so this must run inside a Tokio runtime).
    pub fn build(
        &self,
        engine: Arc<Engine>,
        metrics: Arc<DecisionMetrics>,
    ) -> Result<ExtAuthzService, ExtAuthzError> {
        let mapping = Mapping::compile(self)?;
        let (jwt, jwt_header) = match (&self.principal.source, &self.principal.jwt) {
            (PrincipalSource::Jwt, Some(config)) => {
                let verifier = JwtVerifier::build(config)?;
                verifier.spawn_refresh();
                let header = verifier.header();
                (Some(verifier), header)
            }
            _ => (None, String::new()),
        };
        Ok(ExtAuthzService {
            engine,
            metrics,
            mapping: Arc::new(mapping),
            jwt,
            jwt_header,
            log: DecisionLogger::disabled(),
        })
    }
}

/// The principal of one request.
struct Principal {
    uid: EntityRef,
    /// What its claims mapped to, when it came from a JWT.
    claims: Option<Arc<ClaimsMapping>>,
}

/// What one ext_authz call decided, with what the decision log needs:
/// it becomes a decision-log record with transport `ext_authz`. It owns
/// what the call built (the decision, the uids, the context), so the record
/// takes them over instead of copying them.
#[derive(Debug)]
pub struct Decided<'a> {
    /// The id of a request refused before evaluation (the engine's
    /// decision carries its own).
    pub refused_id: String,
    pub allowed: bool,
    /// The engine's decision, when the request got that far.
    pub decision: Option<Decision>,
    pub principal: Option<EntityRef>,
    pub action: Option<EntityRef>,
    pub resource: Option<EntityRef>,
    /// Why the request was denied before evaluation (mapping, credentials).
    pub mapping_error: Option<MappingError>,
    /// The caller as Envoy saw it (`source` address).
    pub peer: Option<&'a str>,
    /// `peer`, when it is an IP address.
    pub source_ip: Option<IpAddr>,
    /// The downstream's mTLS identity as Envoy verified it (`source.principal`).
    pub source_principal: Option<&'a str>,
    /// Who sent the `CheckRequest` (Envoy), as the transport knows it.
    pub transport: &'a Caller,
    /// W3C trace context of the HTTP request.
    pub traceparent: Option<&'a str>,
    /// The Cedar context built for the request, when it got that far.
    pub context_json: Option<String>,
}

impl Decided<'_> {
    pub fn decision_id(&self) -> &str {
        self.decision
            .as_ref()
            .map_or(&self.refused_id, |decision| &decision.decision_id)
    }
}

impl ExtAuthzService {
    pub fn into_server(self) -> AuthorizationServer {
        AuthorizationServer::new(self)
    }

    /// Every decision (a refusal before evaluation too) becomes a
    /// decision-log record with transport `ext_authz`.
    pub fn with_decision_log(mut self, log: DecisionLogger) -> Self {
        self.log = log;
        self
    }

    /// Every decision passes here once, and from here to the decision log.
    async fn decided(&self, decided: Decided<'_>, headers: Option<&Headers<'_>>) {
        self.trace(&decided);
        if !self.log.is_enabled() {
            return;
        }
        // Its fields are moved out one by one (it has no `Drop`).
        let decision = match decided.decision {
            Some(decision) => decision,
            None => {
                // Refused before evaluation (credentials, mapping): still a
                // decision, a deny, with the reason as its error.
                let snapshot = self.engine.snapshot();
                let revision = |pick: fn(&crate::engine::Snapshot) -> Arc<str>| {
                    snapshot.as_deref().map_or_else(|| Arc::from(""), pick)
                };
                Decision {
                    allowed: decided.allowed,
                    reasons: Vec::new(),
                    errors: decided
                        .mapping_error
                        .map(|error| crate::engine::PolicyEvaluationError {
                            policy_id: "<ext_authz mapping>".into(),
                            message: error.to_string(),
                        })
                        .into_iter()
                        .collect(),
                    decision_id: decided.refused_id,
                    policy_revision: revision(|s| s.policies.revision.clone()),
                    data_revision: revision(|s| s.data.revision.clone()),
                    elapsed: std::time::Duration::ZERO,
                    cached: false,
                    slice: crate::engine::SliceUse::None,
                    request_entities: Vec::new(),
                }
            }
        };
        let uid = |entity: Option<EntityRef>| {
            entity.map(|entity| Uid {
                type_name: entity.type_name,
                id: entity.id,
            })
        };
        let mut event = DecisionEvent::new(Transport::ExtAuthz, decision);
        event.principal = uid(decided.principal);
        event.action = uid(decided.action);
        event.resource = uid(decided.resource);
        // Envoy's view of the downstream client: an IP (its port travels
        // separately), or a pipe path for a Unix-socket listener.
        let peer_address = decided
            .source_ip
            .map(|ip| std::net::SocketAddr::from((ip, 0)))
            .or_else(|| decided.peer.and_then(|peer| peer.parse().ok()));
        // The HTTP client as Envoy saw it; where Envoy knows nothing, the
        // transport's view of Envoy itself.
        event.caller = Caller {
            uds_peer: decided
                .peer
                .filter(|_| peer_address.is_none())
                .map(str::to_owned)
                .or_else(|| decided.transport.uds_peer.clone()),
            peer_address: peer_address.or(decided.transport.peer_address),
            tls_identity: decided
                .source_principal
                .map(str::to_owned)
                .or_else(|| decided.transport.tls_identity.clone()),
        };
        event.traceparent = decided.traceparent.map(str::to_owned);
        // What the policies saw; redacted on the pipeline thread.
        event.context_json = decided.context_json.unwrap_or_default();
        // Secrets among them (authorization, cookies) are dropped by the
        // redactor before the record leaves the process.
        // Only the headers `decision_log.headers` names are copied.
        event.headers = headers
            .map(|headers| match self.log.logged_headers() {
                LoggedHeaders::All => headers.select(|_| true),
                // A few names: looked up, not matched against every header.
                LoggedHeaders::Named(names) => names
                    .iter()
                    .filter_map(|name| Some((name.clone(), headers.get(name)?.to_owned())))
                    .collect(),
            })
            .unwrap_or_default();
        self.log.log(event).await;
    }

    fn trace(&self, decided: &Decided<'_>) {
        tracing::debug!(
            decision_id = decided.decision_id(),
            allowed = decided.allowed,
            principal = ?decided.principal,
            action = ?decided.action,
            resource = ?decided.resource,
            error = decided.mapping_error.as_ref().map(tracing::field::display),
            peer = decided.peer,
            "ext_authz decision"
        );
    }

    /// The answer to one `CheckRequest` from `transport` (the caller as the
    /// connection knows it; only logged); never fails.
    pub async fn answer(&self, request: &CheckView<'_>, transport: &Caller) -> Answer {
        let attributes = request.attributes.as_ref();
        let source = attributes.and_then(|a| a.source.as_ref());
        let peer = source.and_then(|source| match source.address? {
            AddressView::Socket(address) | AddressView::Pipe(address) => Some(address),
            AddressView::Internal => None,
        });
        // Parsed once: the context's `source_ip` and the record's caller.
        let source_ip = source.and_then(|source| match source.address? {
            AddressView::Socket(address) => address.parse::<IpAddr>().ok(),
            _ => None,
        });
        let source_principal = source
            .map(|source| source.principal)
            .filter(|principal| !principal.is_empty());
        let http = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let headers = http.map(|http| &http.headers);
        let traceparent = headers.and_then(|h| h.get("traceparent"));

        let mut principal_uid = None;
        let mut action = None;
        let mut resource = None;
        let outcome = self
            .evaluate(
                attributes,
                http,
                source_ip,
                &mut principal_uid,
                &mut action,
                &mut resource,
            )
            .await;
        let (response, refused_id) = match &outcome {
            Ok(Evaluated::Decision(decision, route_headers, _)) => {
                self.metrics.record(decision);
                let response = if decision.allowed {
                    self.allow(
                        &decision.decision_id,
                        route_headers,
                        decision,
                        principal_uid.as_ref(),
                    )
                } else {
                    self.deny(&decision.decision_id, Denial::Forbidden)
                };
                (response, String::new())
            }
            Ok(Evaluated::UnmatchedAllow) => {
                let id = uuid::Uuid::now_v7().to_string();
                (self.allow_unmatched(&id), id)
            }
            Err(error) => {
                self.metrics.record_rejected();
                let id = uuid::Uuid::now_v7().to_string();
                let denial = match error {
                    Failure::Mapping(MappingError::MissingCredentials(_)) => Denial::Missing,
                    Failure::Mapping(MappingError::InvalidCredentials(_)) => Denial::Invalid,
                    Failure::Mapping(MappingError::HeadersTooLarge { .. }) => Denial::TooLarge,
                    Failure::Mapping(MappingError::Unmappable(_)) | Failure::Engine(_) => {
                        Denial::Forbidden
                    }
                };
                (self.deny(&id, denial), id)
            }
        };
        let (decision, context_json, mapping_error) = match outcome {
            Ok(Evaluated::Decision(decision, _, context)) => (Some(decision), Some(context), None),
            Ok(Evaluated::UnmatchedAllow) => (None, None, None),
            Err(Failure::Mapping(error)) => (None, None, Some(error)),
            Err(Failure::Engine(error)) => {
                tracing::debug!(
                    decision_id = refused_id,
                    %error,
                    "ext_authz request refused by the engine"
                );
                (None, None, None)
            }
        };
        let decided = Decided {
            refused_id,
            allowed: response.allowed(),
            decision,
            principal: principal_uid,
            action,
            resource,
            mapping_error,
            peer,
            source_ip,
            source_principal,
            transport,
            traceparent,
            context_json,
        };
        self.decided(decided, headers).await;
        response
    }

    async fn evaluate(
        &self,
        attributes: Option<&AttributesView<'_>>,
        http: Option<&HttpView<'_>>,
        source_ip: Option<IpAddr>,
        principal_uid: &mut Option<EntityRef>,
        action_out: &mut Option<EntityRef>,
        resource_out: &mut Option<EntityRef>,
    ) -> Result<Evaluated, Failure> {
        let mapping = &*self.mapping;
        let (Some(attributes), Some(http)) = (attributes, http) else {
            return Err(MappingError::Unmappable("no HTTP request attributes".into()).into());
        };
        let headers = &http.headers;
        let size = headers.received_bytes();
        if size > mapping.max_header_bytes {
            return Err(MappingError::HeadersTooLarge {
                size,
                limit: mapping.max_header_bytes,
            }
            .into());
        }
        let target = normalise(http.path)?;
        let host = if http.host.is_empty() {
            headers
                .get(":authority")
                .or_else(|| headers.get("host"))
                .unwrap_or("")
        } else {
            http.host
        };
        let Some(matched) = mapping.route(host, http.method, &target.segments) else {
            return match mapping.unmatched {
                Unmatched::Allow => Ok(Evaluated::UnmatchedAllow),
                Unmatched::Deny => Err(MappingError::Unmappable(format!(
                    "no route for {} {}",
                    http.method,
                    target.path()
                ))
                .into()),
            };
        };
        // Kept by the caller for the answer and the decision log (which
        // names the route's action and resource also when credentials are
        // refused): built once, borrowed here.
        let action = &*action_out.insert(matched.action()?);
        let resource = &*resource_out.insert(matched.resource()?);
        let principal = self.principal(attributes, headers).await?;
        let claims = principal.claims;
        let principal = &*principal_uid.insert(principal.uid);
        let resource_merge = matched.sealed_resource_merge(resource)?;

        let facts = RequestFacts {
            source_ip,
            request_time: attributes.request.as_ref().and_then(|r| r.time_seconds),
            tls: attributes.tls_session
                || attributes
                    .source
                    .as_ref()
                    .is_some_and(|peer| !peer.principal.is_empty())
                || http.scheme.eq_ignore_ascii_case("https"),
            headers: Some(headers),
            query: &target.query,
            claims: claims.as_deref(),
        };
        let context = mapping.context(&facts)?;
        let mut scope = RequestEntities::default();
        if let Some(claims) = &claims {
            scope.push_sealed(claims.merge.clone());
        }
        if let Some(merge) = resource_merge {
            scope.push_sealed(merge);
        }
        let input = CheckInput {
            principal: Some(UidInput {
                type_name: &principal.type_name,
                id: &principal.id,
            }),
            action: Some(UidInput {
                type_name: &action.type_name,
                id: &action.id,
            }),
            resource: Some(UidInput {
                type_name: &resource.type_name,
                id: &resource.id,
            }),
            context_json: &context,
            entities_json: "",
        };
        let decision = self
            .engine
            .check_with(&input, &scope)
            .map_err(|error| Failure::Engine(error.to_string()))?;
        let route_headers = matched
            .route
            .headers
            .iter()
            .filter_map(|(name, template)| {
                let value = template.render(|var| match var {
                    "principal.type" => Some(principal.type_name.as_str()),
                    "principal.id" => Some(principal.id.as_str()),
                    "decision_id" => Some(decision.decision_id.as_str()),
                    other => matched.capture(other),
                })?;
                Some((name.clone(), value))
            })
            .collect();
        Ok(Evaluated::Decision(decision, route_headers, context))
    }

    async fn principal(
        &self,
        attributes: &AttributesView<'_>,
        headers: &Headers<'_>,
    ) -> Result<Principal, MappingError> {
        let mapping = &*self.mapping;
        let config = &mapping.principal;
        let plain = |id: &str| Principal {
            uid: EntityRef::new(config.entity_type.clone(), id),
            claims: None,
        };
        match config.source {
            PrincipalSource::Mtls => {
                let id = attributes.source.as_ref().map_or("", |peer| peer.principal);
                if id.is_empty() {
                    return Err(MappingError::MissingCredentials(
                        "no mTLS peer identity".into(),
                    ));
                }
                Ok(plain(id))
            }
            PrincipalSource::Header => {
                // Lower-cased by `Mapping::compile`.
                let name = config.header.as_deref().unwrap_or_default();
                match headers.get(name) {
                    Some(id) if !id.is_empty() => Ok(plain(id)),
                    _ => Err(MappingError::MissingCredentials(format!(
                        "no `{name}` header"
                    ))),
                }
            }
            PrincipalSource::JwtAuthn => {
                let metadata = attributes.metadata_context().map_err(|error| {
                    MappingError::Unmappable(format!("malformed metadata_context: {error}"))
                })?;
                let claims = metadata
                    .as_ref()
                    .and_then(|m| m.filter_metadata.get(&config.metadata_filter))
                    .and_then(|s| s.fields.get(&config.metadata_key))
                    .map(pb_to_json)
                    .filter(Value::is_object)
                    .ok_or_else(|| {
                        MappingError::MissingCredentials(format!(
                            "no `{}` in the `{}` metadata",
                            config.metadata_key, config.metadata_filter
                        ))
                    })?;
                let mapped = Arc::new(mapping.map_claims(&claims)?);
                Ok(Principal {
                    uid: mapped.uid.clone(),
                    claims: Some(mapped),
                })
            }
            PrincipalSource::Jwt => {
                let Some(verifier) = &self.jwt else {
                    return Err(MappingError::Unmappable("no JWT verifier".into()));
                };
                let value = headers.get(&self.jwt_header).ok_or_else(|| {
                    MappingError::MissingCredentials(format!("no `{}` header", self.jwt_header))
                })?;
                let token = value
                    .split_once(' ')
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                    .map(|(_, token)| token.trim())
                    .filter(|token| !token.is_empty())
                    .ok_or_else(|| MappingError::MissingCredentials("no bearer token".into()))?;
                let verified = verifier
                    .verify(token)
                    .await
                    .map_err(|error| MappingError::InvalidCredentials(error.to_string()))?;
                // Mapped once per cached token.
                let mapped = verified
                    .mapped
                    .get_or_init(|| mapping.map_claims(&verified.claims).map(Arc::new))
                    .clone()?;
                Ok(Principal {
                    uid: mapped.uid.clone(),
                    claims: Some(mapped),
                })
            }
        }
    }

    fn allow(
        &self,
        id: &str,
        route_headers: &[(String, String)],
        decision: &Decision,
        principal: Option<&EntityRef>,
    ) -> Answer {
        let headers = std::iter::once((self.mapping.decision_header.as_str(), id)).chain(
            route_headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str())),
        );
        // `Type::"id"`, without the formatting machinery (~1,200
        // instructions per allow, callgrind).
        let principal_text = principal.map(|principal| {
            let mut text =
                String::with_capacity(principal.type_name.len() + principal.id.len() + 4);
            text.push_str(&principal.type_name);
            text.push_str("::\"");
            text.extend(principal.id.escape_default());
            text.push('"');
            text
        });
        let metadata = [
            ("decision_id", MetadataValue::String(id)),
            ("policies", MetadataValue::Strings(&decision.reasons)),
            (
                "principal",
                MetadataValue::String(principal_text.as_deref().unwrap_or_default()),
            ),
        ];
        // `principal` only when there is one.
        let count = if principal_text.is_some() { 3 } else { 2 };
        answer::ok(headers, &metadata[..count])
    }

    fn allow_unmatched(&self, id: &str) -> Answer {
        answer::ok(
            [(self.mapping.decision_header.as_str(), id)],
            &[("decision_id", MetadataValue::String(id))],
        )
    }

    fn deny(&self, id: &str, denial: Denial) -> Answer {
        let (http, grpc, reason) = match denial {
            Denial::Forbidden => (403, PERMISSION_DENIED, "forbidden"),
            Denial::Missing => (401, UNAUTHENTICATED, "unauthenticated"),
            Denial::Invalid => (401, UNAUTHENTICATED, "invalid_credentials"),
            Denial::TooLarge => (431, PERMISSION_DENIED, "headers_too_large"),
        };
        let challenge = (http == 401).then(|| {
            let scheme = match self.mapping.principal.source {
                PrincipalSource::Jwt | PrincipalSource::JwtAuthn => "Bearer",
                PrincipalSource::Mtls => "Mutual",
                PrincipalSource::Header => "Gateway",
            };
            let realm = self.mapping.realm.replace(['"', '\\'], "");
            match denial {
                Denial::Invalid if scheme == "Bearer" => {
                    format!("Bearer realm=\"{realm}\", error=\"invalid_token\"")
                }
                _ => format!("{scheme} realm=\"{realm}\""),
            }
        });
        let headers = [
            ("content-type", "application/json"),
            (self.mapping.decision_header.as_str(), id),
        ]
        .into_iter()
        .chain(
            challenge
                .as_deref()
                .map(|challenge| ("www-authenticate", challenge)),
        );
        let body = serde_json::json!({"decision_id": id, "decision": "deny", "reason": reason})
            .to_string();
        answer::denied(
            answer::Denied {
                grpc_code: grpc,
                grpc_message: reason,
                http_status: http,
                body: &body,
            },
            headers,
            &[("decision_id", MetadataValue::String(id))],
        )
    }
}

enum Evaluated {
    /// The decision, the route's response headers, and the Cedar context
    /// the policies saw (for the decision log).
    Decision(Decision, Vec<(String, String)>, String),
    UnmatchedAllow,
}

enum Failure {
    Mapping(MappingError),
    Engine(String),
}

impl From<MappingError> for Failure {
    fn from(error: MappingError) -> Self {
        Failure::Mapping(error)
    }
}

#[derive(Debug, Clone, Copy)]
enum Denial {
    Forbidden,
    Missing,
    Invalid,
    TooLarge,
}

/// A `google.protobuf.Value` as JSON (`jwt_authn` claims arrive this way).
fn pb_to_json(value: &PbValue) -> Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(list)) => Value::Array(list.values.iter().map(pb_to_json).collect()),
        Some(Kind::StructValue(s)) => Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), pb_to_json(v)))
                .collect(),
        ),
    }
}
