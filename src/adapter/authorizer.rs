//! `arbiter.v1.Authorizer`: Arbiter's own decision API.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::status;
use crate::engine::{CheckInput, Decision, Engine, UidInput};
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
    identity: Option<(Arc<SyncStatus>, Duration)>,
}

impl AuthorizerService {
    pub fn new(engine: Arc<Engine>, metrics: Arc<DecisionMetrics>) -> Self {
        AuthorizerService {
            engine,
            metrics,
            identity: None,
        }
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

fn response(decision: Decision, data_stale: bool) -> pb::CheckResponse {
    pb::CheckResponse {
        decision: if decision.allowed {
            pb::Decision::Allow as i32
        } else {
            pb::Decision::Deny as i32
        },
        reasons: decision.reasons,
        errors: decision
            .errors
            .into_iter()
            .map(|error| pb::PolicyError {
                policy_id: error.policy_id,
                message: error.message,
            })
            .collect(),
        decision_id: decision.decision_id,
        policy_revision: decision.policy_revision.to_string(),
        data_revision: decision.data_revision.to_string(),
        data_stale,
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
        match self.engine.check(&input(request.get_ref())) {
            Ok(decision) => {
                self.metrics.record(&decision);
                Ok(Response::new(response(decision, self.stale())))
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
        let checks = &request.get_ref().checks;
        if checks.len() > MAX_BATCH_CHECKS {
            self.metrics.record_rejected();
            return Err(Status::invalid_argument(format!(
                "`checks` holds {} checks; at most {MAX_BATCH_CHECKS} are allowed in one batch",
                checks.len()
            )));
        }
        let min = min_revision(checks)?;
        self.wait_for_revision(min).await?;
        let stale = self.stale();
        let inputs: Vec<CheckInput<'_>> = checks.iter().map(input).collect();
        match self.engine.check_all(&inputs) {
            Ok(decisions) => {
                let results = decisions
                    .into_iter()
                    .map(|decision| {
                        self.metrics.record(&decision);
                        response(decision, stale)
                    })
                    .collect();
                Ok(Response::new(pb::CheckBatchResponse { results }))
            }
            Err((index, error)) => {
                self.metrics.record_rejected();
                Err(status::batch_item_error(index, &error))
            }
        }
    }
}
