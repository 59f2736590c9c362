//! The admin HTTP listener: `/metrics`, `/live`, `/ready` (the routes are
//! `crate::admin`'s; this part binds and runs them).

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::AdminState;

use super::ServeError;
use super::stop::wait_for_stop;

/// The admin HTTP listener: `/metrics`, `/live`, `/ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// The admin listener, bound, not yet serving.
#[derive(Debug)]
pub struct Admin {
    listener: TcpListener,
}

impl Admin {
    pub(super) async fn bind(config: &AdminConfig) -> Result<Self, ServeError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Ok(Admin { listener })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` turns true.
    pub(super) fn start(
        self,
        state: AdminState,
        stop: &watch::Receiver<bool>,
    ) -> JoinHandle<std::io::Result<()>> {
        tokio::spawn(crate::admin::serve(
            self.listener,
            state,
            wait_for_stop(stop.clone()),
        ))
    }
}
