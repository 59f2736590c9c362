//! The decision record: [`DecisionEvent`] is what an adapter hands over on
//! the decision path (owned strings moved out of the request);
//! [`Encoded::new`] (on the deciding thread, without redaction rules) or
//! [`encode_into`] (on the pipeline thread) turns it into the redacted JSON
//! line. The JSON form is documented in the README and mirrors
//! `arbiter.v1.DecisionLogRecord` in `proto/arbiter/v1/decision_log.proto`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
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
/// `traceparent` header, take the time; the JSON line is written from it
/// afterwards (see the module header).
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
    /// The uids of the entities the request supplied itself.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    request_entities: &'a [String],
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
    let mut out = Vec::with_capacity(27);
    push_rfc3339(&mut out, time);
    String::from_utf8(out).unwrap_or_default()
}

/// Appends [`rfc3339`] of `time` without formatting machinery: it runs once
/// per record, and `format!` cost ~3,000 instructions here.
fn push_rfc3339(out: &mut Vec<u8>, time: SystemTime) {
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
    let digits = |out: &mut Vec<u8>, value: u64, width: u32| {
        for place in (0..width).rev() {
            out.push(b'0' + (value / 10u64.pow(place) % 10) as u8);
        }
    };
    digits(out, year.clamp(0, 9999) as u64, 4);
    out.push(b'-');
    digits(out, month as u64, 2);
    out.push(b'-');
    digits(out, day as u64, 2);
    out.push(b'T');
    digits(out, rem / 3600, 2);
    out.push(b':');
    digits(out, rem % 3600 / 60, 2);
    out.push(b':');
    digits(out, rem % 60, 2);
    out.push(b'.');
    digits(out, u64::from(since.subsec_micros()), 6);
    out.push(b'Z');
}

/// Appends `text` as a JSON string, escaped exactly as `serde_json` does.
fn push_json_str(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = text.as_bytes();
    // Most strings need no escape: one branch-free pass (vectorised) and
    // one copy, instead of a branch per byte.
    let needs_escape = bytes.iter().fold(false, |any, &byte| {
        any | (byte < 0x20) | (byte == b'"') | (byte == b'\\')
    });
    if !needs_escape {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        let short: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(bytes.get(start..index).unwrap_or_default());
        if short.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0xf)]);
        } else {
            out.extend_from_slice(short);
        }
        start = index + 1;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
    out.push(b'"');
}

fn push_uid(out: &mut Vec<u8>, uid: Option<&Uid>) {
    match uid {
        None => out.extend_from_slice(b"null"),
        Some(uid) => {
            out.extend_from_slice(b"{\"type\":");
            push_json_str(out, &uid.type_name);
            out.extend_from_slice(b",\"id\":");
            push_json_str(out, &uid.id);
            out.push(b'}');
        }
    }
}

/// `address` as `Display` writes it; IPv4 (the common case) without the
/// formatting machinery, which cost ~1,500 instructions per record.
fn socket_address(address: SocketAddr) -> String {
    match address {
        SocketAddr::V4(v4) => {
            let mut out = Vec::with_capacity(21);
            for (index, octet) in v4.ip().octets().into_iter().enumerate() {
                if index > 0 {
                    out.push(b'.');
                }
                push_u64(&mut out, u64::from(octet));
            }
            out.push(b':');
            push_u64(&mut out, u64::from(v4.port()));
            String::from_utf8(out).unwrap_or_default()
        }
        SocketAddr::V6(_) => address.to_string(),
    }
}

fn push_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// A record encoded by the thread that decided: its decision id followed
/// by its JSON line, one slice of that thread's [`ENCODE_BUFFER`] (no
/// allocation per record).
#[derive(Debug, Clone)]
pub struct Encoded {
    bytes: Bytes,
    id_len: usize,
}

/// Bytes a thread's encode buffer grows by when it runs low: the records of
/// many decisions share one allocation, freed when the last is spooled.
const ENCODE_CHUNK: usize = 64 * 1024;

thread_local! {
    /// Per thread: the record being encoded, then the chunk records are
    /// handed over in.
    static ENCODE_BUFFER: std::cell::RefCell<(Vec<u8>, BytesMut)> =
        std::cell::RefCell::new((Vec::with_capacity(4096), BytesMut::new()));
}

