//! `arbiter.v1.Authorizer`: Arbiter's own decision API. After the engine
//! decides, each decision (each batch item too) is handed to the decision
//! log as a [`DecisionEvent`]: strings moved out of the request, the peer
//! address and the `traceparent` header copied; nothing parsed or encoded
//! here.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::heavy::HeavyPool;
use super::status;
use crate::decision_log::{Caller, DecisionEvent, DecisionLogger, Transport, Uid};
use crate::engine::{CheckInput, Decision, Engine, Explanation, PolicyEffect, UidInput};
use crate::identity::SyncStatus;
use crate::proto::v1 as pb;
use crate::proto::v1::authorizer_server::Authorizer;
use crate::telemetry::DecisionMetrics;

/// The most checks one `CheckBatch` may carry.
pub const MAX_BATCH_CHECKS: usize = 256;

/// Serves `Check` and `CheckBatch` from the engine's current snapshot.
#[derive(Debug, Clone)]
pub struct AuthorizerService {
    engine: Arc<Engine>,
    metrics: Arc<DecisionMetrics>,
    log: DecisionLogger,
    identity: Option<(Arc<SyncStatus>, Duration)>,
    /// Where requests with their own entities are decided.
    heavy: HeavyPool,
}

impl AuthorizerService {
    /// A service that logs no decisions; see [`Self::with_decision_log`].
    pub fn new(engine: Arc<Engine>, metrics: Arc<DecisionMetrics>) -> Self {
        AuthorizerService {
            engine,
            metrics,
            log: DecisionLogger::disabled(),
            identity: None,
            heavy: HeavyPool::new(
                crate::engine::default_heavy_workers(),
                crate::engine::DEFAULT_HEAVY_QUEUE,
            ),
        }
    }

    /// Requests with their own entities are decided on `pool`.
    pub fn with_heavy_pool(mut self, pool: HeavyPool) -> Self {
        self.heavy = pool;
        self
    }

    pub fn with_decision_log(mut self, log: DecisionLogger) -> Self {
        self.log = log;
        self
    }

    /// Data comes from an identity sync: `min_data_revision` waits up to
    /// `revision_wait` for it, and decisions report stale data.
    pub fn with_identity(mut self, status: Arc<SyncStatus>, revision_wait: Duration) -> Self {
        self.identity = Some((status, revision_wait));
        self
    }

    fn stale(&self) -> bool {
        self.identity
            .as_ref()
            .is_some_and(|(status, _)| !status.is_fresh())
    }

    /// Waits until the data served is at least `min` (a source position).
    async fn wait_for_revision(&self, min: Option<u64>) -> Result<(), Status> {
        let Some(wanted) = min else {
            return Ok(());
        };
        let mut positions = self.engine.positions();
        let Some((_, wait)) = &self.identity else {
            return Err(status::revision_not_reached(
                wanted,
                None,
                "no identity source with revisions is configured",
            ));
        };
        let reached = matches!(
            tokio::time::timeout(
                *wait,
                positions.wait_for(|position| position.is_some_and(|p| p >= wanted)),
            )
            .await,
            Ok(Ok(_))
        );
        if reached {
            return Ok(());
        }
        let current = *positions.borrow();
        Err(status::revision_not_reached(
            wanted,
            current,
            &format!("sync did not reach it within {wait:?}"),
        ))
    }
}

/// What the decision log needs from the call besides the request itself.
fn call_facts<T>(log: &DecisionLogger, request: &Request<T>) -> Option<(Caller, Option<String>)> {
    if !log.is_enabled() {
        return None;
    }
    let caller = super::caller::of(request.extensions());
    let traceparent = request
        .metadata()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    Some((caller, traceparent))
}

fn owned_uid(uid: Option<pb::EntityUid>) -> Option<Uid> {
    uid.map(|uid| Uid {
        type_name: uid.r#type,
        id: uid.id,
    })
}

/// The decision log event, moving the request's strings.
fn event(
    request: pb::CheckRequest,
    decision: Decision,
    caller: Caller,
    traceparent: Option<String>,
) -> DecisionEvent {
    let mut event = DecisionEvent::new(Transport::Grpc, decision);
    event.principal = owned_uid(request.principal);
    event.action = owned_uid(request.action);
    event.resource = owned_uid(request.resource);
    event.context_json = request.context_json;
    event.caller = caller;
    event.traceparent = traceparent;
    event
}

