//! The Kubernetes sidecar without a cluster: renders
//! `deploy/kubernetes/overlays/sidecar` with `kubectl kustomize`, then runs
//! the pod's `arbiter` container the way a kubelet would: its args and env
//! exactly, as its `runAsUser`/`runAsGroup` with the pod's `fsGroup` as a
//! supplementary group, no new privileges and no capabilities (`setpriv`),
//! with its volumes laid out as the kubelet lays them out (ConfigMaps and
//! Secrets as timestamped directories behind a `..data` symlink, emptyDirs
//! group-owned by the fsGroup with the setgid bit). It then checks the
//! probes as written, a ConfigMap update by the kubelet's symlink swap (good
//! and bad), the Unix socket's permissions for the app container's uid and
//! another, and SIGTERM under load within `terminationGracePeriodSeconds`.
//!
//! The one change to what the manifest says is this mapping, printed by the
//! test, applied to the container's args and env and to the mounted files'
//! contents (`arbiter.toml` names the other mounts):
//! - each volume's `mountPath` `/x` becomes `<temp dir>/x`;
//! - each `containerPort` P, bound by the manifest as `0.0.0.0:P`, becomes
//!   `127.0.0.1:<a free port>` (tests bind loopback only; several test
//!   binaries run at once).
//!
//! The Secret `arbiter-identity` is not in the manifests (operators create
//! it); the test writes its keys pointing at a fresh database on the
//! machine's PostgreSQL (127.0.0.1:5432, trust auth) loaded with
//! `deploy/postgres/schema.sql` and its example data.
//!
//! The binary is `CARGO_BIN_EXE_arbiter`, the debug build `cargo test`
//! already makes: a release build would add minutes to CI, and what is
//! checked here (the manifest's files, flags, probes, reload, drain and
//! socket mode) does not depend on optimisation; figures for the release
//! build are in benches/README.md ("Footprint"). Needs root (to lay out
//! files as other uids and switch to them), `kubectl`, `setpriv`
//! (util-linux) and, for the image test, podman; `tests/run.sh` installs them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbiter::proto::v1::authorizer_client::AuthorizerClient;
use arbiter::proto::v1::{CheckBatchRequest, CheckRequest, Decision};
use serde_norway::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The objects `kubectl kustomize` renders for an overlay.
fn render(overlay: &str) -> Vec<Value> {
    let output = Command::new("kubectl")
        .args([
            "kustomize",
            &format!("deploy/kubernetes/overlays/{overlay}"),
        ])
        .current_dir(ROOT)
        .output()
        .expect("kubectl (tests/run.sh installs it)");
    assert!(
        output.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|document| serde::Deserialize::deserialize(document).unwrap())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name_prefix: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"].as_str() == Some(kind)
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name_prefix))
        })
        .unwrap_or_else(|| panic!("no {kind} {name_prefix}* rendered"))
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_sequence()
        .and_then(|items| items.iter().find(|i| i["name"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("no `{name}` in {list:?}"))
}

fn int(value: &Value, default: u64) -> u64 {
    value.as_u64().unwrap_or(default)
}

/// The pod as the manifest describes it, and where the test put it.
struct Pod {
    objects: Vec<Value>,
    spec: Value,
    arbiter: Value,
    app: Value,
    fs_group: u32,
    root: tempfile::TempDir,
    /// (manifest text, text the test uses): mount paths and listen addresses.
    mapping: Vec<(String, String)>,
    /// containerPort name -> the loopback address it is mapped to.
    ports: BTreeMap<String, String>,
}

impl Pod {
    fn from_overlay(overlay: &str) -> Pod {
        let objects = render(overlay);
        let deployment = find(&objects, "Deployment", "docs-api");
        let spec = deployment["spec"]["template"]["spec"].clone();
        let arbiter = named(&spec["initContainers"], "arbiter").clone();
        let app = named(&spec["containers"], "app").clone();
        let fs_group = spec["securityContext"]["fsGroup"].as_u64().unwrap() as u32;
        let root = tempfile::tempdir().unwrap();
        // Other uids walk through the temp dir to their mounts.
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut mapping = Vec::new();
        for mount in arbiter["volumeMounts"].as_sequence().unwrap() {
            let path = mount["mountPath"].as_str().unwrap();
            mapping.push((path.to_owned(), format!("{}{path}", root.path().display())));
        }
        let mut ports = BTreeMap::new();
        for port in arbiter["ports"].as_sequence().unwrap() {
            let number = port["containerPort"].as_u64().unwrap();
            let free = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            mapping.push((format!("0.0.0.0:{number}"), free.to_string()));
            ports.insert(port["name"].as_str().unwrap().to_owned(), free.to_string());
        }
        eprintln!("manifest -> test mapping:");
        for (from, to) in &mapping {
            eprintln!("  {from} -> {to}");
        }
        Pod {
            objects,
            spec,
            arbiter,
            app,
            fs_group,
            root,
            mapping,
            ports,
        }
    }

    /// Applies the mapping in one pass (a mapped path contains the
    /// original as a suffix, so replacing twice would nest it).
    fn remap(&self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        'scan: while !rest.is_empty() {
            for (from, to) in &self.mapping {
                if let Some(after) = rest.strip_prefix(from.as_str()) {
                    out.push_str(to);
                    rest = after;
                    continue 'scan;
                }
            }
            let next = rest.chars().next().unwrap();
            out.push(next);
            rest = &rest[next.len_utf8()..];
        }
        out
    }

    fn host_path(&self, manifest_path: &str) -> PathBuf {
        PathBuf::from(self.remap(manifest_path))
    }

    fn config_map(&self, name: &str) -> BTreeMap<String, String> {
        let object = find(&self.objects, "ConfigMap", name);
        object["data"]
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().unwrap().to_owned(),
                    v.as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// The settings file the container reads (its `--config` argument).
    fn arbiter_toml(&self) -> toml::Table {
        let data = self.config_map("arbiter-config");
        toml::from_str(&data["arbiter.toml"]).unwrap()
    }

    /// Lays out every volume of the arbiter container under the temp dir.
    fn lay_out(&self, secret: &BTreeMap<String, String>) {
        for mount in self.arbiter["volumeMounts"].as_sequence().unwrap() {
            let dir = self.host_path(mount["mountPath"].as_str().unwrap());
            let volume = named(&self.spec["volumes"], mount["name"].as_str().unwrap());
            if let Some(config_map) = volume.get("configMap") {
                let data = self.config_map(config_map["name"].as_str().unwrap());
                let data = data.into_iter().map(|(k, v)| (k, self.remap(&v))).collect();
                let mode = int(&config_map["defaultMode"], 0o644) as u32;
                atomic_writer(&dir, &data, mode, self.fs_group, "2026_12_04_00_00_00.1");
            } else if let Some(secret_volume) = volume.get("secret") {
                let mode = int(&secret_volume["defaultMode"], 0o644) as u32;
                atomic_writer(&dir, secret, mode, self.fs_group, "2026_12_04_00_00_00.1");
            } else if volume.get("emptyDir").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                // The kubelet's emptyDir: 0777, then the fsGroup's ownership
                // with setgid so what is created inside is group fsGroup.
                std::os::unix::fs::chown(&dir, Some(0), Some(self.fs_group)).unwrap();
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2777)).unwrap();
            } else {
                panic!("volume kind not laid out by this test: {volume:?}");
            }
            let mut parent = dir.parent();
            while let Some(p) = parent.filter(|p| p.starts_with(self.root.path())) {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
                parent = p.parent();
            }
        }
    }

    /// Starts the container's command: its args and env, its ids, the
    /// pod's fsGroup, no new privileges and no capabilities.
    fn start(&self) -> Container {
        let security = &self.arbiter["securityContext"];
        assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
        assert_eq!(security["capabilities"]["drop"][0].as_str(), Some("ALL"));
        let uid = security["runAsUser"].as_u64().unwrap();
        let gid = security["runAsGroup"].as_u64().unwrap();
        assert_ne!(uid, 0, "runAsNonRoot");
        let args: Vec<String> = self.arbiter["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| self.remap(a.as_str().unwrap()))
            .collect();
        // Where the image has it; the build's own path may sit under a
        // directory other uids cannot enter (a clone in /root).
        let binary = self.root.path().join("usr/local/bin/arbiter");
        place_executable(Path::new(env!("CARGO_BIN_EXE_arbiter")), &binary);
        let mut command = Command::new("setpriv");
        command
            .args(as_user(uid, gid, &[self.fs_group]))
            .arg(&binary)
            .args(&args)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in self.arbiter["env"].as_sequence().unwrap() {
            command.env(
                var["name"].as_str().unwrap(),
                self.remap(var["value"].as_str().unwrap()),
            );
        }
        eprintln!(
            "container: uid {uid} gid {gid} groups {} args {args:?}",
            self.fs_group
        );
        let mut child = command.spawn().expect("setpriv (util-linux)");
        let (stdout, stdout_reader) = collect(child.stdout.take().unwrap());
        let (stderr, _) = collect(child.stderr.take().unwrap());
        Container {
            child,
            stdout,
            stdout_reader: Some(stdout_reader),
            stderr,
        }
    }

    fn admin(&self, port_name: &str) -> String {
        self.ports[port_name].clone()
    }
}

