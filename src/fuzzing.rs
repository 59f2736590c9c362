//! Entry points of the fuzz targets (`fuzz/`), one per target, shared with
//! `tests/fuzz_corpus.rs`, which replays every committed corpus input and
//! artifact through the same functions as ordinary tests.
//!
//! Not an API: each function takes the raw fuzz input, never returns an
//! error, and asserts the property its target checks (a failed assertion
//! is a finding). Inputs are bounded here, so a target cannot spend its
//! time on sizes the server refuses anyway.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde_json::{Value, json};

use crate::adapter::ext_authz::jwt::JwtVerifier;
use crate::adapter::ext_authz::{CheckView, Mapping};
use crate::decision_log::spool::{Frame, SpoolReader, SpoolWriter, encode_frame};
use crate::engine::loader::{self, Inputs, SourceFile};
use crate::engine::{CheckInput, Engine, LoadOptions, RequestEntitiesMode, UidInput};

/// The longest input a target reads (libFuzzer's `-max_len` is set lower).
const MAX_INPUT: usize = 256 * 1024;

/// A small structured generator over the fuzz input: every read takes
/// bytes from the front and yields a default once they run out.
struct Source<'a> {
    data: &'a [u8],
}

impl<'a> Source<'a> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((first, rest)) => {
                self.data = rest;
                *first
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from(self.byte()) << 8 | u16::from(self.byte())
    }

    /// A number below `bound` (0 when `bound` is 0).
    fn below(&mut self, bound: usize) -> usize {
        if bound == 0 {
            return 0;
        }
        usize::from(self.u16()) % bound
    }

    fn flag(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    fn bytes(&mut self, len: usize) -> &'a [u8] {
        let len = len.min(self.data.len());
        let (head, rest) = self.data.split_at(len);
        self.data = rest;
        head
    }

    /// A short string: a length byte, then that many bytes (lossy UTF-8).
    fn text(&mut self) -> String {
        let len = usize::from(self.byte() % 24);
        String::from_utf8_lossy(self.bytes(len)).into_owned()
    }
}

/// Splits `data` into at most `n` texts at `0x01` bytes (lossy UTF-8); the
/// corpus files of the text targets are written that way.
fn fields(data: &[u8], n: usize) -> Vec<String> {
    let mut parts: Vec<String> = data
        .splitn(n, |byte| *byte == 1)
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect();
    parts.resize(n, String::new());
    parts
}

// ---------------------------------------------------------------------------
// ext_authz_wire

