//! A hub and real agent processes for tunnel tests: the hub runs in the test process on a
//! loopback port (TLS from a test CA, or plain HTTP), started by [`TestHub::builder`]; each
//! agent is the real `shapeblock-agent` binary with a ServiceAccount token of the test control
//! plane; and a small HTTP client for the hub's API and websockets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
use shapeblock::hub::config::{TokenHash, hash_token};
use shapeblock::hub::{GatewayConfig, Hub, HubConfig, Registry, TlsFiles};
use std::process::Child;
use tokio_util::sync::CancellationToken;

use crate::pki::TestCa;
pub use crate::process::append_log;

/// Files of a test run (certificates, tokens, kubeconfigs, agent logs).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = crate::process::target_tmp().join("tunnel").join(format!(
        "{name}-{}-{}",
        std::process::id(),
        super::random_suffix()
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Admin API token of test hubs.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// Read-only API token of test hubs.
pub const VIEWER_TOKEN: &str = "test-viewer-token-0123456789";

/// A hub serving in this process.
pub struct TestHub {
    pub addr: SocketAddr,
    pub registry: Arc<Registry>,
    pub gateway: Arc<shapeblock::hub::Gateway>,
    /// The hub's relay journal (events and their counters).
    pub journal: Arc<shapeblock::relay::Journal>,
    /// CA file agents pin (None for a plain HTTP hub).
    pub ca_file: Option<PathBuf>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// How tests run the hub: a fast ping so round-trip times show up quickly.
pub fn test_gateway_config() -> GatewayConfig {
    GatewayConfig {
        ping_interval: Duration::from_millis(500),
        ..GatewayConfig::default()
    }
}

/// The test hub's CA file and TLS files: a certificate for localhost/127.0.0.1 from a test CA,
/// created in `dir` the first time and reused after (so a restarted hub keeps its identity).
fn test_hub_tls(dir: &std::path::Path) -> (PathBuf, TlsFiles) {
    let (ca_file, cert_file, key_file) = (
        dir.join("hub-ca.crt"),
        dir.join("hub.crt"),
        dir.join("hub.key"),
    );
    if !ca_file.exists() {
        let ca = TestCa::new("shapeblock-test-hub-ca").unwrap();
        let cert = ca.server(&["localhost", "127.0.0.1"]).unwrap();
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        std::fs::write(&cert_file, cert.cert_pem).unwrap();
        std::fs::write(&key_file, cert.key_pem).unwrap();
    }
    (
        ca_file,
        TlsFiles {
            cert_file,
            key_file,
        },
    )
}

/// How a [`TestHub`] is started: plain HTTP, an in-memory registry, no controllers, no relay,
/// [`test_gateway_config`], a free port, unless told otherwise.
pub struct TestHubBuilder {
    registry: Option<Arc<Registry>>,
    tls_dir: Option<PathBuf>,
    addr: Option<SocketAddr>,
    controllers: bool,
    relay: Option<shapeblock::relay::outbound::RelayConfig>,
    gateway: GatewayConfig,
    apps: shapeblock::render::app::AppSettings,
    agent_hub_ca: bool,
    agent_image: String,
    agent_upgrades: shapeblock::hub::upgrades::UpgradeConfig,
}

impl TestHubBuilder {
    /// Upgrades connected agents to `image` with these settings (off unless asked: the shared
    /// control plane's `shapeblock-agent` Deployment, when a test makes one, is not theirs).
    pub fn agent_upgrades(
        mut self,
        image: &str,
        upgrades: shapeblock::hub::upgrades::UpgradeConfig,
    ) -> Self {
        self.agent_image = image.into();
        self.agent_upgrades = upgrades;
        self
    }

    /// The hub's registry (a restart passes the one of the hub before).
    pub fn registry(mut self, registry: Arc<Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// TLS with a certificate for localhost/127.0.0.1 from a test CA, created in `dir` the
    /// first time and reused after (so a restarted hub keeps its identity).
    pub fn tls(mut self, dir: &std::path::Path) -> Self {
        self.tls_dir = Some(dir.to_path_buf());
        self
    }

    /// Listens on `addr` (a restart on the address of the hub before).
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = Some(addr);
        self
    }

    /// Embeds the test CA of [`TestHubBuilder::tls`] into install manifests
    /// (`agent_hub_ca_file`).
    pub fn agent_hub_ca(mut self) -> Self {
        self.agent_hub_ca = true;
        self
    }

    /// Runs the controllers for connected clusters.
    pub fn controllers(mut self) -> Self {
        self.controllers = true;
        self
    }

    /// Deploys Apps with these `apps:` settings.
    pub fn apps(mut self, apps: shapeblock::render::app::AppSettings) -> Self {
        self.apps = apps;
        self
    }

