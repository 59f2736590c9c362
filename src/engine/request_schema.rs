//! What a policy set's schema says about valid requests, compiled once per
//! snapshot, so a common request is built without Cedar's per-request work:
//! entity type names parsed once, and for each action the principal and
//! resource types it applies to and the shape of its context.
//!
//! Why it is exact: the fast path builds the same `Context` that
//! `Context::from_json_value` with the schema builds (the same values, made
//! by the same extension constructors), and only for requests that
//! `Request::new` with the schema certainly accepts, so the request is
//! built without validating it again. Anything it does not fully
//! understand (an undeclared attribute, a wrong type, a number that is not
//! a Long, an escape, an enumerated or external entity type, a context type
//! with entities, sets or records) makes it answer `None`, and the decision
//! takes the general path, which gives the same answer or the exact error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use cedar_policy::{Context, EntityTypeName, EntityUid, Schema};
use cedar_policy_core::ast::{self, ExtensionFunction, Name, Value};
use cedar_policy_core::extensions::Extensions;
use cedar_policy_core::validator::ValidatorSchema;
use cedar_policy_core::validator::types::{BoolType, OpenTag, Type};
use cedar_policy_core::validator::{ValidatorEntityType, ValidatorEntityTypeKind};
use smol_str::SmolStr;

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The kind of a context attribute the fast path builds.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Bool,
    Long,
    String,
    /// An extension value written as a string (`"10.0.0.1"` for an
    /// `ipaddr`), made by the type's single-argument constructor.
    Extension(&'static ExtensionFunction),
}

#[derive(Debug)]
struct Attribute {
    name: SmolStr,
    required: bool,
    kind: Kind,
}

/// One action's requests, as its schema declares them.
#[derive(Debug)]
struct ActionShape {
    /// Standard (not enumerated, not external) entity types only.
    principals: HashSet<EntityTypeName, foldhash::fast::RandomState>,
    resources: HashSet<EntityTypeName, foldhash::fast::RandomState>,
    /// `None` when the context type has an attribute the fast path does not
    /// build.
    context: Option<Box<[Attribute]>>,
}

/// Compiled from a policy set and its schema (built off the hot path).
#[derive(Debug, Default)]
pub(crate) struct RequestSchema {
    /// Entity type names as a request spells them, to what Cedar's parser
    /// makes of that text.
    type_names: Map<Box<str>, EntityTypeName>,
    actions: Map<EntityUid, ActionShape>,
}

impl RequestSchema {
    /// `known_types`: entity types a request is likely to name besides the
    /// schema's (those the policies name).
    pub(crate) fn new<'a>(
        schema: Option<&Schema>,
        known_types: impl IntoIterator<Item = &'a EntityTypeName>,
    ) -> Self {
        let mut out = RequestSchema::default();
        for type_name in known_types {
            out.add_type_name(type_name);
        }
        let Some(schema) = schema else {
            return out;
        };
        for type_name in schema.entity_types() {
            out.add_type_name(type_name);
        }
        let core: &ValidatorSchema = schema.as_ref();
        for action in schema.actions() {
            out.add_type_name(action.type_name());
            let Some(id) = core.get_action_id(action.as_ref()) else {
                continue;
            };
            if id.is_external() {
                continue;
            }
            let standard = |entity_type: &ast::EntityType| {
                matches!(
                    core.get_entity_type(entity_type),
                    Some(ValidatorEntityType {
                        kind: ValidatorEntityTypeKind::Standard(_),
                        ..
                    })
                )
            };
            let shape = ActionShape {
                principals: id
                    .applies_to_principals()
                    .filter(|entity_type| standard(entity_type))
                    .map(|entity_type| EntityTypeName::from(entity_type.clone()))
                    .collect(),
                resources: id
                    .applies_to_resources()
                    .filter(|entity_type| standard(entity_type))
                    .map(|entity_type| EntityTypeName::from(entity_type.clone()))
                    .collect(),
                context: id.context_type().and_then(context_shape),
            };
            out.actions.insert(action.clone(), shape);
        }
        out
    }

    /// Keeps `type_name` when Cedar's parser gives it back from its text.
    fn add_type_name(&mut self, type_name: &EntityTypeName) {
        let text = type_name.to_string();
        if self.type_names.contains_key(text.as_str()) {
            return;
        }
        if let Ok(parsed) = text.parse::<EntityTypeName>()
            && parsed == *type_name
        {
            self.type_names.insert(text.into_boxed_str(), parsed);
        }
    }

    /// What `text.parse::<EntityTypeName>()` gives, when this set has seen it.
    pub(crate) fn type_name(&self, text: &str) -> Option<EntityTypeName> {
        self.type_names.get(text).cloned()
    }

    /// The context of a request the schema accepts as it is, built as
    /// `Context::from_json_value` with the schema builds it; `None` when the
    /// request must take the general path (it may be invalid, or of a shape
    /// not compiled here). `fields` is the JSON context object (`None`: `{}`).
    pub(crate) fn context(
        &self,
        principal: &EntityUid,
        action: &EntityUid,
        resource: &EntityUid,
        fields: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Option<Context> {
        let shape = self.actions.get(action)?;
        if !shape.principals.contains(principal.type_name())
            || !shape.resources.contains(resource.type_name())
        {
            return None;
        }
        let attributes = shape.context.as_deref()?;
        let mut values = BTreeMap::new();
        let mut found = 0;
        if let Some(fields) = fields {
            for (name, json) in fields {
                let attribute = attributes
                    .iter()
                    .find(|attribute| attribute.name == name.as_str())?;
                values.insert(attribute.name.clone(), value(attribute.kind, json)?);
                found += usize::from(attribute.required);
            }
        }
        let required = attributes
            .iter()
            .filter(|attribute| attribute.required)
            .count();
        if found != required {
            return None;
        }
        Some(Context::from(ast::Context::Value(Arc::new(values))))
    }
}

