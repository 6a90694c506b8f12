//! The load test's figures are only worth something if the simulated cluster lets the real
//! hub do its real work. This runs the hub binary against one simulated cluster, through the
//! real agent code, and checks the whole cycle the load test measures: CRDs installed,
//! controllers watching, a Project Active, Apps Ready, a build through its Jobs to Completed,
//! each phase relayed once and in order, and a hub restart picked up again.
//!
//! Needs the hub binary next to the test's (`cargo test --workspace` builds it); without it
//! the test fails saying so.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde_json::json;
use shapeblock_loadtest::fleet::{self, PROJECT};
use shapeblock_loadtest::sim::{COMMIT, Cluster, JobTimings};
use shapeblock_loadtest::{WATCHES_PER_CLUSTER, relay};
use shapeblock_test_support::hub_process::{HubProcess, HubSettings, Pki};
use shapeblock_test_support::process;
use tokio_util::sync::CancellationToken;

async fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_runs_a_build_in_a_simulated_cluster() {
    let dir = std::env::temp_dir().join(format!("shapeblock-sim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = Pki::create(&dir);
    let phases: Arc<DashMap<String, Instant>> = Arc::default();
    let received = Arc::new(relay::Received::default());
    let settings = HubSettings {
        binary: process::sibling_binary("shapeblock-hub"),
        dir: dir.clone(),
        port: process::free_port(),
        relay_url: relay::start(phases.clone(), received.clone()).await,
        admin_token: "simulated-cluster-test-token".into(),
        extra: String::new(),
    };
    let hub = HubProcess::start(&settings, &pki).await;
    let registered = vec![hub.api.register("sim").await];
    let timings = JobTimings {
        start: Duration::from_millis(20),
        build: Duration::from_millis(200),
        other: Duration::from_millis(100),
    };
    let members = fleet::clusters(registered, timings, &phases);
    let cluster: Arc<Cluster> = members[0].cluster.clone();
    let agents = CancellationToken::new();
    let hub_url = format!("wss://127.0.0.1:{}", settings.port);
    fleet::start_agent(&members[0], &hub_url, &pki.ca_file, agents.child_token());

    wait("controllers watching", || {
        fleet::watching(&members, WATCHES_PER_CLUSTER) == 1
    })
    .await;
    assert_eq!(
        cluster.count("apiextensions.k8s.io/customresourcedefinitions"),
        5,
        "the hub installs its five CRDs"
    );
    fleet::add_apps(&cluster, 2);
    wait("Apps Ready", || fleet::ready_apps(&members) == 2).await;
    assert_eq!(
        cluster
            .phases("apps.shapeblock.io/projects")
            .get(&format!("/{PROJECT}")),
        Some(&"Active".to_string())
    );
    // What the Project controller made: the namespace, the registry copy, the deployer.
    assert!(cluster.count("/namespaces") >= 2);
    assert!(
        cluster.count("/secrets") >= 2,
        "registry source and its copy"
    );
    assert_eq!(
        cluster.count("/serviceaccounts"),
        1,
        "the project's deployer"
    );

    received.measuring.store(true, Ordering::Relaxed);
    fleet::add_build(&cluster, &fleet::app_name(0), "first").unwrap();
    wait("build Completed", || {
        cluster
            .phases("apps.shapeblock.io/appbuilds")
            .get(&format!("{PROJECT}/first"))
            .is_some_and(|p| p == "Completed")
    })
    .await;
    assert_eq!(
        cluster.count("batch/jobs"),
        2,
        "a build Job and a deploy Job"
    );
    assert_eq!(cluster.count("/pods"), 2, "one pod each");
    let build = cluster
        .object("apps.shapeblock.io/appbuilds", PROJECT, "first")
        .unwrap();
    assert_eq!(build["status"]["gitCommit"], json!(COMMIT));
    let app = cluster
        .object("apps.shapeblock.io/apps", PROJECT, &fleet::app_name(0))
        .unwrap();
    assert!(
        app["status"]["currentImage"]
            .as_str()
            .is_some_and(|i| i.contains("@sha256:")),
        "the App runs the built digest: {}",
        app["status"]
    );
    // Every phase of the build reached the relay once, each measured from its commit.
    wait("phases relayed", || received.latency_count("AppBuild") == 4).await;
    let latencies = received.take_latencies("AppBuild");
    assert_eq!(
        latencies.len(),
        4,
        "Pending, Building, Deploying, Completed"
    );
    assert!(
        received.log_lines.load(Ordering::Relaxed) > 0,
        "build logs relayed"
    );

    // A restarted hub finds everything again and relays it.
    tokio::task::spawn_blocking(move || hub.stop())
        .await
        .unwrap();
    received.reset_seen();
    let hub = HubProcess::start(&settings, &pki).await;
    wait("relayed again after a restart", || received.seen() == 3).await;
    wait("watching again", || {
        fleet::watching(&members, WATCHES_PER_CLUSTER) == 1
    })
    .await;
    assert_eq!(cluster.count("batch/jobs"), 2, "no Job run twice");
    agents.cancel();
    tokio::task::spawn_blocking(move || hub.stop())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