    /// Relays to a ShapeBlock server.
    pub fn relay(mut self, relay: shapeblock::relay::outbound::RelayConfig) -> Self {
        self.relay = Some(relay);
        self
    }

    /// Gateway settings of the caller's (a benchmark lifts the per-cluster request budget to
    /// measure the tunnel itself).
    pub fn gateway(mut self, gateway: GatewayConfig) -> Self {
        self.gateway = gateway;
        self
    }

    /// Binds the hub and serves it on this runtime until [`TestHub::stop`] or the test's end.
    pub async fn start(self) -> TestHub {
        let registry = self
            .registry
            .unwrap_or_else(|| Arc::new(Registry::in_memory()));
        let (ca_file, tls) = match &self.tls_dir {
            Some(dir) => {
                let (ca_file, tls) = test_hub_tls(dir);
                (Some(ca_file), Some(tls))
            }
            None => (None, None),
        };
        let config = HubConfig {
            relay: self.relay,
            listen: self.addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()),
            tls,
            gateway: self.gateway,
            admin_tokens: vec![TokenHash(hash_token(ADMIN_TOKEN))],
            viewer_tokens: vec![TokenHash(hash_token(VIEWER_TOKEN))],
            agent_image: self.agent_image,
            agent_upgrades: self.agent_upgrades,
            // Test agents dial ws://127.0.0.1 or wss://127.0.0.1.
            allow_insecure_hub_url: true,
            max_request_body_bytes: 64 * 1024,
            controllers: self.controllers,
            agent_hub_ca: match (&ca_file, self.agent_hub_ca) {
                (Some(ca_file), true) => Some(
                    shapeblock::hub::config::read_ca_file(ca_file)
                        .expect("the test CA as agent_hub_ca_file"),
                ),
                _ => None,
            },
            ..HubConfig::default()
        };
        let mut config = config;
        config.runtime.controllers.apps = self.apps;
        let hub = Hub::bind(&config, registry.clone())
            .await
            .expect("bind hub");
        let addr = hub.local_addr().unwrap();
        let gateway = hub.gateway.clone();
        let journal = hub.journal.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(hub.serve(shutdown.clone()));
        TestHub {
            addr,
            registry,
            gateway,
            journal,
            ca_file,
            shutdown,
            task,
        }
    }
}

impl TestHub {
    /// Starts nothing yet: say how the hub runs, then [`TestHubBuilder::start`].
    pub fn builder() -> TestHubBuilder {
        TestHubBuilder {
            registry: None,
            tls_dir: None,
            addr: None,
            controllers: false,
            relay: None,
            gateway: test_gateway_config(),
            apps: Default::default(),
            agent_hub_ca: false,
            agent_image: "shapeblock-agent:test".into(),
            agent_upgrades: shapeblock::hub::upgrades::UpgradeConfig {
                enabled: false,
                ..Default::default()
            },
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca_file.is_some() { "wss" } else { "ws" };
        format!("{scheme}://127.0.0.1:{}", self.addr.port())
    }

    /// Stops the hub and waits until its listener is closed.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Waits until the cluster has a live tunnel.
    pub async fn wait_connected(&self, cluster: &str) {
        self.wait_until(cluster, true).await
    }

    pub async fn wait_disconnected(&self, cluster: &str) {
        self.wait_until(cluster, false).await
    }

    async fn wait_until(&self, cluster: &str, connected: bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.gateway.status(cluster).connected != connected {
            assert!(
                Instant::now() < deadline,
                "cluster {cluster} did not become {} within 30s: {:?}",
                if connected {
                    "connected"
                } else {
                    "disconnected"
                },
                self.gateway.status(cluster)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A ServiceAccount of the test control plane, as an agent's credentials.
pub struct AgentIdentity {
    pub kubeconfig: PathBuf,
    /// `system:serviceaccount:<ns>:<name>`
    pub username: String,
}

/// Creates ServiceAccount `name` in `namespace`, binds it to `cluster-admin` (cluster-wide,
/// when `scope` is None) or to a Role over ConfigMaps in the namespace `scope`, and writes a
/// kubeconfig with a token for it.
pub async fn agent_identity(
    dir: &std::path::Path,
    namespace: &str,
    name: &str,
    scope: Option<&str>,
) -> AgentIdentity {
    let config = super::config().await;
    let client = kube::Client::try_from(config.clone()).unwrap();
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}
    }))
    .unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply("tests").force(),
            &Patch::Apply(&sa),
        )
        .await
        .unwrap();
    let subject =
        serde_json::json!([{"kind": "ServiceAccount", "name": name, "namespace": namespace}]);
    match scope {
        None => {
            let binding_name = format!("{namespace}-{name}");
            let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": binding_name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                "subjects": subject
            }))
            .unwrap();
            Api::<ClusterRoleBinding>::all(client.clone())
                .patch(
                    &binding_name,
                    &PatchParams::apply("tests").force(),
                    &Patch::Apply(&binding),
                )
                .await
                .unwrap();
        }
        Some(scope) => {
            // An explicit Role: the aggregated `admin` ClusterRole is only filled in by
            // kube-controller-manager, which not every test starts.
            let role: Role = serde_json::from_value(serde_json::json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": format!("agent-{name}"), "namespace": scope},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["*"]}]
            }))
            .unwrap();
            Api::<Role>::namespaced(client.clone(), scope)
                .create(&PostParams::default(), &role)
                .await
                .unwrap();
            let binding: RoleBinding = serde_json::from_value(serde_json::json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": format!("agent-{name}"), "namespace": scope},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": format!("agent-{name}")},
                "subjects": subject
            }))
            .unwrap();
            Api::<RoleBinding>::namespaced(client.clone(), scope)
                .create(&PostParams::default(), &binding)
                .await
                .unwrap();
        }
    }
    let kubeconfig = service_account_kubeconfig(dir, namespace, name).await;
    AgentIdentity {
        kubeconfig,
        username: format!("system:serviceaccount:{namespace}:{name}"),
    }
}

