//! `arbiter check`: answers one request locally, from the same loader and
//! engine the server uses, or asks a running server over gRPC with
//! `--server`. Exit 0 on allow, 2 on deny.

use std::path::PathBuf;

use super::{SourceArgs, exit};
use crate::engine::{CheckInput, Engine, UidInput, loader};

#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub sources: SourceArgs,
    /// Principal uid, as `Type::"id"` (e.g. `Saas::User::"alice"`).
    #[arg(long)]
    pub principal: String,
    /// Action uid, as `Type::"id"` (e.g. `Saas::Action::"read"`).
    #[arg(long)]
    pub action: String,
    /// Resource uid, as `Type::"id"`.
    #[arg(long)]
    pub resource: String,
    /// Cedar JSON context object.
    #[arg(long, default_value = "")]
    pub context: String,
    /// Extra entities (Cedar entities JSON array) in a file, for this check only.
    #[arg(long, value_name = "FILE")]
    pub request_entities: Option<PathBuf>,
    /// Ask a running server (e.g. `http://127.0.0.1:50051`) instead of
    /// evaluating locally.
    #[arg(long, value_name = "URL", conflicts_with_all = ["policies", "schema", "entities", "no_validate"])]
    pub server: Option<String>,
}

/// What either way of checking answers.
struct Answer {
    allowed: bool,
    reasons: Vec<String>,
    errors: Vec<(String, String)>,
}

/// Splits `Type::"id"` into its type and unescaped id (shared with fixtures).
pub use crate::fixtures::split_uid;

pub fn run(args: &CheckArgs) -> u8 {
    let mut uids = Vec::new();
    for (flag, text) in [
        ("--principal", &args.principal),
        ("--action", &args.action),
        ("--resource", &args.resource),
    ] {
        match split_uid(text) {
            Some(uid) => uids.push(uid),
            None => {
                eprintln!("error: {flag} `{text}` is not an entity uid like `Type::\"id\"`");
                return exit::USAGE;
            }
        }
    }
    let entities_json = match &args.request_entities {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) => {
                eprintln!("error: cannot read `{}`: {error}", path.display());
                return exit::USAGE;
            }
        },
        None => String::new(),
    };
    let answer = match &args.server {
        Some(url) => ask_server(url, &uids, &args.context, &entities_json),
        None => evaluate_locally(args, &uids, &entities_json),
    };
    match answer {
        Ok(answer) => {
            println!("{}", if answer.allowed { "ALLOW" } else { "DENY" });
            println!("reasons: {:?}", answer.reasons);
            for (policy_id, message) in &answer.errors {
                println!("error in {policy_id}: {message}");
            }
            if answer.allowed { exit::OK } else { exit::DENY }
        }
        Err(code) => code,
    }
}

fn evaluate_locally(
    args: &CheckArgs,
    uids: &[(&str, String)],
    entities_json: &str,
) -> Result<Answer, u8> {
    let snapshot = match loader::load(&args.sources.sources(), args.sources.options()) {
        Ok((snapshot, _)) => snapshot,
        Err(error) => {
            eprint!("{}", error.render());
            return Err(exit::INVALID);
        }
    };
    let uid = |index: usize| {
        uids.get(index).map(|(type_name, id)| UidInput {
            type_name,
            id: id.as_str(),
        })
    };
    let input = CheckInput {
        principal: uid(0),
        action: uid(1),
        resource: uid(2),
        context_json: &args.context,
        entities_json,
    };
    match Engine::new().check_against(&snapshot, &input) {
        Ok(decision) => Ok(Answer {
            allowed: decision.allowed,
            reasons: decision.reasons,
            errors: decision
                .errors
                .into_iter()
                .map(|error| (error.policy_id, error.message))
                .collect(),
        }),
        Err(error) => {
            eprintln!("error: {error}");
            Err(exit::USAGE)
        }
    }
}

fn ask_server(
    url: &str,
    uids: &[(&str, String)],
    context: &str,
    entities_json: &str,
) -> Result<Answer, u8> {
    use crate::proto::v1 as pb;
    let uid = |index: usize| {
        uids.get(index).map(|(type_name, id)| pb::EntityUid {
            r#type: (*type_name).to_owned(),
            id: id.clone(),
        })
    };
    let request = pb::CheckRequest {
        principal: uid(0),
        action: uid(1),
        resource: uid(2),
        context_json: context.to_owned(),
        entities_json: entities_json.to_owned(),
        min_data_revision: String::new(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            eprintln!("error: cannot start the async runtime: {error}");
            exit::FAILURE
        })?;
    runtime.block_on(async {
        let endpoint =
            tonic::transport::Endpoint::from_shared(url.to_owned()).map_err(|error| {
                eprintln!("error: `{url}` is not a server URL: {error}");
                exit::USAGE
            })?;
        let channel = endpoint
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(10))
            .connect()
            .await
            .map_err(|error| {
                eprintln!("error: cannot connect to `{url}`: {error}");
                exit::FAILURE
            })?;
        let mut client = pb::authorizer_client::AuthorizerClient::new(channel);
        match client.check(request).await {
            Ok(response) => {
                let response = response.into_inner();
                Ok(Answer {
                    allowed: response.decision() == pb::Decision::Allow,
                    reasons: response.reasons,
                    errors: response
                        .errors
                        .into_iter()
                        .map(|error| (error.policy_id, error.message))
                        .collect(),
                })
            }
            Err(status) => {
                eprintln!("error: {:?}: {}", status.code(), status.message());
                Err(if status.code() == tonic::Code::InvalidArgument {
                    exit::USAGE
                } else {
                    exit::FAILURE
                })
            }
        }
    })
}