/// Arbiter's reader of Envoy's `CheckRequest` against `envoy_types` decoded
/// by prost: when prost decodes the message, the view reads it too and
/// sees the same values; when the view refuses it, so does prost. (The view
/// checks only the framing of fields it skips, so prost may refuse a
/// message the view reads: invalid UTF-8 in a field the mapping never
/// reads.)
pub fn ext_authz_wire(data: &[u8]) {
    use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
    use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
    use prost::Message as _;

    use crate::adapter::ext_authz::AddressView;

    if data.len() > MAX_INPUT {
        return;
    }
    let view = CheckView::parse(data);
    let decoded = CheckRequest::decode(data);
    let (view, decoded) = match (view, decoded) {
        (Ok(view), Ok(decoded)) => (view, decoded),
        (Err(error), Ok(_)) => {
            unreachable_property(&format!("the view refused what prost decodes: {error}"));
            return;
        }
        (_, Err(_)) => return,
    };
    let (Some(attributes), Some(expected)) = (&view.attributes, &decoded.attributes) else {
        assert_eq!(view.attributes.is_some(), decoded.attributes.is_some());
        return;
    };
    assert_eq!(attributes.tls_session, expected.tls_session.is_some());
    match (&attributes.source, &expected.source) {
        (None, None) => {}
        (Some(source), Some(want)) => {
            assert_eq!(source.principal, want.principal);
            let want_address = want
                .address
                .as_ref()
                .and_then(|address| address.address.as_ref())
                .map(|address| match address {
                    AddressKind::SocketAddress(socket) => AddressView::Socket(&socket.address),
                    AddressKind::Pipe(pipe) => AddressView::Pipe(&pipe.path),
                    AddressKind::EnvoyInternalAddress(_) => AddressView::Internal,
                });
            assert_eq!(source.address, want_address);
        }
        (got, want) => {
            assert_eq!(got.is_some(), want.is_some(), "attributes.source");
        }
    }
    assert_eq!(
        attributes.metadata_context().ok().flatten(),
        expected.metadata_context
    );
    match (&attributes.request, &expected.request) {
        (None, None) => {}
        (Some(request), Some(want)) => {
            assert_eq!(
                request.time_seconds,
                want.time.as_ref().map(|time| time.seconds)
            );
            match (&request.http, &want.http) {
                (None, None) => {}
                (Some(http), Some(want)) => {
                    assert_eq!(http.method, want.method);
                    assert_eq!(http.path, want.path);
                    assert_eq!(http.host, want.host);
                    assert_eq!(http.scheme, want.scheme);
                    let mut all: Vec<(String, String)> = if want.headers.is_empty() {
                        raw_headers_of(want.header_map.as_ref())
                    } else {
                        for (name, value) in &want.headers {
                            assert_eq!(http.headers.get(name), Some(value.as_str()), "{name}");
                        }
                        want.headers.clone().into_iter().collect()
                    };
                    all.sort();
                    assert_eq!(http.headers.select(|_| true), all);
                }
                (got, want) => assert_eq!(got.is_some(), want.is_some(), "request.http"),
            }
        }
        (got, want) => assert_eq!(got.is_some(), want.is_some(), "attributes.request"),
    }
}

/// `header_map` as the view documents it: names lower-cased, `raw_value`
/// (lossy UTF-8) when set, repeats joined with `,` in order.
fn raw_headers_of(
    map: Option<&envoy_types::pb::envoy::config::core::v3::HeaderMap>,
) -> Vec<(String, String)> {
    let mut joined: Vec<(String, String)> = Vec::new();
    let Some(map) = map else {
        return joined;
    };
    for header in &map.headers {
        let name = header.key.to_ascii_lowercase();
        let value = if header.raw_value.is_empty() {
            header.value.clone()
        } else {
            String::from_utf8_lossy(&header.raw_value).into_owned()
        };
        match joined.iter_mut().find(|(known, _)| *known == name) {
            Some((_, known)) => {
                known.push(',');
                known.push_str(&value);
            }
            None => joined.push((name, value)),
        }
    }
    joined
}

/// A property that does not hold: the target's finding.
#[allow(clippy::panic)]
fn unreachable_property(message: &str) {
    panic!("fuzz property violated: {message}");
}

// ---------------------------------------------------------------------------
// check_request

/// The embedded example policy set, one engine per request-entities mode.
fn engines() -> &'static [(RequestEntitiesMode, Engine)] {
    static ENGINES: OnceLock<Vec<(RequestEntitiesMode, Engine)>> = OnceLock::new();
    ENGINES.get_or_init(|| {
        let inputs = embedded();
        [
            RequestEntitiesMode::Add,
            RequestEntitiesMode::Merge,
            RequestEntitiesMode::Replace,
        ]
        .into_iter()
        .map(|mode| {
            let mut options = LoadOptions {
                request_entities: mode,
                ..LoadOptions::default()
            };
            if mode != RequestEntitiesMode::Add {
                // Every call evaluates (the default mode keeps the cache).
                options.decision_cache_capacity = 0;
            }
            let engine = Engine::new();
            match loader::build(&inputs, options) {
                Ok((snapshot, _)) => engine.publish(snapshot),
                Err(error) => unreachable_property(&format!("the embedded set loads: {error}")),
            }
            (mode, engine)
        })
        .collect()
    })
}

