//! Certificates for a test control plane: one throw-away CA signs the apiserver's serving
//! certificate and an admin client certificate (`O=system:masters`); an ECDSA key signs
//! ServiceAccount tokens. All keys are ECDSA P-256 and valid for a week.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA that can issue certificates for tests (also used for the hub's TLS in later tests).
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM-encoded.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(common_name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A serving certificate for the given DNS names and IP addresses.
    pub fn server(&self, names: &[&str]) -> Result<Issued, rcgen::Error> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        self.issue(params)
    }

    /// A client certificate: Kubernetes reads the user from CN and groups from O.
    pub fn client(&self, user: &str, group: &str) -> Result<Issued, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        params
            .distinguished_name
            .push(DnType::OrganizationName, group);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        self.issue(params)
    }

    fn issue(&self, mut params: CertificateParams) -> Result<Issued, rcgen::Error> {
        validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn validity(params: &mut CertificateParams) {
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(3600)).into();
    params.not_after = (now + std::time::Duration::from_secs(7 * 24 * 3600)).into();
}

/// The files of a control plane's PKI directory.
pub struct Pki {
    dir: PathBuf,
}

/// Writes `ca.crt`, `apiserver.{crt,key}`, `admin.{crt,key}` and `sa.{key,pub}` into `dir`.
pub fn generate(dir: &Path) -> Result<Pki, Box<dyn std::error::Error>> {
    let ca = TestCa::new("shapeblock-test-ca")?;
    let serving = ca.server(&[
        "localhost",
        "127.0.0.1",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "10.96.0.1",
    ])?;
    let admin = ca.client("admin", "system:masters")?;
    let sa = KeyPair::generate()?;
    fs::write(dir.join("ca.crt"), ca.cert_pem())?;
    fs::write(dir.join("apiserver.crt"), serving.cert_pem)?;
    fs::write(dir.join("apiserver.key"), serving.key_pem)?;
    fs::write(dir.join("admin.crt"), admin.cert_pem)?;
    fs::write(dir.join("admin.key"), admin.key_pem)?;
    fs::write(dir.join("sa.key"), sa.serialize_pem())?;
    fs::write(dir.join("sa.pub"), sa.public_key_pem())?;
    Ok(Pki {
        dir: dir.to_path_buf(),
    })
}

impl Pki {
    /// An admin kubeconfig for an apiserver on `127.0.0.1:<port>`, referring to the files.
    pub fn kubeconfig(&self, port: u16) -> String {
        let f = |name: &str| self.dir.join(name).display().to_string();
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {ca}\n\
             users:\n- name: admin\n  user:\n    client-certificate: {crt}\n    client-key: {key}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n\
             current-context: test\n",
            ca = f("ca.crt"),
            crt = f("admin.crt"),
            key = f("admin.key"),
        )
    }
}
