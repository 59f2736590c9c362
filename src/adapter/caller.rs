//! Who called, as the transport knows it: the TCP peer, the verified mTLS
//! client certificate, or the Unix-socket peer's credentials. Read from the
//! connection info tonic attaches to every request; only for the decision
//! log, so it is computed only when logging is on.

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::decision_log::Caller;

/// The caller of a request that arrived with these extensions.
pub fn of(extensions: &tonic::Extensions) -> Caller {
    if let Some(tls) = extensions.get::<TlsConnectInfo<TcpConnectInfo>>() {
        return Caller {
            peer_address: tls.get_ref().remote_addr(),
            tls_identity: tls
                .peer_certs()
                .and_then(|certs| certs.first().and_then(|cert| identity(cert.as_ref()))),
            uds_peer: None,
        };
    }
    if let Some(tcp) = extensions.get::<TcpConnectInfo>() {
        return Caller {
            peer_address: tcp.remote_addr(),
            ..Caller::default()
        };
    }
    if let Some(uds) = extensions.get::<UdsConnectInfo>() {
        return Caller {
            uds_peer: Some(uds.peer_cred.map_or_else(
                || "unix".to_owned(),
                |cred| match cred.pid() {
                    Some(pid) => format!("pid={pid} uid={} gid={}", cred.uid(), cred.gid()),
                    None => format!("uid={} gid={}", cred.uid(), cred.gid()),
                },
            )),
            ..Caller::default()
        };
    }
    Caller::default()
}

/// The identity a client certificate asserts: its SPIFFE id (a `spiffe://`
/// URI SAN) when it has one, else its first URI SAN, else its first DNS
/// SAN, else its subject common name. The chain was verified by the TLS
/// handshake against `tls.client_ca`; this only names it.
pub fn identity(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let names: Vec<GeneralName<'_>> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| san.value.general_names.clone())
        .unwrap_or_default();
    let uri = |spiffe_only: bool| {
        names.iter().find_map(|name| match name {
            GeneralName::URI(uri) if !spiffe_only || uri.starts_with("spiffe://") => {
                Some((*uri).to_owned())
            }
            _ => None,
        })
    };
    uri(true)
        .or_else(|| uri(false))
        .or_else(|| {
            names.iter().find_map(|name| match name {
                GeneralName::DNSName(dns) => Some(format!("dns:{dns}")),
                _ => None,
            })
        })
        .or_else(|| {
            cert.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(|cn| format!("cn:{cn}"))
        })
}
