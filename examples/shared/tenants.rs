//! A multi-tenant policy set, its schema, its entities and its requests, the
//! shape of issue 18: per tenant 2 role policies (`principal in Group`,
//! `resource in Tenant`) and 8 per-document shares (`principal ==`,
//! `resource ==`), plus 3 global guardrails with conditions (a context
//! threshold, cross-tenant writes, the owner). Shared by
//! `benches/policy_index.rs` (in process) and `examples/tenant_load.rs`
//! (files for a server, and its load).
//!
//! The shares can also be emitted as links of one template
//! (`policies_linked`): the same policy ids, the same answers, the shape
//! Amazon Verified Permissions users give per-document sharing.
//!
//! Tenant `t` has users `t<t>-u0` (editor) to `t<t>-u3` (viewers), documents
//! `t<t>-d0` to `t<t>-d7` (document `j` is owned by user `j % 4`), and
//! shares its document `j` with user `j % 4` of the next tenant (read).

#![allow(dead_code)]

use std::fmt::Write as _;

/// Users and documents per tenant.
pub const USERS: usize = 4;
pub const DOCS: usize = 8;
/// Requests concern the first `HOT` tenants.
pub const HOT: usize = 5;
/// Policies per tenant; a set of `tenants` tenants has `10 * tenants + 3`.
pub const PER_TENANT: usize = 10;
pub const GUARDRAILS: usize = 3;

pub const SCHEMA: &str = r#"
entity Tenant;
entity Group;
entity User in [Group] { tenant: Tenant };
entity Doc in [Tenant] { owner: User, tenant: Tenant };
action read, write, delete appliesTo {
  principal: [User],
  resource: [Doc],
  context: { risk: Long, ip: ipaddr, hour: Long }
};
"#;

/// The tenants whose policies make a set of about `policies` policies.
pub fn tenants_for(policies: usize) -> usize {
    (policies.saturating_sub(GUARDRAILS) / PER_TENANT).max(2)
}

/// Cedar text of the policies of `tenants` tenants and the guardrails.
pub fn policies(tenants: usize) -> String {
    policies_with(tenants, false).0
}

/// The same set with every per-document share a link of the template
/// `share`: the policy text (roles, guardrails, the template) and the links
/// file (the Cedar CLI's format). Link ids are the static shares' ids.
pub fn policies_linked(tenants: usize) -> (String, String) {
    policies_with(tenants, true)
}

fn policies_with(tenants: usize, linked: bool) -> (String, String) {
    let mut links = String::with_capacity(if linked { tenants * DOCS * 130 } else { 2 });
    links.push('[');
    let mut out = String::with_capacity(tenants * PER_TENANT * 140 + 600);
    out.push_str(
        "@id(\"guard-risk\")\n\
         forbid (principal, action, resource) when { context.risk > 80 };\n\
         @id(\"guard-cross-tenant\")\n\
         forbid (principal, action in [Action::\"write\", Action::\"delete\"], resource)\n  \
         when { principal.tenant != resource.tenant };\n\
         @id(\"guard-owner\")\n\
         permit (principal, action == Action::\"delete\", resource) when { resource.owner == principal };\n",
    );
    if linked {
        out.push_str(
            "@id(\"share\")\n\
             permit (principal == ?principal, action == Action::\"read\", resource == ?resource);\n",
        );
    }
    for t in 0..tenants {
        let next = (t + 1) % tenants;
        let _ = write!(
            out,
            "@id(\"t{t}-viewers\")\n\
             permit (principal in Group::\"t{t}-viewers\", action == Action::\"read\", resource in Tenant::\"t{t}\");\n\
             @id(\"t{t}-editors\")\n\
             permit (principal in Group::\"t{t}-editors\", action in [Action::\"read\", Action::\"write\"], resource in Tenant::\"t{t}\");\n"
        );
        for j in 0..DOCS {
            let u = j % USERS;
            if linked {
                if links.len() > 1 {
                    links.push(',');
                }
                let _ = write!(
                    links,
                    r#"{{"template_id":"share","link_id":"t{t}-share{j}","args":{{"?principal":"User::\"t{next}-u{u}\"","?resource":"Doc::\"t{t}-d{j}\""}}}}"#
                );
            } else {
                let _ = writeln!(
                    out,
                    "@id(\"t{t}-share{j}\")\n\
                     permit (principal == User::\"t{next}-u{u}\", action == Action::\"read\", resource == Doc::\"t{t}-d{j}\");"
                );
            }
        }
    }
    links.push(']');
    (out, links)
}