impl Encoded {
    /// Encodes `event` on this thread (see [`encode_into`]).
    pub fn new(event: &DecisionEvent, redactor: &Redactor) -> Self {
        ENCODE_BUFFER.with_borrow_mut(|(scratch, chunk)| {
            scratch.clear();
            encode_into(event, redactor, scratch);
            let id = event.decision.decision_id.as_bytes();
            let len = id.len() + scratch.len();
            if chunk.capacity() - chunk.len() < len {
                chunk.reserve(ENCODE_CHUNK.max(len));
            }
            chunk.extend_from_slice(id);
            chunk.extend_from_slice(scratch);
            Encoded {
                bytes: chunk.split().freeze(),
                id_len: id.len(),
            }
        })
    }

    /// The decision id.
    pub fn id(&self) -> &str {
        std::str::from_utf8(self.bytes.get(..self.id_len).unwrap_or_default()).unwrap_or_default()
    }

    /// The JSON line.
    pub fn payload(&self) -> &[u8] {
        self.bytes.get(self.id_len..).unwrap_or_default()
    }

    /// The JSON line, sharing the buffer (for `Tail`).
    pub fn payload_bytes(&self) -> Bytes {
        self.bytes.slice(self.id_len.min(self.bytes.len())..)
    }
}

/// The redacted JSON line of `event` (no trailing newline).
pub fn encode(event: &DecisionEvent, redactor: &Redactor) -> Vec<u8> {
    let mut out = Vec::with_capacity(768);
    encode_into(event, redactor, &mut out);
    out
}