/// `setpriv` arguments for a container's process ids: the kubelet's
/// runAsUser, runAsGroup and the pod's supplementary groups, with
/// `allowPrivilegeEscalation: false` and `drop: [ALL]`.
fn as_user(uid: u64, gid: u64, groups: &[u32]) -> Vec<String> {
    let groups = if groups.is_empty() {
        "--clear-groups".to_owned()
    } else {
        format!(
            "--groups={}",
            groups
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    vec![
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        groups,
        "--no-new-privs".into(),
        "--inh-caps=-all".into(),
        "--bounding-set=-all".into(),
        "--".into(),
    ]
}

/// Puts an executable where any uid can run it: a hard link, or a copy
/// across file systems.
fn place_executable(from: &Path, to: &Path) {
    if to.exists() {
        return;
    }
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap();
    }
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut dir = to.parent();
    while let Some(d) =
        dir.filter(|d| d.starts_with(std::env::temp_dir()) && *d != std::env::temp_dir())
    {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir = d.parent();
    }
}

/// The kubelet's AtomicWriter: the files in `..<timestamp>/`, `..data`
/// pointing at it, and each key a symlink through `..data`.
fn atomic_writer(dir: &Path, data: &BTreeMap<String, String>, mode: u32, gid: u32, stamp: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let version = dir.join(format!("..{stamp}"));
    std::fs::create_dir(&version).unwrap();
    for (key, value) in data {
        let file = version.join(key);
        std::fs::write(&file, value).unwrap();
        std::os::unix::fs::chown(&file, Some(0), Some(gid)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::set_permissions(&version, std::fs::Permissions::from_mode(0o755)).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{stamp}"), &tmp).unwrap();
    let previous = std::fs::read_link(dir.join("..data")).ok();
    // The swap: rename is atomic, readers see the old set or the new one.
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for key in data.keys() {
        let link = dir.join(key);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{key}"), &link).unwrap();
        }
    }
    if let Some(previous) = previous {
        std::fs::remove_dir_all(dir.join(previous)).unwrap();
    }
}

type Lines = Arc<Mutex<Vec<String>>>;

/// Reads a stream's lines on a thread; the handle ends at end of stream.
fn collect(stream: impl Read + Send + 'static) -> (Lines, std::thread::JoinHandle<()>) {
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    (lines, reader)
}

struct Container {
    child: Child,
    stdout: Lines,
    stdout_reader: Option<std::thread::JoinHandle<()>>,
    stderr: Lines,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP GET as the kubelet's httpGet probe does it: success is a status
/// in 200..400 within `timeout`.
fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(timeout)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.29\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line: {raw:?}"))?;
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok((code, body))
}

/// Runs a probe as the kubelet does (initialDelaySeconds, then every
/// periodSeconds, each within timeoutSeconds) until it succeeds, and fails
/// the test after failureThreshold failures. Returns when it succeeded.
fn probe_until_healthy(pod: &Pod, probe: &Value, what: &str) -> Duration {
    let get = &probe["httpGet"];
    let path = get["path"].as_str().unwrap();
    let port = get["port"].as_str().expect("probes name their port");
    let addr = pod.admin(port);
    let period = Duration::from_secs(int(&probe["periodSeconds"], 10));
    let timeout = Duration::from_secs(int(&probe["timeoutSeconds"], 1));
    let threshold = int(&probe["failureThreshold"], 3);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(int(&probe["initialDelaySeconds"], 0)));
    let mut last = String::new();
    for _ in 0..threshold {
        match http_get(&addr, path, timeout) {
            Ok((code, _)) if (200..400).contains(&code) => return started.elapsed(),
            Ok((code, body)) => last = format!("{code} {body}"),
            Err(error) => last = error,
        }
        std::thread::sleep(period);
    }
    panic!("{what} probe GET {path} failed {threshold} times; last: {last}");
}

fn check(principal: &str, action: &str, phase: &str) -> CheckRequest {
    CheckRequest {
        principal: common::uid("Saas::User", principal),
        action: common::uid("Saas::Action", action),
        resource: common::uid("Saas::Document", "roadmap"),
        context_json: format!(r#"{{"phase": "{phase}"}}"#),
        entities_json: String::new(),
        ..Default::default()
    }
}

async fn uds_client(socket: &Path) -> AuthorizerClient<tonic::transport::Channel> {
    AuthorizerClient::new(common::uds_channel(socket).await)
}

/// A database on the machine's PostgreSQL with the reference schema and
/// example data; dropped at the end.
struct Database {
    name: String,
}

impl Database {
    async fn create() -> Database {
        let name = format!("arbiter_k8s_{}", uuid::Uuid::now_v7().simple());
        Self::execute("postgres", &format!("CREATE DATABASE {name}")).await;
        let sql = [
            include_str!("../deploy/postgres/schema.sql"),
            include_str!("../deploy/postgres/example-data.sql"),
        ]
        .join("\n");
        Self::execute(&name, &sql).await;
        Database { name }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.name)
    }

    async fn execute(database: &str, sql: &str) {
        let url = format!("postgres://postgres@127.0.0.1:5432/{database}");
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (tests/run.sh starts it)");
        tokio::spawn(connection);
        client.batch_execute(sql).await.unwrap();
    }

    async fn drop(self) {
        Self::execute(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_pod_runs_as_the_kubelet_would_run_it() {
    assert_eq!(
        std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap(),
        "0",
        "this test lays out files for other uids and runs processes as them: run it as root (CI does)"
    );
    let pod = Pod::from_overlay("sidecar");
    let database = Database::create().await;
    let secret: BTreeMap<String, String> = [
        ("postgres-url".to_owned(), format!("{}\n", database.url())),
        // Trust auth: the server asks for none, but the file must be read.
        (
            "postgres-password".to_owned(),
            "not-used-with-trust-auth\n".to_owned(),
        ),
    ]
    .into();
    pod.lay_out(&secret);
    let settings = pod.arbiter_toml();
    let socket = pod.host_path(settings["listen_uds"].as_str().unwrap());
    let spool = pod.host_path(settings["decision_log"]["spool_dir"].as_str().unwrap());
    let reload_interval =
        Duration::from_millis(settings["reload_interval_ms"].as_integer().unwrap() as u64);
    let mut container = pod.start();

    // 1. The startup probe as written turns healthy (the first load and the
    // first identity sync), then readiness and liveness.
    let took = tokio::task::block_in_place(|| {
        probe_until_healthy(&pod, &pod.arbiter["startupProbe"], "startup")
    });
    eprintln!("startup probe healthy after {took:?}");
    tokio::task::block_in_place(|| {
        probe_until_healthy(&pod, &pod.arbiter["readinessProbe"], "readiness");
        probe_until_healthy(&pod, &pod.arbiter["livenessProbe"], "liveness");
    });
    let (_, ready) = http_get(&pod.admin("admin"), "/ready", Duration::from_secs(1)).unwrap();
    assert!(ready.contains("\"synced\":true"), "{ready}");

    // 2. The socket: Arbiter's uid, the fsGroup, the mode of arbiter.toml;
    // the app container's ids connect, another uid does not.
    let metadata = std::fs::metadata(&socket).unwrap();
    let mode = u32::from_str_radix(settings["uds_mode"].as_str().unwrap(), 8).unwrap();
    assert_eq!(metadata.mode() & 0o777, mode);
    assert_eq!(
        u64::from(metadata.uid()),
        pod.arbiter["securityContext"]["runAsUser"]
            .as_u64()
            .unwrap()
    );
    assert_eq!(metadata.gid(), pod.fs_group);
    let app = &pod.app["securityContext"];
    let app_mounts_socket = pod.app["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|m| socket.starts_with(pod.host_path(m["mountPath"].as_str().unwrap())));
    assert!(
        app_mounts_socket,
        "the app container mounts the socket's volume"
    );
    let app_uid = app["runAsUser"].as_u64().unwrap();
    let app_gid = app["runAsGroup"].as_u64().unwrap();
    let (ok, output) = client_as(app_uid, app_gid, &[pod.fs_group], &socket);
    assert!(
        ok,
        "the app container's uid {app_uid} must connect: {output}"
    );
    let other = app_uid + 1;
    let (ok, output) = client_as(other, other, &[], &socket);
    assert!(!ok, "uid {other} outside the pod's group must not connect");
    assert!(output.contains("Permission denied"), "{output}");

    // 3. A ConfigMap update, swapped in as the kubelet does, is live within
    // the reload interval (plus the time to load, in a debug build).
    let policies_dir = pod.host_path(
        named(&pod.arbiter["volumeMounts"], "arbiter-policies")["mountPath"]
            .as_str()
            .unwrap(),
    );
    let mut client = uds_client(&socket).await;
    let before = client
        .check(check("ann", "read", "reload"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.decision(), Decision::Deny, "{before:?}");
    let mut data = pod.config_map("arbiter-policies");
    let good = format!(
        "{}\n@id(\"k8s-v2\")\npermit (principal == Saas::User::\"ann\", action == Saas::Action::\"read\", resource);\n",
        data["policies.cedar"]
    );
    data.insert("policies.cedar".into(), good);
    atomic_writer(
        &policies_dir,
        &data,
        0o644,
        pod.fs_group,
        "2026_12_04_00_05_00.2",
    );
    let swapped = Instant::now();
    // Live after one poll and a load; the bound only catches an update that
    // is never seen (a loaded machine may take seconds, not a poll).
    let deadline = reload_interval + Duration::from_secs(60);
    loop {
        let response = client
            .check(check("ann", "read", "reload"))
            .await
            .unwrap()
            .into_inner();
        if response.reasons == ["k8s-v2"] {
            assert_eq!(response.decision(), Decision::Allow);
            break;
        }
        assert!(
            swapped.elapsed() < deadline,
            "update not live within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("ConfigMap update live after {:?}", swapped.elapsed());

    // A bad update: the last good set keeps serving, readiness stays true,
    // and the error is shown (readiness details and the log).
    data.insert(
        "policies.cedar".into(),
        "@id(\"broken\")\npermit (principal, action, resource) when { principal.clearance > };\n"
            .into(),
    );
    atomic_writer(
        &policies_dir,
        &data,
        0o644,
        pod.fs_group,
        "2026_12_04_00_10_00.3",
    );
    let swapped = Instant::now();
    let ready = loop {
        let (code, body) = http_get(&pod.admin("admin"), "/ready", Duration::from_secs(1)).unwrap();
        if body.contains("\"last_reload_error\":\"") {
            assert_eq!(code, 200, "the last good set still serves: {body}");
            break body;
        }
        assert!(
            swapped.elapsed() < deadline,
            "bad update never reported: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(ready.contains("\"ready\":true"), "{ready}");
    assert!(ready.contains("policies.cedar"), "{ready}");
    tokio::task::block_in_place(|| {
        probe_until_healthy(
            &pod,
            &pod.arbiter["readinessProbe"],
            "readiness after a bad update",
        )
    });
    let still = client
        .check(check("ann", "read", "reload"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.reasons, ["k8s-v2"], "the last good set serves");
    let log = container.stderr.lock().unwrap().join("\n");
    assert!(log.contains("policy set refused"), "{log}");

    // 4. SIGTERM under load: calls in flight finish, decision records are
    // all flushed through the spool, exit 0 within the pod's grace period.
    let grace = Duration::from_secs(int(&pod.spec["terminationGracePeriodSeconds"], 30));
    let batch = CheckBatchRequest {
        checks: vec![check("bob", "read", "load"); 64],
    };
    let completed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut callers = Vec::new();
    for _ in 0..4 {
        let batch = batch.clone();
        let socket = socket.clone();
        let completed = completed.clone();
        callers.push(tokio::spawn(async move {
            let mut client = uds_client(&socket).await;
            let mut calls = Vec::new();
            loop {
                let started = Instant::now();
                let outcome = client
                    .check_batch(batch.clone())
                    .await
                    .map(|r| r.into_inner().results);
                let ended = Instant::now();
                let failed = outcome.is_err();
                if !failed {
                    completed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                calls.push((started, ended, outcome));
                if failed {
                    return calls;
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while completed.load(std::sync::atomic::Ordering::Relaxed) < 20 {
        assert!(Instant::now() < deadline, "no load reached the server");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = container.child.id().to_string();
    let sigterm = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = loop {
        if let Some(status) = container.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            sigterm.elapsed() < grace,
            "still running after terminationGracePeriodSeconds ({grace:?}): the kubelet would SIGKILL"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let stopped_after = sigterm.elapsed();
    assert_eq!(status.code(), Some(0), "exit 0 after SIGTERM");
    let mut in_flight = 0;
    let mut allowed = 0;
    for caller in callers {
        for (started, ended, outcome) in caller.await.unwrap() {
            if started < sigterm && ended > sigterm {
                match &outcome {
                    Ok(_) => in_flight += 1,
                    // Sent before SIGTERM but never read by the server
                    // (refused by the drain's GOAWAY, ...): not in flight.
                    Err(status) => assert!(
                        common::never_started(status),
                        "a call in flight at SIGTERM failed: {status:?}"
                    ),
                }
            }
            if let Ok(results) = outcome {
                assert_eq!(results.len(), 64);
                for result in results {
                    assert_eq!(result.decision(), Decision::Allow);
                    allowed += 1;
                }
            }
        }
    }
    eprintln!(
        "exit 0 {stopped_after:?} after SIGTERM; {in_flight} calls in flight, {allowed} decisions"
    );
    assert!(
        in_flight > 0,
        "no call was in flight at SIGTERM: proved nothing"
    );

    // Every decision made under load is a record on the stdout sink, read
    // from the spool on its volume.
    let reader = container.stdout_reader.take().unwrap();
    tokio::task::block_in_place(|| reader.join().unwrap());
    let records = container
        .stdout
        .lock()
        .unwrap()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|r| r["context"]["phase"] == "load")
        .count();
    assert_eq!(
        records, allowed,
        "decision records delivered = decisions made"
    );
    let segments = std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .count();
    assert!(segments > 0, "the spool is on its volume: {spool:?}");
    assert!(!socket.exists(), "the socket is removed after the drain");
    database.drop().await;
}

/// Connects to the socket as another process with these ids (the test runs
/// this binary again, as `uds_client_child`). Returns (connected and
/// answered, its output).
fn client_as(uid: u64, gid: u64, groups: &[u32], socket: &Path) -> (bool, String) {
    let exe = std::env::current_exe().unwrap();
    let client = socket
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("test-client")
        .join(exe.file_name().unwrap());
    place_executable(&exe, &client);
    let output = Command::new("setpriv")
        .args(as_user(uid, gid, groups))
        .arg(&client)
        .args(["--exact", "uds_client_child", "--ignored", "--nocapture"])
        .env("ARBITER_K8S_TEST_SOCKET", socket)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Run by `client_as` in a child process with other ids; does nothing
/// without `ARBITER_K8S_TEST_SOCKET`.
#[tokio::test]
#[ignore = "a helper process of sidecar_pod_runs_as_the_kubelet_would_run_it"]
async fn uds_client_child() {
    let Some(socket) = std::env::var_os("ARBITER_K8S_TEST_SOCKET") else {
        return;
    };
    let socket = PathBuf::from(socket);
    if let Err(error) = std::os::unix::net::UnixStream::connect(&socket) {
        panic!("connect {socket:?}: {error}");
    }
    let response = uds_client(&socket)
        .await
        .check(check("bob", "read", "socket"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.decision(), Decision::Allow, "{response:?}");
}

/// The Envoy variant wires Envoy to the socket Arbiter serves, and the
/// manifests' copies of repository files have not drifted.
#[test]
fn envoy_overlay_points_envoy_at_arbiters_socket() {
    let pod = Pod::from_overlay("envoy");
    let settings = pod.arbiter_toml();
    let socket = settings["listen_uds"].as_str().unwrap();
    assert!(settings.contains_key("ext_authz"));
    let envoy = named(&pod.spec["containers"], "envoy");
    let envoy_yaml = pod.config_map("envoy-config")["envoy.yaml"].clone();
    assert!(
        envoy_yaml.contains(&format!("pipe: {{ path: {socket} }}")),
        "envoy.yaml's ext_authz cluster uses {socket}"
    );
    let socket_dir = Path::new(socket).parent().unwrap();
    let mount = |container: &Value| {
        container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| Path::new(m["mountPath"].as_str().unwrap()) == socket_dir)
            .map(|m| m["name"].as_str().unwrap().to_owned())
    };
    assert_eq!(mount(envoy), mount(&pod.arbiter));
    assert!(mount(envoy).is_some());
    // Envoy's uid reaches the 0660 socket through the pod's fsGroup.
    assert_eq!(settings["uds_mode"].as_str(), Some("0660"));
    assert!(pod.spec["securityContext"]["fsGroup"].as_u64().is_some());
    assert_eq!(
        pod.config_map("arbiter-policies")["policies.cedar"],
        include_str!("../deploy/postgres/example.cedar"),
        "deploy/kubernetes/base/policies/policies.cedar is a copy of deploy/postgres/example.cedar"
    );
}

/// An image built here without pulling anything (deploy/build-scratch-image.sh,
/// FROM scratch with the binary and its libraries) has the Dockerfile's
/// user, entrypoint and command, and its root filesystem runs the binary as
/// that user. `podman run` itself cannot start containers on this machine
/// (crun: `setrlimit RLIMIT_NOFILE: Operation not permitted`, see
/// deploy/kubernetes/README.md), so the filesystem is run by chroot.
#[test]
fn scratch_image_builds_without_pulling_and_its_filesystem_runs() {
    let dir = tempfile::tempdir().unwrap();
    // The debug binary's debug info makes a 390 MB layer; stripped, as the
    // image profile's is.
    let binary = dir.path().join("arbiter");
    let strip = Command::new("strip")
        .arg("-o")
        .arg(&binary)
        .arg(env!("CARGO_BIN_EXE_arbiter"))
        .status()
        .expect("strip (binutils)");
    assert!(strip.success());
    let tag = format!("localhost/arbiter-test:{}", uuid::Uuid::now_v7().simple());
    let build = Command::new("bash")
        .arg(Path::new(ROOT).join("deploy/build-scratch-image.sh"))
        .arg(&binary)
        .arg(&tag)
        .output()
        .expect("bash");
    assert!(
        build.status.success(),
        "image build: {}",
        String::from_utf8_lossy(&build.stderr)
    );
    let podman = |args: &[&str]| {
        let output = Command::new("podman").args(args).output().unwrap();
        assert!(
            output.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    let config = podman(&[
        "image",
        "inspect",
        &tag,
        "--format",
        "{{.Config.User}} {{json .Config.Entrypoint}} {{json .Config.Cmd}}",
    ]);
    assert_eq!(
        config,
        r#"65532:65532 ["/usr/local/bin/arbiter"] ["serve"]"#
    );
    let mounted = podman(&["image", "mount", &tag]);
    let run = Command::new("chroot")
        .args(["--userspec=65532:65532", &mounted, "/usr/local/bin/arbiter"])
        .args([
            "check",
            "--principal",
            r#"Saas::User::"bob""#,
            "--action",
            r#"Saas::Action::"write""#,
            "--resource",
            r#"Saas::Document::"acme-roadmap""#,
            "--context",
            r#"{"mfa": true, "source_ip": "10.1.2.3"}"#,
        ])
        .output()
        .unwrap();
    podman(&["image", "unmount", &tag]);
    podman(&["rmi", "-f", &tag]);
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && text.contains("ALLOW"),
        "{text}{}",
        String::from_utf8_lossy(&run.stderr)
    );
}
