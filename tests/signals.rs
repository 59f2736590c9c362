//! SIGHUP on the real binary: it reloads the files and never stops the
//! server (the default action of SIGHUP ended the process at once, found by
//! the chaos run, `benches/chaos/run.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use arbiter::proto::v1::CheckRequest;
use arbiter::proto::v1::authorizer_client::AuthorizerClient;
use common::uid;
use tokio::io::{AsyncBufReadExt, BufReader};

fn policy(version: u32) -> String {
    format!("@id(\"v{version}\")\npermit (principal, action, resource);\n")
}

async fn reasons(client: &mut AuthorizerClient<tonic::transport::Channel>) -> Vec<String> {
    let request = CheckRequest {
        principal: uid("User", "ann"),
        action: uid("Action", "read"),
        resource: uid("Doc", "d1"),
        ..CheckRequest::default()
    };
    client.check(request).await.unwrap().into_inner().reasons
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_files_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policies.cedar");
    std::fs::write(&file, policy(1)).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--policies")
        .arg(&file)
        // Only SIGHUP can make this server see an edit within the test.
        .args(["--reload-interval-ms", "3600000"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = common::served_grpc_address(&mut lines).await;
    let mut client = AuthorizerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    assert_eq!(reasons(&mut client).await, ["v1"]);

    let hangup = |pid: u32| {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let pid = child.id().unwrap();

    // A SIGHUP with nothing changed: still serving, same set.
    hangup(pid);
    loop {
        let line = lines.next_line().await.unwrap();
        let line = line.expect("SIGHUP ended the server (its log closed)");
        if line.contains("SIGHUP received") {
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the server"
    );
    assert_eq!(reasons(&mut client).await, ["v1"]);

    // An edit, then SIGHUP: the new set serves.
    std::fs::write(&file, policy(2)).unwrap();
    hangup(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while reasons(&mut client).await != ["v2"] {
        assert!(Instant::now() < deadline, "SIGHUP did not reload the edit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the server"
    );
}
