//! The fleet: simulated clusters, each behind the real agent code (in this process, over real
//! TLS websocket connections to the hub), and a few behind real `shapeblock-agent` processes
//! that reach their simulated cluster over loopback HTTP, to measure the agent's own memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use dashmap::DashMap;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::sim::{Cluster, JobTimings};

/// Watches the hub keeps open in each cluster: the four its controllers share (Projects, Apps,
/// the hub's Jobs, App Deployments), and each controller's own (Project: namespaces, the
/// registry source; AppBuild: AppBuilds, build pods; Service: Services; runtime: App pods;
/// Team: Teams, Teams' RoleBindings). A cluster with this many open is fully synced.
pub const WATCHES_PER_CLUSTER: usize = 12;

/// Namespace of every simulated cluster's Project.
pub const PROJECT: &str = "shop";

/// What each cluster holds before the hub connects: the registry Secret Projects copy.
pub fn seed_registry(cluster: &Arc<Cluster>) {
    use base64::Engine;
    let config = json!({"auths": {"registry.example.com": {"auth": "dXNlcjpwYXNz"}}}).to_string();
    let _ = cluster.create(
        "/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shapeblock"}}),
    );
    let _ = cluster.create(
        "/secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": "registry-creds", "namespace": "shapeblock"},
            "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(config)}}),
    );
}

/// A Project and `apps` git Apps built from a Dockerfile, as a user would create them.
pub fn add_apps(cluster: &Arc<Cluster>, apps: usize) {
    let _ = cluster.create(
        "apps.shapeblock.io/projects",
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
            "metadata": {"name": PROJECT}, "spec": {"displayName": "Shop"}}),
    );
    for i in 0..apps {
        let _ = cluster.create(
            "apps.shapeblock.io/apps",
            json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App",
                "metadata": {"name": app_name(i), "namespace": PROJECT},
                "spec": {"displayName": format!("App {i}"),
                    "git": {"url": format!("https://github.com/org/app-{i}.git")},
                    "registry": {"url": "registry.example.com"},
                    "build": {"type": "dockerfile"}}}),
        );
    }
}

pub fn app_name(i: usize) -> String {
    format!("app-{i:02}")
}

/// An AppBuild of a branch, as the ShapeBlock server creates one.
pub fn add_build(cluster: &Arc<Cluster>, app: &str, build: &str) -> Result<(), String> {
    cluster.create(
        "apps.shapeblock.io/appbuilds",
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
            "metadata": {"name": build, "namespace": PROJECT},
            "spec": {"appName": app, "gitRef": "main"}}),
    )
}

/// One cluster of the fleet.
pub struct Member {
    pub cluster: Arc<Cluster>,
    pub token: String,
}

/// Creates the simulated clusters for the registered (id, token) pairs.
pub fn clusters(
    registered: Vec<(String, String)>,
    timings: JobTimings,
    phases: &Arc<DashMap<String, Instant>>,
) -> Vec<Member> {
    registered
        .into_iter()
        .map(|(id, token)| {
            let cluster = Cluster::new(id, timings, phases.clone());
            seed_registry(&cluster);
            Member { cluster, token }
        })
        .collect()
}

/// Runs the agent code in this process for a member until `shutdown`.
pub fn start_agent(member: &Member, hub_url: &str, ca: &Path, shutdown: CancellationToken) {
    let args = shapeblock::agent::AgentArgs::try_parse_from([
        "shapeblock-agent".into(),
        "--hub-url".into(),
        hub_url.into(),
        "--token".into(),
        member.token.clone(),
        "--hub-ca-file".into(),
        ca.display().to_string(),
    ])
    .expect("agent arguments");
    let config = shapeblock::agent::AgentConfig::load(args).expect("agent configuration");
    let cluster = member.cluster.clone();
    tokio::spawn(async move {
        let upstream = Arc::new(crate::sim::Upstream(cluster));
        if let Err(err) = shapeblock::agent::run_with_upstream(config, upstream, shutdown).await {
            eprintln!("agent stopped: {err}");
        }
    });
}

/// A real `shapeblock-agent` process whose cluster is a simulated one, served on loopback.
pub struct AgentProcess {
    child: Child,
    pub pid: u32,
}

