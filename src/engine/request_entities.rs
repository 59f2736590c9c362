//! Request-scoped entity data built by an adapter (for example from a
//! verified JWT or a route's captures): attributes and parents merged over
//! the cached copy of an entity for one decision, never stored.
//!
//! Typed rather than a JSON entities array, so an adapter does not need to
//! render and the engine to re-parse a whole entity: only the fields that
//! change travel. The merge happens on the request-scoped slice of the store
//! (see [`EntityData::slice_with_overlay`](super::EntityData::slice_with_overlay)),
//! so the store is never copied or changed.

use std::collections::BTreeMap;

use serde::Serialize;

/// An entity uid by type name and id, owned.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct EntityRef {
    pub type_name: String,
    pub id: String,
}

impl EntityRef {
    pub fn new(type_name: impl Into<String>, id: impl Into<String>) -> Self {
        EntityRef {
            type_name: type_name.into(),
            id: id.into(),
        }
    }
}

/// Attributes and parents to merge over one entity for one decision. With
/// `overwrite`, an attribute replaces the cached attribute of the same name
/// (claims of a verified token are newer than the cache); without it, only
/// attributes the cached entity lacks are added (a URL must not be able to
/// move a stored document to another tenant). Parents are added to the
/// cached parents. An entity that is not cached is created with
/// just these attributes and parents (and must then satisfy the schema).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntityMerge {
    pub uid: EntityRef,
    /// Attribute values in Cedar's JSON entity format (`{"__entity": ...}`,
    /// `{"__extn": ...}`, sets, records, strings, numbers, booleans).
    pub attrs: BTreeMap<String, serde_json::Value>,
    pub parents: Vec<EntityRef>,
    pub overwrite: bool,
}

impl EntityMerge {
    /// A merge whose attributes replace cached ones.
    pub fn new(uid: EntityRef) -> Self {
        EntityMerge {
            uid,
            attrs: BTreeMap::new(),
            parents: Vec::new(),
            overwrite: true,
        }
    }

    /// A merge that only fills in attributes the cached entity lacks.
    pub fn fill_in(uid: EntityRef) -> Self {
        EntityMerge {
            overwrite: false,
            ..Self::new(uid)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.attrs.is_empty() && self.parents.is_empty()
    }
}

/// Everything request-scoped for one decision. Decisions with request
/// entities are cached under a key that includes them, so an answer computed
/// for one set of claims is never served for another.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RequestEntities {
    pub merges: Vec<EntityMerge>,
}

impl RequestEntities {
    pub fn is_empty(&self) -> bool {
        self.merges.iter().all(EntityMerge::is_empty)
    }

    /// A canonical text of the contents (attributes are sorted by name), for
    /// the decision cache key.
    pub(crate) fn canonical(&self) -> Option<String> {
        serde_json::to_string(self).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{CheckInput, Engine, LoadOptions, Sources, UidInput, loader};

    fn engine() -> Engine {
        let engine = Engine::new();
        let (snapshot, _) = loader::load(&Sources::default(), LoadOptions::default()).unwrap();
        engine.publish(snapshot);
        engine
    }

    fn input<'a>(principal: &'a str, action: &'a str) -> CheckInput<'a> {
        CheckInput {
            principal: Some(UidInput {
                type_name: "Saas::User",
                id: principal,
            }),
            action: Some(UidInput {
                type_name: "Saas::Action",
                id: action,
            }),
            resource: Some(UidInput {
                type_name: "Saas::Document",
                id: "acme-roadmap",
            }),
            context_json: r#"{"mfa": true, "source_ip": "10.1.2.3"}"#,
            entities_json: "",
        }
    }

    fn role(id: &str) -> RequestEntities {
        let mut merge = EntityMerge::new(EntityRef::new("Saas::User", "carol"));
        merge.parents.push(EntityRef::new("Saas::Role", id));
        RequestEntities {
            merges: vec![merge],
        }
    }

    #[test]
    fn parents_merge_over_the_cached_principal_and_are_cached_apart() {
        let engine = engine();
        let write = input("carol", "write");
        let plain = engine.check(&write).unwrap();
        assert!(!plain.allowed);
        for _ in 0..2 {
            let editor = engine.check_with(&write, &role("acme/editor")).unwrap();
            assert!(editor.allowed, "{editor:?}");
            assert_eq!(editor.reasons, ["editor-can-write"]);
            let viewer = engine.check_with(&write, &role("acme/viewer")).unwrap();
            assert!(!viewer.allowed);
            assert!(!engine.check(&write).unwrap().allowed);
        }
        // The store was not changed.
        assert!(!engine.check(&write).unwrap().allowed);
    }

    #[test]
    fn attributes_overwrite_or_fill_in() {
        let engine = engine();
        let read = input("carol", "read");
        assert!(engine.check(&read).unwrap().allowed);
        let tenant = serde_json::json!({"__entity": {"type": "Saas::Tenant", "id": "globex"}});
        // Overwrite: carol's tenant becomes globex: tenant isolation denies.
        let mut moved = EntityMerge::new(EntityRef::new("Saas::User", "carol"));
        moved.attrs.insert("tenant".into(), tenant.clone());
        let scope = RequestEntities {
            merges: vec![moved],
        };
        let decision = engine.check_with(&read, &scope).unwrap();
        assert!(!decision.allowed);
        assert_eq!(decision.reasons, ["tenant-isolation"]);
        // Fill in: the document's cached tenant stays.
        let mut fill = EntityMerge::fill_in(EntityRef::new("Saas::Document", "acme-roadmap"));
        fill.attrs.insert("tenant".into(), tenant);
        let scope = RequestEntities { merges: vec![fill] };
        assert!(engine.check_with(&read, &scope).unwrap().allowed);
        // An attribute of the wrong type is refused by the schema.
        let mut bad = EntityMerge::new(EntityRef::new("Saas::User", "carol"));
        bad.attrs
            .insert("clearance".into(), serde_json::json!("high"));
        let scope = RequestEntities { merges: vec![bad] };
        assert!(engine.check_with(&read, &scope).is_err());
    }
}
