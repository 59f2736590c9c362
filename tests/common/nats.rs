//! A real `nats-server` with JetStream on a free port and a temp store,
//! that a test can stop and restart; killed on drop, even when a test fails.
//!
//! Ports that a test names before something listens on them (a NATS server
//! that is down at first or restarted, a binary's listeners, a collector
//! that comes up late) are taken below the kernel's ephemeral range: a port
//! from `bind(0)` is in that range, so while nothing listened on it another
//! socket's `bind(0)` or `connect` could be given it, or a client retrying
//! `127.0.0.1:P` could be given P as its own port and connect to itself,
//! and the server then could not bind it. A started server is known to be
//! ours by its ports file (`-ports_file_dir`), not by a port that answers.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;

pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

pub struct NatsServer {
    pub port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

/// A port on 127.0.0.1 that nothing is bound to now, below the ephemeral
/// range (so the kernel hands it to no other socket), spread by process id
/// so that test processes running side by side try different ports.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = low.saturating_sub(10_000).clamp(1, 16_384);
    let base = low - span;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(base + offset).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {base}..{low}");
}

fn binary() -> PathBuf {
    let path = PathBuf::from(NATS_SERVER);
    if path.exists() {
        path
    } else {
        PathBuf::from("nats-server")
    }
}

impl NatsServer {
    /// A server that is not running yet (its port is reserved by number only).
    pub fn stopped() -> NatsServer {
        NatsServer {
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
            child: None,
        }
    }

    pub fn start() -> NatsServer {
        // Another process may have bound the port since it was checked:
        // then take another one.
        for _ in 0..10 {
            let mut server = Self::stopped();
            if server.try_start() {
                return server;
            }
        }
        panic!("nats-server could not bind any of 10 ports");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (same port, same store) and waits until it is ready.
    pub fn restart(&mut self) {
        assert!(
            self.try_start(),
            "nats-server exited at start: port {} is taken",
            self.port
        );
    }

    /// Starts the server and waits for its ports file, which it writes once
    /// it listens; false when it exited first (its port was taken).
    fn try_start(&mut self) -> bool {
        assert!(self.child.is_none(), "already running");
        let ports_dir = self.store.path().join("ports");
        std::fs::create_dir_all(&ports_dir).unwrap();
        let mut child = Command::new(binary())
            .args(["-js", "-sd"])
            .arg(self.store.path())
            .args(["-p", &self.port.to_string(), "-a", "127.0.0.1"])
            .arg("-ports_file_dir")
            .arg(&ports_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server (apt-get install nats-server)");
        let ports_file = ports_dir.join(format!("nats-server_{}.ports", child.id()));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ports_file)
                && text.contains(&format!("127.0.0.1:{}\"", self.port))
            {
                self.child = Some(child);
                return true;
            }
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nats-server did not start");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the server (SIGKILL: the worst case for a sink).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The records in `stream`, in stream order, each with its decision id:
/// packed messages are unpacked. Every message is checked to be what the
/// sink promises: `Arbiter-Records` lines, and a `Nats-Msg-Id` that is the
/// decision id of a lone record or `<first>..<last>` of a packed one.
pub async fn messages(url: &str, stream: &str) -> Vec<(String, serde_json::Value)> {
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(client);
    let Ok(mut stream) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let info = stream.info().await.unwrap();
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    if info.state.messages == 0 {
        return out;
    }
    for seq in first..=last {
        let Ok(message) = stream.get_raw_message(seq).await else {
            continue;
        };
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        let message_id = header("Nats-Msg-Id");
        let count: usize = header("Arbiter-Records").parse().unwrap();
        let records: Vec<serde_json::Value> = message
            .payload
            .split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).unwrap())
            .collect();
        assert_eq!(records.len(), count, "`Arbiter-Records` of message {seq}");
        let id = |r: &serde_json::Value| r["decision_id"].as_str().unwrap().to_owned();
        let named = match records.as_slice() {
            [one] => id(one),
            [first, .., last] => format!("{}..{}", id(first), id(last)),
            [] => String::new(),
        };
        assert_eq!(message_id, named, "`Nats-Msg-Id` of message {seq}");
        out.extend(records.into_iter().map(|r| (id(&r), r)));
    }
    out
}

/// Messages in `stream` (0 when it does not exist).
pub async fn message_count(url: &str, stream: &str) -> u64 {
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    match js.get_stream(stream).await {
        Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
        Err(_) => 0,
    }
}

/// Records in `stream` (0 when it does not exist or the server is down).
pub async fn count(url: &str, stream: &str) -> u64 {
    let Ok(Ok(client)) =
        tokio::time::timeout(Duration::from_secs(2), async_nats::connect(url)).await
    else {
        return 0;
    };
    let js = jetstream::new(client);
    let Ok(mut stream) = js.get_stream(stream).await else {
        return 0;
    };
    let Ok(info) = stream.info().await else {
        return 0;
    };
    if info.state.messages == 0 {
        return 0;
    }
    let mut records = 0;
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if let Ok(message) = stream.get_raw_message(seq).await {
            records += message
                .headers
                .get("Arbiter-Records")
                .and_then(|v| v.as_str().parse::<u64>().ok())
                .unwrap_or(1);
        }
    }
    records
}

/// Waits until `stream` holds `n` records; returns what it holds at the end.
pub async fn wait_for_count(url: &str, stream: &str, n: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let got = count(url, stream).await;
        if got >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
