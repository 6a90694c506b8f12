//! Single tenant in one command (issue 20, item 1): the hub chart with `localCluster.enabled`
//! installed by the real `helm install` against the real control plane, then the hub and the
//! agent binaries started exactly as the chart's two pods would start them: the hub with the
//! chart's `hub.yaml`, admin token and local token file, the agent with its Deployment's
//! arguments, its token Secret and a token of its ServiceAccount, every one read back from the
//! apiserver. No API call registers anything: the local cluster connects, gets registry
//! credentials and a Project through the API, refuses deletion and rotation, and connects again
//! after a hub restart with an empty data directory (the chart without persistence) and after
//! `helm upgrade`.
//!
//! What this does not run is the kubelet: the pods' images are the released ones, which this
//! machine cannot pull, so each pod's process is started here with the pod's own
//! configuration. Only two things are rewritten, and the test says which: the paths where the
//! pod mounts its files, and the Service address the agent dials (`<release>.<ns>.svc`, which
//! has no DNS here) for the hub's loopback address.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use serde_json::{Value, json};
use shapeblock::crd::Project;
use shapeblock_test_support as support;
use support::cluster::wait_for;
use support::hub::{ApiResponse, try_http_request};
use support::hub_process::HubBinary;

const RELEASE: &str = "hub";
/// The namespace single-tenant docs install into: also the registry namespace's default name,
/// which the chart must then not try to own.
const NAMESPACE: &str = "shapeblock";
/// Where the chart mounts the local token in the hub's pod.
const MOUNTED_TOKEN: &str = "/var/run/shapeblock-local/token";

use support::helm;

fn secret_value(secret: &Secret, key: &str) -> String {
    let bytes = &secret.data.as_ref().expect("Secret data")[key].0;
    String::from_utf8(bytes.clone()).unwrap()
}

struct Pods {
    dir: PathBuf,
    addr: SocketAddr,
    admin_token: String,
    hub_args: Vec<String>,
}

impl Pods {
    async fn api(&self, method: &str, path: &str, body: Option<Value>) -> ApiResponse {
        try_http_request(
            self.addr,
            None,
            method,
            path,
            Some(&self.admin_token),
            body.map(|b| serde_json::to_vec(&b).unwrap()),
        )
        .await
        .expect("hub request")
    }

    /// The hub process as its pod runs it, with a fresh data directory when `fresh`.
    async fn start_hub(&self, fresh: bool) -> HubBinary {
        let data = self.dir.join("data");
        if fresh {
            let _ = std::fs::remove_dir_all(&data);
        }
        let mut args = self.hub_args.clone();
        args.extend(["--data-dir".into(), data.display().to_string()]);
        HubBinary::spawn(
            &support::process::sibling_binary("shapeblock-hub"),
            &self.dir,
            self.addr,
            &args,
            &[
                ("SHAPEBLOCK_HUB_ADMIN_TOKENS", self.admin_token.as_str()),
                ("RUST_LOG", "info"),
            ],
            &self.dir.join("hub.log"),
        )
        .await
    }

    /// The one local cluster, once its agent is connected.
    async fn connected_local(&self, what: &str) -> Value {
        wait_for(what, Duration::from_secs(60), async || {
            let list = self.api("GET", "/api/v1/clusters", None).await;
            let clusters = list.json();
            let all = clusters.as_array()?;
            (all.len() == 1 && all[0]["local"] == true && all[0]["status"]["connected"] == true)
                .then(|| all[0].clone())
        })
        .await
    }
}

