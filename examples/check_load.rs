//! Bench helper for `benches/identity_pg_decide.sh`: a closed-loop gRPC load
//! on `arbiter.v1.Authorizer/Check` whose principal changes on every request,
//! so that a store's size shows (h2load repeats one request body).
//!
//!   check_load ADDR USERS SECONDS CONCURRENCY
//!
//! Each request asks whether `Saas::User::"u<n>"`, with `n` drawn uniformly
//! from 2..=USERS, may `Saas::Action::"secret"` on `Saas::Document::"d1"`
//! (`deploy/postgres/example.cedar`: allowed when the user's clearance is at
//! least 2). The users of `benches/identity_pg_load.sh` have clearance
//! `n % 4` (except `u1`, whose clearance that script changes), so every
//! answer is checked: a wrong decision or a gRPC error makes the exit
//! status 1, and the figures would not count.
//!
//! Prints one line: `requests_per_second p50_us p99_us requests`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use arbiter::proto::v1 as pb;
use pb::authorizer_client::AuthorizerClient;
use tonic::transport::Channel;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Connections the load is spread over (requests share them as h2 streams).
const CONNECTIONS: usize = 4;

struct Args {
    addr: String,
    users: u64,
    duration: Duration,
    concurrency: usize,
}

fn parse(args: &[String]) -> Result<Args, Error> {
    let [addr, users, seconds, concurrency] = args else {
        return Err("usage: check_load ADDR USERS SECONDS CONCURRENCY".into());
    };
    let users: u64 = users.parse().map_err(|_| "USERS is not a number")?;
    if users < 2 {
        return Err("USERS must be at least 2".into());
    }
    let seconds: f64 = seconds.parse().map_err(|_| "SECONDS is not a number")?;
    let concurrency: usize = concurrency
        .parse()
        .map_err(|_| "CONCURRENCY is not a number")?;
    Ok(Args {
        addr: format!("http://{addr}"),
        users,
        duration: Duration::try_from_secs_f64(seconds).map_err(|_| "SECONDS is out of range")?,
        concurrency: concurrency.max(1),
    })
}

/// splitmix64: a different user on every request, the same sequence on
/// every run.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
    users: u64,
    seed: u64,
    until: Instant,
) -> Result<Vec<u32>, Error> {
    let mut state = seed;
    let mut latencies = Vec::new();
    while Instant::now() < until {
        let n = 2 + next(&mut state) % (users - 1);
        let request = pb::CheckRequest {
            principal: uid("Saas::User", format!("u{n}")),
            action: uid("Saas::Action", "secret".to_owned()),
            resource: uid("Saas::Document", "d1".to_owned()),
            ..pb::CheckRequest::default()
        };
        let sent = Instant::now();
        let response = client.check(request).await?.into_inner();
        let took = sent.elapsed();
        let expected = if n % 4 >= 2 {
            pb::Decision::Allow
        } else {
            pb::Decision::Deny
        };
        if response.decision() != expected {
            return Err(format!(
                "u{n}: expected {expected:?}, got {:?} (errors: {:?})",
                response.decision(),
                response.errors
            )
            .into());
        }
        latencies.push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
    }
    Ok(latencies)
}

async fn run(args: Args) -> Result<String, Error> {
    let mut channels = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        channels.push(Channel::from_shared(args.addr.clone())?.connect().await?);
    }
    let started = Instant::now();
    let until = started + args.duration;
    let callers: Vec<_> = (0..args.concurrency)
        .map(|i| {
            let client = AuthorizerClient::new(channels[i % CONNECTIONS].clone());
            tokio::spawn(caller(client, args.users, i as u64 + 1, until))
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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = parse(&args).and_then(|args| {
        // One client thread, so the server keeps the other core.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(run(args))
    });
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
