//! The relay to the ShapeBlock server, against a real websocket server inside the test and the
//! real control plane: every phase of a build arrives in order; a connection cut mid-build is
//! followed by a resync after which the server's view equals the cluster; a slow server gets
//! backpressure and every event; `/api/v1/events` resumes from a cursor or starts from a
//! snapshot.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use shapeblock::crd::{App, AppBuild};
use shapeblock::relay::outbound::RelayConfig;
use shapeblock::secret::Secret;
use support::cluster::{
    active_project, connected_cluster_relaying, ready_app, shapeblock, wait_for,
};
use support::{PodEnd, finish_job_pod};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "relay-test-key-0123456789";
const WAIT: Duration = Duration::from_secs(60);

/// One relaying hub at a time: the tests share one apiserver, and every hub reconciles every
/// namespace in it, so concurrent hubs would race each other on the same AppBuilds (and a
/// stalled one would hold its watches back), which one hub per cluster never does.
static ONE_HUB: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes [`ONE_HUB`], then deletes the AppBuilds earlier tests left. A new hub re-sends the log
/// of every build that ended in the last ten minutes (`RESEND_AFTER_RESTART`), and the
/// simulated node serves one log file per container name to every pod, so an earlier test's
/// builds would be relayed again with this test's log: tens of thousands of lines that are
/// not this test's, which once crowded the outage test out of its deadline.
async fn one_hub() -> tokio::sync::MutexGuard<'static, ()> {
    let guard = ONE_HUB.lock().await;
    // The relay's warnings, shown with a failing test's output (the hubs run in this process).
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_ansi(false)
        .with_env_filter("shapeblock::relay=warn,error")
        .try_init();
    let builds: Api<AppBuild> = Api::all(support::client().await);
    // Before the first hub of this binary installs the CRDs, there is nothing to delete.
    let left = async || match builds.list(&Default::default()).await {
        Ok(list) => list.items,
        Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
        Err(e) => panic!("listing AppBuilds: {e}"),
    };
    for build in left().await {
        let ns = build.namespace().unwrap_or_default();
        let _ = Api::<AppBuild>::namespaced(support::client().await, &ns)
            .delete(&build.name_any(), &Default::default())
            .await;
    }
    wait_for("no AppBuild left by an earlier test", WAIT, async || {
        left().await.is_empty().then_some(())
    })
    .await;
    guard
}
/// Lines of the build log the slow-server test relays.
const LOG_LINES: usize = 30_000;

/// A ShapeBlock server stand-in: accepts the hub's websocket, checks the API key, records
/// every message, can read slowly and can cut the connection.
struct TestServer {
    url: String,
    received: Arc<Mutex<Vec<Value>>>,
    connections: Arc<AtomicUsize>,
    read_delay_ms: Arc<AtomicU64>,
    cut: Arc<Notify>,
    /// When this many BUILD_LOG messages have arrived (0: never), the server goes away for
    /// [`OUTAGE`]: every connection dropped, the listener closed, then listening again on the
    /// same port.
    outage_after_lines: Arc<AtomicUsize>,
    /// The outage began.
    away: Arc<Notify>,
    /// Listening again after an outage.
    back: Arc<Notify>,
}

/// How long the server is away in the outage test.
const OUTAGE: Duration = Duration::from_secs(30);

/// A listener on `addr` with a small receive buffer, so a server that stops reading pushes back
/// on the hub soon (instead of the kernel absorbing megabytes first); the port can be taken
/// again after an outage.
fn listen(addr: std::net::SocketAddr) -> TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    socket.listen(64).unwrap()
}

