//! `arbiter serve` settings from three places, in order of precedence:
//! command-line flags, `ARBITER_*` environment variables, then the TOML file
//! given by `--config`; anything unset takes its documented default.
//!
//! One file per part of the server, each with its flags (a clap group
//! flattened into [`ServeArgs`]) and a `resolve` that merges them over its
//! keys of the file into its part of [`ServeConfig`]:
//!
//! | part | flags | resolves into |
//! | --- | --- | --- |
//! | `reload.rs` | [`ReloadArgs`]: policies, schema, entities, watch interval | [`ReloadConfig`](crate::app::ReloadConfig) |
//! | `listeners.rs` | [`ListenerArgs`]: TCP, TLS, Unix socket, callers, in-flight and message limits | [`ListenerConfig`](crate::app::ListenerConfig) (with `[ext_authz]`) |
//! | `admin.rs` | [`AdminArgs`]: the admin address | [`AdminConfig`](crate::app::AdminConfig) |
//! | `engine.rs` | [`EngineArgs`]: validation, error mode, caches, request limits | [`LoadOptions`](crate::engine::LoadOptions) |
//!
//! `[identity]` and `[decision_log]` have no flags: they come from the file
//! as they are. `file.rs` is the file's schema.

mod admin;
mod engine;
mod error;
mod file;
mod listeners;
mod reload;

use std::path::PathBuf;
use std::time::Duration;

use crate::app::ServeConfig;
use crate::decision_log::DecisionLogConfig;

pub use admin::AdminArgs;
pub use engine::EngineArgs;
pub use error::ConfigError;
pub use file::{ConfigFile, LimitsFile, TlsFile, UdsFile};
pub use listeners::ListenerArgs;
pub use reload::ReloadArgs;

/// The flags of `arbiter serve`. Each also reads `ARBITER_<NAME>`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the keys below (`policies = "..."`, ...).
    #[arg(long, env = "ARBITER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub reload: ReloadArgs,
    #[command(flatten)]
    pub listeners: ListenerArgs,
    #[command(flatten)]
    pub admin: AdminArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// How long in-flight calls may run after SIGTERM, in seconds [default: 20].
    #[arg(long, env = "ARBITER_SHUTDOWN_GRACE_SECS", value_name = "SECS")]
    pub shutdown_grace_secs: Option<u64>,
}

impl ServeArgs {
    /// Merges flags and env (already merged by clap) over the config file.
    /// The parts are resolved in a fixed order, so that of several problems
    /// the same one is always reported.
    pub fn resolve(&self) -> Result<ServeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        let load = self.engine.resolve(&file)?;
        let reload = self.reload.resolve(&file)?;
        let listeners = self.listeners.resolve(&file)?;
        let admin = self.admin.resolve(&file);
        let decision_log = decision_log(&file)?;
        Ok(ServeConfig {
            reload,
            load,
            listeners,
            admin,
            identity: file.identity,
            decision_log,
            shutdown_grace: self
                .shutdown_grace_secs
                .or(file.shutdown_grace_secs)
                .map_or(ServeConfig::default().shutdown_grace, Duration::from_secs),
        })
    }
}

