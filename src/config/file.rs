//! The `--config` TOML file: one flat table of top-level keys plus
//! `[limits]`, `[tls]`, `[uds]`, `[ext_authz]`, `[decision_log]` and
//! `[identity]`. Unknown keys are an error, so a typo is not ignored. Each
//! part of `ServeArgs` reads its own keys from it (see `config/mod.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::adapter::ext_authz::ExtAuthzConfig;
use crate::decision_log::DecisionLogConfig;
use crate::identity::IdentityConfig;

use super::error::ConfigError;

/// `[limits]` in the config file: the engine's request limits and the
/// listeners' gRPC/HTTP/2 limits.
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

/// The `--config` file.
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

    /// Reads the file and makes every path in it relative to the file's
    /// directory, so a config file can be used from any working directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut file = Self::read(path)?;
        file.make_paths_relative_to(path.parent().unwrap_or(Path::new(".")));
        Ok(file)
    }

    fn make_paths_relative_to(&mut self, base: &Path) {
        let rebase = |path: &mut Option<PathBuf>| {
            if let Some(path) = path.as_mut().filter(|path| path.is_relative()) {
                *path = base.join(&*path);
            }
        };
        if let Some(jwt) = self
            .ext_authz
            .as_mut()
            .and_then(|ext_authz| ext_authz.principal.jwt.as_mut())
        {
            rebase(&mut jwt.jwks_file);
        }
        for path in [
            &mut self.policies,
            &mut self.schema,
            &mut self.entities,
            &mut self.template_links,
            &mut self.tests,
            &mut self.listen_uds,
        ] {
            rebase(path);
        }
        if let Some(tls) = self.tls.as_mut() {
            for path in [&mut tls.cert, &mut tls.key, &mut tls.client_ca] {
                rebase(path);
            }
        }
        if let Some(log) = self.decision_log.as_mut() {
            log.make_paths_relative_to(base);
        }
        if let Some(identity) = self.identity.as_mut() {
            if let Some(scim) = identity.scim.as_mut() {
                rebase(&mut scim.token_file);
            }
            if let Some(postgres) = identity.postgres.as_mut() {
                rebase(&mut postgres.url_file);
                rebase(&mut postgres.password_file);
            }
        }
    }
}