fn embedded() -> Inputs {
    match loader::read_inputs(&crate::engine::Sources::default()) {
        Ok(inputs) => inputs,
        Err(error) => {
            unreachable_property(&format!("the embedded set reads: {error}"));
            Inputs {
                policy_files: Vec::new(),
                single_file: false,
                schema: None,
                entities: None,
                template_links: None,
            }
        }
    }
}

fn engine(mode: RequestEntitiesMode) -> Option<&'static Engine> {
    engines()
        .iter()
        .find(|(known, _)| *known == mode)
        .map(|(_, engine)| engine)
}

fn mode_of(byte: u8) -> RequestEntitiesMode {
    match byte % 3 {
        0 => RequestEntitiesMode::Add,
        1 => RequestEntitiesMode::Merge,
        _ => RequestEntitiesMode::Replace,
    }
}

/// An `arbiter.v1.CheckRequest`'s fields through `Engine::check` on the
/// embedded set: a decision or a request error, never a panic. Input: the
/// mode byte, then `0x01`-separated principal type, principal id, action
/// type, action id, resource type, resource id, context JSON, entities
/// JSON (an empty type leaves that uid out).
pub fn check_request(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let parts = fields(rest, 8);
    let uid = |at: usize| {
        (!parts[at].is_empty()).then(|| UidInput {
            type_name: &parts[at],
            id: &parts[at + 1],
        })
    };
    let input = CheckInput {
        principal: uid(0),
        action: uid(2),
        resource: uid(4),
        context_json: &parts[6],
        entities_json: &parts[7],
    };
    if let Some(Ok(decision)) = engine(mode_of(*mode)).map(|engine| engine.check(&input)) {
        assert!(!decision.decision_id.is_empty());
    }
}

// ---------------------------------------------------------------------------
// entities_and_context

const TYPES: &[&str] = &[
    "Saas::Role",
    "Saas::Group",
    "Saas::User",
    "Saas::Folder",
    "Saas::Document",
    "Saas::Tenant",
    "Saas::Action",
    "Other",
];

