//! `arbiter serve`: runs the sidecar until SIGTERM or SIGINT, then drains.

use crate::app::Server;
use crate::config::ServeArgs;
use crate::shutdown;

use super::exit;

pub async fn run(args: &ServeArgs) -> u8 {
    let config = match args.resolve() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return exit::USAGE;
        }
    };
    let server = match Server::bind(config).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("error: {error}");
            return exit::FAILURE;
        }
    };
    if let (Ok(grpc), Ok(admin)) = (server.local_addr(), server.admin_addr()) {
        tracing::info!(%grpc, %admin, "listening");
    }
    match server.run(shutdown::signal()).await {
        Ok(()) => exit::OK,
        Err(crate::app::ServeError::InitialLoad(error)) => {
            eprint!("{}", error.render());
            eprintln!("error: the policy set could not be loaded");
            exit::INVALID
        }
        Err(error) => {
            eprintln!("error: {error}");
            exit::FAILURE
        }
    }
}
