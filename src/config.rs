//! `arbiter serve` settings from three places, in order of precedence:
//! command-line flags, `ARBITER_*` environment variables, then the TOML file
//! given by `--config`; anything unset takes its documented default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::app::ServeConfig;
use crate::engine::loader::DEFAULT_DECISION_CACHE_CAPACITY;
use crate::engine::{LoadOptions, OnEvaluationError, Sources};
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
    /// What a policy evaluation error does: `deny` (fail closed, the
    /// default) or `skip-policy` (Cedar's semantics: the erroring policy is
    /// ignored and the others decide).
    #[arg(long, env = "ARBITER_ON_EVALUATION_ERROR", value_name = "MODE")]
    pub on_evaluation_error: Option<OnEvaluationError>,
    /// Decisions remembered per policy/data snapshot; 0 turns the cache off
    /// [default: 65536]. A new snapshot always starts with an empty cache.
    #[arg(long, env = "ARBITER_DECISION_CACHE_SIZE", value_name = "N")]
    pub decision_cache_size: Option<u64>,
    /// How often watched files are checked for changes, in milliseconds [default: 250].
    #[arg(long, env = "ARBITER_RELOAD_INTERVAL_MS", value_name = "MS")]
    pub reload_interval_ms: Option<u64>,
    /// How long in-flight calls may run after SIGTERM, in seconds [default: 20].
    #[arg(long, env = "ARBITER_SHUTDOWN_GRACE_SECS", value_name = "SECS")]
    pub shutdown_grace_secs: Option<u64>,
}

/// The `--config` file. Unknown keys are an error, so a typo is not ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub policies: Option<PathBuf>,
    pub schema: Option<PathBuf>,
    pub entities: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub no_validate: Option<bool>,
    pub no_request_validation: Option<bool>,
    pub on_evaluation_error: Option<String>,
    pub decision_cache_size: Option<u64>,
    pub reload_interval_ms: Option<u64>,
    pub shutdown_grace_secs: Option<u64>,
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
        let file = match &self.config {
            Some(path) => {
                let mut file = ConfigFile::read(path)?;
                // Paths in the file are relative to the file.
                let base = path.parent().unwrap_or(Path::new("."));
                for p in [&mut file.policies, &mut file.schema, &mut file.entities] {
                    if let Some(path) = p.as_mut().filter(|path| path.is_relative()) {
                        *path = base.join(&*path);
                    }
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
        let reload_ms = self.reload_interval_ms.or(file.reload_interval_ms);
        if reload_ms == Some(0) {
            return Err(ConfigError::Zero {
                key: "reload_interval_ms",
            });
        }
        Ok(ServeConfig {
            sources: Sources {
                policies: self.policies.clone().or(file.policies),
                schema: self.schema.clone().or(file.schema),
                entities: self.entities.clone().or(file.entities),
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
            identity: file.identity,
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
}
