//! Cluster TLS: the cluster CA, node certificates made from it, and the
//! rustls pieces for mutual TLS on peer links.
//!
//! `tern-broker cluster-ca --out DIR` writes `DIR/ca.pem` and `DIR/ca.key`;
//! `tern-broker cluster-cert --ca DIR --node NAME --out NODEDIR` writes
//! `NODEDIR/cert.pem`, `NODEDIR/key.pem` (mode 0600) and a copy of `ca.pem`.
//! A node certificate's common name is the node name, so the name a peer
//! claims in its hello is checked against the certificate it proved it holds.
//! Peers dial each other with the server name [`PEER_SERVER_NAME`], which
//! every node certificate carries.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::RootCertStore;

use crate::tls::{read_certs, read_key, write_private, TlsError};

/// File names in a cluster CA directory and a node directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key (only in the CA directory; keep it off brokers).
pub const CA_KEY: &str = "ca.key";
/// A node's certificate.
pub const NODE_CERT: &str = "cert.pem";
/// A node's private key.
pub const NODE_KEY: &str = "key.pem";
/// TLS server name peers dial each other with; in every node certificate.
pub const PEER_SERVER_NAME: &str = "tern-peer";

const CA_NAME: &str = "Tern cluster CA";

fn crypto(e: impl std::fmt::Display) -> TlsError {
    TlsError::Crypto(e.to_string())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_owned(), source }
}

/// Makes a new cluster CA in `out`. Refuses to overwrite an existing one.
/// Returns the path of the CA certificate.
pub fn create_ca(out: &Path) -> Result<PathBuf, TlsError> {
    let (cert_path, key_path) = (out.join(CA_CERT), out.join(CA_KEY));
    if key_path.exists() {
        return Err(TlsError::Pem(format!(
            "{} exists already; remove it first to make a new CA (nodes certified by the old one will no longer \
             be able to join)",
            key_path.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    let key = KeyPair::generate().map_err(crypto)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(crypto)?;
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2050, 1, 1);
    let cert = params.self_signed(&key).map_err(crypto)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    Ok(cert_path)
}

/// Makes the certificate of broker `node`, signed by the CA in `ca_dir`, in
/// `out` (with a copy of the CA certificate, so `out` is all a broker needs).
pub fn create_node_cert(ca_dir: &Path, node: &str, out: &Path) -> Result<(), TlsError> {
    tern_protocol::validate_handle(node)
        .map_err(|e| TlsError::Pem(format!("node name {node:?}: {e} (1 to 64 of a-z 0-9 . _ -)")))?;
    let (ca_cert_path, ca_key_path) = (ca_dir.join(CA_CERT), ca_dir.join(CA_KEY));
    let ca_pem = std::fs::read_to_string(&ca_cert_path).map_err(io(&ca_cert_path))?;
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let ca_key =
        KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::Pem(format!("{}: {e}", ca_key_path.display())))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| TlsError::Pem(format!("{}: {e}", ca_cert_path.display())))?;
    let mut params = CertificateParams::new(vec![PEER_SERVER_NAME.to_owned(), node.to_owned()]).map_err(crypto)?;
    params.distinguished_name.push(DnType::CommonName, node);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2050, 1, 1);
    let key = KeyPair::generate().map_err(crypto)?;
    let cert = params.signed_by(&key, &issuer).map_err(crypto)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let (cert_path, ca_copy) = (out.join(NODE_CERT), out.join(CA_CERT));
    write_private(&out.join(NODE_KEY), key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    std::fs::write(&ca_copy, ca_pem).map_err(io(&ca_copy))?;
    Ok(())
}

/// A broker's cluster credentials, loaded from its node directory.
#[derive(Debug)]
pub struct ClusterIdentity {
    /// The node name in the certificate.
    pub node: String,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

impl ClusterIdentity {
    /// Loads `dir/cert.pem`, `dir/key.pem` and `dir/ca.pem`, and checks that
    /// the certificate is for `node`.
    pub fn load(dir: &Path, node: &str) -> Result<Self, TlsError> {
        let certs = read_certs(&dir.join(NODE_CERT))?;
        let key = read_key(&dir.join(NODE_KEY))?;
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&dir.join(CA_CERT))? {
            roots.add(ca).map_err(|e| TlsError::Pem(format!("{}: {e}", dir.join(CA_CERT).display())))?;
        }
        let name = certs.first().and_then(common_name).unwrap_or_default();
        if name != node {
            return Err(TlsError::Pem(format!(
                "{} is the certificate of node {name:?}, not {node:?}; make one with `tern-broker cluster-cert \
                 --node {node}`",
                dir.join(NODE_CERT).display()
            )));
        }
        Ok(Self { node: name, certs, key, roots: Arc::new(roots) })
    }

    /// The certificate and key rustls presents on peer links.
    pub(crate) fn certified_key(&self) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
        crate::tls::certified_key(&self.certs, &self.key)
    }

    /// Verifies a dialing peer's certificate under the cluster CA. Clients
    /// present none, so a connection without one is let through the
    /// handshake; the accept loop refuses a peer link that has none.
    pub(crate) fn client_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider)
            .allow_unauthenticated()
            .build()
            .map_err(crypto)
    }

    /// quinn client configuration for dialing peers: presents this node's
    /// certificate and trusts only the cluster CA.
    pub(crate) fn client_config(
        &self,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(crypto)?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.certs.clone(), self.key.clone_key())
            .map_err(crypto)?;
        tls.alpn_protocols = vec![tern_protocol::ALPN_PEER.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(crypto)?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(transport);
        Ok(config)
    }
}

/// The common name of a DER certificate.
fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(cn)
}

/// The node name in the certificate a peer presented on `conn` (verified
/// under the cluster CA by the handshake), if it presented one.
pub(crate) fn peer_node_name(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().and_then(common_name)
}

/// The ALPN protocol a connection negotiated.
pub(crate) fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let data = conn.handshake_data()?;
    data.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol
}

/// Picks the certificate by the ALPN a connecting party offers: the node
/// certificate for peers, the client-facing one for everyone else.
#[derive(Debug)]
pub(crate) struct AlpnCertResolver {
    pub(crate) clients: Arc<rustls::sign::CertifiedKey>,
    pub(crate) peers: Arc<rustls::sign::CertifiedKey>,
}

impl rustls::server::ResolvesServerCert for AlpnCertResolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let wants_peer = hello.alpn().is_some_and(|mut protocols| protocols.any(|p| p == tern_protocol::ALPN_PEER));
        Some(if wants_peer { self.peers.clone() } else { self.clients.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificates_name_their_node_and_load_only_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        create_ca(&ca).unwrap();
        assert!(create_ca(&ca).is_err(), "an existing CA is never overwritten");
        let node = dir.path().join("n1");
        create_node_cert(&ca, "n1", &node).unwrap();
        let id = ClusterIdentity::load(&node, "n1").unwrap();
        assert_eq!(id.node, "n1");
        let err = ClusterIdentity::load(&node, "n2").unwrap_err().to_string();
        assert!(err.contains("not \"n2\""), "{err}");
        assert!(create_node_cert(&ca, "Bad Name", &dir.path().join("x")).is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(node.join(NODE_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
