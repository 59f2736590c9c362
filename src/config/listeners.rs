//! The gRPC listeners: the TCP address (with TLS and mTLS), the Unix
//! socket, who may call on each, the in-flight limit and the gRPC/HTTP/2
//! limits, and the Envoy ext_authz service they also serve. Resolves into
//! [`ListenerConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::adapter::admission::{AdmissionConfig, CallerPattern, DEFAULT_MAX_IN_FLIGHT};
use crate::app::{ListenerConfig, TlsConfig, TransportLimits, UdsConfig};

use super::error::ConfigError;
use super::file::ConfigFile;

/// Where gRPC is served, to whom, and within which limits.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ListenerArgs {
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "ARBITER_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
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
    /// The largest gRPC request message, in bytes, on both APIs
    /// [default: 4194304].
    #[arg(long, env = "ARBITER_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,
}

impl ListenerArgs {
    /// Flags (and env) over the file's `listen`, `listen_uds`, `uds_mode`,
    /// `[tls]`, `[uds]`, the listener keys of `[limits]` and `[ext_authz]`.
    pub fn resolve(&self, file: &ConfigFile) -> Result<ListenerConfig, ConfigError> {
        let uds_mode = self.uds_mode(file)?;
        let tls = self.tls(file)?;
        let allowed_callers = self.allowed_callers(file, tls.as_ref())?;
        let allowed_uids = self.allowed_uids(file)?;
        let (max_in_flight, transport) = self.limits(file)?;
        Ok(ListenerConfig {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or(ListenerConfig::default().listen),
            uds: self
                .listen_uds
                .clone()
                .or_else(|| file.listen_uds.clone())
                .map(|path| UdsConfig {
                    path,
                    mode: uds_mode,
                }),
            tls,
            admission: AdmissionConfig {
                allowed_callers,
                allowed_uids,
                max_in_flight,
            },
            transport,
            ext_authz: file.ext_authz.clone(),
        })
    }

    fn uds_mode(&self, file: &ConfigFile) -> Result<u32, ConfigError> {
        match self.uds_mode.as_ref().or(file.uds_mode.as_ref()) {
            Some(text) => u32::from_str_radix(text.trim_start_matches("0o"), 8)
                .ok()
                .filter(|mode| *mode <= 0o777)
                .ok_or_else(|| ConfigError::Invalid {
                    key: "uds_mode",
                    message: format!("`{text}` is not an octal file mode such as 0660"),
                }),
            None => Ok(0o660),
        }
    }

    /// Each of cert, key and client CA: its flag, else the file's.
    fn tls(&self, file: &ConfigFile) -> Result<Option<TlsConfig>, ConfigError> {
        let from_file = file.tls.as_ref();
        let pick = |flag: &Option<PathBuf>, key: Option<&PathBuf>| flag.clone().or(key.cloned());
        match (
            pick(&self.tls_cert, from_file.and_then(|t| t.cert.as_ref())),
            pick(&self.tls_key, from_file.and_then(|t| t.key.as_ref())),
            pick(
                &self.tls_client_ca,
                from_file.and_then(|t| t.client_ca.as_ref()),
            ),
        ) {
            (Some(cert), Some(key), client_ca) => Ok(Some(TlsConfig {
                cert,
                key,
                client_ca,
            })),
            (None, None, None) => Ok(None),
            _ => Err(ConfigError::Invalid {
                key: "tls",
                message: "TLS needs both `tls.cert` and `tls.key` (--tls-cert, --tls-key); \
                          `tls.client_ca` only adds client verification to them"
                    .into(),
            }),
        }
    }