/// Entities JSON of `tenants` tenants (their groups, users and documents).
pub fn entities(tenants: usize) -> String {
    let mut out = String::with_capacity(tenants * (USERS + DOCS + 3) * 160);
    out.push('[');
    let mut first = true;
    let mut entity = |out: &mut String, text: std::fmt::Arguments<'_>| {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = out.write_fmt(text);
    };
    for t in 0..tenants {
        entity(
            &mut out,
            format_args!(r#"{{"uid":{{"type":"Tenant","id":"t{t}"}},"attrs":{{}},"parents":[]}}"#),
        );
        for role in ["editors", "viewers"] {
            entity(
                &mut out,
                format_args!(
                    r#"{{"uid":{{"type":"Group","id":"t{t}-{role}"}},"attrs":{{}},"parents":[]}}"#
                ),
            );
        }
        for u in 0..USERS {
            let role = if u == 0 { "editors" } else { "viewers" };
            entity(
                &mut out,
                format_args!(
                    r#"{{"uid":{{"type":"User","id":"t{t}-u{u}"}},"attrs":{{"tenant":{{"__entity":{{"type":"Tenant","id":"t{t}"}}}}}},"parents":[{{"type":"Group","id":"t{t}-{role}"}}]}}"#
                ),
            );
        }
        for j in 0..DOCS {
            entity(
                &mut out,
                format_args!(
                    r#"{{"uid":{{"type":"Doc","id":"t{t}-d{j}"}},"attrs":{{"owner":{{"__entity":{{"type":"User","id":"t{t}-u{u}"}}}},"tenant":{{"__entity":{{"type":"Tenant","id":"t{t}"}}}}}},"parents":[{{"type":"Tenant","id":"t{t}"}}]}}"#,
                    u = j % USERS
                ),
            );
        }
    }
    out.push(']');
    out
}

/// One request and the answer the policies give it.
#[derive(Debug, Clone)]
pub struct TenantRequest {
    pub principal: String,
    pub action: &'static str,
    pub resource: String,
    pub context: String,
    pub allowed: bool,
}

/// splitmix64: the same requests on every run and both sides.
pub fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn below(state: &mut u64, n: usize) -> usize {
    (next(state) % n as u64) as usize
}

/// A request on a hot tenant (one of the first `HOT`, and not the last of
/// `tenants`: shares go to the next tenant's users), with a varied context.
pub fn request(state: &mut u64, tenants: usize) -> TenantRequest {
    let t = below(state, HOT.min(tenants.saturating_sub(1)).max(1));
    let j = below(state, DOCS);
    let risk = below(state, 100);
    let context = format!(
        r#"{{"risk":{risk},"ip":"10.{}.{}.{}","hour":{}}}"#,
        below(state, 256),
        below(state, 256),
        below(state, 256),
        below(state, 24)
    );
    let calm = risk <= 80;
    let resource = format!("t{t}-d{j}");
    let owner = j % USERS;
    let (principal, action, allowed) = match below(state, 10) {
        // A member of the tenant: viewers read, the editor reads and
        // writes, the owner deletes.
        0..=6 => {
            let u = below(state, USERS);
            let (action, allowed) = match below(state, 3) {
                0 => ("read", true),
                1 => ("write", u == 0),
                _ => ("delete", u == owner),
            };
            (format!("t{t}-u{u}"), action, allowed && calm)
        }
        // The next tenant's user the document is shared with.
        7 | 8 => (format!("t{}-u{owner}", t + 1), "read", calm),
        // A write across tenants.
        _ => (format!("t{}-u0", t + 1), "write", false),
    };
    TenantRequest {
        principal,
        action,
        resource,
        context,
        allowed,
    }
}
