//! The load test's second mode: the same hub process and measurements as `loadtest/`, with a
//! few real control planes (each its own etcd + kube-apiserver, a real `shapeblock-agent`
//! process in front of it) and then the same number of simulated clusters, so the simulated
//! figures can be checked against reality. Prints figures; asserts nothing about speed.
//!
//! ```sh
//! cargo bench --bench fleet_real            # 5 clusters; SHAPEBLOCK_FLEET_REAL_CLUSTERS=n for more
//! ```
//! Per cluster: hub RSS with the controllers idle and with a Project and 20 Apps, how long the
//! Apps take to be Ready, and the relay latency of their phase changes. In the real clusters a
//! phase change is stamped when a watch of the test sees it (a little after the apiserver
//! committed it); in the simulated ones when it is committed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_loadtest::{fleet, relay, sim};
use shapeblock_test_support::hub_process as hub;
use shapeblock_test_support::{self as support, figures, process};

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock::crd::{App, Project};
use tokio_util::sync::CancellationToken;

const APPS: usize = 20;

struct Outcome {
    baseline_kib: u64,
    idle_kib: u64,
    apps_kib: u64,
    ready: Duration,
    latencies: Vec<Duration>,
}

fn per_cluster(kib: u64, baseline: u64, n: usize) -> f64 {
    kib.saturating_sub(baseline) as f64 / n as f64
}

async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "{what}: not within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

/// Waits until no reconcile ran for 2 s, then samples the hub's RSS.
async fn quiet_rss(hub: &hub::HubProcess) -> u64 {
    hub.api.until_quiet().await;
    process::sample(hub.pid).rss_kib
}

/// The end both runs share: time to every App Ready (from `started`), memory once quiet, the
/// relayed App phase latencies; stops the hub (before the caller stops its agents).
async fn finish(
    hub: hub::HubProcess,
    setup: &Setup,
    started: Instant,
    baseline_kib: u64,
    idle_kib: u64,
) -> Outcome {
    let ready = started.elapsed();
    let apps_kib = quiet_rss(&hub).await;
    let latencies = setup.received.take_latencies("App");
    tokio::task::spawn_blocking(move || hub.stop())
        .await
        .unwrap();
    Outcome {
        baseline_kib,
        idle_kib,
        apps_kib,
        ready,
        latencies,
    }
}

struct Setup {
    phases: Arc<DashMap<String, Instant>>,
    received: Arc<relay::Received>,
    settings: hub::HubSettings,
}

async fn setup(dir: &Path) -> Setup {
    std::fs::create_dir_all(dir).unwrap();
    let phases: Arc<DashMap<String, Instant>> = Arc::default();
    let received = Arc::new(relay::Received::default());
    let relay_url = relay::start(phases.clone(), received.clone()).await;
    let settings = hub::HubSettings {
        binary: process::sibling_binary("shapeblock-hub"),
        dir: dir.to_path_buf(),
        port: process::free_port(),
        relay_url,
        admin_token: "fleet-real-admin-token-0123456789".into(),
        extra: String::new(),
    };
    Setup {
        phases,
        received,
        settings,
    }
}

