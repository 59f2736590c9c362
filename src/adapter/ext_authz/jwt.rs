//! Bearer JWT verification for ext_authz: keys from a JWKS file or URL,
//! cached and refreshed, and a bounded cache of verified tokens so the hot
//! path with a known token is one hash lookup.
//!
//! Invariants:
//! - the algorithm is pinned per key from the JWKS (`alg`, else inferred
//!   from `kty`/`crv`: RSA → RS256, P-256 → ES256, Ed25519 → EdDSA); the
//!   token's `alg` must equal it and never chooses the key type; `none` and
//!   HMAC are never accepted;
//! - `iss`, `aud` and `exp` are required, `nbf` is checked when present, all
//!   with `leeway_secs` of clock skew;
//! - a cached token is served only until its `exp` (plus leeway), and the
//!   cache is emptied whenever the key set changes (rotation, revocation);
//! - an unknown `kid` triggers at most one JWKS fetch per
//!   `min_refresh_interval_secs`, so random kids cannot flood the IdP.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use super::claims::{ClaimsMapping, MappingError};

fn default_leeway() -> u64 {
    60
}
fn default_header() -> String {
    "authorization".into()
}
fn default_refresh() -> u64 {
    300
}
fn default_min_refresh() -> u64 {
    10
}
fn default_token_cache() -> u64 {
    10_000
}
fn default_fetch_timeout() -> u64 {
    5
}

/// `[ext_authz.principal.jwt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// JWKS file (re-read every `refresh_secs`). One of file or URL.
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL (`https://...`; `http://` for local testing).
    pub jwks_url: Option<String>,
    /// Accepted `iss` values (at least one).
    pub issuers: Vec<String>,
    /// Accepted `aud` values (at least one).
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds [default: 60].
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Header holding `Bearer <token>` [default: "authorization"].
    #[serde(default = "default_header")]
    pub header: String,
    /// Keys are re-fetched this often, in seconds [default: 300].
    #[serde(default = "default_refresh")]
    pub refresh_secs: u64,
    /// An unknown `kid` re-fetches keys at most this often [default: 10].
    #[serde(default = "default_min_refresh")]
    pub min_refresh_interval_secs: u64,
    /// Verified tokens remembered (until their `exp`) [default: 10000].
    #[serde(default = "default_token_cache")]
    pub token_cache_size: u64,
    /// Timeout of one JWKS fetch, in seconds [default: 5].
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout_secs: u64,
}

/// Why a token was refused. Each becomes a 401.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("no key `{0}` in the key set")]
    UnknownKey(String),
    #[error("no key for algorithm {0:?}")]
    NoKeyForAlgorithm(Algorithm),
    #[error("the token is signed with {token:?} but key `{kid}` is {key:?}")]
    AlgorithmMismatch {
        kid: String,
        token: Algorithm,
        key: Algorithm,
    },
    #[error("the token is not valid: {0}")]
    Invalid(String),
}

