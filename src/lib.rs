//! Arbiter: a Cedar policy decision point that runs as a sidecar.
//!
//! One request crosses the crate left to right, each room once:
//!
//! ```text
//! gRPC  ─▶ adapter (wire ⇄ domain) ─▶ engine::Engine::check ─▶ Decision ─▶ adapter ─▶ wire
//! Envoy ─▶ adapter::ext_authz (mapping) ─▶ engine::Engine::check_with ─┘           │
//!                                      │ reads Arc<Snapshot> (one atomic load)      ▼
//!         reload (watch files) ────────┤ publishes a new Snapshot          decision_log: queue
//!         identity (Postgres, SCIM) ───┘ publishes new entity data         ─▶ spool ─▶ sinks
//! ```
//!
//! Layout:
//! - [`adapter`]: the only module that knows tonic, prost and Envoy's types;
//!   errors become gRPC statuses in [`adapter::status`]; Envoy's ext_authz
//!   in [`adapter::ext_authz`].
//! - [`engine`]: pure decisions: no IO, no await, no locks; loading lives in
//!   [`engine::loader`], shared by the server and every CLI subcommand.
//! - [`decision_log`]: every decision, redacted, to a write-ahead spool
//!   and from there to stdout, file, NATS JetStream and gRPC collector sinks.
//! - [`reload`]: hot reload of policy, schema and entity files.
//! - [`identity`]: keeps entity data in sync with an identity store
//!   (PostgreSQL, SCIM 2.0), incrementally; writes the engine's data and nothing else.
//! - [`app`]: builds the server from [`app::ServeConfig`], runs and drains it.
//! - [`admin`]: `/live`, `/ready`, `/metrics`.
//! - [`config`]: flags, `ARBITER_*` env and the TOML file, merged.
//! - [`telemetry`]: logging and metric handles.
//! - [`cli`]: one module per subcommand.

pub mod adapter;
pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod decision_log;
pub mod engine;
pub mod fixtures;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod reload;
pub mod shutdown;
pub mod telemetry;

/// Code generated from `proto/`.
pub mod proto {
    /// The file descriptor set of `proto/`, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/arbiter_descriptor.bin"));
    /// The file descriptor set of Envoy's `envoy.service.auth.v3` (ext_authz)
    /// and its imports, served by gRPC reflection when ext_authz is on.
    pub const ENVOY_EXT_AUTHZ_FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/envoy_ext_authz_descriptor.bin"));

    pub mod v1 {
        tonic::include_proto!("arbiter.v1");
    }
}
