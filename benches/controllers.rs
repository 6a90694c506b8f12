//! Controller benchmark: prints figures, asserts nothing about speed.
//!
//! ```sh
//! cargo bench --bench controllers
//! ```
//! 1. Latency, on the test control plane (kube-controller-manager, scheduler, a kwok node), with
//!    a hub in this process and one agent: AppBuild created → build Job created; build Job
//!    Complete → AppBuild Deploying; deploy Job Complete → AppBuild Completed. Times come from
//!    watch events, so they are what a client of the cluster would see. The build pods are
//!    ended by the benchmark as the kubelet would (see `test-support/`), which is not timed.
//! 2. Memory: a fresh hub with 10 clusters, each its own etcd + kube-apiserver with an agent,
//!    each with a Project and 20 Apps: the process's RSS before the hub starts, with the
//!    clusters connected, and with every App Ready.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock::crd::{App, AppBuild, AppPhase, Project, ProjectPhase};
use shapeblock::hub::Registry;
use support::cluster::{
    active_project, connected_cluster, phase, ready_app, registry_secret, shapeblock, wait_for,
};
use support::figures::{mib, ms, percentile};
use support::hub::{AgentProcess, TestHub, scratch_dir};
use support::{PodEnd, finish_job_pod};

const BUILDS: usize = 40;
const CLUSTERS: usize = 10;
const APPS: usize = 20;

/// Records when each event is first seen: `job:<name>`, `done:<name>`, `<Phase>:<build>`.
fn record_events(admin: &Client, ns: &str) -> Arc<DashMap<String, Instant>> {
    let seen: Arc<DashMap<String, Instant>> = Arc::default();
    let jobs: Api<Job> = Api::namespaced(admin.clone(), ns);
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), ns);
    let record = seen.clone();
    tokio::spawn(async move {
        let mut events = watcher(jobs, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(Ok(job)) = events.next().await {
            let now = Instant::now();
            record
                .entry(format!("job:{}", job.name_any()))
                .or_insert(now);
            let complete = job
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Complete" && c.status == "True")
                });
            if complete {
                record
                    .entry(format!("done:{}", job.name_any()))
                    .or_insert(now);
            }
        }
    });
    let record = seen.clone();
    tokio::spawn(async move {
        let mut events = watcher(builds, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(Ok(build)) = events.next().await {
            let now = Instant::now();
            if let Some(phase) = build.status.as_ref().and_then(|s| s.phase) {
                record
                    .entry(format!("{phase:?}:{}", build.name_any()))
                    .or_insert(now);
            }
        }
    });
    seen
}

async fn seen_at(seen: &DashMap<String, Instant>, key: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(at) = seen.get(key) {
            return *at;
        }
        assert!(Instant::now() < deadline, "{key} not seen within 60 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn latency() {
    let cluster = connected_cluster("bench-latency").await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "bench").await;
    ready_app(
        &admin,
        &ns,
        "web",
        json!({"displayName": "Web", "git": {"url": "https://github.com/org/web.git"},
            "registry": {"url": "registry.example.com"}, "build": {"type": "dockerfile"}}),
    )
    .await;
    let seen = record_events(&admin, &ns);
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    let sha = "4b825dc642cb6eb9a060e54bf8d69288fbee4904\n";
    let (mut to_job, mut to_deploying, mut to_completed) = (vec![], vec![], vec![]);
    for i in 0..BUILDS {
        let name = format!("lat-{i}");
        let created = Instant::now();
        builds
            .create(
                &PostParams::default(),
                &shapeblock(
                    "AppBuild",
                    &name,
                    json!({"appName": "web", "gitRef": "main"}),
                ),
            )
            .await
            .unwrap();
        to_job.push(seen_at(&seen, &format!("job:{name}-build")).await - created);
        let end = PodEnd {
            phase: "Succeeded",
            init: vec![("clone", 0, ""), ("commit", 0, sha)],
            containers: vec![("build", 0, "Completed", "")],
        };
        finish_job_pod(&admin, &ns, &format!("{name}-build"), end).await;
        let done = seen_at(&seen, &format!("done:{name}-build")).await;
        to_deploying.push(seen_at(&seen, &format!("Deploying:{name}")).await - done);
        let end = PodEnd {
            phase: "Succeeded",
            init: vec![],
            containers: vec![("helm", 0, "Completed", "")],
        };
        finish_job_pod(&admin, &ns, &format!("{name}-deploy"), end).await;
        let done = seen_at(&seen, &format!("done:{name}-deploy")).await;
        to_completed.push(seen_at(&seen, &format!("Completed:{name}")).await - done);
    }
    println!("controller latency over {BUILDS} builds, through the tunnel (watch events):");
    for (what, samples) in [
        ("AppBuild created -> build Job created", &mut to_job),
        (
            "build Job Complete -> AppBuild Deploying",
            &mut to_deploying,
        ),
        (
            "deploy Job Complete -> AppBuild Completed",
            &mut to_completed,
        ),
    ] {
        println!(
            "  {what:<44} p50 {:>9}  p99 {:>9}",
            ms(percentile(samples, 0.5)),
            ms(percentile(samples, 0.99))
        );
    }
}