/// Entities and a context built from the input by a small generator:
/// chains, fan-out, random parents, cycles, duplicate uids, attributes of
/// every JSON kind; decided as request entities (modes `add` and
/// `replace`) and loaded as the entities file. Never a panic; the
/// embedded file's limits hold (a chain longer than the hierarchy limit
/// is refused, not loaded).
pub fn entities_and_context(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let mut source = Source { data };
    let shape = source.byte();
    // Mostly small; now and then past the limits (depth 100 by default,
    // 1,000 request entities).
    let count = if shape & 0xf0 == 0xf0 {
        source.below(3_000)
    } else {
        source.below(64)
    };
    let ids = 1 + source.below(count.max(1) * 2);
    let uid_of = |type_at: usize, id: usize| json!({"type": TYPES[type_at % TYPES.len()], "id": id.to_string()});
    let base_type = source.below(TYPES.len());
    let mut entities = Vec::with_capacity(count);
    for at in 0..count {
        let mut parents = Vec::new();
        match shape % 5 {
            // A chain: each entity the parent of the next.
            0 => {
                if at > 0 {
                    parents.push(uid_of(base_type, at - 1));
                }
            }
            // Fan-out: one parent of all.
            1 => {
                if at > 0 {
                    parents.push(uid_of(base_type, 0));
                }
            }
            // A cycle: a chain whose first entity has the last as parent.
            2 => parents.push(uid_of(base_type, (at + count - 1) % count.max(1))),
            // Random parents, from the input.
            _ => {
                for _ in 0..source.below(4) {
                    parents.push(uid_of(source.byte().into(), source.below(ids)));
                }
            }
        }
        let id = if shape % 5 < 3 { at } else { source.below(ids) };
        let type_at = if shape % 5 < 3 {
            base_type
        } else {
            source.byte().into()
        };
        let mut attrs = serde_json::Map::new();
        for _ in 0..source.below(4) {
            let name = [
                "name",
                "tenant",
                "status",
                "clearance",
                "owner",
                "plan",
                "x",
            ][source.below(7)]
            .to_string();
            attrs.insert(name, value(&mut source, 3));
        }
        entities.push(json!({"uid": uid_of(type_at, id), "attrs": attrs, "parents": parents}));
    }
    let entities_json = Value::Array(entities).to_string();
    let mut context = serde_json::Map::new();
    for _ in 0..source.below(6) {
        let name = ["mfa", "source_ip", "auth_level", "extra"][source.below(4)].to_string();
        context.insert(name, value(&mut source, 6));
    }
    let context_json = Value::Object(context).to_string();
    let principal = (source.below(ids), source.byte());
    let resource = (source.below(ids), source.byte());
    let principal_id = principal.0.to_string();
    let resource_id = resource.0.to_string();
    let actions = [
        "read",
        "write",
        "delete",
        "share",
        "manage_members",
        "admin",
    ];
    let action = actions[source.below(actions.len())];
    let input = CheckInput {
        principal: Some(UidInput {
            type_name: TYPES[usize::from(principal.1) % TYPES.len()],
            id: &principal_id,
        }),
        action: Some(UidInput {
            type_name: "Saas::Action",
            id: action,
        }),
        resource: Some(UidInput {
            type_name: TYPES[usize::from(resource.1) % TYPES.len()],
            id: &resource_id,
        }),
        context_json: &context_json,
        entities_json: &entities_json,
    };
    for mode in [RequestEntitiesMode::Add, RequestEntitiesMode::Replace] {
        if let Some(engine) = engine(mode) {
            let _ = engine.check(&input);
        }
    }
    // The same entities as the entities file, with the embedded policies
    // and schema, and without a schema.
    let mut inputs = embedded();
    inputs.entities = Some(SourceFile {
        name: "entities.json".into(),
        text: Arc::from(entities_json.as_str()),
    });
    let loaded = loader::build(&inputs, LoadOptions::default());
    let depth_limit = crate::engine::DEFAULT_MAX_HIERARCHY_DEPTH as usize;
    if shape.is_multiple_of(5) && count > depth_limit + 2 && loaded.is_ok() {
        unreachable_property(&format!(
            "a chain of {count} loaded past the hierarchy limit"
        ));
    }
    inputs.schema = None;
    let options = LoadOptions {
        validate_policies: false,
        validate_requests: false,
        ..LoadOptions::default()
    };
    if let Ok((snapshot, _)) = loader::build(&inputs, options) {
        let engine = Engine::new();
        engine.publish(snapshot);
        let _ = engine.check(&CheckInput {
            entities_json: "",
            ..input
        });
    }
}

/// A JSON value of any kind, nested at most `depth` deep: Cedar's
/// extension and entity escapes included.
fn value(source: &mut Source<'_>, depth: u32) -> Value {
    match source.byte() % 12 {
        0 => Value::Bool(source.flag()),
        1 => json!(i64::from(source.u16() as i16) * i64::from(source.byte())),
        2 => json!(source.text()),
        3 => {
            json!({"__entity": {"type": TYPES[source.below(TYPES.len())], "id": source.below(8).to_string()}})
        }
        4 => json!({"__extn": {"fn": "ip", "arg": source.text()}}),
        5 => {
            let function = ["decimal", "ip", "datetime", "duration", "nope"][source.below(5)];
            json!({"__extn": {"fn": function, "arg": source.text()}})
        }
        6 => json!("10.0.0.1"),
        7 => json!(1.5),
        8 => Value::Null,
        9 if depth > 0 => {
            let len = source.below(4);
            Value::Array((0..len).map(|_| value(source, depth - 1)).collect())
        }
        10 if depth > 0 => {
            let mut record = serde_json::Map::new();
            for _ in 0..source.below(4) {
                record.insert(source.text(), value(source, depth - 1));
            }
            Value::Object(record)
        }
        _ => json!(source.text()),
    }
}