fn pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// A running `shapeblock-agent` process, killed when dropped.
pub struct AgentProcess {
    child: Child,
    pub log: PathBuf,
}

impl AgentProcess {
    pub fn spawn(
        dir: &std::path::Path,
        hub: &TestHub,
        token: &str,
        kubeconfig: &std::path::Path,
        tag: &str,
    ) -> Self {
        Self::spawn_to(
            dir,
            &hub.url(),
            hub.ca_file.as_deref(),
            token,
            kubeconfig,
            tag,
        )
    }

    /// Starts an agent for the hub at `url` (trusting `ca_file`, or over plain `ws://`).
    pub fn spawn_to(
        dir: &std::path::Path,
        url: &str,
        ca_file: Option<&std::path::Path>,
        token: &str,
        kubeconfig: &std::path::Path,
        tag: &str,
    ) -> Self {
        Self::spawn_with(dir, url, ca_file, token, kubeconfig, tag, &[])
    }

    /// [`AgentProcess::spawn_to`] with more flags for the agent.
    pub fn spawn_with(
        dir: &std::path::Path,
        url: &str,
        ca_file: Option<&std::path::Path>,
        token: &str,
        kubeconfig: &std::path::Path,
        tag: &str,
        flags: &[&str],
    ) -> Self {
        let binary = crate::process::agent_binary();
        Self::start(
            None, &binary, dir, url, ca_file, token, kubeconfig, tag, flags,
        )
    }

    /// An agent `binary` of another architecture, run by the user-mode emulator `launcher`
    /// (`qemu-aarch64-static`) against the hub at `url` (trusting `ca_file`, or over plain
    /// `ws://`); killed, emulator and all, when dropped.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_emulated(
        launcher: &std::path::Path,
        binary: &std::path::Path,
        dir: &std::path::Path,
        url: &str,
        ca_file: Option<&std::path::Path>,
        token: &str,
        kubeconfig: &std::path::Path,
        tag: &str,
    ) -> Self {
        Self::start(
            Some(launcher),
            binary,
            dir,
            url,
            ca_file,
            token,
            kubeconfig,
            tag,
            &[],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        launcher: Option<&std::path::Path>,
        binary: &std::path::Path,
        dir: &std::path::Path,
        url: &str,
        ca_file: Option<&std::path::Path>,
        token: &str,
        kubeconfig: &std::path::Path,
        tag: &str,
        flags: &[&str],
    ) -> Self {
        let token_file = dir.join(format!("{tag}.token"));
        std::fs::write(&token_file, token).unwrap();
        let log = dir.join(format!("{tag}.log"));
        let out = append_log(&log);
        let err = out.try_clone().unwrap();
        let mut cmd = crate::process::agent_command_via(
            launcher,
            binary,
            url,
            ca_file,
            &token_file,
            kubeconfig,
        );
        cmd.arg("--reconnect-min-ms=100")
            .arg("--reconnect-max-ms=1000")
            .args(flags)
            .env("RUST_LOG", "info")
            .stdout(out)
            .stderr(err);
        let child = crate::process::spawn_tied(cmd).expect("start shapeblock-agent");
        Self { child, log }
    }

    pub fn pid(&self) -> Option<u32> {
        Some(self.child.id())
    }

    /// SIGKILL, as a node failure or OOM kill would; waits for the process to end.
    pub async fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A response from the hub's HTTP API.
#[derive(Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl ApiResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A kept-alive HTTP/1.1 connection to a test hub's API (TLS pinned to its CA when given): its
/// sender, and the task that runs it (abort it to drop the connection at once).
pub async fn hub_connection(
    addr: SocketAddr,
    ca_file: Option<&std::path::Path>,
) -> (
    hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let io = connect_hub(addr, ca_file)
        .await
        .expect("connecting to the hub");
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .expect("HTTP/1.1 handshake with the hub");
    (sender, tokio::spawn(connection))
}

/// A GET of `path` on a test hub, with `token` as the bearer token.
pub fn hub_get(path: &str, token: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::get(path)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Empty::new())
        .expect("a GET request")
}

