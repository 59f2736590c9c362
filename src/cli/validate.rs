//! `arbiter validate`: loads policies, schema and entities exactly as the
//! server would and prints every diagnostic with file, line and column.

use super::{SourceArgs, exit};
use crate::engine::loader;

pub fn run(args: &SourceArgs) -> u8 {
    match loader::load(&args.sources(), args.options()) {
        Ok((snapshot, report)) => {
            for warning in &report.warnings {
                eprintln!("warning: {warning}");
                if warning.rendered != warning.message {
                    eprintln!("{}", warning.rendered);
                }
            }
            println!(
                "ok: {} policies, {} entities{} (policy revision {})",
                snapshot.policies.policy_count(),
                snapshot.data.len(),
                if snapshot.policies.schema.is_some() {
                    ", validated against the schema"
                } else {
                    ", no schema"
                },
                snapshot.policies.revision
            );
            exit::OK
        }
        Err(error) => {
            eprint!("{}", error.render());
            eprintln!("error: {} problem(s) found", error.diagnostics.len());
            exit::INVALID
        }
    }
}
