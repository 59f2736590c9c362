//! Bench helper for `benches/load/policy_index.sh`: the multi-tenant policy
//! set of issue 18 (`shared/tenants.rs`) as files, a closed-loop gRPC load
//! of varied requests on its hot tenants, and where memory goes when the
//! set is loaded.
//!
//!   tenant_load write DIR POLICY_TENANTS DATA_TENANTS
//!       DIR/{policies.cedar,schema.cedarschema,entities.json}: the policies
//!       of POLICY_TENANTS tenants, the entities of DATA_TENANTS (so two
//!       servers with different policy counts can hold the same data).
//!   tenant_load load ADDR TENANTS SECONDS CONCURRENCY
//!       Requests from `tenants::request` (the same sequence on every run);
//!       every answer is checked against the expected decision, so a wrong
//!       answer or a gRPC error makes the exit status 1. Prints one line:
//!       `requests_per_second p50_us p99_us requests`.
//!   tenant_load memory TENANTS STAGE
//!       Builds one stage in this process and prints `VmRSS VmHWM` (KiB) of
//!       /proc/self/status, and the seconds the stage took: `text` (the
//!       generated texts), `parsed` (and the policies parsed by Cedar as one
//!       text, as the loader does), `whole` (a loaded snapshot without the
//!       index: parse, validation, entities), `index` (with it), `links`
//!       (as `index`, the per-document shares as links of one template). The heap
//!       keeps what the parser freed, so `set` and `set+index` parse one
//!       policy at a time (small transients) and show what the policy set
//!       itself and the index built on it (`PolicySnapshot::new`) hold.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter::engine::loader::{Inputs, SourceFile, build};
use arbiter::engine::{LoadOptions, PolicySnapshot};
use arbiter::proto::v1 as pb;
use pb::authorizer_client::AuthorizerClient;
use tonic::transport::Channel;

#[path = "shared/tenants.rs"]
mod tenants;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Connections the load is spread over (requests share them as h2 streams).
const CONNECTIONS: usize = 4;

fn number(text: &str, what: &str) -> Result<usize, Error> {
    text.parse()
        .map_err(|_| format!("{what} is not a number").into())
}

fn write(dir: &str, policy_tenants: &str, data_tenants: &str) -> Result<String, Error> {
    let policy_tenants = number(policy_tenants, "POLICY_TENANTS")?;
    let data_tenants = number(data_tenants, "DATA_TENANTS")?;
    let dir = std::path::Path::new(dir);
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("policies.cedar"),
        tenants::policies(policy_tenants),
    )?;
    std::fs::write(dir.join("schema.cedarschema"), tenants::SCHEMA)?;
    std::fs::write(dir.join("entities.json"), tenants::entities(data_tenants))?;
    Ok(format!(
        "{} policies",
        policy_tenants * tenants::PER_TENANT + tenants::GUARDRAILS
    ))
}

fn uid(r#type: &str, id: String) -> Option<pb::EntityUid> {
    Some(pb::EntityUid {
        r#type: r#type.to_owned(),
        id,
    })
}

/// One caller: requests back to back until `until`; its latencies in µs.
async fn caller(
    mut client: AuthorizerClient<Channel>,
    tenant_count: usize,
    seed: u64,
    until: Instant,
) -> Result<Vec<u32>, Error> {
    let mut state = seed;
    let mut latencies = Vec::new();
    while Instant::now() < until {
        let request = tenants::request(&mut state, tenant_count);
        let expected = if request.allowed {
            pb::Decision::Allow
        } else {
            pb::Decision::Deny
        };
        let message = pb::CheckRequest {
            principal: uid("User", request.principal.clone()),
            action: uid("Action", request.action.to_owned()),
            resource: uid("Doc", request.resource.clone()),
            context_json: request.context.clone(),
            ..pb::CheckRequest::default()
        };
        let sent = Instant::now();
        let response = client.check(message).await?.into_inner();
        let took = sent.elapsed();
        if response.decision() != expected || !response.errors.is_empty() {
            return Err(format!(
                "{request:?}: expected {expected:?}, got {:?} (errors: {:?})",
                response.decision(),
                response.errors
            )
            .into());
        }
        latencies.push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
    }
    Ok(latencies)
}

