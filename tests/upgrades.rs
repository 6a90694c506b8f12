//! Fleet agent upgrades (issue 20, item 8), against three real control planes, each with the
//! install manifest applied as is (its Deployment included) and the real agent binary running
//! as the manifest's ServiceAccount. Nothing runs the Deployments' pods here, so each cluster
//! has a stand-in for its kubelet: when its Deployment's image changes, it kills the agent
//! process (the Recreate strategy) and starts a new one, unless the image is one that "does not
//! start". What is checked is what the operator sees: images in the clusters, states and
//! reasons in the hub's API, metrics.
//!
//! - Upgraded through the agent itself, one cluster first (a canary), then the rest; a pinned
//!   cluster is left alone until unpinned.
//! - The agent's rights over its own Deployment: that Deployment only, its image only, and only
//!   to another tag of the manifest's repository (refused otherwise, by RBAC or by the
//!   manifest's admission policy).
//! - A new image whose agents do not come back: the upgrade fails after its timeout, the fleet
//!   halts with no other cluster touched, and `resume` lets it go on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use shapeblock::hub::Registry;
use shapeblock::hub::upgrades::UpgradeConfig;
use shapeblock::render::agent::{AgentManifestParams, NAME, NAMESPACE, agent_manifest};
use shapeblock_test_support as support;
use support::cluster::wait_for;
use support::hub::{AgentProcess, TestHub, scratch_dir, service_account_kubeconfig_on};

const REPOSITORY: &str = "shapeblock.test/agent";
/// The image agents of this tag "do not start": the stand-in kubelet leaves them down.
const BROKEN: &str = "shapeblock.test/agent:broken";

/// One managed cluster: its control plane, the agent's credentials there, and the stand-in
/// kubelet that runs the agent process its Deployment asks for.
struct Cluster {
    id: String,
    admin: Client,
    agent_kubeconfig: PathBuf,
    /// (image, when the stand-in kubelet saw it) for every image its Deployment ran.
    rollouts: Arc<Mutex<Vec<(String, Instant)>>>,
    kubelet: tokio::task::JoinHandle<()>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kubelet.abort();
    }
}

async fn image_of(deployments: &Api<Deployment>) -> Option<String> {
    let deployment = deployments.get(NAME).await.ok()?;
    deployment.spec?.template.spec?.containers[0].image.clone()
}

/// Applies the install manifest (image `shapeblock.test/agent:1`) to a new control plane and
/// starts its stand-in kubelet; pins the cluster through the API first when `pin`.
async fn cluster(name: &str, hub: &TestHub, registry: &Registry, pin: bool) -> Cluster {
    let (config, _) = support::extra_control_plane(name).await;
    let admin = Client::try_from(config.clone()).unwrap();
    let (record, token) = registry.register(name, Default::default()).unwrap();
    if pin {
        let id = &record.id;
        let pinned = hub
            .api("PUT", &format!("/api/v1/clusters/{id}/agent-pin"), None)
            .await;
        assert_eq!(pinned.status, 200, "{}", pinned.text());
        assert_eq!(pinned.json()["agentPinned"], true);
    }
    let objects = agent_manifest(&AgentManifestParams {
        cluster_id: record.id.clone(),
        hub_url: hub.url(),
        image: format!("{REPOSITORY}:1"),
        token: token.expose().into(),
        registry_namespace: "shapeblock".into(),
        registry_secret: "registry-creds".into(),
        hub_ca: None,
    });
    for object in &objects {
        support::apply_object(&admin, object, "default", false).await;
    }
    let dir = scratch_dir(&format!("upgrades-{name}"));
    let agent_kubeconfig = service_account_kubeconfig_on(&config, &dir, NAMESPACE, NAME).await;
    let rollouts = Arc::new(Mutex::new(Vec::new()));
    let kubelet = tokio::spawn(kubelet(
        admin.clone(),
        dir,
        hub.url(),
        hub.ca_file.clone(),
        token.expose().to_string(),
        agent_kubeconfig.clone(),
        rollouts.clone(),
    ));
    Cluster {
        id: record.id,
        admin,
        agent_kubeconfig,
        rollouts,
        kubelet,
    }
}

