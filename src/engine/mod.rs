//! The decision engine: turns a [`CheckInput`] into a [`Decision`] by
//! evaluating Cedar policies against the current [`Snapshot`].
//!
//! Invariants: no IO, no `.await`, no locks. The current snapshot is loaded
//! once per decision from an `ArcSwap` and read by reference. A malformed
//! request is a [`RequestError`]; anything that goes wrong inside evaluation
//! is carried in the [`Decision`] and can only lead to deny.

mod compiled_policies;
mod decision;
mod decision_cache;
pub mod entity_store;
mod error;
mod explain;
pub mod hierarchy;
pub mod loader;
mod options;
mod policy_index;
mod request_entities;
pub mod request_overlay;
mod request_schema;
mod slice;
mod slice_cache;
mod snapshot;
pub mod template_links;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, Request, Schema,
};

pub use decision::{Decision, PolicyEvaluationError, SliceUse};
pub use error::{
    LoadDiagnostic, LoadError, MAX_ERROR_MESSAGE_BYTES, RequestError, RequestField, bounded,
};
pub use explain::{ExplainedPolicy, Explanation, PolicyEffect};
pub use hierarchy::{DEFAULT_MAX_HIERARCHY_DEPTH, MAX_HIERARCHY_DEPTH_CEILING};
pub use loader::{LoadOptions, LoadReport, OnEvaluationError, Sources};
pub use policy_index::DEFAULT_POLICY_INDEX_MIN;
pub use request_entities::{EntityMerge, EntityRef, RequestEntities, SealedMerge};
pub use request_overlay::{
    DEFAULT_HEAVY_QUEUE, DEFAULT_MAX_REQUEST_ANCESTORS, DEFAULT_MAX_REQUEST_ENTITIES,
    MAX_REQUEST_ENTITIES_CEILING, RequestEntitiesMode, RequestLimits, default_heavy_workers,
};
pub use snapshot::{EntityData, PolicySnapshot, Snapshot};

use snapshot::collect_uids;

/// An entity uid as it arrives: a type name (possibly namespaced,
/// `Saas::User`) and an id (any string, the empty one included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidInput<'a> {
    pub type_name: &'a str,
    pub id: &'a str,
}

/// One authorization question, borrowed from the wire message.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckInput<'a> {
    pub principal: Option<UidInput<'a>>,
    pub action: Option<UidInput<'a>>,
    pub resource: Option<UidInput<'a>>,
    /// Cedar JSON context object; empty means `{}`.
    pub context_json: &'a str,
    /// Cedar entities JSON array merged over the store for this decision.
    pub entities_json: &'a str,
}

/// A decision, with its explanation when one was asked for.
pub type MaybeExplained = (Decision, Option<Explanation>);

/// Holds the current snapshot and answers checks against it.
#[derive(Debug)]
pub struct Engine {
    current: ArcSwapOption<Snapshot>,
    authorizer: Authorizer,
    /// Publishers only (never a decision): the parts the next snapshot is
    /// assembled from, so a policy reload and a data update cannot undo
    /// each other.
    parts: Mutex<Parts>,
    /// The entity data comes from an identity source ([`Engine::publish_data`]),
    /// not from the files a policy reload reads.
    external_data: bool,
    /// The source position of the data now served, for `min_data_revision`.
    positions: tokio::sync::watch::Sender<Option<u64>>,
    /// The longest chain of parents synced data may have.
    max_hierarchy_depth: u32,
}

#[derive(Debug, Default)]
struct Parts {
    policies: Option<Arc<PolicySnapshot>>,
    data: Option<Arc<EntityData>>,
    decision_cache_capacity: u64,
    slice_cache_capacity: u64,
    /// Prepared slices for the current policies, kept across data publishes.
    slices: Option<Arc<slice_cache::SliceCache>>,
    /// Decisions for the current policies (synced data): one cache for all
    /// the snapshots of a policy set, emptied by each data publish.
    decisions: Option<Arc<decision_cache::DecisionCache>>,
}

