//! A hub running controllers with one cluster connected to it: the test control plane, whose
//! agent runs as the install manifest's own ServiceAccount (so every write the controllers
//! make also proves the least-privilege role), with the `shapeblock/registry-creds` Secret
//! and the CRDs installed by the hub.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;
use shapeblock::crd::{App, AppPhase, Project, ProjectPhase};
use shapeblock::hub::Registry;
use shapeblock::render::agent::{AgentManifestParams, agent_manifest};

use shapeblock::render::app::AppSettings;

use super::hub::{AgentProcess, TestHub, scratch_dir, service_account_kubeconfig};

/// Polls `check` every 100 ms until it yields a value; fails the test after `timeout`.
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Installs the agent's RBAC from the install manifest (everything but the Deployment, which
/// the test replaces with a local agent process) and returns that agent's kubeconfig.
async fn install_agent_rbac(
    admin: &Client,
    dir: &std::path::Path,
    cluster: &str,
    hub: &TestHub,
) -> PathBuf {
    let objects = agent_manifest(&AgentManifestParams {
        cluster_id: cluster.into(),
        hub_url: hub.url(),
        image: "shapeblock-agent:test".into(),
        token: "unused".into(),
        registry_namespace: "shapeblock".into(),
        registry_secret: "registry-creds".into(),
        hub_ca: None,
    });
    for object in objects.iter().filter(|o| o["kind"] != "Deployment") {
        super::apply_object(admin, object, "default", false).await;
    }
    service_account_kubeconfig(dir, "shapeblock-agent", "shapeblock-agent").await
}

/// A dockerconfigjson Secret for registry.example.com.
pub fn registry_secret(name: &str, auth: &str) -> Secret {
    let config = json!({"auths": {"registry.example.com": {"auth": auth}}}).to_string();
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(config.into_bytes()),
        )])),
        ..Default::default()
    }
}

/// A Project's phase and message.
pub async fn phase(projects: &Api<Project>, name: &str) -> Option<(ProjectPhase, String)> {
    let project = projects.get_opt(name).await.ok()??;
    let status = project.status?;
    Some((status.phase?, status.message.unwrap_or_default()))
}

/// A hub running controllers and one cluster connected to it; dropping it stops both.
pub struct ConnectedCluster {
    pub admin: Client,
    pub hub: Option<TestHub>,
    pub registry: Arc<Registry>,
    pub cluster_id: String,
    dir: PathBuf,
    relay: Option<shapeblock::relay::outbound::RelayConfig>,
    apps: AppSettings,
    agent: Option<AgentProcess>,
    /// The agent's token, for [`Self::restart_agent`].
    token: String,
}

impl ConnectedCluster {
    /// Kills the agent (SIGKILL, as a node failure would) and waits until the hub sees the
    /// tunnel gone.
    pub async fn kill_agent(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.kill().await;
        }
        if let Some(hub) = &self.hub {
            hub.wait_disconnected(&self.cluster_id).await;
        }
    }

    /// Kills the agent (SIGKILL) and starts a new one, as a node failure and the Deployment's
    /// restart would; returns once it is connected again. Every request in the old tunnel
    /// fails mid-way.
    pub async fn restart_agent(&mut self) {
        self.kill_agent().await;
        let hub = self.hub.as_ref().expect("hub running");
        self.agent =
            Some(connect_agent(&self.admin, &self.dir, hub, &self.cluster_id, &self.token).await);
    }

    /// Stops the hub (as a crash would, it keeps nothing but the registry) and starts a new one
    /// on the same address; the agent reconnects on its own.
    pub async fn restart_hub(&mut self) {
        let hub = self.hub.take().expect("hub running");
        let addr: SocketAddr = hub.addr;
        hub.stop().await;
        let mut hub = TestHub::builder()
            .tls(&self.dir)
            .registry(self.registry.clone())
            .addr(addr)
            .controllers()
            .apps(self.apps.clone());
        if let Some(relay) = &self.relay {
            hub = hub.relay(relay.clone());
        }
        let hub = hub.start().await;
        hub.wait_connected(&self.cluster_id).await;
        self.hub = Some(hub);
    }
}

