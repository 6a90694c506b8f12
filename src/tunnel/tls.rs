//! rustls set-up for every TLS end of the hub and the agent: one crypto provider (ring, no
//! OpenSSL), one way to read PEM files, and the hub's serving certificate, reloaded when its
//! files change.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{} holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Certificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// Which certificate authorities a client trusts.
#[derive(Clone, Copy, Debug)]
pub enum Trust<'a> {
    /// The public web PKI roots.
    WebPki,
    /// Only the CA certificates in this PEM file: a pinned CA.
    Pinned(&'a Path),
    /// The web PKI roots and, besides them, the CA certificates in this PEM file.
    WebPkiAnd(&'a Path),
}

/// The one crypto provider of every TLS end (ring).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        path: path.to_path_buf(),
        source,
    };
    CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<_, _>>()
        .map_err(pem)
}

/// A client configuration trusting `trust`.
pub fn client_config(trust: Trust<'_>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let (web_pki, file) = match trust {
        Trust::WebPki => (true, None),
        Trust::Pinned(path) => (false, Some(path)),
        Trust::WebPkiAnd(path) => (true, Some(path)),
    };
    if web_pki {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(path) = file {
        for cert in certificates(path)? {
            roots.add(cert).map_err(|source| TlsError::Certificate {
                path: path.to_path_buf(),
                source,
            })?;
        }
    }
    // A pinned file without a certificate would make every handshake fail with an
    // unhelpful "unknown issuer"; say what is wrong at start-up instead.
    if roots.is_empty()
        && let Some(path) = file
    {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The certificate chain in `cert_file` with the key in `key_file`, checked to belong together.
fn certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let certs = certificates(cert_file)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_file.to_path_buf(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|source| TlsError::Pem {
        path: key_file.to_path_buf(),
        source,
    })?;
    // Refuses a key that is not the certificate's: a renewal caught half-written (the new
    // certificate with the old key) must not replace a working pair.
    CertifiedKey::from_der(certs, key, &provider()).map_err(|source| TlsError::Certificate {
        path: key_file.to_path_buf(),
        source,
    })
}

/// The serving certificate, re-read when its files change (cert-manager renews it in place).
/// Handshakes take the current pair; connections already open keep theirs, so a renewal drops
/// no tunnel.
#[derive(Debug)]
pub struct ServerCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: std::sync::RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// The files' bytes as last read, to tell a change from a touch.
    files: (Vec<u8>, Vec<u8>),
    /// The last bytes refused, so that a broken pair is reported once, not at every check.
    refused: Option<(Vec<u8>, Vec<u8>)>,
}

/// What [`ServerCertificate::reload`] found.
#[derive(Debug)]
pub enum Reload {
    Unchanged,
    Reloaded,
    /// The files changed but do not make a valid pair; the previous one is still served.
    Refused(TlsError),
}

impl ServerCertificate {
    /// Loads the pair; an invalid one is an error at start-up.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<Self>, TlsError> {
        let files = read_pair(cert_file, key_file)?;
        let key = Arc::new(certified_key(cert_file, key_file)?);
        Ok(Arc::new(Self {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: std::sync::RwLock::new(Loaded {
                key,
                files,
                refused: None,
            }),
        }))
    }

    /// Re-reads the files and, when they changed and make a valid pair, serves the new one.
    pub fn reload(&self) -> Reload {
        let files = match read_pair(&self.cert_file, &self.key_file) {
            Ok(files) => files,
            Err(err) => return Reload::Refused(err),
        };
        let mut current = match self.current.write() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.files == files || current.refused.as_ref() == Some(&files) {
            return Reload::Unchanged;
        }
        match certified_key(&self.cert_file, &self.key_file) {
            Ok(key) => {
                *current = Loaded {
                    key: Arc::new(key),
                    files,
                    refused: None,
                };
                Reload::Reloaded
            }
            Err(err) => {
                current.refused = Some(files);
                Reload::Refused(err)
            }
        }
    }

    /// The end-entity certificate served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(loaded) => loaded.key.clone(),
            Err(poisoned) => poisoned.into_inner().key.clone(),
        }
    }
}

