//! Envoy's `CheckRequest`, read in place from the gRPC message bytes.
//!
//! Why not prost into `envoy_types`' `CheckRequest`: that decode was the
//! largest single cost of an ext_authz `Check` (~20,700 of ~122,500
//! instructions per call, callgrind, `benches/load/instructions.sh`). It
//! copies every string and builds a SipHash `HashMap` of the headers, all
//! for a message of which the mapping reads a dozen fields. This view reads
//! those fields as `&str` borrowed from the message and skips the rest.
//!
//! Invariants:
//! - the field numbers are those of `envoy_types`' generated types (the
//!   maintained crate stays the reference): the tests encode `envoy_types`
//!   messages with prost and check this view reads the same values, so a
//!   field renumbered upstream fails them;
//! - protobuf semantics as prost decodes them: a message field that occurs
//!   more than once is merged (its occurrences read in order), a scalar or
//!   string that occurs more than once keeps its last value, a map keeps the
//!   last value of a key, a oneof keeps its last member;
//! - malformed wire data (truncated, bad wire type, field number 0, invalid
//!   UTF-8 in a string the view reads) is an error, as prost makes it; fields
//!   the view skips are checked only for framing;
//! - `metadata_context` is kept as its raw occurrences and decoded with
//!   `envoy_types` on demand (only the `jwt_authn` principal source reads it).

use std::borrow::Cow;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use prost::Message as _;

/// Why a `CheckRequest` could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the message ends inside a field")]
    Truncated,
    #[error("a varint runs past 10 bytes")]
    VarintTooLong,
    #[error("a field number is 0 or out of range")]
    FieldNumber,
    #[error("`{field}` has wire type {found}, expected {expected}")]
    WireType {
        field: &'static str,
        found: u8,
        expected: u8,
    },
    #[error("wire type {0} is not a protobuf wire type")]
    UnknownWireType(u8),
    #[error("a group is not closed, or closed by the wrong field")]
    Group,
    #[error("groups are nested more than {MAX_GROUP_DEPTH} deep")]
    GroupDepth,
    #[error("`{0}` is not valid UTF-8")]
    Utf8(&'static str),
}

const MAX_GROUP_DEPTH: usize = 100;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// One field's value as it is on the wire.
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Varint(u64),
    Len(&'a [u8]),
    /// Fixed-width numbers and groups: never read by this view.
    Skipped(u8),
}

impl<'a> Value<'a> {
    fn wire_type(&self) -> u8 {
        match self {
            Value::Varint(_) => VARINT,
            Value::Len(_) => LEN,
            Value::Skipped(wire_type) => *wire_type,
        }
    }

    fn bytes(self, field: &'static str) -> Result<&'a [u8], WireError> {
        match self {
            Value::Len(bytes) => Ok(bytes),
            other => Err(WireError::WireType {
                field,
                found: other.wire_type(),
                expected: LEN,
            }),
        }
    }

    fn string(self, field: &'static str) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.bytes(field)?).map_err(|_| WireError::Utf8(field))
    }

    fn varint(self, field: &'static str) -> Result<u64, WireError> {
        match self {
            Value::Varint(value) => Ok(value),
            other => Err(WireError::WireType {
                field,
                found: other.wire_type(),
                expected: VARINT,
            }),
        }
    }
}

/// Tags and most lengths fit one byte: that case is inlined.
#[inline(always)]
fn varint(rest: &mut &[u8]) -> Result<u64, WireError> {
    match rest.split_first() {
        Some((&byte, tail)) if byte < 0x80 => {
            *rest = tail;
            Ok(u64::from(byte))
        }
        _ => long_varint(rest),
    }
}

#[inline(never)]
fn long_varint(rest: &mut &[u8]) -> Result<u64, WireError> {
    let mut value = 0u64;
    for index in 0..10 {
        let (&byte, tail) = rest.split_first().ok_or(WireError::Truncated)?;
        *rest = tail;
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte < 0x80 {
            return Ok(value);
        }
    }
    Err(WireError::VarintTooLong)
}

#[inline]
fn take<'a>(rest: &mut &'a [u8], len: u64) -> Result<&'a [u8], WireError> {
    let len = usize::try_from(len).map_err(|_| WireError::Truncated)?;
    if len > rest.len() {
        return Err(WireError::Truncated);
    }
    let (head, tail) = rest.split_at(len);
    *rest = tail;
    Ok(head)
}

