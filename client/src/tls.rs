//! The client's QUIC endpoint: TLS 1.3, ALPN `tern/1`, trusting exactly the
//! certificates in the given CA file (the broker's self-signed certificate,
//! or a CA's).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{pem::PemObject, CertificateDer};

use crate::ClientError;

/// A QUIC endpoint (one UDP socket) that several [`Client`](crate::Client)s
/// can share, set in [`ClientConfig::endpoint`](crate::ClientConfig::endpoint).
/// Programs holding many connections (load generators, bridges) use a few of
/// these instead of a socket per client. Cloning is cheap and shares the socket.
#[derive(Debug, Clone)]
pub struct SharedEndpoint(pub(crate) quinn::Endpoint);

impl SharedEndpoint {
    /// Binds an ephemeral UDP port (IPv6 if the first broker address is) and
    /// trusts `config.ca`, with `config.idle_timeout`.
    pub fn new(config: &crate::ClientConfig) -> Result<Self, ClientError> {
        config.validate()?;
        let ipv6 = config.brokers.first().is_some_and(|b| b.starts_with('['));
        endpoint(&config.ca, config.idle_timeout, ipv6).map(Self)
    }

    /// The local UDP address.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.local_addr()
    }
}

/// A client endpoint on an ephemeral port that trusts the PEM file `ca`.
pub(crate) fn endpoint(ca: &Path, idle_timeout: Duration, ipv6: bool) -> Result<quinn::Endpoint, ClientError> {
    let bad = |reason: String| ClientError::Ca { path: ca.display().to_string(), reason };
    let pem = std::fs::read(ca).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tern_protocol::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| bad(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(idle_timeout.try_into().ok());
    transport.keep_alive_interval(Some(idle_timeout / 3));
    config.transport_config(Arc::new(transport));
    let bind: std::net::SocketAddr =
        if ipv6 { "[::]:0".parse() } else { "0.0.0.0:0".parse() }.map_err(|_| bad("bad bind address".into()))?;
    let fail = |e: std::io::Error| ClientError::Connect { addr: bind.to_string(), reason: e.to_string() };
    let socket = bind_udp(bind).map_err(fail)?;
    let runtime = quinn::default_runtime().ok_or_else(|| fail(std::io::Error::other("no async runtime")))?;
    let mut endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime).map_err(fail)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Kernel buffer asked for on the client's UDP socket: a shared endpoint
/// carries many connections, and an overflowing buffer drops datagrams that
/// QUIC then has to retransmit. The kernel caps it at `net.core.rmem_max`.
const UDP_BUFFER_BYTES: usize = 2 << 20;

fn bind_udp(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    // Best effort: a capped buffer still works, with more loss under bursts.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