impl rustls::server::ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn read_pair(cert_file: &Path, key_file: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            source: rustls_pki_types::pem::Error::Io(e),
        })
    };
    Ok((read(cert_file)?, read(key_file)?))
}

/// A server configuration presenting `certificate` (as it is at each handshake), offering
/// HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(
    certificate: Arc<ServerCertificate>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes `text` to `dir/name` (also for the agent's apiserver tests).
    pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A scratch directory named after the test (also for the agent's apiserver tests).
    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sb-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A client trusting a pinned CA completes a handshake with a server whose certificate
    /// that CA issued; one trusting only the web PKI refuses the same server.
    #[tokio::test]
    async fn a_pinned_ca_is_trusted_instead_of_the_web_roots() {
        let dir = temp_dir("pinned");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let ca_file = write(&dir, "ca.pem", &ca.pem());
        let cert_file = write(&dir, "cert.pem", &cert.pem());
        let key_file = write(&dir, "key.pem", &key.serialize_pem());

        let server =
            server_config(ServerCertificate::load(&cert_file, &key_file).unwrap()).unwrap();
        assert_eq!(
            server.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let handshake = |client: Arc<rustls::ClientConfig>| {
            let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
            async move {
                let (a, b) = tokio::io::duplex(64 * 1024);
                let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
                let connector = tokio_rustls::TlsConnector::from(client);
                let (client, _server) =
                    tokio::join!(connector.connect(name, a), acceptor.accept(b));
                client.is_ok()
            }
        };
        assert!(handshake(client_config(Trust::Pinned(&ca_file)).unwrap()).await);
        assert!(handshake(client_config(Trust::WebPkiAnd(&ca_file)).unwrap()).await);
        assert!(!handshake(client_config(Trust::WebPki).unwrap()).await);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A renewed pair is served from the next handshake; a broken one (garbage, or a new
    /// certificate with the old key, as a renewal caught half-written) is refused once and the
    /// working pair stays.
    #[test]
    fn a_renewed_certificate_replaces_the_served_one_and_a_broken_one_does_not() {
        let dir = temp_dir("reload");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let issue = || {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            (cert, key)
        };
        let (first, first_key) = issue();
        let cert_file = write(&dir, "cert.pem", &first.pem());
        let key_file = write(&dir, "key.pem", &first_key.serialize_pem());
        let served = ServerCertificate::load(&cert_file, &key_file).unwrap();
        let der = |served: &ServerCertificate| served.current().cert[0].to_vec();
        assert_eq!(der(&served), first.der().to_vec());
        assert!(matches!(served.reload(), Reload::Unchanged));

        let (renewed, renewed_key) = issue();
        write(&dir, "cert.pem", &renewed.pem());
        write(&dir, "key.pem", &renewed_key.serialize_pem());
        assert!(matches!(served.reload(), Reload::Reloaded));
        assert_eq!(der(&served), renewed.der().to_vec());

        let (half, _) = issue();
        write(&dir, "cert.pem", &half.pem());
        assert!(matches!(served.reload(), Reload::Refused(_)));
        assert!(
            matches!(served.reload(), Reload::Unchanged),
            "a refused pair is reported once"
        );
        assert_eq!(der(&served), renewed.der().to_vec());
        write(&dir, "key.pem", "not a key");
        assert!(matches!(served.reload(), Reload::Refused(_)));
        assert_eq!(der(&served), renewed.der().to_vec());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_pinned_file_without_a_certificate_is_refused() {
        let dir = temp_dir("empty");
        let empty = write(&dir, "empty.pem", "");
        assert!(matches!(
            client_config(Trust::Pinned(&empty)),
            Err(TlsError::NoCertificate { .. })
        ));
        // Besides the web roots an empty extra file adds nothing and is no error (as the relay
        // has always taken it).
        assert!(client_config(Trust::WebPkiAnd(&empty)).is_ok());
        assert!(matches!(
            ServerCertificate::load(&empty, &empty),
            Err(TlsError::NoCertificate { .. })
        ));
        let missing = dir.join("missing.pem");
        let err = client_config(Trust::Pinned(&missing)).unwrap_err();
        assert!(
            err.to_string().starts_with(&missing.display().to_string()),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