/// A tag: field number and wire type.
#[inline(always)]
fn tag(rest: &mut &[u8]) -> Result<(u32, u8), WireError> {
    let key = varint(rest)?;
    let wire_type = (key & 7) as u8;
    let field = u32::try_from(key >> 3).map_err(|_| WireError::FieldNumber)?;
    if field == 0 {
        return Err(WireError::FieldNumber);
    }
    Ok((field, wire_type))
}

/// Skips a group's fields up to the end tag of `field` (prost accepts
/// unknown groups; Envoy sends none).
fn skip_group(rest: &mut &[u8], field: u32, depth: usize) -> Result<(), WireError> {
    if depth > MAX_GROUP_DEPTH {
        return Err(WireError::GroupDepth);
    }
    loop {
        if rest.is_empty() {
            return Err(WireError::Group);
        }
        let (inner, wire_type) = tag(rest)?;
        match wire_type {
            END_GROUP if inner == field => return Ok(()),
            END_GROUP => return Err(WireError::Group),
            START_GROUP => skip_group(rest, inner, depth + 1)?,
            other => {
                value(rest, other)?;
            }
        }
    }
}

#[inline(always)]
fn value<'a>(rest: &mut &'a [u8], wire_type: u8) -> Result<Value<'a>, WireError> {
    Ok(match wire_type {
        VARINT => Value::Varint(varint(rest)?),
        LEN => {
            let len = varint(rest)?;
            Value::Len(take(rest, len)?)
        }
        FIXED64 => {
            take(rest, 8)?;
            Value::Skipped(FIXED64)
        }
        FIXED32 => {
            take(rest, 4)?;
            Value::Skipped(FIXED32)
        }
        other => return Err(WireError::UnknownWireType(other)),
    })
}

/// The fields of one occurrence of a message, in wire order.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    #[inline(always)]
    fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>, WireError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let (field, wire_type) = tag(&mut self.rest)?;
        match wire_type {
            START_GROUP => {
                skip_group(&mut self.rest, field, 1)?;
                Ok(Some((field, Value::Skipped(START_GROUP))))
            }
            END_GROUP => Err(WireError::Group),
            other => Ok(Some((field, value(&mut self.rest, other)?))),
        }
    }
}

/// Every occurrence of a message field: prost merges them, so the message
/// is read from all of them in order (usually there is one).
#[derive(Debug, Clone, Default)]
pub struct Occurrences<'a> {
    first: Option<&'a [u8]>,
    more: Vec<&'a [u8]>,
}

impl<'a> Occurrences<'a> {
    fn push(&mut self, bytes: &'a [u8]) {
        if self.first.is_none() {
            self.first = Some(bytes);
        } else {
            self.more.push(bytes);
        }
    }

    fn is_present(&self) -> bool {
        self.first.is_some()
    }

    /// The message read by `parse`, when the field occurs at all.
    fn read<T>(
        &self,
        parse: impl FnOnce(&Self) -> Result<T, WireError>,
    ) -> Result<Option<T>, WireError> {
        self.is_present().then(|| parse(self)).transpose()
    }

    /// Calls `each` with every field of every occurrence, in order.
    fn each(
        &self,
        mut each: impl FnMut(u32, Value<'a>) -> Result<(), WireError>,
    ) -> Result<(), WireError> {
        for bytes in self.first.iter().chain(&self.more) {
            let mut fields = Fields { rest: bytes };
            while let Some((field, value)) = fields.next_field()? {
                each(field, value)?;
            }
        }
        Ok(())
    }

    /// All occurrences as one message (their concatenation, which is what
    /// merging means on the wire).
    fn joined(&self) -> Cow<'a, [u8]> {
        match (self.first, self.more.is_empty()) {
            (None, _) => Cow::Borrowed(&[]),
            (Some(first), true) => Cow::Borrowed(first),
            (Some(first), false) => {
                let mut all = first.to_vec();
                for more in &self.more {
                    all.extend_from_slice(more);
                }
                Cow::Owned(all)
            }
        }
    }
}

/// `envoy.service.auth.v3.CheckRequest`, the fields the mapping reads.
#[derive(Debug, Default)]
pub struct CheckView<'a> {
    pub attributes: Option<AttributesView<'a>>,
}