/// Runs the agent its Deployment asks for: a new image ends the running agent (Recreate) and
/// starts the new one, unless it is [`BROKEN`].
async fn kubelet(
    admin: Client,
    dir: PathBuf,
    url: String,
    ca_file: Option<PathBuf>,
    token: String,
    kubeconfig: PathBuf,
    rollouts: Arc<Mutex<Vec<(String, Instant)>>>,
) {
    let deployments: Api<Deployment> = Api::namespaced(admin, NAMESPACE);
    let mut running: Option<(String, Option<AgentProcess>)> = None;
    loop {
        if let Some(image) = image_of(&deployments).await
            && running
                .as_ref()
                .is_none_or(|(current, _)| *current != image)
        {
            if let Some((_, Some(agent))) = running.take() {
                agent.kill().await;
            }
            rollouts
                .lock()
                .unwrap()
                .push((image.clone(), Instant::now()));
            let agent = (image != BROKEN).then(|| {
                let tag = format!("agent-{}", rollouts.lock().unwrap().len());
                AgentProcess::spawn_to(&dir, &url, ca_file.as_deref(), &token, &kubeconfig, &tag)
            });
            running = Some((image, agent));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn upgrade_of(hub: &TestHub, cluster: &str) -> Value {
    let response = hub
        .api("GET", &format!("/api/v1/clusters/{cluster}"), None)
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()["agentUpgrade"].clone()
}

async fn wait_state(hub: &TestHub, cluster: &str, state: &str, timeout: Duration) -> Value {
    wait_for(
        &format!("cluster {cluster}'s agent upgrade {state}"),
        timeout,
        async || {
            let upgrade = upgrade_of(hub, cluster).await;
            (upgrade["state"] == state).then_some(upgrade)
        },
    )
    .await
}

fn metric(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{metrics}"))
}

fn upgrades(max_concurrent: usize, timeout_seconds: u64, max_failures: usize) -> UpgradeConfig {
    UpgradeConfig {
        enabled: true,
        max_concurrent,
        timeout: Duration::from_secs(timeout_seconds),
        max_failures,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_hub_upgrades_the_fleet_through_each_agent_and_halts_on_failures() {
    let registry = Arc::new(Registry::in_memory());
    let dir = scratch_dir("upgrades-hub");
    let target = format!("{REPOSITORY}:2");
    let hub = TestHub::builder()
        .tls(&dir)
        .registry(registry.clone())
        .agent_upgrades(&target, upgrades(2, 60, 1))
        .start()
        .await;
    let addr = hub.addr;
    // c is pinned before its agent ever connects.
    let mut clusters = Vec::new();
    for (name, pin) in [
        ("upgrade-a", false),
        ("upgrade-b", false),
        ("upgrade-c", true),
    ] {
        clusters.push(cluster(name, &hub, &registry, pin).await);
    }

    // a and b: upgraded, one after the other (the first alone), and back with the new image.
    for cluster in &clusters[..2] {
        let upgrade = wait_state(&hub, &cluster.id, "UpToDate", Duration::from_secs(90)).await;
        assert_eq!(upgrade["image"], target.as_str(), "{upgrade}");
        assert_eq!(upgrade["target"], target.as_str());
        let deployments: Api<Deployment> = Api::namespaced(cluster.admin.clone(), NAMESPACE);
        assert_eq!(
            image_of(&deployments).await.as_deref(),
            Some(target.as_str())
        );
        // The patch was made with the agent's own identity (the request came through it).
        let deployment = deployments.get(NAME).await.unwrap();
        let managers: Vec<String> = deployment
            .metadata
            .managed_fields
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| f.manager)
            .collect();
        assert!(
            managers.iter().any(|m| m == "shapeblock-hub-upgrades"),
            "{managers:?}"
        );
        hub.wait_connected(&cluster.id).await;
    }
    let rollout = |c: &Cluster| c.rollouts.lock().unwrap().clone();
    let (a, b) = (rollout(&clusters[0]), rollout(&clusters[1]));
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(b.len(), 2, "{b:?}");
    // The canary: the second upgrade started only after the first agent was back (its
    // reconnect takes at least the agent's start, so the gap is more than the kubelet's 100 ms
    // poll).
    let (first, second) = if a[1].1 < b[1].1 { (&a, &b) } else { (&b, &a) };
    let gap = second[1].1 - first[1].1;
    assert!(
        gap > Duration::from_millis(200),
        "second upgrade {gap:?} after the first"
    );
    println!("canary: the second upgrade started {gap:?} after the first");

    // c: pinned, left at :1; unpinned, upgraded.
    let c = &clusters[2];
    let pinned = wait_state(&hub, &c.id, "Pinned", Duration::from_secs(30)).await;
    assert_eq!(pinned["image"], format!("{REPOSITORY}:1"), "{pinned}");
    assert_eq!(rollout(c).len(), 1);
    let unpinned = hub
        .api(
            "DELETE",
            &format!("/api/v1/clusters/{}/agent-pin", c.id),
            None,
        )
        .await;
    assert_eq!(unpinned.status, 200, "{}", unpinned.text());
    wait_state(&hub, &c.id, "UpToDate", Duration::from_secs(60)).await;
    assert_eq!(rollout(c).len(), 2);

    let report = hub.api("GET", "/api/v1/agent-upgrades", None).await.json();
    assert_eq!(report["counts"]["UpToDate"], 3, "{report}");
    assert_eq!(report["halted"], false);
    let metrics = hub.metrics().await;
    assert_eq!(
        metric(&metrics, "shapeblock_agent_upgrades{state=\"UpToDate\"}"),
        3.0
    );
    assert_eq!(
        metric(&metrics, "shapeblock_agent_upgrade_successes_total"),
        3.0
    );
    for c in &clusters {
        let series = format!(
            "shapeblock_agent_upgrade_state{{cluster=\"{}\",state=\"UpToDate\"}}",
            c.id
        );
        assert_eq!(metric(&metrics, &series), 1.0);
    }
    // c's Pinned series went when it was upgraded.
    assert!(!metrics.contains("state=\"Pinned\"} 1"), "{metrics}");

    // The agent's rights over itself, used directly as a compromised hub would.
    let agent = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&clusters[0].agent_kubeconfig).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let own: Api<Deployment> = Api::namespaced(agent.clone(), NAMESPACE);
    let strategic = |patch: Value| Patch::Strategic(patch);
    let refused = async |what: &str, patch: Value, fence: bool| match own
        .patch(NAME, &PatchParams::default(), &strategic(patch))
        .await
    {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{what}: {}", e.message);
            if fence {
                assert!(
                    e.message
                        .contains("changes only the image of its own Deployment"),
                    "{what}: not the admission policy: {}",
                    e.message
                );
            }
        }
        other => panic!("{what}: expected a refusal, got {other:?}"),
    };
    let container = |fields: Value| {
        let mut c = json!({"name": "agent"});
        c.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        json!({"spec": {"template": {"spec": {"containers": [c]}}}})
    };
    refused(
        "another repository",
        container(json!({"image": "attacker.example/agent:1"})),
        true,
    )
    .await;
    refused(
        "other arguments",
        container(json!({"args": ["--hub-url", "wss://attacker.example"]})),
        true,
    )
    .await;
    refused(
        "another container",
        json!({"spec": {"template": {"spec": {"containers": [
            {"name": "sidecar", "image": format!("{REPOSITORY}:2")}]}}}}),
        true,
    )
    .await;
    refused("more replicas", json!({"spec": {"replicas": 2}}), true).await;
    // RBAC: no other Deployment, not even a read of one; no new one.
    let other = Api::<Deployment>::namespaced(agent.clone(), NAMESPACE)
        .patch(
            "something-else",
            &PatchParams::default(),
            &strategic(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await;
    assert!(
        matches!(&other, Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("cannot patch")),
        "{other:?}"
    );
    // What upgrades do is allowed: another tag of the repository (a dry run: admission runs,
    // nothing changes).
    let mut dry_run = PatchParams::apply("shapeblock-hub-upgrades");
    dry_run.dry_run = true;
    own.patch(
        NAME,
        &dry_run,
        &strategic(container(json!({"image": format!("{REPOSITORY}:3")}))),
    )
    .await
    .expect("the agent may set its own image to a tag of its repository");

    // A new image whose agents never come back: the canary fails after the timeout, the fleet
    // halts, nobody else is touched.
    hub.stop().await;
    let hub = TestHub::builder()
        .tls(&dir)
        .registry(registry.clone())
        .addr(addr)
        .agent_upgrades(BROKEN, upgrades(2, 10, 1))
        .start()
        .await;
    let started = Instant::now();
    let failed = wait_for("an upgrade to fail", Duration::from_secs(90), async || {
        for c in &clusters {
            let upgrade = upgrade_of(&hub, &c.id).await;
            if upgrade["state"] == "Failed" {
                return Some((c.id.clone(), upgrade));
            }
        }
        None
    })
    .await;
    println!("failed after {:?}: {}", started.elapsed(), failed.1);
    assert!(
        failed.1["reason"]
            .as_str()
            .unwrap()
            .contains("did not reconnect within 10s"),
        "{}",
        failed.1
    );
    let report = hub.api("GET", "/api/v1/agent-upgrades", None).await.json();
    assert_eq!(report["halted"], true, "{report}");
    assert!(
        report["haltReason"].as_str().unwrap().contains("resume"),
        "{report}"
    );
    assert_eq!(report["counts"]["Failed"], 1, "{report}");
    assert_eq!(report["counts"]["Pending"], 2, "{report}");
    // Halted: the others keep their image, seconds later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut images = BTreeMap::new();
    for c in &clusters {
        let deployments: Api<Deployment> = Api::namespaced(c.admin.clone(), NAMESPACE);
        images.insert(c.id.clone(), image_of(&deployments).await.unwrap());
    }
    for (id, image) in &images {
        let expected = if *id == failed.0 {
            BROKEN
        } else {
            target.as_str()
        };
        assert_eq!(image, expected, "{images:?}");
    }
    let metrics = hub.metrics().await;
    assert_eq!(metric(&metrics, "shapeblock_agent_upgrades_halted"), 1.0);
    assert_eq!(
        metric(&metrics, "shapeblock_agent_upgrade_failures_total"),
        1.0
    );
    assert_eq!(
        metric(&metrics, "shapeblock_agent_upgrades{state=\"Pending\"}"),
        2.0
    );

    // Viewers read the report but cannot resume; an admin resumes.
    let viewer = hub
        .api_as(
            support::hub::VIEWER_TOKEN,
            "POST",
            "/api/v1/agent-upgrades/resume",
            None,
        )
        .await;
    assert_eq!(viewer.status, 403, "{}", viewer.text());
    let resumed = hub.api("POST", "/api/v1/agent-upgrades/resume", None).await;
    assert_eq!(resumed.status, 200, "{}", resumed.text());
    assert_eq!(resumed.json()["halted"], false);
    assert_eq!(resumed.json()["failures"], 0);
    hub.stop().await;
}