async fn memory() {
    let dir = scratch_dir("bench-memory");
    let mut planes = Vec::new();
    for i in 0..CLUSTERS {
        planes.push(support::extra_control_plane(&format!("bench-cluster-{i}")).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = support::rss_kib(std::process::id());
    let registry = Arc::new(Registry::in_memory());
    let hub = TestHub::builder()
        .tls(&dir)
        .registry(registry.clone())
        .controllers()
        .start()
        .await;
    let mut agents = Vec::new();
    let mut admins = Vec::new();
    for (i, (config, kubeconfig)) in planes.iter().enumerate() {
        let (record, token) = registry
            .register(&format!("cluster-{i}"), Default::default())
            .unwrap();
        agents.push(AgentProcess::spawn(
            &dir,
            &hub,
            token.expose(),
            kubeconfig,
            &format!("agent-{i}"),
        ));
        hub.wait_connected(&record.id).await;
        admins.push(Client::try_from(config.clone()).unwrap());
    }
    for admin in &admins {
        let projects: Api<Project> = Api::all(admin.clone());
        wait_for("CRDs installed", Duration::from_secs(120), async || {
            projects.list(&Default::default()).await.ok()
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let connected = support::rss_kib(std::process::id());
    for admin in &admins {
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": "shapeblock"}})).unwrap();
        Api::<Namespace>::all(admin.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        Api::<Secret>::namespaced(admin.clone(), "shapeblock")
            .create(
                &PostParams::default(),
                &registry_secret("registry-creds", "dXNlcjpvbmU="),
            )
            .await
            .unwrap();
        Api::<Project>::all(admin.clone())
            .create(
                &PostParams::default(),
                &shapeblock("Project", "bench", json!({})),
            )
            .await
            .unwrap();
    }
    for admin in &admins {
        let projects: Api<Project> = Api::all(admin.clone());
        wait_for("Project Active", Duration::from_secs(120), async || {
            phase(&projects, "bench")
                .await
                .filter(|(p, _)| *p == ProjectPhase::Active)
        })
        .await;
        let apps: Api<App> = Api::namespaced(admin.clone(), "bench");
        for a in 0..APPS {
            let app: App = shapeblock(
                "App",
                &format!("app-{a}"),
                json!({"displayName": "Bench", "git": {"url": "git@github.com:org/app.git", "isPrivate": true},
                    "registry": {"url": "registry.example.com"}, "build": {"type": "dockerfile"}}),
            );
            apps.create(&PostParams::default(), &app).await.unwrap();
        }
    }
    for admin in &admins {
        let apps: Api<App> = Api::namespaced(admin.clone(), "bench");
        wait_for("every App Ready", Duration::from_secs(180), async || {
            let list = apps.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .all(|a| a.status.as_ref().and_then(|s| s.phase) == Some(AppPhase::Ready))
                .then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let loaded = support::rss_kib(std::process::id());
    println!(
        "hub memory ({CLUSTERS} clusters, each its own etcd + kube-apiserver and agent; RSS of this process):"
    );
    println!("  before the hub started           {}", mib(before));
    println!(
        "  {CLUSTERS} clusters connected, CRDs installed   {} (+{} per cluster)",
        mib(connected),
        mib(connected.saturating_sub(before) / CLUSTERS as u64)
    );
    println!(
        "  each with a Project and {APPS} Apps Ready   {} (+{} per cluster over the start)",
        mib(loaded),
        mib(loaded.saturating_sub(before) / CLUSTERS as u64)
    );
    drop(agents);
    hub.stop().await;
}

#[tokio::main]
async fn main() {
    support::jobs().await;
    latency().await;
    memory().await;
}
