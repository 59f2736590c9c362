//! Admission: the checks every gRPC call passes before any service sees it,
//! as one tower layer on each listener's server (so Authorizer, ext_authz,
//! DecisionLog tail and reflection all get them; gRPC health is exempt, so
//! probes work without a certificate). In order:
//!
//! 1. who may call: on the TLS listener, the verified client certificate's
//!    URI and DNS SANs against `tls.allowed_callers`; on the Unix socket, the
//!    peer's `SO_PEERCRED` uid against `uds.allowed_uids`. Others get
//!    `PERMISSION_DENIED` naming the identity they presented;
//! 2. an already expired `grpc-timeout` (zero) is `DEADLINE_EXCEEDED`;
//! 3. at most `max_in_flight` calls at once over every listener; beyond it
//!    `RESOURCE_EXHAUSTED` at once (shed, never queued).
//!
//! The certificate check parses a certificate once: verdicts are kept per
//! certificate (its DER bytes) in a bounded cache, so the hot path is one
//! hash of the certificate and no allocation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::status;

/// Distinct client certificates whose verdict is remembered.
const VERDICT_CACHE_CAPACITY: u64 = 1_024;

/// One `tls.allowed_callers` entry. The rule: a pattern containing `://` is
/// a URI (a SPIFFE id): equal to a URI SAN, or, ending in `*`, a prefix of
/// one. Any other pattern is a DNS name: equal to a DNS SAN (ASCII case
/// ignored), or, starting with `*.`, any name with one or more labels
/// before that suffix (`*.svc.cluster.local` matches
/// `web.app.svc.cluster.local`, not `svc.cluster.local`). No other `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerPattern {
    UriExact(String),
    UriPrefix(String),
    DnsExact(String),
    /// The suffix with its leading dot (`.svc.cluster.local`).
    DnsSuffix(String),
}

impl CallerPattern {
    /// Parses one pattern; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("an empty pattern".into());
        }
        if text.contains("://") {
            return match text.find('*') {
                None => Ok(CallerPattern::UriExact(text.to_owned())),
                Some(at) if at == text.len() - 1 => {
                    Ok(CallerPattern::UriPrefix(text[..at].to_owned()))
                }
                Some(_) => Err(format!(
                    "`{text}`: a URI pattern may only end in `*` (a prefix match)"
                )),
            };
        }
        let lower = text.to_ascii_lowercase();
        match lower.strip_prefix('*') {
            Some(suffix)
                if suffix.starts_with('.') && suffix.len() > 1 && !suffix.contains('*') =>
            {
                Ok(CallerPattern::DnsSuffix(suffix.to_owned()))
            }
            Some(_) => Err(format!(
                "`{text}`: a DNS pattern may only start with `*.` (any labels before the rest)"
            )),
            None if lower.contains('*') => Err(format!(
                "`{text}`: a DNS pattern may only start with `*.` (any labels before the rest)"
            )),
            None => Ok(CallerPattern::DnsExact(lower)),
        }
    }

    fn matches_uri(&self, uri: &str) -> bool {
        match self {
            CallerPattern::UriExact(want) => uri == want,
            CallerPattern::UriPrefix(prefix) => uri.starts_with(prefix.as_str()),
            _ => false,
        }
    }

    fn matches_dns(&self, dns: &str) -> bool {
        match self {
            CallerPattern::DnsExact(want) => dns.eq_ignore_ascii_case(want),
            CallerPattern::DnsSuffix(suffix) => {
                dns.len() > suffix.len()
                    && dns.is_char_boundary(dns.len() - suffix.len())
                    && dns[dns.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
            _ => false,
        }
    }
}

/// What the admission layer enforces, from the config.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// `tls.allowed_callers`; `None` admits every verified certificate.
    pub allowed_callers: Option<Vec<CallerPattern>>,
    /// `uds.allowed_uids`; `None` admits every peer of the socket.
    pub allowed_uids: Option<Vec<u32>>,
    /// Calls in flight over every listener.
    pub max_in_flight: usize,
}

