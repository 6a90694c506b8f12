//! The static aarch64 binaries (what the arm64 images ship) do their job: the agent and the
//! hub `.ci/run` cross-compiles, run under qemu-user, against the real test control plane. The
//! agent connects to a hub and serves requests through the tunnel; the hub serves its API and
//! a tunnel over TLS. They prove the cross build links and runs (TLS with ring, mimalloc, the
//! tunnel, the kube client), not that it is fast: qemu emulates every instruction.
//!
//! `SHAPEBLOCK_AARCH64_AGENT` and `SHAPEBLOCK_AARCH64_HUB` name the binaries; without them the
//! tests fail and say how to build them (a skipped test would hide a broken ARM build).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use shapeblock::crd::Project;
use support::TestNamespace;
use support::cluster::{project_active, registry_secret};
use support::hub::{
    ADMIN_TOKEN, AgentProcess, ApiResponse, TestHub, agent_identity, scratch_dir, try_http_request,
};
use support::hub_process::{HubBinary, Pki};
use support::process::free_port;

/// `e_machine` of an ELF file for AArch64.
const EM_AARCH64: u16 = 183;

/// The aarch64 agent binary, checked to be one (a host binary here would prove nothing).
fn aarch64_agent() -> PathBuf {
    aarch64_binary(
        "SHAPEBLOCK_AARCH64_AGENT",
        "--profile agent --target aarch64-unknown-linux-musl --bin shapeblock-agent",
        "aarch64-unknown-linux-musl/agent/shapeblock-agent",
    )
}

/// The aarch64 hub binary, checked to be one.
fn aarch64_hub() -> PathBuf {
    aarch64_binary(
        "SHAPEBLOCK_AARCH64_HUB",
        "--release --target aarch64-unknown-linux-musl --bin shapeblock-hub",
        "aarch64-unknown-linux-musl/release/shapeblock-hub",
    )
}