    /// The flags replace the file's list as a whole (they are not merged).
    fn allowed_callers(
        &self,
        file: &ConfigFile,
        tls: Option<&TlsConfig>,
    ) -> Result<Option<Vec<CallerPattern>>, ConfigError> {
        let patterns = if self.tls_allowed_callers.is_empty() {
            file.tls.as_ref().and_then(|t| t.allowed_callers.clone())
        } else {
            Some(self.tls_allowed_callers.clone())
        };
        let Some(patterns) = patterns else {
            return Ok(None);
        };
        if tls.is_none_or(|tls| tls.client_ca.is_none()) {
            return Err(ConfigError::Invalid {
                key: "tls.allowed_callers",
                message: "needs client certificates: set `tls.client_ca` (--tls-client-ca)".into(),
            });
        }
        if patterns.is_empty() {
            return Err(ConfigError::Invalid {
                key: "tls.allowed_callers",
                message: "an empty list would refuse every caller".into(),
            });
        }
        patterns
            .iter()
            .map(|p| CallerPattern::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
            .map_err(|message| ConfigError::Invalid {
                key: "tls.allowed_callers",
                message,
            })
    }

    /// The flags replace the file's list as a whole (they are not merged).
    fn allowed_uids(&self, file: &ConfigFile) -> Result<Option<Vec<u32>>, ConfigError> {
        let uids = if self.uds_allowed_uids.is_empty() {
            file.uds.as_ref().and_then(|uds| uds.allowed_uids.clone())
        } else {
            Some(self.uds_allowed_uids.clone())
        };
        if uids.as_ref().is_some_and(Vec::is_empty) {
            return Err(ConfigError::Invalid {
                key: "uds.allowed_uids",
                message: "an empty list would refuse every caller".into(),
            });
        }
        Ok(uids)
    }

    /// `max_in_flight` and the gRPC/HTTP/2 limits; none may be zero. Only
    /// the in-flight and message limits have flags.
    fn limits(&self, file: &ConfigFile) -> Result<(usize, TransportLimits), ConfigError> {
        let from_file = file.limits.as_ref();
        let max_in_flight = self
            .max_in_flight
            .or(from_file.and_then(|l| l.max_in_flight))
            .unwrap_or(DEFAULT_MAX_IN_FLIGHT);
        let defaults = TransportLimits::default();
        let transport = TransportLimits {
            max_message_bytes: self
                .max_message_bytes
                .or(from_file.and_then(|l| l.max_message_bytes))
                .unwrap_or(defaults.max_message_bytes),
            max_concurrent_streams: from_file
                .and_then(|l| l.max_concurrent_streams)
                .unwrap_or(defaults.max_concurrent_streams),
            max_header_list_bytes: from_file
                .and_then(|l| l.max_header_list_bytes)
                .unwrap_or(defaults.max_header_list_bytes),
            keepalive_interval: from_file
                .and_then(|l| l.keepalive_interval_secs)
                .map_or(defaults.keepalive_interval, Duration::from_secs),
            keepalive_timeout: from_file
                .and_then(|l| l.keepalive_timeout_secs)
                .map_or(defaults.keepalive_timeout, Duration::from_secs),
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
        Ok((max_in_flight, transport))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LimitsFile, TlsFile, UdsFile};

    fn tls_file() -> ConfigFile {
        ConfigFile {
            tls: Some(TlsFile {
                cert: Some("file.pem".into()),
                key: Some("file.key".into()),
                client_ca: Some("file-ca.pem".into()),
                allowed_callers: Some(vec!["web.example.org".into()]),
            }),
            ..ConfigFile::default()
        }
    }

    #[test]
    fn tls_files_are_merged_one_by_one() {
        // A flag replaces its own file only: a rotated certificate given on
        // the command line keeps the file's key and CA.
        let args = ListenerArgs {
            tls_cert: Some("flag.pem".into()),
            ..ListenerArgs::default()
        };
        let tls = args.resolve(&tls_file()).unwrap().tls.unwrap();
        assert_eq!(
            tls,
            TlsConfig {
                cert: "flag.pem".into(),
                key: "file.key".into(),
                client_ca: Some("file-ca.pem".into()),
            }
        );
        // A key without a certificate is refused, whichever place gave it.
        let half = ListenerArgs {
            tls_key: Some("flag.key".into()),
            ..ListenerArgs::default()
        };
        let error = half.resolve(&ConfigFile::default()).unwrap_err();
        assert!(error.to_string().starts_with("invalid `tls`"), "{error}");
    }

    #[test]
    fn caller_lists_from_flags_replace_the_files_list() {
        let args = ListenerArgs {
            tls_allowed_callers: vec!["spiffe://example.org/ns/*".into()],
            uds_allowed_uids: vec![7],
            ..ListenerArgs::default()
        };
        let mut file = tls_file();
        file.uds = Some(UdsFile {
            allowed_uids: Some(vec![1000, 1001]),
        });
        let admission = args.resolve(&file).unwrap().admission;
        assert_eq!(
            admission.allowed_callers,
            Some(vec![CallerPattern::UriPrefix(
                "spiffe://example.org/ns/".into()
            )])
        );
        assert_eq!(admission.allowed_uids, Some(vec![7]));
        let admission = ListenerArgs::default().resolve(&file).unwrap().admission;
        assert_eq!(
            admission.allowed_callers,
            Some(vec![CallerPattern::DnsExact("web.example.org".into())])
        );
        assert_eq!(admission.allowed_uids, Some(vec![1000, 1001]));
        // An empty list in the file would refuse everyone: an error.
        file.uds = Some(UdsFile {
            allowed_uids: Some(vec![]),
        });
        let error = ListenerArgs::default().resolve(&file).unwrap_err();
        assert!(
            error.to_string().contains("would refuse every caller"),
            "{error}"
        );
    }

    #[test]
    fn socket_path_and_mode_come_from_either_place() {
        let file = ConfigFile {
            listen_uds: Some("/run/a.sock".into()),
            uds_mode: Some("0600".into()),
            ..ConfigFile::default()
        };
        let args = ListenerArgs {
            uds_mode: Some("0o640".into()),
            ..ListenerArgs::default()
        };
        let uds = args.resolve(&file).unwrap().uds.unwrap();
        assert_eq!(uds.path, PathBuf::from("/run/a.sock"));
        assert_eq!(uds.mode, 0o640);
        let uds = ListenerArgs::default().resolve(&file).unwrap().uds.unwrap();
        assert_eq!(uds.mode, 0o600);
        // No socket: the mode is still checked, and 0660 is the default.
        let config = ListenerArgs::default()
            .resolve(&ConfigFile::default())
            .unwrap();
        assert_eq!(config.uds, None);
        assert_eq!(config.listen, "127.0.0.1:50051".parse().unwrap());
    }

    #[test]
    fn limits_from_flags_else_the_limits_table_and_never_zero() {
        let file = ConfigFile {
            limits: Some(LimitsFile {
                max_in_flight: Some(8),
                max_message_bytes: Some(1024),
                keepalive_timeout_secs: Some(5),
                ..LimitsFile::default()
            }),
            ..ConfigFile::default()
        };
        let args = ListenerArgs {
            max_message_bytes: Some(2048),
            ..ListenerArgs::default()
        };
        let config = args.resolve(&file).unwrap();
        assert_eq!(config.admission.max_in_flight, 8);
        assert_eq!(config.transport.max_message_bytes, 2048);
        assert_eq!(config.transport.keepalive_timeout, Duration::from_secs(5));
        assert_eq!(
            config.transport.max_concurrent_streams,
            TransportLimits::default().max_concurrent_streams
        );
        let zero = ListenerArgs {
            max_in_flight: Some(0),
            ..ListenerArgs::default()
        };
        assert_eq!(
            zero.resolve(&file).unwrap_err().to_string(),
            "`max_in_flight` must be greater than zero"
        );
    }
}
