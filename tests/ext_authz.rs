//! `envoy.service.auth.v3.Authorization/Check` end to end: a real server on
//! 127.0.0.1:0 with the mapping of `deploy/arbiter/ext-authz.toml`, and
//! requests shaped as Envoy sends them (`attributes.request.http` with the
//! method, the path with its query, lower-cased headers and host; source and
//! destination addresses; `metadata_context`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::raw::RawCodec;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arbiter::adapter::ext_authz::ExtAuthzConfig;
use arbiter::app::{ServeConfig, UdsConfig};
use arbiter::config::ServeArgs;
use arbiter::engine::Sources;
use common::TestServer;
use envoy_types::pb::envoy::config::core::v3::address::Address;
use envoy_types::pb::envoy::config::core::v3::{Metadata, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf::{Struct, Timestamp, Value as PbValue, value::Kind};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prost::Message as _;
use serde_json::{Value, json};
use tonic::transport::Channel;

const ISSUER: &str = "https://idp.example.com/";
const AUDIENCE: &str = "docs-api";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/jwt").join(name)
}

/// The deployed example mapping, with keys from a fixture file.
fn example_mapping() -> ExtAuthzConfig {
    let args = ServeArgs {
        config: Some(root().join("deploy/arbiter/ext-authz.toml")),
        ..ServeArgs::default()
    };
    let mut mapping = args.resolve().unwrap().listeners.ext_authz.unwrap();
    let jwt = mapping.principal.jwt.as_mut().unwrap();
    jwt.jwks_url = None;
    jwt.jwks_file = Some(fixture("jwks-a.json"));
    mapping
}

fn server_config(mapping: ExtAuthzConfig) -> ServeConfig {
    let mut config = common::config(Sources::default());
    config.listeners.ext_authz = Some(mapping);
    config
}

async fn client(addr: SocketAddr) -> AuthorizationClient<Channel> {
    AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str) -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "iat": now(),
        "exp": now() + 600,
        "mfa": true,
    })
}

fn sign_with(key: &str, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let pem = std::fs::read(fixture(&format!("{key}.pem"))).unwrap();
    let encoding = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem).unwrap(),
        other => panic!("{other:?}"),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &encoding).unwrap()
}

fn token(sub: &str) -> String {
    sign_with("rsa-1", Algorithm::RS256, Some("rsa-1"), &claims(sub))
}

/// An Envoy-shaped `CheckRequest`.
struct Http {
    method: &'static str,
    path: String,
    host: &'static str,
    headers: Vec<(String, String)>,
    source: &'static str,
    peer_principal: &'static str,
    metadata: Option<Metadata>,
}

fn http(method: &'static str, path: &str) -> Http {
    Http {
        method,
        path: path.to_string(),
        host: "docs.example.com",
        headers: Vec::new(),
        source: "10.1.2.3",
        peer_principal: "",
        metadata: None,
    }
}

impl Http {
    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    fn from(mut self, source: &'static str) -> Self {
        self.source = source;
        self
    }

    fn request(self) -> CheckRequest {
        let mut headers: HashMap<String, String> = HashMap::from([
            (":authority".into(), self.host.into()),
            (":method".into(), self.method.into()),
            (":path".into(), self.path.clone()),
            (":scheme".into(), "http".into()),
            ("user-agent".into(), "curl/8.5.0".into()),
            (
                "x-request-id".into(),
                "5f8e1b2c-0d1e-4c7a-9a57-1d2e3f4a5b6c".into(),
            ),
            (
                "traceparent".into(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            ),
        ]);
        for (name, value) in self.headers {
            headers.insert(name.to_ascii_lowercase(), value);
        }
        let peer = |address: &str, port: u32, principal: &str| {
            Peer {
            address: Some(envoy_types::pb::envoy::config::core::v3::Address {
                address: Some(Address::SocketAddress(SocketAddress {
                    address: address.into(),
                    port_specifier: Some(
                        envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(port),
                    ),
                    ..Default::default()
                })),
            }),
            principal: principal.into(),
            ..Default::default()
        }
        };
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(peer(self.source, 53211, self.peer_principal)),
                destination: Some(peer("10.0.0.7", 8080, "")),
                request: Some(Request {
                    time: Some(Timestamp {
                        seconds: now() as i64,
                        nanos: 0,
                    }),
                    http: Some(HttpRequest {
                        id: "12345".into(),
                        method: self.method.into(),
                        headers,
                        path: self.path,
                        host: self.host.into(),
                        scheme: "http".into(),
                        protocol: "HTTP/1.1".into(),
                        ..Default::default()
                    }),
                }),
                metadata_context: self.metadata,
                ..Default::default()
            }),
        }
    }
}

/// The parts of an answer the tests look at.
#[derive(Debug)]
struct Answer {
    grpc_code: i32,
    http_status: u16,
    headers: HashMap<String, String>,
    body: String,
    metadata: Option<Struct>,
}