/// The binary that `variable` names, checked to be an aarch64 ELF executable; without the
/// variable, fails saying how `.ci/run` builds it (`cargo build <build>`, into `target/<output>`).
fn aarch64_binary(variable: &str, build: &str, output: &str) -> PathBuf {
    let Some(path) = std::env::var_os(variable).map(PathBuf::from) else {
        panic!(
            "{variable} is not set: build the aarch64 binary and name it, as .ci/run does:\n  \
             rustup target add aarch64-unknown-linux-musl\n  \
             apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static\n  \
             CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc \
             CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc \
             cargo build --locked {build}\n  \
             export {variable}=$PWD/target/{output}"
        );
    };
    let header =
        std::fs::read(&path).unwrap_or_else(|e| panic!("{variable}={}: {e}", path.display()));
    // ELF magic, 64-bit class, little-endian, then e_machine at offset 18.
    assert!(
        header.len() > 20 && header.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let machine = u16::from_le_bytes([header[18], header[19]]);
    assert_eq!(
        machine,
        EM_AARCH64,
        "{} is not an aarch64 binary (e_machine {machine})",
        path.display()
    );
    path
}

/// qemu's user-mode emulator for aarch64 (Debian's `qemu-user-static`), found on PATH.
fn qemu_aarch64() -> PathBuf {
    let name = "qemu-aarch64-static";
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{name} not found on PATH: apt-get install qemu-user-static"))
}

async fn wait_for(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A hub's API (TLS pinned to `ca_file`), called as the admin.
struct HubApi {
    addr: SocketAddr,
    ca_file: PathBuf,
    token: String,
}

impl HubApi {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> ApiResponse {
        try_http_request(
            self.addr,
            Some(&self.ca_file),
            method,
            path,
            Some(&self.token),
            body.map(|b| b.to_string().into_bytes()),
        )
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Registers a cluster; returns its id and token.
    async fn register(&self, name: &str) -> (String, String) {
        let registered = self
            .call("POST", "/api/v1/clusters", Some(json!({"name": name})))
            .await;
        assert_eq!(registered.status, 201, "{}", registered.text());
        let body = registered.json();
        (
            body["cluster"]["id"].as_str().unwrap().to_string(),
            body["token"].as_str().unwrap().to_string(),
        )
    }

    async fn connected(&self, cluster: &str) -> bool {
        self.call("GET", &format!("/api/v1/clusters/{cluster}/status"), None)
            .await
            .json()["connected"]
            == true
    }
}

/// Waits until the hub reports `cluster` connected (failing with the agent's log), then checks
/// what the agent told it and serves a Project through the tunnel both ways: created through
/// the hub's API and found in the apiserver, read back through the API, deleted. A hub that
/// runs its `controllers` must also make it Active and, on deletion, let it go (its finalizer).
async fn connects_and_serves(
    api: &HubApi,
    cluster: &str,
    agent: &AgentProcess,
    admin: &Client,
    controllers: bool,
) {
    let log = || support::process::log_tail(&agent.log, 30);
    // Emulated start-up and TLS handshakes are slower than native, still seconds.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !api.connected(cluster).await {
        assert!(
            Instant::now() < deadline,
            "the aarch64 agent did not connect within 60 s; its log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The hub reports what the agent told it: its version, the cluster's.
    let status = api
        .call("GET", &format!("/api/v1/clusters/{cluster}"), None)
        .await
        .json();
    assert_eq!(
        status["status"]["agentVersion"],
        env!("CARGO_PKG_VERSION"),
        "{status}"
    );
    assert!(
        status["status"]["kubernetesVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("v1.")),
        "{status}"
    );

    // hub → tunnel → the emulated agent → kube-apiserver, and back.
    let project = format!("arm-{}", support::random_suffix());
    let projects = format!("/api/v1/clusters/{cluster}/projects");
    let created = api
        .call(
            "POST",
            &projects,
            Some(json!({"metadata": {"name": project}, "spec": {"displayName": "On ARM"}})),
        )
        .await;
    assert_eq!(
        created.status,
        201,
        "{}; agent log:\n{}",
        created.text(),
        log()
    );
    let in_cluster: Api<Project> = Api::all(admin.clone());
    let found = in_cluster
        .get(&project)
        .await
        .expect("the Project reached the apiserver");
    assert_eq!(found.spec.display_name.as_deref(), Some("On ARM"));
    if controllers {
        project_active(&in_cluster, &project, "the Project Active").await;
    }
    let got = api
        .call("GET", &format!("{projects}/{project}"), None)
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["spec"]["displayName"], "On ARM");
    let deleted = api
        .call("DELETE", &format!("{projects}/{project}"), None)
        .await;
    assert!((200..300).contains(&deleted.status), "{}", deleted.text());
    if controllers {
        wait_for(
            "the Project deleted (its finalizer removed)",
            Duration::from_secs(60),
            async || matches!(in_cluster.get_opt(&project).await, Ok(None)),
        )
        .await;
    }
}

#[tokio::test]
async fn the_aarch64_agent_under_qemu_connects_and_serves_requests() {
    let binary = aarch64_agent();
    let qemu = qemu_aarch64();
    let dir = scratch_dir("arm-agent");
    let admin = support::client().await;
    shapeblock::crd::install(admin.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    let ns = TestNamespace::new("arm").await;
    let identity = agent_identity(&dir, &ns.name, "agent", None).await;
    let hub = TestHub::builder().tls(&dir).start().await;
    let api = HubApi {
        addr: hub.addr,
        ca_file: hub.ca_file.clone().unwrap(),
        token: ADMIN_TOKEN.into(),
    };
    let (cluster, token) = api.register("arm-board").await;
    let agent = AgentProcess::spawn_emulated(
        &qemu,
        &binary,
        &dir,
        &hub.url(),
        hub.ca_file.as_deref(),
        &token,
        &identity.kubeconfig,
        "agent-aarch64",
    );
    connects_and_serves(&api, &cluster, &agent, &admin, false).await;

    // The kube client through the tunnel: a write read back directly, and a list.
    let client = hub.gateway.client(&cluster);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "from-arm"}, "data": {"arch": "aarch64"}
    }))
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let direct: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns.name);
    assert_eq!(
        direct.get("from-arm").await.unwrap().data.unwrap()["arch"],
        "aarch64"
    );
    let names: Vec<String> = Api::<Namespace>::all(client)
        .list(&ListParams::default())
        .await
        .unwrap()
        .iter()
        .map(|n| n.name_any())
        .collect();
    assert!(names.contains(&ns.name), "{names:?}");

    // The emulator is the agent's process: killing it ends the tunnel.
    agent.kill().await;
    wait_for(
        "the hub seeing the agent gone",
        Duration::from_secs(30),
        async || !api.connected(&cluster).await,
    )
    .await;
}

