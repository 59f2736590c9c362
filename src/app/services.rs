//! The gRPC services every listener serves: health, reflection,
//! `arbiter.v1.Authorizer`, `arbiter.v1.DecisionLog` and, with an
//! `[ext_authz]` table, Envoy's `envoy.service.auth.v3.Authorization`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::adapter::authorizer::AuthorizerService;
use crate::adapter::decision_log::DecisionLogService;
use crate::adapter::ext_authz::ExtAuthzConfig;
use crate::adapter::heavy::HeavyPool;
use crate::decision_log::DecisionLog;
use crate::engine::{Engine, LoadError, RequestLimits};
use crate::identity::SyncStatus;
use crate::proto::v1::authorizer_server::AuthorizerServer;
use crate::proto::v1::decision_log_server::DecisionLogServer;
use crate::telemetry::DecisionMetrics;

use super::ServeError;

/// What the services are built from.
pub(super) struct Services<'a> {
    pub(super) engine: &'a Arc<Engine>,
    pub(super) metrics: &'a Arc<DecisionMetrics>,
    pub(super) decision_log: &'a DecisionLog,
    /// The identity sync and how long `min_data_revision` may wait for it.
    pub(super) identity: Option<(Arc<SyncStatus>, Duration)>,
    /// The heavy pool's threads and queue.
    pub(super) limits: &'a RequestLimits,
    pub(super) ext_authz: Option<&'a ExtAuthzConfig>,
    pub(super) max_message_bytes: usize,
    /// Ends open `DecisionLog/Tail` streams at the drain.
    pub(super) stop: &'a watch::Receiver<bool>,
}

impl Services<'_> {
    pub(super) fn routes<H>(
        self,
        health: tonic_health::pb::health_server::HealthServer<H>,
    ) -> Result<tonic::service::Routes, ServeError>
    where
        H: tonic_health::pb::health_server::Health,
    {
        let mut reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        // Reflection lists the services of the files it holds: Envoy's only
        // when its service is mounted.
        if self.ext_authz.is_some() {
            reflection = reflection.register_encoded_file_descriptor_set(
                crate::proto::ENVOY_EXT_AUTHZ_FILE_DESCRIPTOR_SET,
            );
        }
        let reflection = reflection
            .build_v1()
            .map_err(|error| ServeError::InitialLoad(LoadError::one("<reflection>", error)))?;

        let mut authorizer = AuthorizerService::new(self.engine.clone(), self.metrics.clone())
            .with_decision_log(self.decision_log.logger())
            .with_heavy_pool(HeavyPool::new(
                self.limits.heavy_workers,
                self.limits.heavy_queue,
            ));
        if let Some((status, revision_wait)) = self.identity {
            authorizer = authorizer.with_identity(status, revision_wait);
        }
        let mut routes = tonic::service::Routes::new(health)
            .add_service(reflection)
            .add_service(
                AuthorizerServer::new(authorizer).max_decoding_message_size(self.max_message_bytes),
            )
            .add_service(
                DecisionLogServer::new(DecisionLogService::new(
                    self.decision_log.tail_source(),
                    self.stop.clone(),
                ))
                .max_decoding_message_size(self.max_message_bytes),
            );
        if let Some(ext_authz) = self.ext_authz {
            let service = ext_authz
                .build(self.engine.clone(), self.metrics.clone())?
                .with_decision_log(self.decision_log.logger());
            routes = routes.add_service(
                service
                    .into_server()
                    .max_decoding_message_size(self.max_message_bytes),
            );
        }
        Ok(routes)
    }
}