/// The highest `min_data_revision` among requests (`None`: no requirement).
fn min_revision<'a>(
    requests: impl IntoIterator<Item = &'a pb::CheckRequest>,
) -> Result<Option<u64>, Status> {
    let mut highest = None;
    for request in requests {
        let text = request.min_data_revision.trim();
        if text.is_empty() {
            continue;
        }
        let wanted: u64 = text.parse().map_err(|_| status::invalid_revision(text))?;
        highest = highest.max(Some(wanted));
    }
    Ok(highest)
}

fn uid(uid: Option<&pb::EntityUid>) -> Option<UidInput<'_>> {
    uid.map(|uid| UidInput {
        type_name: &uid.r#type,
        id: &uid.id,
    })
}

fn input(request: &pb::CheckRequest) -> CheckInput<'_> {
    CheckInput {
        principal: uid(request.principal.as_ref()),
        action: uid(request.action.as_ref()),
        resource: uid(request.resource.as_ref()),
        context_json: &request.context_json,
        entities_json: &request.entities_json,
    }
}

fn policy_error(error: &crate::engine::PolicyEvaluationError) -> pb::PolicyError {
    pb::PolicyError {
        policy_id: error.policy_id.clone(),
        message: error.message.clone(),
    }
}

fn explanation(explanation: Explanation) -> pb::Explanation {
    pb::Explanation {
        determining: explanation.determining,
        errors: explanation.errors.iter().map(policy_error).collect(),
        conditions_false: explanation
            .conditions_false
            .into_iter()
            .map(|policy| pb::ExplainedPolicy {
                policy_id: policy.policy_id,
                effect: match policy.effect {
                    PolicyEffect::Permit => pb::Effect::Permit,
                    PolicyEffect::Forbid => pb::Effect::Forbid,
                } as i32,
            })
            .collect(),
        overridden_permits: explanation.overridden_permits,
    }
}

/// Explaining costs more than deciding: such requests, like those that
/// carry their own entities, are decided on the heavy pool.
fn is_heavy(request: &pb::CheckRequest) -> bool {
    request.explain || !request.entities_json.is_empty()
}

fn response(decision: &Decision, data_stale: bool) -> pb::CheckResponse {
    pb::CheckResponse {
        decision: if decision.allowed {
            pb::Decision::Allow as i32
        } else {
            pb::Decision::Deny as i32
        },
        reasons: decision.reasons.clone(),
        errors: decision.errors.iter().map(policy_error).collect(),
        decision_id: decision.decision_id.clone(),
        policy_revision: decision.policy_revision.to_string(),
        data_revision: decision.data_revision.to_string(),
        data_stale,
        explanation: None,
    }
}