/// `[decision_log]`, checked; on, to stdout, when the table is absent.
fn decision_log(file: &ConfigFile) -> Result<DecisionLogConfig, ConfigError> {
    let decision_log = file.decision_log.clone().unwrap_or_default();
    let problems = decision_log.problems();
    if !problems.is_empty() {
        return Err(ConfigError::Invalid {
            key: "decision_log",
            message: problems.join("; "),
        });
    }
    Ok(decision_log)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::admission::CallerPattern;
    use crate::app::TransportLimits;

    /// The flags and their env vars, as they were before `ServeArgs` was
    /// split into parts: a flag added, renamed or lost shows here.
    #[test]
    fn every_flag_with_its_env_var() {
        use clap::Args as _;
        let command = ServeArgs::augment_args(clap::Command::new("serve"));
        let mut flags: Vec<(String, String)> = command
            .get_arguments()
            .map(|arg| {
                (
                    arg.get_long().unwrap_or_default().to_owned(),
                    arg.get_env()
                        .map(|env| env.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                )
            })
            .collect();
        flags.sort();
        let mut expected: Vec<(String, String)> = [
            "config",
            "policies",
            "schema",
            "entities",
            "template-links",
            "tests",
            "listen",
            "admin-listen",
            "no-validate",
            "no-request-validation",
            "on-evaluation-error",
            "decision-cache-size",
            "slice-cache-entities",
            "reload-interval-ms",
            "shutdown-grace-secs",
            "listen-uds",
            "uds-mode",
            "tls-cert",
            "tls-key",
            "tls-client-ca",
            "max-in-flight",
            "allow-empty-policies",
            "max-message-bytes",
            "request-entities",
            "max-request-entities",
            "max-hierarchy-depth",
            "max-request-ancestors",
            "heavy-workers",
            "heavy-queue",
        ]
        .iter()
        .map(|flag| {
            let env = format!("ARBITER_{}", flag.replace('-', "_").to_uppercase());
            ((*flag).to_owned(), env)
        })
        .chain([
            (
                "tls-allowed-caller".to_owned(),
                "ARBITER_TLS_ALLOWED_CALLERS".to_owned(),
            ),
            (
                "uds-allowed-uid".to_owned(),
                "ARBITER_UDS_ALLOWED_UIDS".to_owned(),
            ),
        ])
        .collect();
        expected.sort();
        assert_eq!(flags, expected);
    }

    #[test]
    fn each_flag_lands_in_its_part() {
        use clap::Parser;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let cli = Cli::try_parse_from([
            "arbiter",
            "--policies",
            "p.cedar",
            "--reload-interval-ms",
            "40",
            "--listen",
            "127.0.0.1:7001",
            "--tls-allowed-caller",
            "a.example.org,b.example.org",
            "--uds-allowed-uid",
            "1",
            "--uds-allowed-uid",
            "2",
            "--admin-listen",
            "127.0.0.1:7002",
            "--on-evaluation-error",
            "deny",
            "--heavy-queue",
            "9",
            "--shutdown-grace-secs",
            "3",
        ])
        .unwrap();
        let args = cli.serve;
        assert_eq!(args.reload.policies, Some("p.cedar".into()));
        assert_eq!(args.reload.reload_interval_ms, Some(40));
        assert_eq!(
            args.listeners.listen,
            Some("127.0.0.1:7001".parse().unwrap())
        );
        assert_eq!(
            args.listeners.tls_allowed_callers,
            vec!["a.example.org".to_owned(), "b.example.org".to_owned()]
        );
        assert_eq!(args.listeners.uds_allowed_uids, vec![1, 2]);
        assert_eq!(
            args.admin.admin_listen,
            Some("127.0.0.1:7002".parse().unwrap())
        );
        assert_eq!(
            args.engine.on_evaluation_error,
            Some(crate::engine::OnEvaluationError::Deny)
        );
        assert_eq!(args.engine.heavy_queue, Some(9));
        assert_eq!(args.shutdown_grace_secs, Some(3));
        // (Caller patterns need client certificates to resolve.)
        let mut args = args;
        args.listeners.tls_allowed_callers.clear();
        let config = args.resolve().unwrap();
        assert_eq!(config.shutdown_grace, Duration::from_secs(3));
        assert_eq!(config.admin.listen, "127.0.0.1:7002".parse().unwrap());
    }

    #[test]
    fn flags_win_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arbiter.toml");
        std::fs::write(
            &path,
            "policies = \"p.cedar\"\nlisten = \"127.0.0.1:7000\"\nno_validate = true\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            listeners: ListenerArgs {
                listen: Some("127.0.0.1:7001".parse().unwrap()),
                ..ListenerArgs::default()
            },
            ..ServeArgs::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.listeners.listen, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(
            config.reload.sources.policies,
            Some(dir.path().join("p.cedar"))
        );
        assert!(!config.load.validate_policies);
        assert!(config.load.validate_requests);
    }

    #[test]
    fn callers_and_transport_limits_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arbiter.toml");
        std::fs::write(
            &path,
            r#"
[tls]
cert = "s.pem"
key = "s.key"
client_ca = "ca.pem"
allowed_callers = ["spiffe://example.org/ns/app/*", "*.svc.cluster.local"]

[uds]
allowed_uids = [1000, 1001]

[limits]
max_in_flight = 8
max_message_bytes = 65536
max_concurrent_streams = 16
"#,
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(
            config.listeners.admission.allowed_callers.unwrap(),
            vec![
                CallerPattern::UriPrefix("spiffe://example.org/ns/app/".into()),
                CallerPattern::DnsSuffix(".svc.cluster.local".into()),
            ]
        );
        assert_eq!(
            config.listeners.admission.allowed_uids,
            Some(vec![1000, 1001])
        );
        assert_eq!(config.listeners.admission.max_in_flight, 8);
        assert_eq!(config.listeners.transport.max_message_bytes, 65536);
        assert_eq!(config.listeners.transport.max_concurrent_streams, 16);
        assert_eq!(
            config.listeners.transport.keepalive_interval,
            TransportLimits::default().keepalive_interval
        );
        // Flags win; a bad pattern, or callers without client certificates,
        // are refused.
        let flags = ServeArgs {
            config: Some(path),
            listeners: ListenerArgs {
                uds_allowed_uids: vec![7],
                tls_allowed_callers: vec!["a.*.org".into()],
                ..ListenerArgs::default()
            },
            ..ServeArgs::default()
        };
        let error = flags.resolve().unwrap_err().to_string();
        assert!(error.contains("a.*.org"), "{error}");
        let no_ca = ServeArgs {
            listeners: ListenerArgs {
                tls_cert: Some("s.pem".into()),
                tls_key: Some("s.key".into()),
                tls_allowed_callers: vec!["web.example.org".into()],
                ..ListenerArgs::default()
            },
            ..ServeArgs::default()
        };
        assert!(
            no_ca
                .resolve()
                .unwrap_err()
                .to_string()
                .contains("client_ca")
        );
    }

    #[test]
    fn ext_authz_and_uds_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arbiter.toml");
        std::fs::write(
            &path,
            r#"
listen_uds = "arbiter.sock"
uds_mode = "0600"

[ext_authz.principal]
source = "jwt"
type = "Saas::User"

[ext_authz.principal.jwt]
jwks_file = "jwks.json"
issuers = ["https://idp.example"]
audiences = ["arbiter"]

[[ext_authz.routes]]
path = "/documents/{id}"
methods = ["GET"]
action = { type = "Saas::Action", id = "read" }
resource = { type = "Saas::Document", id = "{id}" }
"#,
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        let config = args.resolve().unwrap();
        let uds = config.listeners.uds.unwrap();
        assert_eq!(uds.path, dir.path().join("arbiter.sock"));
        assert_eq!(uds.mode, 0o600);
        let ext_authz = config.listeners.ext_authz.unwrap();
        assert_eq!(
            ext_authz.principal.jwt.unwrap().jwks_file,
            Some(dir.path().join("jwks.json"))
        );
        assert_eq!(ext_authz.routes.len(), 1);

        let bad = ServeArgs {
            listeners: ListenerArgs {
                uds_mode: Some("999".into()),
                ..ListenerArgs::default()
            },
            ..ServeArgs::default()
        };
        assert!(bad.resolve().is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arbiter.toml");
        std::fs::write(&path, "polcies = \"p.cedar\"\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        let error = args.resolve().unwrap_err().to_string();
        assert!(error.contains("polcies"), "{error}");
    }

    #[test]
    fn decision_log_table_parses_and_resolves_paths() {
        use crate::decision_log::{Overflow, SinkConfig};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arbiter.toml");
        std::fs::write(
            &path,
            r#"
[decision_log]
spool_dir = "spool"
spool_max_bytes = 1048576
segment_bytes = 65536
overflow = "block"
block_timeout_ms = 20

[decision_log.redact]
drop = ["context.ssn"]
hash = ["principal.id"]

[[decision_log.sinks]]
type = "file"
path = "logs/decisions.jsonl"

[[decision_log.sinks]]
type = "nats"
url = "nats://127.0.0.1:4222"
"#,
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        let log = args.resolve().unwrap().decision_log;
        assert!(log.enabled);
        assert_eq!(log.spool_dir, Some(dir.path().join("spool")));
        assert_eq!(log.overflow, Overflow::Block);
        assert_eq!(log.redact.drop, vec!["context.ssn".to_string()]);
        assert!(
            matches!(&log.sinks[0], SinkConfig::File { path, .. } if *path == dir.path().join("logs/decisions.jsonl"))
        );
        assert_eq!(log.sinks[1].name(), "nats");

        // Without the table: on, to stdout.
        let log = ServeArgs::default().resolve().unwrap().decision_log;
        assert!(log.enabled);
        assert_eq!(log.sinks, vec![SinkConfig::Stdout { name: None }]);
    }

    #[test]
    fn bad_decision_log_settings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arbiter.toml");
        std::fs::write(
            &path,
            "[decision_log]\nspool_max_bytes = 1000\nsegment_bytes = 1000\n[[decision_log.sinks]]\ntype = \"stdout\"\n[[decision_log.sinks]]\ntype = \"stdout\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        let error = args.resolve().unwrap_err().to_string();
        assert!(error.contains("segment_bytes"), "{error}");
        assert!(error.contains("two sinks are named `stdout`"), "{error}");
    }
}
