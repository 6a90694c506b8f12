//! An App's actions through the API against a hub with controllers and a connected cluster:
//! its logs (every pod, followed, new pods picked up, the apiserver's log requests gone with
//! the client) and its rollback in one call. Apart from `tests/api.rs` because a hub with
//! controllers reconciles every namespace of the shared apiserver, which the API tests' own
//! hubs must not see.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::time::{Duration, Instant};

use kube::api::Api;
use serde_json::json;
use support::hub::{ADMIN_TOKEN, TestHub, VIEWER_TOKEN};

async fn wait_for(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One hub with controllers at a time: every such hub reconciles every namespace of the
/// shared apiserver, so two would race on the same AppBuilds.
static ONE_CONTROLLING_HUB: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A pod of App `app` as its Deployment would make it (label `shapeblock.io/app`, container
/// `app`), run by kwok's fake node.
async fn app_pod(admin: &kube::Client, ns: &str, app: &str, name: &str) {
    support::cluster::running_pod(admin, ns, name, json!({"shapeblock.io/app": app})).await;
}

/// A hub with controllers and a connected cluster (`name`), a Project (`prefix`…) and in it
/// App `web` Ready: the cluster and the Project's namespace. Needs [`support::jobs`].
async fn web_project(name: &str, prefix: &str) -> (support::cluster::ConnectedCluster, String) {
    let cluster = support::cluster::connected_cluster(name).await;
    let ns = support::cluster::active_project(&cluster.admin, prefix).await;
    web_app(&cluster.admin, &ns).await;
    (cluster, ns)
}

/// App `web`, a Dockerfile App from git, Ready.
async fn web_app(admin: &kube::Client, ns: &str) {
    support::cluster::ready_app(
        admin,
        ns,
        "web",
        json!({"displayName": "Web", "git": {"url": "https://github.com/org/web.git"},
            "registry": {"url": "registry.example.com"}, "build": {"type": "dockerfile"}}),
    )
    .await;
}

#[tokio::test]
async fn app_logs_follow_every_pod_and_end_with_the_client() {
    use http_body_util::BodyExt;
    let _one = ONE_CONTROLLING_HUB.lock().await;
    support::jobs().await;
    support::write_container_log("app", &["listening on :8080", "GET / 200"]);
    let (cluster, ns) = web_project("app-logs", "logs").await;
    let admin = cluster.admin.clone();
    let hub = cluster.hub.as_ref().unwrap();
    app_pod(&admin, &ns, "web", "web-a").await;
    let logs = format!(
        "/api/v1/clusters/{}/namespaces/{ns}/apps/web/logs",
        cluster.cluster_id
    );

    // Without follow: the tail of each current pod, prefixed, and the response ends.
    let all = hub.api("GET", &logs, None).await;
    assert_eq!(all.status, 200, "{}", all.text());
    assert_eq!(
        all.text(),
        "[web-a] listening on :8080\n[web-a] GET / 200\n"
    );
    let tail = hub.api("GET", &format!("{logs}?tail=1"), None).await;
    assert_eq!(tail.text(), "[web-a] GET / 200\n");

    // Following: the current pod, then a pod that starts later, from its first line.
    let before = support::apiserver_log_requests(&admin).await;
    let (mut sender, connection) =
        support::hub::hub_connection(hub.addr, hub.ca_file.as_deref()).await;
    let request = support::hub::hub_get(&format!("{logs}?follow=true&tail=1"), ADMIN_TOKEN);
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut text = String::new();
    let mut read_until = async |text: &mut String, needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !text.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, body.frame())
                .await
                .unwrap_or_else(|_| panic!("no {needle:?} within 60 s; got {text:?}"))
                .expect("the stream ended")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
        }
    };
    read_until(&mut text, "[web-a] GET / 200\n").await;
    assert_eq!(text, "[web-a] GET / 200\n", "the tail of the running pod");
    app_pod(&admin, &ns, "web", "web-b").await;
    read_until(&mut text, "[web-b] GET / 200\n").await;
    assert!(
        text.ends_with("[web-b] listening on :8080\n[web-b] GET / 200\n"),
        "a new pod from its first line: {text:?}"
    );
    wait_for(
        "the two pods' logs followed",
        Duration::from_secs(30),
        async || support::apiserver_log_requests(&admin).await >= before + 2,
    )
    .await;
    // The client goes: every log request through the tunnel ends with it.
    drop(body);
    connection.abort();
    wait_for("the followers gone", Duration::from_secs(15), async || {
        support::apiserver_log_requests(&admin).await <= before
    })
    .await;

    // Errors in the API's shape.
    let missing = hub
        .api("GET", &logs.replace("/apps/web/", "/apps/nope/"), None)
        .await;
    assert_eq!(missing.status, 404, "{}", missing.text());
    assert_eq!(missing.json()["reason"], "NotFound");
    let too_long = hub.api("GET", &format!("{logs}?tail=100000"), None).await;
    assert_eq!(too_long.status, 400, "{}", too_long.text());
    let unknown = hub.api("GET", &format!("{logs}?since=1h"), None).await;
    assert_eq!(unknown.status, 400, "{}", unknown.text());
    assert_eq!(
        unknown.json()["reason"],
        "BadRequest",
        "JSON, like every error"
    );
}

