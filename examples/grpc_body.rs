//! Bench helper for `benches/load/run.sh`: writes and reads raw gRPC
//! messages, so a plain HTTP/2 client (h2load, curl) can speak to the
//! `arbiter.v1.Authorizer` service.
//!
//! - `grpc_body encode OUT [FIXTURE CASE]` writes the length-prefixed gRPC
//!   frame (flag byte 0, 4-byte big-endian length, protobuf) of the
//!   `CheckRequest` of one case of `policies/tests/FIXTURE` (by default
//!   `rbac.json`, "viewer can read an internal document": an ALLOW).
//! - `grpc_body decode IN` reads a framed `CheckResponse`, prints it, and
//!   exits 0 only if its decision is `DECISION_ALLOW`.

use std::process::ExitCode;

use arbiter::proto::v1 as pb;
use prost::Message;
use serde_json::Value;

const FIXTURES: &[(&str, &str)] = &[
    (
        "guardrails.json",
        include_str!("../policies/tests/guardrails.json"),
    ),
    (
        "ownership.json",
        include_str!("../policies/tests/ownership.json"),
    ),
    ("rbac.json", include_str!("../policies/tests/rbac.json")),
    (
        "sharing.json",
        include_str!("../policies/tests/sharing.json"),
    ),
];

const DEFAULT_FIXTURE: &str = "rbac.json";
const DEFAULT_CASE: &str = "viewer can read an internal document";

#[path = "shared/grpc_frame.rs"]
mod grpc_frame;

use grpc_frame::{Error, frame, unframe};

fn uid(case: &Value, field: &str) -> Result<pb::EntityUid, Error> {
    let part = |key: &str| -> Result<String, Error> {
        case[field][key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("`{field}.{key}` is not a string").into())
    };
    Ok(pb::EntityUid {
        r#type: part("type")?,
        id: part("id")?,
    })
}

fn request(fixture: &str, name: &str) -> Result<pb::CheckRequest, Error> {
    let (_, text) = FIXTURES
        .iter()
        .find(|(file, _)| *file == fixture)
        .ok_or_else(|| format!("no fixture `{fixture}` in policies/tests"))?;
    let fixture_json: Value = serde_json::from_str(text)?;
    let case = fixture_json["cases"]
        .as_array()
        .and_then(|cases| cases.iter().find(|case| case["name"] == name))
        .ok_or_else(|| format!("no case `{name}` in `{fixture}`"))?;
    Ok(pb::CheckRequest {
        principal: Some(uid(case, "principal")?),
        action: Some(uid(case, "action")?),
        resource: Some(uid(case, "resource")?),
        context_json: case
            .get("context")
            .map(Value::to_string)
            .unwrap_or_default(),
        entities_json: case
            .get("entities")
            .map(Value::to_string)
            .unwrap_or_default(),
        ..Default::default()
    })
}

fn run(args: &[String]) -> Result<bool, Error> {
    match args {
        [mode, out, rest @ ..] if mode == "encode" => {
            let (fixture, name) = match rest {
                [] => (DEFAULT_FIXTURE, DEFAULT_CASE),
                [fixture, name] => (fixture.as_str(), name.as_str()),
                _ => return Err("usage: grpc_body encode OUT [FIXTURE CASE]".into()),
            };
            let request = request(fixture, name)?;
            let framed = frame(&request)?;
            std::fs::write(out, &framed)?;
            eprintln!(
                "wrote {} bytes to {out}: {fixture} / {name}: {request:?}",
                framed.len()
            );
            Ok(true)
        }
        [mode, input] if mode == "decode" => {
            let bytes = std::fs::read(input)?;
            let response = pb::CheckResponse::decode(unframe(&bytes)?)?;
            println!("{response:?}");
            Ok(response.decision() == pb::Decision::Allow)
        }
        _ => Err("usage: grpc_body encode OUT [FIXTURE CASE] | grpc_body decode IN".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: the decision is not DECISION_ALLOW");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}
