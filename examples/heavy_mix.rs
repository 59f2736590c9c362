//! Bench helper for `benches/heavy.sh`: does a request at the limits (its
//! own entities: `max_request_entities` of them in a hierarchy
//! `max_hierarchy_depth` deep) delay ordinary `Check`s?
//!
//!   heavy_mix ADDR SECONDS RATE HEAVY_CONCURRENCY ROUNDS [ENTITIES DEPTH ANCESTORS]
//!
//! Ordinary checks are sent open-loop at RATE per second (bob writes the
//! roadmap of the embedded example, with a source IP that changes every
//! request so the decision cache does not answer them), and their latency
//! is recorded. Phases alternate: ordinary checks alone, then with
//! HEAVY_CONCURRENCY clients sending heavy requests back to back, ROUNDS
//! times each. A heavy request carries ENTITIES roles (default 1000) with a
//! chain DEPTH long (default 32) and a closure of about ANCESTORS pairs
//! (default 10000): each default limit reached at once. Every ordinary
//! answer must be OK ALLOW, every heavy one OK or RESOURCE_EXHAUSTED (shed),
//! or the exit status is 1.
//!
//! Prints per phase `phase p50_us p99_us ordinary heavy_ok heavy_shed`, then
//! the medians and `p99 ratio (with heavy / alone)`.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arbiter::proto::v1 as pb;
use pb::authorizer_client::AuthorizerClient;
use tonic::transport::Channel;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn uid(type_name: &str, id: &str) -> Option<pb::EntityUid> {
    Some(pb::EntityUid {
        r#type: type_name.into(),
        id: id.into(),
    })
}

fn ordinary(n: u64) -> pb::CheckRequest {
    pb::CheckRequest {
        principal: uid("Saas::User", "bob"),
        action: uid("Saas::Action", "write"),
        resource: uid("Saas::Document", "acme-roadmap"),
        context_json: format!(
            r#"{{"mfa": true, "source_ip": "10.{}.{}.{}"}}"#,
            (n >> 16) & 255,
            (n >> 8) & 255,
            n & 255
        ),
        entities_json: String::new(),
        ..Default::default()
    }
}

/// `entities` roles: a chain `depth` long, and the others each the child of
/// one chain role, chosen so the closure has about `ancestors` pairs (the
/// default limits: 1,000 entities, 32 deep, 10,000 pairs).
fn heavy(entities: usize, depth: usize, ancestors: usize) -> pb::CheckRequest {
    let chain_pairs = depth * depth.saturating_sub(1) / 2;
    let leaves = entities.saturating_sub(depth).max(1);
    // Each leaf has `per_leaf` ancestors: its chain parent and those above.
    let per_leaf = (ancestors.saturating_sub(chain_pairs) / leaves).clamp(1, depth);
    let chain = |i: usize| format!("heavy-chain-{i}");
    let mut items = Vec::with_capacity(entities);
    for i in 0..depth.min(entities) {
        let parents = if i + 1 < depth {
            serde_json::json!([{"type": "Saas::Role", "id": chain(i + 1)}])
        } else {
            serde_json::json!([])
        };
        items.push(serde_json::json!({
            "uid": {"type": "Saas::Role", "id": chain(i)},
            "attrs": {"name": "heavy"},
            "parents": parents,
        }));
    }
    // chain(i) has depth - 1 - i ancestors.
    let parent = chain(depth - per_leaf);
    for leaf in 0..entities.saturating_sub(depth) {
        items.push(serde_json::json!({
            "uid": {"type": "Saas::Role", "id": format!("heavy-leaf-{leaf}")},
            "attrs": {"name": "heavy"},
            "parents": [{"type": "Saas::Role", "id": parent}],
        }));
    }
    let mut request = ordinary(0);
    request.entities_json = serde_json::Value::Array(items).to_string();
    request
}

struct Phase {
    latencies_us: Vec<u64>,
    ordinary: u64,
    heavy_ok: u64,
    heavy_shed: u64,
}