#[tokio::test]
async fn the_hub_chart_manages_its_own_cluster_as_local() {
    let kubeconfig = support::kubeconfig_path().await;
    let admin = support::client().await;
    let chart = support::process::repository().join("charts/shapeblock-hub");
    let chart = chart.to_str().unwrap();
    // As the README's single-tenant install: no Ingress or volume needed to see it work.
    let values = "localCluster.enabled=true,ingress.enabled=false,persistence.enabled=false";
    helm(
        &kubeconfig,
        &[
            "install",
            RELEASE,
            chart,
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--set",
            values,
        ],
    );

    // What the chart stored: one token, in the hub's Secret and in the agent's.
    let hub_secret = Api::<Secret>::namespaced(admin.clone(), NAMESPACE)
        .get(RELEASE)
        .await
        .unwrap();
    let token = secret_value(&hub_secret, "local-cluster-token");
    assert!(
        shapeblock::hub::registry::well_formed_token(&token),
        "the chart's local token {token:?} is not a cluster token"
    );
    let agent_ns = shapeblock::render::agent::NAMESPACE;
    let agent_secret = Api::<Secret>::namespaced(admin.clone(), agent_ns)
        .get(shapeblock::render::agent::TOKEN_SECRET)
        .await
        .unwrap();
    assert_eq!(
        secret_value(&agent_secret, "token"),
        token,
        "the hub's and the agent's Secrets hold different tokens"
    );
    let cluster_id = token.split('_').nth(1).unwrap().to_string();

    // The hub pod's files: hub.yaml from the ConfigMap, the token where the Secret is mounted.
    let dir = support::hub::scratch_dir("local-cluster");
    let config_map = Api::<ConfigMap>::namespaced(admin.clone(), NAMESPACE)
        .get(&format!("{RELEASE}-config"))
        .await
        .unwrap();
    let hub_yaml = config_map.data.as_ref().unwrap()["hub.yaml"].clone();
    assert!(hub_yaml.contains(MOUNTED_TOKEN), "{hub_yaml}");
    let token_file = dir.join("local-token");
    std::fs::write(&token_file, &token).unwrap();
    std::fs::write(
        dir.join("hub.yaml"),
        hub_yaml.replace(MOUNTED_TOKEN, token_file.to_str().unwrap()),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", support::process::free_port())
        .parse()
        .unwrap();
    let pods = Pods {
        admin_token: secret_value(&hub_secret, "admin-token"),
        hub_args: vec![
            "--config".into(),
            dir.join("hub.yaml").display().to_string(),
            // The pod listens on 0.0.0.0:8080 and 0.0.0.0:9180; here, free loopback ports.
            "--listen".into(),
            addr.to_string(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", support::process::free_port()),
        ],
        dir: dir.clone(),
        addr,
    };
    let hub = pods.start_hub(true).await;

    // The agent pod: its Deployment's arguments, its Secret's token, its ServiceAccount.
    let deployment = Api::<Deployment>::namespaced(admin.clone(), agent_ns)
        .get(shapeblock::render::agent::NAME)
        .await
        .unwrap();
    let deployment = serde_json::to_value(&deployment).unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = serde_json::from_value(container["args"].clone()).unwrap();
    let service_url = format!("ws://{RELEASE}.{NAMESPACE}.svc:8080");
    assert_eq!(
        args,
        [
            "--hub-url",
            service_url.as_str(),
            "--token-file",
            "/var/run/shapeblock/token",
            "--allow-plaintext"
        ],
        "the local agent dials the hub's Service"
    );
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["shapeblock.io/cluster"],
        cluster_id.as_str()
    );
    let agent_token = dir.join("agent-token");
    std::fs::write(&agent_token, secret_value(&agent_secret, "token")).unwrap();
    let agent_kubeconfig =
        support::hub::service_account_kubeconfig(&dir, agent_ns, shapeblock::render::agent::NAME)
            .await;
    let agent_args: Vec<String> = args
        .iter()
        .map(|a| match a.as_str() {
            a if a == service_url => format!("ws://{addr}"),
            "/var/run/shapeblock/token" => agent_token.display().to_string(),
            a => a.to_string(),
        })
        .collect();
    let agent_log = dir.join("agent.log");
    let mut agent = Command::new(support::process::agent_binary());
    agent
        .args(&agent_args)
        .arg("--kubeconfig")
        .arg(&agent_kubeconfig)
        .arg("--reconnect-min-ms=100")
        .arg("--reconnect-max-ms=1000")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(support::process::append_log(&agent_log))
        .stderr(support::process::append_log(&agent_log));
    // Tied to this process: it ends with the test binary even when the test fails.
    let mut agent = support::process::spawn_tied(agent).expect("start the agent");

    // Registered by the hub itself, connected, with the controllers: CRDs installed through
    // the tunnel, registry credentials and a Project through the API, as a user would.
    let local = pods
        .connected_local("the local cluster registered and connected")
        .await;
    assert_eq!(local["id"], cluster_id.as_str());
    assert_eq!(local["name"], "local");
    let cluster = format!("/api/v1/clusters/{cluster_id}");
    // Its agent is the chart's to upgrade (with the hub), never the fleet upgrades': the hub
    // read the chart's agent Deployment through the tunnel and leaves it alone.
    let upgrade = wait_for(
        "the local agent's upgrade state",
        Duration::from_secs(30),
        async || {
            let upgrade = pods.api("GET", &cluster, None).await.json()["agentUpgrade"].clone();
            (!upgrade.is_null()).then_some(upgrade)
        },
    )
    .await;
    assert_eq!(upgrade["state"], "Pinned", "{upgrade}");
    assert!(
        upgrade["reason"].as_str().unwrap().contains("hub chart"),
        "{upgrade}"
    );
    let credentials = pods
        .api(
            "PUT",
            &format!("{cluster}/registry-credentials"),
            Some(json!({"server": "registry.example.com", "username": "bot", "password": "hunter2-local"})),
        )
        .await;
    assert_eq!(credentials.status, 200, "{}", credentials.text());
    // The hub installs the CRDs through the tunnel once it is up; the kinds are served then.
    wait_for(
        "the ShapeBlock CRDs served in the local cluster",
        Duration::from_secs(60),
        async || {
            (pods
                .api("GET", &format!("{cluster}/projects"), None)
                .await
                .status
                == 200)
                .then_some(())
        },
    )
    .await;
    let project = format!("shop-{}", support::random_suffix());
    let created = pods
        .api(
            "POST",
            &format!("{cluster}/projects"),
            Some(json!({
                "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
                "metadata": {"name": project}, "spec": {}
            })),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let projects: Api<Project> = Api::all(admin.clone());
    support::cluster::project_active(&projects, &project, "the local cluster's Project Active")
        .await;

    // The configuration owns the local cluster: the API refuses to delete it or change its
    // token (a new token would lock its agent out), and says why.
    for (method, path) in [
        ("DELETE", cluster.clone()),
        ("POST", format!("{cluster}/token")),
        ("POST", format!("{cluster}/agent-manifest")),
    ] {
        let refused = pods.api(method, &path, None).await;
        assert_eq!(refused.status, 409, "{method} {path}: {}", refused.text());
        assert_eq!(
            refused.json()["reason"],
            "LocalCluster",
            "{}",
            refused.text()
        );
    }
    // A restart with an empty data directory (no persistence): registered again under the
    // same id, and the running agent's tunnel comes back with the token it holds.
    hub.stop();
    let hub = pods.start_hub(true).await;
    let again = pods
        .connected_local("the local cluster back after a hub restart without persistence")
        .await;
    assert_eq!(again["id"], cluster_id.as_str());
    let listed = pods
        .api("GET", &format!("{cluster}/projects/{project}"), None)
        .await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert_eq!(listed.json()["status"]["phase"], "Active");

    // `helm upgrade` keeps the token (the chart finds the installed Secret), so neither pod
    // needs anything new.
    helm(
        &kubeconfig,
        &[
            "upgrade",
            RELEASE,
            chart,
            "--namespace",
            NAMESPACE,
            "--set",
            values,
        ],
    );
    let upgraded = Api::<Secret>::namespaced(admin.clone(), NAMESPACE)
        .get(RELEASE)
        .await
        .unwrap();
    assert_eq!(secret_value(&upgraded, "local-cluster-token"), token);
    let agent_secret = Api::<Secret>::namespaced(admin.clone(), agent_ns)
        .get(shapeblock::render::agent::TOKEN_SECRET)
        .await
        .unwrap();
    assert_eq!(secret_value(&agent_secret, "token"), token);
    hub.stop();
    let _ = agent.kill();
    let _ = agent.wait();
}