/// A connection to a test hub: TLS pinned to its CA when given, else plain TCP.
pub async fn connect_hub(
    addr: SocketAddr,
    ca_file: Option<&std::path::Path>,
) -> Result<Box<dyn IoStream>, Box<dyn std::error::Error + Send + Sync>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    Ok(match ca_file {
        Some(ca) => {
            let pem = std::fs::read(ca)?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
                roots.add(cert?)?;
            }
            let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name = rustls_pki_types::ServerName::try_from("localhost")?;
            Box::new(
                tokio_rustls::TlsConnector::from(Arc::new(tls))
                    .connect(name, tcp)
                    .await?,
            )
        }
        None => Box::new(tcp),
    })
}

/// A websocket to a test hub's `path` (e.g. `/api/v1/events?cursor=3`) with a bearer token.
pub async fn hub_websocket(
    hub: &TestHub,
    path: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<Box<dyn IoStream>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let io = connect_hub(hub.addr, hub.ca_file.as_deref())
        .await
        .expect("connect to the hub");
    let url = format!("ws://localhost{path}");
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(request, io)
        .await
        .expect("websocket handshake with the hub");
    ws
}

/// One HTTP/1.1 request to a hub at `addr` (over TLS when `ca_file` is given); a connection
/// failure is an error, for tests that expect one.
pub async fn try_http_request(
    addr: SocketAddr,
    ca_file: Option<&std::path::Path>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<ApiResponse, Box<dyn std::error::Error + Send + Sync>> {
    use http_body_util::BodyExt;
    let io = connect_hub(addr, ca_file).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request.body(http_body_util::Full::new(bytes::Bytes::from(
        body.unwrap_or_default(),
    )))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes().to_vec();
    Ok(ApiResponse {
        status,
        headers,
        body,
    })
}

pub trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> IoStream for T {}

impl TestHub {
    /// Calls the hub's API with the admin token.
    pub async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> ApiResponse {
        self.api_as(ADMIN_TOKEN, method, path, body).await
    }

    pub async fn api_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> ApiResponse {
        let body = body.map(|b| serde_json::to_vec(&b).unwrap());
        self.api_raw(Some(token), method, path, body).await
    }

    /// Calls the API with raw bytes (and no token when `token` is None).
    /// `/metrics` on the API listener, with the viewer token it needs there.
    pub async fn metrics(&self) -> String {
        let response = self
            .api_raw(Some(VIEWER_TOKEN), "GET", "/metrics", None)
            .await;
        assert_eq!(response.status, 200, "/metrics: {}", response.text());
        response.text()
    }

    pub async fn api_raw(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> ApiResponse {
        try_http_request(
            self.addr,
            self.ca_file.as_deref(),
            method,
            path,
            token,
            body,
        )
        .await
        .expect("hub request")
    }
}

/// A kubeconfig with a TokenRequest token for an existing ServiceAccount, as its pod would get.
pub async fn service_account_kubeconfig(
    dir: &std::path::Path,
    namespace: &str,
    name: &str,
) -> PathBuf {
    service_account_kubeconfig_on(&super::config().await, dir, namespace, name).await
}

/// [`service_account_kubeconfig`] for the control plane of `config` (an extra one).
pub async fn service_account_kubeconfig_on(
    config: &kube::Config,
    dir: &std::path::Path,
    namespace: &str,
    name: &str,
) -> PathBuf {
    let client = kube::Client::try_from(config.clone()).unwrap();
    // A bound token from the TokenRequest API, as a projected ServiceAccount token would be.
    let request = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}});
    let token_request = http::Request::post(format!(
        "/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
    ))
    .header("content-type", "application/json")
    .body(serde_json::to_vec(&request).unwrap())
    .unwrap();
    let response: serde_json::Value = client.request(token_request).await.expect("TokenRequest");
    let token = response["status"]["token"]
        .as_str()
        .expect("token in TokenRequest status")
        .to_string();
    let cluster = match config.root_cert.as_ref().and_then(|certs| certs.first()) {
        Some(der) => format!(
            "    server: {}\n    certificate-authority-data: {}\n",
            config.cluster_url,
            base64::engine::general_purpose::STANDARD.encode(pem(der))
        ),
        None => format!("    server: {}\n", config.cluster_url),
    };
    let path = dir.join(format!("{namespace}-{name}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n{cluster}\
             users:\n- name: u\n  user:\n    token: {token}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    path
}
