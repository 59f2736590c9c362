//! `arbiter serve` settings from three places, in order of precedence:
//! command-line flags, `ARBITER_*` environment variables, then the TOML file
//! given by `--config`; anything unset takes its documented default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::adapter::admission::{AdmissionConfig, CallerPattern, DEFAULT_MAX_IN_FLIGHT};
use crate::adapter::ext_authz::ExtAuthzConfig;
use crate::app::{ServeConfig, TlsConfig, TransportLimits, UdsConfig};
use crate::decision_log::DecisionLogConfig;
use crate::engine::loader::{DEFAULT_DECISION_CACHE_CAPACITY, DEFAULT_SLICE_CACHE_CAPACITY};
use crate::engine::{
    DEFAULT_HEAVY_QUEUE, DEFAULT_MAX_HIERARCHY_DEPTH, DEFAULT_MAX_REQUEST_ANCESTORS,
    DEFAULT_MAX_REQUEST_ENTITIES, LoadOptions, MAX_HIERARCHY_DEPTH_CEILING,
    MAX_REQUEST_ENTITIES_CEILING, OnEvaluationError, RequestEntitiesMode, RequestLimits, Sources,
    default_heavy_workers,
};
use crate::identity::IdentityConfig;

/// The flags of `arbiter serve`. Each also reads `ARBITER_<NAME>`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the keys below (`policies = "..."`, ...).
    #[arg(long, env = "ARBITER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A `.cedar` file, or a directory searched recursively for `.cedar` files.
    /// Without policies, schema and entities, the embedded example is served.
    #[arg(long, env = "ARBITER_POLICIES", value_name = "PATH")]
    pub policies: Option<PathBuf>,
    /// Cedar schema (`.cedarschema`, or the JSON format in a `.json` file).
    #[arg(long, env = "ARBITER_SCHEMA", value_name = "PATH")]
    pub schema: Option<PathBuf>,
    /// Cedar entities JSON (the file identity source).
    #[arg(long, env = "ARBITER_ENTITIES", value_name = "PATH")]
    pub entities: Option<PathBuf>,
    /// Template-linked policies (the Cedar CLI's links JSON), watched and
    /// reloaded with the policies as one set.
    #[arg(long, env = "ARBITER_TEMPLATE_LINKS", value_name = "FILE")]
    pub template_links: Option<PathBuf>,
    /// Decision fixtures (a file or a directory of `*.json`, as `arbiter
    /// test` reads them) every new policy set must pass before it is served;
    /// at startup a failure refuses to start.
    #[arg(long = "tests", env = "ARBITER_TESTS", value_name = "PATH")]
    pub tests: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "ARBITER_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Admin HTTP listen address for /metrics, /live, /ready [default: 127.0.0.1:9464].
    #[arg(long, env = "ARBITER_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Do not require policies to pass strict validation against the schema.
    #[arg(long, env = "ARBITER_NO_VALIDATE")]
    pub no_validate: bool,
    /// Do not validate requests against the schema.
    #[arg(long, env = "ARBITER_NO_REQUEST_VALIDATION")]
    pub no_request_validation: bool,
    /// What a policy evaluation error does: `skip-permit` (the default:
    /// Cedar's decision, except that an erroring forbid denies), `deny` (any
    /// error denies) or `skip-policy` (Cedar's semantics: the erroring policy
    /// is ignored and the others decide).
    #[arg(long, env = "ARBITER_ON_EVALUATION_ERROR", value_name = "MODE")]
    pub on_evaluation_error: Option<OnEvaluationError>,
    /// Decisions remembered per policy/data snapshot; 0 turns the cache off
    /// [default: 65536]. A new snapshot always starts with an empty cache.
    #[arg(long, env = "ARBITER_DECISION_CACHE_SIZE", value_name = "N")]
    pub decision_cache_size: Option<u64>,
    /// Entities held in prepared slices of identity-synced data (a slice is
    /// what one principal/resource pair's decisions evaluate against,
    /// reused until an entity in it changes); 0 turns it off
    /// [default: 65536; a slice of ~33 entities takes ~45 KB].
    #[arg(long, env = "ARBITER_SLICE_CACHE_ENTITIES", value_name = "N")]
    pub slice_cache_entities: Option<u64>,
    /// How often watched files are checked for changes, in milliseconds [default: 250].
    #[arg(long, env = "ARBITER_RELOAD_INTERVAL_MS", value_name = "MS")]
    pub reload_interval_ms: Option<u64>,
    /// How long in-flight calls may run after SIGTERM, in seconds [default: 20].
    #[arg(long, env = "ARBITER_SHUTDOWN_GRACE_SECS", value_name = "SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Also serve gRPC (every service) on this Unix-domain socket.
    #[arg(long, env = "ARBITER_LISTEN_UDS", value_name = "PATH")]
    pub listen_uds: Option<PathBuf>,
    /// Permissions of the Unix socket, in octal [default: 0660].
    #[arg(long, env = "ARBITER_UDS_MODE", value_name = "MODE")]
    pub uds_mode: Option<String>,
    /// Serve gRPC on the TCP listener over TLS with this PEM certificate
    /// chain (needs --tls-key).
    #[arg(long, env = "ARBITER_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "ARBITER_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates issued by this PEM CA (mTLS).
    #[arg(long, env = "ARBITER_TLS_CLIENT_CA", value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// Only clients whose certificate has a matching URI or DNS SAN may
    /// call (repeat the flag; see the README for the pattern rule; needs
    /// --tls-client-ca) [default: any certificate the CA signed].
    #[arg(
        long = "tls-allowed-caller",
        env = "ARBITER_TLS_ALLOWED_CALLERS",
        value_delimiter = ',',
        value_name = "PATTERN"
    )]
    pub tls_allowed_callers: Vec<String>,
    /// Only peers of the Unix socket with this uid may call (repeat the
    /// flag) [default: anyone who can open the socket].
    #[arg(
        long = "uds-allowed-uid",
        env = "ARBITER_UDS_ALLOWED_UIDS",
        value_delimiter = ',',
        value_name = "UID"
    )]
    pub uds_allowed_uids: Vec<u32>,
    /// gRPC calls in flight over every listener; more are answered
    /// RESOURCE_EXHAUSTED at once [default: 1024].
    #[arg(long, env = "ARBITER_MAX_IN_FLIGHT", value_name = "N")]
    pub max_in_flight: Option<usize>,
    /// Serve a policy set with no policies (everything denied); without it
    /// such a set is refused at start and on reload (the last good set
    /// keeps serving).
    #[arg(long, env = "ARBITER_ALLOW_EMPTY_POLICIES")]
    pub allow_empty_policies: bool,
    /// The largest gRPC request message, in bytes, on both APIs
    /// [default: 4194304].
    #[arg(long, env = "ARBITER_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,
    /// What a request's own entities (`entities_json`) may do: `add`
    /// entities the store does not hold (the default), `merge` (fill in
    /// attributes a stored entity lacks, add parents) or `replace` stored
    /// ones for the decision (deployments with no identity store).
    #[arg(long, env = "ARBITER_REQUEST_ENTITIES", value_name = "MODE")]
    pub request_entities: Option<RequestEntitiesMode>,
    /// Entities one request's `entities_json` may hold [default: 1000].
    #[arg(long, env = "ARBITER_MAX_REQUEST_ENTITIES", value_name = "N")]
    pub max_request_entities: Option<usize>,
    /// The longest chain of parents an entity may have, from any source
    /// (request, entities file, identity store) [default: 32, at most 256].
    #[arg(long, env = "ARBITER_MAX_HIERARCHY_DEPTH", value_name = "N")]
    pub max_hierarchy_depth: Option<u32>,
    /// (entity, ancestor) pairs among one request's entities [default: 10000].
    #[arg(long, env = "ARBITER_MAX_REQUEST_ANCESTORS", value_name = "N")]
    pub max_request_ancestors: Option<usize>,
    /// Threads that decide requests carrying their own entities
    /// [default: half the cores, at least 1].
    #[arg(long, env = "ARBITER_HEAVY_WORKERS", value_name = "N")]
    pub heavy_workers: Option<usize>,
    /// Such requests that may wait for a thread; more are answered
    /// RESOURCE_EXHAUSTED [default: 64].
    #[arg(long, env = "ARBITER_HEAVY_QUEUE", value_name = "N")]
    pub heavy_queue: Option<usize>,
}

