//! Bench helper for `benches/load/ext_authz.sh`: writes and reads raw gRPC
//! messages of Envoy's `envoy.service.auth.v3.Authorization/Check`, so h2load
//! and curl can drive the ext_authz service.
//!
//! - `ext_authz_body encode OUT KEY_PEM` writes the framed `CheckRequest`
//!   Envoy would send for `GET /tenants/acme/documents/acme-roadmap` from
//!   10.1.2.3 with a bearer RS256 JWT for `carol` (kid `rsa-1`, signed with
//!   `KEY_PEM`, valid for an hour, `mfa` claim true): the same decision as
//!   `grpc_body encode`'s default case ("viewer can read an internal
//!   document", an ALLOW).
//! - `ext_authz_body decode IN` reads a framed `CheckResponse`, prints it,
//!   and exits 0 only if it allows (status OK and an `OkHttpResponse`).

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use prost::Message;

#[path = "shared/grpc_frame.rs"]
mod grpc_frame;

use grpc_frame::{Error, frame, unframe};

const PATH: &str = "/tenants/acme/documents/acme-roadmap";

fn token(pem: &[u8]) -> Result<String, Error> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = serde_json::json!({
        "iss": "https://idp.example.com/",
        "aud": "docs-api",
        "sub": "carol",
        "iat": now,
        "exp": now + 3600,
        "mfa": true,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    Ok(jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(pem)?,
    )?)
}

fn peer(address: &str, port: u32) -> Peer {
    Peer {
        address: Some(Address {
            address: Some(AddressKind::SocketAddress(SocketAddress {
                address: address.into(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

fn request(token: &str) -> CheckRequest {
    let headers = HashMap::from([
        (":authority".to_string(), "docs.example.com".to_string()),
        (":method".into(), "GET".into()),
        (":path".into(), PATH.into()),
        (":scheme".into(), "http".into()),
        ("authorization".into(), format!("Bearer {token}")),
        ("user-agent".into(), "h2load".into()),
        ("x-request-id".into(), "bench".into()),
    ]);
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("10.1.2.3", 40000)),
            destination: Some(peer("10.0.0.7", 8080)),
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: "1".into(),
                    method: "GET".into(),
                    headers,
                    path: PATH.into(),
                    host: "docs.example.com".into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}

fn run(args: &[String]) -> Result<bool, Error> {
    match args {
        [mode, out, pem] if mode == "encode" => {
            let framed = frame(&request(&token(&std::fs::read(pem)?)?))?;
            std::fs::write(out, &framed)?;
            eprintln!("wrote {} bytes to {out}: GET {PATH} as carol", framed.len());
            Ok(true)
        }
        [mode, input] if mode == "decode" => {
            let bytes = std::fs::read(input)?;
            let response = CheckResponse::decode(unframe(&bytes)?)?;
            println!("{response:?}");
            let ok = response.status.as_ref().is_some_and(|s| s.code == 0);
            Ok(ok && matches!(response.http_response, Some(HttpResponse::OkResponse(_))))
        }
        _ => Err("usage: ext_authz_body encode OUT KEY_PEM | ext_authz_body decode IN".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: the answer is not an allow");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}