// ---------------------------------------------------------------------------
// jwt

const ISSUER: &str = "https://idp.example.com/";
const AUDIENCE: &str = "docs-api";

/// The Ed25519 key `ed-1` of `tests/fixtures/jwt`, whose public half is
/// in `jwks-a.json`.
const ED_KEY: &str = include_str!("../tests/fixtures/jwt/ed-1.pem");

struct JwtFixture {
    verifier: Arc<JwtVerifier>,
    mapping: Option<Mapping>,
    runtime: tokio::runtime::Runtime,
    key: Option<jsonwebtoken::EncodingKey>,
}

fn jwt_fixture() -> Option<&'static JwtFixture> {
    static FIXTURE: OnceLock<Option<JwtFixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            let jwks =
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt/jwks-a.json");
            // The deployed example mapping, with the fixture's keys.
            let file: crate::config::ConfigFile =
                toml::from_str(include_str!("../deploy/arbiter/ext-authz.toml")).ok()?;
            let mut config = file.ext_authz?;
            let jwt = config.principal.jwt.as_mut()?;
            jwt.jwks_url = None;
            jwt.jwks_file = Some(jwks);
            // No cache: every call verifies.
            jwt.token_cache_size = 0;
            let verifier = JwtVerifier::build(jwt).ok()?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            Some(JwtFixture {
                verifier,
                mapping: Mapping::compile(&config).ok(),
                runtime,
                key: jsonwebtoken::EncodingKey::from_ed_pem(ED_KEY.as_bytes()).ok(),
            })
        })
        .as_ref()
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (at, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if at <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            }
        }
    }
    out
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// JWT header and claims through the verifier (the example's issuer and
/// audience, the fixture JWKS) and a verified token's claims through the
/// example mapping. The first byte picks the form:
/// - 0: the rest is the token, as is;
/// - 1: the rest is `header JSON 0x01 claims JSON`, both signed with the
///   fixed Ed25519 key as given (any header, any claims);
/// - 2: the rest is a JSON value laid over valid claims (or, if not an
///   object, taken as `sub`), signed with a valid header: mostly verified,
///   so the claims reach the mapping.
///
/// Never a panic; a token that verifies has the configured issuer and
/// audience and an `exp` not in the past (beyond the leeway).
pub fn jwt(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let Some(fixture) = jwt_fixture() else {
        unreachable_property("the JWT fixture builds");
        return;
    };
    let Some((form, rest)) = data.split_first() else {
        return;
    };
    let sign = |header: &[u8], claims: &[u8]| -> Option<String> {
        let key = fixture.key.as_ref()?;
        let message = format!("{}.{}", base64url(header), base64url(claims));
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), key, jsonwebtoken::Algorithm::EdDSA)
                .ok()?;
        Some(format!("{message}.{signature}"))
    };
    let token = match form % 3 {
        0 => Some(String::from_utf8_lossy(rest).into_owned()),
        1 => {
            let parts: Vec<&[u8]> = rest.splitn(2, |byte| *byte == 1).collect();
            sign(
                parts.first().copied().unwrap_or_default(),
                parts.get(1).copied().unwrap_or_default(),
            )
        }
        _ => {
            let mut claims = json!({
                "iss": ISSUER,
                "aud": AUDIENCE,
                "sub": "alice",
                "iat": now_secs(),
                "exp": now_secs() + 600,
            });
            match serde_json::from_slice::<Value>(rest) {
                Ok(Value::Object(fields)) => {
                    if let Value::Object(claims) = &mut claims {
                        claims.extend(fields);
                    }
                }
                Ok(other) => claims["sub"] = other,
                Err(_) => claims["sub"] = json!(String::from_utf8_lossy(rest)),
            }
            sign(
                br#"{"alg":"EdDSA","typ":"JWT","kid":"ed-1"}"#,
                claims.to_string().as_bytes(),
            )
        }
    };
    let Some(token) = token else {
        return;
    };
    let verified = fixture.runtime.block_on(fixture.verifier.verify(&token));
    let Ok(verified) = verified else {
        return;
    };
    let claims = &verified.claims;
    assert_eq!(claims.get("iss").and_then(Value::as_str), Some(ISSUER));
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => aud == AUDIENCE,
        Some(Value::Array(auds)) => auds.iter().any(|aud| aud.as_str() == Some(AUDIENCE)),
        _ => false,
    };
    assert!(audience_ok, "verified with aud {:?}", claims.get("aud"));
    if let Some(mapping) = &fixture.mapping {
        let _ = mapping.map_claims(claims);
    }
}

