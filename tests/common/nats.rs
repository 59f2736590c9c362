//! A real `nats-server` with JetStream on a free port and a temp store,
//! that a test can stop and restart; killed on drop, even when a test fails.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;

pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

pub struct NatsServer {
    pub port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
        let mut server = Self::stopped();
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (same port, same store) and waits until it accepts.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(binary())
            .args(["-js", "-sd"])
            .arg(self.store.path())
            .args(["-p", &self.port.to_string(), "-a", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server (apt-get install nats-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
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