/// Waits for an AppBuild (by its API path) to reach `phase`; fails with its status.
async fn wait_for_phase(hub: &TestHub, build: &str, phase: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = hub.api("GET", build, None).await.json()["status"].clone();
        if status["phase"] == phase {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{build} not {phase} within 60 s: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn rollback_creates_an_appbuild_and_refuses_unusable_targets() {
    let _one = ONE_CONTROLLING_HUB.lock().await;
    support::jobs().await;
    let cluster = support::cluster::connected_cluster("rollback").await;
    let admin = cluster.admin.clone();
    let hub = cluster.hub.as_ref().unwrap();
    let ns = support::cluster::active_project(&admin, "rollback").await;
    let spec = json!({"displayName": "Web", "git": {"url": "https://github.com/org/web.git"},
        "registry": {"url": "registry.example.com"}, "build": {"type": "dockerfile"}});
    support::cluster::ready_app(&admin, &ns, "web", spec.clone()).await;
    support::cluster::ready_app(&admin, &ns, "api", spec).await;
    let builds = format!(
        "/api/v1/clusters/{}/namespaces/{ns}/appbuilds",
        cluster.cluster_id
    );
    let rollback = |app: &str| {
        format!(
            "/api/v1/clusters/{}/namespaces/{ns}/apps/{app}/rollback",
            cluster.cluster_id
        )
    };
    let created = hub
        .api(
            "POST",
            &builds,
            Some(json!({"metadata": {"name": "web-1"}, "spec": {"appName": "web", "gitRef": "main"}})),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text());

    // Not Completed yet: refused, and nothing is created.
    let early = hub
        .api("POST", &rollback("web"), Some(json!({"to": "web-1"})))
        .await;
    assert_eq!(early.status, 422, "{}", early.text());
    assert!(
        early.json()["message"]
            .as_str()
            .unwrap()
            .contains("not Completed")
    );

    let sha = "4b825dc642cb6eb9a060e54bf8d69288fbee4904\n";
    let end = support::PodEnd {
        phase: "Succeeded",
        init: vec![("clone", 0, ""), ("commit", 0, sha)],
        containers: vec![("build", 0, "Completed", "")],
    };
    support::finish_job_pod(&admin, &ns, "web-1-build", end).await;
    // helm installs the shipped chart for real; the Deployment rolls out on the kwok node.
    support::cluster::helm_runs(&admin, &ns, "web-1-deploy").await;
    wait_for_phase(hub, &format!("{builds}/web-1"), "Completed").await;

    let done = hub
        .api("POST", &rollback("web"), Some(json!({"to": "web-1"})))
        .await;
    assert_eq!(done.status, 201, "{}", done.text());
    let build = done.json();
    let name = build["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("web-rollback-"), "{name}");
    assert_eq!(
        build["spec"],
        json!({"appName": "web", "rollbackTo": "web-1"})
    );
    // The controller takes it from there: the earlier image, redeployed without a build.
    support::cluster::helm_runs(&admin, &ns, &format!("{name}-deploy")).await;
    wait_for_phase(hub, &format!("{builds}/{name}"), "Completed").await;

    let other = hub
        .api("POST", &rollback("api"), Some(json!({"to": "web-1"})))
        .await;
    assert_eq!(other.status, 422, "{}", other.text());
    assert!(
        other.json()["message"]
            .as_str()
            .unwrap()
            .contains("belongs to App web")
    );
    for (path, body) in [
        (rollback("web"), json!({"to": "nope"})),
        (rollback("ghost"), json!({"to": "web-1"})),
    ] {
        let missing = hub.api("POST", &path, Some(body)).await;
        assert_eq!(missing.status, 404, "{}", missing.text());
        assert_eq!(missing.json()["reason"], "NotFound");
    }
    let bad = hub
        .api("POST", &rollback("web"), Some(json!({"to": "../x"})))
        .await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    let viewer = hub
        .api_as(
            VIEWER_TOKEN,
            "POST",
            &rollback("web"),
            Some(json!({"to": "web-1"})),
        )
        .await;
    assert_eq!(viewer.status, 403, "{}", viewer.text());
}

/// A request kept open: its connection task and response body, dropped to close it.
struct Held {
    _body: hyper::body::Incoming,
    connection: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// Opens `GET path` with `token` on a connection of its own; the status, and the open
/// request when it streams (200), or the error body.
async fn open(hub: &TestHub, path: &str, token: &str) -> (u16, Result<Held, String>) {
    use http_body_util::BodyExt;
    let (mut sender, connection) =
        support::hub::hub_connection(hub.addr, hub.ca_file.as_deref()).await;
    let response = sender
        .send_request(support::hub::hub_get(path, token))
        .await
        .unwrap();
    let status = response.status().as_u16();
    if status == 200 {
        let held = Held {
            _body: response.into_body(),
            connection,
        };
        return (status, Ok(held));
    }
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, Err(String::from_utf8_lossy(&body).into_owned()))
}

/// Opens `n` requests like [`open`]: those served, and the refusals (status, body).
async fn open_many(
    hub: &TestHub,
    path: &str,
    token: &str,
    n: usize,
) -> (Vec<Held>, Vec<(u16, String)>) {
    let (mut held, mut refused) = (Vec::new(), Vec::new());
    for _ in 0..n {
        match open(hub, path, token).await {
            (_, Ok(request)) => held.push(request),
            (status, Err(body)) => refused.push((status, body)),
        }
    }
    (held, refused)
}

#[tokio::test]
async fn log_streams_are_limited_per_token_and_per_cluster_and_the_controllers_keep_working() {
    let _one = ONE_CONTROLLING_HUB.lock().await;
    support::jobs().await;
    support::write_container_log("app", &["listening on :8080"]);
    let (cluster, ns) = web_project("log-limits", "limits").await;
    let admin = cluster.admin.clone();
    let hub = cluster.hub.as_ref().unwrap();
    app_pod(&admin, &ns, "web", "web-a").await;
    let logs = format!(
        "/api/v1/clusters/{}/namespaces/{ns}/apps/web/logs?follow=true",
        cluster.cluster_id
    );
    let before = support::apiserver_log_requests(&admin).await;

    // A viewer token opens 40 log streams: 16 (its limit) are served, the rest refused.
    let (mut held, refused) = open_many(hub, &logs, VIEWER_TOKEN, 40).await;
    assert_eq!((held.len(), refused.len()), (16, 24), "{refused:?}");
    for (status, body) in &refused {
        assert_eq!(*status, 429, "{body}");
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["reason"], "TooManyRequests", "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("this API token"),
            "{body}"
        );
    }
    // Another token gets the rest of the cluster's 32, no more.
    let (admin_held, by_cluster) = open_many(hub, &logs, ADMIN_TOKEN, 20).await;
    held.extend(admin_held);
    assert_eq!((held.len(), by_cluster.len()), (32, 4), "{by_cluster:?}");
    for (status, body) in &by_cluster {
        assert_eq!(*status, 429, "{body}");
        assert!(body.contains("long-running API requests"), "{body}");
    }
    wait_for(
        "the 32 streams followed in the apiserver",
        Duration::from_secs(30),
        async || support::apiserver_log_requests(&admin).await >= before + 32,
    )
    .await;

    // With every log stream the callers may have open, the controllers still reconcile: a
    // new Project becomes Active, and the cluster stays connected.
    support::cluster::active_project(&admin, "limits-more").await;
    assert!(hub.gateway.status(&cluster.cluster_id).connected);

    // The clients go: their streams end in the apiserver, and their places are given back.
    held.clear();
    wait_for("the followers gone", Duration::from_secs(15), async || {
        support::apiserver_log_requests(&admin).await <= before
    })
    .await;
    let (status, again) = open(hub, &logs, VIEWER_TOKEN).await;
    assert_eq!(status, 200, "{:?}", again.err());
}

#[tokio::test]
async fn a_build_log_read_without_follow_answers_while_the_build_waits_to_start() {
    let _one = ONE_CONTROLLING_HUB.lock().await;
    support::jobs().await;
    support::write_container_log("clone", &["Cloning into '/workspace/source'..."]);
    let (cluster, ns) = web_project("pending-logs", "pending").await;
    let admin = cluster.admin.clone();
    let hub = cluster.hub.as_ref().unwrap();
    Api::<shapeblock::crd::AppBuild>::namespaced(admin.clone(), &ns)
        .create(
            &Default::default(),
            &support::cluster::shapeblock(
                "AppBuild",
                "web-wait",
                json!({"appName": "web", "gitRef": "main"}),
            ),
        )
        .await
        .unwrap();
    // The clone has run; the build container waits to start (its image is being pulled).
    support::job_pod_waits(
        &admin,
        &ns,
        "web-wait-build",
        &["clone", "commit"],
        "build",
        "ContainerCreating",
        "",
    )
    .await;
    let path = format!(
        "/api/v1/clusters/{}/namespaces/{ns}/appbuilds/web-wait/logs",
        cluster.cluster_id
    );
    let response = tokio::time::timeout(Duration::from_secs(20), hub.api("GET", &path, None))
        .await
        .expect("a read without follow still waits for the build container to start");
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.text(), "Cloning into '/workspace/source'...\n");
}