/// `AttributeContext`.
#[derive(Debug, Default)]
pub struct AttributesView<'a> {
    pub source: Option<PeerView<'a>>,
    pub request: Option<RequestView<'a>>,
    /// Whether `tls_session` is set (Envoy sets it for TLS downstreams).
    pub tls_session: bool,
    metadata_context: Occurrences<'a>,
}

/// `AttributeContext.Peer`.
#[derive(Debug, Default)]
pub struct PeerView<'a> {
    pub address: Option<AddressView<'a>>,
    /// The peer's identity, e.g. a SPIFFE id from its verified certificate.
    pub principal: &'a str,
}

/// `config.core.v3.Address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressView<'a> {
    /// `socket_address.address`: an IP or a host name.
    Socket(&'a str),
    /// `pipe.path`: a Unix socket.
    Pipe(&'a str),
    /// `envoy_internal_address`.
    Internal,
}

/// `AttributeContext.Request`.
#[derive(Debug, Default)]
pub struct RequestView<'a> {
    /// `time.seconds`, when `time` is set.
    pub time_seconds: Option<i64>,
    pub http: Option<HttpView<'a>>,
}

/// `AttributeContext.HttpRequest`.
#[derive(Debug, Default)]
pub struct HttpView<'a> {
    pub method: &'a str,
    /// Path with the query, as Envoy sends `:path`.
    pub path: &'a str,
    pub host: &'a str,
    pub scheme: &'a str,
    pub headers: Headers<'a>,
}

/// The request headers: the `headers` map (looked up by lower-case name,
/// as Envoy sends its keys; a key another client sent in another case is
/// still found), or `header_map` when Envoy sends that instead
/// (`encode_raw_headers`), with names lower-cased and repeated headers
/// joined with `,`.
#[derive(Debug, Default, Clone)]
pub struct Headers<'a> {
    /// The `headers` map: in wire order, a later entry of a name wins (what
    /// prost's map decode keeps), and a lookup scans (a request has a few
    /// dozen headers; sorting them cost more than the lookups). Raw
    /// headers: sorted by name, one entry per name.
    entries: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    sorted: bool,
    /// Bytes of names and values as received, repeats included.
    received_bytes: usize,
}

