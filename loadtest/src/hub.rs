//! The hub under test: the real `shapeblock-hub` binary in its own process (so its memory and
//! CPU are its own), with TLS from a CA made for the run, and a small HTTPS client for its API.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Certificates of a run: a CA and the hub's certificate for 127.0.0.1.
pub struct Pki {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Pki {
    pub fn create(dir: &Path) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "shapeblock-loadtest-ca");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("hub params");
        params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().expect("hub key");
        let cert = params.signed_by(&key, &issuer).expect("hub certificate");
        let ca_pem = issuer.pem();
        let pki = Pki {
            ca_file: dir.join("ca.crt"),
            cert_file: dir.join("hub.crt"),
            key_file: dir.join("hub.key"),
        };
        std::fs::write(&pki.ca_file, ca_pem).expect("writing the CA");
        std::fs::write(&pki.cert_file, cert.pem()).expect("writing the hub certificate");
        std::fs::write(&pki.key_file, key.serialize_pem()).expect("writing the hub key");
        pki
    }
}

/// A free loopback port (bound, then released for the hub to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Memory and CPU of a process, from `/proc`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    pub rss_kib: u64,
    /// Peak RSS since the process started.
    pub hwm_kib: u64,
    /// User + system CPU time.
    pub cpu: Duration,
    pub at: Option<Instant>,
}

pub fn sample(pid: u32) -> ProcSample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th field overall.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let cpu_ticks = ticks(11) + ticks(12);
    ProcSample {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        cpu: Duration::from_millis(cpu_ticks * 1000 / hz),
        at: Some(Instant::now()),
    }
}

/// CPU used between two samples, in cores (1.0 = one core busy).
pub fn cores(before: &ProcSample, after: &ProcSample) -> f64 {
    let wall = match (before.at, after.at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => return 0.0,
    };
    (after.cpu.saturating_sub(before.cpu)).as_secs_f64() / wall.max(1e-3)
}

/// Where the hub's binary is: next to this one (`cargo build --release` builds both).
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    let dir = exe.parent().expect("executable directory");
    // Benches run from target/<profile>/deps.
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("profile directory")
    } else {
        dir
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build it first (cargo build --release -p shapeblock-hub)",
        path.display()
    );
    path
}

/// How the hub is started.
pub struct HubSettings {
    pub binary: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
    pub relay_url: String,
    pub admin_token: String,
    /// Extra lines of YAML configuration.
    pub extra: String,
}

/// A running hub process.
pub struct HubProcess {
    child: Child,
    pub pid: u32,
    pub api: Api,
    pub log: PathBuf,
}

impl HubProcess {
    pub async fn start(settings: &HubSettings, pki: &Pki) -> HubProcess {
        let config = settings.dir.join("hub.yaml");
        let data = settings.dir.join("data");
        std::fs::create_dir_all(&data).expect("hub data directory");
        let mut file = std::fs::File::create(&config).expect("hub configuration");
        write!(
            file,
            "listen: 127.0.0.1:{port}\ndata_dir: {data}\ntls_cert_file: {cert}\ntls_key_file: {key}\n\
             admin_tokens: [{token}]\nlog_format: json\npublic_url: wss://127.0.0.1:{port}\n\
             relay:\n  url: {relay}\n  api_key: loadtest-relay-key\n{extra}",
            port = settings.port,
            data = data.display(),
            cert = pki.cert_file.display(),
            key = pki.key_file.display(),
            token = settings.admin_token,
            relay = settings.relay_url,
            extra = settings.extra,
        )
        .expect("writing the hub configuration");
        let log = settings.dir.join("hub.log");
        let child = Command::new(&settings.binary)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("hub log"))
            .stderr(
                std::fs::File::options()
                    .append(true)
                    .open(&log)
                    .expect("hub log"),
            )
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", settings.binary.display()));
        let pid = child.id();
        let api = Api::new(settings.port, &settings.admin_token, &pki.ca_file);
        let mut hub = HubProcess {
            child,
            pid,
            api,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if hub.api.get("/healthz").await.is_ok() {
                return hub;
            }
            if let Ok(Some(status)) = hub.child.try_wait() {
                panic!("the hub exited ({status}); see {}", hub.log.display());
            }
            assert!(
                Instant::now() < deadline,
                "the hub did not answer /healthz within 30 s; see {}",
                hub.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for the process to end.
    pub fn stop(mut self) {
        // SAFETY: plain signal to our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// HTTPS client for the hub's API (one connection per request).
#[derive(Clone)]
pub struct Api {
    port: u16,
    token: String,
    tls: tokio_rustls::TlsConnector,
}

impl Api {
    fn new(port: u16, token: &str, ca_file: &Path) -> Api {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca_file).expect("CA file") {
            roots
                .add(cert.expect("CA certificate"))
                .expect("adding the CA");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Api {
            port,
            token: token.to_string(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value, String> {
        self.request(http::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        self.request(http::Method::POST, path, Some(body)).await
    }

    async fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("server name");
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, format!("127.0.0.1:{}", self.port))
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "{path}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        if body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&body)
            .or_else(|_| Ok(Value::String(String::from_utf8_lossy(&body).into_owned())))
    }

    /// Reconciles so far, by controller and result, from `/metrics`.
    pub async fn reconciles(&self) -> std::collections::BTreeMap<String, f64> {
        let Ok(Value::String(text)) = self.get("/metrics").await else {
            return Default::default();
        };
        text.lines()
            .filter(|l| l.starts_with("shapeblock_controller_reconciles"))
            .filter_map(|l| {
                let (labels, value) = l.rsplit_once(' ')?;
                let labels = labels.split_once('{')?.1.trim_end_matches('}');
                Some((labels.replace('"', ""), value.parse().ok()?))
            })
            .collect()
    }

    /// Waits until no reconcile ran for 2 s (Ready is not quiet: the reconciles that follow
    /// each object's own status writes still run); returns how long that took.
    pub async fn until_quiet(&self) -> Duration {
        let started = Instant::now();
        let mut previous = self.reconciles().await;
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let now = self.reconciles().await;
            if now == previous {
                return started.elapsed();
            }
            previous = now;
        }
    }

    /// Registers a cluster; returns (id, token).
    pub async fn register(&self, name: &str) -> (String, String) {
        let created = self
            .post("/api/v1/clusters", &serde_json::json!({"name": name}))
            .await
            .unwrap_or_else(|e| panic!("registering {name}: {e}"));
        let id = created["cluster"]["id"]
            .as_str()
            .expect("cluster id")
            .to_string();
        let token = created["token"]
            .as_str()
            .expect("cluster token")
            .to_string();
        (id, token)
    }

    /// Number of clusters with a live tunnel.
    pub async fn connected(&self) -> usize {
        match self.get("/api/v1/clusters").await {
            Ok(Value::Array(clusters)) => clusters
                .iter()
                .filter(|c| c["status"]["connected"] == Value::Bool(true))
                .count(),
            _ => 0,
        }
    }
}
