//! `arbiter check`: answers one request locally, with no server, from the
//! same loader and engine the server uses. Exit 0 on allow, 2 on deny.

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
}

/// Splits `Type::"id"` into its type and unescaped id.
pub fn split_uid(text: &str) -> Option<(&str, String)> {
    let (type_name, quoted) = text.rsplit_once("::\"")?;
    let id = quoted.strip_suffix('"')?;
    let id: String = serde_json::from_str(&format!("\"{id}\"")).ok()?;
    Some((type_name, id))
}

pub fn run(args: &CheckArgs) -> u8 {
    let snapshot = match loader::load(&args.sources.sources(), args.sources.options()) {
        Ok((snapshot, _)) => snapshot,
        Err(error) => {
            eprint!("{}", error.render());
            return exit::INVALID;
        }
    };
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
                return exit::FAILURE;
            }
        },
        None => String::new(),
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
        entities_json: &entities_json,
    };
    let engine = Engine::new();
    match engine.check_against(&snapshot, &input) {
        Ok(decision) => {
            let verdict = if decision.allowed { "ALLOW" } else { "DENY" };
            println!("{verdict}");
            println!("reasons: {:?}", decision.reasons);
            for error in &decision.errors {
                println!("error in {}: {}", error.policy_id, error.message);
            }
            if decision.allowed {
                exit::OK
            } else {
                exit::DENY
            }
        }
        Err(error) => {
            eprintln!("error: {error}");
            exit::USAGE
        }
    }
}