impl Answer {
    fn allowed(&self) -> bool {
        self.grpc_code == 0 && self.http_status == 200
    }
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
    fn body_json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

fn answer(response: CheckResponse) -> Answer {
    let grpc_code = response.status.as_ref().map_or(-1, |s| s.code);
    let to_map = |headers: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]| {
        headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect::<HashMap<_, _>>()
    };
    match response.http_response {
        Some(HttpResponse::OkResponse(ok)) => Answer {
            grpc_code,
            http_status: 200,
            headers: to_map(&ok.headers),
            body: String::new(),
            metadata: response.dynamic_metadata,
        },
        Some(HttpResponse::DeniedResponse(denied)) => Answer {
            grpc_code,
            http_status: denied.status.map_or(0, |s| s.code as u16),
            headers: to_map(&denied.headers),
            body: denied.body,
            metadata: response.dynamic_metadata,
        },
        other => panic!("unexpected http_response {other:?}"),
    }
}

async fn check(client: &mut AuthorizationClient<Channel>, request: Http) -> Answer {
    answer(client.check(request.request()).await.unwrap().into_inner())
}

fn metadata_string(answer: &Answer, key: &str) -> String {
    match answer
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(key))
        .and_then(|v| v.kind.clone())
    {
        Some(Kind::StringValue(s)) => s,
        other => panic!("metadata `{key}`: {other:?}"),
    }
}

fn assert_denied(answer: &Answer, status: u16) {
    assert!(!answer.allowed(), "{answer:?}");
    assert_eq!(answer.http_status, status, "{answer:?}");
    let id = answer.header("x-arbiter-decision-id");
    assert!(!id.is_empty(), "{answer:?}");
    assert_eq!(answer.header("content-type"), "application/json");
    let body = answer.body_json();
    assert_eq!(body["decision_id"], id);
    assert_eq!(body["decision"], "deny");
    // Only the decision id, the outcome and a fixed reason word.
    assert_eq!(body.as_object().unwrap().len(), 3, "{body}");
}

#[tokio::test]
async fn jwt_principal_allow_and_deny_with_envoy_shaped_requests() {
    let server = TestServer::start(server_config(example_mapping())).await;
    let mut client = client(server.addr).await;

    // bob (acme/editor) may write the roadmap.
    let allow = check(
        &mut client,
        http("PUT", "/tenants/acme/documents/acme-roadmap?draft=1").bearer(&token("bob")),
    )
    .await;
    assert!(allow.allowed(), "{allow:?}");
    let id = allow.header("x-arbiter-decision-id").to_string();
    assert!(!id.is_empty());
    assert_eq!(allow.header("x-arbiter-principal"), "bob");
    assert_eq!(metadata_string(&allow, "decision_id"), id);
    assert_eq!(metadata_string(&allow, "principal"), "Saas::User::\"bob\"");
    let policies = allow
        .metadata
        .as_ref()
        .unwrap()
        .fields
        .get("policies")
        .unwrap();
    match &policies.kind {
        Some(Kind::ListValue(list)) => {
            assert_eq!(list.values.len(), 1);
            assert_eq!(
                list.values[0].kind,
                Some(Kind::StringValue("editor-can-write".into()))
            );
        }
        other => panic!("{other:?}"),
    }

    // carol (viewer) may read but not write.
    let read = check(
        &mut client,
        http("GET", "/tenants/acme/documents/acme-roadmap").bearer(&token("carol")),
    )
    .await;
    assert!(read.allowed(), "{read:?}");
    let deny = check(
        &mut client,
        http("PUT", "/tenants/acme/documents/acme-roadmap").bearer(&token("carol")),
    )
    .await;
    assert_denied(&deny, 403);
    assert_eq!(deny.grpc_code, 7);
    assert_ne!(deny.header("x-arbiter-decision-id"), id);
    assert_eq!(deny.body_json()["reason"], "forbidden");

    // Tenant isolation: gina (globex admin) cannot read acme's roadmap, even
    // through a URL that names her own tenant (the cached tenant wins).
    let cross = check(
        &mut client,
        http("GET", "/tenants/globex/documents/acme-roadmap").bearer(&token("gina")),
    )
    .await;
    assert_denied(&cross, 403);

    server.stop().await.unwrap();
}