#[tokio::test]
async fn the_aarch64_hub_under_qemu_serves_its_api_and_a_tunnel() {
    let hub_binary = aarch64_hub();
    let agent_binary = aarch64_agent();
    let qemu = qemu_aarch64();
    let dir = scratch_dir("arm-hub");
    support::jobs().await; // the Project's deletion deletes its namespace: kube-controller-manager
    let admin = support::client().await;
    shapeblock::crd::install(admin.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    let ns = TestNamespace::new("arm-hub").await;
    let identity = agent_identity(&dir, &ns.name, "agent", None).await;

    // What a Project needs before it can be Active: the registry Secret it copies.
    let shapeblock: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "shapeblock"}})).unwrap();
    let _ = Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &shapeblock)
        .await;
    let _ = Api::<Secret>::namespaced(admin.clone(), "shapeblock")
        .create(
            &PostParams::default(),
            &registry_secret("registry-creds", "dXNlcjpvbmU="),
        )
        .await;

    // The hub binary as the image runs it: a configuration file, TLS, its own data directory,
    // its controllers on (they reconcile the Project below, emulated too).
    let pki = Pki::create(&dir);
    let port = free_port();
    let token = "arm-hub-admin-token-0123456789";
    let config = dir.join("hub.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\ndata_dir: {data}\ntls_cert_file: {cert}\n\
             tls_key_file: {key}\nadmin_tokens: [{token}]\npublic_url: wss://127.0.0.1:{port}\n\
             allow_insecure_hub_url: true\n",
            data = dir.join("data").display(),
            cert = pki.cert_file.display(),
            key = pki.key_file.display(),
        ),
    )
    .unwrap();
    let mut hub = HubBinary::spawn(
        &qemu,
        &dir,
        SocketAddr::from(([127, 0, 0, 1], port)),
        &[
            hub_binary.display().to_string(),
            "--config".into(),
            config.display().to_string(),
        ],
        &[("RUST_LOG", "info")],
        &dir.join("hub.log"),
    )
    .await;
    let api = HubApi {
        addr: hub.addr,
        ca_file: pki.ca_file.clone(),
        token: token.into(),
    };
    let health = api.call("GET", "/healthz", None).await;
    assert_eq!(health.status, 200, "{}", health.text());
    assert_eq!(health.json()["version"], env!("CARGO_PKG_VERSION"));

    let (cluster, cluster_token) = api.register("arm-hub-board").await;
    let agent = AgentProcess::spawn_emulated(
        &qemu,
        &agent_binary,
        &dir,
        &format!("wss://127.0.0.1:{port}"),
        Some(&pki.ca_file),
        &cluster_token,
        &identity.kubeconfig,
        "agent-aarch64",
    );
    connects_and_serves(&api, &cluster, &agent, &admin, true).await;
    hub.assert_running(Instant::now() + Duration::from_secs(1), "keep running");
    hub.stop();
}