/// Stamps each App phase change in a real cluster when a watch sees it.
fn stamp_app_phases(client: Client, cluster: String, phases: Arc<DashMap<String, Instant>>) {
    tokio::spawn(async move {
        let mut last: HashMap<String, String> = HashMap::new();
        let mut events = watcher(Api::<App>::all(client), watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = events.next().await {
            let Ok(app) = event else { continue };
            let Some(phase) = app.status.as_ref().and_then(|s| s.phase) else {
                continue;
            };
            let phase = format!("{phase:?}");
            let ns = app.namespace().unwrap_or_default();
            let key = format!("{ns}/{}", app.name_any());
            if last.get(&key) != Some(&phase) {
                phases.insert(
                    sim::phase_key(&cluster, "App", &ns, &app.name_any(), &phase),
                    Instant::now(),
                );
                last.insert(key, phase);
            }
        }
    });
}

async fn real(n: usize, dir: &Path, pki: &hub::Pki) -> Outcome {
    let setup = setup(dir).await;
    let hub = hub::HubProcess::start(&setup.settings, pki).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline_kib = process::sample(hub.pid).rss_kib;
    let hub_url = format!("wss://127.0.0.1:{}", setup.settings.port);
    let agent = Path::new(env!("CARGO_BIN_EXE_shapeblock-agent"));
    let mut clients = vec![];
    let mut agents = vec![];
    let mut ids = vec![];
    for i in 0..n {
        let (config, kubeconfig) = support::extra_control_plane(&format!("fleet-{i}")).await;
        let client = Client::try_from(config).unwrap();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "shapeblock"}})).unwrap(),
            )
            .await
            .unwrap();
        Api::<Secret>::namespaced(client.clone(), "shapeblock")
            .create(
                &PostParams::default(),
                &support::cluster::registry_secret("registry-creds", "dXNlcjpwYXNz"),
            )
            .await
            .unwrap();
        let (id, token) = hub.api.register(&format!("real-{i}")).await;
        agents.push(fleet::AgentProcess::with_kubeconfig(
            agent,
            &hub_url,
            &token,
            &pki.ca_file,
            &kubeconfig,
            dir,
        ));
        ids.push(id);
        clients.push(client);
    }
    until("real clusters connected", async || {
        hub.api.connected().await == n
    })
    .await;
    until("CRDs installed everywhere", async || {
        for client in &clients {
            if Api::<App>::all(client.clone())
                .list(&Default::default())
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    })
    .await;
    for (client, id) in clients.iter().zip(ids) {
        stamp_app_phases(client.clone(), id, setup.phases.clone());
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_kib = quiet_rss(&hub).await;
    setup.received.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    for client in &clients {
        let project: Project = serde_json::from_value(json!({"apiVersion": "apps.shapeblock.io/v1alpha1",
            "kind": "Project", "metadata": {"name": fleet::PROJECT}, "spec": {"displayName": "Shop"}}))
        .unwrap();
        Api::<Project>::all(client.clone())
            .create(&PostParams::default(), &project)
            .await
            .unwrap();
    }
    // A real apiserver takes Apps only once the Project's namespace exists.
    until("Project namespaces", async || {
        for client in &clients {
            let namespaces: Api<Namespace> = Api::all(client.clone());
            if !matches!(namespaces.get_opt(fleet::PROJECT).await, Ok(Some(_))) {
                return false;
            }
        }
        true
    })
    .await;
    for client in &clients {
        let apps: Api<App> = Api::namespaced(client.clone(), fleet::PROJECT);
        for i in 0..APPS {
            let app: App =
                serde_json::from_value(json!({"apiVersion": "apps.shapeblock.io/v1alpha1",
                "kind": "App", "metadata": {"name": fleet::app_name(i)},
                "spec": {"displayName": format!("App {i}"),
                    "git": {"url": format!("https://github.com/org/app-{i}.git")},
                    "registry": {"url": "registry.example.com"}, "build": {"type": "dockerfile"}}}))
                .unwrap();
            apps.create(&PostParams::default(), &app).await.unwrap();
        }
    }
    until("every real App Ready", async || {
        let mut ready = 0;
        for client in &clients {
            let apps = Api::<App>::all(client.clone())
                .list(&Default::default())
                .await;
            ready += apps.map_or(0, |l| {
                l.items
                    .iter()
                    .filter(|a| {
                        a.status.as_ref().and_then(|s| s.phase)
                            == Some(shapeblock::crd::AppPhase::Ready)
                    })
                    .count()
            });
        }
        ready == n * APPS
    })
    .await;
    let outcome = finish(hub, &setup, started, baseline_kib, idle_kib).await;
    drop(agents);
    outcome
}

async fn simulated(n: usize, dir: &Path, pki: &hub::Pki) -> Outcome {
    let setup = setup(dir).await;
    let hub = hub::HubProcess::start(&setup.settings, pki).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline_kib = process::sample(hub.pid).rss_kib;
    let mut registered = vec![];
    for i in 0..n {
        registered.push(hub.api.register(&format!("sim-{i}")).await);
    }
    let timings = sim::JobTimings {
        start: Duration::from_millis(100),
        build: Duration::from_secs(3),
        other: Duration::from_secs(1),
    };
    let members = fleet::clusters(registered, timings, &setup.phases);
    let hub_url = format!("wss://127.0.0.1:{}", setup.settings.port);
    let agents = CancellationToken::new();
    for member in &members {
        fleet::start_agent(member, &hub_url, &pki.ca_file, agents.child_token());
    }
    until("simulated clusters watching", async || {
        fleet::watching(&members, fleet::WATCHES_PER_CLUSTER) == n
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_kib = quiet_rss(&hub).await;
    setup.received.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    for member in &members {
        fleet::add_apps(&member.cluster, APPS);
    }
    until("every simulated App Ready", async || {
        fleet::ready_apps(&members) == n * APPS
    })
    .await;
    let outcome = finish(hub, &setup, started, baseline_kib, idle_kib).await;
    agents.cancel();
    outcome
}

fn print(label: &str, n: usize, outcome: &mut Outcome) {
    let (p50, p99) = if outcome.latencies.is_empty() {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (
            figures::percentile(&mut outcome.latencies, 0.5),
            figures::percentile(&mut outcome.latencies, 0.99),
        )
    };
    println!(
        "{label:<10} {n} clusters: hub idle {:.0} KiB/cluster, with {APPS} Apps {:.0} KiB/cluster; \
         {} Apps Ready in {:.2} s; App phase relay latency p50 {:.1} ms, p99 {:.1} ms (n={})",
        per_cluster(outcome.idle_kib, outcome.baseline_kib, n),
        per_cluster(outcome.apps_kib, outcome.baseline_kib, n),
        n * APPS,
        outcome.ready.as_secs_f64(),
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0,
        outcome.latencies.len()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("SHAPEBLOCK_FLEET_REAL_CLUSTERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = support::hub::scratch_dir("fleet-real");
    let pki = hub::Pki::create(&dir);
    let mut real = real(n, &dir.join("real"), &pki).await;
    let mut simulated = simulated(n, &dir.join("simulated"), &pki).await;
    println!("\n# fleet: real control planes vs simulated clusters, same hub binary");
    print("real", n, &mut real);
    print("simulated", n, &mut simulated);
}
