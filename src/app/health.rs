//! gRPC health: one status for the server (`""`), `arbiter.v1.Authorizer`
//! and `envoy.service.auth.v3.Authorization` alike.

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::adapter::ext_authz;

const SERVICES: [&str; 3] = ["", "arbiter.v1.Authorizer", ext_authz::SERVICE_NAME];

/// The health reporter of a running server.
#[derive(Clone)]
pub(super) struct Health {
    reporter: HealthReporter,
}

impl Health {
    /// The reporter, `NOT_SERVING`, and the gRPC health service it feeds.
    pub(super) async fn not_serving() -> (
        Self,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, service) = tonic_health::server::health_reporter();
        let health = Health { reporter };
        health.set(ServingStatus::NotServing).await;
        (health, service)
    }

    pub(super) async fn set(&self, status: ServingStatus) {
        for service in SERVICES {
            self.reporter.set_service_status(service, status).await;
        }
    }

    /// Ends every open health `Watch` stream (after they were told
    /// NOT_SERVING), so they do not hold the drain open.
    pub(super) async fn end_watches(mut self) {
        tokio::task::yield_now().await;
        for service in SERVICES {
            self.reporter.clear_service_status(service).await;
        }
    }
}