impl Default for Engine {
    fn default() -> Self {
        Engine {
            current: ArcSwapOption::empty(),
            authorizer: Authorizer::new(),
            parts: Mutex::new(Parts::default()),
            external_data: false,
            positions: tokio::sync::watch::Sender::new(None),
            max_hierarchy_depth: DEFAULT_MAX_HIERARCHY_DEPTH,
        }
    }
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    /// An engine whose entity data is published by an identity sync: it
    /// serves nothing until both a policy set and the first data are in.
    pub fn with_external_data() -> Self {
        Engine {
            external_data: true,
            ..Self::default()
        }
    }

    /// Synced data with a chain of more than `depth` ancestors is refused
    /// by the identity store (`max_hierarchy_depth`).
    pub fn with_max_hierarchy_depth(mut self, depth: u32) -> Self {
        self.max_hierarchy_depth = depth;
        self
    }

    pub fn max_hierarchy_depth(&self) -> u32 {
        self.max_hierarchy_depth
    }

    /// Makes `snapshot` the state every later decision sees. With external
    /// data only its policies are taken; the data stays the synced one.
    pub fn publish(&self, snapshot: Snapshot) {
        let mut parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        parts.policies = Some(snapshot.policies.clone());
        parts.decision_cache_capacity = snapshot.decision_cache_capacity;
        parts.slice_cache_capacity = snapshot.slice_cache_capacity;
        if self.external_data {
            // Slices hold the policies' literals and action entities.
            parts.slices =
                slice_cache::SliceCache::new(snapshot.slice_cache_capacity).map(Arc::new);
            parts.decisions = snapshot.decisions.clone();
            self.assemble(&parts);
        } else {
            parts.data = Some(snapshot.data.clone());
            let position = snapshot.data.position;
            self.current.store(Some(Arc::new(snapshot)));
            self.positions.send_replace(position);
        }
    }

    /// Makes `data` the entity data every later decision sees, with the
    /// current policies (an atomic swap, like a policy reload).
    pub fn publish_data(&self, data: EntityData) {
        let mut parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        parts.data = Some(Arc::new(data));
        if let Some(decisions) = &parts.decisions {
            // Before the new snapshot is out: what it caches stays.
            decisions.clear();
        }
        self.assemble(&parts);
    }

    fn assemble(&self, parts: &Parts) {
        if let (Some(policies), Some(data)) = (&parts.policies, &parts.data) {
            let mut snapshot = Snapshot::with_caches(
                policies.clone(),
                data.clone(),
                parts.decisions.clone(),
                parts.decision_cache_capacity,
                parts.slice_cache_capacity,
            );
            snapshot.slices = parts.slices.clone();
            self.current.store(Some(Arc::new(snapshot)));
            self.positions.send_replace(data.position);
        }
    }

    /// Watches the source position of the data being served.
    pub fn positions(&self) -> tokio::sync::watch::Receiver<Option<u64>> {
        self.positions.subscribe()
    }

    /// The current snapshot, if one was published.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// Decides one request against the current snapshot.
    pub fn check(&self, input: &CheckInput<'_>) -> Result<Decision, RequestError> {
        let guard = self.current.load();
        let snapshot = guard.as_deref().ok_or(RequestError::NotReady)?;
        self.check_against(snapshot, input)
    }

    /// Decides one request with request-scoped entity data (for example
    /// claims of a verified token) merged over the cached entities.
    pub fn check_with(
        &self,
        input: &CheckInput<'_>,
        scope: &RequestEntities,
    ) -> Result<Decision, RequestError> {
        let guard = self.current.load();
        let snapshot = guard.as_deref().ok_or(RequestError::NotReady)?;
        self.decide(
            snapshot,
            input,
            Some(scope).filter(|scope| !scope.is_empty()),
            false,
        )
        .map(|(decision, _)| decision)
    }

