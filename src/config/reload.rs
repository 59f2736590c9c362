//! The served files and how often they are checked for changes: the
//! policies, the schema, the file identity source (`--entities`), the
//! template links and the fixtures that gate activation (`--tests`).
//! Resolves into [`ReloadConfig`].

use std::path::PathBuf;
use std::time::Duration;

use crate::app::ReloadConfig;
use crate::engine::Sources;

use super::error::ConfigError;
use super::file::ConfigFile;

/// What is loaded at start and reloaded on change.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReloadArgs {
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
    /// How often watched files are checked for changes, in milliseconds [default: 250].
    #[arg(long, env = "ARBITER_RELOAD_INTERVAL_MS", value_name = "MS")]
    pub reload_interval_ms: Option<u64>,
}

impl ReloadArgs {
    /// Flags (and env) over the file's `policies`, `schema`, `entities`
    /// and `reload_interval_ms`.
    pub fn resolve(&self, file: &ConfigFile) -> Result<ReloadConfig, ConfigError> {
        let interval = match self.reload_interval_ms.or(file.reload_interval_ms) {
            Some(0) => {
                return Err(ConfigError::Zero {
                    key: "reload_interval_ms",
                });
            }
            Some(ms) => Duration::from_millis(ms),
            None => ReloadConfig::default().interval,
        };
        Ok(ReloadConfig {
            sources: Sources {
                policies: self.policies.clone().or_else(|| file.policies.clone()),
                schema: self.schema.clone().or_else(|| file.schema.clone()),
                entities: self.entities.clone().or_else(|| file.entities.clone()),
                template_links: self
                    .template_links
                    .clone()
                    .or_else(|| file.template_links.clone()),
                tests: self.tests.clone().or_else(|| file.tests.clone()),
            },
            interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_file_from_its_flag_else_the_config_file() {
        let file = ConfigFile {
            policies: Some("file/p.cedar".into()),
            schema: Some("file/s.cedarschema".into()),
            reload_interval_ms: Some(1000),
            ..ConfigFile::default()
        };
        let args = ReloadArgs {
            policies: Some("flag/p.cedar".into()),
            entities: Some("flag/e.json".into()),
            ..ReloadArgs::default()
        };
        let config = args.resolve(&file).unwrap();
        assert_eq!(config.sources.policies, Some("flag/p.cedar".into()));
        assert_eq!(config.sources.schema, Some("file/s.cedarschema".into()));
        assert_eq!(config.sources.entities, Some("flag/e.json".into()));
        assert_eq!(config.interval, Duration::from_secs(1));
        let defaults = ReloadArgs::default()
            .resolve(&ConfigFile::default())
            .unwrap();
        assert_eq!(defaults, ReloadConfig::default());
        assert_eq!(defaults.interval, Duration::from_millis(250));
    }

    #[test]
    fn a_zero_interval_is_refused_from_either_place() {
        let zero = ConfigFile {
            reload_interval_ms: Some(0),
            ..ConfigFile::default()
        };
        let error = ReloadArgs::default().resolve(&zero).unwrap_err();
        assert_eq!(
            error.to_string(),
            "`reload_interval_ms` must be greater than zero"
        );
        // A flag wins over the file, also over a bad value in it.
        let flag = ReloadArgs {
            reload_interval_ms: Some(5),
            ..ReloadArgs::default()
        };
        assert_eq!(
            flag.resolve(&zero).unwrap().interval,
            Duration::from_millis(5)
        );
    }
}
