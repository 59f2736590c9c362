//! What a verified token's claims map to, and why a request could not be
//! mapped: the types that both the JWT verifier (`jwt.rs`, which caches a
//! token's mapping with the token) and the mapping (`mapping.rs`, which
//! computes it) use, in a module of their own so that neither imports the
//! other's internals (`jwt` ← `claims` → `mapping`, no cycle).

use std::sync::Arc;

use crate::engine::{EntityRef, SealedMerge};

/// Why a request could not be mapped. Every variant ends in a deny.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MappingError {
    /// No credentials where the principal source expects them (401).
    #[error("credentials are missing: {0}")]
    MissingCredentials(String),
    /// Credentials present but not acceptable (401).
    #[error("credentials are invalid: {0}")]
    InvalidCredentials(String),
    /// The request headers are larger than allowed (431).
    #[error("request headers take {size} bytes, more than {limit}")]
    HeadersTooLarge { size: usize, limit: usize },
    /// The request is not one that can be mapped (403).
    #[error("{0}")]
    Unmappable(String),
}

/// What one set of verified claims maps to. The same for every request
/// that carries the same token, so the service keeps it with the cached
/// token (`VerifiedToken::mapped`) instead of mapping per request.
#[derive(Debug)]
pub(crate) struct ClaimsMapping {
    pub uid: EntityRef,
    /// Claims merged over the cached principal, sealed: its decision-cache
    /// key text is computed once.
    pub merge: Arc<SealedMerge>,
    /// Per context field, in field order: the claim's JSON text for fields
    /// with source `claim` whose claim is present.
    pub(super) context_claims: Vec<Option<String>>,
}