    /// Decides several requests against one snapshot, so a batch is answered
    /// from one consistent state. Stops at the first malformed request and
    /// reports its index.
    pub fn check_all(
        &self,
        inputs: &[CheckInput<'_>],
    ) -> Result<Vec<Decision>, (usize, RequestError)> {
        let guard = self.current.load();
        let snapshot = guard.as_deref().ok_or((0, RequestError::NotReady))?;
        inputs
            .iter()
            .enumerate()
            .map(|(index, input)| {
                self.check_against(snapshot, input)
                    .map_err(|error| (index, error))
            })
            .collect()
    }

    /// Decides one request against a given snapshot.
    pub fn check_against(
        &self,
        snapshot: &Snapshot,
        input: &CheckInput<'_>,
    ) -> Result<Decision, RequestError> {
        self.decide(snapshot, input, None, false)
            .map(|(decision, _)| decision)
    }

    /// Decides one request against the current snapshot and explains the
    /// decision (heavier: see [`Explanation`]). Never answered from, nor
    /// stored into, the decision cache.
    pub fn explain(&self, input: &CheckInput<'_>) -> Result<(Decision, Explanation), RequestError> {
        let guard = self.current.load();
        let snapshot = guard.as_deref().ok_or(RequestError::NotReady)?;
        self.explain_against(snapshot, input)
    }

    /// [`Self::explain`] against a given snapshot.
    pub fn explain_against(
        &self,
        snapshot: &Snapshot,
        input: &CheckInput<'_>,
    ) -> Result<(Decision, Explanation), RequestError> {
        let (decision, explanation) = self.decide(snapshot, input, None, true)?;
        let explanation = explanation
            .ok_or_else(|| RequestError::Internal("explain: no explanation was made".into()))?;
        Ok((decision, explanation))
    }

    /// [`Self::check_all`] where each request says whether to explain its
    /// decision: one snapshot for the whole batch.
    pub fn check_all_explained(
        &self,
        inputs: &[(CheckInput<'_>, bool)],
    ) -> Result<Vec<MaybeExplained>, (usize, RequestError)> {
        let guard = self.current.load();
        let snapshot = guard.as_deref().ok_or((0, RequestError::NotReady))?;
        inputs
            .iter()
            .enumerate()
            .map(|(index, (input, explain))| {
                self.decide(snapshot, input, None, *explain)
                    .map_err(|error| (index, error))
            })
            .collect()
    }

    /// The decision, and with `explain` its explanation.
    fn decide(
        &self,
        snapshot: &Snapshot,
        input: &CheckInput<'_>,
        scope: Option<&RequestEntities>,
        explain: bool,
    ) -> Result<MaybeExplained, RequestError> {
        let started = Instant::now();
        // Request entities are part of the question: their canonical text is
        // part of the key, so different claims never share an answer.
        let cache_key = snapshot.decisions.as_ref().and_then(|_| {
            let key = decision_cache::DecisionCache::key(input)?;
            let key = match scope {
                None => key,
                Some(scope) => {
                    let mut key = String::from(key);
                    key.push('|');
                    scope.push_canonical(&mut key);
                    key.into_boxed_str()
                }
            };
            Some((snapshot.generation, key))
        });
        // An explained request neither reads nor fills the cache.
        let cache_key = cache_key.filter(|_| !explain);
        let hit = match (&snapshot.decisions, &cache_key) {
            (Some(cache), Some(key)) => cache.get(key),
            _ => None,
        };
        if let Some(hit) = hit {
            let decision = Decision {
                allowed: hit.allowed,
                reasons: hit.reasons.clone(),
                errors: hit.errors.clone(),
                decision_id: uuid::Uuid::now_v7().to_string(),
                policy_revision: snapshot.policies.revision.clone(),
                data_revision: snapshot.data.revision.clone(),
                elapsed: started.elapsed(),
                cached: true,
                slice: SliceUse::None,
                request_entities: Vec::new(),
            };
            return Ok((decision, None));
        }
        let policies = &*snapshot.policies;
        let schema = policies.schema.as_ref();

        let types = &policies.request_schema;
        let principal = parse_known_uid(input.principal, RequestField::Principal, types)?;
        let action = parse_known_uid(input.action, RequestField::Action, types)?;
        let resource = parse_known_uid(input.resource, RequestField::Resource, types)?;

        if input.context_json.len() > MAX_CONTEXT_BYTES {
            return Err(RequestError::invalid(
                RequestField::Context,
                format!(
                    "{} bytes, more than {MAX_CONTEXT_BYTES}",
                    input.context_json.len()
                ),
            ));
        }
        if nests_deeper_than(input.context_json, MAX_CONTEXT_DEPTH) {
            return Err(RequestError::invalid(
                RequestField::Context,
                format!("nests deeper than {MAX_CONTEXT_DEPTH} levels"),
            ));
        }
        let context_value = if input.context_json.trim().is_empty() {
            None
        } else {
            let value: serde_json::Value = serde_json::from_str(input.context_json)
                .map_err(|error| RequestError::invalid_because(RequestField::Context, &error))?;
            if !value.is_object() {
                return Err(RequestError::invalid(
                    RequestField::Context,
                    "must be a JSON object",
                ));
            }
            Some(value)
        };
        if policies.validate_requests
            && schema.is_some()
            && !policies.declared_actions.contains(&action)
        {
            return Err(RequestError::invalid(
                RequestField::Action,
                format!("action `{action}` is not declared in the schema"),
            ));
        }
        let has_json_overlay = !input.entities_json.trim().is_empty();
        let has_overlay = has_json_overlay || scope.is_some();
        // Synced data is never one Cedar `Entities`: every decision gets its slice.
        let needs_slice = has_overlay || snapshot.data.whole().is_none();
        let context_keys: Vec<String> = match (&context_value, needs_slice) {
            (Some(serde_json::Value::Object(fields)), true) => fields.keys().cloned().collect(),
            _ => Vec::new(),
        };
        // A request the schema certainly accepts gets its context built from
        // the compiled shape and is not validated again; any other takes
        // Cedar's schema-guided parsing and validation (same answer, or the
        // exact error).
        let compiled = match (&context_value, policies.validate_requests) {
            (Some(serde_json::Value::Object(fields)), true) => {
                types.context(&principal, &action, &resource, Some(fields))
            }
            (None, true) => types.context(&principal, &action, &resource, None),
            _ => None,
        };
        let validated = compiled.is_some();
        let context = match compiled {
            Some(context) => context,
            None => parse_context(context_value, schema, &action, policies.validate_requests)?,
        };
        // The roots of the overlay's slice: the request's entities, those
        // named in the context, and those named literally in policies. The
        // first `request_roots` are the request's own: the slice cache key.
        let mut request_roots = 0;
        let roots = if needs_slice {
            let mut roots = vec![principal.clone(), action.clone(), resource.clone()];
            for key in &context_keys {
                if let Some(value) = context.get(key) {
                    collect_uids(&value, &mut roots);
                }
            }
            request_roots = roots.len();
            roots.extend(policies.literal_uids.iter().cloned());
            roots
        } else {
            Vec::new()
        };

        let request_schema = if policies.validate_requests && !validated {
            schema
        } else {
            None
        };
        let request = Request::new(principal, action, resource, context, request_schema)
            .map_err(|error| RequestError::invalid_because(request_error_field(&error), &error))?;

        // Explain asks Cedar more questions against the same entities.
        let evaluate = |entities: &Entities| {
            let response = policies.authorize(&self.authorizer, &request, entities);
            let evidence = explain.then(|| {
                let candidates = policies.scope_candidates(&request, entities);
                let scopes = policies.explain_scopes()?;
                let all = &policies.policies;
                explain::gather(
                    &self.authorizer,
                    all,
                    &candidates,
                    scopes,
                    &request,
                    entities,
                )
            });
            (response, evidence)
        };
        let cached_slices = match (&snapshot.slices, snapshot.data.store()) {
            (Some(cache), Some(store)) if !has_overlay => Some((cache, store)),
            _ => None,
        };
        // The uids the request's `entities_json` supplied, for the log.
        let mut supplied: Vec<EntityUid> = Vec::new();
        let mut slice_use = if needs_slice {
            SliceUse::Built
        } else {
            SliceUse::None
        };
        let (response, evidence) = match (snapshot.data.whole(), cached_slices) {
            (Some(entities), _) if !has_overlay => evaluate(entities),
            (_, Some((cache, store))) => {
                let key = &roots[..request_roots];
                let prepared = match cache.get(key, store) {
                    Some(prepared) => {
                        slice_use = SliceUse::Cached;
                        prepared
                    }
                    None => {
                        let mut looked_up = Vec::new();
                        let mut slice = store
                            .slice_recording(roots.iter().cloned(), &mut looked_up)
                            .map_err(|error| slice_error(error, false))?;
                        add_action_entities(&mut slice, request.action(), policies);
                        let entities = Entities::from_entities(slice, None).map_err(|error| {
                            RequestError::invalid_because(RequestField::Entities, &error)
                        })?;
                        let prepared =
                            Arc::new(slice_cache::PreparedSlice::new(entities, looked_up));
                        cache.insert(key, prepared.clone());
                        prepared
                    }
                };
                evaluate(&prepared.entities)
            }
            _ => {
                let overlay = if has_json_overlay {
                    let (overlay, uids) =
                        request_overlay::parse(input.entities_json, schema, &policies.limits)?;
                    supplied = uids;
                    let principal = request.principal().ok_or_else(|| {
                        RequestError::Internal("the request lost its principal".into())
                    })?;
                    request_overlay::apply_mode(
                        policies.request_entities,
                        overlay,
                        &supplied,
                        &snapshot.data,
                        policies,
                        principal,
                        schema,
                    )?
                } else {
                    Entities::empty()
                };
                let overlay = match scope {
                    Some(scope) => merge_request_entities(&snapshot.data, overlay, scope, schema)?,
                    None => overlay,
                };
                let mut slice = snapshot
                    .data
                    .slice_with_overlay(
                        roots,
                        &overlay,
                        policies.limits.max_hierarchy_depth,
                        policies.request_entities != RequestEntitiesMode::Add,
                    )
                    .map_err(|error| slice_error(error, has_json_overlay))?;
                if snapshot.data.whole().is_none() {
                    add_action_entities(&mut slice, request.action(), policies);
                }
                let entities = Entities::from_entities(slice, None).map_err(|error| {
                    RequestError::invalid_because(RequestField::Entities, &error)
                })?;
                evaluate(&entities)
            }
        };

        let diagnostics = response.diagnostics();
        let errors: Vec<PolicyEvaluationError> = diagnostics
            .errors()
            .map(|error| match error {
                cedar_policy::AuthorizationError::PolicyEvaluationError(error) => {
                    PolicyEvaluationError {
                        policy_id: error.policy_id().to_string(),
                        message: error.inner().to_string(),
                    }
                }
            })
            .collect();
        let cedar_allowed = response.decision() == CedarDecision::Allow;
        // An allow reached while a policy errored is not trusted when that
        // policy may have been a forbid (`deny`: any error) or was one
        // (`skip-permit`: its effect is looked up only when there are errors).
        let fail_closed = cedar_allowed
            && !errors.is_empty()
            && match policies.on_evaluation_error {
                OnEvaluationError::Deny => true,
                OnEvaluationError::SkipPolicy => false,
                OnEvaluationError::SkipPermit => diagnostics.errors().any(|error| {
                    let cedar_policy::AuthorizationError::PolicyEvaluationError(error) = error;
                    policies
                        .policies
                        .policy(error.policy_id())
                        .is_none_or(|policy| policy.effect() == cedar_policy::Effect::Forbid)
                }),
            };
        let (allowed, reasons) = if fail_closed {
            (false, Vec::new())
        } else {
            (
                cedar_allowed,
                diagnostics.reason().map(ToString::to_string).collect(),
            )
        };
        if let (Some(cache), Some(key)) = (&snapshot.decisions, cache_key) {
            cache.insert(
                key,
                decision_cache::CachedOutcome {
                    allowed,
                    reasons: reasons.clone(),
                    errors: errors.clone(),
                },
            );
        }
        let decision = Decision {
            allowed,
            reasons,
            errors,
            decision_id: uuid::Uuid::now_v7().to_string(),
            policy_revision: policies.revision.clone(),
            data_revision: snapshot.data.revision.clone(),
            elapsed: started.elapsed(),
            cached: false,
            slice: slice_use,
            request_entities: supplied.iter().map(ToString::to_string).collect(),
        };
        let explanation = match evidence {
            Some(evidence) => Some(evidence?.explain(&decision)),
            None => None,
        };
        Ok((decision, explanation))
    }
}

/// Synced data has no action entities: adds the request's action and its
/// groups from the schema, unless the slice has them.
fn add_action_entities(
    slice: &mut Vec<Entity>,
    action: Option<&EntityUid>,
    policies: &PolicySnapshot,
) {
    let Some(actions) = &policies.action_entities else {
        return;
    };
    let ancestors = action
        .iter()
        .flat_map(|uid| actions.ancestors(uid).into_iter().flatten())
        .cloned()
        .collect::<Vec<_>>();
    for uid in action.cloned().into_iter().chain(ancestors) {
        if let Some(entity) = actions.get(&uid)
            && !slice.iter().any(|present| present.uid() == uid)
        {
            slice.push(entity.clone());
        }
    }
}

/// The longest entity type or id a request may name.
pub const MAX_UID_BYTES: usize = 1_024;

/// The longest `context_json` a request may carry (before it is parsed).
pub const MAX_CONTEXT_BYTES: usize = 256 * 1024;

/// The deepest nesting of objects and arrays `context_json` may have.
/// Cedar records rarely go beyond a few levels; the bound keeps the parser's
/// and Cedar's recursive walks shallow and makes the refusal a stated limit
/// rather than the JSON parser's own (128).
pub const MAX_CONTEXT_DEPTH: usize = 32;

/// Whether `json` nests objects and arrays deeper than `max`: a scan of the
/// bytes (strings and their escapes skipped), before any parse, that stops
/// at the first level too many. Malformed JSON is left to the parser.
fn nests_deeper_than(json: &str, max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for byte in json.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// How much of an input value a message quotes.
const QUOTED_BYTES: usize = 256;

fn parse_uid(input: Option<UidInput<'_>>, field: RequestField) -> Result<EntityUid, RequestError> {
    parse_known_uid(input, field, &request_schema::RequestSchema::default())
}

/// [`parse_uid`], with the type names `known` has already parsed.
fn parse_known_uid(
    input: Option<UidInput<'_>>,
    field: RequestField,
    known: &request_schema::RequestSchema,
) -> Result<EntityUid, RequestError> {
    let input = input.ok_or_else(|| RequestError::invalid(field, "is required"))?;
    for (part, text) in [("type", input.type_name), ("id", input.id)] {
        if text.len() > MAX_UID_BYTES {
            return Err(RequestError::invalid(
                field,
                format!(
                    "its {part} `{}` is longer than {MAX_UID_BYTES} bytes",
                    bounded(text, QUOTED_BYTES)
                ),
            ));
        }
    }
    if input.type_name.is_empty() {
        return Err(RequestError::invalid(field, "entity type is empty"));
    }
    if let Some(type_name) = known.type_name(input.type_name) {
        return Ok(EntityUid::from_type_name_and_id(
            type_name,
            EntityId::new(input.id),
        ));
    }
    let type_name: EntityTypeName = input.type_name.parse().map_err(|error| {
        RequestError::invalid(
            field,
            format!(
                "`{}` is not a valid entity type: {error}",
                bounded(input.type_name, QUOTED_BYTES)
            ),
        )
    })?;
    Ok(EntityUid::from_type_name_and_id(
        type_name,
        EntityId::new(input.id),
    ))
}

/// The request field a schema validation error is about.
fn request_error_field(error: &cedar_policy::RequestValidationError) -> RequestField {
    use cedar_policy::RequestValidationError as E;
    match error {
        E::UndeclaredAction(_) | E::ExternalAction(_) => RequestField::Action,
        E::UndeclaredPrincipalType(_) | E::InvalidPrincipalType(_) => RequestField::Principal,
        E::UndeclaredResourceType(_) | E::InvalidResourceType(_) => RequestField::Resource,
        E::InvalidContext(_) | E::TypeOfContext(_) => RequestField::Context,
        _ => RequestField::Request,
    }
}

fn parse_context(
    value: Option<serde_json::Value>,
    schema: Option<&Schema>,
    action: &EntityUid,
    validate_requests: bool,
) -> Result<Context, RequestError> {
    let Some(value) = value else {
        return Ok(Context::empty());
    };
    // With a schema the context is parsed against the action's context type,
    // so `"10.0.0.1"` becomes an `ipaddr` where the schema says so.
    match (schema, validate_requests) {
        (Some(schema), true) => Context::from_json_value(value, Some((schema, action)))
            .map_err(|error| RequestError::invalid_because(RequestField::Context, &error)),
        (Some(schema), false) => {
            // Unvalidated requests may name actions the schema lacks: fall
            // back to schema-less parsing rather than refusing them.
            match Context::from_json_value(value.clone(), Some((schema, action))) {
                Ok(context) => Ok(context),
                Err(_) => Context::from_json_value(value, None)
                    .map_err(|error| RequestError::invalid_because(RequestField::Context, &error)),
            }
        }
        (None, _) => Context::from_json_value(value, None)
            .map_err(|error| RequestError::invalid_because(RequestField::Context, &error)),
    }
}

/// Stored data Cedar would not take back: Arbiter's fault, not the
/// caller's; the decision fails closed.
fn stored_data_error(error: entity_store::MaterializeError) -> RequestError {
    tracing::error!(target: "arbiter::engine", %error, "decision refused");
    RequestError::Internal(error.to_string())
}

/// A slice that could not be handed to Cedar: the request's fault when
/// its own entities made it so, else Arbiter's (the decision fails closed).
fn slice_error(error: entity_store::SliceError, from_request: bool) -> RequestError {
    use entity_store::SliceError;
    match error {
        SliceError::Materialize(error) => stored_data_error(error),
        SliceError::OverlayParent { .. } => RequestError::invalid(RequestField::Entities, error),
        SliceError::Hierarchy(error) if from_request => {
            RequestError::invalid(RequestField::Entities, error)
        }
        SliceError::Hierarchy(error) => {
            tracing::error!(target: "arbiter::engine", %error, "decision refused: stored hierarchy");
            RequestError::Internal(error.to_string())
        }
    }
}

/// The overlay with each merge applied over the overlay's copy of the entity,
/// else the store's, else a new entity. Only the merged entities are copied.
fn merge_request_entities(
    data: &EntityData,
    overlay: Entities,
    scope: &RequestEntities,
    schema: Option<&Schema>,
) -> Result<Entities, RequestError> {
    let mut entities: Vec<Entity> = overlay.into_iter().collect();
    for merge in scope.merges() {
        let uid = parse_uid(
            Some(UidInput {
                type_name: &merge.uid.type_name,
                id: &merge.uid.id,
            }),
            RequestField::Entities,
        )?;
        let position = entities.iter().position(|entity| entity.uid() == uid);
        let base = match position {
            Some(index) => Some(entities.swap_remove(index)),
            None => data.get(&uid).map_err(stored_data_error)?,
        };
        let mut json = match base {
            Some(entity) => entity
                .to_json_value()
                .map_err(|error| RequestError::invalid(RequestField::Entities, error))?,
            None => serde_json::json!({
                "uid": {"type": merge.uid.type_name, "id": merge.uid.id},
                "attrs": {},
                "parents": [],
            }),
        };
        if let Some(object) = json.as_object_mut() {
            let attrs = object
                .entry("attrs")
                .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
            if let Some(attrs) = attrs.as_object_mut() {
                for (name, value) in &merge.attrs {
                    if merge.overwrite || !attrs.contains_key(name) {
                        attrs.insert(name.clone(), value.clone());
                    }
                }
            }
            let parents = object
                .entry("parents")
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
            if let Some(parents) = parents.as_array_mut() {
                for parent in &merge.parents {
                    let parent = serde_json::json!({"type": parent.type_name, "id": parent.id});
                    if !parents.contains(&parent) {
                        parents.push(parent);
                    }
                }
            }
        }
        let entity = Entity::from_json_value(json, schema).map_err(|error| {
            RequestError::invalid(
                RequestField::Entities,
                format!("entity `{uid}` with request data: {error}"),
            )
        })?;
        entities.push(entity);
    }
    Entities::from_entities(entities, None)
        .map_err(|error| RequestError::invalid(RequestField::Entities, error))
}