/// A JWKS that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("`jwt`: exactly one of `jwks_file` and `jwks_url` must be set")]
    Source,
    #[error("`jwt`: {0} must not be empty")]
    Empty(&'static str),
    #[error("cannot read the JWKS `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot fetch the JWKS `{url}`: {message}")]
    Fetch { url: String, message: String },
    #[error("the JWKS is not valid JSON with a `keys` array: {0}")]
    Parse(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// A key with its pinned algorithm.
struct Key {
    kid: Option<String>,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algorithm", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl Key {
    fn algorithm(&self) -> Option<Algorithm> {
        self.validation.algorithms.first().copied()
    }
}

#[derive(Debug, Default)]
struct KeySet {
    keys: Vec<Arc<Key>>,
    by_kid: HashMap<String, Arc<Key>>,
    /// Canonical text of the JWKS, to tell whether a refresh changed it.
    fingerprint: String,
}

/// The claims of a verified token.
#[derive(Debug)]
pub struct VerifiedToken {
    pub claims: Value,
    /// `exp` plus leeway, seconds since the Unix epoch.
    valid_until: u64,
    /// What the service's mapping makes of the claims (principal, its
    /// request-scoped attributes and parents, claim context fields), worked
    /// out at the first request with this token: claims and mapping are
    /// fixed for the token's life, and a client reuses its token.
    pub(crate) mapped: OnceLock<Result<Arc<ClaimsMapping>, MappingError>>,
}

struct UntilExp;

impl moka::Expiry<Box<str>, Arc<VerifiedToken>> for UntilExp {
    fn expire_after_create(
        &self,
        _key: &Box<str>,
        value: &Arc<VerifiedToken>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs(
            value.valid_until.saturating_sub(now_secs()),
        ))
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Verifies bearer tokens against the configured key set.
pub struct JwtVerifier {
    config: JwtConfig,
    keys: ArcSwap<KeySet>,
    /// foldhash: a token is ~1 KB, hashed on every request.
    tokens: moka::sync::Cache<Box<str>, Arc<VerifiedToken>, foldhash::fast::RandomState>,
    /// When keys were last fetched: one fetch at a time.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    client: Option<reqwest::Client>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("keys", &self.keys.load().keys.len())
            .field("cached_tokens", &self.tokens.entry_count())
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// Builds the verifier. A JWKS file is read now (an unreadable file is
    /// an error); a URL is fetched by the refresh task started by
    /// [`JwtVerifier::spawn_refresh`] and on the first unknown key.
    pub fn build(config: &JwtConfig) -> Result<Arc<Self>, JwksError> {
        if config.jwks_file.is_some() == config.jwks_url.is_some() {
            return Err(JwksError::Source);
        }
        if config.issuers.is_empty() {
            return Err(JwksError::Empty("issuers"));
        }
        if config.audiences.is_empty() {
            return Err(JwksError::Empty("audiences"));
        }
        let client = match &config.jwks_url {
            Some(_) => Some(
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(config.fetch_timeout_secs.max(1)))
                    .build()
                    .map_err(|error| JwksError::Client(error.to_string()))?,
            ),
            None => None,
        };
        let verifier = JwtVerifier {
            config: config.clone(),
            keys: ArcSwap::from_pointee(KeySet::default()),
            tokens: moka::sync::Cache::builder()
                .max_capacity(config.token_cache_size)
                .expire_after(UntilExp)
                .build_with_hasher(foldhash::fast::RandomState::default()),
            last_fetch: tokio::sync::Mutex::new(None),
            client,
        };
        if let Some(path) = &config.jwks_file {
            let bytes = std::fs::read(path).map_err(|source| JwksError::Read {
                path: path.clone(),
                source,
            })?;
            verifier.install(&bytes)?;
        }
        Ok(Arc::new(verifier))
    }

    /// The header that carries the bearer token (lower-case).
    pub fn header(&self) -> String {
        self.config.header.to_ascii_lowercase()
    }

    /// Re-fetches keys every `refresh_secs` (at once for a URL) until the
    /// verifier is dropped.
    pub fn spawn_refresh(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        let every = Duration::from_secs(self.config.refresh_secs.max(1));
        let fetch_now = self.config.jwks_url.is_some();
        tokio::spawn(async move {
            if !fetch_now {
                tokio::time::sleep(every).await;
            }
            loop {
                let Some(verifier) = weak.upgrade() else {
                    return;
                };
                if let Err(error) = verifier.refresh().await {
                    tracing::warn!(%error, "JWKS refresh failed; keeping the current keys");
                }
                drop(verifier);
                tokio::time::sleep(every).await;
            }
        });
    }

    /// Loads the key set now.
    pub async fn refresh(&self) -> Result<(), JwksError> {
        let mut last = self.last_fetch.lock().await;
        *last = Some(Instant::now());
        let bytes = self.fetch().await?;
        self.install(&bytes)
    }

    /// Refreshes unless the last fetch was less than the minimum interval
    /// ago; waits for a fetch in progress instead of starting another.
    async fn refresh_if_due(&self) {
        let mut last = self.last_fetch.lock().await;
        let min = Duration::from_secs(self.config.min_refresh_interval_secs);
        if last.is_some_and(|at| at.elapsed() < min) {
            return;
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(bytes) => {
                if let Err(error) = self.install(&bytes) {
                    tracing::warn!(%error, "JWKS refresh failed; keeping the current keys");
                }
            }
            Err(error) => tracing::warn!(%error, "JWKS refresh failed; keeping the current keys"),
        }
    }

    async fn fetch(&self) -> Result<Vec<u8>, JwksError> {
        if let Some(path) = &self.config.jwks_file {
            return tokio::fs::read(path)
                .await
                .map_err(|source| JwksError::Read {
                    path: path.clone(),
                    source,
                });
        }
        let (Some(url), Some(client)) = (&self.config.jwks_url, &self.client) else {
            return Err(JwksError::Source);
        };
        let fetch_error = |message: String| JwksError::Fetch {
            url: url.clone(),
            message,
        };
        let response = client
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|error| fetch_error(error.to_string()))?;
        let bytes = response
            .bytes()
            .await
            .map_err(|error| fetch_error(error.to_string()))?;
        Ok(bytes.to_vec())
    }

    /// Parses a JWKS and makes it current; empties the token cache when the
    /// key set changed.
    fn install(&self, bytes: &[u8]) -> Result<(), JwksError> {
        let keys = parse_jwks(bytes, &self.config)?;
        if keys.fingerprint != self.keys.load().fingerprint {
            tracing::info!(keys = keys.keys.len(), "JWKS key set changed");
            self.keys.store(Arc::new(keys));
            self.tokens.invalidate_all();
        }
        Ok(())
    }

    /// Verifies a token (the text after `Bearer `).
    pub async fn verify(&self, token: &str) -> Result<Arc<VerifiedToken>, JwtError> {
        if let Some(hit) = self.tokens.get(token) {
            if now_secs() <= hit.valid_until {
                return Ok(hit);
            }
            self.tokens.invalidate(token);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|error| JwtError::Malformed(error.to_string()))?;
        let key = match self.find_key(header.kid.as_deref(), header.alg) {
            Ok(key) => key,
            Err(JwtError::UnknownKey(_) | JwtError::NoKeyForAlgorithm(_)) => {
                // Perhaps rotated: look again after a (rate-limited) fetch.
                self.refresh_if_due().await;
                self.find_key(header.kid.as_deref(), header.alg)?
            }
            Err(error) => return Err(error),
        };
        let data = jsonwebtoken::decode::<Value>(token, &key.decoding, &key.validation)
            .map_err(|error| JwtError::Invalid(describe(&error)))?;
        let exp = data.claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        let verified = Arc::new(VerifiedToken {
            claims: data.claims,
            valid_until: exp.saturating_add(self.config.leeway_secs),
            mapped: OnceLock::new(),
        });
        self.tokens.insert(token.into(), verified.clone());
        Ok(verified)
    }

    fn find_key(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<Key>, JwtError> {
        let keys = self.keys.load();
        let key = match kid {
            Some(kid) => keys
                .by_kid
                .get(kid)
                .cloned()
                .ok_or_else(|| JwtError::UnknownKey(kid.to_string()))?,
            // Without a kid, only a key pinned to the token's algorithm.
            None => keys
                .keys
                .iter()
                .find(|key| key.algorithm() == Some(alg))
                .cloned()
                .ok_or(JwtError::NoKeyForAlgorithm(alg))?,
        };
        match key.algorithm() {
            Some(pinned) if pinned == alg => Ok(key),
            pinned => Err(JwtError::AlgorithmMismatch {
                kid: kid.unwrap_or("").to_string(),
                token: alg,
                key: pinned.unwrap_or(alg),
            }),
        }
    }
}

fn describe(error: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::ImmatureSignature => "not valid yet (nbf)".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing claim `{claim}`"),
        _ => error.to_string(),
    }
}

/// The algorithm a JWK is pinned to, or `None` when it is not a supported
/// signature key.
fn pinned_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    let inferred = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(params) if params.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        AlgorithmParameters::OctetKeyPair(params) if params.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(inferred),
        Some(KeyAlgorithm::RS256) if inferred == Algorithm::RS256 => Some(inferred),
        Some(KeyAlgorithm::ES256) if inferred == Algorithm::ES256 => Some(inferred),
        Some(KeyAlgorithm::EdDSA) if inferred == Algorithm::EdDSA => Some(inferred),
        Some(_) => None,
    }
}