impl<'a> Headers<'a> {
    /// From name/value pairs (lower-cased names, later values win), as the
    /// `headers` map gives them.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut headers = Headers::default();
        for (name, value) in pairs {
            headers.received_bytes += name.len() + value.len();
            headers
                .entries
                .push((Cow::Borrowed(name), Cow::Borrowed(value)));
        }
        headers
    }

    /// Sorts by name and joins the values of a repeated name with `,`, in
    /// the order received (raw headers).
    fn sort_and_join(&mut self) {
        // Stable, so repeats keep their order.
        self.entries.sort_by(|a, b| a.0.cmp(&b.0));
        self.entries.dedup_by(|later, kept| {
            if later.0 != kept.0 {
                return false;
            }
            let value = kept.1.to_mut();
            value.push(',');
            value.push_str(&later.1);
            true
        });
        self.sorted = true;
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        let found = if self.sorted {
            self.entries
                .binary_search_by(|(key, _)| key.as_ref().cmp(name))
                .ok()
                .and_then(|index| self.entries.get(index))
        } else {
            // Envoy lower-cases the map's keys; a client that is not Envoy
            // may not. Lowering every name on arrival cost ~600 instructions
            // per request (callgrind); a second, case-blind scan only when
            // the exact one misses costs a length compare per entry.
            self.entries
                .iter()
                .rev()
                .find(|(key, _)| key == name)
                .or_else(|| {
                    self.entries
                        .iter()
                        .rev()
                        .find(|(key, _)| key.eq_ignore_ascii_case(name))
                })
        };
        found.map(|(_, value)| value.as_ref())
    }

    /// The headers whose name `keep` accepts, one per name with the value
    /// [`Headers::get`] gives, owned (for the decision log).
    pub fn select(&self, mut keep: impl FnMut(&str) -> bool) -> Vec<(String, String)> {
        let mut kept: Vec<(&str, &str)> = self
            .entries
            .iter()
            .filter(|(name, _)| keep(name))
            .map(|(name, value)| (name.as_ref(), value.as_ref()))
            .collect();
        if !self.sorted {
            // Stable: of a repeated name, the last stays last; keep it.
            kept.sort_by(|a, b| a.0.cmp(b.0));
            kept.dedup_by(|later, earlier| {
                if later.0 == earlier.0 {
                    std::mem::swap(later, earlier);
                    true
                } else {
                    false
                }
            });
        }
        kept.into_iter()
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect()
    }

    /// Total size of names and values as received, for the size limit.
    pub fn received_bytes(&self) -> usize {
        self.received_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<'a> CheckView<'a> {
    /// Reads a serialized `CheckRequest`.
    pub fn parse(message: &'a [u8]) -> Result<Self, WireError> {
        let mut attributes = Occurrences::default();
        let mut fields = Fields { rest: message };
        while let Some((field, value)) = fields.next_field()? {
            if field == 1 {
                attributes.push(value.bytes("attributes")?);
            }
        }
        Ok(CheckView {
            attributes: attributes.read(AttributesView::parse)?,
        })
    }
}

impl<'a> AttributesView<'a> {
    fn parse(occurrences: &Occurrences<'a>) -> Result<Self, WireError> {
        let mut source = Occurrences::default();
        let mut request = Occurrences::default();
        let mut metadata_context = Occurrences::default();
        let mut tls_session = false;
        occurrences.each(|field, value| {
            match field {
                1 => source.push(value.bytes("attributes.source")?),
                4 => request.push(value.bytes("attributes.request")?),
                11 => metadata_context.push(value.bytes("attributes.metadata_context")?),
                12 => {
                    value.bytes("attributes.tls_session")?;
                    tls_session = true;
                }
                _ => {}
            }
            Ok(())
        })?;
        Ok(AttributesView {
            source: source.read(PeerView::parse)?,
            request: request.read(RequestView::parse)?,
            tls_session,
            metadata_context,
        })
    }

    /// `metadata_context`, decoded by `envoy_types`, when it is set.
    pub fn metadata_context(&self) -> Result<Option<Metadata>, prost::DecodeError> {
        if !self.metadata_context.is_present() {
            return Ok(None);
        }
        Metadata::decode(&*self.metadata_context.joined()).map(Some)
    }
}

impl<'a> PeerView<'a> {
    fn parse(occurrences: &Occurrences<'a>) -> Result<Self, WireError> {
        // `address` is a message field; its own `address` is a oneof whose
        // members are messages: the last member seen wins, and repeats of
        // one member merge.
        let mut address = Occurrences::default();
        let mut principal = "";
        occurrences.each(|field, value| {
            match field {
                1 => address.push(value.bytes("source.address")?),
                4 => principal = value.string("source.principal")?,
                _ => {}
            }
            Ok(())
        })?;
        let address = if address.is_present() {
            Some(parse_address(&address)?)
        } else {
            None
        };
        Ok(PeerView {
            address: address.flatten(),
            principal,
        })
    }
}

/// An `Address`; `None` when no member of its oneof is set.
fn parse_address<'a>(occurrences: &Occurrences<'a>) -> Result<Option<AddressView<'a>>, WireError> {
    let mut member = 0u32;
    let mut member_occurrences = Occurrences::default();
    occurrences.each(|field, value| {
        if matches!(field, 1..=3) {
            let bytes = value.bytes("address")?;
            if field != member {
                member = field;
                member_occurrences = Occurrences::default();
            }
            member_occurrences.push(bytes);
        }
        Ok(())
    })?;
    // The string field of the member: `SocketAddress.address` (2) or
    // `Pipe.path` (1); last value wins.
    let (wanted, name) = match member {
        1 => (2, "address.socket_address.address"),
        2 => (1, "address.pipe.path"),
        3 => return Ok(Some(AddressView::Internal)),
        _ => return Ok(None),
    };
    let mut text = "";
    member_occurrences.each(|field, value| {
        if field == wanted {
            text = value.string(name)?;
        }
        Ok(())
    })?;
    Ok(Some(if member == 1 {
        AddressView::Socket(text)
    } else {
        AddressView::Pipe(text)
    }))
}

impl<'a> RequestView<'a> {
    fn parse(occurrences: &Occurrences<'a>) -> Result<Self, WireError> {
        let mut time = Occurrences::default();
        let mut http = Occurrences::default();
        occurrences.each(|field, value| {
            match field {
                1 => time.push(value.bytes("request.time")?),
                2 => http.push(value.bytes("request.http")?),
                _ => {}
            }
            Ok(())
        })?;
        let time_seconds = if time.is_present() {
            let mut seconds = 0i64;
            time.each(|field, value| {
                if field == 1 {
                    // int64: two's complement in a varint.
                    seconds = value.varint("request.time.seconds")? as i64;
                }
                Ok(())
            })?;
            Some(seconds)
        } else {
            None
        };
        Ok(RequestView {
            time_seconds,
            http: http.read(HttpView::parse)?,
        })
    }
}

