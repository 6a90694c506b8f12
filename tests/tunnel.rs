//! The tunnel end to end: a hub in this process, the real `shapeblock-agent` binary, and the
//! real test control plane behind it. Every request in these tests travels
//! hub client → HTTP/2 → websocket (TLS) → agent → kube-apiserver.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock::hub::Registry;
use shapeblock::tunnel::CloseReason;
use support::TestNamespace;
use support::hub::{AgentProcess, TestHub, agent_identity, scratch_dir};

fn config_map(name: &str, data: BTreeMap<String, String>) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    }
}

/// Waits until `stream` yields an applied object named `name`.
async fn expect_event<S>(stream: &mut S, name: &str)
where
    S: futures::Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin,
{
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))
                    if cm.name_any() == name =>
                {
                    return true;
                }
                Ok(_) => {}
                Err(err) => eprintln!("watcher error (retried with backoff): {err}"),
            }
        }
        false
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "watch through the tunnel did not deliver {name}"
    );
}

struct Setup {
    dir: std::path::PathBuf,
    ns: TestNamespace,
    hub: TestHub,
    cluster: String,
    token: String,
    agent: AgentProcess,
    client: Client,
}

/// A hub with TLS, one registered cluster, and its agent connected with cluster-admin.
async fn setup(name: &str) -> Setup {
    let dir = scratch_dir(name);
    let ns = TestNamespace::new(name).await;
    let identity = agent_identity(&dir, &ns.name, "agent", None).await;
    let hub = TestHub::builder().tls(&dir).start().await;
    let (record, token) = hub.registry.register(name, Default::default()).unwrap();
    let agent = AgentProcess::spawn(&dir, &hub, token.expose(), &identity.kubeconfig, "agent");
    hub.wait_connected(&record.id).await;
    let client = hub.gateway.client(&record.id);
    Setup {
        dir,
        ns,
        hub,
        cluster: record.id,
        token: token.expose().to_string(),
        agent,
        client,
    }
}

#[tokio::test]
async fn kube_requests_through_the_tunnel() {
    let s = setup("requests").await;

    // Connection state: versions from both ends, a measured round-trip time.
    let status = s.hub.gateway.status(&s.cluster);
    assert!(status.connected);
    assert_eq!(
        status.agent_version.as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert!(
        status
            .kubernetes_version
            .as_deref()
            .is_some_and(|v| v.starts_with("v1.")),
        "{status:?}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let status = s.hub.gateway.status(&s.cluster);
    assert!(
        status.rtt_ms.is_some_and(|rtt| rtt > 0.0),
        "no round-trip time measured: {status:?}"
    );

    // Namespaces: create, get, list, patch, delete.
    let namespaces: Api<Namespace> = Api::all(s.client.clone());
    let ns_name = format!("{}-extra", s.ns.name);
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ns_name}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    assert_eq!(namespaces.get(&ns_name).await.unwrap().name_any(), ns_name);
    let names: Vec<String> = namespaces
        .list(&ListParams::default())
        .await
        .unwrap()
        .iter()
        .map(|n| n.name_any())
        .collect();
    assert!(
        names.contains(&ns_name) && names.contains(&"default".to_string()),
        "{names:?}"
    );
    let labelled = json!({"metadata": {"labels": {"shapeblock.io/tunnel": "yes"}}});
    let patched = namespaces
        .patch(&ns_name, &PatchParams::default(), &Patch::Merge(&labelled))
        .await
        .unwrap();
    assert_eq!(
        patched
            .labels()
            .get("shapeblock.io/tunnel")
            .map(String::as_str),
        Some("yes")
    );
    namespaces
        .delete(&ns_name, &DeleteParams::default())
        .await
        .unwrap();

    // ConfigMaps: watch, then create, patch (server-side apply) and delete through the tunnel.
    let cms: Api<ConfigMap> = Api::namespaced(s.client.clone(), &s.ns.name);
    let mut events = watcher(cms.clone(), watcher::Config::default()).boxed();
    cms.create(
        &PostParams::default(),
        &config_map("first", [("k".into(), "v".into())].into()),
    )
    .await
    .unwrap();
    expect_event(&mut events, "first").await;
    let applied = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "first"}, "data": {"k": "v2"}});
    let cm = cms
        .patch(
            "first",
            &PatchParams::apply("tunnel-test").force(),
            &Patch::Apply(&applied),
        )
        .await
        .unwrap();
    assert_eq!(cm.data.unwrap()["k"], "v2");
    let direct: Api<ConfigMap> = Api::namespaced(support::client().await, &s.ns.name);
    assert_eq!(
        direct.get("first").await.unwrap().data.unwrap()["k"],
        "v2",
        "the write reached the apiserver"
    );
    cms.delete("first", &DeleteParams::default()).await.unwrap();
    let deleted = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(event)) = events.next().await {
            if let watcher::Event::Delete(cm) = event {
                return cm.name_any() == "first";
            }
        }
        false
    })
    .await;
    assert_eq!(deleted, Ok(true), "delete event not delivered");

    // API errors come back as API errors with the apiserver's message.
    match cms.get("does-not-exist").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404),
        other => panic!("expected 404, got {other:?}"),
    }

    // Per-cluster metrics.
    let metrics = s.hub.metrics().await;
    assert!(
        metrics.contains(&format!(
            "shapeblock_tunnel_connected{{cluster=\"{}\"}} 1",
            s.cluster
        )),
        "{metrics}"
    );
    drop(s.agent);
    let _ = &s.dir;
}