impl TestServer {
    // tungstenite's handshake callback returns a whole HTTP response as its error.
    #[allow(clippy::result_large_err)]
    async fn start() -> Self {
        let listener = listen("127.0.0.1:0".parse().unwrap());
        let addr = listener.local_addr().unwrap();
        let url = format!("ws://{addr}/ws");
        let server = Self {
            url,
            received: Arc::default(),
            connections: Arc::default(),
            read_delay_ms: Arc::default(),
            cut: Arc::new(Notify::new()),
            outage_after_lines: Arc::default(),
            away: Arc::new(Notify::new()),
            back: Arc::new(Notify::new()),
        };
        let away = server.away.clone();
        let (received, connections, delay, cut, outage_after, back) = (
            server.received.clone(),
            server.connections.clone(),
            server.read_delay_ms.clone(),
            server.cut.clone(),
            server.outage_after_lines.clone(),
            server.back.clone(),
        );
        let down = Arc::new(Notify::new());
        let log_lines = Arc::new(AtomicUsize::new(0));
        // Bumped to drop every connection at once.
        let (epoch, _) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            let mut listener = listener;
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = down.notified() => {
                        drop(listener);
                        epoch.send_modify(|e| *e += 1);
                        away.notify_one();
                        tokio::time::sleep(OUTAGE).await;
                        listener = listen(addr);
                        back.notify_one();
                        continue;
                    }
                };
                let Ok((tcp, _)) = accepted else { continue };
                let check =
                    |request: &tokio_tungstenite::tungstenite::handshake::server::Request,
                     response| {
                        let query = request.uri().query().unwrap_or_default().to_string();
                        let bearer = request
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        // The key goes in the header only (relay.api_key_in_query is off).
                        assert!(!query.contains("api_key"), "query {query}");
                        assert_eq!(bearer, format!("Bearer {KEY}"));
                        Ok(response)
                    };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
                    continue;
                };
                connections.fetch_add(1, Ordering::SeqCst);
                let (received, delay, cut) = (received.clone(), delay.clone(), cut.clone());
                let (outage_after, log_lines, down) =
                    (outage_after.clone(), log_lines.clone(), down.clone());
                let mut dropped = epoch.subscribe();
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            frame = ws.next() => match frame {
                                Some(Ok(Message::Text(text))) => {
                                    let message: Value = serde_json::from_str(&text).unwrap();
                                    let line = message["type"] == "BUILD_LOG";
                                    received.lock().unwrap().push(message);
                                    let at = outage_after.load(Ordering::SeqCst);
                                    if line && log_lines.fetch_add(1, Ordering::SeqCst) + 1 == at {
                                        // The server goes away mid-log, without a close frame.
                                        down.notify_one();
                                        return;
                                    }
                                    let ms = delay.load(Ordering::SeqCst);
                                    if ms > 0 {
                                        tokio::time::sleep(Duration::from_millis(ms)).await;
                                    }
                                }
                                Some(Ok(_)) => {}
                                _ => return,
                            },
                            // Cut: drop the TCP connection without a close frame.
                            _ = cut.notified() => return,
                            _ = dropped.changed() => return,
                        }
                    }
                });
            }
        });
        server
    }

    fn relay(&self, buffer: usize) -> RelayConfig {
        RelayConfig {
            url: self.url.clone(),
            api_key: Secret::new(KEY),
            api_key_in_query: false,
            buffer,
            ping_interval: Duration::from_secs(1),
            write_timeout: Duration::from_secs(30),
            ca_file: None,
        }
    }

    fn messages(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }

    /// The phases one resource went through (live updates, not resyncs), in arrival order; an
    /// update that changes only the message does not repeat its phase here.
    fn phases(&self, kind: &str, name: &str) -> Vec<String> {
        let mut phases: Vec<String> = self
            .messages()
            .iter()
            .filter(|m| m["resourceType"] == kind && m["name"] == name && m["resync"] != true)
            .map(|m| m["status"].as_str().unwrap_or_default().to_string())
            .collect();
        phases.dedup();
        phases
    }

    /// The server's view after applying every message in id order: resource → status.
    fn view(&self) -> BTreeMap<(String, String, String), String> {
        let mut messages = self.messages();
        messages.retain(|m| m.get("resourceType").is_some());
        messages.sort_by_key(|m| m["id"].as_u64().unwrap());
        let mut view = BTreeMap::new();
        for m in messages {
            let key = (
                m["resourceType"].as_str().unwrap().to_string(),
                m["namespace"].as_str().unwrap().to_string(),
                m["name"].as_str().unwrap().to_string(),
            );
            match m["status"].as_str().unwrap() {
                "Deleted" => view.remove(&key),
                status => view.insert(key, status.to_string()),
            };
        }
        view
    }
}