fn parse_jwks(bytes: &[u8], config: &JwtConfig) -> Result<KeySet, JwksError> {
    #[derive(Deserialize)]
    struct Raw {
        keys: Vec<Value>,
    }
    let raw: Raw =
        serde_json::from_slice(bytes).map_err(|error| JwksError::Parse(error.to_string()))?;
    let mut set = KeySet::default();
    let mut fingerprint = Vec::new();
    for value in raw.keys {
        let jwk: Jwk = match serde_json::from_value(value.clone()) {
            Ok(jwk) => jwk,
            Err(error) => {
                tracing::warn!(%error, "JWKS: skipping a key that cannot be read");
                continue;
            }
        };
        let Some(algorithm) = pinned_algorithm(&jwk) else {
            tracing::warn!(
                kid = jwk.common.key_id.as_deref().unwrap_or(""),
                "JWKS: skipping a key that is not RS256, ES256 or EdDSA for signatures"
            );
            continue;
        };
        let decoding = match DecodingKey::from_jwk(&jwk) {
            Ok(decoding) => decoding,
            Err(error) => {
                tracing::warn!(%error, "JWKS: skipping an invalid key");
                continue;
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.leeway = config.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_issuer(&config.issuers);
        validation.set_audience(&config.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let key = Arc::new(Key {
            kid: jwk.common.key_id.clone(),
            decoding,
            validation,
        });
        if let Some(kid) = &key.kid {
            set.by_kid.insert(kid.clone(), key.clone());
        }
        set.keys.push(key);
        fingerprint.push(value.to_string());
    }
    fingerprint.sort();
    set.fingerprint = fingerprint.join("\n");
    Ok(set)
}
