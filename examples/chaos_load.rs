//! Load generator, oracle and fault helper of `benches/chaos/run.sh` (issue
//! 22, point 6).
//!
//!   chaos_load proxy LISTEN UPSTREAM DELAY_FILE
//!       A TCP proxy (Arbiter -> Postgres) that holds every chunk it
//!       forwards, both ways, for the milliseconds written in DELAY_FILE
//!       (re-read every 100 ms; missing or empty = 0): the slow identity store.
//!   chaos_load policy DIR VERSION
//!       Writes policy version VERSION to DIR/chaos.cedar (by rename).
//!   chaos_load run GRPC_ADDR PG_URL POLICY_DIR CONTROL_DIR OUT_DIR CONCURRENCY RATE
//!       Until CONTROL_DIR/stop exists: CONCURRENCY callers send varied Check
//!       requests (RATE per second in all); a mutator changes one user's
//!       level in Postgres every 100 ms and notes the change-log position of
//!       each committed write; a writer publishes the next policy version
//!       every CONTROL_DIR/policy_interval_ms (default 1000), every fifth
//!       one broken. Everything seen goes to OUT_DIR/{calls,writes,policies}.tsv.
//!   chaos_load report OUT_DIR NATS_URL STREAM MAX_STALENESS_MS
//!       Checks every answer against the oracle and every decision id
//!       against the NATS stream, and prints the table per fault phase
//!       (OUT_DIR/phases.tsv, samples.tsv and recovery.tsv come from the
//!       script). Exit status 1 when a goal is missed.
//!
//! The oracle. Users `u0`..`u199` (Postgres, `users.attributes.level`,
//! initially `n % 10`; `ghost*` principals exist nowhere). Policy version
//! `v` (`policy_text`) allows `read` when `level + context.boost >= T(v)`
//! and `write` on `Document d(W(v))` when `level >= 5`; a forbid with the
//! opposite condition makes every deny name a policy too, so each answer
//! names the version that decided it (`v<v>-...` in `reasons`, or in
//! `errors` for a ghost, whose missing `level` errors every policy: deny).
//! The data version is the answer's `data_revision`, a change-log position:
//! the level of each user at that position is the last write of the mutator
//! at or below it. So the expected decision of (request, policy version,
//! data version) follows from what this program wrote, not from Arbiter.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbiter::proto::v1 as pb;
use pb::authorizer_client::AuthorizerClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

type Error = Box<dyn std::error::Error + Send + Sync>;

const USERS: u64 = 200;
const DOCUMENTS: u64 = 10;
const CONNECTIONS: usize = 4;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// splitmix64: varied requests, the same sequence on every run.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------- policies

fn broken(version: u64) -> bool {
    version.is_multiple_of(5)
}
fn read_threshold(version: u64) -> i64 {
    ((version * 7) % 10) as i64
}
fn write_document(version: u64) -> u64 {
    version % DOCUMENTS
}

fn policy_text(version: u64) -> String {
    let t = read_threshold(version);
    let w = write_document(version);
    if broken(version) {
        // A syntax error halfway: the reload must be refused.
        return format!(
            "@id(\"v{version}-read\")\npermit (principal, action == Saas::Action::\"read\", resource)\nwhen {{ principal.level + context.boost >= \n"
        );
    }
    format!(
        r#"@id("v{version}-read")
permit (principal, action == Saas::Action::"read", resource)
when {{ principal.level + context.boost >= {t} }};

@id("v{version}-write")
permit (principal, action == Saas::Action::"write", resource == Saas::Document::"d{w}")
when {{ principal.level >= 5 }};

@id("v{version}-deny")
forbid (principal, action, resource)
unless {{
  (action == Saas::Action::"read" && principal.level + context.boost >= {t}) ||
  (action == Saas::Action::"write" && resource == Saas::Document::"d{w}" && principal.level >= 5)
}};
"#
    )
}

fn write_policy(dir: &Path, version: u64) -> std::io::Result<()> {
    // The temporary name does not end in `.cedar`: the watcher ignores it.
    let temporary = dir.join(".chaos.cedar.tmp");
    std::fs::write(&temporary, policy_text(version))?;
    std::fs::rename(&temporary, dir.join("chaos.cedar"))
}

