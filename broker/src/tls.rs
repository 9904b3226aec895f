//! The broker's TLS identity: a configured certificate, or a self-signed one
//! made with rcgen on first start and kept in `<data_dir>/tls/` so clients can
//! pin it (`tern --ca <data_dir>/tls/cert.pem`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS material could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{0}")]
    Pem(String),
    /// rcgen or rustls refused the material.
    #[error("{0}")]
    Crypto(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_owned(), source }
}

/// The certificate chain and key a broker presents.
#[derive(Debug)]
pub struct TlsIdentity {
    /// Certificate chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// Where the leaf certificate is, for clients to trust.
    pub cert_path: PathBuf,
}

impl TlsIdentity {
    /// Loads `cert` and `key`, or, when both are unset, the generated pair in
    /// `tls_dir`, making it first if needed (`names` become its SANs besides
    /// localhost, 127.0.0.1 and ::1).
    pub fn load_or_generate(
        cert: Option<&Path>,
        key: Option<&Path>,
        tls_dir: &Path,
        names: &[String],
    ) -> Result<Self, TlsError> {
        let (cert_path, key_path) = match (cert, key) {
            (Some(c), Some(k)) => (c.to_owned(), k.to_owned()),
            _ => {
                let c = tls_dir.join("cert.pem");
                let k = tls_dir.join("key.pem");
                if !c.exists() || !k.exists() {
                    generate(tls_dir, &c, &k, names)?;
                }
                (c, k)
            }
        };
        let certs = read_certs(&cert_path)?;
        let key = read_key(&key_path)?;
        Ok(Self { certs, key, cert_path })
    }

    /// The quinn server configuration: ALPN `tern/1` for clients, presenting
    /// this identity; with `cluster`, also ALPN `tern-peer/1` for peer
    /// brokers, presenting the node certificate and asking for theirs.
    pub(crate) fn server_crypto(
        &self,
        cluster: Option<&crate::mesh::ClusterIdentity>,
    ) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Crypto(e.to_string()))?;
        let mut tls = match cluster {
            None => builder
                .with_no_client_auth()
                .with_single_cert(self.certs.clone(), self.key.clone_key())
                .map_err(|e| TlsError::Crypto(e.to_string()))?,
            Some(cluster) => {
                let clients = certified_key(&self.certs, &self.key)?;
                let resolver = crate::mesh::cluster_tls::AlpnCertResolver { clients, peers: cluster.certified_key()? };
                builder.with_client_cert_verifier(cluster.client_verifier()?).with_cert_resolver(Arc::new(resolver))
            }
        };
        tls.alpn_protocols = vec![tern_protocol::ALPN.to_vec()];
        if cluster.is_some() {
            tls.alpn_protocols.push(tern_protocol::ALPN_PEER.to_vec());
        }
        let quic =
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Crypto(e.to_string()))?;
        Ok(Arc::new(quic))
    }
}

/// A certificate chain and its key as rustls signs with them.
pub(crate) fn certified_key(
    certs: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let provider = rustls::crypto::ring::default_provider();
    let signer =
        provider.key_provider.load_private_key(key.clone_key()).map_err(|e| TlsError::Crypto(e.to_string()))?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(certs.to_vec(), signer)))
}

/// Reads every certificate of a PEM file.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(io(path))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(format!("{}: no certificate found", path.display())));
    }
    Ok(certs)
}

/// Reads the private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(io(path))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            TlsError::Pem(format!("{}: no private key found", path.display()))
        }
        e => TlsError::Pem(format!("{}: {e}", path.display())),
    })
}

fn generate(dir: &Path, cert_path: &Path, key_path: &Path, names: &[String]) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    sans.extend(names.iter().cloned());
    let certified = rcgen::generate_simple_self_signed(sans).map_err(|e| TlsError::Crypto(e.to_string()))?;
    write_private(key_path, certified.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(cert_path, certified.cert.pem()).map_err(io(cert_path))?;
    tracing::info!(cert = %cert_path.display(), "generated a self-signed TLS certificate");
    Ok(())
}

pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io(path))?;
    f.write_all(data).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_files_are_read_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let id = TlsIdentity::load_or_generate(None, None, &tls, &["tern.example".into()]).unwrap();
        assert_eq!(id.certs.len(), 1);
        assert!(matches!(read_key(&tls.join("key.pem")).unwrap(), PrivateKeyDer::Pkcs8(_)));
        let cert_only = tls.join("cert.pem");
        let err = read_key(&cert_only).unwrap_err().to_string();
        assert!(err.contains("cert.pem") && err.contains("no private key"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a PEM file\n").unwrap();
        let err = read_certs(&empty).unwrap_err().to_string();
        assert!(err.contains("empty.pem") && err.contains("no certificate"), "{err}");
        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        let err = read_certs(&broken).unwrap_err().to_string();
        assert!(err.contains("broken.pem"), "{err}");
        assert!(matches!(read_certs(&dir.path().join("missing.pem")), Err(TlsError::Io { .. })));
    }
}
