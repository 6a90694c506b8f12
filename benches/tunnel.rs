//! Tunnel benchmark: prints figures, asserts nothing about speed.
//!
//! ```sh
//! cargo build --profile agent --bin shapeblock-agent
//! SHAPEBLOCK_AGENT_BIN=target/agent/shapeblock-agent cargo bench --bench tunnel
//! ```
//! starts the test control plane, a hub in this process and `shapeblock-agent` processes
//! (the size-optimised build the images ship, or the release build without the variable),
//! then measures direct vs tunnelled latency and throughput, agent RSS idle and under load,
//! and hub memory per idle tunnel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher;
use support::TestNamespace;
use support::figures::percentile;
use support::hub::{AgentProcess, TestHub, agent_identity, scratch_dir};
use support::hub_process::HubBinary;

/// Tunnel round trips are sub-millisecond: three decimals.
fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn config_map(name: &str, payload: usize) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "payload".to_string(),
            "x".repeat(payload),
        )])),
        ..Default::default()
    }
}

async fn time_gets(api: &Api<ConfigMap>, n: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        api.get("small").await.unwrap();
        samples.push(start.elapsed());
    }
    samples
}

async fn time_lists(api: &Api<ConfigMap>, n: usize) -> (Vec<Duration>, usize) {
    let mut samples = Vec::with_capacity(n);
    let mut bytes = 0;
    for _ in 0..n {
        let start = Instant::now();
        let list = api.list(&ListParams::default()).await.unwrap();
        samples.push(start.elapsed());
        bytes = serde_json::to_vec(&list).unwrap().len();
    }
    (samples, bytes)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let dir = scratch_dir("bench");
    let ns = TestNamespace::new("bench").await;
    let identity = agent_identity(&dir, &ns.name, "agent", None).await;
    // The tunnel itself: the hub's per-cluster request budget (api_qps_per_cluster, 50/s by
    // default) would pace 2,000 sequential GETs at 20 ms each.
    let gateway = shapeblock::hub::GatewayConfig {
        api_qps: 1_000_000,
        ..support::hub::test_gateway_config()
    };
    let hub = TestHub::builder().tls(&dir).gateway(gateway).start().await;
    let (record, token) = hub.registry.register("bench", Default::default()).unwrap();
    let agent = AgentProcess::spawn(&dir, &hub, token.expose(), &identity.kubeconfig, "agent");
    hub.wait_connected(&record.id).await;
    let direct: Api<ConfigMap> = Api::namespaced(support::client().await, &ns.name);
    let tunnelled: Api<ConfigMap> = Api::namespaced(hub.gateway.client(&record.id), &ns.name);

    println!("== tunnel benchmark (loopback; TLS on both the apiserver and the hub) ==");
    println!(
        "agent binary: {}",
        std::env::var("SHAPEBLOCK_AGENT_BIN").unwrap_or_else(|_| "release build".into())
    );
    direct
        .create(&PostParams::default(), &config_map("small", 16))
        .await
        .unwrap();
    // Warm both paths.
    time_gets(&direct, 200).await;
    time_gets(&tunnelled, 200).await;
    let mut d = time_gets(&direct, 2000).await;
    let mut t = time_gets(&tunnelled, 2000).await;
    let (dp50, dp99, tp50, tp99) = (
        percentile(&mut d, 0.5),
        percentile(&mut d, 0.99),
        percentile(&mut t, 0.5),
        percentile(&mut t, 0.99),
    );
    println!(
        "small GET (2000 sequential)   direct p50 {} p99 {} | tunnel p50 {} p99 {} | added p50 {}",
        ms(dp50),
        ms(dp99),
        ms(tp50),
        ms(tp99),
        ms(tp50.saturating_sub(dp50))
    );

    futures::stream::iter(0..5000)
        .map(|i| {
            let direct = direct.clone();
            async move {
                direct
                    .create(
                        &PostParams::default(),
                        &config_map(&format!("cm-{i:05}"), 200),
                    )
                    .await
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    time_lists(&direct, 2).await;
    time_lists(&tunnelled, 2).await;
    let (mut d, bytes) = time_lists(&direct, 20).await;
    let (mut t, _) = time_lists(&tunnelled, 20).await;
    let (dp50, dp99, tp50, tp99) = (
        percentile(&mut d, 0.5),
        percentile(&mut d, 0.99),
        percentile(&mut t, 0.5),
        percentile(&mut t, 0.99),
    );
    let mib = bytes as f64 / (1024.0 * 1024.0);
    let (dthr, tthr) = (mib / dp50.as_secs_f64(), mib / tp50.as_secs_f64());
    println!(
        "LIST 5001 objects ({mib:.1} MiB, 20 runs) direct p50 {} p99 {} | tunnel p50 {} p99 {}",
        ms(dp50),
        ms(dp99),
        ms(tp50),
        ms(tp99)
    );
    println!(
        "LIST throughput (p50)         direct {dthr:.1} MiB/s | tunnel {tthr:.1} MiB/s | tunnel/direct {:.0} %",
        100.0 * tthr / dthr
    );

    // The agent that served the LISTs above: allocator high-water mark after 3 MiB responses.
    let after_lists = support::rss_kib(agent.pid().unwrap());
    drop(agent);

    // A fresh agent: idle, then 100 requests/s with 10 open watches for 15 s.
    let (record, token) = hub
        .registry
        .register("bench-rss", Default::default())
        .unwrap();
    let agent = AgentProcess::spawn(
        &dir,
        &hub,
        token.expose(),
        &identity.kubeconfig,
        "agent-rss",
    );
    hub.wait_connected(&record.id).await;
    let tunnelled: Api<ConfigMap> = Api::namespaced(hub.gateway.client(&record.id), &ns.name);
    let pid = agent.pid().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = support::rss_kib(pid);
    let mut watches = Vec::new();
    for _ in 0..10 {
        let mut stream = watcher(
            tunnelled.clone(),
            watcher::Config::default().labels("bench=watch"),
        )
        .boxed();
        watches.push(tokio::spawn(async move {
            while stream.next().await.is_some() {}
        }));
    }
    // The watches deliver: a labelled ConfigMap changes 10 times a second (written directly,
    // so the agent carries 100 watch events/s besides the 100 GETs/s).
    let mut watched = config_map("watched", 200);
    watched.metadata.labels = Some([("bench".to_string(), "watch".to_string())].into());
    let watched = direct
        .create(&PostParams::default(), &watched)
        .await
        .unwrap();
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut peak = 0;
    let load_start = Instant::now();
    let mut sent = 0u32;
    while load_start.elapsed() < Duration::from_secs(15) {
        ticker.tick().await;
        tunnelled.get("small").await.unwrap();
        sent += 1;
        if sent.is_multiple_of(10) {
            let patch = serde_json::json!({"data": {"n": sent.to_string()}});
            direct
                .patch(
                    watched.metadata.name.as_deref().unwrap(),
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .unwrap();
        }
        if sent.is_multiple_of(100) {
            peak = peak.max(support::rss_kib(pid));
        }
    }
    let rate = sent as f64 / load_start.elapsed().as_secs_f64();
    let loaded = support::rss_kib(pid);
    println!(
        "agent RSS                     idle {:.1} MiB | {rate:.0} req/s + 10 watches (100 events/s): {:.1} MiB (peak {:.1} MiB) | after serving the LISTs {:.1} MiB",
        idle as f64 / 1024.0,
        loaded as f64 / 1024.0,
        peak.max(loaded) as f64 / 1024.0,
        after_lists as f64 / 1024.0
    );
    for w in watches {
        w.abort();
    }
    drop(agent);
    hub.stop().await;

    // Hub memory per idle tunnel, on the real hub process (plain HTTP, as behind the chart's
    // TLS-terminating ingress): the tunnel alone (controllers off), then with each cluster's
    // controllers watching (the default; CRDs installed, 12 watches, nothing to reconcile).
    hub_per_idle_tunnel(&dir, &identity.kubeconfig, false).await;
    hub_per_idle_tunnel(&dir, &identity.kubeconfig, true).await;
}

/// Starts the hub binary, connects 100 agents, and prints its RSS per idle tunnel.
async fn hub_per_idle_tunnel(
    dir: &std::path::Path,
    kubeconfig: &std::path::Path,
    controllers: bool,
) {
    let what = if controllers {
        "with controllers"
    } else {
        "tunnel only"
    };
    let dir = dir.join(if controllers {
        "hub-controllers"
    } else {
        "hub-tunnels"
    });
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("hub-data");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", support::process::free_port())
        .parse()
        .unwrap();
    let config = dir.join("hub.yaml");
    std::fs::write(
        &config,
        format!(
            "controllers: {controllers}\nhandshakes_per_second_per_ip: 200\n\
             allow_insecure_hub_url: true\n"
        ),
    )
    .unwrap();
    let args = [
        "--config".into(),
        config.display().to_string(),
        "--listen".into(),
        addr.to_string(),
        "--admin-tokens".into(),
        support::hub::ADMIN_TOKEN.into(),
        "--data-dir".into(),
        data.display().to_string(),
    ];
    let hub_process = HubBinary::spawn(
        &support::process::sibling_binary("shapeblock-hub"),
        &dir,
        addr,
        &args,
        &[],
        &dir.join("hub.log"),
    )
    .await;
    let hub_pid = hub_process.pid;
    let mut clusters = Vec::new();
    for i in 0..100 {
        let body = serde_json::to_vec(&serde_json::json!({"name": format!("idle-{i}")})).unwrap();
        let response = support::hub::try_http_request(
            addr,
            None,
            "POST",
            "/api/v1/clusters",
            Some(support::hub::ADMIN_TOKEN),
            Some(body),
        )
        .await
        .expect("hub request");
        let json = response.json();
        clusters.push((
            json["cluster"]["id"].as_str().unwrap().to_string(),
            json["token"].as_str().unwrap().to_string(),
        ));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = support::rss_kib(hub_pid);
    let url = format!("ws://{addr}");
    let agents: Vec<AgentProcess> = clusters
        .iter()
        .enumerate()
        .map(|(i, (_, token))| {
            AgentProcess::spawn_to(&dir, &url, None, token, kubeconfig, &format!("idle-{i}"))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let response = support::hub::try_http_request(addr, None, "GET", "/readyz", None, None)
            .await
            .expect("hub request");
        if response.json()["connected"].as_u64() == Some(100) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "100 agents did not connect: {}",
            response.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(if controllers { 15 } else { 5 })).await;
    let after = support::rss_kib(hub_pid);
    let per_tunnel = after.saturating_sub(before) as f64 / 100.0;
    println!(
        "hub process RSS ({what:<16}) no tunnels {:.1} MiB | 100 idle tunnels {:.1} MiB | {per_tunnel:.0} KiB per idle tunnel",
        before as f64 / 1024.0,
        after as f64 / 1024.0
    );
    let agent_rss: Vec<u64> = agents
        .iter()
        .filter_map(|a| a.pid())
        .map(support::rss_kib)
        .collect();
    println!(
        "idle agent RSS (100 agents)   mean {:.1} MiB, max {:.1} MiB",
        agent_rss.iter().sum::<u64>() as f64 / agent_rss.len().max(1) as f64 / 1024.0,
        agent_rss.iter().max().copied().unwrap_or(0) as f64 / 1024.0
    );
    drop(agents);
    hub_process.kill();
}
