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
use std::sync::Arc;

/// An entity uid by type name and id, owned.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
#[derive(Debug, Clone, PartialEq)]
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

/// An [`EntityMerge`] that can no longer change, with its canonical text
/// (the part of the decision cache key it contributes) computed once. An
/// adapter that sees the same merge again (ext_authz: the claims of a cached
/// token) keeps the sealed merge and pays for its key text once.
#[derive(Debug)]
pub struct SealedMerge {
    merge: EntityMerge,
    canonical: Box<str>,
}

impl SealedMerge {
    pub fn merge(&self) -> &EntityMerge {
        &self.merge
    }

    pub fn canonical(&self) -> &str {
        &self.canonical
    }
}

impl EntityMerge {
    /// Freezes the merge and computes its canonical text.
    pub fn seal(self) -> Arc<SealedMerge> {
        let canonical = self.canonical_text().into_boxed_str();
        Arc::new(SealedMerge {
            merge: self,
            canonical,
        })
    }

    /// Length-prefixed fields (uid, mode, attributes in name order with
    /// their JSON values, parents), so no two different merges share a text.
    fn canonical_text(&self) -> String {
        let mut out = String::with_capacity(64);
        push_field(&mut out, &self.uid.type_name);
        push_field(&mut out, &self.uid.id);
        out.push(if self.overwrite { 'o' } else { 'f' });
        push_count(&mut out, self.attrs.len());
        for (name, value) in &self.attrs {
            push_field(&mut out, name);
            push_value(&mut out, value);
        }
        push_count(&mut out, self.parents.len());
        for parent in &self.parents {
            push_field(&mut out, &parent.type_name);
            push_field(&mut out, &parent.id);
        }
        out
    }
}

/// A JSON value, each kind tagged and every string and count
/// length-prefixed: unambiguous, and cheaper than printing it as JSON.
fn push_value(out: &mut String, value: &serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Null => out.push('n'),
        Value::Bool(true) => out.push('t'),
        Value::Bool(false) => out.push('f'),
        Value::Number(number) => {
            out.push('#');
            match (number.as_i64(), number.as_u64()) {
                (Some(n), _) => out.push_str(itoa::Buffer::new().format(n)),
                (None, Some(n)) => out.push_str(itoa::Buffer::new().format(n)),
                _ => out.push_str(&number.to_string()),
            }
            out.push(';');
        }
        Value::String(text) => {
            out.push('s');
            push_field(out, text);
        }
        Value::Array(items) => {
            out.push('a');
            push_count(out, items.len());
            for item in items {
                push_value(out, item);
            }
        }
        Value::Object(fields) => {
            out.push('m');
            push_count(out, fields.len());
            for (name, item) in fields {
                push_field(out, name);
                push_value(out, item);
            }
        }
    }
}

/// `<len>:<text>`.
pub(crate) fn push_field(out: &mut String, text: &str) {
    out.push_str(itoa::Buffer::new().format(text.len()));
    out.push(':');
    out.push_str(text);
}

/// `<count>;`, without the formatting machinery.
fn push_count(out: &mut String, count: usize) {
    out.push_str(itoa::Buffer::new().format(count));
    out.push(';');
}

/// Everything request-scoped for one decision. Decisions with request
/// entities are cached under a key that includes them (the canonical text of
/// every merge), so an answer computed for one set of claims is never served
/// for another.
#[derive(Debug, Clone, Default)]
pub struct RequestEntities {
    merges: Vec<Arc<SealedMerge>>,
}

impl From<Vec<EntityMerge>> for RequestEntities {
    fn from(merges: Vec<EntityMerge>) -> Self {
        RequestEntities {
            merges: merges.into_iter().map(EntityMerge::seal).collect(),
        }
    }
}

impl RequestEntities {
    /// Adds a merge (sealing it); empty merges are skipped.
    pub fn push(&mut self, merge: EntityMerge) {
        if !merge.is_empty() {
            self.merges.push(merge.seal());
        }
    }

    /// Adds a merge sealed before; empty merges are skipped.
    pub fn push_sealed(&mut self, merge: Arc<SealedMerge>) {
        if !merge.merge.is_empty() {
            self.merges.push(merge);
        }
    }

    pub fn merges(&self) -> impl Iterator<Item = &EntityMerge> {
        self.merges.iter().map(|sealed| &sealed.merge)
    }

    pub fn is_empty(&self) -> bool {
        self.merges.iter().all(|sealed| sealed.merge.is_empty())
    }

    /// Appends the canonical text of the contents to `key`.
    pub(crate) fn push_canonical(&self, key: &mut String) {
        push_count(key, self.merges.len());
        for sealed in &self.merges {
            push_field(key, &sealed.canonical);
        }
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
        RequestEntities::from(vec![merge])
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
        let scope = RequestEntities::from(vec![moved]);
        let decision = engine.check_with(&read, &scope).unwrap();
        assert!(!decision.allowed);
        assert_eq!(decision.reasons, ["tenant-isolation"]);
        // Fill in: the document's cached tenant stays.
        let mut fill = EntityMerge::fill_in(EntityRef::new("Saas::Document", "acme-roadmap"));
        fill.attrs.insert("tenant".into(), tenant);
        let scope = RequestEntities::from(vec![fill]);
        assert!(engine.check_with(&read, &scope).unwrap().allowed);
        // An attribute of the wrong type is refused by the schema.
        let mut bad = EntityMerge::new(EntityRef::new("Saas::User", "carol"));
        bad.attrs
            .insert("clearance".into(), serde_json::json!("high"));
        let scope = RequestEntities::from(vec![bad]);
        assert!(engine.check_with(&read, &scope).is_err());
    }

    #[test]
    fn canonical_texts_tell_merges_apart() {
        let text = |merge: EntityMerge| merge.seal().canonical().to_owned();
        let base = || EntityMerge::new(EntityRef::new("Saas::User", "carol"));
        let with = |name: &str, value: serde_json::Value| {
            let mut merge = base();
            merge.attrs.insert(name.into(), value);
            merge
        };
        let mut seen = std::collections::HashSet::new();
        let mut fill = base();
        fill.overwrite = false;
        let mut parent = base();
        parent.parents.push(EntityRef::new("Saas::Role", "r"));
        let variants = [
            base(),
            fill,
            parent,
            with("a", serde_json::json!("1")),
            with("a", serde_json::json!(1)),
            with("a", serde_json::json!(1.5)),
            with("a", serde_json::json!(true)),
            with("a", serde_json::json!(null)),
            with("a", serde_json::json!(["1"])),
            with("a", serde_json::json!({"1": "2"})),
            with("a1", serde_json::json!("")),
            with("a", serde_json::json!("1:")),
            EntityMerge::new(EntityRef::new("Saas::User", "carol2")),
            EntityMerge::new(EntityRef::new("Saas::Use", "rcarol")),
        ];
        for merge in variants {
            assert!(seen.insert(text(merge.clone())), "{merge:?}");
        }
        // Equal merges, equal texts.
        assert_eq!(
            text(with("a", serde_json::json!({"x": [1, "y"]}))),
            text(with("a", serde_json::json!({"x": [1, "y"]})))
        );
        // The scope's text covers every merge, in order.
        let one = RequestEntities::from(vec![with("a", serde_json::json!(1)), base()]);
        let other = RequestEntities::from(vec![base(), with("a", serde_json::json!(1))]);
        let (mut a, mut b) = (String::new(), String::new());
        one.push_canonical(&mut a);
        other.push_canonical(&mut b);
        assert_ne!(a, b);
    }
}
