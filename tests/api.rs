//! The hub's REST API end to end: register a cluster, install its agent from the manifest the
//! API returns (applied to the real test apiserver, the agent running as the manifest's own
//! ServiceAccount), manage ShapeBlock resources through the tunnel, rotate the token; bad
//! requests change nothing; the registry survives restarts and `kill -9` during writes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, Patch, PatchParams, WatchParams};
use serde_json::{Value, json};
use shapeblock::crd::Project;
use shapeblock::hub::Registry;
use shapeblock::tunnel::CloseReason;
use support::TestNamespace;
use support::hub::{
    ADMIN_TOKEN, AgentProcess, TestHub, VIEWER_TOKEN, scratch_dir, service_account_kubeconfig,
    try_http_request,
};
use support::hub_process::HubBinary;
use support::process::{free_port, sibling_binary};
use support::tap::{Tap, TapRecord};

/// Applies every object of a multi-document YAML manifest with server-side apply.
async fn apply_manifest(client: &kube::Client, yaml: &str) -> Vec<Value> {
    let mut applied = Vec::new();
    for doc in yaml.split("---\n").filter(|d| !d.trim().is_empty()) {
        let object: Value = serde_saphyr::from_str(doc).expect("manifest document is YAML");
        support::apply_object(client, &object, "default", false).await;
        applied.push(object);
    }
    applied
}

async fn wait_for(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn register_install_connect_create_rotate() {
    let dir = scratch_dir("api-e2e");
    let admin = support::client().await;
    shapeblock::crd::install(admin.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    let registry = Arc::new(Registry::open(&dir.join("data")).unwrap());
    let hub = TestHub::builder()
        .tls(&dir)
        .registry(registry)
        .start()
        .await;

    let registered = hub
        .api(
            "POST",
            "/api/v1/clusters",
            Some(json!({"name": "edge-1", "labels": {"env": "test"}})),
        )
        .await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let body = registered.json();
    let cluster = body["cluster"]["id"].as_str().unwrap().to_string();
    let token = body["token"].as_str().unwrap().to_string();
    assert_eq!(body["cluster"]["status"]["connected"], false);
    let manifest = body["manifest"].as_str().unwrap();
    assert!(
        manifest.contains(&format!("wss://localhost:{}", hub.addr.port()))
            || manifest.contains("wss://"),
        "{manifest}"
    );

    // Install: the manifest's objects go into the cluster as they are.
    let objects = apply_manifest(&admin, manifest).await;
    assert_eq!(objects.len(), 20);
    let secret = Api::<Secret>::namespaced(admin.clone(), "shapeblock-agent")
        .get("shapeblock-agent-token")
        .await
        .unwrap();
    let stored_token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
    assert_eq!(stored_token, token, "the Secret carries the cluster token");

    // The agent runs as the manifest's ServiceAccount with the token from the Secret.
    let kubeconfig = service_account_kubeconfig(&dir, "shapeblock-agent", "shapeblock-agent").await;
    let agent = AgentProcess::spawn(&dir, &hub, &stored_token, &kubeconfig, "agent");
    wait_for("cluster connected", Duration::from_secs(30), async || {
        hub.api("GET", &format!("/api/v1/clusters/{cluster}/status"), None)
            .await
            .json()["connected"]
            == true
    })
    .await;
    let status = hub
        .api("GET", &format!("/api/v1/clusters/{cluster}"), None)
        .await
        .json();
    assert!(
        status["status"]["kubernetesVersion"]
            .as_str()
            .unwrap()
            .starts_with("v1."),
        "{status}"
    );
    assert!(status["status"]["connectedSince"].is_number(), "{status}");

    // A Project created through the API exists in the cluster: the least-privilege role
    // was enough.
    let project_name = format!("api-{}", support::random_suffix());
    let created = hub
        .api(
            "POST",
            &format!("/api/v1/clusters/{cluster}/projects"),
            Some(json!({"metadata": {"name": project_name}, "spec": {"displayName": "From the API"}})),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let in_cluster = Api::<Project>::all(admin.clone())
        .get(&project_name)
        .await
        .expect("Project in the cluster");
    assert_eq!(
        in_cluster.spec.display_name.as_deref(),
        Some("From the API")
    );
    // Update with server-side apply, read back, list.
    let applied = hub
        .api(
            "PUT",
            &format!("/api/v1/clusters/{cluster}/projects/{project_name}"),
            Some(json!({"metadata": {"name": project_name}, "spec": {"displayName": "Renamed"}})),
        )
        .await;
    assert_eq!(applied.status, 200, "{}", applied.text());
    assert_eq!(
        Api::<Project>::all(admin.clone())
            .get(&project_name)
            .await
            .unwrap()
            .spec
            .display_name
            .as_deref(),
        Some("Renamed")
    );
    let got = hub
        .api(
            "GET",
            &format!("/api/v1/clusters/{cluster}/projects/{project_name}"),
            None,
        )
        .await;
    assert_eq!(got.json()["spec"]["displayName"], "Renamed");
    let list = hub
        .api("GET", &format!("/api/v1/clusters/{cluster}/projects"), None)
        .await;
    assert!(
        list.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["metadata"]["name"] == project_name.as_str())
    );

    // Namespaced kinds through the same API, with the apiserver's validation messages.
    // The agent writes only in project namespaces (this hub runs no controllers to make one):
    // the namespace carries the project label the admission policy looks for.
    let ns = TestNamespace::new("api-apps").await;
    Api::<Namespace>::all(admin.clone())
        .patch(
            &ns.name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"shapeblock.io/project": ns.name}}})),
        )
        .await
        .unwrap();
    let app_path = format!("/api/v1/clusters/{cluster}/namespaces/{}/apps", ns.name);
    let app = json!({"metadata": {"name": "web"}, "spec": {"displayName": "Web",
        "registry": {}, "build": {"type": "image", "image": "nginx:1.27"}}});
    assert_eq!(hub.api("POST", &app_path, Some(app)).await.status, 201);
    let invalid = hub
        .api("POST", &app_path, Some(json!({"metadata": {"name": "bad"}, "spec": {"displayName": "Bad", "registry": {}, "build": {"type": "image"}}})))
        .await;
    assert_eq!(invalid.status, 422, "{}", invalid.text());
    assert!(
        invalid.json()["message"]
            .as_str()
            .unwrap()
            .contains("spec.build.image is required"),
        "{}",
        invalid.text()
    );
    let deleted = hub.api("DELETE", &format!("{app_path}/web"), None).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    assert_eq!(
        hub.api("GET", &format!("{app_path}/web"), None)
            .await
            .status,
        404
    );

    // Rotate: the tunnel drops within a second and the old token is refused from then on.
    let rotated = hub
        .api("POST", &format!("/api/v1/clusters/{cluster}/token"), None)
        .await;
    assert_eq!(rotated.status, 200, "{}", rotated.text());
    let rotated_at = Instant::now();
    hub.wait_disconnected(&cluster).await;
    let drop_time = rotated_at.elapsed();
    assert!(
        drop_time < Duration::from_secs(1),
        "tunnel closed {drop_time:?} after rotation"
    );
    wait_for(
        "the agent to hear that its token was revoked",
        Duration::from_secs(20),
        async || {
            agent
                .log_text()
                .contains(CloseReason::TokenRevoked.message())
        },
    )
    .await;
    assert!(!hub.gateway.status(&cluster).connected);
    let new_token = rotated.json()["token"].as_str().unwrap().to_string();
    assert_ne!(new_token, token);
    let _ = std::fs::write(dir.join("agent.token"), &new_token);
    // With the new token (re-read from its file on reconnect) the same agent comes back.
    hub.wait_connected(&cluster).await;

    let _ = Api::<Project>::all(admin)
        .delete(&project_name, &Default::default())
        .await;
}

