//! The fuzz corpora as ordinary tests: every file under
//! `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/` goes through the
//! same entry function as its fuzz target (`arbiter::fuzzing`), so an input
//! that once found a bug stays a regression test, in CI, without a nightly
//! toolchain.
//!
//! `cargo test --test fuzz_corpus -- --ignored write_seeds` rewrites the
//! seed inputs (`fuzz/corpus/<target>/seed-*`).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use arbiter::fuzzing;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Feeds every corpus and artifact file of `target` to `run`; returns how
/// many there were.
fn replay(target: &str, run: fn(&[u8])) -> usize {
    let mut count = 0;
    for kind in ["corpus", "artifacts"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
        paths.sort();
        for path in paths {
            if !path.is_file() {
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{} fails", path.display());
            count += 1;
        }
    }
    count
}

macro_rules! corpus_test {
    ($name:ident) => {
        #[test]
        fn $name() {
            let count = replay(stringify!($name), fuzzing::$name);
            assert!(count > 0, "no corpus for {}", stringify!($name));
        }
    };
}

corpus_test!(ext_authz_wire);
corpus_test!(check_request);
corpus_test!(entities_and_context);
corpus_test!(jwt);
corpus_test!(policy_loader);
corpus_test!(spool_reader);

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
}

fn joined(first: &[u8], parts: &[&str]) -> Vec<u8> {
    let mut out = first.to_vec();
    for (at, part) in parts.iter().enumerate() {
        if at > 0 {
            out.push(1);
        }
        out.extend_from_slice(part.as_bytes());
    }
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[test]
#[ignore = "writes the seed corpora"]
fn write_seeds() {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
    use envoy_types::pb::envoy::config::core::v3::{
        Address, HeaderMap, HeaderValue, Pipe, SocketAddress,
    };
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Peer, Request, TlsSession,
    };
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    use envoy_types::pb::google::protobuf::Timestamp;
    use prost::Message as _;

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));

    // ext_authz_wire: Envoy-shaped requests.
    let http = |headers: HashMap<String, String>, header_map: Option<HeaderMap>| HttpRequest {
        id: "abc".into(),
        method: "GET".into(),
        headers,
        header_map,
        path: "/tenants/acme/documents/d1?x=1".into(),
        host: "docs.example.com".into(),
        scheme: "https".into(),
        protocol: "HTTP/2".into(),
        ..Default::default()
    };
    let request = |address: Option<AddressKind>, http: HttpRequest| CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: address.map(|address| Address {
                    address: Some(address),
                }),
                principal: "spiffe://example.org/web".into(),
                ..Default::default()
            }),
            request: Some(Request {
                time: Some(Timestamp {
                    seconds: 1_767_225_600,
                    nanos: 0,
                }),
                http: Some(http),
            }),
            tls_session: Some(TlsSession {
                sni: "docs.example.com".into(),
            }),
            ..Default::default()
        }),
    };
    let headers = HashMap::from([
        (":authority".into(), "docs.example.com".into()),
        ("authorization".into(), "Bearer a.b.c".into()),
    ]);
    let socket = AddressKind::SocketAddress(SocketAddress {
        address: "10.1.2.3".into(),
        ..Default::default()
    });
    let pipe = AddressKind::Pipe(Pipe {
        path: "/run/envoy.sock".into(),
        mode: 0,
    });
    let raw = HeaderMap {
        headers: vec![
            HeaderValue {
                key: "X-Tag".into(),
                value: String::new(),
                raw_value: b"a".to_vec(),
            },
            HeaderValue {
                key: "x-tag".into(),
                value: "b".into(),
                raw_value: Vec::new(),
            },
        ],
    };
    write(
        "ext_authz_wire",
        "socket",
        &request(Some(socket.clone()), http(headers.clone(), None)).encode_to_vec(),
    );
    write(
        "ext_authz_wire",
        "pipe-raw-headers",
        &request(Some(pipe), http(HashMap::new(), Some(raw))).encode_to_vec(),
    );
    let mut merged = request(Some(socket), http(headers, None)).encode_to_vec();
    merged.extend(request(None, http(HashMap::new(), None)).encode_to_vec());
    write("ext_authz_wire", "merged", &merged);
    write("ext_authz_wire", "empty", &[]);

    // check_request: the README's questions, one per mode.
    let user = "Saas::User";
    let action = "Saas::Action";
    let document = "Saas::Document";
    let context = r#"{"mfa": true, "source_ip": {"__extn": {"fn": "ip", "arg": "10.0.0.1"}}}"#;
    write(
        "check_request",
        "allow",
        &joined(
            &[0],
            &[
                user,
                "alice",
                action,
                "read",
                document,
                "acme-roadmap",
                context,
                "",
            ],
        ),
    );
    write(
        "check_request",
        "entities-replace",
        &joined(
            &[2],
            &[
                user,
                "mallory",
                action,
                "write",
                document,
                "new",
                context,
                r#"[{"uid": {"type": "Saas::Document", "id": "new"}, "attrs": {"tenant": {"__entity": {"type": "Saas::Tenant", "id": "acme"}}, "owner": {"__entity": {"type": "Saas::User", "id": "mallory"}}, "name": "n", "classification": "public", "shared_with": []}, "parents": []}]"#,
            ],
        ),
    );
    write(
        "check_request",
        "bad-context",
        &joined(
            &[1],
            &[user, "alice", action, "read", document, "d", "[1]", "{"],
        ),
    );

    // entities_and_context: generator bytes for a chain, fan-out, a cycle,
    // random parents and a long chain.
    for (name, first) in [
        ("chain", 0u8),
        ("fan-out", 1),
        ("cycle", 2),
        ("random", 3),
        ("long-chain", 0xf0),
    ] {
        let mut data = vec![first, 0, 40, 0, 7];
        data.extend((0u8..200).map(|at| at.wrapping_mul(37)));
        write("entities_and_context", name, &data);
    }

    // jwt: a raw token, a header and claims, claims over valid ones.
    write(
        "jwt",
        "raw",
        b"\x00eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0.c2ln",
    );
    write(
        "jwt",
        "header-claims",
        &joined(
            &[1],
            &[
                r#"{"alg":"EdDSA","kid":"ed-1"}"#,
                r#"{"iss":"https://idp.example.com/","aud":"docs-api","sub":"alice","exp":99999999999}"#,
            ],
        ),
    );
    write(
        "jwt",
        "claims",
        &joined(
            &[2],
            &[r#"{"sub":"alice","tenant":"acme","roles":["editor"],"mfa":true}"#],
        ),
    );
    write("jwt", "sub", b"\x02\"bob\"");

    // policy_loader: the example files, with and without schema.
    let policies = ["rbac.cedar", "ownership.cedar", "sharing.cedar"]
        .map(|name| read(&root.join("policies").join(name)))
        .join("\u{2}");
    let schema = read(&root.join("policies/schema.cedarschema"));
    let entities = read(&root.join("policies/entities.json"));
    let config = read(&root.join("deploy/arbiter/ext-authz.toml"));
    write(
        "policy_loader",
        "example",
        &joined(&[2 | 8], &[&policies, &schema, &entities, &config]),
    );
    write(
        "policy_loader",
        "no-schema",
        &joined(
            &[1 | 8 | 16],
            &[&policies, "", &entities, "listen = \"127.0.0.1:1\""],
        ),
    );

    // spool_reader: records, then damage.
    for (name, seed) in [("few", 3u8), ("many", 91), ("damaged", 200)] {
        let mut data = vec![seed % 8, 0, seed];
        data.extend((0u16..600).map(|at| (at as u8).wrapping_mul(seed) ^ 0x5a));
        write("spool_reader", name, &data);
    }
}
