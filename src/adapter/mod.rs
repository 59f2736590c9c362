//! Wire formats in, domain types out: the only layer that knows tonic,
//! prost and Envoy's types ([`ext_authz`]). Each adapter turns a wire request into an engine
//! [`CheckInput`](crate::engine::CheckInput), asks the engine, and turns the
//! [`Decision`](crate::engine::Decision) or error back into a wire answer.

pub mod admission;
pub mod authorizer;
pub mod caller;
pub mod codec;
pub mod connection;
pub mod decision_log;
pub mod ext_authz;
pub mod heavy;
pub mod status;