/// Default `max_in_flight`: generous (an ordinary call holds a slot for
/// microseconds), yet a bound on what a flood can hold.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1_024;

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            allowed_callers: None,
            allowed_uids: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// The tower layer for one listener; every listener's layer shares the
/// in-flight count.
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    listener: &'static str,
    allowed_callers: Option<Vec<CallerPattern>>,
    allowed_uids: Option<Vec<u32>>,
    verdicts: moka::sync::Cache<Box<[u8]>, Verdict, foldhash::fast::RandomState>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
    refused: metrics::Counter,
    /// Unix second of the last refusal logged at warn level.
    last_warned: AtomicU64,
}

/// `Err` holds the identity the refused certificate presented.
type Verdict = Result<(), Arc<str>>;

impl AdmissionLayer {
    /// The layer of `listener` (`"tcp"` or `"uds"`); `in_flight` is shared
    /// by every listener's layer.
    pub fn new(
        listener: &'static str,
        config: &AdmissionConfig,
        in_flight: Arc<AtomicUsize>,
    ) -> Self {
        metrics::describe_counter!(
            "arbiter_callers_refused_total",
            "Calls refused because the caller is not allowed (tls.allowed_callers, uds.allowed_uids)"
        );
        AdmissionLayer {
            shared: Arc::new(Shared {
                listener,
                allowed_callers: config.allowed_callers.clone(),
                allowed_uids: config.allowed_uids.clone(),
                verdicts: moka::sync::Cache::builder()
                    .max_capacity(VERDICT_CACHE_CAPACITY)
                    .build_with_hasher(foldhash::fast::RandomState::default()),
                in_flight,
                max_in_flight: config.max_in_flight.max(1),
                refused: metrics::counter!("arbiter_callers_refused_total", "listener" => listener),
                last_warned: AtomicU64::new(0),
            }),
        }
    }
}

impl<S> tower_layer::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The layer's service.
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Gives back an in-flight slot when the call's answer is ready (for a
/// stream, when its headers are: the tail's records do not hold a slot).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S, B> tower_service::Service<http::Request<B>> for Admission<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path().starts_with("/grpc.health.v1.Health/") {
            return Box::pin(self.inner.call(request));
        }
        if let Err(refusal) = self.shared.admit_caller(request.extensions()) {
            return Box::pin(std::future::ready(Ok(refusal.into_http())));
        }
        if request
            .headers()
            .get("grpc-timeout")
            .is_some_and(|value| expired(value.as_bytes()))
        {
            metrics::counter!("arbiter_requests_shed_total", "reason" => "deadline").increment(1);
            return Box::pin(std::future::ready(
                Ok(status::deadline_passed().into_http()),
            ));
        }
        let in_flight = &self.shared.in_flight;
        if in_flight.fetch_add(1, Ordering::AcqRel) >= self.shared.max_in_flight {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("arbiter_requests_shed_total", "reason" => "in_flight").increment(1);
            return Box::pin(std::future::ready(Ok(status::too_many_in_flight(
                self.shared.max_in_flight,
            )
            .into_http())));
        }
        let slot = Slot(in_flight.clone());
        // The usual tower dance: call the clone that was made ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let answer = inner.call(request).await;
            drop(slot);
            answer
        })
    }
}

/// A `grpc-timeout` of zero (any unit): the deadline has passed on arrival.
/// A malformed value is left to tonic.
fn expired(value: &[u8]) -> bool {
    match value.split_last() {
        Some((unit, digits)) => {
            b"HMSmun".contains(unit) && !digits.is_empty() && digits.iter().all(|d| *d == b'0')
        }
        None => false,
    }
}

