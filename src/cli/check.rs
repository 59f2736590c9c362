//! `arbiter check`: answers one request locally, from the same loader and
//! engine the server uses, or asks a running server over gRPC with
//! `--server`. Exit 0 on allow, 2 on deny. `--explain` also says why:
//! the determining, erroring and near-miss policies.

use std::path::PathBuf;

use super::{SourceArgs, exit};
use crate::engine::{
    CheckInput, Engine, ExplainedPolicy, Explanation, PolicyEffect, PolicyEvaluationError,
    UidInput, loader,
};

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
    /// Also explain the decision: the policies that determined it, those
    /// that errored, and for a deny the policies whose scope matched but
    /// whose conditions were false and the permits a forbid overrode.
    #[arg(long)]
    pub explain: bool,
}

/// What either way of checking answers.
struct Answer {
    allowed: bool,
    reasons: Vec<String>,
    errors: Vec<(String, String)>,
    explanation: Option<Explanation>,
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
        Some(url) => ask_server(url, &uids, &args.context, &entities_json, args.explain),
        None => evaluate_locally(args, &uids, &entities_json),
    };
    match answer {
        Ok(answer) => {
            println!("{}", if answer.allowed { "ALLOW" } else { "DENY" });
            println!("reasons: {:?}", answer.reasons);
            for (policy_id, message) in &answer.errors {
                println!("error in {policy_id}: {message}");
            }
            if let Some(explanation) = &answer.explanation {
                print!("{}", render_explanation(explanation));
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
    let engine = Engine::new();
    let outcome = if args.explain {
        engine
            .explain_against(&snapshot, &input)
            .map(|(decision, explanation)| (decision, Some(explanation)))
    } else {
        engine
            .check_against(&snapshot, &input)
            .map(|decision| (decision, None))
    };
    match outcome {
        Ok((decision, explanation)) => Ok(Answer {
            allowed: decision.allowed,
            reasons: decision.reasons,
            errors: decision
                .errors
                .into_iter()
                .map(|error| (error.policy_id, error.message))
                .collect(),
            explanation,
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
    explain: bool,
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
        explain,
        ..pb::CheckRequest::default()
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
                    explanation: response.explanation.map(from_wire),
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

/// The explanation as the server sent it.
fn from_wire(explanation: crate::proto::v1::Explanation) -> Explanation {
    use crate::proto::v1 as pb;
    Explanation {
        determining: explanation.determining,
        errors: explanation
            .errors
            .into_iter()
            .map(|error| PolicyEvaluationError {
                policy_id: error.policy_id,
                message: error.message,
            })
            .collect(),
        conditions_false: explanation
            .conditions_false
            .into_iter()
            .map(|policy| ExplainedPolicy {
                effect: if policy.effect() == pb::Effect::Forbid {
                    PolicyEffect::Forbid
                } else {
                    PolicyEffect::Permit
                },
                policy_id: policy.policy_id,
            })
            .collect(),
        overridden_permits: explanation.overridden_permits,
    }
}

/// The `explain:` block `check --explain` prints, the same locally and
/// from a server.
pub fn render_explanation(explanation: &Explanation) -> String {
    fn list<'a>(items: impl Iterator<Item = &'a str>) -> String {
        let items: Vec<&str> = items.collect();
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    }
    let mut out = String::from("explain:\n");
    out.push_str(&format!(
        "  determining: {}\n",
        list(explanation.determining.iter().map(String::as_str))
    ));
    out.push_str(&format!(
        "  errored: {}\n",
        list(
            explanation
                .errors
                .iter()
                .map(|error| error.policy_id.as_str())
        )
    ));
    let near: Vec<String> = explanation
        .conditions_false
        .iter()
        .map(|policy| {
            let effect = match policy.effect {
                PolicyEffect::Permit => "permit",
                PolicyEffect::Forbid => "forbid",
            };
            format!("{effect} {}", policy.policy_id)
        })
        .collect();
    out.push_str(&format!(
        "  scope matched, conditions false: {}\n",
        list(near.iter().map(String::as_str))
    ));
    out.push_str(&format!(
        "  permits overridden: {}\n",
        list(explanation.overridden_permits.iter().map(String::as_str))
    ));
    out
}