/// The value Cedar's schema-guided JSON parser makes of `json` for an
/// attribute of `kind`, when it is one the fast path is sure of.
fn value(kind: Kind, json: &serde_json::Value) -> Option<Value> {
    match (kind, json) {
        (Kind::Bool, serde_json::Value::Bool(value)) => Some(Value::from(*value)),
        (Kind::Long, serde_json::Value::Number(number)) => Some(Value::from(number.as_i64()?)),
        (Kind::String, serde_json::Value::String(text)) => {
            Some(Value::from(SmolStr::from(text.as_str())))
        }
        (Kind::Extension(constructor), serde_json::Value::String(text)) => {
            match constructor
                .call(&[Value::from(SmolStr::from(text.as_str()))])
                .ok()?
            {
                ast::PartialValue::Value(value) => Some(value),
                ast::PartialValue::Residual(_) => None,
            }
        }
        _ => None,
    }
}

/// The attributes of a closed context record whose every attribute the
/// fast path builds.
fn context_shape(context: &Type) -> Option<Box<[Attribute]>> {
    let Type::Record {
        attrs,
        open_attributes: OpenTag::ClosedAttributes,
    } = context
    else {
        return None;
    };
    attrs
        .iter()
        .map(|(name, attribute)| {
            let kind = match attribute.attr_type.as_ref() {
                Type::Bool(BoolType::AnyBool) => Kind::Bool,
                Type::Long => Kind::Long,
                Type::String => Kind::String,
                Type::ExtensionType { name } => Kind::Extension(constructor(name)?),
                _ => return None,
            };
            Some(Attribute {
                name: name.clone(),
                required: attribute.is_required,
                kind,
            })
        })
        .collect()
}

/// The single-argument constructor from a string that Cedar's JSON parser
/// applies to a string given for an extension type.
fn constructor(type_name: &Name) -> Option<&'static ExtensionFunction> {
    let function = match type_name.to_string().as_str() {
        "ipaddr" => "ip",
        "decimal" => "decimal",
        _ => return None,
    };
    let function: Name = function.parse().ok()?;
    let found = Extensions::all_available().func(&function).ok()?;
    found.is_single_arg_constructor().then_some(found)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use cedar_policy::Request;

    fn schema() -> Schema {
        let text = include_str!("../../policies/schema.cedarschema");
        Schema::from_cedarschema_str(text).unwrap().0
    }

    fn uid(text: &str) -> EntityUid {
        text.parse().unwrap()
    }

    /// Whenever the fast path answers, its context is Cedar's and the
    /// request is one Cedar accepts with the schema.
    #[test]
    fn fast_context_is_cedars_or_none() {
        let schema = schema();
        let compiled = RequestSchema::new(Some(&schema), []);
        let user = uid(r#"Saas::User::"alice""#);
        let document = uid(r#"Saas::Document::"d""#);
        let tenant = uid(r#"Saas::Tenant::"t""#);
        let read = uid(r#"Saas::Action::"read""#);
        let admin = uid(r#"Saas::Action::"admin""#);
        let contexts = [
            r#"{"mfa": true, "source_ip": "10.1.2.3"}"#,
            r#"{"mfa": false, "source_ip": "::1", "auth_level": 2}"#,
            r#"{"mfa": false, "source_ip": "10.0.0.0/8", "auth_level": -7}"#,
            r#"{"mfa": true}"#,
            r#"{"mfa": true, "source_ip": "10.1.2.3", "extra": 1}"#,
            r#"{"mfa": "yes", "source_ip": "10.1.2.3"}"#,
            r#"{"mfa": true, "source_ip": "not an ip"}"#,
            r#"{"mfa": true, "source_ip": {"__extn": {"fn": "ip", "arg": "10.1.2.3"}}}"#,
            r#"{"mfa": true, "source_ip": "10.1.2.3", "auth_level": 2.0}"#,
            r#"{"mfa": true, "source_ip": "10.1.2.3", "auth_level": 18446744073709551615}"#,
            r#"{"mfa": true, "source_ip": 3}"#,
            r#"{}"#,
        ];
        let requests = [
            (&user, &read, &document),
            (&user, &admin, &tenant),
            (&user, &read, &tenant),
            (&document, &read, &document),
        ];
        let mut fast = 0;
        for (principal, action, resource) in requests {
            for text in contexts {
                let json: serde_json::Value = serde_json::from_str(text).unwrap();
                let Some(context) = compiled.context(principal, action, resource, json.as_object())
                else {
                    continue;
                };
                fast += 1;
                let cedars = Context::from_json_value(json, Some((&schema, action)))
                    .unwrap_or_else(|error| panic!("{text}: Cedar refuses it: {error}"));
                assert_eq!(context, cedars, "{text}");
                Request::new(
                    principal.clone(),
                    action.clone(),
                    resource.clone(),
                    context,
                    Some(&schema),
                )
                .unwrap_or_else(|error| panic!("{text}: Cedar refuses the request: {error}"));
            }
        }
        // The valid contexts of the first two requests.
        assert_eq!(fast, 6);
    }

    #[test]
    fn type_names_are_the_parsers() {
        let schema = schema();
        let compiled = RequestSchema::new(Some(&schema), []);
        for text in ["Saas::User", "Saas::Action", "Saas::Document"] {
            assert_eq!(
                compiled.type_name(text),
                Some(text.parse::<EntityTypeName>().unwrap())
            );
        }
        assert_eq!(compiled.type_name("Saas :: User"), None);
        assert_eq!(compiled.type_name("User"), None);
    }
}