#[tokio::test]
async fn rs256_es256_and_eddsa_tokens_are_accepted() {
    let server = TestServer::start(server_config(example_mapping())).await;
    let mut client = client(server.addr).await;
    for (key, alg) in [
        ("rsa-1", Algorithm::RS256),
        ("ec-1", Algorithm::ES256),
        ("ed-1", Algorithm::EdDSA),
    ] {
        let token = sign_with(key, alg, Some(key), &claims("carol"));
        let answer = check(
            &mut client,
            http("GET", "/tenants/acme/documents/acme-roadmap").bearer(&token),
        )
        .await;
        assert!(answer.allowed(), "{key}: {answer:?}");
        // Without a kid, the key pinned to the token's algorithm is used.
        let token = sign_with(key, alg, None, &claims("carol"));
        let answer = check(
            &mut client,
            http("GET", "/tenants/acme/documents/acme-roadmap").bearer(&token),
        )
        .await;
        assert!(answer.allowed(), "{key} without kid: {answer:?}");
    }
    server.stop().await.unwrap();
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn bad_tokens_are_401_with_a_bearer_challenge() {
    let server = TestServer::start(server_config(example_mapping())).await;
    let mut client = client(server.addr).await;
    let path = "/tenants/acme/documents/acme-roadmap";

    let mut expired = claims("carol");
    expired["exp"] = json!(now() - 3600);
    let mut early = claims("carol");
    early["nbf"] = json!(now() + 3600);
    let mut wrong_audience = claims("carol");
    wrong_audience["aud"] = json!("other-api");
    let mut wrong_issuer = claims("carol");
    wrong_issuer["iss"] = json!("https://evil.example.com/");
    let mut no_exp = claims("carol");
    no_exp.as_object_mut().unwrap().remove("exp");
    let payload = b64(claims("carol").to_string().as_bytes());
    let none_token = format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
    let none_kid_token = format!(
        "{}.{payload}.",
        b64(br#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#)
    );
    // HS256 with the RSA key's public modulus as the secret: the classic
    // algorithm confusion. The kid names an RS256 key: refused.
    let hs256 = {
        let header = Header {
            kid: Some("rsa-1".into()),
            ..Header::new(Algorithm::HS256)
        };
        jsonwebtoken::encode(
            &header,
            &claims("carol"),
            &EncodingKey::from_secret(b"public-key-bytes").unwrap(),
        )
        .unwrap()
    };
    // Signed with rsa-2 but claiming rsa-1's kid: bad signature.
    let forged = sign_with("rsa-2", Algorithm::RS256, Some("rsa-1"), &claims("carol"));
    // ES256 token naming the RSA key.
    let confused = sign_with("ec-1", Algorithm::ES256, Some("rsa-1"), &claims("carol"));
    // A valid token with its payload swapped.
    let tampered = {
        let good = token("carol");
        let parts: Vec<&str> = good.split('.').collect();
        let evil = b64(claims("alice").to_string().as_bytes());
        format!("{}.{evil}.{}", parts[0], parts[2])
    };
    let cases = [
        (
            "expired",
            sign_with("rsa-1", Algorithm::RS256, Some("rsa-1"), &expired),
        ),
        (
            "not yet valid",
            sign_with("rsa-1", Algorithm::RS256, Some("rsa-1"), &early),
        ),
        (
            "wrong audience",
            sign_with("rsa-1", Algorithm::RS256, Some("rsa-1"), &wrong_audience),
        ),
        (
            "wrong issuer",
            sign_with("rsa-1", Algorithm::RS256, Some("rsa-1"), &wrong_issuer),
        ),
        (
            "no exp",
            sign_with("rsa-1", Algorithm::RS256, Some("rsa-1"), &no_exp),
        ),
        ("alg none", none_token),
        ("alg none with kid", none_kid_token),
        ("hs256 confusion", hs256),
        ("invalid signature", forged),
        ("es256 header on rsa key", confused),
        ("tampered payload", tampered),
        (
            "unknown kid",
            sign_with("rsa-2", Algorithm::RS256, Some("rsa-9"), &claims("carol")),
        ),
        ("garbage", "not.a.jwt".into()),
    ];
    for (name, token) in cases {
        let answer = check(&mut client, http("GET", path).bearer(&token)).await;
        assert_denied(&answer, 401);
        assert_eq!(answer.grpc_code, 16, "{name}");
        assert_eq!(
            answer.header("www-authenticate"),
            "Bearer realm=\"docs\", error=\"invalid_token\"",
            "{name}"
        );
        assert_eq!(
            answer.body_json()["reason"],
            "invalid_credentials",
            "{name}"
        );
    }

    // Missing credentials: a challenge without an error.
    for request in [
        http("GET", path),
        http("GET", path).header("authorization", "Basic Y2Fyb2w6cHc="),
        http("GET", path).header("authorization", "Bearer "),
    ] {
        let answer = check(&mut client, request).await;
        assert_denied(&answer, 401);
        assert_eq!(answer.header("www-authenticate"), "Bearer realm=\"docs\"");
        assert_eq!(answer.body_json()["reason"], "unauthenticated");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn routes_captures_unmatched_and_hosts() {
    let mut mapping = example_mapping();
    mapping.routes[0].host = Some("*.example.com".into());
    let server = TestServer::start(server_config(mapping)).await;
    let mut client = client(server.addr).await;
    let carol = token("carol");

    let answer = check(
        &mut client,
        http("GET", "/tenants/acme/documents/acme-handbook").bearer(&carol),
    )
    .await;
    assert!(answer.allowed(), "{answer:?}");
    assert_eq!(answer.header("x-arbiter-resource"), "acme-handbook");

    // Host with a port still matches; another host does not.
    let mut request = http("GET", "/tenants/acme/documents/acme-handbook").bearer(&carol);
    request.host = "docs.example.com:8443";
    assert!(check(&mut client, request).await.allowed());
    let mut request = http("GET", "/tenants/acme/documents/acme-handbook").bearer(&carol);
    request.host = "docs.example.org";
    assert_denied(&check(&mut client, request).await, 403);

    // Unmatched: unknown path, wrong method, extra segment. Denied before
    // any credential is looked at.
    for request in [
        http("GET", "/tenants/acme/secrets"),
        http("POST", "/tenants/acme/documents/acme-handbook").bearer(&carol),
        http("GET", "/tenants/acme/documents/acme-handbook/extra").bearer(&carol),
        http("GET", "/").bearer(&carol),
    ] {
        let answer = check(&mut client, request).await;
        assert_denied(&answer, 403);
    }

    // Captures build the resource: admin route on the tenant itself.
    let mut admin = claims("alice");
    admin["mfa"] = json!(true);
    let alice = sign_with("rsa-1", Algorithm::RS256, Some("rsa-1"), &admin);
    let answer = check(
        &mut client,
        http("POST", "/tenants/acme/admin").bearer(&alice),
    )
    .await;
    assert!(answer.allowed(), "{answer:?}");
    assert_eq!(answer.header("x-arbiter-tenant"), "acme");
    let answer = check(
        &mut client,
        http("POST", "/tenants/globex/admin").bearer(&alice),
    )
    .await;
    assert_denied(&answer, 403);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn unmatched_default_can_be_allow() {
    let mut mapping = example_mapping();
    mapping.unmatched = arbiter::adapter::ext_authz::mapping::Unmatched::Allow;
    let server = TestServer::start(server_config(mapping)).await;
    let mut client = client(server.addr).await;
    let answer = check(&mut client, http("GET", "/healthz")).await;
    assert!(answer.allowed(), "{answer:?}");
    assert!(!answer.header("x-arbiter-decision-id").is_empty());
    // Matched routes still need credentials.
    let answer = check(
        &mut client,
        http("GET", "/tenants/acme/documents/acme-roadmap"),
    )
    .await;
    assert_denied(&answer, 401);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn paths_are_normalised_before_matching() {
    let server = TestServer::start(server_config(example_mapping())).await;
    let mut client = client(server.addr).await;
    let carol = token("carol");
    let get = |path: &str| http("GET", path).bearer(&carol);

    // Percent-encoded characters are decoded once: the resource is the
    // decoded id.
    let answer = check(&mut client, get("/tenants/acme/documents/acme%2Droadmap")).await;
    assert!(answer.allowed(), "{answer:?}");
    assert_eq!(answer.header("x-arbiter-resource"), "acme-roadmap");
    // Duplicate slashes and `.` segments collapse.
    let answer = check(&mut client, get("//tenants/./acme//documents/acme-roadmap")).await;
    assert!(answer.allowed(), "{answer:?}");
    assert_eq!(answer.header("x-arbiter-resource"), "acme-roadmap");
    // `..` is resolved first, so these never reach `/documents/{id}`.
    for path in [
        "/tenants/acme/documents/../admin",
        "/tenants/acme/documents/%2e%2e/admin",
        "/tenants/acme/documents/%2E%2E",
        "/tenants/acme/documents/acme-roadmap/..",
    ] {
        let answer = check(&mut client, get(path)).await;
        assert_denied(&answer, 403);
        assert_ne!(answer.header("x-arbiter-resource"), "..", "{path}");
    }
    // `../admin` lands on the admin route: carol is no admin.
    let answer = check(&mut client, get("/tenants/acme/documents/../admin")).await;
    assert_denied(&answer, 403);
    // An encoded separator or NUL inside a segment, or bad encoding: refused.
    for path in [
        "/tenants/acme/documents/..%2Fadmin",
        "/tenants/acme/documents/acme-roadmap%2F..",
        "/tenants/acme/documents/a%5Cb",
        "/tenants/acme/documents/a%00",
        "/tenants/acme/documents/a%zz",
        "/tenants/acme/documents/%ff",
    ] {
        assert_denied(&check(&mut client, get(path)).await, 403);
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let server = TestServer::start(server_config(example_mapping())).await;
    let mut client = client(server.addr).await;
    let request = http("GET", "/tenants/acme/documents/acme-roadmap")
        .bearer(&token("carol"))
        .header("x-padding", &"a".repeat(20_000));
    let answer = check(&mut client, request).await;
    assert_denied(&answer, 431);
    assert_eq!(answer.body_json()["reason"], "headers_too_large");
    // A well-formed request without HTTP attributes is a deny, not an error.
    let response = client
        .check(CheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_denied(&answer_of(response), 403);
    server.stop().await.unwrap();
}

fn answer_of(response: CheckResponse) -> Answer {
    answer(response)
}

#[tokio::test]
async fn context_from_source_address_and_claims() {
    let server = TestServer::start(server_config(example_mapping())).await;
    let mut client = client(server.addr).await;
    // Tenant administration needs the corporate network and MFA.
    let alice = token("alice");
    let path = "/tenants/acme/admin";
    assert!(
        check(&mut client, http("PUT", path).bearer(&alice))
            .await
            .allowed()
    );
    let outside = check(
        &mut client,
        http("PUT", path).bearer(&alice).from("192.168.1.20"),
    )
    .await;
    assert_denied(&outside, 403);
    let mut no_mfa = claims("alice");
    no_mfa.as_object_mut().unwrap().remove("mfa");
    let token = sign_with("rsa-1", Algorithm::RS256, Some("rsa-1"), &no_mfa);
    assert_denied(
        &check(&mut client, http("PUT", path).bearer(&token)).await,
        403,
    );
    // Step-up delete: the `auth_level` claim reaches the context.
    let mut stepped_up = claims("frank");
    stepped_up["auth_level"] = json!(2);
    let stepped_up = sign_with("rsa-1", Algorithm::RS256, Some("rsa-1"), &stepped_up);
    let path = "/tenants/acme/documents/acme-sales-pipeline";
    assert_denied(
        &check(
            &mut client,
            http("DELETE", path).bearer(&token_for("frank")),
        )
        .await,
        403,
    );
    assert!(
        check(&mut client, http("DELETE", path).bearer(&stepped_up))
            .await
            .allowed()
    );
    server.stop().await.unwrap();
}

fn token_for(sub: &str) -> String {
    token(sub)
}

#[tokio::test]
async fn claims_merge_over_cached_principal_and_never_share_cached_answers() {
    let server = TestServer::start(server_config(example_mapping())).await;
    let mut client = client(server.addr).await;
    let path = "/tenants/acme/documents/acme-roadmap";
    let mut editor = claims("carol");
    editor["roles"] = json!(["acme/editor"]);
    let editor = sign_with("rsa-1", Algorithm::RS256, Some("rsa-1"), &editor);
    let viewer = token("carol");
    // Alternate so that a cached answer for one would show up in the other.
    for _ in 0..3 {
        let answer = check(&mut client, http("PUT", path).bearer(&editor)).await;
        assert!(answer.allowed(), "{answer:?}");
        assert_denied(
            &check(&mut client, http("PUT", path).bearer(&viewer)).await,
            403,
        );
    }
    // A tenant claim replaces the cached tenant for this request: carol
    // claiming globex is isolated from acme.
    let mut moved = claims("carol");
    moved["tenant"] = json!("globex");
    let moved = sign_with("rsa-1", Algorithm::RS256, Some("rsa-1"), &moved);
    assert_denied(
        &check(&mut client, http("GET", path).bearer(&moved)).await,
        403,
    );
    assert!(
        check(&mut client, http("GET", path).bearer(&viewer))
            .await
            .allowed()
    );
    // A claim of the wrong shape fails closed.
    let mut bad = claims("carol");
    bad["tenant"] = json!(42);
    let bad = sign_with("rsa-1", Algorithm::RS256, Some("rsa-1"), &bad);
    assert_denied(
        &check(&mut client, http("GET", path).bearer(&bad)).await,
        401,
    );
    server.stop().await.unwrap();
}

fn struct_of(value: &Value) -> Struct {
    let Value::Object(map) = value else {
        panic!("not an object")
    };
    Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), pb(v))).collect(),
    }
}

fn pb(value: &Value) -> PbValue {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(envoy_types::pb::google::protobuf::ListValue {
            values: items.iter().map(pb).collect(),
        }),
        Value::Object(_) => Kind::StructValue(struct_of(value)),
    };
    PbValue { kind: Some(kind) }
}

#[tokio::test]
async fn principal_from_jwt_authn_metadata() {
    let mut mapping = example_mapping();
    mapping.principal.source = arbiter::adapter::ext_authz::mapping::PrincipalSource::JwtAuthn;
    mapping.principal.jwt = None;
    let server = TestServer::start(server_config(mapping)).await;
    let mut client = client(server.addr).await;
    let metadata = |claims: &Value| Metadata {
        filter_metadata: HashMap::from([(
            "envoy.filters.http.jwt_authn".to_string(),
            struct_of(&json!({ "jwt_payload": claims })),
        )]),
        ..Default::default()
    };
    let path = "/tenants/acme/documents/acme-roadmap";
    let mut request = http("PUT", path);
    request.metadata = Some(metadata(&claims("bob")));
    let answer = check(&mut client, request).await;
    assert!(answer.allowed(), "{answer:?}");
    assert_eq!(answer.header("x-arbiter-principal"), "bob");
    // Claims from the metadata merge too (roles → parents).
    let mut editor = claims("carol");
    editor["roles"] = json!(["acme/editor"]);
    let mut request = http("PUT", path);
    request.metadata = Some(metadata(&editor));
    assert!(check(&mut client, request).await.allowed());
    // No metadata (jwt_authn did not run or allowed a missing token): 401.
    let answer = check(&mut client, http("PUT", path)).await;
    assert_denied(&answer, 401);
    assert_eq!(answer.header("www-authenticate"), "Bearer realm=\"docs\"");
    // A bearer header alone is not trusted in this mode.
    let answer = check(&mut client, http("PUT", path).bearer(&token("bob"))).await;
    assert_denied(&answer, 401);
    server.stop().await.unwrap();
}

/// A policy set about workloads (no schema), for mTLS and header principals.
fn workload_policies(dir: &Path) -> Sources {
    std::fs::write(
        dir.join("policies.cedar"),
        r#"
@id("web-reads-orders")
permit (principal == Workload::"spiffe://cluster.local/ns/shop/sa/web", action == Action::"GET", resource is Orders)
when { context.tls };
"#,
    )
    .unwrap();
    std::fs::write(dir.join("entities.json"), "[]").unwrap();
    Sources {
        policies: Some(dir.join("policies.cedar")),
        schema: None,
        entities: Some(dir.join("entities.json")),
        ..Default::default()
    }
}

fn workload_mapping(source: &str, header: Option<&str>) -> ExtAuthzConfig {
    let header = header.map_or(String::new(), |h| format!("header = \"{h}\"\n"));
    let text = format!(
        r#"
[principal]
source = "{source}"
type = "Workload"
{header}
[[context]]
name = "tls"
from = "tls"

[[routes]]
path = "/orders/{{id}}"
action = {{ type = "Action", id = "GET" }}
resource = {{ type = "Orders", id = "{{id}}" }}
headers = {{ "x-arbiter-principal" = "{{principal.id}}" }}
"#
    );
    toml::from_str(&text).unwrap()
}

#[tokio::test]
async fn principal_from_mtls_peer_identity() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(workload_policies(dir.path()));
    config.listeners.ext_authz = Some(workload_mapping("mtls", None));
    let server = TestServer::start(config).await;
    let mut client = client(server.addr).await;
    let mut request = http("GET", "/orders/17");
    request.peer_principal = "spiffe://cluster.local/ns/shop/sa/web";
    let answer = check(&mut client, request).await;
    assert!(answer.allowed(), "{answer:?}");
    assert_eq!(
        answer.header("x-arbiter-principal"),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    let mut request = http("GET", "/orders/17");
    request.peer_principal = "spiffe://cluster.local/ns/shop/sa/batch";
    assert_denied(&check(&mut client, request).await, 403);
    // No peer identity: not authenticated.
    let answer = check(&mut client, http("GET", "/orders/17")).await;
    assert_denied(&answer, 401);
    assert_eq!(
        answer.header("www-authenticate"),
        "Mutual realm=\"arbiter\""
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn principal_from_trusted_header() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(workload_policies(dir.path()));
    config.listeners.ext_authz = Some(workload_mapping("header", Some("X-Gateway-Workload")));
    let server = TestServer::start(config).await;
    let mut client = client(server.addr).await;
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    // `tls` context is false over plain HTTP: denied; with https: allowed.
    let request = http("GET", "/orders/17").header("x-gateway-workload", web);
    assert_denied(&check(&mut client, request).await, 403);
    let mut request = http("GET", "/orders/17")
        .header("x-gateway-workload", web)
        .request();
    request
        .attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .http
        .as_mut()
        .unwrap()
        .scheme = "https".into();
    let answer = answer(client.check(request).await.unwrap().into_inner());
    assert!(answer.allowed(), "{answer:?}");
    assert_denied(&check(&mut client, http("GET", "/orders/17")).await, 401);
    server.stop().await.unwrap();
}

/// A JWKS over HTTP on 127.0.0.1, whose body the test can swap.
async fn jwks_server(body: Arc<Mutex<String>>) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let body = body.lock().unwrap().clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 4096];
                let _ = stream.read(&mut buffer).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn jwks_url_with_key_rotation() {
    let body = Arc::new(Mutex::new(
        std::fs::read_to_string(fixture("jwks-a.json")).unwrap(),
    ));
    let jwks = jwks_server(body.clone()).await;
    let mut mapping = example_mapping();
    let jwt = mapping.principal.jwt.as_mut().unwrap();
    jwt.jwks_file = None;
    jwt.jwks_url = Some(format!("http://{jwks}/.well-known/jwks.json"));
    jwt.min_refresh_interval_secs = 0;
    let server = TestServer::start(server_config(mapping)).await;
    let mut client = client(server.addr).await;
    let path = "/tenants/acme/documents/acme-roadmap";
    let old = token("carol");
    let new = sign_with("rsa-2", Algorithm::RS256, Some("rsa-2"), &claims("carol"));

    assert!(
        check(&mut client, http("GET", path).bearer(&old))
            .await
            .allowed()
    );
    assert_denied(
        &check(&mut client, http("GET", path).bearer(&new)).await,
        401,
    );

    // The IdP rotates: rsa-2 in, rsa-1 out. The unknown kid fetches again.
    *body.lock().unwrap() = std::fs::read_to_string(fixture("jwks-b.json")).unwrap();
    let answer = check(&mut client, http("GET", path).bearer(&new)).await;
    assert!(answer.allowed(), "{answer:?}");
    // The retired key no longer verifies, though its token was cached.
    assert_denied(
        &check(&mut client, http("GET", path).bearer(&old)).await,
        401,
    );
    // Keys shared by both sets keep working.
    let ec = sign_with("ec-1", Algorithm::ES256, Some("ec-1"), &claims("carol"));
    assert!(
        check(&mut client, http("GET", path).bearer(&ec))
            .await
            .allowed()
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn unix_socket_listener_serves_ext_authz_with_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("arbiter.sock");
    let mut config = server_config(example_mapping());
    config.listeners.uds = Some(UdsConfig {
        path: socket.clone(),
        mode: 0o660,
    });
    let server = TestServer::start(config).await;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let channel = common::uds_channel(&socket).await;
    let mut client = AuthorizationClient::new(channel);
    let answer = check(
        &mut client,
        http("GET", "/tenants/acme/documents/acme-roadmap").bearer(&token("carol")),
    )
    .await;
    assert!(answer.allowed(), "{answer:?}");
    server.stop().await.unwrap();
    assert!(!socket.exists(), "the socket file is removed on shutdown");
}

/// A client nobody here wrote: Python's `envoy-data-plane` message classes
/// over `grpcio` (installed by `tests/run.sh`).
#[tokio::test]
#[ignore = "needs python3 with envoy-data-plane and grpcio; tests/run.sh installs them"]
async fn python_envoy_data_plane_client() {
    let server = TestServer::start(server_config(example_mapping())).await;
    let script = root().join("tests/python/ext_authz_client.py");
    let output = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(server.addr.to_string())
        .arg(token("bob"))
        .arg(token("carol"))
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python client failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("as expected"), "{stdout}");
    server.stop().await.unwrap();
}

/// Every ext_authz answer is a decision-log record with transport
/// `ext_authz`: allows, denies, and refusals before evaluation alike; the
/// bearer token and cookies never reach the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_decisions_are_logged_without_credentials() {
    use arbiter::decision_log::{DecisionLogConfig, SinkConfig};
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("decisions.jsonl");
    let mut config = server_config(example_mapping());
    config.decision_log = DecisionLogConfig {
        spool_dir: Some(dir.path().join("spool")),
        sinks: vec![SinkConfig::File {
            name: None,
            path: log_path.clone(),
            max_bytes: None,
            max_files: None,
        }],
        ..DecisionLogConfig::default()
    };
    let server = TestServer::start(config).await;
    let mut client = client(server.addr).await;
    let bob = token("bob");
    let mut put = http("PUT", "/tenants/acme/documents/acme-roadmap");
    put.peer_principal = "spiffe://cluster.local/ns/docs/sa/web";
    let allow = check(
        &mut client,
        put.bearer(&bob)
            .header("cookie", "session=s3cr3t")
            .header("x-request-id", "req-1")
            .header("x-internal-note", "not for the audit log")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
    )
    .await;
    assert!(allow.allowed(), "{allow:?}");
    let missing = check(
        &mut client,
        http("GET", "/tenants/acme/documents/acme-roadmap"),
    )
    .await;
    assert_denied(&missing, 401);
    let allow_id = allow.header("x-arbiter-decision-id").to_string();
    server.stop().await.unwrap();

    let text = std::fs::read_to_string(&log_path).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2, "{text}");
    assert!(
        records.iter().all(|r| r["transport"] == "ext_authz"),
        "{text}"
    );
    let logged_allow = records
        .iter()
        .find(|r| r["decision_id"] == allow_id.as_str())
        .expect("the allow is logged under its decision id");
    assert_eq!(logged_allow["decision"], "allow", "{logged_allow}");
    assert_eq!(logged_allow["principal"]["id"], "bob", "{logged_allow}");
    assert_eq!(
        (&logged_allow["action"], &logged_allow["resource"]),
        (
            &serde_json::json!({"type": "Saas::Action", "id": "write"}),
            &serde_json::json!({"type": "Saas::Document", "id": "acme-roadmap"})
        ),
        "{logged_allow}"
    );
    assert_eq!(
        logged_allow["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{logged_allow}"
    );
    let denied = records
        .iter()
        .find(|r| r["decision_id"] != allow_id.as_str())
        .unwrap();
    assert_eq!(denied["decision"], "deny", "{denied}");
    // Refused before a principal was known: the route's action and
    // resource, no principal, and the reason as the error.
    assert!(denied["principal"].is_null(), "{denied}");
    assert_eq!(
        (&denied["action"]["id"], &denied["resource"]["id"]),
        (
            &serde_json::json!("read"),
            &serde_json::json!("acme-roadmap")
        ),
        "{denied}"
    );
    assert!(
        denied["errors"][0]["message"]
            .as_str()
            .is_some_and(|message| !message.is_empty()),
        "{denied}"
    );
    // The Cedar context the policies saw (mapped from the source address
    // and the token's claims).
    assert_eq!(
        logged_allow["context"],
        serde_json::json!({"source_ip": {"__extn": {"fn": "ip", "arg": "10.1.2.3"}}, "mfa": true}),
        "{logged_allow}"
    );
    // Only the headers `decision_log.headers` names (by default
    // x-request-id and user-agent) are copied into records.
    assert_eq!(
        logged_allow["headers"],
        serde_json::json!({"x-request-id": "req-1", "user-agent": "curl/8.5.0"}),
        "{logged_allow}"
    );
    // The caller is the HTTP client as Envoy saw it: its address, and its
    // mTLS identity when Envoy verified one.
    assert_eq!(
        logged_allow["caller"],
        serde_json::json!({
            "peer_address": "10.1.2.3:0",
            "tls_identity": "spiffe://cluster.local/ns/docs/sa/web"
        }),
        "{logged_allow}"
    );
    assert_eq!(
        denied["caller"],
        serde_json::json!({"peer_address": "10.1.2.3:0"}),
        "{denied}"
    );
    assert!(!text.contains(&bob), "the bearer token leaked: {text}");
    assert!(!text.contains("s3cr3t"), "the cookie leaked: {text}");
}

async fn raw_call(
    addr: SocketAddr,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// The service reads Envoy's message itself (`wire.rs`) and writes its
/// answer itself (`answer.rs`): bytes prost encodes are answered, and
/// bytes that are not a `CheckRequest` get `INVALID_ARGUMENT` saying why.
#[tokio::test]
async fn raw_messages_are_read_and_malformed_ones_refused_with_a_reason() {
    use prost::Message;
    const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
    let server = TestServer::start(server_config(example_mapping())).await;
    let good = http("GET", "/tenants/acme/documents/acme-roadmap")
        .bearer(&token("carol"))
        .request()
        .encode_to_vec();
    let bytes = raw_call(server.addr, CHECK, good.clone()).await.unwrap();
    let allow = answer(CheckResponse::decode(&bytes[..]).unwrap());
    assert!(allow.allowed(), "{allow:?}");
    assert_eq!(allow.header("x-arbiter-principal"), "carol");

    let truncated = good[..good.len() - 3].to_vec();
    let status = raw_call(server.addr, CHECK, truncated).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        "malformed CheckRequest: the message ends inside a field"
    );
    // attributes { request { http { path: "\xff" } } }
    let bad_path = vec![0x0a, 0x07, 0x22, 0x05, 0x12, 0x03, 0x22, 0x01, 0xff];
    let status = raw_call(server.addr, CHECK, bad_path).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        "malformed CheckRequest: `http.path` is not valid UTF-8"
    );
    // An empty message is a well-formed CheckRequest: a deny, not an error.
    let bytes = raw_call(server.addr, CHECK, Vec::new()).await.unwrap();
    assert_denied(&answer(CheckResponse::decode(&bytes[..]).unwrap()), 403);

    let status = raw_call(
        server.addr,
        "/envoy.service.auth.v3.Authorization/Other",
        good,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    server.stop().await.unwrap();
}

/// One request on the server's reflection service (`grpc.reflection.v1`).
async fn reflect(
    addr: SocketAddr,
    request: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> tonic_reflection::pb::v1::server_reflection_response::MessageResponse {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;

    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    response.message_response.unwrap()
}

/// The file descriptors of a reflection answer (`FileContainingSymbol`,
/// `FileByFilename`).
fn descriptors(
    response: tonic_reflection::pb::v1::server_reflection_response::MessageResponse,
) -> Vec<prost_types::FileDescriptorProto> {
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let MessageResponse::FileDescriptorResponse(files) = response else {
        panic!("not a file descriptor answer: {response:?}");
    };
    files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(&bytes[..]).unwrap())
        .collect()
}

/// With ext_authz on, reflection lists Envoy's service beside Arbiter's, and
/// resolves its symbol to a file whose imports all resolve too, as `grpcurl`
/// and Envoy's debugging tools need.
#[tokio::test]
async fn reflection_lists_and_resolves_the_ext_authz_service() {
    use std::collections::BTreeSet;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = TestServer::start(server_config(example_mapping())).await;
    let listed = reflect(server.addr, MessageRequest::ListServices(String::new())).await;
    let MessageResponse::ListServicesResponse(list) = listed else {
        panic!("not a service list: {listed:?}");
    };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "envoy.service.auth.v3.Authorization",
        "arbiter.v1.Authorizer",
        "arbiter.v1.DecisionLog",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.contains(service), "{service} not in {names:?}");
    }

    let symbol = "envoy.service.auth.v3.Authorization".to_owned();
    let files =
        descriptors(reflect(server.addr, MessageRequest::FileContainingSymbol(symbol)).await);
    let file = &files[0];
    assert_eq!(file.name(), "envoy/service/auth/v3/external_auth.proto");
    let service = file
        .service
        .iter()
        .find(|service| service.name() == "Authorization")
        .unwrap();
    let check = service
        .method
        .iter()
        .find(|method| method.name() == "Check")
        .unwrap();
    assert_eq!(check.input_type(), ".envoy.service.auth.v3.CheckRequest");
    assert_eq!(check.output_type(), ".envoy.service.auth.v3.CheckResponse");

    // Every import, transitively, is served by name.
    let mut pending: Vec<String> = file.dependency.clone();
    let mut resolved = BTreeSet::new();
    while let Some(name) = pending.pop() {
        if !resolved.insert(name.clone()) {
            continue;
        }
        let files =
            descriptors(reflect(server.addr, MessageRequest::FileByFilename(name.clone())).await);
        assert_eq!(files[0].name(), name);
        pending.extend(files[0].dependency.iter().cloned());
    }
    assert!(
        resolved.contains("envoy/service/auth/v3/attribute_context.proto"),
        "{resolved:?}"
    );
    server.stop().await.unwrap();
}

/// `max_message_bytes` bounds Envoy's messages too: one byte over is
/// refused before it is read.
#[tokio::test]
async fn a_message_one_byte_over_max_message_bytes_is_out_of_range() {
    const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
    const LIMIT: usize = 16 * 1024;
    let mut config = server_config(example_mapping());
    config.listeners.transport.max_message_bytes = LIMIT;
    let server = TestServer::start(config).await;
    // Zero bytes are no CheckRequest: read, then refused for what they are.
    let at_limit = raw_call(server.addr, CHECK, vec![0; LIMIT])
        .await
        .unwrap_err();
    assert_eq!(
        at_limit.code(),
        tonic::Code::InvalidArgument,
        "{at_limit:?}"
    );
    let over = raw_call(server.addr, CHECK, vec![0; LIMIT + 1])
        .await
        .unwrap_err();
    assert_eq!(over.code(), tonic::Code::OutOfRange, "{over:?}");
    server.stop().await.unwrap();
}
