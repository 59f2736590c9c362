//! Template links: the Cedar CLI's file of template-linked policies, a JSON
//! array of `{"template_id": "t", "link_id": "l", "args": {"?principal":
//! "Type::\"id\"", "?resource": "Type::\"id\""}}`.
//!
//! Every entry is checked before any is added, and each problem names the
//! file, the entry's index and the field, so a bad file never half-loads. A
//! link's id is its policy id (in `reasons` and decision logs), so it may not
//! clash with a policy, a template or another link.

use std::collections::HashMap;
use std::str::FromStr;

use cedar_policy::{EntityUid, PolicyId, PolicySet, SlotId};

use super::error::LoadDiagnostic;

/// One link, checked for form (not yet against the templates).
#[derive(Debug, Clone)]
pub struct Link {
    /// Position in its file, for diagnostics.
    pub index: usize,
    pub template_id: String,
    pub link_id: String,
    pub values: HashMap<SlotId, EntityUid>,
}

fn problem(file: &str, message: String) -> LoadDiagnostic {
    LoadDiagnostic {
        file: file.to_owned(),
        location: None,
        rendered: message.clone(),
        message,
    }
}

/// Parses a links file's text.
pub fn parse(file: &str, text: &str) -> Result<Vec<Link>, Vec<LoadDiagnostic>> {
    let items: Vec<serde_json::Value> = match serde_json::from_str(text) {
        Ok(serde_json::Value::Array(items)) => items,
        Ok(_) => {
            return Err(vec![problem(
                file,
                "template links must be a JSON array of {\"template_id\", \"link_id\", \"args\"} \
                 objects"
                    .to_owned(),
            )]);
        }
        Err(error) => {
            let mut diagnostic = problem(file, format!("malformed template links: {error}"));
            diagnostic.location = Some((error.line(), error.column().max(1)));
            return Err(vec![diagnostic]);
        }
    };
    parse_values(file, &items)
}

/// Checks the form of already-parsed entries (a fixture file's inline links).
pub fn parse_values(
    file: &str,
    items: &[serde_json::Value],
) -> Result<Vec<Link>, Vec<LoadDiagnostic>> {
    let mut links = Vec::with_capacity(items.len());
    let mut diagnostics = Vec::new();
    for (index, item) in items.iter().enumerate() {
        match parse_entry(item) {
            Ok((template_id, link_id, values)) => links.push(Link {
                index,
                template_id,
                link_id,
                values,
            }),
            Err(message) => diagnostics.push(problem(file, format!("entry {index}: {message}"))),
        }
    }
    if diagnostics.is_empty() {
        Ok(links)
    } else {
        Err(diagnostics)
    }
}

type Entry = (String, String, HashMap<SlotId, EntityUid>);

fn parse_entry(item: &serde_json::Value) -> Result<Entry, String> {
    let Some(object) = item.as_object() else {
        return Err("not an object with `template_id`, `link_id` and `args`".to_owned());
    };
    if let Some(unknown) = object
        .keys()
        .find(|key| !matches!(key.as_str(), "template_id" | "link_id" | "args"))
    {
        return Err(format!(
            "unknown field `{unknown}` (expected `template_id`, `link_id`, `args`)"
        ));
    }
    let text_field = |name: &str| -> Result<String, String> {
        match object.get(name) {
            Some(serde_json::Value::String(text)) if !text.is_empty() => Ok(text.clone()),
            Some(serde_json::Value::String(_)) => Err(format!("`{name}` is empty")),
            Some(_) => Err(format!("`{name}` is not a string")),
            None => Err(format!("`{name}` is missing")),
        }
    };
    let template_id = text_field("template_id")?;
    let link_id = text_field("link_id")?;
    let args = match object.get("args") {
        Some(serde_json::Value::Object(args)) => args,
        Some(_) => return Err("`args` is not an object".to_owned()),
        None => return Err("`args` is missing".to_owned()),
    };
    let mut values = HashMap::new();
    for (key, value) in args {
        let slot = match key.as_str() {
            "?principal" => SlotId::principal(),
            "?resource" => SlotId::resource(),
            _ => {
                return Err(format!(
                    "`args.{key}` is not a slot (`?principal` or `?resource`)"
                ));
            }
        };
        let Some(text) = value.as_str() else {
            return Err(format!("`args.{key}` is not a string like `Type::\"id\"`"));
        };
        let uid = EntityUid::from_str(text).map_err(|error| {
            format!(
                "`args.{key}`: `{}` is not an entity uid like `Type::\"id\"`: {error}",
                super::error::bounded(text, 200)
            )
        })?;
        values.insert(slot, uid);
    }
    Ok((template_id, link_id, values))
}

/// Links every entry into `set`. `owner` names where an id already in `set`
/// came from, to say what a link id clashes with. On any problem the set is
/// left as it was and every problem is returned.
pub fn apply(
    set: &mut PolicySet,
    file: &str,
    links: &[Link],
    owner: impl Fn(&str) -> Option<String>,
) -> Result<(), Vec<LoadDiagnostic>> {
    let mut diagnostics = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(links.len());
    let mut linked = Vec::new();
    for link in links {
        let at = |message: String| problem(file, format!("entry {}: {message}", link.index));
        if let Some(previous) = seen.insert(&link.link_id, link.index) {
            diagnostics.push(at(format!(
                "`link_id`: duplicate link id `{}` (also entry {previous})",
                link.link_id
            )));
            continue;
        }
        let link_id = PolicyId::new(&link.link_id);
        if set.policy(&link_id).is_some() || set.template(&link_id).is_some() {
            let other = owner(&link.link_id).unwrap_or_else(|| "the policy set".to_owned());
            diagnostics.push(at(format!(
                "`link_id`: `{}` is already a policy or template id (in {other})",
                link.link_id
            )));
            continue;
        }
        let template_id = PolicyId::new(&link.template_id);
        let Some(template) = set.template(&template_id) else {
            let what = if set.policy(&template_id).is_some() {
                "is a static policy, not a template"
            } else {
                "names no template"
            };
            diagnostics.push(at(format!("`template_id`: `{}` {what}", link.template_id)));
            continue;
        };
        let slots: Vec<SlotId> = template.slots().cloned().collect();
        let slot_names = || {
            let names: Vec<String> = slots.iter().map(ToString::to_string).collect();
            if names.is_empty() {
                "no slots".to_owned()
            } else {
                names.join(", ")
            }
        };
        let mut bad_slots = false;
        for slot in &slots {
            if !link.values.contains_key(slot) {
                diagnostics.push(at(format!(
                    "`args`: no value for `{slot}` (template `{}` has {})",
                    link.template_id,
                    slot_names()
                )));
                bad_slots = true;
            }
        }
        for slot in link.values.keys() {
            if !slots.contains(slot) {
                diagnostics.push(at(format!(
                    "`args.{slot}`: template `{}` has no such slot (it has {})",
                    link.template_id,
                    slot_names()
                )));
                bad_slots = true;
            }
        }
        if bad_slots {
            continue;
        }
        match set.link(template_id, link_id.clone(), link.values.clone()) {
            Ok(()) => linked.push(link_id),
            Err(error) => diagnostics.push(at(error.to_string())),
        }
    }
    if diagnostics.is_empty() {
        return Ok(());
    }
    // Nothing half-loads: take back the links already added.
    for id in linked {
        let _ = set.unlink(id);
    }
    Err(diagnostics)
}
