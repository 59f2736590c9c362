//! The `arbiter` binary: parses the command line and runs a subcommand.

use std::process::ExitCode;

use arbiter::cli::{self, SourceArgs, check::CheckArgs};
use arbiter::config::ServeArgs;
use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "arbiter",
    version,
    about = "Cedar policy decision point sidecar"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "ARBITER_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve decisions over gRPC (the default when no subcommand is given).
    Serve(Box<ServeArgs>),
    /// Check that policies, schema and entities load and validate.
    Validate(SourceArgs),
    /// Answer one request locally, without a server.
    Check(CheckArgs),
    /// Run decision fixtures (JSON test cases) against the policies.
    Test(cli::test::TestArgs),
    /// Format `.cedar` policy files.
    Fmt(cli::fmt::FmtArgs),
    /// Print a running server's decision records live, with filters.
    Tail(cli::tail::TailArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    arbiter::telemetry::init_logging(cli.log_json);
    let code = match cli.command.unwrap_or(Command::Serve(Box::default())) {
        Command::Serve(args) => match tokio::runtime::Runtime::new() {
            Ok(runtime) => {
                let code = runtime.block_on(cli::serve::run(&args));
                // A reload blocked on a slow file system must not hold the
                // process open after the drain.
                runtime.shutdown_timeout(std::time::Duration::from_secs(1));
                code
            }
            Err(error) => {
                eprintln!("error: cannot start the async runtime: {error}");
                cli::exit::FAILURE
            }
        },
        Command::Validate(args) => cli::validate::run(&args),
        Command::Check(args) => cli::check::run(&args),
        Command::Test(args) => cli::test::run(&args),
        Command::Fmt(args) => cli::fmt::run(&args),
        Command::Tail(args) => cli::tail::run(&args),
    };
    ExitCode::from(code)
}