/// Appends the redacted JSON line of `event` (no trailing newline) to
/// `out`: the pipeline encodes every record into one reused buffer, so the
/// common case allocates nothing.
pub fn encode_into(event: &DecisionEvent, redactor: &Redactor, out: &mut Vec<u8>) {
    let decision = &event.decision;
    let fast = redactor.context_only();
    // Borrowed from the event; a name is copied only to lower-case it
    // (copying every name and value cost ~290 instructions more per
    // ext_authz record, callgrind).
    let mut headers: Vec<(Cow<'_, str>, &str)> = event
        .headers
        .iter()
        .filter_map(|(name, value)| {
            let value = if fast {
                Redactor::header_value(name, value)?
            } else {
                value.as_str()
            };
            let name = if name.bytes().any(|byte| byte.is_ascii_uppercase()) {
                Cow::Owned(name.to_ascii_lowercase())
            } else {
                Cow::Borrowed(name.as_str())
            };
            Some((name, value))
        })
        .collect();
    // A map in the JSON form: sorted, and the last of a repeated name wins.
    headers.reverse();
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    headers.dedup_by(|a, b| a.0 == b.0);
    if fast {
        write_record(event, redactor, &headers, out);
        return;
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
        context: parsed_context(&event.context_json),
        request_entities: &decision.request_entities,
        headers: headers
            .into_iter()
            .map(|(name, value)| (name.into_owned(), value.to_owned()))
            .collect(),
    };
    let mut value = serde_json::to_value(&record).unwrap_or(Value::Null);
    redactor.apply(&mut value);
    if serde_json::to_writer(out, &value).is_err() {
        // Writing a `Value` to a `Vec` does not fail.
    }
}

/// The context as a `Value`, for redaction.
fn parsed_context(context_json: &str) -> Value {
    if context_json.trim().is_empty() {
        Value::Object(serde_json::Map::new())
    } else {
        // A context the engine rejected is never logged raw: it may hold anything.
        serde_json::from_str(context_json)
            .unwrap_or_else(|_| Value::String("[unparsable context]".into()))
    }
}

/// Appends the redacted context: as sent (compacted) when no rule touches
/// it and it holds no secret (the common case, one pass, nothing
/// allocated), else parsed, redacted and written.
fn write_context(context_json: &str, redactor: &Redactor, out: &mut Vec<u8>) {
    if !redactor.has_context_rules() {
        match context_json.trim() {
            "" => {
                out.extend_from_slice(b"{}");
                return;
            }
            text => {
                if super::redact::clean_json_into(text, out) {
                    return;
                }
            }
        }
    }
    let mut context = parsed_context(context_json);
    redactor.apply_context(&mut context);
    if serde_json::to_writer(&mut *out, &context).is_err() {
        out.extend_from_slice(b"{}");
    }
}

/// The JSON line of [`RecordJson`], byte for byte as `serde_json` writes
/// it, written directly: with `serde_json` the encoding was ~17,000
/// instructions per record, most of the pipeline thread's work (measured
/// with callgrind, ARCHITECTURE.md).
fn write_record(
    event: &DecisionEvent,
    redactor: &Redactor,
    headers: &[(Cow<'_, str>, &str)],
    out: &mut Vec<u8>,
) {
    let decision = &event.decision;
    out.extend_from_slice(b"{\"decision_id\":");
    push_json_str(out, &decision.decision_id);
    out.extend_from_slice(b",\"timestamp\":\"");
    push_rfc3339(out, event.timestamp);
    out.extend_from_slice(b"\",\"transport\":\"");
    out.extend_from_slice(event.transport.as_str().as_bytes());
    out.extend_from_slice(b"\",\"principal\":");
    push_uid(out, event.principal.as_ref());
    out.extend_from_slice(b",\"action\":");
    push_uid(out, event.action.as_ref());
    out.extend_from_slice(b",\"resource\":");
    push_uid(out, event.resource.as_ref());
    out.extend_from_slice(if decision.allowed {
        b",\"decision\":\"allow\",\"reasons\":["
    } else {
        b",\"decision\":\"deny\",\"reasons\":["
    });
    for (index, reason) in decision.reasons.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        push_json_str(out, reason);
    }
    out.extend_from_slice(b"],\"errors\":[");
    for (index, error) in decision.errors.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"policy_id\":");
        push_json_str(out, &error.policy_id);
        out.extend_from_slice(b",\"message\":");
        push_json_str(out, &error.message);
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"policy_revision\":");
    push_json_str(out, &decision.policy_revision);
    out.extend_from_slice(b",\"data_revision\":");
    push_json_str(out, &decision.data_revision);
    out.extend_from_slice(b",\"caller\":{");
    let mut first = true;
    let mut field = |out: &mut Vec<u8>, name: &[u8], value: &str| {
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(name);
        push_json_str(out, value);
    };
    if let Some(address) = event.caller.peer_address {
        field(out, b"\"peer_address\":", &socket_address(address));
    }
    if let Some(identity) = &event.caller.tls_identity {
        field(out, b"\"tls_identity\":", identity);
    }
    if let Some(peer) = &event.caller.uds_peer {
        field(out, b"\"uds_peer\":", peer);
    }
    out.push(b'}');
    if let Some(trace) = event.traceparent.as_deref().and_then(trace_id) {
        out.extend_from_slice(b",\"trace_id\":");
        push_json_str(out, trace);
    }
    out.extend_from_slice(b",\"evaluation_latency_us\":");
    push_u64(
        out,
        u64::try_from(decision.elapsed.as_micros()).unwrap_or(u64::MAX),
    );
    out.extend_from_slice(if decision.cached {
        b",\"cached\":true,\"context\":"
    } else {
        b",\"cached\":false,\"context\":"
    });
    write_context(&event.context_json, redactor, out);
    if !decision.request_entities.is_empty() {
        out.extend_from_slice(b",\"request_entities\":[");
        for (index, uid) in decision.request_entities.iter().enumerate() {
            if index > 0 {
                out.push(b',');
            }
            push_json_str(out, uid);
        }
        out.push(b']');
    }
    if !headers.is_empty() {
        out.extend_from_slice(b",\"headers\":{");
        for (index, (name, value)) in headers.iter().enumerate() {
            if index > 0 {
                out.push(b',');
            }
            push_json_str(out, name);
            out.push(b':');
            push_json_str(out, value);
        }
        out.push(b'}');
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_micros(1_764_406_416_123_456);
        assert_eq!(rfc3339(t), "2025-11-29T08:53:36.123456Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let leap = UNIX_EPOCH + Duration::from_micros(951_868_799_999_999);
        assert_eq!(rfc3339(leap), "2000-02-29T23:59:59.999999Z");
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
            request_entities: Vec::new(),
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
    fn the_direct_writer_matches_serde_json_byte_for_byte() {
        let awkward = "quote \" backslash \\ newline \n tab \t bell \u{7} nul \0 é 🦀 </script>";
        let mut decision = Decision {
            allowed: false,
            reasons: vec!["p1".into(), awkward.into()],
            errors: vec![crate::engine::PolicyEvaluationError {
                policy_id: "p\"2".into(),
                message: awkward.into(),
            }],
            decision_id: "019ad0f2-6b1e-7c3a-9f0e-5d2a8c1b4e77".into(),
            policy_revision: "rev".into(),
            data_revision: "".into(),
            elapsed: Duration::from_micros(1_234_567),
            cached: false,
            slice: crate::engine::SliceUse::None,
            request_entities: Vec::new(),
        };
        for round in 0..3 {
            if round == 2 {
                decision.request_entities =
                    vec![format!("Saas::User::{awkward:?}"), "G::\"a\"".into()];
            }
            let mut event = DecisionEvent::new(Transport::Grpc, decision.clone());
            event.timestamp = UNIX_EPOCH + Duration::from_micros(1_764_406_416_000_007);
            if round > 0 {
                event.principal = Some(Uid {
                    type_name: "Saas::User".into(),
                    id: awkward.into(),
                });
                event.resource = Some(Uid::default());
                event.context_json = format!(
                    r#"{{"a": [1, 2.5, null, true], "b": {{"c": {}}}}}"#,
                    serde_json::to_string(awkward).unwrap()
                );
                event.headers = vec![
                    ("X-B".into(), awkward.into()),
                    ("x-a".into(), "first".into()),
                    ("X-A".into(), "second".into()),
                ];
                event.traceparent =
                    Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
                event.caller = Caller {
                    peer_address: Some("[::1]:8080".parse().unwrap()),
                    tls_identity: if round == 2 {
                        Some(awkward.into())
                    } else {
                        None
                    },
                    uds_peer: Some("pid=1 uid=2 gid=3".into()),
                };
            }
            // No rules: the direct writer; a rule outside the context: serde_json.
            let direct = encode(&event, &Redactor::new(&[], &[], ""));
            let serde = encode(&event, &Redactor::new(&["caller.nothing".into()], &[], ""));
            let (direct, serde) = (
                String::from_utf8(direct).unwrap(),
                String::from_utf8(serde).unwrap(),
            );
            assert!(!direct.contains('\n'), "{direct}");
            if event.context_json.is_empty() {
                assert_eq!(direct, serde, "round {round}");
            } else {
                // A clean context is written as sent (compacted), which
                // serde_json may spell differently (`2.50` as `2.5`).
                let parse = |text: &str| serde_json::from_str::<Value>(text).unwrap();
                assert_eq!(parse(&direct), parse(&serde), "round {round}");
            }
            decision.allowed = true;
            decision.cached = true;
            decision.elapsed = Duration::ZERO;
        }
    }

    #[test]
    fn socket_addresses_are_written_as_display_writes_them() {
        for text in [
            "127.0.0.1:0",
            "10.255.0.9:65535",
            "0.0.0.0:80",
            "[::1]:8080",
        ] {
            let address: SocketAddr = text.parse().unwrap();
            assert_eq!(socket_address(address), address.to_string());
        }
    }

    #[test]
    fn contexts_with_secrets_anywhere_are_redacted_and_clean_ones_kept() {
        let decision = Decision {
            allowed: true,
            reasons: Vec::new(),
            errors: Vec::new(),
            decision_id: "d".into(),
            policy_revision: "r".into(),
            data_revision: "d".into(),
            elapsed: Duration::ZERO,
            cached: false,
            slice: crate::engine::SliceUse::None,
            request_entities: Vec::new(),
        };
        let cases = [
            (
                r#"{"ok": {"deep": [1, "x y"]}}"#,
                r#"{"ok":{"deep":[1,"x y"]}}"#,
            ),
            (r#"{"a": {"b": [{"X_Api_Key": 1}]}}"#, r#"{"a":{"b":[{}]}}"#),
            // An escaped key is still a secret's name.
            (r#"{"password": 1, "n": 2}"#, r#"{"n":2}"#),
            (r#"{"t": ["bEaReR abc"]}"#, r#"{"t":["[redacted]"]}"#),
            (
                r#"{"q": "say \"hi\"  there"}"#,
                r#"{"q":"say \"hi\"  there"}"#,
            ),
            ("not json", r#""[unparsable context]""#),
            (r#"{"a": 1} trailing"#, r#""[unparsable context]""#),
        ];
        for (context, expected) in cases {
            let mut event = DecisionEvent::new(Transport::Grpc, decision.clone());
            event.context_json = context.into();
            let record: Value =
                serde_json::from_slice(&encode(&event, &Redactor::new(&[], &[], ""))).unwrap();
            let expected: Value = serde_json::from_str(expected).unwrap();
            assert_eq!(record["context"], expected, "{context}");
        }
        assert_eq!(
            super::super::redact::clean_json_line("{\"q\": \"a longer b\\\" c\",\n \"n\": [ 1 ]}"),
            Some(br#"{"q":"a longer b\" c","n":[1]}"#.to_vec())
        );
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
