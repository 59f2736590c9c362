//! The decision record: [`DecisionEvent`] is what an adapter hands over on
//! the decision path (owned strings moved out of the request, no parsing,
//! no serialization); [`encode`] turns it into the redacted JSON line on the
//! pipeline thread. The JSON form is documented in the README and mirrors
//! `arbiter.v1.DecisionLogRecord` in `proto/arbiter/v1/decision_log.proto`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use super::redact::Redactor;
use crate::engine::Decision;

/// The API a decision arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `arbiter.v1.Authorizer` (`Check` and each item of `CheckBatch`).
    Grpc,
    /// Envoy's `envoy.service.auth.v3.Authorization/Check`.
    ExtAuthz,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::ExtAuthz => "ext_authz",
        }
    }
}

/// An entity uid as the caller sent it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Uid {
    #[serde(rename = "type")]
    pub type_name: String,
    pub id: String,
}

/// Who asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// TCP peer address.
    pub peer_address: Option<SocketAddr>,
    /// mTLS identity of the peer (SPIFFE id or subject), when TLS is terminated here.
    pub tls_identity: Option<String>,
    /// Unix-domain-socket peer (e.g. `pid=12 uid=1000`), when served on a UDS.
    pub uds_peer: Option<String>,
}

/// One decision as an adapter hands it to [`super::DecisionLogger::log`].
/// Building it must stay cheap: move strings out of the request, copy the
/// `traceparent` header, take the time; everything else (trace id parsing,
/// context parsing, redaction, hashing, JSON) happens on the pipeline thread.
#[derive(Debug, Clone)]
pub struct DecisionEvent {
    pub timestamp: SystemTime,
    pub transport: Transport,
    pub principal: Option<Uid>,
    pub action: Option<Uid>,
    pub resource: Option<Uid>,
    /// The request's context as the caller sent it (Cedar JSON; "" = `{}`).
    pub context_json: String,
    /// Request headers (ext_authz); secrets among them are never logged.
    pub headers: Vec<(String, String)>,
    pub decision: Decision,
    pub caller: Caller,
    /// The incoming W3C `traceparent` header, unparsed.
    pub traceparent: Option<String>,
}

impl DecisionEvent {
    /// An event for `decision`, stamped now, with nothing else filled in.
    pub fn new(transport: Transport, decision: Decision) -> Self {
        DecisionEvent {
            timestamp: SystemTime::now(),
            transport,
            principal: None,
            action: None,
            resource: None,
            context_json: String::new(),
            headers: Vec::new(),
            decision,
            caller: Caller::default(),
            traceparent: None,
        }
    }
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    policy_id: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
struct CallerJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uds_peer: Option<String>,
}

#[derive(Serialize)]
struct RecordJson<'a> {
    decision_id: &'a str,
    timestamp: String,
    transport: &'static str,
    principal: &'a Option<Uid>,
    action: &'a Option<Uid>,
    resource: &'a Option<Uid>,
    decision: &'static str,
    reasons: &'a [String],
    errors: Vec<ErrorJson<'a>>,
    policy_revision: &'a str,
    data_revision: &'a str,
    caller: CallerJson,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
    evaluation_latency_us: u64,
    cached: bool,
    context: Value,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if valid.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && hex(flags, 2);
    valid.then_some(trace)
}

/// RFC 3339 UTC with microseconds: `2026-11-29T08:53:36.123456Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// The redacted JSON line of `event` (no trailing newline).
pub fn encode(event: &DecisionEvent, redactor: &Redactor) -> Vec<u8> {
    let decision = &event.decision;
    let context = if event.context_json.trim().is_empty() {
        Value::Object(serde_json::Map::new())
    } else {
        // A context the engine rejected is never logged raw: it may hold anything.
        serde_json::from_str(&event.context_json)
            .unwrap_or_else(|_| Value::String("[unparsable context]".into()))
    };
    let fast = redactor.context_only();
    let mut context = context;
    if fast {
        redactor.apply_context(&mut context);
    }
    let record = RecordJson {
        decision_id: &decision.decision_id,
        timestamp: rfc3339(event.timestamp),
        transport: event.transport.as_str(),
        principal: &event.principal,
        action: &event.action,
        resource: &event.resource,
        decision: if decision.allowed { "allow" } else { "deny" },
        reasons: &decision.reasons,
        errors: decision
            .errors
            .iter()
            .map(|error| ErrorJson {
                policy_id: &error.policy_id,
                message: &error.message,
            })
            .collect(),
        policy_revision: &decision.policy_revision,
        data_revision: &decision.data_revision,
        caller: CallerJson {
            peer_address: event.caller.peer_address.map(|addr| addr.to_string()),
            tls_identity: event.caller.tls_identity.clone(),
            uds_peer: event.caller.uds_peer.clone(),
        },
        trace_id: event.traceparent.as_deref().and_then(trace_id),
        evaluation_latency_us: u64::try_from(decision.elapsed.as_micros()).unwrap_or(u64::MAX),
        cached: decision.cached,
        context,
        headers: event
            .headers
            .iter()
            .filter_map(|(name, value)| {
                let value = if fast {
                    Redactor::header_value(name, value)?
                } else {
                    value.clone()
                };
                Some((name.to_ascii_lowercase(), value))
            })
            .collect(),
    };
    if fast {
        return serde_json::to_vec(&record).unwrap_or_default();
    }
    let mut value = serde_json::to_value(&record).unwrap_or(Value::Null);
    redactor.apply(&mut value);
    serde_json::to_vec(&value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_micros(1_764_406_416_123_456);
        assert_eq!(rfc3339(t), "2025-11-29T08:53:36.123456Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn the_fast_path_redacts_exactly_like_the_whole_record_path() {
        let decision = Decision {
            allowed: true,
            reasons: vec!["p1".into()],
            errors: Vec::new(),
            decision_id: "id-1".into(),
            policy_revision: "r".into(),
            data_revision: "d".into(),
            elapsed: Duration::from_micros(3),
            cached: true,
            slice: crate::engine::SliceUse::None,
        };
        let mut event = DecisionEvent::new(Transport::ExtAuthz, decision);
        event.context_json =
            r#"{"ssn": "1", "email": "a@b", "Cookie": "c", "x": {"password": "p", "ok": 1}}"#
                .into();
        event.headers = vec![
            ("Authorization".into(), "Bearer t".into()),
            ("X-Note".into(), "basic stuff".into()),
            ("X-Request-Id".into(), "r1".into()),
        ];
        event.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        let context_rules = Redactor::new(&["context.ssn".into()], &["context.email".into()], "s");
        assert!(context_rules.context_only());
        // The same rules plus one outside the context take the slow path.
        let whole = Redactor::new(
            &["context.ssn".into(), "caller.nothing".into()],
            &["context.email".into()],
            "s",
        );
        assert!(!whole.context_only());
        let fast: Value = serde_json::from_slice(&encode(&event, &context_rules)).unwrap();
        let slow: Value = serde_json::from_slice(&encode(&event, &whole)).unwrap();
        assert_eq!(fast, slow);
        assert_eq!(
            fast["headers"],
            serde_json::json!({"x-note": "[redacted]", "x-request-id": "r1"})
        );
        assert_eq!(fast["context"]["x"], serde_json::json!({"ok": 1}));
        assert!(fast["context"].get("ssn").is_none());
        assert!(
            fast["context"]["email"]
                .as_str()
                .unwrap()
                .starts_with("sha256:")
        );
        assert_eq!(fast["transport"], "ext_authz");
    }

    #[test]
    fn trace_ids_come_from_valid_traceparents_only() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(
            trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id("garbage"), None);
    }
}
