//! `arbiter.v1.Authorizer`: Arbiter's own decision API.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::status;
use crate::engine::{CheckInput, Decision, Engine, UidInput};
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
}

impl AuthorizerService {
    pub fn new(engine: Arc<Engine>, metrics: Arc<DecisionMetrics>) -> Self {
        AuthorizerService { engine, metrics }
    }
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

fn response(decision: Decision) -> pb::CheckResponse {
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
    }
}

#[tonic::async_trait]
impl Authorizer for AuthorizerService {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        match self.engine.check(&input(request.get_ref())) {
            Ok(decision) => {
                self.metrics.record(&decision);
                Ok(Response::new(response(decision)))
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
        let inputs: Vec<CheckInput<'_>> = checks.iter().map(input).collect();
        match self.engine.check_all(&inputs) {
            Ok(decisions) => {
                let results = decisions
                    .into_iter()
                    .map(|decision| {
                        self.metrics.record(&decision);
                        response(decision)
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