/// case, token, method, path, body, expected status, expected message fragment.
type BadRequest<'a> = (
    &'a str,
    Option<&'a str>,
    &'a str,
    &'a str,
    Option<Vec<u8>>,
    u16,
    &'a str,
);

#[tokio::test]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let dir = scratch_dir("api-bad");
    let registry = Arc::new(Registry::open(&dir.join("data")).unwrap());
    let hub = TestHub::builder()
        .tls(&dir)
        .registry(registry)
        .start()
        .await;
    let store = dir.join("data/clusters.json");
    let registered = hub
        .api(
            "POST",
            "/api/v1/clusters",
            Some(json!({"name": "existing"})),
        )
        .await;
    assert_eq!(registered.status, 201);
    let cluster = registered.json()["cluster"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let before = std::fs::read(&store).unwrap();

    let widgets = format!("/api/v1/clusters/{cluster}/namespaces/x/widgets");
    let bad_name = format!("/api/v1/clusters/{cluster}/projects/Not_A_Name");
    let projects = format!("/api/v1/clusters/{cluster}/projects");
    let cases: Vec<BadRequest> = vec![
        (
            "no token",
            None,
            "GET",
            "/api/v1/clusters",
            None,
            401,
            "an API token is required",
        ),
        (
            "wrong token",
            Some("not-the-admin-token-at-all"),
            "GET",
            "/api/v1/clusters",
            None,
            401,
            "not valid",
        ),
        (
            "viewer writes",
            Some(VIEWER_TOKEN),
            "POST",
            "/api/v1/clusters",
            Some(br#"{"name":"x"}"#.to_vec()),
            403,
            "may only read",
        ),
        (
            "viewer deletes",
            Some(VIEWER_TOKEN),
            "DELETE",
            "/api/v1/clusters/c0",
            None,
            403,
            "may only read",
        ),
        (
            "malformed JSON",
            Some(ADMIN_TOKEN),
            "POST",
            "/api/v1/clusters",
            Some(br#"{"name": "x""#.to_vec()),
            400,
            "",
        ),
        (
            "unknown field",
            Some(ADMIN_TOKEN),
            "POST",
            "/api/v1/clusters",
            Some(br#"{"name":"x","colour":"red"}"#.to_vec()),
            422,
            "unknown field `colour`",
        ),
        (
            "missing field",
            Some(ADMIN_TOKEN),
            "POST",
            "/api/v1/clusters",
            Some(br#"{"labels":{}}"#.to_vec()),
            422,
            "missing field `name`",
        ),
        (
            "a name that would forge a log line",
            Some(ADMIN_TOKEN),
            "POST",
            "/api/v1/clusters",
            Some(br#"{"name":"edge\n2026-12-01T00:00:00Z INFO cluster deleted"}"#.to_vec()),
            422,
            "control characters",
        ),
        (
            "a label with an escape",
            Some(ADMIN_TOKEN),
            "POST",
            "/api/v1/clusters",
            Some(br#"{"name":"edge","labels":{"env":"\u001b[31mprod"}}"#.to_vec()),
            422,
            "control characters",
        ),
        (
            "empty name",
            Some(ADMIN_TOKEN),
            "POST",
            "/api/v1/clusters",
            Some(br#"{"name":" "}"#.to_vec()),
            422,
            "name must be",
        ),
        (
            "oversized body",
            Some(ADMIN_TOKEN),
            "POST",
            "/api/v1/clusters",
            Some(
                format!(
                    r#"{{"name":"x","labels":{{"a":"{}"}}}}"#,
                    "y".repeat(100 * 1024)
                )
                .into_bytes(),
            ),
            413,
            "",
        ),
        (
            "unknown cluster",
            Some(ADMIN_TOKEN),
            "DELETE",
            "/api/v1/clusters/cdoesnotexist",
            None,
            404,
            "not found",
        ),
        (
            "unknown resource type",
            Some(ADMIN_TOKEN),
            "GET",
            &widgets,
            None,
            404,
            "route not found",
        ),
        (
            "bad resource name",
            Some(ADMIN_TOKEN),
            "GET",
            &bad_name,
            None,
            400,
            "not a valid Kubernetes name",
        ),
        (
            "resource kind mismatch",
            Some(ADMIN_TOKEN),
            "POST",
            &projects,
            Some(br#"{"kind":"App","metadata":{"name":"p"}}"#.to_vec()),
            400,
            "does not match Project",
        ),
        (
            "status through the API",
            Some(ADMIN_TOKEN),
            "POST",
            &projects,
            Some(br#"{"metadata":{"name":"p"},"status":{"phase":"Active"}}"#.to_vec()),
            400,
            "status is written by the hub",
        ),
    ];
    for (case, token, method, path, body, status, message) in cases {
        let response = hub.api_raw(token, method, path, body).await;
        assert_eq!(response.status, status, "{case}: {}", response.text());
        let json = response.json();
        assert_eq!(json["code"], status, "{case}: error body {json}");
        assert!(
            json["message"].as_str().unwrap().contains(message),
            "{case}: {json}"
        );
        if status == 401 {
            assert!(
                response.headers.contains_key("www-authenticate"),
                "{case}: no WWW-Authenticate"
            );
        }
    }
    assert_eq!(
        std::fs::read(&store).unwrap(),
        before,
        "a rejected request changed the store"
    );
    let list = hub
        .api_as(VIEWER_TOKEN, "GET", "/api/v1/clusters", None)
        .await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json().as_array().unwrap().len(), 1);

    // An offline cluster: a clear 503, and nothing is attempted.
    let offline = hub
        .api("GET", &format!("/api/v1/clusters/{cluster}/projects"), None)
        .await;
    assert_eq!(offline.status, 503, "{}", offline.text());
    assert_eq!(offline.json()["reason"], "ClusterNotConnected");
    assert!(
        offline.json()["message"]
            .as_str()
            .unwrap()
            .contains("offline"),
        "{}",
        offline.text()
    );
    assert!(offline.headers.contains_key("retry-after"));

    // The OpenAPI document is served and matches the committed one.
    let served = hub
        .api_raw(None, "GET", "/api/v1/openapi.json", None)
        .await
        .json();
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        served, committed,
        "openapi.json is stale: run `cargo run -- openapi > openapi.json`"
    );
}

/// Through the resource API against a connected cluster: unknown fields and malformed bodies
/// are refused by the apiserver's strict validation, and nothing is created.
#[tokio::test]
async fn resource_bodies_are_validated_strictly() {
    let dir = scratch_dir("api-strict");
    let admin = support::client().await;
    shapeblock::crd::install(admin.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    let ns = TestNamespace::new("api-strict").await;
    let identity = support::hub::agent_identity(&dir, &ns.name, "agent", None).await;
    let hub = TestHub::builder().tls(&dir).start().await;
    let (record, token) = hub.registry.register("strict", Default::default()).unwrap();
    let _agent = AgentProcess::spawn(&dir, &hub, token.expose(), &identity.kubeconfig, "agent");
    hub.wait_connected(&record.id).await;
    let path = format!(
        "/api/v1/clusters/{}/namespaces/{}/services",
        record.id, ns.name
    );
    let unknown = hub
        .api("POST", &path, Some(json!({"metadata": {"name": "db"}, "spec": {"chart": {"name": "postgresql", "repoURL": "oci://r/c", "colour": "red"}}})))
        .await;
    assert_eq!(unknown.status, 400, "{}", unknown.text());
    assert!(
        unknown.json()["message"]
            .as_str()
            .unwrap()
            .contains("unknown field"),
        "{}",
        unknown.text()
    );
    let not_json = hub
        .api_raw(
            Some(ADMIN_TOKEN),
            "PUT",
            &format!("{path}/db"),
            Some(b"chart: postgresql".to_vec()),
        )
        .await;
    assert_eq!(not_json.status, 400, "{}", not_json.text());
    let mismatch = hub
        .api(
            "PUT",
            &format!("{path}/db"),
            Some(json!({"metadata": {"name": "other"}, "spec": {}})),
        )
        .await;
    assert_eq!(mismatch.status, 400, "{}", mismatch.text());
    let listed = hub.api("GET", &path, None).await;
    assert_eq!(
        listed.json()["items"].as_array().unwrap().len(),
        0,
        "a refused request created something"
    );
}

async fn start_hub_process(data_dir: &std::path::Path, port: u16) -> HubBinary {
    let args = [
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--admin-tokens".into(),
        ADMIN_TOKEN.into(),
        // Its manifests name ws://127.0.0.1 (the flag alone means true).
        "--allow-insecure-hub-url".into(),
    ];
    spawn_hub(data_dir.parent().unwrap(), port, &args).await
}

/// Starts the hub binary in `dir` listening on `port` with `args`, its output in
/// `dir/hub-<port>.log` (appended to, so restarts keep the earlier logs).
async fn spawn_hub(dir: &std::path::Path, port: u16, args: &[String]) -> HubBinary {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut all = vec!["--listen".to_string(), addr.to_string()];
    all.extend_from_slice(args);
    let log = dir.join(format!("hub-{port}.log"));
    HubBinary::spawn(
        &sibling_binary("shapeblock-hub"),
        dir,
        addr,
        &all,
        &[],
        &log,
    )
    .await
}

#[tokio::test]
async fn the_hub_starts_with_its_embedded_defaults() {
    // No configuration at all but a free port: state goes to ./shapeblock-data, and an admin
    // token is generated there (mode 0600).
    let dir = scratch_dir("api-defaults");
    let _ = std::fs::remove_dir_all(dir.join("shapeblock-data"));
    let hub = spawn_hub(&dir, free_port(), &[]).await;
    for path in ["/healthz", "/readyz"] {
        let response = try_http_request(hub.addr, None, "GET", path, None, None)
            .await
            .expect("hub request");
        assert_eq!(response.status, 200, "{path}: {}", response.text());
    }
    let token_file = dir.join("shapeblock-data/admin-token");
    let token = std::fs::read_to_string(&token_file).expect("generated admin token");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "admin token file mode {mode:o}");
    let listed = try_http_request(
        hub.addr,
        None,
        "GET",
        "/api/v1/clusters",
        Some(token.trim()),
        None,
    )
    .await
    .expect("hub request");
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert_eq!(listed.json(), json!([]));

    // A manifest from the defaults would send agents to this machine's loopback, in clear:
    // registering is refused, says how to set the URL, and registers nothing.
    let body = serde_json::to_vec(&json!({"name": "from-defaults"})).unwrap();
    let path = "/api/v1/clusters";
    let refused = http_request(hub.addr, None, "POST", path, Some(token.trim()), Some(body)).await;
    assert_eq!(refused.status, 422, "{}", refused.text());
    assert_eq!(refused.json()["reason"], "InsecureHubUrl");
    let message = refused.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("dial ws://localhost")
            && message.contains("loopback")
            && message.contains("--public-url"),
        "{message}"
    );
    let listed = http_request(hub.addr, None, "GET", path, Some(token.trim()), None).await;
    assert_eq!(
        listed.json(),
        json!([]),
        "a refused registration registered"
    );
    // With public_url (a flag: still no file), the same directory registers clusters, and the
    // manifest names that URL.
    drop(hub);
    let public = [
        "--public-url".to_string(),
        "wss://hub.example.com".to_string(),
    ];
    let hub = spawn_hub(&dir, free_port(), &public).await;
    let body = serde_json::to_vec(&json!({"name": "with-public-url"})).unwrap();
    let created = http_request(hub.addr, None, "POST", path, Some(token.trim()), Some(body)).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let manifest = created.json()["manifest"].as_str().unwrap().to_string();
    assert!(
        manifest.contains("wss://hub.example.com") && !manifest.contains("--allow-plaintext"),
        "{manifest}"
    );

    // Readiness means something: when the store cannot be written (its directory is gone, as
    // a lost volume would make it), registering fails with nothing half-done and the hub says
    // it is not ready, naming why; once the store can be written again, it is ready again.
    let data = dir.join("shapeblock-data");
    std::fs::rename(&data, dir.join("moved-away")).unwrap();
    let register = async |name: &str| {
        let body = serde_json::to_vec(&json!({ "name": name })).unwrap();
        let path = "/api/v1/clusters";
        http_request(hub.addr, None, "POST", path, Some(token.trim()), Some(body)).await
    };
    let refused = register("lost-volume").await;
    assert_eq!(refused.status, 500, "{}", refused.text());
    assert_eq!(refused.json()["reason"], "StoreFailed");
    let ready = http_request(hub.addr, None, "GET", "/readyz", None, None).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("registry"), "{}", ready.text());
    std::fs::rename(dir.join("moved-away"), &data).unwrap();
    let registered = register("volume-back").await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let ready = http_request(hub.addr, None, "GET", "/readyz", None, None).await;
    assert_eq!(ready.status, 200, "{}", ready.text());

    // A second hub on the same data directory refuses to start instead of overwriting the
    // first one's changes.
    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_shapeblock-hub"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .current_dir(&dir)
        .output()
        .await
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another shapeblock-hub is using the data directory"),
        "{stderr}"
    );
}

/// `/metrics` names every cluster and agent version: on the API port (the one an Ingress
/// exposes) it needs a token; `--metrics-listen` serves it, and nothing else, on an internal
/// address for Prometheus.
#[tokio::test]
async fn metrics_need_a_token_on_the_api_port_and_have_their_own_listener() {
    let dir = scratch_dir("api-metrics");
    let metrics_port = free_port();
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let data = dir.join("data");
    let args = [
        "--data-dir".into(),
        data.display().to_string(),
        "--admin-tokens".into(),
        ADMIN_TOKEN.into(),
        "--viewer-tokens".into(),
        VIEWER_TOKEN.into(),
        "--metrics-listen".into(),
        metrics_addr.to_string(),
    ];
    let hub = spawn_hub(&dir, free_port(), &args).await;
    let get = async |addr, path: &str, token: Option<&str>| {
        http_request(addr, None, "GET", path, token, None).await
    };
    let anonymous = get(hub.addr, "/metrics", None).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    assert_eq!(anonymous.json()["reason"], "Unauthorized");
    assert!(
        !anonymous.text().contains("shapeblock_"),
        "{}",
        anonymous.text()
    );
    let viewer = get(hub.addr, "/metrics", Some(VIEWER_TOKEN)).await;
    assert_eq!(viewer.status, 200, "{}", viewer.text());
    assert!(
        viewer.text().contains("shapeblock_tunnel_"),
        "{}",
        viewer.text()
    );

    // The internal listener answers without a token, and only /metrics.
    let internal = get(metrics_addr, "/metrics", None).await;
    assert_eq!(internal.status, 200, "{}", internal.text());
    assert!(
        internal.text().contains("shapeblock_tunnel_"),
        "{}",
        internal.text()
    );
    for path in ["/api/v1/clusters", "/healthz", "/agent/v1/connect"] {
        let other = get(metrics_addr, path, Some(ADMIN_TOKEN)).await;
        assert_eq!(
            other.status,
            404,
            "{path} on the metrics listener: {}",
            other.text()
        );
    }
    drop(hub);

    // The metrics listener may not be the API's own address.
    let same = tokio::process::Command::new(env!("CARGO_BIN_EXE_shapeblock-hub"))
        .args([
            "--listen",
            "127.0.0.1:18999",
            "--metrics-listen",
            "127.0.0.1:18999",
        ])
        .current_dir(&dir)
        .output()
        .await
        .unwrap();
    assert!(!same.status.success());
    let stderr = String::from_utf8_lossy(&same.stderr);
    assert!(stderr.contains("metrics_listen"), "{stderr}");
}

#[tokio::test]
async fn revocation_closes_the_tunnel_and_refuses_the_old_token() {
    let dir = scratch_dir("api-revoke");
    let hub = TestHub::builder().start().await;
    let registered = hub
        .api("POST", "/api/v1/clusters", Some(json!({"name": "revoked"})))
        .await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let cluster = registered.json()["cluster"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let token = registered.json()["token"].as_str().unwrap().to_string();
    let kubeconfig = support::kubeconfig_path().await;
    let agent = AgentProcess::spawn(&dir, &hub, &token, &kubeconfig, "agent");
    hub.wait_connected(&cluster).await;

    // Connection state is in the metrics: versions, last seen.
    let metrics = hub.metrics().await;
    let info = metrics
        .lines()
        .find(|l| l.starts_with("shapeblock_tunnel_info{") && l.contains(&cluster))
        .unwrap_or_else(|| panic!("no shapeblock_tunnel_info for {cluster}:\n{metrics}"));
    assert!(
        info.contains(&format!("agent_version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && info.contains("kubernetes_version=\"v1.")
            && info.ends_with(" 1"),
        "{info}"
    );
    assert!(
        metrics.contains(&format!(
            "shapeblock_tunnel_last_seen_seconds{{cluster=\"{cluster}\"}}"
        )),
        "{metrics}"
    );

    // Rotation: timed from before the request, the tunnel is gone within a second; a
    // handshake with the old token is refused, one with the new token accepted.
    let started = Instant::now();
    let rotated = hub
        .api("POST", &format!("/api/v1/clusters/{cluster}/token"), None)
        .await;
    assert_eq!(rotated.status, 200, "{}", rotated.text());
    hub.wait_disconnected(&cluster).await;
    let closed_after = started.elapsed();
    assert!(
        closed_after < Duration::from_secs(1),
        "tunnel closed {closed_after:?} after the rotation request"
    );
    assert_eq!(tunnel_handshake(hub.addr, &token).await, 401);
    let new_token = rotated.json()["token"].as_str().unwrap().to_string();
    assert_eq!(tunnel_handshake(hub.addr, &new_token).await, 101);
    std::fs::write(dir.join("agent.token"), &new_token).unwrap();
    hub.wait_connected(&cluster).await;

    // Deletion: the live tunnel closes, the token is refused, the cluster and its metrics
    // are gone.
    let started = Instant::now();
    let deleted = hub
        .api("DELETE", &format!("/api/v1/clusters/{cluster}"), None)
        .await;
    assert!(deleted.status < 300, "{}", deleted.text());
    hub.wait_disconnected(&cluster).await;
    let closed_after = started.elapsed();
    assert!(
        closed_after < Duration::from_secs(1),
        "tunnel closed {closed_after:?} after the delete request"
    );
    assert_eq!(tunnel_handshake(hub.addr, &new_token).await, 401);
    let gone = hub
        .api("GET", &format!("/api/v1/clusters/{cluster}"), None)
        .await;
    assert_eq!(gone.status, 404, "{}", gone.text());
    let metrics = hub.metrics().await;
    assert!(
        !metrics.contains(&cluster),
        "metrics of a deleted cluster remain:\n{metrics}"
    );
    wait_for(
        "the agent to hear that its cluster was deleted",
        Duration::from_secs(20),
        async || {
            agent
                .log_text()
                .contains(CloseReason::ClusterDeleted.message())
        },
    )
    .await;
}

/// The record of the tap's `index`th connection once its socket has closed both ways.
async fn socket_closed(tap: &Tap, index: usize, what: &str) -> TapRecord {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(record) = tap.records().get(index).filter(|r| r.closed()) {
            return record.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the old tunnel's socket is still open 10 s later: {:?}",
            tap.records().get(index)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Checks the old tunnel's socket closed, and stopped carrying bytes, within a second of
/// `requested`; prints the figure.
fn assert_closed_within_a_second(record: &TapRecord, requested: Instant, what: &str) {
    let closed = record.hub_closed.unwrap().duration_since(requested);
    let last_byte = record
        .last_byte()
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(requested));
    assert!(
        closed < Duration::from_secs(1) && last_byte < Duration::from_secs(1),
        "{what}: the hub closed the socket {closed:?} and the last byte moved {last_byte:?} \
         after the request"
    );
    support::figures::report(&format!(
        "{what}: old tunnel's socket closed by the hub {} after the request, last byte at {}",
        support::figures::ms(closed),
        support::figures::ms(last_byte)
    ));
}

/// Checks the agent was told `reason`, and does not dial again with its revoked token: with
/// its reconnect delay capped at 1 s, an agent that retried would have dialled several times
/// in 5 s, each a new connection through the tap beyond its `connections`.
async fn told_and_quiet(agent: &AgentProcess, tap: &Tap, reason: CloseReason, connections: usize) {
    wait_for(
        &format!("the agent to hear {reason:?}"),
        Duration::from_secs(10),
        async || agent.log_text().contains(reason.message()),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        tap.records().len(),
        connections,
        "the agent dialled again after {reason:?}:\n{}",
        agent.log_text()
    );
}

#[tokio::test]
async fn revocation_closes_the_socket_and_the_agent_stops_dialling_with_the_revoked_token() {
    let dir = scratch_dir("api-revoke-socket");
    let hub = TestHub::builder().start().await;
    let registered = hub
        .api("POST", "/api/v1/clusters", Some(json!({"name": "socket"})))
        .await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let cluster = registered.json()["cluster"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let token = registered.json()["token"].as_str().unwrap().to_string();
    // The agent reaches the hub through a tap that sees every byte of the socket.
    let tap = Tap::start(hub.addr).await;
    let kubeconfig = support::kubeconfig_path().await;
    let url = format!("ws://{}", tap.addr);
    let agent = AgentProcess::spawn_to(&dir, &url, None, &token, &kubeconfig, "agent");
    hub.wait_connected(&cluster).await;
    assert_eq!(tap.records().len(), 1);
    // A watch open through the tunnel, as a controller's or a log follower's would be.
    let configmaps = Api::<ConfigMap>::namespaced(hub.gateway.client(&cluster), "default");
    let mut watch = configmaps
        .watch(&WatchParams::default().timeout(290), "0")
        .await
        .expect("watch through the tunnel")
        .boxed();

    // Rotation: the old tunnel's socket closes within a second and nothing moves on it.
    let requested = Instant::now();
    let rotated = hub
        .api("POST", &format!("/api/v1/clusters/{cluster}/token"), None)
        .await;
    assert_eq!(rotated.status, 200, "{}", rotated.text());
    let record = socket_closed(&tap, 0, "rotation").await;
    assert_closed_within_a_second(&record, requested, "token rotation");
    let watch_ended = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = watch.next().await {}
    })
    .await;
    assert!(
        watch_ended.is_ok(),
        "a watch through the revoked tunnel still runs"
    );
    told_and_quiet(&agent, &tap, CloseReason::TokenRevoked, 1).await;
    // A new token in its file: it dials with that one, at once.
    let new_token = rotated.json()["token"].as_str().unwrap().to_string();
    std::fs::write(dir.join("agent.token"), &new_token).unwrap();
    hub.wait_connected(&cluster).await;
    assert_eq!(tap.records().len(), 2);

    // Deletion: the same, for the new tunnel.
    let requested = Instant::now();
    let deleted = hub
        .api("DELETE", &format!("/api/v1/clusters/{cluster}"), None)
        .await;
    assert!(deleted.status < 300, "{}", deleted.text());
    let record = socket_closed(&tap, 1, "deletion").await;
    assert_closed_within_a_second(&record, requested, "cluster deletion");
    told_and_quiet(&agent, &tap, CloseReason::ClusterDeleted, 2).await;
    // Its log went to a file: no terminal colour codes in it (issue 20).
    assert!(
        !agent.log_text().contains('\u{1b}'),
        "ANSI escape codes in the agent's log file:\n{}",
        agent.log_text()
    );
}

async fn list_ids(addr: std::net::SocketAddr) -> Vec<String> {
    let response = try_http_request(
        addr,
        None,
        "GET",
        "/api/v1/clusters",
        Some(ADMIN_TOKEN),
        None,
    )
    .await
    .expect("hub request");
    assert_eq!(response.status, 200, "{}", response.text());
    response
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn the_registry_survives_restarts_and_kill_9_during_writes() {
    let dir = scratch_dir("api-kill");
    let data = dir.join("data");
    let port = free_port();
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    for round in 0..3 {
        let hub = start_hub_process(&data, port).await;
        // The hub came back with every cluster it ever acknowledged, tokens included.
        let ids = list_ids(hub.addr).await;
        for (id, _) in &acknowledged {
            assert!(
                ids.contains(id),
                "round {round}: acknowledged cluster {id} lost"
            );
        }
        // Tokens authenticate: the 50 most recent (the writes closest to the kill), within the
        // hub's per-address handshake burst.
        for (id, token) in acknowledged.iter().rev().take(50) {
            assert_eq!(
                tunnel_handshake(hub.addr, token).await,
                101,
                "round {round}: token of {id} lost"
            );
        }
        // Eight writers register clusters as fast as they can; kill -9 lands mid-write.
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let addr = hub.addr;
                tokio::spawn(async move {
                    let mut done = Vec::new();
                    for i in 0.. {
                        let body =
                            serde_json::to_vec(&json!({"name": format!("r{round}-w{w}-{i}")}))
                                .unwrap();
                        let Ok(response) = tokio::time::timeout(
                            Duration::from_secs(5),
                            try_request(addr, "POST", "/api/v1/clusters", Some(body)),
                        )
                        .await
                        else {
                            break;
                        };
                        match response {
                            Some((201, json)) => done.push((
                                json["cluster"]["id"].as_str().unwrap().to_string(),
                                json["token"].as_str().unwrap().to_string(),
                            )),
                            _ => break,
                        }
                    }
                    done
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300 + 150 * round)).await;
        hub.kill();
        for writer in writers {
            acknowledged.extend(writer.await.unwrap());
        }
        assert!(
            !acknowledged.is_empty(),
            "no registration completed before the kill"
        );
    }
    // A graceful stop keeps everything too.
    let hub = start_hub_process(&data, port).await;
    let ids = list_ids(hub.addr).await;
    assert!(acknowledged.iter().all(|(id, _)| ids.contains(id)));
    eprintln!(
        "{} acknowledged registrations survived 3 kill -9 restarts",
        acknowledged.len()
    );
    hub.stop(); // SIGTERM
    let hub = start_hub_process(&data, port).await;
    assert_eq!(list_ids(hub.addr).await.len(), ids.len());
}

/// A request that may fail because the hub was killed: None instead of a panic.
async fn try_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Option<(u16, Value)> {
    let response =
        support::hub::try_http_request(addr, None, method, path, Some(ADMIN_TOKEN), body)
            .await
            .ok()?;
    let json = serde_json::from_slice(&response.body).ok()?;
    Some((response.status, json))
}

async fn tunnel_handshake(addr: std::net::SocketAddr, token: &str) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}/agent/v1/connect")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    match tokio_tungstenite::client_async(request, tcp).await {
        Ok((_ws, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("handshake failed: {other}"),
    }
}

/// Sends one HTTP/1.1 request with exactly the headers given (no Host unless given) and
/// returns the status code.
async fn raw_http1(addr: std::net::SocketAddr, head: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{head}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_request_whose_hub_url_cannot_be_derived_changes_nothing_and_http2_uses_its_authority() {
    let hub = TestHub::builder()
        .registry(Arc::new(Registry::in_memory()))
        .start()
        .await;
    let registered = hub
        .api("POST", "/api/v1/clusters", Some(json!({"name": "kept"})))
        .await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let id = registered.json()["cluster"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let token = registered.json()["token"].as_str().unwrap().to_string();

    // A second cluster of the same name is refused, not registered silently beside the first.
    let duplicate = hub
        .api("POST", "/api/v1/clusters", Some(json!({"name": "kept"})))
        .await;
    assert_eq!(duplicate.status, 409, "{}", duplicate.text());
    assert_eq!(duplicate.json()["reason"], "AlreadyExists");

    // The scheme of Authorization is case-insensitive.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
        let request = format!(
            "GET /api/v1/clusters HTTP/1.1\r\nHost: localhost\r\nAuthorization: bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }

    // A Host the hub URL cannot be made from: 400, and nothing registered or rotated.
    let body = r#"{"name": "ghost"}"#;
    let status = raw_http1(
        hub.addr,
        "POST /api/v1/clusters HTTP/1.1\r\nHost: bad_host!",
        body,
    )
    .await;
    assert_eq!(status, 400);
    for path in [
        format!("/api/v1/clusters/{id}/token"),
        format!("/api/v1/clusters/{id}/agent-manifest"),
    ] {
        let head = format!("POST {path} HTTP/1.1\r\nHost: bad_host!");
        assert_eq!(raw_http1(hub.addr, &head, "").await, 400, "{path}");
    }
    let names: Vec<String> = hub.registry.list().into_iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        ["kept"],
        "a refused registration left a cluster behind"
    );
    assert_eq!(
        hub.registry.authenticate(&token).as_deref(),
        Some(id.as_str()),
        "a refused rotation revoked the token"
    );

    // HTTP/2 has no Host header: the hub URL comes from :authority.
    let tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!("http://{}/api/v1/clusters", hub.addr))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            r#"{"name": "over-h2"}"#,
        )))
        .unwrap();
    assert!(request.headers().get("host").is_none());
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 201);
    use http_body_util::BodyExt;
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let created: Value = serde_json::from_slice(&body).unwrap();
    let manifest = created["manifest"].as_str().unwrap();
    assert!(
        manifest.contains(&format!("ws://{}", hub.addr)),
        "the manifest's hub URL is the request's authority:\n{manifest}"
    );
}

/// One request to the hub, which must get an answer.
async fn http_request(
    addr: std::net::SocketAddr,
    ca_file: Option<&std::path::Path>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> support::hub::ApiResponse {
    try_http_request(addr, ca_file, method, path, token, body)
        .await
        .expect("hub request")
}

#[tokio::test]
async fn api_errors_are_json_for_a_wrong_method_and_a_bad_events_query() {
    let hub = TestHub::builder().start().await;
    let wrong = hub.api("PATCH", "/api/v1/clusters", None).await;
    assert_eq!(wrong.status, 405, "{}", wrong.text());
    assert_eq!(
        wrong.json()["reason"],
        "MethodNotAllowed",
        "{}",
        wrong.text()
    );
    let query = hub.api("GET", "/api/v1/events?cursor=soon", None).await;
    assert_eq!(query.status, 400, "{}", query.text());
    assert_eq!(query.json()["reason"], "BadRequest", "{}", query.text());
}
