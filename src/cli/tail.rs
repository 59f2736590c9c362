//! `arbiter tail`: prints a running server's decision records as they
//! happen (`arbiter.v1.DecisionLog/Tail`), one JSON object per line, with
//! optional filters. For live debugging; not an audit trail (a slow
//! terminal skips records, and says so on stderr).

use std::io::Write;

use crate::proto::v1 as pb;

use super::exit;

#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// The server to tail.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Only this principal: `Type::"id"` or a bare id.
    #[arg(long)]
    pub principal: Option<String>,
    /// Only this action: `Type::"id"` or a bare id.
    #[arg(long)]
    pub action: Option<String>,
    /// Only this resource: `Type::"id"` or a bare id.
    #[arg(long)]
    pub resource: Option<String>,
    /// Only `allow` or only `deny`.
    #[arg(long, value_parser = ["allow", "deny"])]
    pub decision: Option<String>,
    /// Only `grpc` or only `ext_authz` decisions.
    #[arg(long)]
    pub transport: Option<String>,
    /// Exit after this many records.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

pub fn run(args: &TailArgs) -> u8 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return exit::FAILURE;
        }
    };
    runtime.block_on(tail(args))
}

async fn tail(args: &TailArgs) -> u8 {
    let url = &args.server;
    let endpoint = match tonic::transport::Endpoint::from_shared(url.clone()) {
        Ok(endpoint) => endpoint,
        Err(error) => {
            eprintln!("error: `{url}` is not a server URL: {error}");
            return exit::USAGE;
        }
    };
    let channel = match endpoint
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
    {
        Ok(channel) => channel,
        Err(error) => {
            eprintln!("error: cannot connect to `{url}`: {error}");
            return exit::FAILURE;
        }
    };
    let mut client = pb::decision_log_client::DecisionLogClient::new(channel);
    let request = pb::TailRequest {
        principal: args.principal.clone().unwrap_or_default(),
        action: args.action.clone().unwrap_or_default(),
        resource: args.resource.clone().unwrap_or_default(),
        decision: match args.decision.as_deref() {
            Some("allow") => pb::Decision::Allow as i32,
            Some("deny") => pb::Decision::Deny as i32,
            _ => pb::Decision::Unspecified as i32,
        },
        transport: args.transport.clone().unwrap_or_default(),
    };
    let mut stream = match client.tail(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            eprintln!("error: {:?}: {}", status.code(), status.message());
            return exit::FAILURE;
        }
    };
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    loop {
        if args.count.is_some_and(|count| printed >= count) {
            return exit::OK;
        }
        match stream.message().await {
            Ok(Some(record)) => {
                if record.skipped > 0 {
                    eprintln!(
                        "arbiter tail: fell behind, {} records skipped",
                        record.skipped
                    );
                }
                let mut out = stdout.lock();
                if writeln!(out, "{}", record.record_json)
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    return exit::OK;
                }
                printed += 1;
            }
            Ok(None) => return exit::OK,
            Err(status) => {
                eprintln!("error: {:?}: {}", status.code(), status.message());
                return exit::FAILURE;
            }
        }
    }
}