impl<'a> HttpView<'a> {
    fn parse(occurrences: &Occurrences<'a>) -> Result<Self, WireError> {
        let mut http = HttpView::default();
        let mut map = Vec::new();
        let mut map_bytes = 0;
        let mut header_map = Occurrences::default();
        occurrences.each(|field, value| {
            match field {
                2 => http.method = value.string("http.method")?,
                3 => {
                    let (name, value) = map_entry(value.bytes("http.headers")?)?;
                    map_bytes += name.len() + value.len();
                    map.push((Cow::Borrowed(name), Cow::Borrowed(value)));
                }
                4 => http.path = value.string("http.path")?,
                5 => http.host = value.string("http.host")?,
                6 => http.scheme = value.string("http.scheme")?,
                13 => header_map.push(value.bytes("http.header_map")?),
                _ => {}
            }
            Ok(())
        })?;
        http.headers = if map.is_empty() && header_map.is_present() {
            raw_headers(&header_map)?
        } else {
            Headers {
                entries: map,
                sorted: false,
                received_bytes: map_bytes,
            }
        };
        Ok(http)
    }
}

/// One `map<string, string>` entry: key 1, value 2, each defaulting to "".
fn map_entry(entry: &[u8]) -> Result<(&str, &str), WireError> {
    let mut name = "";
    let mut text = "";
    let mut fields = Fields { rest: entry };
    while let Some((field, value)) = fields.next_field()? {
        match field {
            1 => name = value.string("http.headers.key")?,
            2 => text = value.string("http.headers.value")?,
            _ => {}
        }
    }
    Ok((name, text))
}