async fn build_to_completion(admin: &Client, ns: &str, name: &str, server: Option<&TestServer>) {
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), ns);
    builds
        .create(
            &PostParams::default(),
            &shapeblock(
                "AppBuild",
                name,
                json!({"appName": "web", "gitRef": "main"}),
            ),
        )
        .await
        .unwrap();
    let sha = "4b825dc642cb6eb9a060e54bf8d69288fbee4904\n";
    if let Some(server) = server {
        // Mid-build: cut the server's connection once the build runs.
        wait_for("Building relayed", WAIT, async || {
            server
                .phases("AppBuild", name)
                .contains(&"Building".to_string())
                .then_some(())
        })
        .await;
        // notify_one keeps the request until the connection's task next waits for it (it may be
        // busy with a message right now); notify_waiters would be lost then.
        server.cut.notify_one();
    }
    let end = PodEnd {
        phase: "Succeeded",
        init: vec![("clone", 0, ""), ("commit", 0, sha)],
        containers: vec![("build", 0, "Completed", "")],
    };
    finish_job_pod(admin, ns, &format!("{name}-build"), end).await;
    // helm installs the shipped chart for real; the Deployment rolls out on the kwok node.
    support::cluster::helm_runs(admin, ns, &format!("{name}-deploy")).await;
}

