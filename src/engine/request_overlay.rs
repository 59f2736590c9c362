//! A request's own entities (`entities_json`): bounded and measured before
//! Cedar parses them, then combined with the stored data as the operator
//! chose (`request_entities`).
//!
//! Why a choice and not a merge: the stored data is the identity store's
//! word on who a user is. A caller that could replace it could give itself
//! a role, un-suspend a user or move a user to another tenant (each of these
//! turned a deny into an allow before `add` became the default).

use cedar_policy::{Entities, Entity, EntityUid, Schema};
use serde_json::Value;

use super::error::{RequestError, RequestField};
use super::hierarchy;
pub use super::options::{
    DEFAULT_HEAVY_QUEUE, DEFAULT_MAX_REQUEST_ANCESTORS, DEFAULT_MAX_REQUEST_ENTITIES,
    MAX_REQUEST_ENTITIES_CEILING, RequestEntitiesMode, RequestLimits, default_heavy_workers,
};
use super::snapshot::{EntityData, PolicySnapshot};

/// Parses `entities_json` within `limits`: counted and its hierarchy
/// measured on the JSON, before Cedar computes anything over it. Returns
/// the entities and the uids the request supplied, in its order.
pub(crate) fn parse(
    json: &str,
    schema: Option<&Schema>,
    limits: &RequestLimits,
) -> Result<(Entities, Vec<EntityUid>), RequestError> {
    let value: Value = serde_json::from_str(json)
        .map_err(|error| RequestError::invalid_because(RequestField::Entities, &error))?;
    let items = value.as_array().ok_or_else(|| {
        RequestError::invalid(RequestField::Entities, "must be a JSON array of entities")
    })?;
    if items.len() > limits.max_request_entities {
        return Err(RequestError::invalid(
            RequestField::Entities,
            format!(
                "holds {} entities; at most {} are allowed (`max_request_entities`)",
                items.len(),
                limits.max_request_entities
            ),
        ));
    }
    let (nodes, parents) =
        graph(items).map_err(|message| RequestError::invalid(RequestField::Entities, message))?;
    hierarchy::check(
        &nodes,
        |at| parents[at].iter(),
        |_| 0,
        limits.max_hierarchy_depth,
    )
    .map_err(|error| RequestError::invalid(RequestField::Entities, error))?;
    hierarchy::check_closure(
        &nodes,
        |at| parents[at].iter(),
        limits.max_request_ancestors,
    )
    .map_err(|error| RequestError::invalid(RequestField::Entities, error))?;
    let entities = Entities::from_json_value(value, schema)
        .map_err(|error| RequestError::invalid_because(RequestField::Entities, &error))?;
    Ok((entities, nodes))
}