// ---------------------------------------------------------------------------
// policy_loader

/// The loader over arbitrary texts: the first byte picks which files are
/// present and the schema's format; then `0x01`-separated policies (split
/// into up to three files at `0x02`), schema, entities, config file TOML.
/// Never a panic; a load that succeeds can decide a request.
pub fn policy_loader(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let Some((flags, rest)) = data.split_first() else {
        return;
    };
    let parts = fields(rest, 4);
    let policy_files = parts[0]
        .split('\u{2}')
        .take(3)
        .enumerate()
        .map(|(at, text)| SourceFile {
            name: format!("policy{at}.cedar"),
            text: Arc::from(text),
        })
        .collect::<Vec<_>>();
    let single_file = flags & 1 == 1 && policy_files.len() == 1;
    let schema = (flags & 2 == 2).then(|| SourceFile {
        name: if flags & 4 == 4 {
            "schema.cedarschema.json".into()
        } else {
            "schema.cedarschema".into()
        },
        text: Arc::from(parts[1].as_str()),
    });
    let entities = (flags & 8 == 8).then(|| SourceFile {
        name: "entities.json".into(),
        text: Arc::from(parts[2].as_str()),
    });
    let inputs = Inputs {
        policy_files,
        single_file,
        schema,
        entities,
        template_links: None,
    };
    let options = LoadOptions {
        validate_policies: flags & 16 == 0,
        ..LoadOptions::default()
    };
    if let Ok((snapshot, _)) = loader::build(&inputs, options) {
        let engine = Engine::new();
        engine.publish(snapshot);
        let _ = engine.check(&CheckInput {
            principal: Some(UidInput {
                type_name: "Saas::User",
                id: "alice",
            }),
            action: Some(UidInput {
                type_name: "Saas::Action",
                id: "read",
            }),
            resource: Some(UidInput {
                type_name: "Saas::Document",
                id: "acme-roadmap",
            }),
            ..CheckInput::default()
        });
    }
    if let Ok(crate::config::ConfigFile {
        ext_authz: Some(ext_authz),
        ..
    }) = toml::from_str(&parts[3])
    {
        let _ = Mapping::compile(&ext_authz);
    }
}

// ---------------------------------------------------------------------------
// spool_reader

