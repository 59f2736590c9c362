//! The admin HTTP listener (`/metrics`, `/live`, `/ready`). Resolves into
//! [`AdminConfig`].

use std::net::SocketAddr;

use crate::app::AdminConfig;

use super::file::ConfigFile;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct AdminArgs {
    /// Admin HTTP listen address for /metrics, /live, /ready [default: 127.0.0.1:9464].
    #[arg(long, env = "ARBITER_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
}

impl AdminArgs {
    /// The flag (or env) over the file's `admin_listen`.
    pub fn resolve(&self, file: &ConfigFile) -> AdminConfig {
        AdminConfig {
            listen: self
                .admin_listen
                .or(file.admin_listen)
                .unwrap_or(AdminConfig::default().listen),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_over_file_over_default() {
        let file = ConfigFile {
            admin_listen: Some("127.0.0.1:7100".parse().unwrap()),
            ..ConfigFile::default()
        };
        let flag = AdminArgs {
            admin_listen: Some("127.0.0.1:7200".parse().unwrap()),
        };
        assert_eq!(
            flag.resolve(&file).listen,
            "127.0.0.1:7200".parse().unwrap()
        );
        let none = AdminArgs::default();
        assert_eq!(
            none.resolve(&file).listen,
            "127.0.0.1:7100".parse().unwrap()
        );
        assert_eq!(
            none.resolve(&ConfigFile::default()).listen,
            "127.0.0.1:9464".parse().unwrap()
        );
    }
}