#[tokio::test]
async fn a_list_of_5000_configmaps_arrives_intact() {
    let s = setup("biglist").await;
    let direct: Api<ConfigMap> = Api::namespaced(support::client().await, &s.ns.name);
    futures::stream::iter(0..5000)
        .map(|i| {
            let direct = direct.clone();
            async move {
                let data = [
                    ("index".to_string(), i.to_string()),
                    ("payload".to_string(), format!("{i:0>200}")),
                ];
                direct
                    .create(
                        &PostParams::default(),
                        &config_map(&format!("cm-{i:05}"), data.into()),
                    )
                    .await
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await
        .expect("create 5000 ConfigMaps");

    // One unpaginated LIST through the tunnel: several MB in one response.
    let tunnelled: Api<ConfigMap> = Api::namespaced(s.client.clone(), &s.ns.name);
    let list = tunnelled
        .list(&ListParams::default())
        .await
        .expect("LIST through the tunnel");
    let mut seen: Vec<(String, String)> = list
        .items
        .iter()
        .filter(|cm| cm.name_any().starts_with("cm-"))
        .map(|cm| {
            let data = cm.data.as_ref().unwrap();
            assert_eq!(
                data["payload"],
                format!("{:0>200}", data["index"]),
                "payload corrupted"
            );
            (cm.name_any(), data["index"].clone())
        })
        .collect();
    seen.sort();
    assert_eq!(seen.len(), 5000, "objects missing from the LIST");
    for (i, (name, index)) in seen.iter().enumerate() {
        assert_eq!(name, &format!("cm-{i:05}"));
        assert_eq!(index, &i.to_string());
    }
    // The same LIST direct and through the tunnel are byte-for-byte the same objects.
    let direct_list = direct.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        serde_json::to_value(&direct_list.items).unwrap(),
        serde_json::to_value(&list.items).unwrap()
    );
}

#[tokio::test]
async fn watches_survive_agent_and_hub_restarts() {
    let dir = scratch_dir("restarts");
    let ns = TestNamespace::new("restarts").await;
    let identity = agent_identity(&dir, &ns.name, "agent", None).await;
    let registry = Arc::new(Registry::in_memory());
    let hub = TestHub::builder()
        .tls(&dir)
        .registry(registry.clone())
        .start()
        .await;
    let (record, token) = registry.register("restarts", Default::default()).unwrap();
    let agent = AgentProcess::spawn(&dir, &hub, token.expose(), &identity.kubeconfig, "agent-1");
    hub.wait_connected(&record.id).await;
    let direct: Api<ConfigMap> = Api::namespaced(support::client().await, &ns.name);

    let tunnelled: Api<ConfigMap> = Api::namespaced(hub.gateway.client(&record.id), &ns.name);
    let mut events = watcher(tunnelled, watcher::Config::default()).boxed();
    direct
        .create(
            &PostParams::default(),
            &config_map("before-kill", BTreeMap::new()),
        )
        .await
        .unwrap();
    expect_event(&mut events, "before-kill").await;

    // The agent dies (SIGKILL); a change happens while the cluster is disconnected.
    agent.kill().await;
    hub.wait_disconnected(&record.id).await;
    direct
        .create(
            &PostParams::default(),
            &config_map("while-down", BTreeMap::new()),
        )
        .await
        .unwrap();
    let agent = AgentProcess::spawn(&dir, &hub, token.expose(), &identity.kubeconfig, "agent-2");
    hub.wait_connected(&record.id).await;
    // The same watch stream, through the same client, delivers what happened meanwhile and after.
    expect_event(&mut events, "while-down").await;
    direct
        .create(
            &PostParams::default(),
            &config_map("after-agent-restart", BTreeMap::new()),
        )
        .await
        .unwrap();
    expect_event(&mut events, "after-agent-restart").await;

    // The hub restarts on the same address with the same registry; the agent comes back on
    // its own, and a watch through the new hub delivers.
    let addr = hub.addr;
    hub.stop().await;
    drop(events);
    let hub = TestHub::builder()
        .tls(&dir)
        .registry(registry.clone())
        .addr(addr)
        .start()
        .await;
    hub.wait_connected(&record.id).await;
    let tunnelled: Api<ConfigMap> = Api::namespaced(hub.gateway.client(&record.id), &ns.name);
    let mut events = watcher(tunnelled, watcher::Config::default()).boxed();
    direct
        .create(
            &PostParams::default(),
            &config_map("after-hub-restart", BTreeMap::new()),
        )
        .await
        .unwrap();
    expect_event(&mut events, "after-hub-restart").await;
    assert!(
        agent.log_text().contains("reconnecting"),
        "{}",
        agent.log_text()
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_slow_watch_consumer_does_not_stall_other_requests() {
    use http_body_util::BodyExt;
    let s = setup("slowwatch").await;
    // A watch whose body nobody reads: its HTTP/2 stream window fills and only it stops.
    let watch = http::Request::get(format!(
        "/api/v1/namespaces/{}/configmaps?watch=true",
        s.ns.name
    ))
    .body(Vec::new())
    .unwrap();
    let stalled = s
        .client
        .send(watch.map(kube::client::Body::from))
        .await
        .expect("open watch");
    assert!(stalled.status().is_success());

    // 40 events of 64 KiB each: 2.5 MiB, ten times the stream window and more than the
    // connection window, all queued behind the unread watch.
    let direct: Api<ConfigMap> = Api::namespaced(support::client().await, &s.ns.name);
    let big = "x".repeat(64 * 1024);
    for i in 0..40 {
        let data = [("blob".to_string(), big.clone())].into();
        direct
            .create(
                &PostParams::default(),
                &config_map(&format!("big-{i:02}"), data),
            )
            .await
            .unwrap();
    }

    // Meanwhile other requests on the same tunnel keep flowing.
    let tunnelled: Api<ConfigMap> = Api::namespaced(s.client.clone(), &s.ns.name);
    for i in 0..20 {
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            tunnelled.get(&format!("big-{:02}", i % 40)),
        )
        .await
        .expect("a GET stalled behind the unread watch")
        .unwrap();
        assert_eq!(got.data.unwrap()["blob"].len(), big.len());
    }
    let listed = tokio::time::timeout(
        Duration::from_secs(30),
        tunnelled.list(&ListParams::default()),
    )
    .await
    .expect("a LIST stalled behind the unread watch")
    .unwrap();
    assert_eq!(
        listed
            .items
            .iter()
            .filter(|cm| cm.name_any().starts_with("big-"))
            .count(),
        40
    );

    // Nothing was lost on the stalled stream: reading it now yields all 40 events.
    let mut body = stalled.into_body();
    let mut buffer = Vec::new();
    let mut added = 0;
    let read_all = tokio::time::timeout(Duration::from_secs(60), async {
        while added < 40 {
            let frame = body
                .frame()
                .await
                .expect("watch ended early")
                .expect("watch body error");
            if let Ok(data) = frame.into_data() {
                buffer.extend_from_slice(&data);
                while let Some(pos) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=pos).collect();
                    let event: serde_json::Value = serde_json::from_slice(&line).unwrap();
                    if event["type"] == "ADDED" {
                        added += 1;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        read_all.is_ok(),
        "only {added} of 40 events arrived on the resumed watch"
    );
}

#[tokio::test]
async fn clusters_are_isolated_and_agents_use_only_their_own_credentials() {
    let dir = scratch_dir("isolation");
    let home = TestNamespace::new("iso-home").await;
    let ns_a = TestNamespace::new("iso-a").await;
    let ns_b = TestNamespace::new("iso-b").await;
    let id_a = agent_identity(&dir, &home.name, "agent-a", Some(&ns_a.name)).await;
    let id_b = agent_identity(&dir, &home.name, "agent-b", Some(&ns_b.name)).await;
    let hub = TestHub::builder().tls(&dir).start().await;
    let (a, token_a) = hub.registry.register("a", Default::default()).unwrap();
    let (b, token_b) = hub.registry.register("b", Default::default()).unwrap();
    let _agent_a = AgentProcess::spawn(&dir, &hub, token_a.expose(), &id_a.kubeconfig, "agent-a");
    let _agent_b = AgentProcess::spawn(&dir, &hub, token_b.expose(), &id_b.kubeconfig, "agent-b");
    hub.wait_connected(&a.id).await;
    hub.wait_connected(&b.id).await;
    let (client_a, client_b) = (hub.gateway.client(&a.id), hub.gateway.client(&b.id));

    // Who the apiserver sees behind each tunnel: that cluster's agent, nobody else.
    for (client, expected) in [(&client_a, &id_a.username), (&client_b, &id_b.username)] {
        assert_eq!(&whoami(client, None).await, expected);
    }
    // A credential added by the hub side never reaches the apiserver: the agent strips it.
    assert_eq!(
        whoami(&client_a, Some(&format!("Bearer {}", token_b.expose()))).await,
        id_a.username
    );

    // Each cluster reaches only what its agent may: A writes in A's namespace, not in B's.
    let cm = config_map("mine", BTreeMap::new());
    Api::<ConfigMap>::namespaced(client_a.clone(), &ns_a.name)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    Api::<ConfigMap>::namespaced(client_b.clone(), &ns_b.name)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    for (client, other) in [(&client_a, &ns_b.name), (&client_b, &ns_a.name)] {
        match Api::<ConfigMap>::namespaced(client.clone(), other)
            .get("mine")
            .await
        {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
            other => panic!("cross-cluster read was not refused: {other:?}"),
        }
    }
}

/// The agent reaches its apiserver with any credential a kubeconfig commonly holds (its own
/// small HTTP client, not the kube client): a client certificate with the CA in files (the
/// control plane's admin kubeconfig, as k3s writes one), a `tokenFile` given relative to the
/// kubeconfig, and an inline token (every other test). The apiserver names who it saw.
#[tokio::test]
async fn the_agent_authenticates_with_a_client_certificate_or_a_token_file() {
    let dir = scratch_dir("credentials");
    let home = TestNamespace::new("creds").await;
    let hub = TestHub::builder().tls(&dir).start().await;

    let admin_kubeconfig = support::kubeconfig_path().await;
    let (cert, cert_token) = hub.registry.register("cert", Default::default()).unwrap();
    let _cert_agent = AgentProcess::spawn(
        &dir,
        &hub,
        cert_token.expose(),
        &admin_kubeconfig,
        "agent-cert",
    );

    let identity = agent_identity(&dir, &home.name, "agent-file", None).await;
    let inline = std::fs::read_to_string(&identity.kubeconfig).unwrap();
    let token = inline
        .lines()
        .find_map(|line| line.trim().strip_prefix("token: "))
        .expect("a token in the agent's kubeconfig")
        .to_string();
    let files = dir.join("token-file");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("sa.token"), format!("{token}\n")).unwrap();
    let with_file = files.join("kubeconfig");
    std::fs::write(
        &with_file,
        inline.replace(&format!("token: {token}"), "tokenFile: sa.token"),
    )
    .unwrap();
    let (file, file_token) = hub.registry.register("file", Default::default()).unwrap();
    let _file_agent =
        AgentProcess::spawn(&dir, &hub, file_token.expose(), &with_file, "agent-file");

    hub.wait_connected(&cert.id).await;
    hub.wait_connected(&file.id).await;
    assert_eq!(whoami(&hub.gateway.client(&cert.id), None).await, "admin");
    assert_eq!(
        whoami(&hub.gateway.client(&file.id), None).await,
        identity.username
    );
}

/// The user the apiserver authenticated, via SelfSubjectReview through `client`.
async fn whoami(client: &Client, authorization: Option<&str>) -> String {
    let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"});
    let mut request = http::Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
        .header("content-type", "application/json");
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let review: serde_json::Value = client
        .request(request.body(serde_json::to_vec(&body).unwrap()).unwrap())
        .await
        .unwrap();
    review["status"]["userInfo"]["username"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn wrong_unknown_or_revoked_tokens_get_no_tunnel() {
    let dir = scratch_dir("tokens");
    let ns = TestNamespace::new("tokens").await;
    let identity = agent_identity(&dir, &ns.name, "agent", None).await;
    let hub = TestHub::builder().start().await;
    let (record, token) = hub.registry.register("tokens", Default::default()).unwrap();
    let wrong_secret = format!("sbt_{}_{}", record.id, "0".repeat(64));
    let unknown = format!("sbt_c0000000000000000_{}", "1".repeat(64));
    let revoked = token.expose().to_string();
    let current = hub.registry.rotate_token(&record.id).unwrap().unwrap();

    for (case, presented) in [
        ("no token", None),
        ("wrong secret", Some(wrong_secret.as_str())),
        ("unknown cluster", Some(unknown.as_str())),
        ("rotated-out token", Some(revoked.as_str())),
        ("not a bearer token", Some("Basic YWRtaW46YWRtaW4=")),
    ] {
        let status = handshake_status(&hub, presented).await;
        assert_eq!(status, 401, "{case}: expected 401");
    }
    assert_eq!(
        handshake_status(&hub, Some(&format!("Bearer {}", current.expose()))).await,
        101
    );

    // A real agent with a revoked token stays out and says why.
    let agent = AgentProcess::spawn(&dir, &hub, &revoked, &identity.kubeconfig, "revoked");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!hub.gateway.status(&record.id).connected);
    let log = agent.log_text();
    assert!(log.contains("HTTP 401") && log.contains("revoked"), "{log}");
    assert!(!log.contains(&revoked), "the agent logged its token");
}

/// Status of a websocket handshake on the hub with the given Authorization header.
async fn handshake_status(hub: &TestHub, authorization: Option<&str>) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://127.0.0.1:{}/agent/v1/connect", hub.addr.port())
        .into_client_request()
        .unwrap();
    if let Some(value) = authorization {
        let value = if value.starts_with("Bearer ") || value.starts_with("Basic ") {
            value.to_string()
        } else {
            format!("Bearer {value}")
        };
        request
            .headers_mut()
            .insert("authorization", value.parse().unwrap());
    }
    let tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    match tokio_tungstenite::client_async(request, tcp).await {
        Ok((_ws, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("handshake failed unexpectedly: {other}"),
    }
}

#[tokio::test]
async fn exec_attach_portforward_and_proxy_are_refused() {
    let s = setup("refused").await;
    for path in [
        format!(
            "/api/v1/namespaces/{}/pods/web-0/exec?command=sh&stdin=true",
            s.ns.name
        ),
        format!("/api/v1/namespaces/{}/pods/web-0/attach", s.ns.name),
        format!("/api/v1/namespaces/{}/pods/web-0/portforward", s.ns.name),
        format!("/api/v1/namespaces/{}/services/web:80/proxy/", s.ns.name),
        "/api/v1/nodes/node-1/proxy/configz".to_string(),
    ] {
        let request = http::Request::post(path.as_str()).body(Vec::new()).unwrap();
        match s.client.request::<serde_json::Value>(request).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 403, "{path}: {status:?}");
                assert!(
                    status.message.contains("ShapeBlock agent refuses"),
                    "{path}: {}",
                    status.message
                );
            }
            other => panic!("{path} was not refused: {other:?}"),
        }
    }
    // Logs, which the hub needs, pass through (and reach the apiserver, which has no such pod).
    let logs = http::Request::get(format!("/api/v1/namespaces/{}/pods/web-0/log", s.ns.name))
        .body(Vec::new())
        .unwrap();
    match s.client.request_text(logs).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404, "{status:?}"),
        other => panic!("expected the apiserver's 404, got {other:?}"),
    }
    let _ = (&s.token, &s.dir);
}

#[tokio::test]
async fn a_newer_tunnel_replaces_the_older() {
    let s = setup("replace").await;
    assert_eq!(s.hub.gateway.status(&s.cluster).connects, 1);
    let identity = agent_identity(&s.dir, &s.ns.name, "agent-2", None).await;
    // A second agent with the same token (a rollout overlap, or a stale pod).
    let second = AgentProcess::spawn(&s.dir, &s.hub, &s.token, &identity.kubeconfig, "agent-2");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while s.hub.gateway.status(&s.cluster).connects < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second tunnel never took over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still exactly one live tunnel, and requests flow through it.
    assert!(s.hub.gateway.status(&s.cluster).connected);
    assert_eq!(s.hub.gateway.connected_count(), 1);
    Api::<Namespace>::all(s.client.clone())
        .get("default")
        .await
        .expect("request after replacement");
    // The replaced agent was told why and backs off instead of taking the cluster back
    // (its reconnect delay is capped at 1 s; its replaced wait is 15-30 s by default).
    let replaced = CloseReason::Replaced.message();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !s.agent.log_text().contains(replaced) {
        assert!(
            std::time::Instant::now() < deadline,
            "the replaced agent was not told why:\n{}",
            s.agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        s.hub.gateway.status(&s.cluster).connects,
        2,
        "the agents fight over the cluster:\n{}",
        s.agent.log_text()
    );
    // When the replacing agent goes, the first takes the cluster back after its wait.
    second.kill().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    while s.hub.gateway.status(&s.cluster).connects < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the replaced agent never took the cluster back:\n{}",
            s.agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.hub.wait_connected(&s.cluster).await;
    drop(s.agent);
}

#[tokio::test]
async fn handshakes_are_rate_limited_before_authentication() {
    let hub = TestHub::builder().start().await;
    // The per-address burst is five seconds' worth of the per-address rate (20/s): 100.
    let mut statuses = BTreeMap::new();
    for _ in 0..150 {
        *statuses
            .entry(handshake_status(&hub, Some("sbt_cx_wrong")).await)
            .or_insert(0) += 1;
    }
    assert!(
        statuses.get(&401).copied().unwrap_or(0) >= 90,
        "{statuses:?}"
    );
    assert!(
        statuses.get(&429).copied().unwrap_or(0) >= 30,
        "no rate limiting: {statuses:?}"
    );
    let metrics = hub.metrics().await;
    assert!(
        metrics.contains("shapeblock_tunnel_handshakes_rejected_total{reason=\"rate_limited\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn requests_to_one_cluster_are_held_to_its_budget() {
    // api_qps_per_cluster defaults to 50/s with a burst of 100: 250 requests cannot finish in
    // less than (250 - 100) / 50 = 3 s, however fast the tunnel is. A lower bound of the
    // limiter's effect, not a speed claim. Ten at a time, so that the burst is spent in a few
    // round trips even on a loaded machine (one at a time, at 12 ms each under the parallel
    // tests, the bucket refilled by 60 while the burst was spent).
    let s = setup("budget").await;
    let started = Instant::now();
    futures::stream::iter(0..250)
        .map(|_| s.client.apiserver_version())
        .buffer_unordered(10)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2_900),
        "250 requests took {took:?}: the per-cluster budget did not pace them"
    );
    // The waits are visible to an operator: most of the 150 requests past the burst waited
    // (the bucket refills a little while requests are in flight), for about the 3 s the
    // budget imposed.
    let metrics = s.hub.metrics().await;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "shapeblock_tunnel_api_limiter_wait_seconds_{name} "
                ))
            })
            .unwrap_or_else(|| panic!("no limiter wait {name} in:\n{metrics}"))
            .trim()
            .parse()
            .unwrap()
    };
    let (waited, seconds) = (value("count"), value("sum"));
    assert!(waited >= 100.0, "{waited} requests counted as waiting");
    assert!(seconds >= 1.0, "the waits add up to {seconds} s");
}