/// `HeaderMap.headers`: repeated `HeaderValue` (key 1, value 2, raw_value 3;
/// `raw_value` wins when set, read as lossy UTF-8).
fn raw_headers<'a>(occurrences: &Occurrences<'a>) -> Result<Headers<'a>, WireError> {
    let mut headers = Headers::default();
    occurrences.each(|field, value| {
        if field != 1 {
            return Ok(());
        }
        let mut name = "";
        let mut text = "";
        let mut raw: &[u8] = &[];
        let mut fields = Fields {
            rest: value.bytes("http.header_map.headers")?,
        };
        while let Some((field, value)) = fields.next_field()? {
            match field {
                1 => name = value.string("http.header_map.headers.key")?,
                2 => text = value.string("http.header_map.headers.value")?,
                3 => raw = value.bytes("http.header_map.headers.raw_value")?,
                _ => {}
            }
        }
        let text = if raw.is_empty() {
            Cow::Borrowed(text)
        } else {
            String::from_utf8_lossy(raw)
        };
        let name = if name.bytes().any(|byte| byte.is_ascii_uppercase()) {
            Cow::Owned(name.to_ascii_lowercase())
        } else {
            Cow::Borrowed(name)
        };
        headers.received_bytes += name.len() + text.len();
        headers.entries.push((name, text));
        Ok(())
    })?;
    headers.sort_and_join();
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
    use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
    use envoy_types::pb::envoy::config::core::v3::{
        Address, EnvoyInternalAddress, HeaderMap, HeaderValue, Pipe, SocketAddress,
    };
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Peer, Request, TlsSession,
    };
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    use envoy_types::pb::google::protobuf::{Struct, Timestamp, Value as PbValue, value::Kind};
    use prost::Message;

    use super::*;

    fn socket(address: &str) -> Option<Address> {
        Some(Address {
            address: Some(AddressKind::SocketAddress(SocketAddress {
                address: address.into(),
                port_specifier: Some(PortSpecifier::PortValue(40000)),
                ..Default::default()
            })),
        })
    }

    fn full_request() -> CheckRequest {
        let mut fields = std::collections::HashMap::new();
        fields.insert(
            "jwt_payload".to_string(),
            PbValue {
                kind: Some(Kind::StructValue(Struct {
                    fields: HashMap::from([(
                        "sub".to_string(),
                        PbValue {
                            kind: Some(Kind::StringValue("carol".into())),
                        },
                    )]),
                })),
            },
        );
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: socket("10.1.2.3"),
                    service: "web".into(),
                    labels: HashMap::from([("app".into(), "web".into())]),
                    principal: "spiffe://example.org/web".into(),
                    certificate: "PEM".into(),
                }),
                destination: Some(Peer {
                    address: socket("10.0.0.7"),
                    ..Default::default()
                }),
                request: Some(Request {
                    time: Some(Timestamp {
                        seconds: 1_767_225_600,
                        nanos: 5,
                    }),
                    http: Some(HttpRequest {
                        id: "abc".into(),
                        method: "GET".into(),
                        headers: HashMap::from([
                            (":authority".into(), "docs.example.com".into()),
                            ("authorization".into(), "Bearer t.o.k".into()),
                            ("x-empty".into(), String::new()),
                        ]),
                        path: "/tenants/acme/documents/a%20b?x=1".into(),
                        host: "docs.example.com".into(),
                        scheme: "https".into(),
                        query: "x=1".into(),
                        fragment: "f".into(),
                        size: 12,
                        protocol: "HTTP/2".into(),
                        body: "hello".into(),
                        raw_body: b"hello".to_vec(),
                        ..Default::default()
                    }),
                }),
                context_extensions: HashMap::from([("k".into(), "v".into())]),
                metadata_context: Some(Metadata {
                    filter_metadata: HashMap::from([(
                        "envoy.filters.http.jwt_authn".to_string(),
                        Struct { fields },
                    )]),
                    ..Default::default()
                }),
                tls_session: Some(TlsSession {
                    sni: "docs.example.com".into(),
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn reads_what_envoy_types_encodes() {
        let request = full_request();
        let bytes = request.encode_to_vec();
        let view = CheckView::parse(&bytes).unwrap();
        let attributes = view.attributes.as_ref().unwrap();
        let expected = request.attributes.as_ref().unwrap();
        let source = attributes.source.as_ref().unwrap();
        assert_eq!(source.principal, "spiffe://example.org/web");
        assert_eq!(source.address, Some(AddressView::Socket("10.1.2.3")));
        assert!(attributes.tls_session);
        let req = attributes.request.as_ref().unwrap();
        assert_eq!(req.time_seconds, Some(1_767_225_600));
        let http = req.http.as_ref().unwrap();
        let want = expected.request.as_ref().unwrap().http.as_ref().unwrap();
        assert_eq!(http.method, want.method);
        assert_eq!(http.path, want.path);
        assert_eq!(http.host, want.host);
        assert_eq!(http.scheme, want.scheme);
        for (name, value) in &want.headers {
            assert_eq!(http.headers.get(name), Some(value.as_str()), "{name}");
        }
        let mut all: Vec<_> = want.headers.clone().into_iter().collect();
        all.sort();
        assert_eq!(http.headers.select(|_| true), all);
        assert_eq!(
            attributes.metadata_context().unwrap(),
            expected.metadata_context
        );
    }

    #[test]
    fn empty_and_absent_parts() {
        assert!(CheckView::parse(&[]).unwrap().attributes.is_none());
        let bytes = CheckRequest {
            attributes: Some(AttributeContext::default()),
        }
        .encode_to_vec();
        let view = CheckView::parse(&bytes).unwrap();
        let attributes = view.attributes.unwrap();
        assert!(attributes.source.is_none());
        assert!(attributes.request.is_none());
        assert!(!attributes.tls_session);
        assert_eq!(attributes.metadata_context().unwrap(), None);
        // A Timestamp that is set but zero still counts as set.
        let bytes = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    time: Some(Timestamp::default()),
                    http: None,
                }),
                ..Default::default()
            }),
        }
        .encode_to_vec();
        let view = CheckView::parse(&bytes).unwrap();
        let request = view.attributes.unwrap().request.unwrap();
        assert_eq!(request.time_seconds, Some(0));
        assert!(request.http.is_none());
    }

    #[test]
    fn pipe_and_internal_addresses() {
        for (address, expected) in [
            (
                AddressKind::Pipe(Pipe {
                    path: "/run/envoy.sock".into(),
                    mode: 0o600,
                }),
                AddressView::Pipe("/run/envoy.sock"),
            ),
            (
                AddressKind::EnvoyInternalAddress(EnvoyInternalAddress::default()),
                AddressView::Internal,
            ),
        ] {
            let bytes = CheckRequest {
                attributes: Some(AttributeContext {
                    source: Some(Peer {
                        address: Some(Address {
                            address: Some(address),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            }
            .encode_to_vec();
            let view = CheckView::parse(&bytes).unwrap();
            assert_eq!(
                view.attributes.unwrap().source.unwrap().address,
                Some(expected)
            );
        }
    }

    /// Repeated occurrences follow prost: messages merge, strings and map
    /// keys keep their last value, a oneof its last member.
    #[test]
    fn repeated_fields_merge_as_prost_merges() {
        let first = CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: Some(Address {
                        address: Some(AddressKind::Pipe(Pipe {
                            path: "/first".into(),
                            mode: 0,
                        })),
                    }),
                    principal: "first".into(),
                    ..Default::default()
                }),
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        method: "GET".into(),
                        path: "/first".into(),
                        headers: HashMap::from([
                            ("a".into(), "1".into()),
                            ("b".into(), "1".into()),
                        ]),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        };
        let second = CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: socket("10.9.9.9"),
                    ..Default::default()
                }),
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        path: "/second".into(),
                        headers: HashMap::from([("a".into(), "2".into())]),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        };
        let mut bytes = first.encode_to_vec();
        bytes.extend(second.encode_to_vec());
        let merged = CheckRequest::decode(&bytes[..]).unwrap();
        let view = CheckView::parse(&bytes).unwrap();
        let attributes = view.attributes.unwrap();
        let want = merged.attributes.unwrap();
        let source = attributes.source.unwrap();
        let want_source = want.source.unwrap();
        assert_eq!(source.principal, want_source.principal);
        assert_eq!(source.address, Some(AddressView::Socket("10.9.9.9")));
        assert!(matches!(
            want_source.address.unwrap().address,
            Some(AddressKind::SocketAddress(_))
        ));
        let http = attributes.request.unwrap().http.unwrap();
        let want_http = want.request.unwrap().http.unwrap();
        assert_eq!(http.method, want_http.method);
        assert_eq!(http.path, want_http.path);
        for (name, value) in &want_http.headers {
            assert_eq!(http.headers.get(name), Some(value.as_str()));
        }
        let mut all: Vec<_> = want_http.headers.into_iter().collect();
        all.sort();
        assert_eq!(http.headers.select(|_| true), all);
        assert_eq!(http.headers.received_bytes(), 6);
    }

    /// A `CheckRequest` carrying just `http`, encoded.
    fn encoded_http(http: HttpRequest) -> Vec<u8> {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    time: None,
                    http: Some(http),
                }),
                ..Default::default()
            }),
        }
        .encode_to_vec()
    }

    fn parsed_headers(bytes: &[u8]) -> Headers<'_> {
        let view = CheckView::parse(bytes).unwrap();
        view.attributes
            .unwrap()
            .request
            .unwrap()
            .http
            .unwrap()
            .headers
    }

    #[test]
    fn raw_header_map_is_lower_cased_and_joined() {
        let value = |key: &str, value: &str, raw: &[u8]| HeaderValue {
            key: key.into(),
            value: value.into(),
            raw_value: raw.to_vec(),
        };
        let bytes = encoded_http(HttpRequest {
            header_map: Some(HeaderMap {
                headers: vec![
                    value("X-Tag", "", b"a"),
                    value("authorization", "Bearer x", b""),
                    value("x-tag", "", b"b"),
                    value("x-bin", "", b"\xff"),
                ],
            }),
            ..Default::default()
        });
        let headers = parsed_headers(&bytes);
        assert_eq!(headers.get("x-tag"), Some("a,b"));
        assert_eq!(headers.get("authorization"), Some("Bearer x"));
        assert_eq!(headers.get("x-bin"), Some("\u{fffd}"));
        assert_eq!(headers.get("X-Tag"), None);
        assert_eq!(headers.select(|_| true).len(), 3);
        assert_eq!(
            headers.select(|name| name == "x-tag"),
            [("x-tag".to_string(), "a,b".to_string())]
        );
    }

    /// Envoy lower-cases the `headers` map's keys; a client that is not
    /// Envoy may not, and its headers are still found (not taken as
    /// missing credentials).
    #[test]
    fn headers_map_keys_in_another_case_are_found() {
        let bytes = encoded_http(HttpRequest {
            headers: HashMap::from([
                ("Authorization".into(), "Bearer t".into()),
                ("x-request-id".into(), "r1".into()),
            ]),
            ..Default::default()
        });
        let headers = parsed_headers(&bytes);
        assert_eq!(headers.get("authorization"), Some("Bearer t"));
        assert_eq!(headers.get("x-request-id"), Some("r1"));
        assert_eq!(headers.get("x-missing"), None);
        // An exact match wins over one in another case.
        let pairs = Headers::from_pairs([("x-tag", "a"), ("X-Tag", "b")]);
        assert_eq!(pairs.get("x-tag"), Some("a"));
        assert_eq!(pairs.get("x-TAG"), Some("b"));
    }

    #[test]
    fn the_headers_map_wins_over_header_map() {
        let bytes = encoded_http(HttpRequest {
            headers: HashMap::from([("a".into(), "map".into())]),
            header_map: Some(HeaderMap {
                headers: vec![HeaderValue {
                    key: "a".into(),
                    value: "raw".into(),
                    raw_value: Vec::new(),
                }],
            }),
            ..Default::default()
        });
        assert_eq!(parsed_headers(&bytes).get("a"), Some("map"));
    }

    #[test]
    fn unknown_fields_of_every_wire_type_are_skipped() {
        let mut bytes = full_request().encode_to_vec();
        // Field 15 (a one-byte tag): varint, fixed64, fixed32, a group
        // holding a nested group (14) and a string (13), then a
        // length-delimited field.
        bytes.extend([15 << 3, 0x96, 0x01]);
        bytes.extend([(15 << 3) | 1, 1, 2, 3, 4, 5, 6, 7, 8]);
        bytes.extend([(15 << 3) | 5, 1, 2, 3, 4]);
        bytes.extend([
            (15 << 3) | 3,
            (14 << 3) | 3,
            (14 << 3) | 4,
            (13 << 3) | 2,
            1,
            b'x',
        ]);
        bytes.extend([(15 << 3) | 4]);
        bytes.extend([(15 << 3) | 2, 2, b'h', b'i']);
        // A two-byte tag (field 300).
        bytes.extend([0xe0, 0x12, 0x01]);
        assert!(CheckRequest::decode(&bytes[..]).is_ok());
        let view = CheckView::parse(&bytes).unwrap();
        assert!(view.attributes.is_some());
    }

    #[test]
    fn malformed_messages_are_errors_like_prost_makes_them() {
        let good = full_request().encode_to_vec();
        let cases: Vec<(Vec<u8>, WireError)> = vec![
            (good[..good.len() - 1].to_vec(), WireError::Truncated),
            (vec![0x0a, 0x05, 0x00], WireError::Truncated),
            (
                vec![0x08, 0x01],
                WireError::WireType {
                    field: "attributes",
                    found: 0,
                    expected: 2,
                },
            ),
            (vec![0x00, 0x00], WireError::FieldNumber),
            (vec![0x0e], WireError::UnknownWireType(6)),
            (vec![0x0c], WireError::Group),
            (vec![(2 << 3) | 3, 0x08, 0x01], WireError::Group),
            (
                vec![
                    0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                ],
                WireError::VarintTooLong,
            ),
            // attributes.source.principal with an invalid UTF-8 byte.
            (
                vec![0x0a, 0x05, 0x0a, 0x03, 0x22, 0x01, 0xff],
                WireError::Utf8("source.principal"),
            ),
        ];
        for (bytes, expected) in cases {
            assert!(CheckRequest::decode(&bytes[..]).is_err(), "{bytes:?}");
            assert_eq!(CheckView::parse(&bytes).unwrap_err(), expected, "{bytes:?}");
        }
        let mut deep = Vec::new();
        for _ in 0..=MAX_GROUP_DEPTH + 1 {
            deep.push((2 << 3) | 3);
        }
        assert_eq!(CheckView::parse(&deep).unwrap_err(), WireError::GroupDepth);
    }

    #[test]
    fn headers_from_pairs_keep_the_last_value() {
        let headers = Headers::from_pairs([("b", "1"), ("a", "x"), ("b", "2"), ("b", "3")]);
        assert_eq!(headers.get("b"), Some("3"));
        assert_eq!(headers.get("a"), Some("x"));
        assert_eq!(headers.get("c"), None);
        let pair = |name: &str, value: &str| (name.to_string(), value.to_string());
        assert_eq!(headers.select(|_| true), [pair("a", "x"), pair("b", "3")]);
        assert_eq!(headers.select(|name| name == "b"), [pair("b", "3")]);
        assert_eq!(headers.received_bytes(), 8);
        assert!(!headers.is_empty());
    }
}