/// A fresh directory for one spool, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Option<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "arbiter-fuzz-spool-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).ok()?;
        Some(ScratchDir(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Spool segments written from the input, then damaged (bytes flipped,
/// cut short, garbage appended, frames with any sequence number), then
/// opened and read to the end by a sink. Never a panic, and every record
/// in a segment before its first damaged byte is read back intact, in
/// order.
///
/// Input: segment size byte, record count, records (id, payload), then
/// damage operations.
pub fn spool_reader(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let Some(dir) = ScratchDir::new() else {
        return;
    };
    let mut source = Source { data };
    let segment_bytes = 64 + 16 * u64::from(source.byte());
    let count = source.below(200);
    let sinks = vec!["a".to_string()];
    let mut written: Vec<Frame> = Vec::with_capacity(count);
    {
        let Ok((mut writer, _)) = SpoolWriter::open(&dir.0, segment_bytes, 1 << 30, &sinks) else {
            return;
        };
        for _ in 0..count {
            let id = source.text();
            let len = source.below(300);
            let payload = bytes::Bytes::copy_from_slice(source.bytes(len));
            let seq = writer.push(&id, &payload);
            written.push(Frame {
                seq,
                id: bytes::Bytes::from(id),
                payload,
            });
            if source.byte().is_multiple_of(4) && writer.flush().is_err() {
                return;
            }
        }
        if writer.flush().is_err() {
            return;
        }
    }
    // Segments and where each is first damaged.
    let mut segments: Vec<(u64, PathBuf, u64)> = Vec::new();
    if let Ok(read) = std::fs::read_dir(&dir.0) {
        for entry in read.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(first) = name.strip_suffix(".seg").and_then(|s| s.parse().ok()) {
                segments.push((first, entry.path(), u64::MAX));
            }
        }
    }
    segments.sort();
    for _ in 0..source.below(6) {
        if segments.is_empty() {
            break;
        }
        let at = source.below(segments.len());
        let (_, path, damaged) = &mut segments[at];
        let Ok(mut bytes) = std::fs::read(&*path) else {
            continue;
        };
        match source.byte() % 4 {
            0 if !bytes.is_empty() => {
                let offset = source.below(bytes.len());
                bytes[offset] ^= source.byte() | 1;
                *damaged = (*damaged).min(offset as u64);
            }
            1 => {
                let keep = source.below(bytes.len() + 1);
                bytes.truncate(keep);
                *damaged = (*damaged).min(keep as u64);
            }
            2 => {
                *damaged = (*damaged).min(bytes.len() as u64);
                let len = source.below(64);
                bytes.extend_from_slice(source.bytes(len));
            }
            _ => {
                // A well-framed record with any sequence number appended.
                *damaged = (*damaged).min(bytes.len() as u64);
                let seq = match source.byte() % 3 {
                    0 => u64::MAX,
                    1 => 0,
                    _ => u64::from(source.u16()),
                };
                let id = source.text();
                encode_frame(&mut bytes, seq, &id, b"{}");
            }
        }
        if std::fs::write(&*path, &bytes).is_err() {
            return;
        }
    }
    // What must come back: per segment, the records wholly before its
    // first damaged byte.
    let mut expected: Vec<&Frame> = Vec::new();
    let mut records = written.iter().peekable();
    for (at, (first, _, damaged)) in segments.iter().enumerate() {
        let end = segments.get(at + 1).map_or(u64::MAX, |next| next.0);
        let mut offset = 0u64;
        while let Some(frame) = records.next_if(|frame| frame.seq >= *first && frame.seq < end) {
            let id_len = frame.id.len().min(255) as u64;
            offset +=
                crate::decision_log::spool::FRAME_OVERHEAD + id_len + frame.payload.len() as u64;
            if offset <= *damaged {
                expected.push(frame);
            }
        }
    }
    let Ok((writer, _)) = SpoolWriter::open(&dir.0, segment_bytes, 1 << 30, &sinks) else {
        return;
    };
    let mut reader = SpoolReader::new(&dir.0, "a", 0, writer.shared());
    let mut read: Vec<Frame> = Vec::new();
    for _ in 0..10_000 {
        match reader.read(64) {
            Ok(batch) if batch.is_empty() => break,
            Ok(batch) => read.extend(batch),
            Err(_) => break,
        }
    }
    for frame in expected {
        if !read.contains(frame) {
            unreachable_property(&format!(
                "intact record {} (id {:?}) was not read back; read {:?}",
                frame.seq,
                frame.id,
                read.iter().map(|frame| frame.seq).collect::<Vec<_>>()
            ));
        }
    }
}