#[tokio::test]
async fn two_clusters_each_reach_only_their_own_apiserver() {
    // Two real clusters: the shared control plane (A) and a second etcd + kube-apiserver (B),
    // each with its own agent and its own credentials.
    let dir = scratch_dir("two-apiservers");
    let (config_b, kubeconfig_b) = support::extra_control_plane("cluster-b").await;
    let admin_a = support::client().await;
    let admin_b = Client::try_from(config_b).unwrap();
    let kubeconfig_a = support::kubeconfig_path().await;
    let hub = TestHub::builder().tls(&dir).start().await;
    let (a, token_a) = hub.registry.register("a", Default::default()).unwrap();
    let (b, token_b) = hub.registry.register("b", Default::default()).unwrap();
    let _agent_a = AgentProcess::spawn(&dir, &hub, token_a.expose(), &kubeconfig_a, "agent-a");
    let _agent_b = AgentProcess::spawn(&dir, &hub, token_b.expose(), &kubeconfig_b, "agent-b");
    hub.wait_connected(&a.id).await;
    hub.wait_connected(&b.id).await;
    let (client_a, client_b) = (hub.gateway.client(&a.id), hub.gateway.client(&b.id));

    // Each tunnel ends at its own apiserver: the kube-system namespace's uid identifies a
    // cluster (it is created once, by that cluster's apiserver).
    let uid = |client: Client| async move {
        Api::<Namespace>::all(client)
            .get("kube-system")
            .await
            .unwrap()
            .metadata
            .uid
            .unwrap()
    };
    let (uid_a, uid_b) = (uid(admin_a.clone()).await, uid(admin_b.clone()).await);
    assert_ne!(uid_a, uid_b);
    assert_eq!(uid(client_a.clone()).await, uid_a);
    assert_eq!(uid(client_b.clone()).await, uid_b);

    // Writes through one tunnel land in that cluster only.
    let ns = TestNamespace::new("two-apiservers").await;
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": ns.name}})).unwrap();
    Api::<Namespace>::all(admin_b.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    for (client, name) in [
        (&client_a, "written-through-a"),
        (&client_b, "written-through-b"),
    ] {
        Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
            .create(&PostParams::default(), &config_map(name, BTreeMap::new()))
            .await
            .unwrap();
    }
    let names = |admin: Client| {
        let ns = ns.name.clone();
        async move {
            Api::<ConfigMap>::namespaced(admin, &ns)
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|c| c.name_any())
                .filter(|n| n.starts_with("written-through"))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(names(admin_a).await, ["written-through-a"]);
    assert_eq!(names(admin_b).await, ["written-through-b"]);
}

/// A hostile agent: dials the hub with a valid token, then serves HTTP/2 on the tunnel and
/// answers the hub's `/version` probe with whatever `version_body` streams (everything else
/// with an empty 200). Counts the bytes of `/version` the hub pulled.
async fn hostile_agent(
    hub: &TestHub,
    token: &str,
    version_body: fn(usize) -> Option<bytes::Bytes>,
) -> Arc<std::sync::atomic::AtomicUsize> {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    headers.insert(
        shapeblock::tunnel::AGENT_VERSION_HEADER,
        "v0.0.0\u{1b}[31mforged"
            .parse()
            .unwrap_or_else(|_| "x".repeat(5000).parse().unwrap()),
    );
    let tls = tokio_rustls::TlsConnector::from(
        shapeblock::tunnel::tls::client_config(shapeblock::tunnel::tls::Trust::WebPki).unwrap(),
    );
    let url = format!("ws://{}{}", hub.addr, shapeblock::tunnel::CONNECT_PATH);
    let ws = shapeblock::tunnel::dial::dial(
        &url,
        headers,
        shapeblock::tunnel::dial::DialOptions {
            tls: &tls,
            websocket: Some(shapeblock::tunnel::ws_config()),
            timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let service =
        hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let counter = counter.clone();
            async move {
                let body = if request.uri().path() == "/version" {
                    let chunks = futures::stream::unfold(0usize, move |n| {
                        let counter = counter.clone();
                        async move {
                            let chunk = version_body(n)?;
                            counter.fetch_add(chunk.len(), Ordering::SeqCst);
                            Some((Ok::<_, std::convert::Infallible>(Frame::data(chunk)), n + 1))
                        }
                    });
                    BodyExt::boxed(StreamBody::new(chunks))
                } else {
                    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
                };
                let status = if request.uri().path() == shapeblock::tunnel::AGENT_PING_PATH {
                    204
                } else {
                    200
                };
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder().status(status).body(body).unwrap(),
                )
            }
        });
    let io = hyper_util::rt::TokioIo::new(shapeblock::tunnel::WsIo::new(ws));
    tokio::spawn(shapeblock::tunnel::http2::server().serve_connection(io, service));
    pulled
}

#[tokio::test]
async fn a_hostile_agent_cannot_make_the_hub_buffer_or_store_unbounded_answers() {
    let hub = TestHub::builder()
        .registry(Arc::new(Registry::in_memory()))
        .start()
        .await;

    // A 150 MB /version answer: the hub reads a bounded prefix and gives up on that tunnel.
    let (flood, token) = hub.registry.register("flood", Default::default()).unwrap();
    let pulled = hostile_agent(&hub, token.expose(), |n| {
        (n < 150 * 16).then(|| bytes::Bytes::from(vec![b' '; 64 * 1024]))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pulled = pulled.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        pulled < 4 * 1024 * 1024,
        "the hub pulled {pulled} bytes of a 150 MB /version answer"
    );
    assert!(!hub.gateway.status(&flood.id).connected);
    assert!(
        hub.registry
            .get(&flood.id)
            .unwrap()
            .kubernetes_version
            .is_none()
    );

    // A 5 MB gitVersion (a valid JSON answer): stored, listed and exported as `unknown`.
    let (huge, token) = hub
        .registry
        .register("huge-version", Default::default())
        .unwrap();
    hostile_agent(&hub, token.expose(), |n| {
        (n == 0).then(|| {
            bytes::Bytes::from(format!(
                r#"{{"gitVersion": "v1.{}"}}"#,
                "9".repeat(5_000_000)
            ))
        })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = hub.gateway.status(&huge.id);
    assert_ne!(
        status.kubernetes_version.as_deref().map(str::len),
        Some(5_000_005),
        "a 5 MB version was kept"
    );
    if status.connected {
        assert_eq!(status.kubernetes_version.as_deref(), Some("unknown"));
    }
    let metrics = hub.metrics().await;
    assert!(
        metrics.len() < 1_000_000,
        "/metrics is {} bytes",
        metrics.len()
    );
    assert!(
        !metrics.contains("forged"),
        "the agent's version header reached /metrics raw"
    );
}

/// The certificate the hub presents to a new TLS client (the end-entity's DER).
async fn served_certificate(addr: std::net::SocketAddr, ca_file: &std::path::Path) -> Vec<u8> {
    let config = shapeblock::tunnel::tls::client_config(shapeblock::tunnel::Trust::Pinned(ca_file))
        .expect("client TLS");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the hub");
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
}

/// cert-manager renews the hub's certificate in place: from the next handshake the hub presents
/// the new one, without a restart, and no tunnel drops; a broken pair written over it is
/// refused and the renewed certificate stays.
#[tokio::test]
async fn a_renewed_certificate_is_served_without_dropping_tunnels() {
    use rustls_pki_types::pem::PemObject;
    let dir = scratch_dir("tls-renewal");
    // The files TestHub's TLS reads, from a CA this test keeps, so it can renew.
    let ca = support::pki::TestCa::new("renewing-ca").unwrap();
    let ca_file = dir.join("hub-ca.crt");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    // As the kubelet updates a Secret volume: the new files appear at once, by rename.
    let install = |issued: &support::pki::Issued| {
        for (name, text) in [("hub.crt", &issued.cert_pem), ("hub.key", &issued.key_pem)] {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.join(name)).unwrap();
        }
    };
    let der = |issued: &support::pki::Issued| {
        rustls_pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
            .unwrap()
            .to_vec()
    };
    let first = ca.server(&["localhost", "127.0.0.1"]).unwrap();
    install(&first);
    let hub = TestHub::builder().tls(&dir).start().await;
    let (cluster, token) = hub
        .registry
        .register("renewed", Default::default())
        .unwrap();
    let kubeconfig = support::kubeconfig_path().await;
    let _agent = AgentProcess::spawn(&dir, &hub, token.expose(), &kubeconfig, "agent-renewed");
    hub.wait_connected(&cluster.id).await;
    let before = hub.gateway.status(&cluster.id);
    assert_eq!(served_certificate(hub.addr, &ca_file).await, der(&first));

    let renewed = ca.server(&["localhost", "127.0.0.1"]).unwrap();
    install(&renewed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while served_certificate(hub.addr, &ca_file).await != der(&renewed) {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not served within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A broken pair (a new certificate with the old key, as a renewal caught half-written) is
    // refused: the renewed certificate is still served after the next checks.
    let half = ca.server(&["localhost", "127.0.0.1"]).unwrap();
    std::fs::write(dir.join("hub.crt"), &half.cert_pem).unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(served_certificate(hub.addr, &ca_file).await, der(&renewed));

    // The tunnel opened before the renewal is the same one, and still works.
    let after = hub.gateway.status(&cluster.id);
    assert!(after.connected, "{after:?}");
    assert_eq!(
        (after.connects, after.connected_since),
        (before.connects, before.connected_since),
        "the agent reconnected during the renewal"
    );
    Api::<Namespace>::all(hub.gateway.client(&cluster.id))
        .get("kube-system")
        .await
        .expect("a request through the tunnel opened before the renewal");
}

/// A hub whose certificate is from a private CA (`agent_hub_ca_file`) embeds that CA in the
/// install manifest: a ConfigMap mounted into the agent and `--hub-ca-file` pointing at it. An
/// agent run with what the manifest says connects over wss://; without the CA it refuses the
/// hub's certificate (issue 20, item 2).
#[tokio::test]
async fn the_install_manifest_carries_the_private_hub_ca_the_agent_trusts() {
    let dir = scratch_dir("hub-ca");
    let ns = TestNamespace::new("hub-ca").await;
    let identity = agent_identity(&dir, &ns.name, "agent", None).await;
    let hub = TestHub::builder().tls(&dir).agent_hub_ca().start().await;
    let registered = hub
        .api("POST", "/api/v1/clusters", Some(json!({"name": "hub-ca"})))
        .await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let body = registered.json();
    let cluster = body["cluster"]["id"].as_str().unwrap().to_string();
    let token = body["token"].as_str().unwrap();
    let objects: Vec<serde_json::Value> = body["manifest"]
        .as_str()
        .unwrap()
        // Documents start at a line `---` (a PEM's `-----END CERTIFICATE-----` ends in `---`).
        .split("\n---\n")
        .map(|doc| doc.trim_start_matches("---\n"))
        .filter(|doc| !doc.trim().is_empty())
        .map(|doc| serde_saphyr::from_str(doc).unwrap())
        .collect();
    let config_map = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap")
        .expect("a ConfigMap with the hub's CA");
    let ca = config_map["data"]["ca.crt"].as_str().unwrap();
    let test_ca = std::fs::read_to_string(hub.ca_file.as_ref().unwrap()).unwrap();
    assert_eq!(ca, test_ca);
    let pod = &objects.last().unwrap()["spec"]["template"]["spec"];
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let after = |flag: &str| args[args.iter().position(|a| *a == flag).unwrap() + 1];
    let ca_path = after("--hub-ca-file");
    assert!(after("--hub-url").starts_with("wss://"), "{args:?}");
    // The manifest's host is the test client's Host header (`localhost`, no port): the agent
    // dials the hub's own address, under the name its certificate holds.
    let url = hub.url();
    let url = url.as_str();
    // The mount the agent reads the CA from is the ConfigMap's key.
    let mount = &pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| ca_path.starts_with(m["mountPath"].as_str().unwrap()))
        .expect("the CA file is on a mount")["name"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| &v["name"] == mount)
        .unwrap();
    assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);
    assert!(ca_path.ends_with(volume["configMap"]["items"][0]["path"].as_str().unwrap()));

    // The mounted file, as the pod sees it.
    let mounted = dir.join("mounted-ca.crt");
    std::fs::write(&mounted, ca).unwrap();
    let agent = AgentProcess::spawn_to(
        &dir,
        url,
        Some(&mounted),
        token,
        &identity.kubeconfig,
        "with-ca",
    );
    hub.wait_connected(&cluster).await;
    agent.kill().await;
    hub.wait_disconnected(&cluster).await;

    // Without the CA, the agent trusts the web's roots only, and refuses the hub.
    let agent = AgentProcess::spawn_to(&dir, url, None, token, &identity.kubeconfig, "without-ca");
    support::cluster::wait_for(
        "the agent without the CA refuses the hub's certificate",
        Duration::from_secs(30),
        async || {
            let log = agent.log_text();
            log.contains("invalid peer certificate: UnknownIssuer")
                .then_some(())
        },
    )
    .await;
    assert!(!hub.gateway.status(&cluster).connected);
    hub.stop().await;
}