async fn phase(
    channel: &Channel,
    seconds: u64,
    rate: u64,
    heavy_clients: usize,
    heavy_request: &pb::CheckRequest,
    failed: &Arc<AtomicBool>,
) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let heavy_ok = Arc::new(AtomicU64::new(0));
    let heavy_shed = Arc::new(AtomicU64::new(0));
    let mut heavy_tasks = Vec::new();
    for _ in 0..heavy_clients {
        let mut client = AuthorizerClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let (stop, ok, shed, failed) = (
            stop.clone(),
            heavy_ok.clone(),
            heavy_shed.clone(),
            failed.clone(),
        );
        let request = heavy_request.clone();
        heavy_tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.check(request.clone()).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                        shed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(status) => {
                        eprintln!("heavy request failed: {status:?}");
                        failed.store(true, Ordering::Relaxed);
                        0
                    }
                };
            }
        }));
    }
    let started = Instant::now();
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = Vec::new();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        ticker.tick().await;
        n += 1;
        let mut client = AuthorizerClient::new(channel.clone());
        let failed = failed.clone();
        let request = ordinary(n);
        sent.push(tokio::spawn(async move {
            let at = Instant::now();
            match client.check(request).await {
                Ok(answer) if answer.get_ref().decision() == pb::Decision::Allow => {
                    Some(at.elapsed().as_micros() as u64)
                }
                other => {
                    eprintln!("ordinary check failed: {other:?}");
                    failed.store(true, Ordering::Relaxed);
                    None
                }
            }
        }));
    }
    let mut latencies_us = Vec::with_capacity(sent.len());
    for task in sent {
        if let Ok(Some(us)) = task.await {
            latencies_us.push(us);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in heavy_tasks {
        let _ = task.await;
    }
    latencies_us.sort_unstable();
    Phase {
        ordinary: latencies_us.len() as u64,
        latencies_us,
        heavy_ok: heavy_ok.load(Ordering::Relaxed),
        heavy_shed: heavy_shed.load(Ordering::Relaxed),
    }
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let at = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

async fn run(args: &[String]) -> Result<bool, Error> {
    let (addr, seconds, rate, heavy_clients, rounds) = match args {
        [addr, seconds, rate, heavy, rounds, ..] => (
            addr.clone(),
            seconds.parse::<u64>()?,
            rate.parse::<u64>()?,
            heavy.parse::<usize>()?,
            rounds.parse::<usize>()?,
        ),
        _ => {
            return Err(
                "usage: heavy_mix ADDR SECONDS RATE HEAVY_CONCURRENCY ROUNDS [ENTITIES DEPTH ANCESTORS]"
                    .into(),
            );
        }
    };
    let entities: usize = args.get(5).map_or(Ok(1000), |v| v.parse())?;
    let depth: usize = args.get(6).map_or(Ok(32), |v| v.parse())?;
    let ancestors: usize = args.get(7).map_or(Ok(10_000), |v| v.parse())?;
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let heavy_request = heavy(entities, depth, ancestors);
    eprintln!(
        "heavy request: {entities} entities, {depth} deep, ~{ancestors} ancestor pairs, {} bytes of entities_json",
        heavy_request.entities_json.len()
    );
    let failed = Arc::new(AtomicBool::new(false));
    let (mut alone, mut mixed) = (Vec::new(), Vec::new());
    let (mut alone_p50, mut mixed_p50) = (Vec::new(), Vec::new());
    for round in 0..rounds * 2 {
        // Alternate which side runs first from round to round.
        let with_heavy = (round % 2 == 1) ^ ((round / 2) % 2 == 1);
        let clients = if with_heavy { heavy_clients } else { 0 };
        let result = phase(&channel, seconds, rate, clients, &heavy_request, &failed).await;
        let (p50, p99) = (
            quantile(&result.latencies_us, 0.5),
            quantile(&result.latencies_us, 0.99),
        );
        println!(
            "{} p50_us={p50} p99_us={p99} ordinary={} heavy_ok={} heavy_shed={}",
            if with_heavy {
                "with_heavy"
            } else {
                "alone     "
            },
            result.ordinary,
            result.heavy_ok,
            result.heavy_shed
        );
        if with_heavy {
            mixed.push(p99 as f64);
            mixed_p50.push(p50 as f64);
        } else {
            alone.push(p99 as f64);
            alone_p50.push(p50 as f64);
        }
    }
    let (alone, mixed) = (median(alone), median(mixed));
    println!(
        "median p50_us alone={:.0} with_heavy={:.0}",
        median(alone_p50),
        median(mixed_p50)
    );
    println!("median p99_us alone={alone:.0} with_heavy={mixed:.0}");
    println!(
        "p99 ratio (with heavy / alone): {:.2}",
        mixed / alone.max(1.0)
    );
    Ok(!failed.load(Ordering::Relaxed))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // One client thread: the server gets the rest of the machine.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("heavy_mix: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("heavy_mix: {error}");
            ExitCode::from(2)
        }
    }
}