/// Every entity's uid and parents, as written in a Cedar entities JSON
/// array. A uid or parent in a form this does not read is refused rather
/// than left unmeasured.
pub(crate) fn graph(items: &[Value]) -> Result<(Vec<EntityUid>, Vec<Vec<EntityUid>>), String> {
    let mut nodes = Vec::with_capacity(items.len());
    let mut parents = Vec::with_capacity(items.len());
    for (at, item) in items.iter().enumerate() {
        let uid = item.get("uid").and_then(json_uid).ok_or_else(|| {
            format!("entity [{at}]: `uid` must be {{\"type\": ..., \"id\": ...}}")
        })?;
        let listed = match item.get("parents") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(listed)) => listed
                .iter()
                .enumerate()
                .map(|(index, parent)| {
                    json_uid(parent).ok_or_else(|| {
                        format!(
                            "entity [{at}] `{uid}`: `parents[{index}]` must be {{\"type\": ..., \"id\": ...}}"
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(format!("entity [{at}] `{uid}`: `parents` must be an array")),
        };
        nodes.push(uid);
        parents.push(listed);
    }
    Ok((nodes, parents))
}

/// A uid in any of the forms Cedar's entity JSON takes:
/// `{"type": T, "id": I}`, `{"__entity": {...}}`, or `"T::\"I\""`.
fn json_uid(value: &Value) -> Option<EntityUid> {
    match value {
        Value::Object(fields) => {
            if let Some(inner) = fields.get("__entity") {
                return json_uid(inner);
            }
            let type_name = fields.get("type")?.as_str()?.parse().ok()?;
            let id = fields.get("id")?.as_str()?;
            Some(EntityUid::from_type_name_and_id(
                type_name,
                cedar_policy::EntityId::new(id),
            ))
        }
        Value::String(text) => text.parse().ok(),
        _ => None,
    }
}

/// The request's entities combined with the stored data as `mode` says.
/// `supplied` are the uids the request wrote (Cedar adds the schema's
/// action entities to what it parses: those are not the request's).
pub(crate) fn apply_mode(
    mode: RequestEntitiesMode,
    overlay: Entities,
    supplied: &[EntityUid],
    data: &EntityData,
    policies: &PolicySnapshot,
    principal: &EntityUid,
    schema: Option<&Schema>,
) -> Result<Entities, RequestError> {
    match mode {
        RequestEntitiesMode::Replace => Ok(overlay),
        RequestEntitiesMode::Add => {
            for uid in supplied {
                if is_action(policies, uid) {
                    return Err(refused(uid, "is an action; actions come from the schema"));
                }
                if uid == principal {
                    return Err(refused(
                        uid,
                        "is the request's principal, which comes from the identity store",
                    ));
                }
                if data.contains(uid) {
                    return Err(refused(uid, "is held by the identity store"));
                }
            }
            Ok(overlay)
        }
        RequestEntitiesMode::Merge => {
            if let Some(action) = supplied.iter().find(|uid| is_action(policies, uid)) {
                return Err(RequestError::invalid(
                    RequestField::Entities,
                    format!("entity `{action}` is an action; actions come from the schema"),
                ));
            }
            let mut merged = Vec::with_capacity(overlay.len());
            for entity in overlay.iter() {
                let uid = entity.uid();
                let stored = if supplied.contains(&uid) {
                    data.get(&uid).map_err(|error| {
                        RequestError::Internal(format!("stored entity `{uid}`: {error}"))
                    })?
                } else {
                    None
                };
                merged.push(match stored {
                    Some(stored) => fill_in(&stored, entity, schema)?,
                    None => entity.clone(),
                });
            }
            Entities::from_entities(merged, None)
                .map_err(|error| RequestError::invalid(RequestField::Entities, error))
        }
    }
}

/// An action the schema declares, or any entity of an action type
/// (`Action`, `Ns::Action`): without a schema, synced data has no actions,
/// and a request that made up an action group could put an action in it.
fn is_action(policies: &PolicySnapshot, uid: &EntityUid) -> bool {
    uid.type_name().basename() == "Action" || policies.is_action(uid)
}

fn refused(uid: &EntityUid, why: &str) -> RequestError {
    RequestError::invalid(
        RequestField::Entities,
        format!(
            "entity `{uid}` {why}: a request may only add entities the store does not hold (`request_entities = \"add\"`)"
        ),
    )
}

/// The stored entity with the attributes and tags it lacks taken from the
/// request's copy, and the request's parents added to its own.
fn fill_in(
    stored: &Entity,
    request: &Entity,
    schema: Option<&Schema>,
) -> Result<Entity, RequestError> {
    let uid = stored.uid();
    let as_json = |entity: &Entity| {
        entity.to_json_value().map_err(|error| {
            RequestError::invalid(RequestField::Entities, format!("entity `{uid}`: {error}"))
        })
    };
    let mut merged = as_json(stored)?;
    let request = as_json(request)?;
    for (field, fill) in [("attrs", true), ("tags", true), ("parents", false)] {
        let Some(given) = request.get(field) else {
            continue;
        };
        let Some(object) = merged.as_object_mut() else {
            continue;
        };
        let target = object.entry(field).or_insert_with(|| given.clone());
        match (target, given, fill) {
            (Value::Object(have), Value::Object(given), true) => {
                for (name, value) in given {
                    have.entry(name.clone()).or_insert_with(|| value.clone());
                }
            }
            (Value::Array(have), Value::Array(given), false) => {
                for parent in given {
                    if !have.contains(parent) {
                        have.push(parent.clone());
                    }
                }
            }
            _ => {}
        }
    }
    Entity::from_json_value(merged, schema).map_err(|error| {
        RequestError::invalid(
            RequestField::Entities,
            format!("entity `{uid}` with request data: {error}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> String {
        let items: Vec<Value> = (0..n)
            .map(|i| {
                let parents = if i + 1 < n {
                    serde_json::json!([{"type": "G", "id": format!("g{}", i + 1)}])
                } else {
                    serde_json::json!([])
                };
                serde_json::json!({"uid": {"type": "G", "id": format!("g{i}")}, "attrs": {}, "parents": parents})
            })
            .collect();
        Value::Array(items).to_string()
    }

    #[test]
    fn long_chains_are_refused_before_cedar_sees_them() {
        let limits = RequestLimits {
            max_request_entities: 100_000,
            max_hierarchy_depth: 32,
            ..RequestLimits::default()
        };
        assert!(parse(&chain(33), None, &limits).is_ok());
        for n in [34, 4_000, 30_000] {
            let error = parse(&chain(n), None, &limits).unwrap_err().to_string();
            assert!(
                error.contains("`max_hierarchy_depth` is 32"),
                "{n}: {error}"
            );
            assert!(error.contains("`entities_json`"), "{error}");
        }
    }

    #[test]
    fn a_wide_closure_is_refused_within_the_depth_limit() {
        // 4 layers of 10, each a child of the whole layer above: 10 * (30 +
        // 20 + 10) = 600 pairs.
        let items: Vec<Value> = (0..4)
            .flat_map(|layer| {
                (0..10).map(move |i| {
                    let parents: Vec<Value> = if layer < 3 {
                        (0..10)
                            .map(|j| serde_json::json!({"type": "G", "id": format!("{}-{j}", layer + 1)}))
                            .collect()
                    } else {
                        vec![]
                    };
                    serde_json::json!({"uid": {"type": "G", "id": format!("{layer}-{i}")}, "attrs": {}, "parents": parents})
                })
            })
            .collect();
        let json = Value::Array(items).to_string();
        let limits = |max| RequestLimits {
            max_request_ancestors: max,
            ..RequestLimits::default()
        };
        assert!(parse(&json, None, &limits(600)).is_ok());
        let error = parse(&json, None, &limits(599)).unwrap_err().to_string();
        assert!(error.contains("`max_request_ancestors` is 599"), "{error}");
    }

    #[test]
    fn too_many_entities_are_refused_by_count() {
        let limits = RequestLimits {
            max_request_entities: 10,
            max_hierarchy_depth: 32,
            ..RequestLimits::default()
        };
        let error = parse(&chain(11), None, &limits).unwrap_err().to_string();
        assert!(error.contains("holds 11 entities; at most 10"), "{error}");
    }

    #[test]
    fn every_uid_form_is_read_and_others_are_refused() {
        let items: Vec<Value> = serde_json::from_str(
            r#"[{"uid": {"__entity": {"type": "G", "id": "a"}}, "parents": ["G::\"b\""]},
                {"uid": "G::\"b\"", "parents": [{"type": "G", "id": "c"}]}]"#,
        )
        .unwrap();
        let (nodes, parents) = graph(&items).unwrap();
        assert_eq!(nodes[0].to_string(), r#"G::"a""#);
        assert_eq!(parents[0][0].to_string(), r#"G::"b""#);
        assert_eq!(parents[1][0].to_string(), r#"G::"c""#);
        let odd: Vec<Value> =
            serde_json::from_str(r#"[{"uid": {"type": "G"}, "parents": []}]"#).unwrap();
        assert!(graph(&odd).unwrap_err().contains("entity [0]"));
        let odd: Vec<Value> =
            serde_json::from_str(r#"[{"uid": {"type": "G", "id": "a"}, "parents": [7]}]"#).unwrap();
        assert!(graph(&odd).unwrap_err().contains("`parents[0]`"));
    }

    #[test]
    fn without_a_schema_any_entity_of_an_action_type_is_refused_under_add_and_merge() {
        use std::sync::Arc;
        let policies = PolicySnapshot::new(
            cedar_policy::PolicySet::new(),
            None,
            Arc::from("p"),
            super::super::LoadOptions::default(),
        );
        let data = EntityData::new(Entities::empty(), Arc::from("d"));
        let json = r#"[{"uid": {"type": "Ns::Action", "id": "delete"}, "attrs": {},
                        "parents": [{"type": "Ns::Action", "id": "admin_actions"}]}]"#;
        let principal: EntityUid = r#"Ns::User::"u""#.parse().unwrap();
        for mode in [RequestEntitiesMode::Add, RequestEntitiesMode::Merge] {
            let (overlay, supplied) = parse(json, None, &RequestLimits::default()).unwrap();
            let error = apply_mode(mode, overlay, &supplied, &data, &policies, &principal, None)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(r#"Ns::Action::"delete""#),
                "{mode:?}: {error}"
            );
        }
        let (overlay, supplied) = parse(json, None, &RequestLimits::default()).unwrap();
        let replaced = apply_mode(
            RequestEntitiesMode::Replace,
            overlay,
            &supplied,
            &data,
            &policies,
            &principal,
            None,
        );
        assert!(replaced.is_ok());
    }

    #[test]
    fn cycles_are_refused() {
        let json = r#"[{"uid": {"type": "G", "id": "a"}, "attrs": {}, "parents": [{"type": "G", "id": "b"}]},
                       {"uid": {"type": "G", "id": "b"}, "attrs": {}, "parents": [{"type": "G", "id": "a"}]}]"#;
        let error = parse(json, None, &RequestLimits::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("cycle"), "{error}");
    }
}