impl AgentProcess {
    /// An agent for a simulated member, its cluster served on a loopback port.
    pub async fn start(
        member: &Member,
        binary: &Path,
        hub_url: &str,
        ca: &Path,
        dir: &Path,
        shutdown: CancellationToken,
    ) -> AgentProcess {
        let port = serve_http(member.cluster.clone(), shutdown).await;
        let kubeconfig: PathBuf = dir.join(format!("{}.kubeconfig", member.cluster.id));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: http://127.0.0.1:{port}\n\
                 users:\n- name: sim\n  user:\n    token: simulated\ncontexts:\n- name: sim\n  context:\n    cluster: sim\n    user: sim\n\
                 current-context: sim\n"
            ),
        )
        .expect("writing a kubeconfig");
        Self::with_kubeconfig(binary, hub_url, &member.token, ca, &kubeconfig, dir)
    }

    /// An agent for any cluster (a real one: the `fleet_real` benchmark).
    pub fn with_kubeconfig(
        binary: &Path,
        hub_url: &str,
        token: &str,
        ca: &Path,
        kubeconfig: &Path,
        dir: &Path,
    ) -> AgentProcess {
        let stem = kubeconfig.file_stem().unwrap_or_default().to_string_lossy();
        let log = dir.join(format!("agent-{stem}.log"));
        let token_file = dir.join(format!("agent-{stem}.token"));
        std::fs::write(&token_file, token).expect("writing an agent token");
        let mut command = shapeblock_test_support::process::agent_command(
            binary,
            hub_url,
            Some(ca),
            &token_file,
            kubeconfig,
        );
        command
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"));
        // Tied to this process: a load test that panics (release builds abort) leaves no agent.
        let child = shapeblock_test_support::process::spawn_tied(command)
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        AgentProcess {
            pid: child.id(),
            child,
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves a simulated cluster over plain HTTP/1.1 on a loopback port.
async fn serve_http(cluster: Arc<Cluster>, shutdown: CancellationToken) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("simulated apiserver listener");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(_) => continue,
                },
                _ = shutdown.cancelled() => return,
            };
            let cluster = cluster.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        let cluster = cluster.clone();
                        async move { Ok::<_, std::convert::Infallible>(cluster.handle(request).await) }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    port
}

/// Clusters whose controllers watch everything they need (the hub has listed and is watching).
pub fn watching(members: &[Member], watches_per_cluster: usize) -> usize {
    members
        .iter()
        .filter(|m| {
            m.cluster
                .stats
                .open_watches
                .load(std::sync::atomic::Ordering::Relaxed)
                >= watches_per_cluster
        })
        .count()
}

/// Apps in phase Ready across the fleet.
pub fn ready_apps(members: &[Member]) -> usize {
    members
        .iter()
        .map(|m| {
            m.cluster
                .phases("apps.shapeblock.io/apps")
                .values()
                .filter(|p| *p == "Ready")
                .count()
        })
        .sum()
}

/// Why AppBuilds failed across the fleet: reason → (count, one message).
pub fn failure_reasons(members: &[Member]) -> BTreeMap<String, (usize, String)> {
    let mut reasons: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for m in members {
        let failed = m.cluster.phases("apps.shapeblock.io/appbuilds");
        for key in failed
            .iter()
            .filter(|(_, p)| *p == "Failed")
            .map(|(k, _)| k)
        {
            let Some((ns, name)) = key.split_once('/') else {
                continue;
            };
            let Some(build) = m.cluster.object("apps.shapeblock.io/appbuilds", ns, name) else {
                continue;
            };
            let reason = build["status"]["reason"]
                .as_str()
                .unwrap_or("none")
                .to_string();
            let message = build["status"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let entry = reasons.entry(reason).or_insert((0, message));
            entry.0 += 1;
        }
    }
    reasons
}

/// AppBuilds in a final phase across the fleet: (completed, failed).
pub fn finished_builds(members: &[Member]) -> (usize, usize) {
    members.iter().fold((0, 0), |(done, failed), m| {
        let phases = m.cluster.phases("apps.shapeblock.io/appbuilds");
        (
            done + phases.values().filter(|p| *p == "Completed").count(),
            failed + phases.values().filter(|p| *p == "Failed").count(),
        )
    })
}