/// Starts a hub with controllers and connects the test control plane to it as `name`.
pub async fn connected_cluster(name: &str) -> ConnectedCluster {
    connected_cluster_relaying(name, None).await
}

/// Like [`connected_cluster`], the hub relaying to a ShapeBlock server when `relay` is given.
pub async fn connected_cluster_relaying(
    name: &str,
    relay: Option<shapeblock::relay::outbound::RelayConfig>,
) -> ConnectedCluster {
    connected_cluster_with(name, relay, AppSettings::default()).await
}

/// Like [`connected_cluster_relaying`], the hub deploying Apps with these `apps:` settings.
pub async fn connected_cluster_with(
    name: &str,
    relay: Option<shapeblock::relay::outbound::RelayConfig>,
    apps: AppSettings,
) -> ConnectedCluster {
    connected_cluster_from(name, relay, apps, true).await
}

/// Like [`connected_cluster`], with no `shapeblock/registry-creds` Secret created (the cluster
/// as the install manifest leaves it; a test sets the credentials through the API).
pub async fn connected_cluster_without_registry_secret(name: &str) -> ConnectedCluster {
    connected_cluster_from(name, None, AppSettings::default(), false).await
}

async fn connected_cluster_from(
    name: &str,
    relay: Option<shapeblock::relay::outbound::RelayConfig>,
    apps: AppSettings,
    registry_secret: bool,
) -> ConnectedCluster {
    let admin = super::client().await;
    let dir = scratch_dir(name);
    let registry = Arc::new(Registry::in_memory());
    let mut hub = TestHub::builder()
        .tls(&dir)
        .registry(registry.clone())
        .controllers()
        .apps(apps.clone());
    if let Some(relay) = &relay {
        hub = hub.relay(relay.clone());
    }
    let hub = hub.start().await;
    let (record, token) = hub.registry.register(name, Default::default()).unwrap();
    let agent = connect_agent_with(
        &admin,
        &dir,
        &hub,
        &record.id,
        token.expose(),
        registry_secret,
    )
    .await;
    ConnectedCluster {
        admin,
        hub: Some(hub),
        registry,
        cluster_id: record.id,
        dir,
        relay,
        apps,
        agent: Some(agent),
        token: token.expose().to_string(),
    }
}

/// Connects the test control plane to `hub` as registered cluster `cluster` with `token`: the
/// agent's RBAC from the install manifest, the `shapeblock/registry-creds` Secret, an agent
/// process; returns once the tunnel is up and the hub has installed the CRDs.
pub async fn connect_agent(
    admin: &Client,
    dir: &std::path::Path,
    hub: &TestHub,
    cluster: &str,
    token: &str,
) -> AgentProcess {
    connect_agent_with(admin, dir, hub, cluster, token, true).await
}

async fn connect_agent_with(
    admin: &Client,
    dir: &std::path::Path,
    hub: &TestHub,
    cluster: &str,
    token: &str,
    with_registry_secret: bool,
) -> AgentProcess {
    let kubeconfig = install_agent_rbac(admin, dir, cluster, hub).await;
    let shapeblock: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "shapeblock"}})).unwrap();
    let _ = Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &shapeblock)
        .await;
    if with_registry_secret {
        let _ = Api::<Secret>::namespaced(admin.clone(), "shapeblock")
            .create(
                &PostParams::default(),
                &registry_secret("registry-creds", "dXNlcjpvbmU="),
            )
            .await;
    }
    let agent = AgentProcess::spawn(dir, hub, token, &kubeconfig, "agent");
    hub.wait_connected(cluster).await;
    let projects: Api<Project> = Api::all(admin.clone());
    wait_for(
        "CRDs installed by the hub",
        Duration::from_secs(60),
        async || projects.list(&Default::default()).await.ok(),
    )
    .await;
    agent
}

/// Creates a Project and waits until it is Active; returns its namespace.
pub async fn active_project(admin: &Client, prefix: &str) -> String {
    let projects: Api<Project> = Api::all(admin.clone());
    let name = format!("{prefix}-{}", super::random_suffix());
    let project: Project = serde_json::from_value(json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
        "metadata": {"name": name}, "spec": {}
    }))
    .unwrap();
    projects
        .create(&PostParams::default(), &project)
        .await
        .unwrap();
    project_active(&projects, &name, "Project Active").await;
    name
}