/// The expected decision: `None` level = the principal does not exist.
fn expected_allow(
    version: u64,
    level: Option<i64>,
    action: &str,
    document: u64,
    boost: i64,
) -> bool {
    let Some(level) = level else { return false };
    match action {
        "read" => level + boost >= read_threshold(version),
        "write" => document == write_document(version) && level >= 5,
        _ => false,
    }
}

// ---------------------------------------------------------------- proxy

async fn proxy(listen: String, upstream: String, delay_file: PathBuf) -> Result<(), Error> {
    let delay = Arc::new(AtomicU64::new(0));
    {
        let delay = delay.clone();
        tokio::spawn(async move {
            loop {
                let ms = std::fs::read_to_string(&delay_file)
                    .ok()
                    .and_then(|text| text.trim().parse().ok())
                    .unwrap_or(0);
                delay.store(ms, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    loop {
        let (inbound, _) = listener.accept().await?;
        let upstream = upstream.clone();
        let delay = delay.clone();
        tokio::spawn(async move {
            let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                return;
            };
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            // Either direction ending ends both.
            tokio::select! {
                () = pump(in_read, out_write, delay.clone()) => {}
                () = pump(out_read, in_write, delay) => {}
            }
        });
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let ms = delay.load(Ordering::Relaxed);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------- run

struct Log(Mutex<std::io::BufWriter<std::fs::File>>);

impl Log {
    fn create(path: &Path) -> Result<Arc<Self>, Error> {
        Ok(Arc::new(Log(Mutex::new(std::io::BufWriter::new(
            std::fs::File::create(path)?,
        )))))
    }
    fn line(&self, line: &str) {
        if let Ok(mut file) = self.0.lock() {
            let _ = writeln!(file, "{line}");
        }
    }
    fn flush(&self) {
        if let Ok(mut file) = self.0.lock() {
            let _ = file.flush();
        }
    }
}

/// The policy version an answer names (`v<n>-...`), from its reasons or,
/// when every policy errored, its errors.
fn version_of(response: &pb::CheckResponse) -> Option<u64> {
    response
        .reasons
        .iter()
        .map(String::as_str)
        .chain(response.errors.iter().map(|e| e.policy_id.as_str()))
        .find_map(|id| id.strip_prefix('v')?.split('-').next()?.parse().ok())
}

async fn caller(
    channel: Channel,
    index: u64,
    interval: Duration,
    stop: Arc<AtomicBool>,
    calls: Arc<Log>,
) {
    let mut client = AuthorizerClient::new(channel);
    let mut state = index.wrapping_mul(7919) + 1;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        let r = next(&mut state);
        // One in ten principals exists nowhere.
        let principal = if r.is_multiple_of(10) {
            format!("ghost{}", (r >> 8) % 50)
        } else {
            format!("u{}", (r >> 8) % USERS)
        };
        let action = if (r >> 20).is_multiple_of(3) {
            "write"
        } else {
            "read"
        };
        let document = (r >> 24) % DOCUMENTS;
        let boost = ((r >> 32) % 4) as i64;
        let request = pb::CheckRequest {
            principal: Some(pb::EntityUid {
                r#type: "Saas::User".into(),
                id: principal.clone(),
            }),
            action: Some(pb::EntityUid {
                r#type: "Saas::Action".into(),
                id: action.into(),
            }),
            resource: Some(pb::EntityUid {
                r#type: "Saas::Document".into(),
                id: format!("d{document}"),
            }),
            context_json: format!("{{\"boost\": {boost}}}"),
            ..pb::CheckRequest::default()
        };
        let mut request = tonic::Request::new(request);
        request.set_timeout(Duration::from_secs(5));
        let sent = now_ms();
        let outcome = client.check(request).await;
        let received = now_ms();
        // sent received caller principal action document boost outcome
        // decision_id policy_revision data_revision stale version
        let line = match outcome {
            Ok(response) => {
                let response = response.into_inner();
                let decision = match response.decision() {
                    pb::Decision::Allow => "allow",
                    pb::Decision::Deny => "deny",
                    pb::Decision::Unspecified => "unspecified",
                };
                format!(
                    "{sent}\t{received}\t{index}\t{principal}\t{action}\t{document}\t{boost}\t{decision}\t{}\t{}\t{}\t{}\t{}",
                    response.decision_id,
                    response.policy_revision,
                    response.data_revision,
                    response.data_stale,
                    version_of(&response).map_or_else(|| "-".into(), |v| v.to_string()),
                )
            }
            Err(status) => format!(
                "{sent}\t{received}\t{index}\t{principal}\t{action}\t{document}\t{boost}\terror:{:?}\t-\t-\t-\t-\t-",
                status.code()
            ),
        };
        calls.line(&line);
    }
}

/// Changes one user's level every 100 ms; logs `seq commit_ms user level`
/// for each write known to have committed.
async fn mutator(pg_url: String, stop: Arc<AtomicBool>, writes: Arc<Log>) {
    let mut state = 0x5eed_u64;
    // A write whose COMMIT got no answer: (seq, user, level).
    let mut uncertain: Option<(i64, String, i64)> = None;
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut client, connection)) =
            tokio_postgres::connect(&pg_url, tokio_postgres::NoTls).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        tokio::spawn(connection);
        if let Some((seq, user, level)) = uncertain.take() {
            match client
                .query_opt("SELECT 1 FROM arbiter_change_log WHERE seq = $1", &[&seq])
                .await
            {
                // Committed: at the latest now (the staleness check takes the latest).
                Ok(Some(_)) => writes.line(&format!("{seq}\t{}\t{user}\t{level}", now_ms())),
                Ok(None) => {}
                Err(_) => {
                    uncertain = Some((seq, user, level));
                    continue;
                }
            }
        }
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let r = next(&mut state);
            let user = format!("u{}", r % USERS);
            let level = ((r >> 16) % 10) as i64;
            let Ok(transaction) = client.transaction().await else {
                break;
            };
            let written = async {
                transaction
                    .execute(
                        "UPDATE users SET attributes = jsonb_build_object('level', $2::bigint) WHERE id = $1",
                        &[&user, &level],
                    )
                    .await?;
                let row = transaction
                    .query_one("SELECT arbiter_write_position()", &[])
                    .await?;
                Ok::<_, tokio_postgres::Error>((row.get::<_, i64>(0), transaction))
            }
            .await;
            let Ok((seq, transaction)) = written else {
                break;
            };
            match transaction.commit().await {
                Ok(()) => writes.line(&format!("{seq}\t{}\t{user}\t{level}", now_ms())),
                Err(_) => {
                    uncertain = Some((seq, user, level));
                    break;
                }
            }
        }
    }
}

async fn policy_writer(dir: PathBuf, control: PathBuf, stop: Arc<AtomicBool>, policies: Arc<Log>) {
    let mut version = 1;
    while !stop.load(Ordering::Relaxed) {
        let interval = std::fs::read_to_string(control.join("policy_interval_ms"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(interval)).await;
        version += 1;
        if write_policy(&dir, version).is_ok() {
            policies.line(&format!("{version}\t{}\t{}", now_ms(), broken(version)));
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    addr: String,
    pg_url: String,
    policy_dir: PathBuf,
    control: PathBuf,
    out: PathBuf,
    concurrency: u64,
    rate: u64,
) -> Result<(), Error> {
    let calls = Log::create(&out.join("calls.tsv"))?;
    let writes = Log::create(&out.join("writes.tsv"))?;
    let policies = Log::create(&out.join("policies.tsv"))?;
    policies.line(&format!("1\t{}\tfalse", now_ms()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let channels: Vec<Channel> = (0..CONNECTIONS)
        .map(|_| Channel::from_shared(format!("http://{addr}")).map(|c| c.connect_lazy()))
        .collect::<Result<_, _>>()?;
    let interval = Duration::from_micros(1_000_000 * concurrency.max(1) / rate.max(1));
    for index in 0..concurrency {
        tasks.push(tokio::spawn(caller(
            channels[index as usize % CONNECTIONS].clone(),
            index,
            interval,
            stop.clone(),
            calls.clone(),
        )));
    }
    tasks.push(tokio::spawn(mutator(pg_url, stop.clone(), writes.clone())));
    tasks.push(tokio::spawn(policy_writer(
        policy_dir,
        control.clone(),
        stop.clone(),
        policies.clone(),
    )));
    while !control.join("stop").exists() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        calls.flush();
        writes.flush();
        policies.flush();
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    calls.flush();
    writes.flush();
    policies.flush();
    Ok(())
}

// ---------------------------------------------------------------- report

fn lines(path: &Path) -> Result<Vec<Vec<String>>, Error> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        if !line.is_empty() {
            out.push(line.split('\t').map(str::to_owned).collect());
        }
    }
    Ok(out)
}

fn lines_or_empty(path: &Path) -> Vec<Vec<String>> {
    lines(path).unwrap_or_default()
}

fn num<T: std::str::FromStr>(fields: &[String], i: usize) -> Option<T> {
    fields.get(i)?.parse().ok()
}

#[derive(Default)]
struct Phase {
    calls: u64,
    failed: BTreeMap<String, u64>,
    wrong: u64,
    stale: u64,
    stale_unflagged: u64,
    lost: u64,
    peak_rss_kb: u64,
    peak_fds: u64,
    recovery: Vec<String>,
    max_data_lag_ms: u64,
    max_policy_lag_ms: u64,
}

/// The decision ids in the stream (packed messages unpacked).
async fn stream_ids(url: &str, stream: &str) -> Result<(HashSet<String>, u64), Error> {
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(stream).await?;
    let info = stream.info().await?;
    let mut ids = HashSet::new();
    let mut records = 0;
    if info.state.messages == 0 {
        return Ok((ids, 0));
    }
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let Ok(message) = stream.get_raw_message(seq).await else {
            continue;
        };
        for line in message.payload.split(|b| *b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let record: serde_json::Value = serde_json::from_slice(line)?;
            if let Some(id) = record["decision_id"].as_str() {
                records += 1;
                ids.insert(id.to_owned());
            }
        }
    }
    Ok((ids, records))
}

async fn report(
    out: PathBuf,
    nats_url: String,
    stream: String,
    max_staleness_ms: u64,
    dropped: u64,
) -> Result<bool, Error> {
    let phases: Vec<(u64, String)> = lines(&out.join("phases.tsv"))?
        .iter()
        .filter_map(|f| Some((num(f, 0)?, f.get(1)?.clone())))
        .collect();
    let phase_of = |t: u64| -> usize {
        phases
            .iter()
            .rposition(|(start, _)| *start <= t)
            .unwrap_or(0)
    };
    let mut table: Vec<Phase> = phases.iter().map(|_| Phase::default()).collect();

    let written_policies = lines(&out.join("policies.tsv"))?;
    let broken_versions: HashSet<u64> = written_policies
        .iter()
        .filter(|f| f.get(2).is_some_and(|b| b == "true"))
        .filter_map(|f| num(f, 0))
        .collect();
    // (version, written at) of every good version, by version.
    let mut good_versions: Vec<(u64, u64)> = written_policies
        .iter()
        .filter(|f| f.get(2).is_some_and(|b| b == "false"))
        .filter_map(|f| Some((num(f, 0)?, num(f, 1)?)))
        .collect();
    good_versions.sort_unstable();
    // user -> [(seq, level)] sorted; every write with its commit time.
    let mut history: HashMap<String, Vec<(u64, i64)>> = HashMap::new();
    let mut writes: Vec<(u64, u64)> = Vec::new();
    for f in lines(&out.join("writes.tsv"))? {
        let (Some(seq), Some(at), Some(user), Some(level)) = (
            num::<u64>(&f, 0),
            num::<u64>(&f, 1),
            f.get(2),
            num::<i64>(&f, 3),
        ) else {
            continue;
        };
        history.entry(user.clone()).or_default().push((seq, level));
        writes.push((seq, at));
    }
    for list in history.values_mut() {
        list.sort_unstable();
    }
    writes.sort_unstable();
    // For the staleness check: the highest seq committed by each time.
    let mut by_time = writes.clone();
    by_time.sort_unstable_by_key(|(_, at)| *at);
    let mut highest_by_time: Vec<(u64, u64)> = Vec::new(); // (at, max seq committed at or before)
    let mut highest = 0;
    for (seq, at) in by_time {
        highest = highest.max(seq);
        highest_by_time.push((at, highest));
    }
    let committed_by = |t: u64| -> u64 {
        let i = highest_by_time.partition_point(|(at, _)| *at <= t);
        if i == 0 { 0 } else { highest_by_time[i - 1].1 }
    };
    let level_at = |user: &str, revision: u64| -> Option<i64> {
        let n: u64 = user.strip_prefix('u')?.parse().ok()?;
        if n >= USERS {
            return None;
        }
        let initial = (n % 10) as i64;
        let Some(list) = history.get(user) else {
            return Some(initial);
        };
        let i = list.partition_point(|(seq, _)| *seq <= revision);
        Some(if i == 0 { initial } else { list[i - 1].1 })
    };

    let mut returned: Vec<(String, usize)> = Vec::new();
    let mut revision_versions: HashMap<String, HashSet<u64>> = HashMap::new();
    let mut examples: Vec<String> = Vec::new();
    let mut total_calls = 0;
    for f in lines(&out.join("calls.tsv"))? {
        let Some(sent) = num::<u64>(&f, 0) else {
            continue;
        };
        let phase = &mut table[phase_of(sent)];
        phase.calls += 1;
        total_calls += 1;
        let outcome = f.get(7).cloned().unwrap_or_default();
        if let Some(code) = outcome.strip_prefix("error:") {
            *phase.failed.entry(code.to_owned()).or_default() += 1;
            continue;
        }
        let (principal, action) = (f[3].as_str(), f[4].as_str());
        let document: u64 = num(&f, 5).unwrap_or(u64::MAX);
        let boost: i64 = num(&f, 6).unwrap_or(0);
        let decision_id = f.get(8).cloned().unwrap_or_default();
        let policy_revision = f.get(9).cloned().unwrap_or_default();
        let data_revision: Option<u64> = num(&f, 10);
        let stale = f.get(11).is_some_and(|s| s == "true");
        let version: Option<u64> = num(&f, 12);
        returned.push((decision_id, phase_of(sent)));
        if stale {
            phase.stale += 1;
        }
        let wrong = match (version, data_revision) {
            (Some(version), Some(revision)) if !broken_versions.contains(&version) => {
                revision_versions
                    .entry(policy_revision)
                    .or_default()
                    .insert(version);
                let expected = expected_allow(
                    version,
                    level_at(principal, revision),
                    action,
                    document,
                    boost,
                );
                if !stale {
                    // Not flagged stale: every write committed more than
                    // the maximum staleness (plus a poll's slack) before the
                    // call must be in the data it used.
                    let due = committed_by(sent.saturating_sub(max_staleness_ms + 1000));
                    if due > revision {
                        phase.stale_unflagged += 1;
                    }
                }
                // How far behind the data was: oldest committed write it lacks.
                // (Positions are handed out in commit order: the first
                // position above the revision is the oldest write missing.)
                if let Some(&(_, at)) =
                    writes.get(writes.partition_point(|(seq, _)| *seq <= revision))
                {
                    phase.max_data_lag_ms = phase.max_data_lag_ms.max(sent.saturating_sub(at));
                }
                // How long a newer good policy version had been written.
                let newer = good_versions.partition_point(|(v, _)| *v <= version);
                if let Some(&(_, written)) = good_versions.get(newer) {
                    phase.max_policy_lag_ms =
                        phase.max_policy_lag_ms.max(sent.saturating_sub(written));
                }
                (outcome != "allow" && outcome != "deny") || expected != (outcome == "allow")
            }
            _ => true,
        };
        if wrong {
            phase.wrong += 1;
            if examples.len() < 10 {
                examples.push(f.join(" "));
            }
        }
    }
    let revision_conflicts = revision_versions.values().filter(|v| v.len() > 1).count();

    let (in_stream, stream_records) = stream_ids(&nats_url, &stream).await?;
    let mut lost_total: u64 = 0;
    for (id, phase) in &returned {
        if !in_stream.contains(id) {
            table[*phase].lost += 1;
            lost_total += 1;
        }
    }

    for f in lines_or_empty(&out.join("samples.tsv")) {
        let (Some(t), Some(rss), Some(fds)) =
            (num::<u64>(&f, 0), num::<u64>(&f, 1), num::<u64>(&f, 2))
        else {
            continue;
        };
        let phase = &mut table[phase_of(t)];
        phase.peak_rss_kb = phase.peak_rss_kb.max(rss);
        phase.peak_fds = phase.peak_fds.max(fds);
    }
    for f in lines_or_empty(&out.join("recovery.tsv")) {
        if let (Some(name), Some(what)) = (f.first(), f.get(1))
            && let Some(i) = phases.iter().position(|(_, n)| n == name)
        {
            table[i].recovery.push(what.clone());
        }
    }

    println!(
        "| phase | calls | failed (gRPC code) | wrong | stale answers | stale unflagged | max data lag ms | max policy lag ms | records lost | peak RSS MiB | peak fds | recovery |"
    );
    println!("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    let (mut wrong_total, mut failed_total, mut unflagged_total) = (0, 0, 0);
    for ((_, name), p) in phases.iter().zip(&table) {
        let failed: u64 = p.failed.values().sum();
        failed_total += failed;
        wrong_total += p.wrong;
        unflagged_total += p.stale_unflagged;
        let codes = if p.failed.is_empty() {
            "0".to_owned()
        } else {
            p.failed
                .iter()
                .map(|(code, n)| format!("{n} {code}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "| {name} | {} | {codes} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} |",
            p.calls,
            p.wrong,
            p.stale,
            p.stale_unflagged,
            p.max_data_lag_ms,
            p.max_policy_lag_ms,
            p.lost,
            p.peak_rss_kb as f64 / 1024.0,
            p.peak_fds,
            if p.recovery.is_empty() {
                "-".to_owned()
            } else {
                p.recovery.join("; ")
            },
        );
    }
    println!();
    println!(
        "calls {total_calls}, answered {}, failed {failed_total}, wrong {wrong_total}, stale unflagged {unflagged_total}; \
         policy revisions seen {} ({} naming more than one version); \
         decision ids returned {}, records in the stream {stream_records} ({} distinct), lost {lost_total}",
        returned.len(),
        revision_versions.len(),
        revision_conflicts,
        returned.len(),
        in_stream.len(),
    );
    for example in &examples {
        println!("wrong: {example}");
    }
    // A record the server counted as dropped (a documented outcome, e.g.
    // `spool_error` on a full disk) is not lost silently.
    println!(
        "records lost {lost_total}, counted as dropped by the server {dropped}, unaccounted {}",
        lost_total.saturating_sub(dropped)
    );
    Ok(
        wrong_total == 0
            && lost_total <= dropped
            && unflagged_total == 0
            && revision_conflicts == 0,
    )
}

// ---------------------------------------------------------------- main

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome: Result<bool, Error> = runtime.block_on(async {
        match args
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["proxy", listen, upstream, delay_file] => {
                proxy((*listen).into(), (*upstream).into(), delay_file.into()).await?;
                Ok(true)
            }
            ["policy", dir, version] => {
                write_policy(Path::new(dir), version.parse()?)?;
                Ok(true)
            }
            [
                "run",
                addr,
                pg_url,
                policy_dir,
                control,
                out,
                concurrency,
                rate,
            ] => {
                run(
                    (*addr).into(),
                    (*pg_url).into(),
                    policy_dir.into(),
                    control.into(),
                    out.into(),
                    concurrency.parse()?,
                    rate.parse()?,
                )
                .await?;
                Ok(true)
            }
            ["report", out, nats_url, stream, max_staleness_ms, rest @ ..] => {
                let dropped = match rest {
                    [] => 0,
                    [dropped] => dropped.parse()?,
                    _ => {
                        return Err(
                            "usage: report OUT_DIR NATS_URL STREAM MAX_STALENESS_MS [DROPPED]"
                                .into(),
                        );
                    }
                };
                report(
                    out.into(),
                    (*nats_url).into(),
                    (*stream).into(),
                    max_staleness_ms.parse()?,
                    dropped,
                )
                .await
            }
            _ => Err("usage: see the top of examples/chaos_load.rs".into()),
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}