impl Shared {
    fn admit_caller(&self, extensions: &http::Extensions) -> Result<(), tonic::Status> {
        if let Some(allowed) = &self.allowed_callers
            && let Some(tls) = extensions.get::<TlsConnectInfo<TcpConnectInfo>>()
        {
            let certs = tls.peer_certs();
            let Some(leaf) = certs.as_ref().and_then(|certs| certs.first()) else {
                return Err(self.refuse("no client certificate"));
            };
            let der: &[u8] = leaf.as_ref();
            let verdict = match self.verdicts.get(der) {
                Some(verdict) => verdict,
                None => {
                    let verdict = verdict(allowed, der);
                    self.verdicts.insert(der.into(), verdict.clone());
                    verdict
                }
            };
            return verdict.map_err(|identity| self.refuse(&identity));
        }
        if let Some(allowed) = &self.allowed_uids
            && let Some(uds) = extensions.get::<UdsConnectInfo>()
        {
            return match uds.peer_cred {
                Some(cred) if allowed.contains(&cred.uid()) => Ok(()),
                Some(cred) => Err(self.refuse(&format!("uid={}", cred.uid()))),
                None => Err(self.refuse("unknown peer credentials")),
            };
        }
        Ok(())
    }

    /// Counts and logs a refusal: at warn at most once a second per
    /// listener (a refused client retrying would flood the log), at debug
    /// otherwise.
    fn refuse(&self, identity: &str) -> tonic::Status {
        self.refused.increment(1);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_warned.load(Ordering::Relaxed);
        if last != now
            && self
                .last_warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(target: "arbiter::adapter", listener = self.listener, caller = %status::bounded(identity), "caller refused");
        } else {
            tracing::debug!(target: "arbiter::adapter", listener = self.listener, caller = %status::bounded(identity), "caller refused");
        }
        status::caller_refused(self.listener, identity)
    }
}

/// Whether a certificate's URI or DNS SANs match a pattern; a refusal
/// carries the identity it presented (as the decision log names it).
fn verdict(allowed: &[CallerPattern], der: &[u8]) -> Verdict {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Err("an unreadable certificate".into());
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            let hit = match name {
                GeneralName::URI(uri) => allowed.iter().any(|p| p.matches_uri(uri)),
                GeneralName::DNSName(dns) => allowed.iter().any(|p| p.matches_dns(dns)),
                _ => false,
            };
            if hit {
                return Ok(());
            }
        }
    }
    Err(super::caller::identity(der)
        .unwrap_or_else(|| "a certificate with no name".into())
        .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_follow_the_documented_rule() {
        let spiffe = CallerPattern::parse("spiffe://example.org/ns/app/*").unwrap();
        assert!(spiffe.matches_uri("spiffe://example.org/ns/app/sa/web"));
        assert!(!spiffe.matches_uri("spiffe://example.org/ns/other/sa/web"));
        assert!(!spiffe.matches_dns("spiffe://example.org/ns/app/sa/web"));
        let exact = CallerPattern::parse("spiffe://example.org/ns/app/sa/web").unwrap();
        assert!(exact.matches_uri("spiffe://example.org/ns/app/sa/web"));
        assert!(!exact.matches_uri("spiffe://example.org/ns/app/sa/web2"));
        let dns = CallerPattern::parse("*.svc.cluster.local").unwrap();
        assert!(dns.matches_dns("web.app.svc.cluster.local"));
        assert!(dns.matches_dns("WEB.svc.Cluster.local"));
        assert!(!dns.matches_dns("svc.cluster.local"));
        assert!(!dns.matches_dns("evilsvc.cluster.local"));
        let host = CallerPattern::parse("Web.Example.org").unwrap();
        assert!(host.matches_dns("web.example.org"));
        assert!(!host.matches_dns("x.web.example.org"));
        for bad in ["", "*", "a.*.org", "web*", "spiffe://a/*/b", "**.org"] {
            assert!(CallerPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_zero_timeout_has_expired() {
        assert!(expired(b"0n"));
        assert!(expired(b"000m"));
        assert!(!expired(b"1n"));
        assert!(!expired(b"n"));
        assert!(!expired(b"0x"));
        assert!(!expired(b""));
    }
}