/// `[limits]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_request_entities: Option<usize>,
    pub max_hierarchy_depth: Option<u32>,
    pub max_request_ancestors: Option<usize>,
    pub heavy_workers: Option<usize>,
    pub heavy_queue: Option<usize>,
    pub max_in_flight: Option<usize>,
    pub max_message_bytes: Option<usize>,
    pub max_concurrent_streams: Option<u32>,
    pub max_header_list_bytes: Option<u32>,
    pub keepalive_interval_secs: Option<u64>,
    pub keepalive_timeout_secs: Option<u64>,
}

/// `[tls]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    /// SAN patterns of the clients allowed to call.
    pub allowed_callers: Option<Vec<String>>,
}

/// `[uds]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdsFile {
    /// Peer uids allowed on the Unix socket.
    pub allowed_uids: Option<Vec<u32>>,
}

/// The `--config` file. Unknown keys are an error, so a typo is not ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub policies: Option<PathBuf>,
    pub schema: Option<PathBuf>,
    pub entities: Option<PathBuf>,
    pub template_links: Option<PathBuf>,
    /// Fixtures gating activation (see `--tests`).
    pub tests: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub no_validate: Option<bool>,
    pub no_request_validation: Option<bool>,
    pub on_evaluation_error: Option<String>,
    pub decision_cache_size: Option<u64>,
    pub slice_cache_entities: Option<u64>,
    pub reload_interval_ms: Option<u64>,
    pub shutdown_grace_secs: Option<u64>,
    pub listen_uds: Option<PathBuf>,
    pub uds_mode: Option<String>,
    /// `add` (default), `merge` or `replace`: see `--request-entities`.
    pub request_entities: Option<String>,
    /// Serve a policy set with no policies (see `--allow-empty-policies`).
    pub allow_empty_policies: Option<bool>,
    /// `[limits]`: bounds on requests and hierarchies.
    pub limits: Option<LimitsFile>,
    /// `[tls]`: TLS on the gRPC TCP listener.
    pub tls: Option<TlsFile>,
    /// `[uds]`: who may call on the Unix socket.
    pub uds: Option<UdsFile>,
    /// Envoy ext_authz mapping (see the README).
    pub ext_authz: Option<ExtAuthzConfig>,
    /// `[decision_log]`: see the README; logging to stdout when absent.
    pub decision_log: Option<DecisionLogConfig>,
    /// `[identity]`: entity data synced from an identity store.
    pub identity: Option<IdentityConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file `{path}`: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("`{key}` must be greater than zero")]
    Zero { key: &'static str },
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: error.to_string(),
        })
    }
}