/// Waits until Project `name` is Active (`what` names the wait in a failure).
pub async fn project_active(projects: &Api<Project>, name: &str, what: &str) {
    wait_for(what, Duration::from_secs(60), async || {
        phase(projects, name)
            .await
            .filter(|(p, _)| *p == ProjectPhase::Active)
    })
    .await;
}

/// A ShapeBlock object of `kind` named `name` with this spec.
pub fn shapeblock<K: serde::de::DeserializeOwned>(
    kind: &str,
    name: &str,
    spec: serde_json::Value,
) -> K {
    serde_json::from_value(
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": kind,
        "metadata": {"name": name}, "spec": spec}),
    )
    .unwrap()
}

/// Creates an App and waits until the hub reports it Ready.
pub async fn ready_app(admin: &Client, ns: &str, name: &str, spec: serde_json::Value) -> Api<App> {
    let apps: Api<App> = Api::namespaced(admin.clone(), ns);
    apps.create(&PostParams::default(), &shapeblock("App", name, spec))
        .await
        .unwrap();
    wait_for(
        &format!("App {name} Ready"),
        Duration::from_secs(60),
        async || {
            let status = apps.get_opt(name).await.ok()??.status?;
            (status.phase == Some(AppPhase::Ready)).then_some(())
        },
    )
    .await;
    apps
}

/// Waits until AppBuild `name` is in `phase`; panics at once if it fails instead, or after a
/// minute, with its last status either way.
pub async fn wait_build(
    builds: &Api<shapeblock::crd::AppBuild>,
    name: &str,
    phase: shapeblock::crd::AppBuildPhase,
) -> shapeblock::crd::AppBuildStatus {
    wait_build_within(builds, name, phase, Duration::from_secs(60)).await
}

/// Like [`wait_build`], waiting up to `wait` (real builds take minutes).
pub async fn wait_build_within(
    builds: &Api<shapeblock::crd::AppBuild>,
    name: &str,
    phase: shapeblock::crd::AppBuildPhase,
    wait: Duration,
) -> shapeblock::crd::AppBuildStatus {
    use shapeblock::crd::AppBuildPhase;
    let deadline = Instant::now() + wait;
    loop {
        let status = builds
            .get_opt(name)
            .await
            .ok()
            .flatten()
            .and_then(|b| b.status);
        if let Some(status) = &status {
            if status.phase == Some(AppBuildPhase::Failed) && phase != AppBuildPhase::Failed {
                panic!("AppBuild {name} failed: {status:#?}");
            }
            if status.phase == Some(phase) {
                return status.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "AppBuild {name} not {phase:?} within {wait:?}; last status: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until Job `name` exists and returns it. (A plain loop rather than [`wait_for`]: its
/// async closure would make the future of [`helm_runs`] not `Send`, so not spawnable.)
pub async fn wait_job(admin: &Client, ns: &str, name: &str) -> k8s_openapi::api::batch::v1::Job {
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(admin.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(job)) = jobs.get_opt(name).await {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "Job {ns}/{name} did not appear within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for a deploy (or uninstall) Job, runs its helm for real as its pod would
/// ([`super::run_helm_job`]) and expects success; returns helm's output.
pub async fn helm_runs(admin: &Client, ns: &str, job: &str) -> String {
    wait_job(admin, ns, job).await;
    let (ok, output) = super::run_helm_job(admin, ns, job).await;
    assert!(ok, "helm of {job} failed:\n{output}");
    output
}

/// A pod with one container `app` (restricted security context), as an App's Deployment
/// would make it when `labels` say `shapeblock.io/app`; waits until kwok's node runs it (and
/// serves its log, [`crate::write_container_log`]). Needs [`crate::jobs`].
pub async fn running_pod(admin: &Client, ns: &str, name: &str, labels: serde_json::Value) {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/web:1",
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000,
                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"}}}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    wait_for(
        &format!("pod {name} running"),
        Duration::from_secs(60),
        async || {
            let pod = pods.get(name).await.ok()?;
            pod.status?
                .container_statuses?
                .iter()
                .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
                .then_some(())
        },
    )
    .await;
}
