//! The real `shapeblock-hub` binary in its own process (so its memory and CPU are its own, and
//! its start-up, signals and data directory are the product's): [`HubBinary`] for any command
//! line, [`HubProcess`] for the load test's hub with TLS from a CA made for the run, and a
//! client for its API.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::pki::TestCa;

/// Certificates of a run: a CA and the hub's certificate for 127.0.0.1.
pub struct Pki {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Pki {
    pub fn create(dir: &Path) -> Pki {
        let ca = TestCa::new("shapeblock-loadtest-ca").expect("CA certificate");
        let hub = ca
            .server(&["127.0.0.1", "localhost"])
            .expect("hub certificate");
        let pki = Pki {
            ca_file: dir.join("ca.crt"),
            cert_file: dir.join("hub.crt"),
            key_file: dir.join("hub.key"),
        };
        std::fs::write(&pki.ca_file, ca.cert_pem()).expect("writing the CA");
        std::fs::write(&pki.cert_file, hub.cert_pem).expect("writing the hub certificate");
        std::fs::write(&pki.key_file, hub.key_pem).expect("writing the hub key");
        pki
    }
}

/// How the hub is started.
pub struct HubSettings {
    pub binary: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
    /// The ShapeBlock server the hub relays to; empty for none.
    pub relay_url: String,
    pub admin_token: String,
    /// Extra lines of YAML configuration.
    pub extra: String,
}

/// A running hub binary, killed when dropped.
pub struct HubBinary {
    child: Child,
    pub pid: u32,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its stdout and stderr, appended to (restarts keep earlier logs).
    pub log: PathBuf,
}

impl HubBinary {
    /// Starts `binary` with `args` and `env` in the working directory `dir` and waits until it
    /// listens on `addr`; fails the test with its log if it exits first or does not listen
    /// within 30 s.
    pub async fn spawn(
        binary: &Path,
        dir: &Path,
        addr: SocketAddr,
        args: &[String],
        env: &[(&str, &str)],
        log: &Path,
    ) -> HubBinary {
        std::fs::create_dir_all(dir).expect("hub directory");
        let out = crate::process::append_log(log);
        let mut command = Command::new(binary);
        command
            .args(args)
            .current_dir(dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("hub log"))
            .stderr(out);
        let child = crate::process::spawn_tied(command)
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut hub = HubBinary {
            pid: child.id(),
            child,
            addr,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            hub.assert_running(deadline, "listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        hub
    }

    /// Fails the test when the hub exited or `deadline` passed before it did `what`.
    pub fn assert_running(&mut self, deadline: Instant, what: &str) {
        let exited: Option<ExitStatus> = self.child.try_wait().ok().flatten();
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "the hub did not {what} ({}); its log:\n{}",
            exited.map_or("still running".to_string(), |s| s.to_string()),
            crate::process::log_tail(&self.log, 50)
        );
    }

    /// SIGKILL, as a crash or an OOM kill would; waits for the process to end.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the process to end (SIGKILL after 20 s).
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
    }
}

impl Drop for HubBinary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The load test's hub: TLS, the relay, JSON logs, configured by a file.
pub struct HubProcess {
    binary: HubBinary,
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
        let relay = match settings.relay_url.as_str() {
            "" => String::new(),
            // The load test's server is plain ws:// on loopback.
            url => format!(
                "relay:\n  url: {url}\n  api_key: loadtest-relay-key\n  allow_plaintext: {}\n",
                url.starts_with("ws://")
            ),
        };
        write!(
            file,
            "listen: 127.0.0.1:{port}\ndata_dir: {data}\ntls_cert_file: {cert}\ntls_key_file: {key}\n\
             admin_tokens: [{token}]\nlog_format: json\npublic_url: wss://127.0.0.1:{port}\n\
             allow_insecure_hub_url: true\n\
             {relay}{extra}",
            port = settings.port,
            data = data.display(),
            cert = pki.cert_file.display(),
            key = pki.key_file.display(),
            token = settings.admin_token,
            extra = settings.extra,
        )
        .expect("writing the hub configuration");
        let log = settings.dir.join("hub.log");
        let mut binary = HubBinary::spawn(
            &settings.binary,
            &settings.dir,
            SocketAddr::from(([127, 0, 0, 1], settings.port)),
            &["--config".into(), config.display().to_string()],
            &[("RUST_LOG", "warn")],
            &log,
        )
        .await;
        let api = Api::new(settings.port, &settings.admin_token, &pki.ca_file);
        let deadline = Instant::now() + Duration::from_secs(30);
        while api.get("/healthz").await.is_err() {
            binary.assert_running(deadline, "answer /healthz");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        HubProcess {
            pid: binary.pid,
            binary,
            api,
            log,
        }
    }

    /// SIGTERM, then waits for the process to end.
    pub fn stop(self) {
        self.binary.stop();
    }
}

/// HTTPS client for the hub's API (one connection per request), as the admin.
#[derive(Clone)]
pub struct Api {
    port: u16,
    token: String,
    ca_file: PathBuf,
}

impl Api {
    fn new(port: u16, token: &str, ca_file: &Path) -> Api {
        Api {
            port,
            token: token.to_string(),
            ca_file: ca_file.to_path_buf(),
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value, String> {
        self.request("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        self.request("POST", path, Some(body)).await
    }

    /// The body of a successful response: JSON, or the text when it is not JSON (`/metrics`).
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let response = crate::hub::try_http_request(
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            Some(&self.ca_file),
            method,
            path,
            Some(&self.token),
            body.map(|b| b.to_string().into_bytes()),
        )
        .await
        .map_err(|e| e.to_string())?;
        if !(200..300).contains(&response.status) {
            return Err(format!(
                "{path}: HTTP {}: {}",
                response.status,
                response.text()
            ));
        }
        if response.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&response.body).or_else(|_| Ok(Value::String(response.text())))
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