impl ServeArgs {
    /// Merges flags and env (already merged by clap) over the config file.
    pub fn resolve(&self) -> Result<ServeConfig, ConfigError> {
        let mut file = match &self.config {
            Some(path) => {
                let mut file = ConfigFile::read(path)?;
                // Paths in the file are relative to the file.
                let base = path.parent().unwrap_or(Path::new("."));
                let jwks_file = file
                    .ext_authz
                    .as_mut()
                    .and_then(|ext_authz| ext_authz.principal.jwt.as_mut())
                    .and_then(|jwt| jwt.jwks_file.as_mut());
                if let Some(path) = jwks_file.filter(|path| path.is_relative()) {
                    *path = base.join(&*path);
                }
                for p in [
                    &mut file.policies,
                    &mut file.schema,
                    &mut file.entities,
                    &mut file.template_links,
                    &mut file.tests,
                    &mut file.listen_uds,
                ] {
                    if let Some(path) = p.as_mut().filter(|path| path.is_relative()) {
                        *path = base.join(&*path);
                    }
                }
                let tls = file.tls.get_or_insert_with(TlsFile::default);
                for p in [&mut tls.cert, &mut tls.key, &mut tls.client_ca] {
                    if let Some(path) = p.as_mut().filter(|path| path.is_relative()) {
                        *path = base.join(&*path);
                    }
                }
                if let Some(log) = file.decision_log.as_mut() {
                    log.make_paths_relative_to(base);
                }
                if let Some(path) = file
                    .identity
                    .as_mut()
                    .and_then(|i| i.scim.as_mut())
                    .and_then(|scim| scim.token_file.as_mut())
                    .filter(|path| path.is_relative())
                {
                    *path = base.join(&*path);
                }
                if let Some(postgres) = file.identity.as_mut().and_then(|i| i.postgres.as_mut()) {
                    for p in [&mut postgres.url_file, &mut postgres.password_file] {
                        if let Some(path) = p.as_mut().filter(|path| path.is_relative()) {
                            *path = base.join(&*path);
                        }
                    }
                }
                file
            }
            None => ConfigFile::default(),
        };
        let defaults = ServeConfig::default();
        let on_evaluation_error = match (self.on_evaluation_error, &file.on_evaluation_error) {
            (Some(mode), _) => mode,
            (None, Some(text)) => text.parse().map_err(|message| ConfigError::Invalid {
                key: "on_evaluation_error",
                message,
            })?,
            (None, None) => OnEvaluationError::default(),
        };
        let request_entities = match (self.request_entities, &file.request_entities) {
            (Some(mode), _) => mode,
            (None, Some(text)) => text.parse().map_err(|message| ConfigError::Invalid {
                key: "request_entities",
                message,
            })?,
            (None, None) => RequestEntitiesMode::default(),
        };
        let limits_file = file.limits.take().unwrap_or_default();
        let limits = RequestLimits {
            max_request_entities: self
                .max_request_entities
                .or(limits_file.max_request_entities)
                .unwrap_or(DEFAULT_MAX_REQUEST_ENTITIES),
            max_hierarchy_depth: self
                .max_hierarchy_depth
                .or(limits_file.max_hierarchy_depth)
                .unwrap_or(DEFAULT_MAX_HIERARCHY_DEPTH),
            max_request_ancestors: self
                .max_request_ancestors
                .or(limits_file.max_request_ancestors)
                .unwrap_or(DEFAULT_MAX_REQUEST_ANCESTORS),
            heavy_workers: self
                .heavy_workers
                .or(limits_file.heavy_workers)
                .unwrap_or_else(default_heavy_workers),
            heavy_queue: self
                .heavy_queue
                .or(limits_file.heavy_queue)
                .unwrap_or(DEFAULT_HEAVY_QUEUE),
        };
        if limits.heavy_workers == 0 {
            return Err(ConfigError::Zero {
                key: "heavy_workers",
            });
        }
        if limits.max_request_entities == 0 {
            return Err(ConfigError::Zero {
                key: "max_request_entities",
            });
        }
        if limits.max_request_entities > MAX_REQUEST_ENTITIES_CEILING {
            return Err(ConfigError::Invalid {
                key: "max_request_entities",
                message: format!(
                    "{} is more than {MAX_REQUEST_ENTITIES_CEILING}",
                    limits.max_request_entities
                ),
            });
        }
        if limits.max_hierarchy_depth > MAX_HIERARCHY_DEPTH_CEILING {
            return Err(ConfigError::Invalid {
                key: "max_hierarchy_depth",
                message: format!(
                    "{} is more than {MAX_HIERARCHY_DEPTH_CEILING}, the most Cedar's hierarchy walk is allowed",
                    limits.max_hierarchy_depth
                ),
            });
        }
        let reload_ms = self.reload_interval_ms.or(file.reload_interval_ms);
        if reload_ms == Some(0) {
            return Err(ConfigError::Zero {
                key: "reload_interval_ms",
            });
        }
        let uds_mode = match self.uds_mode.as_ref().or(file.uds_mode.as_ref()) {
            Some(text) => u32::from_str_radix(text.trim_start_matches("0o"), 8)
                .ok()
                .filter(|mode| *mode <= 0o777)
                .ok_or_else(|| ConfigError::Invalid {
                    key: "uds_mode",
                    message: format!("`{text}` is not an octal file mode such as 0660"),
                })?,
            None => 0o660,
        };
        let tls_file = file.tls.unwrap_or_default();
        let tls = match (
            self.tls_cert.clone().or(tls_file.cert),
            self.tls_key.clone().or(tls_file.key),
            self.tls_client_ca.clone().or(tls_file.client_ca),
        ) {
            (Some(cert), Some(key), client_ca) => Some(TlsConfig {
                cert,
                key,
                client_ca,
            }),
            (None, None, None) => None,
            _ => {
                return Err(ConfigError::Invalid {
                    key: "tls",
                    message: "TLS needs both `tls.cert` and `tls.key` (--tls-cert, --tls-key); \
                              `tls.client_ca` only adds client verification to them"
                        .into(),
                });
            }
        };
        let allowed_callers = if self.tls_allowed_callers.is_empty() {
            tls_file.allowed_callers
        } else {
            Some(self.tls_allowed_callers.clone())
        };
        let allowed_callers = match allowed_callers {
            None => None,
            Some(patterns) => {
                if tls.as_ref().is_none_or(|tls| tls.client_ca.is_none()) {
                    return Err(ConfigError::Invalid {
                        key: "tls.allowed_callers",
                        message: "needs client certificates: set `tls.client_ca` (--tls-client-ca)"
                            .into(),
                    });
                }
                if patterns.is_empty() {
                    return Err(ConfigError::Invalid {
                        key: "tls.allowed_callers",
                        message: "an empty list would refuse every caller".into(),
                    });
                }
                let parsed = patterns
                    .iter()
                    .map(|p| CallerPattern::parse(p))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|message| ConfigError::Invalid {
                        key: "tls.allowed_callers",
                        message,
                    })?;
                Some(parsed)
            }
        };
        let allowed_uids = if self.uds_allowed_uids.is_empty() {
            file.uds.and_then(|uds| uds.allowed_uids)
        } else {
            Some(self.uds_allowed_uids.clone())
        };
        if allowed_uids.as_ref().is_some_and(Vec::is_empty) {
            return Err(ConfigError::Invalid {
                key: "uds.allowed_uids",
                message: "an empty list would refuse every caller".into(),
            });
        }
        let max_in_flight = self
            .max_in_flight
            .or(limits_file.max_in_flight)
            .unwrap_or(DEFAULT_MAX_IN_FLIGHT);
        let transport_defaults = TransportLimits::default();
        let transport = TransportLimits {
            max_message_bytes: self
                .max_message_bytes
                .or(limits_file.max_message_bytes)
                .unwrap_or(transport_defaults.max_message_bytes),
            max_concurrent_streams: limits_file
                .max_concurrent_streams
                .unwrap_or(transport_defaults.max_concurrent_streams),
            max_header_list_bytes: limits_file
                .max_header_list_bytes
                .unwrap_or(transport_defaults.max_header_list_bytes),
            keepalive_interval: limits_file
                .keepalive_interval_secs
                .map_or(transport_defaults.keepalive_interval, Duration::from_secs),
            keepalive_timeout: limits_file
                .keepalive_timeout_secs
                .map_or(transport_defaults.keepalive_timeout, Duration::from_secs),
        };
        for (key, value) in [
            ("max_in_flight", max_in_flight as u64),
            ("max_message_bytes", transport.max_message_bytes as u64),
            (
                "max_concurrent_streams",
                u64::from(transport.max_concurrent_streams),
            ),
            (
                "max_header_list_bytes",
                u64::from(transport.max_header_list_bytes),
            ),
            (
                "keepalive_interval_secs",
                transport.keepalive_interval.as_secs(),
            ),
            (
                "keepalive_timeout_secs",
                transport.keepalive_timeout.as_secs(),
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { key });
            }
        }
        let decision_log = file.decision_log.unwrap_or_default();
        let problems = decision_log.problems();
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                key: "decision_log",
                message: problems.join("; "),
            });
        }
        Ok(ServeConfig {
            decision_log,
            sources: Sources {
                policies: self.policies.clone().or(file.policies),
                schema: self.schema.clone().or(file.schema),
                entities: self.entities.clone().or(file.entities),
                template_links: self.template_links.clone().or(file.template_links),
                tests: self.tests.clone().or(file.tests),
            },
            load: LoadOptions {
                validate_policies: !(self.no_validate || file.no_validate.unwrap_or(false)),
                validate_requests: !(self.no_request_validation
                    || file.no_request_validation.unwrap_or(false)),
                on_evaluation_error,
                decision_cache_capacity: self
                    .decision_cache_size
                    .or(file.decision_cache_size)
                    .unwrap_or(DEFAULT_DECISION_CACHE_CAPACITY),
                slice_cache_capacity: self
                    .slice_cache_entities
                    .or(file.slice_cache_entities)
                    .unwrap_or(DEFAULT_SLICE_CACHE_CAPACITY),
                request_entities,
                limits,
                policy_index_min: crate::engine::DEFAULT_POLICY_INDEX_MIN,
                allow_empty_policies: self.allow_empty_policies
                    || file.allow_empty_policies.unwrap_or(false),
            },
            listen: self.listen.or(file.listen).unwrap_or(defaults.listen),
            admin_listen: self
                .admin_listen
                .or(file.admin_listen)
                .unwrap_or(defaults.admin_listen),
            reload_interval: reload_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.reload_interval),
            shutdown_grace: self
                .shutdown_grace_secs
                .or(file.shutdown_grace_secs)
                .map(Duration::from_secs)
                .unwrap_or(defaults.shutdown_grace),
            uds: self
                .listen_uds
                .clone()
                .or(file.listen_uds)
                .map(|path| UdsConfig {
                    path,
                    mode: uds_mode,
                }),
            tls,
            ext_authz: file.ext_authz,
            identity: file.identity,
            admission: AdmissionConfig {
                allowed_callers,
                allowed_uids,
                max_in_flight,
            },
            transport,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            listen: Some("127.0.0.1:7001".parse().unwrap()),
            ..ServeArgs::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.listen, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(config.sources.policies, Some(dir.path().join("p.cedar")));
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
            config.admission.allowed_callers.unwrap(),
            vec![
                CallerPattern::UriPrefix("spiffe://example.org/ns/app/".into()),
                CallerPattern::DnsSuffix(".svc.cluster.local".into()),
            ]
        );
        assert_eq!(config.admission.allowed_uids, Some(vec![1000, 1001]));
        assert_eq!(config.admission.max_in_flight, 8);
        assert_eq!(config.transport.max_message_bytes, 65536);
        assert_eq!(config.transport.max_concurrent_streams, 16);
        assert_eq!(
            config.transport.keepalive_interval,
            TransportLimits::default().keepalive_interval
        );
        // Flags win; a bad pattern, or callers without client certificates,
        // are refused.
        let flags = ServeArgs {
            config: Some(path),
            uds_allowed_uids: vec![7],
            tls_allowed_callers: vec!["a.*.org".into()],
            ..ServeArgs::default()
        };
        let error = flags.resolve().unwrap_err().to_string();
        assert!(error.contains("a.*.org"), "{error}");
        let no_ca = ServeArgs {
            tls_cert: Some("s.pem".into()),
            tls_key: Some("s.key".into()),
            tls_allowed_callers: vec!["web.example.org".into()],
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
        let uds = config.uds.unwrap();
        assert_eq!(uds.path, dir.path().join("arbiter.sock"));
        assert_eq!(uds.mode, 0o600);
        let ext_authz = config.ext_authz.unwrap();
        assert_eq!(
            ext_authz.principal.jwt.unwrap().jwks_file,
            Some(dir.path().join("jwks.json"))
        );
        assert_eq!(ext_authz.routes.len(), 1);

        let bad = ServeArgs {
            uds_mode: Some("999".into()),
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