async fn load(
    addr: &str,
    tenant_count: usize,
    duration: Duration,
    concurrency: usize,
) -> Result<String, Error> {
    let mut channels = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))?
                .connect()
                .await?,
        );
    }
    let started = Instant::now();
    let until = started + duration;
    let callers: Vec<_> = (0..concurrency.max(1))
        .map(|i| {
            let client = AuthorizerClient::new(channels[i % CONNECTIONS].clone());
            tokio::spawn(caller(client, tenant_count, i as u64 + 1, until))
        })
        .collect();
    let mut latencies = Vec::new();
    for caller in callers {
        latencies.extend(caller.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if latencies.is_empty() {
        return Err("no request completed".into());
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    Ok(format!(
        "{:.0} {} {} {}",
        latencies.len() as f64 / elapsed,
        at(0.50),
        at(0.99),
        latencies.len()
    ))
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix(field)?
                    .trim_start_matches(':')
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

fn memory(tenant_count: &str, stage: &str) -> Result<String, Error> {
    let tenant_count = number(tenant_count, "TENANTS")?;
    let file = |name: &str, text: String| SourceFile {
        name: name.to_owned(),
        text: Arc::from(text),
    };
    let policies = tenants::policies(tenant_count);
    let inputs = Inputs {
        policy_files: vec![file("policies.cedar", policies)],
        single_file: true,
        schema: Some(file("schema.cedarschema", tenants::SCHEMA.to_owned())),
        entities: Some(file("entities.json", tenants::entities(tenant_count))),
        template_links: None,
    };
    let options = |index_min| LoadOptions {
        decision_cache_capacity: 0,
        policy_index_min: index_min,
        ..LoadOptions::default()
    };
    let started = Instant::now();
    let kept: Box<dyn std::any::Any> = match stage {
        "text" => Box::new(()),
        "parsed" => Box::new(
            inputs.policy_files[0]
                .text
                .parse::<cedar_policy::PolicySet>()
                .map_err(|error| error.to_string())?,
        ),
        "set" | "set+index" => {
            let mut set = cedar_policy::PolicySet::new();
            for (i, text) in inputs.policy_files[0].text.split("\n@id").enumerate() {
                let text = if i == 0 {
                    text.to_owned()
                } else {
                    format!("@id{text}")
                };
                let policy = cedar_policy::Policy::parse(None, text.trim())
                    .map_err(|error| error.to_string())?;
                let id = policy.annotation("id").unwrap_or_default().to_owned();
                set.add(policy.new_id(cedar_policy::PolicyId::new(id)))
                    .map_err(|error| error.to_string())?;
            }
            let index_min = if stage == "set" { usize::MAX } else { 0 };
            Box::new(PolicySnapshot::new(
                set,
                None,
                Arc::from("r"),
                options(index_min),
            ))
        }
        "whole" => Box::new(build(&inputs, options(usize::MAX)).map_err(|e| e.to_string())?),
        "index" => Box::new(build(&inputs, options(0)).map_err(|e| e.to_string())?),
        "links" => {
            let (policies, links) = tenants::policies_linked(tenant_count);
            let linked = Inputs {
                policy_files: vec![file("policies.cedar", policies)],
                template_links: Some(file("links.json", links)),
                ..inputs.clone()
            };
            Box::new(build(&linked, options(0)).map_err(|e| e.to_string())?)
        }
        other => return Err(format!("unknown stage `{other}`").into()),
    };
    let took = started.elapsed();
    let line = format!(
        "{} {} {:.2}",
        status_kib("VmRSS"),
        status_kib("VmHWM"),
        took.as_secs_f64()
    );
    drop(kept);
    Ok(line)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let outcome = match args.as_slice() {
        ["write", dir, policy_tenants, data_tenants] => write(dir, policy_tenants, data_tenants),
        ["memory", tenant_count, stage] => memory(tenant_count, stage),
        ["load", addr, tenant_count, seconds, concurrency] => (|| {
            let tenant_count = number(tenant_count, "TENANTS")?;
            let seconds: f64 = seconds.parse().map_err(|_| "SECONDS is not a number")?;
            let duration = Duration::try_from_secs_f64(seconds)?;
            let concurrency = number(concurrency, "CONCURRENCY")?;
            // One client thread, so the server keeps the other core.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(load(addr, tenant_count, duration, concurrency))
        })(),
        _ => Err(
            "usage: tenant_load write DIR POLICY_TENANTS DATA_TENANTS | \
                  load ADDR TENANTS SECONDS CONCURRENCY | memory TENANTS STAGE"
                .into(),
        ),
    };
    match outcome {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