#[tonic::async_trait]
impl Authorizer for AuthorizerService {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let min = min_revision([request.get_ref()])?;
        self.wait_for_revision(min).await?;
        let facts = call_facts(&self.log, &request);
        let request = request.into_inner();
        // Read before the decision takes its data: read after, a sync that
        // caught up meanwhile made an answer on the old data look fresh
        // (seen by the chaos run after a Postgres restart).
        let stale = self.stale();
        let (request, outcome) = if !is_heavy(&request) {
            let outcome = self.engine.check(&input(&request)).map(|d| (d, None));
            (request, outcome)
        } else {
            let engine = self.engine.clone();
            self.heavy
                .run(move || {
                    let outcome = if request.explain {
                        engine
                            .explain(&input(&request))
                            .map(|(decision, explanation)| (decision, Some(explanation)))
                    } else {
                        engine.check(&input(&request)).map(|d| (d, None))
                    };
                    (request, outcome)
                })
                .await?
        };
        match outcome {
            Ok((decision, explained)) => {
                self.metrics.record(&decision);
                let mut answer = response(&decision, stale);
                answer.explanation = explained.map(explanation);
                if let Some((caller, traceparent)) = facts {
                    self.log
                        .log(event(request, decision, caller, traceparent))
                        .await;
                }
                Ok(Response::new(answer))
            }
            Err(error) => {
                self.metrics.record_rejected();
                Err(status::request_error(&error))
            }
        }
    }

    async fn check_batch(
        &self,
        request: Request<pb::CheckBatchRequest>,
    ) -> Result<Response<pb::CheckBatchResponse>, Status> {
        let facts = call_facts(&self.log, &request);
        let checks = request.into_inner().checks;
        if checks.len() > MAX_BATCH_CHECKS {
            self.metrics.record_rejected();
            return Err(Status::invalid_argument(format!(
                "`checks` holds {} checks; at most {MAX_BATCH_CHECKS} are allowed in one batch",
                checks.len()
            )));
        }
        let min = min_revision(&checks)?;
        self.wait_for_revision(min).await?;
        let stale = self.stale();
        let decide = |engine: &Engine, checks: &[pb::CheckRequest]| {
            if checks.iter().any(|check| check.explain) {
                let inputs: Vec<(CheckInput<'_>, bool)> = checks
                    .iter()
                    .map(|check| (input(check), check.explain))
                    .collect();
                engine
                    .check_all_explained(&inputs)
                    .map(|answers| answers.into_iter().unzip())
            } else {
                let inputs: Vec<CheckInput<'_>> = checks.iter().map(input).collect();
                engine
                    .check_all(&inputs)
                    .map(|decisions| (decisions, Vec::new()))
            }
        };
        let (checks, outcome) = if !checks.iter().any(is_heavy) {
            let outcome = decide(&self.engine, &checks);
            (checks, outcome)
        } else {
            let engine = self.engine.clone();
            self.heavy
                .run(move || {
                    let outcome = decide(&engine, &checks);
                    (checks, outcome)
                })
                .await?
        };
        match outcome {
            Ok((decisions, mut explained)) => {
                let results = decisions
                    .iter()
                    .enumerate()
                    .map(|(index, decision)| {
                        self.metrics.record(decision);
                        let mut answer = response(decision, stale);
                        answer.explanation = explained
                            .get_mut(index)
                            .and_then(Option::take)
                            .map(explanation);
                        answer
                    })
                    .collect();
                if let Some((caller, traceparent)) = facts {
                    for (check, decision) in checks.into_iter().zip(decisions) {
                        self.log
                            .log(event(check, decision, caller.clone(), traceparent.clone()))
                            .await;
                    }
                }
                Ok(Response::new(pb::CheckBatchResponse { results }))
            }
            Err((index, error)) => {
                self.metrics.record_rejected();
                Err(status::batch_item_error(index, &error))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::engine::{LoadOptions, Sources, loader};

    fn request(explain: bool) -> pb::CheckRequest {
        let uid = |type_name: &str, id: &str| {
            Some(pb::EntityUid {
                r#type: type_name.into(),
                id: id.into(),
            })
        };
        pb::CheckRequest {
            principal: uid("Saas::User", "carol"),
            action: uid("Saas::Action", "write"),
            resource: uid("Saas::Document", "acme-roadmap"),
            context_json: r#"{"mfa": true, "source_ip": "10.1.2.3"}"#.into(),
            explain,
            ..Default::default()
        }
    }

    /// Explained requests are decided on the heavy pool: with its only
    /// worker busy and no queue, they are shed while plain checks answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn explained_requests_run_on_the_heavy_pool() {
        let engine = Arc::new(Engine::new());
        let (snapshot, _) = loader::load(&Sources::default(), LoadOptions::default()).unwrap();
        engine.publish(snapshot);
        let pool = HeavyPool::new(1, 0);
        let service = AuthorizerService::new(engine, Arc::new(DecisionMetrics::register()))
            .with_heavy_pool(pool.clone());

        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let busy = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(move || {
                    let _ = started_tx.send(());
                    let _ = held.recv();
                })
                .await
            })
        };
        started.await.unwrap();

        let shed = service
            .check(Request::new(request(true)))
            .await
            .unwrap_err();
        assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");
        let batch = pb::CheckBatchRequest {
            checks: vec![request(false), request(true)],
        };
        let shed = service.check_batch(Request::new(batch)).await.unwrap_err();
        assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");
        let plain = service.check(Request::new(request(false))).await.unwrap();
        assert!(plain.get_ref().explanation.is_none());

        release.send(()).unwrap();
        busy.await.unwrap().unwrap();
        let explained = service.check(Request::new(request(true))).await.unwrap();
        let explanation = explained.into_inner().explanation.expect("explained");
        assert!(!explanation.conditions_false.is_empty(), "{explanation:?}");
    }
}