/// The cluster's truth for the resources of a namespace (and its Project).
async fn truth(admin: &Client, ns: &str) -> BTreeMap<(String, String, String), String> {
    let mut truth = BTreeMap::new();
    let project: shapeblock::crd::Project = Api::all(admin.clone()).get(ns).await.unwrap();
    if let Some(phase) = project.status.and_then(|s| s.phase) {
        truth.insert(
            ("Project".into(), String::new(), ns.into()),
            format!("{phase:?}"),
        );
    }
    for app in Api::<App>::namespaced(admin.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
    {
        if let Some(phase) = app.status.as_ref().and_then(|s| s.phase) {
            truth.insert(
                ("App".into(), ns.into(), app.name_any()),
                format!("{phase:?}"),
            );
        }
    }
    for build in Api::<AppBuild>::namespaced(admin.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
    {
        if let Some(phase) = build.status.as_ref().and_then(|s| s.phase) {
            truth.insert(
                ("AppBuild".into(), ns.into(), build.name_any()),
                format!("{phase:?}"),
            );
        }
    }
    truth
}

async fn ready_web_app(admin: &Client, ns: &str) {
    ready_app(
        admin,
        ns,
        "web",
        json!({"displayName": "Web", "git": {"url": "https://github.com/org/web.git"},
            "registry": {"url": "registry.example.com"}, "build": {"type": "dockerfile"}}),
    )
    .await;
}

#[tokio::test]
async fn every_phase_arrives_in_order_and_a_cut_connection_ends_consistent() {
    let _one_hub = one_hub().await;
    support::jobs().await;
    let server = TestServer::start().await;
    let cluster = connected_cluster_relaying("relay-order", Some(server.relay(64))).await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "relay").await;
    ready_web_app(&admin, &ns).await;

    build_to_completion(&admin, &ns, "web-1", None).await;
    wait_for("web-1 Completed relayed", WAIT, async || {
        server
            .phases("AppBuild", "web-1")
            .contains(&"Completed".to_string())
            .then_some(())
    })
    .await;
    assert_eq!(
        server.phases("AppBuild", "web-1"),
        ["Pending", "Building", "Deploying", "Completed"],
        "every phase, in order, once; connections {}; messages {:?}",
        server.connections.load(Ordering::SeqCst),
        server
            .messages()
            .iter()
            .filter(|m| m["name"] == "web-1")
            .collect::<Vec<_>>()
    );
    let message = server
        .messages()
        .into_iter()
        .find(|m| m["name"] == "web-1" && m["status"] == "Building")
        .unwrap();
    assert_eq!(message["cluster"], cluster.cluster_id.as_str());
    assert_eq!(message["namespace"], ns.as_str());
    assert_eq!(message["appName"], "web");
    assert_eq!(message["labels"]["build.shapeblock.io/id"], "web-1");
    assert!(
        message["podName"]
            .as_str()
            .unwrap()
            .starts_with("web-1-build-")
    );
    let ids: Vec<u64> = server
        .messages()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");

    // The server's connection is cut while web-2 builds; the hub reconnects, resyncs, and the
    // server's view equals the cluster.
    build_to_completion(&admin, &ns, "web-2", Some(&server)).await;
    wait_for("reconnected", WAIT, async || {
        (server.connections.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    let expected = wait_for("web-2 Completed in the cluster", WAIT, async || {
        let truth = truth(&admin, &ns).await;
        (truth
            .get(&("AppBuild".into(), ns.clone(), "web-2".into()))
            .map(String::as_str)
            == Some("Completed"))
        .then_some(truth)
    })
    .await;
    wait_for("the server's view equals the cluster", WAIT, async || {
        let view: BTreeMap<_, _> = server
            .view()
            .into_iter()
            .filter(|((_, n, name), _)| *n == ns || *name == ns)
            .collect();
        (view == expected).then_some(())
    })
    .await;
    assert!(
        server.messages().iter().any(|m| m["resync"] == true),
        "a resync followed the reconnect"
    );
    let metrics = cluster.hub.as_ref().unwrap().metrics().await;
    let connects: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("shapeblock_relay_connects_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no relay connects in:\n{metrics}"));
    assert!(connects >= 2, "the reconnect is counted: {connects}");
    for series in [
        "shapeblock_relay_connected 1",
        "shapeblock_controller_reconciles_total{controller=\"appbuild\",result=\"ok\"}",
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn a_slow_server_gets_backpressure_and_every_event() {
    let _one_hub = one_hub().await;
    support::jobs().await;
    // A 4.5 MB build log: far more than the socket buffers hold, so a stalled server pushes
    // back through the relay's queue of 4 to the log follower.
    let padding = "x".repeat(140);
    let big: Vec<String> = (0..LOG_LINES)
        .map(|i| format!("line {i:05} {padding}"))
        .collect();
    let refs: Vec<&str> = big.iter().map(String::as_str).collect();
    support::write_container_log("prepare", &refs);
    let server = TestServer::start().await;
    // Pings every 10 s: the stall below must read as slow, not dead (3 pings unanswered).
    let relay = RelayConfig {
        ping_interval: Duration::from_secs(10),
        ..server.relay(4)
    };
    let cluster = connected_cluster_relaying("relay-slow", Some(relay)).await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "slow").await;
    ready_app(
        &admin,
        &ns,
        "worker",
        json!({"displayName": "Worker", "git": {"url": "https://github.com/org/worker.git"},
            "registry": {"url": "registry.example.com"}, "build": {"type": "buildpack"}}),
    )
    .await;
    let journal = cluster.hub.as_ref().unwrap().journal.clone();
    let rss_before = support::rss_kib(std::process::id());
    // The server stalls for 5 s after its next message, as the build starts.
    server.read_delay_ms.store(5000, Ordering::SeqCst);
    Api::<AppBuild>::namespaced(admin.clone(), &ns)
        .create(
            &PostParams::default(),
            &shapeblock(
                "AppBuild",
                "worker-1",
                json!({"appName": "worker", "gitRef": "main"}),
            ),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.read_delay_ms.store(0, Ordering::SeqCst);
    let rss_stalled = support::rss_kib(std::process::id());
    let end = PodEnd {
        phase: "Succeeded",
        init: vec![
            ("clone", 0, ""),
            ("commit", 0, "4b825dc642cb6eb9a060e54bf8d69288fbee4904\n"),
            ("prepare", 0, ""),
        ],
        containers: vec![("build", 0, "Completed", "")],
    };
    finish_job_pod(&admin, &ns, "worker-1-build", end).await;
    let lines = wait_for(
        "the whole log relayed",
        Duration::from_secs(180),
        async || {
            let log: Vec<Value> = server
                .messages()
                .into_iter()
                .filter(|m| {
                    m["type"] == "BUILD_LOG"
                        && m["buildId"] == "worker-1"
                        && m["namespace"] == ns.as_str()
                })
                .collect();
            log.iter().any(|m| m["final"] == true).then_some(log)
        },
    )
    .await;
    let prepare: Vec<&str> = lines
        .iter()
        .filter(|m| m["container"] == "prepare")
        .map(|m| m["log"].as_str().unwrap())
        .collect();
    assert_eq!(prepare.len(), LOG_LINES, "every line arrived, once");
    for (i, line) in prepare.iter().enumerate() {
        assert_eq!(*line, format!("{}\n", big[i]), "line {i} in order");
    }
    let waits = journal.stats.backpressure_waits.get();
    assert!(
        waits > 0,
        "the queue of 4 never filled: no backpressure was exercised"
    );
    assert_eq!(journal.stats.replaced_by_resync.get(), 0);
    assert_eq!(
        server.connections.load(Ordering::SeqCst),
        1,
        "one connection throughout"
    );
    let ids: Vec<u64> = server
        .messages()
        .iter()
        .filter(|m| m["resync"] != true)
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in order");
    eprintln!(
        "slow server: {waits} producer waits; {LOG_LINES} lines ({:.1} MB) delivered in order; \
         test process RSS {rss_before} KiB before, {rss_stalled} KiB while the server stalled",
        (LOG_LINES * 152) as f64 / 1e6
    );
}

#[tokio::test]
async fn the_events_endpoint_resumes_from_a_cursor_or_starts_from_a_snapshot() {
    let _one_hub = one_hub().await;
    let server = TestServer::start().await;
    let cluster = connected_cluster_relaying("relay-events", Some(server.relay(64))).await;
    let admin = cluster.admin.clone();
    let hub = cluster.hub.as_ref().unwrap();
    let ns = active_project(&admin, "events").await;
    let journal = hub.journal.clone();
    wait_for("the hub relayed the Project", WAIT, async || {
        let (snapshot, _) = journal.snapshot().await;
        snapshot
            .iter()
            .any(|e| e.name == ns && e.status.as_deref() == Some("Active"))
            .then_some(())
    })
    .await;
    let connect = async |query: &str| {
        support::hub::hub_websocket(
            hub,
            &format!("/api/v1/events{query}"),
            support::hub::VIEWER_TOKEN,
        )
        .await
    };
    let next = async |ws: &mut tokio_tungstenite::WebSocketStream<_>| -> Value {
        loop {
            let frame = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("an event")
                .unwrap()
                .unwrap();
            if let Message::Text(text) = frame {
                return serde_json::from_str(&text).unwrap();
            }
        }
    };

    // A snapshot first: the Project is there, then the end-of-snapshot marker with its id.
    let mut ws = connect("").await;
    let mut snapshot = Vec::new();
    let mark = loop {
        let event = next(&mut ws).await;
        if event["type"] == "SNAPSHOT_END" {
            break event["id"].as_u64().unwrap();
        }
        snapshot.push(event);
    };
    assert!(
        snapshot.iter().any(|e| e["resourceType"] == "Project"
            && e["name"] == ns.as_str()
            && e["resync"] == true),
        "{snapshot:?}"
    );
    // Live: an App becomes Ready.
    Api::<App>::namespaced(admin.clone(), &ns)
        .create(
            &PostParams::default(),
            &shapeblock(
                "App",
                "live",
                json!({"displayName": "Live", "registry": {},
                "build": {"type": "image", "image": "nginx:1.27"}}),
            ),
        )
        .await
        .unwrap();
    let live = loop {
        let event = next(&mut ws).await;
        if event["name"] == "live" {
            break event;
        }
    };
    assert!(live["id"].as_u64().unwrap() > mark);
    ws.close(None).await.ok();

    // Resuming from the snapshot's cursor replays what came after it, in order, the App's
    // event among them.
    let mut ws = connect(&format!("?cursor={mark}")).await;
    let mut previous = mark;
    loop {
        let event = next(&mut ws).await;
        let id = event["id"].as_u64().unwrap();
        assert!(
            id > previous,
            "ids after the cursor, increasing: {id} after {previous}"
        );
        previous = id;
        if event["name"] == "live" {
            assert_eq!(event["id"], live["id"]);
            break;
        }
    }
    ws.close(None).await.ok();

    // A cursor the hub cannot honour gets RESET and a fresh snapshot, never a silent gap: one
    // ahead of the newest event (a client confused, or a hub that lost its numbering), and one
    // from before this hub process (ids are unique across restarts: they start at the
    // process's start time in microseconds).
    for cursor in [previous + 1_000_000, 1] {
        let mut ws = connect(&format!("?cursor={cursor}")).await;
        let first = next(&mut ws).await;
        assert_eq!(first["type"], "RESET", "cursor {cursor}: {first}");
        let resync = next(&mut ws).await;
        assert_eq!(
            resync["resync"], true,
            "a snapshot follows the RESET: {resync}"
        );
        ws.close(None).await.ok();
    }
    assert!(
        mark > 1_000_000_000_000_000,
        "ids start at the process's start time: {mark}"
    );

    // Only a websocket is served there.
    let response = hub.api("GET", "/api/v1/events", None).await;
    assert_eq!(response.status, 400, "{}", response.text());
}

#[tokio::test]
async fn build_log_lines_reach_the_server_in_order_and_the_api_streams_them() {
    let _one_hub = one_hub().await;
    support::jobs().await;
    support::write_container_log(
        "clone",
        &[
            "Cloning into '/workspace/source'...",
            "HEAD is now at 4b825dc",
        ],
    );
    support::write_container_log("commit", &[]);
    support::write_container_log(
        "build",
        &[
            "INFO[0000] Retrieving image manifest node:22",
            "STEP 2/4: RUN npm ci $(not run) `nor this`",
            "INFO[0042] Pushed registry.example.com/x/web",
        ],
    );
    let server = TestServer::start().await;
    let cluster = connected_cluster_relaying("relay-logs", Some(server.relay(64))).await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "logs").await;
    ready_web_app(&admin, &ns).await;
    Api::<AppBuild>::namespaced(admin.clone(), &ns)
        .create(
            &PostParams::default(),
            &shapeblock(
                "AppBuild",
                "web-logs",
                json!({"appName": "web", "gitRef": "main"}),
            ),
        )
        .await
        .unwrap();
    let expected = [
        ("clone", "Cloning into '/workspace/source'...\n"),
        ("clone", "HEAD is now at 4b825dc\n"),
        ("build", "INFO[0000] Retrieving image manifest node:22\n"),
        ("build", "STEP 2/4: RUN npm ci $(not run) `nor this`\n"),
        ("build", "INFO[0042] Pushed registry.example.com/x/web\n"),
    ];
    // The build container runs (followed) until the pod ends.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Followers whose client went away end with it, even while the pod is quiet: each one's
    // log request through the tunnel is gone within seconds (the apiserver counts them).
    let hub = cluster.hub.as_ref().unwrap();
    let log_requests = async || support::apiserver_log_requests(&admin).await;
    let before = log_requests().await;
    let mut abandoned = Vec::new();
    for _ in 0..5 {
        let (mut sender, connection) =
            support::hub::hub_connection(hub.addr, hub.ca_file.as_deref()).await;
        let request = support::hub::hub_get(
            &format!(
                "/api/v1/clusters/{}/namespaces/{ns}/appbuilds/web-logs/logs?follow=true",
                cluster.cluster_id
            ),
            support::hub::ADMIN_TOKEN,
        );
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        abandoned.push((response, connection));
    }
    wait_for("5 more log requests through the tunnel", WAIT, async || {
        (log_requests().await >= before + 5).then_some(())
    })
    .await;
    for (response, connection) in abandoned {
        drop(response);
        connection.abort();
    }
    wait_for(
        "abandoned log requests gone",
        Duration::from_secs(15),
        async || (log_requests().await <= before).then_some(()),
    )
    .await;
    let end = PodEnd {
        phase: "Succeeded",
        init: vec![
            ("clone", 0, ""),
            ("commit", 0, "4b825dc642cb6eb9a060e54bf8d69288fbee4904\n"),
        ],
        containers: vec![("build", 0, "Completed", "")],
    };
    finish_job_pod(&admin, &ns, "web-logs-build", end).await;
    let lines = wait_for("the build log and its final marker", WAIT, async || {
        let log: Vec<Value> = server
            .messages()
            .into_iter()
            .filter(|m| m["type"] == "BUILD_LOG" && m["buildId"] == "web-logs")
            .collect();
        log.iter().any(|m| m["final"] == true).then_some(log)
    })
    .await;
    let received: Vec<(String, String)> = lines
        .iter()
        .filter(|m| m["final"] != true)
        .map(|m| {
            (
                m["container"].as_str().unwrap().to_string(),
                m["log"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected_owned: Vec<(String, String)> = expected
        .iter()
        .map(|(c, l)| (c.to_string(), l.to_string()))
        .collect();
    assert_eq!(received, expected_owned, "every line, in order, once");
    assert_eq!(
        lines.last().unwrap()["final"],
        true,
        "the marker comes last"
    );
    assert!(
        lines
            .iter()
            .all(|m| m["namespace"] == ns.as_str() && m["cluster"] == cluster.cluster_id.as_str())
    );

    // The same log from the REST API.
    let hub = cluster.hub.as_ref().unwrap();
    let response = hub
        .api(
            "GET",
            &format!(
                "/api/v1/clusters/{}/namespaces/{ns}/appbuilds/web-logs/logs",
                cluster.cluster_id
            ),
            None,
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let text: String = expected.iter().map(|(_, l)| *l).collect();
    assert_eq!(response.text(), text);
    let missing = hub
        .api(
            "GET",
            &format!(
                "/api/v1/clusters/{}/namespaces/{ns}/appbuilds/nope/logs",
                cluster.cluster_id
            ),
            None,
        )
        .await;
    assert_eq!(missing.status, 404, "{}", missing.text());
    // A name that decodes to a path never reaches the tunnel.
    let slashed = hub
        .api(
            "GET",
            &format!(
                "/api/v1/clusters/{}/namespaces/{ns}/appbuilds/..%2F..%2Fsecrets%2Fx/logs",
                cluster.cluster_id
            ),
            None,
        )
        .await;
    assert_eq!(slashed.status, 400, "{}", slashed.text());
    assert!(slashed.text().contains("not a valid Kubernetes name"));
}

/// The log, as the server holds it after dropping repeats by position: (container, line) →
/// text, and how many messages were repeats.
fn log_by_position(
    messages: &[Value],
    ns: &str,
    build: &str,
) -> (BTreeMap<(String, u64), String>, usize) {
    let mut held = BTreeMap::new();
    let mut repeats = 0;
    for m in messages {
        if m["type"] != "BUILD_LOG" || m["buildId"] != build || m["namespace"] != ns {
            continue;
        }
        let Some(line) = m["line"].as_u64() else {
            continue; // the final message
        };
        let position = (m["container"].as_str().unwrap().to_string(), line);
        let text = m["log"].as_str().unwrap().to_string();
        match held.get(&position) {
            Some(first) => {
                assert_eq!(*first, text, "a repeat of {position:?} has the same text");
                repeats += 1;
            }
            None => {
                held.insert(position, text);
            }
        }
    }
    (held, repeats)
}

#[tokio::test]
async fn no_build_log_line_is_lost_across_a_30_s_server_outage() {
    let _one_hub = one_hub().await;
    support::jobs().await;
    // Three containers with logs (the build pod's commit container prints nothing), the two
    // big ones 30,000 lines each.
    let logs: Vec<(&str, Vec<String>)> =
        [("clone", 3), ("prepare", LOG_LINES), ("build", LOG_LINES)]
            .into_iter()
            .map(|(container, n)| {
                let lines = (1..=n)
                    .map(|i| format!("{container} line {i:05}"))
                    .collect();
                (container, lines)
            })
            .collect();
    for (container, lines) in &logs {
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        support::write_container_log(container, &refs);
    }
    support::write_container_log("commit", &[]);
    let server = TestServer::start().await;
    // Mid-log: two thirds into the prepare container's 30,000 lines.
    server.outage_after_lines.store(20_000, Ordering::SeqCst);
    let mut cluster = connected_cluster_relaying("relay-outage", Some(server.relay(64))).await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "outage").await;
    ready_app(
        &admin,
        &ns,
        "worker",
        json!({"displayName": "Worker", "git": {"url": "https://github.com/org/worker.git"},
            "registry": {"url": "registry.example.com"}, "build": {"type": "buildpack"}}),
    )
    .await;
    let journal = cluster.hub.as_ref().unwrap().journal.clone();
    Api::<AppBuild>::namespaced(admin.clone(), &ns)
        .create(
            &PostParams::default(),
            &shapeblock(
                "AppBuild",
                "worker-1",
                json!({"appName": "worker", "gitRef": "main"}),
            ),
        )
        .await
        .unwrap();
    // The server goes away after its 20,000th line and is back 30 s later; the build pod runs
    // on meanwhile, and ends only once the server is back. As the outage begins, the agent is
    // killed and started again: the hub's read of the build log fails mid-way, and must be
    // read again rather than end the log early.
    tokio::time::timeout(Duration::from_secs(120), server.away.notified())
        .await
        .expect("the outage began: the server received 20,000 lines");
    cluster.restart_agent().await;
    tokio::time::timeout(Duration::from_secs(120), server.back.notified())
        .await
        .expect("the outage happened: the server received 20,000 lines");
    let outage_ended = std::time::Instant::now();
    wait_for("reconnected after the outage", WAIT, async || {
        (server.connections.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    let reconnected_after = outage_ended.elapsed();
    let end = PodEnd {
        phase: "Succeeded",
        init: vec![
            ("clone", 0, ""),
            ("commit", 0, "4b825dc642cb6eb9a060e54bf8d69288fbee4904\n"),
            ("prepare", 0, ""),
        ],
        containers: vec![("build", 0, "Completed", "")],
    };
    finish_job_pod(&admin, &ns, "worker-1-build", end).await;
    let expected: usize = logs.iter().map(|(_, lines)| lines.len()).sum();
    // Until the server holds every position, or long after it could have.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let (held, repeats) = loop {
        let (held, repeats) = log_by_position(&server.messages(), &ns, "worker-1");
        if held.len() >= expected || std::time::Instant::now() > deadline {
            break (held, repeats);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut lost = 0;
    for (container, lines) in &logs {
        for (i, text) in lines.iter().enumerate() {
            match held.get(&(container.to_string(), i as u64 + 1)) {
                Some(got) => assert_eq!(*got, format!("{text}\n"), "{container} line {}", i + 1),
                None => lost += 1,
            }
        }
    }
    let extra = held.len() + lost - expected;
    let messages = server.messages();
    let resent = messages
        .iter()
        .filter(|m| m["type"] == "BUILD_LOG" && m["resent"] == true)
        .count();
    eprintln!(
        "lines lost across a 30 s outage: {lost} (of {expected} lines in 3 containers; \
         {resent} lines re-sent from the cluster after the reconnect, {repeats} repeats dropped \
         by position; reconnected {:.1} s after the server was back; {} connections)",
        reconnected_after.as_secs_f64(),
        server.connections.load(Ordering::SeqCst)
    );
    assert_eq!(lost, 0, "every line 1..={LOG_LINES} of every container");
    assert_eq!(extra, 0, "no position beyond the log");
    assert!(resent > 0, "lines were re-sent, marked so");
    assert!(
        journal.stats.log_lines_resent.get() > 0,
        "the hub counted its re-sent lines"
    );
    assert_eq!(journal.stats.log_lines_lost.get(), 0);
    // The final message, with each container's line count, follows the re-sent lines.
    let finals: Vec<&Value> = messages
        .iter()
        .filter(|m| m["type"] == "BUILD_LOG" && m["buildId"] == "worker-1" && m["final"] == true)
        .collect();
    let last = finals.last().expect("a final message");
    for (container, lines) in &logs {
        assert_eq!(last["lineCounts"][container], lines.len(), "{last}");
    }
    for (container, _) in &logs {
        support::write_container_log(container, &[]);
    }
}

#[tokio::test]
async fn a_build_that_ended_while_its_log_was_undelivered_is_resent_after_a_hub_restart() {
    let _one_hub = one_hub().await;
    // Not `web-1`: every test's hub sees every namespace, and another test follows `web-1` by name.
    support::jobs().await;
    let logs: Vec<(&str, Vec<String>)> = [("clone", 2), ("commit", 0), ("build", 1000)]
        .into_iter()
        .map(|(container, n)| {
            let lines = (1..=n).map(|i| format!("{container} says {i}")).collect();
            (container, lines)
        })
        .collect();
    for (container, lines) in &logs {
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        support::write_container_log(container, &refs);
    }
    let server = TestServer::start().await;
    // The server takes its first message, then reads nothing for a minute: the first hub's
    // log lines wait in its queue (large enough that the controllers go on meanwhile).
    server.read_delay_ms.store(60_000, Ordering::SeqCst);
    let mut cluster =
        connected_cluster_relaying("relay-restart", Some(server.relay(100_000))).await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "restart-log").await;
    ready_web_app(&admin, &ns).await;
    build_to_completion(&admin, &ns, "web-restart", None).await;
    wait_for("web-restart Completed in the cluster", WAIT, async || {
        let truth = truth(&admin, &ns).await;
        (truth
            .get(&("AppBuild".into(), ns.clone(), "web-restart".into()))
            .map(String::as_str)
            == Some("Completed"))
        .then_some(())
    })
    .await;
    let before = log_by_position(&server.messages(), &ns, "web-restart")
        .0
        .len();
    // The hub stops with the log undelivered; the new one finds the build ended moments ago.
    server.read_delay_ms.store(0, Ordering::SeqCst);
    cluster.restart_hub().await;
    let expected: usize = logs.iter().map(|(_, lines)| lines.len()).sum();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let held = loop {
        let (held, _) = log_by_position(&server.messages(), &ns, "web-restart");
        if held.len() >= expected || std::time::Instant::now() > deadline {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let lost = expected - held.len().min(expected);
    eprintln!(
        "lines lost across a hub restart after the build ended: {lost} (of {expected}; the \
         server held {before} before the restart)"
    );
    assert_eq!(lost, 0, "every line of the ended build, after the restart");
    for (container, lines) in &logs {
        for (i, text) in lines.iter().enumerate() {
            assert_eq!(
                held.get(&(container.to_string(), i as u64 + 1)),
                Some(&format!("{text}\n")),
                "{container} line {}",
                i + 1
            );
        }
    }
    let resent = server
        .messages()
        .iter()
        .filter(|m| m["type"] == "BUILD_LOG" && m["buildId"] == "web-restart")
        .skip(before)
        .all(|m| m["resent"] == true);
    assert!(resent, "the new hub marks every line it sends again");
    for (container, _) in &logs {
        support::write_container_log(container, &[]);
    }
}
