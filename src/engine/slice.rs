//! What a decision's slice of entity data is made with, below both entity
//! backings (the file's `Entities` and the synced `EntityStore`): the
//! entity references an entity leads to, the parent graph measured before
//! Cedar computes its closure, and the errors of building a slice.

use cedar_policy::{Entities, Entity, EntityUid, EvalResult};

use super::hierarchy;

/// A stored entity that Cedar refused to rebuild. Its values came from a
/// Cedar entity, so this is not expected; a decision that meets it fails
/// closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored entity could not be rebuilt for Cedar: {0}")]
pub struct MaterializeError(pub(crate) String);

/// Why a slice could not be handed to Cedar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SliceError {
    #[error(transparent)]
    Materialize(#[from] MaterializeError),
    #[error(transparent)]
    Hierarchy(#[from] hierarchy::HierarchyError),
    #[error(
        "entity `{parent}` is a parent of the stored entity `{child}`: a request may not add it (`request_entities = \"add\"`)"
    )]
    OverlayParent {
        parent: Box<EntityUid>,
        child: Box<EntityUid>,
    },
}

/// The parent edges of a slice's entities, measured before Cedar computes
/// their closure.
#[derive(Default)]
pub(crate) struct SliceGraph {
    nodes: Vec<EntityUid>,
    parents: Vec<Vec<EntityUid>>,
}

impl SliceGraph {
    pub(crate) fn add(&mut self, uid: EntityUid, parents: Vec<EntityUid>) {
        self.nodes.push(uid);
        self.parents.push(parents);
    }

    pub(crate) fn check(&self, max_depth: u32) -> Result<(), hierarchy::HierarchyError> {
        if self.nodes.is_empty() {
            return Ok(());
        }
        hierarchy::check(&self.nodes, |at| self.parents[at].iter(), |_| 0, max_depth)
    }
}

/// Refuses a request entity in the place of a stored entity's parent.
pub(crate) fn refuse_overlay_parent<'a>(
    child: &EntityUid,
    parents: impl IntoIterator<Item = &'a EntityUid>,
    overlay: &Entities,
) -> Result<(), SliceError> {
    match parents
        .into_iter()
        .find(|parent| overlay.get(parent).is_some())
    {
        Some(parent) => Err(SliceError::OverlayParent {
            parent: Box::new(parent.clone()),
            child: Box::new(child.clone()),
        }),
        None => Ok(()),
    }
}

/// Every entity uid an entity's attributes and tags name.
pub(crate) fn entity_references(entity: &Entity, out: &mut Vec<EntityUid>) {
    for (_, value) in entity.attrs().chain(entity.tags()) {
        if let Ok(value) = value {
            collect_uids(&value, out);
        }
    }
}

/// Every entity uid inside a value (sets and records included).
pub(crate) fn collect_uids(value: &EvalResult, out: &mut Vec<EntityUid>) {
    match value {
        EvalResult::EntityUid(uid) => out.push(uid.clone()),
        EvalResult::Set(set) => {
            for item in set.iter() {
                collect_uids(item, out);
            }
        }
        EvalResult::Record(record) => {
            for (_, item) in record.iter() {
                collect_uids(item, out);
            }
        }
        EvalResult::Bool(_)
        | EvalResult::Long(_)
        | EvalResult::String(_)
        | EvalResult::ExtensionValue(_) => {}
    }
}
