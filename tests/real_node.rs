//! The end-to-end tier: the hub and agent binaries against a real node (kubelet, containerd,
//! runc, kube-proxy, a TLS registry, a git daemon; see `test_support::real_node`). Every Job
//! the hub renders runs for real here: git clones, kaniko builds and pushes, helm deploys the
//! built-in chart, the kubelet pulls and runs the image, and the test reads the app's answer
//! over HTTP. The kwok tier (the other test binaries) proves the failure paths quickly; this
//! one proves that what the hub renders works with the real tools.
//!
//! The figures it prints (clone, build, push, deploy, AppBuild created to app answering) are
//! measurements, not assertions.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use shapeblock::crd::{App, AppBuild, AppBuildPhase, RuntimeState};
use shapeblock::render::agent::{AgentManifestParams, agent_manifest};
use support::cluster::{active_project, shapeblock, wait_build_within, wait_for};
use support::hub::{AgentProcess, scratch_dir, service_account_kubeconfig};
use support::hub_process::{HubProcess, HubSettings, Pki};
use support::process::{free_port, sibling_binary};
use support::real_node::{self, BASE_IMAGE, REGISTRY, RealNode};

const ADMIN_TOKEN: &str = "real-node-admin-token-0123456789";

/// The hub binary with Jobs that run the node's images, and one agent connecting the node.
struct Fleet {
    _hub: HubProcess,
    _agent: AgentProcess,
    admin: Client,
}

async fn fleet(node: &RealNode) -> Fleet {
    let admin = support::client().await;
    let dir = scratch_dir("real-node-hub");
    let pki = Pki::create(&dir);
    let port = free_port();
    let hub = HubProcess::start(
        &HubSettings {
            binary: sibling_binary("shapeblock-hub"),
            dir: dir.clone(),
            port,
            relay_url: String::new(),
            admin_token: ADMIN_TOKEN.into(),
            extra: "jobs:\n  git_image: shapeblock.test/git:1\n  \
                    kaniko_image: shapeblock.test/kaniko:v1.24.0\n  \
                    helm_image: shapeblock.test/helm:1\n  helm_timeout_seconds: 120\n"
                .into(),
        },
        &pki,
    )
    .await;
    let (cluster, token) = hub.api.register("real-node").await;
    let hub_url = format!("wss://127.0.0.1:{port}");
    for object in agent_manifest(&AgentManifestParams {
        cluster_id: cluster.clone(),
        hub_url: hub_url.clone(),
        image: "shapeblock-agent:test".into(),
        token: "unused".into(),
    })
    .iter()
    .filter(|o| o["kind"] != "Deployment")
    {
        support::apply_object(&admin, object, "default", false).await;
    }
    // The registry Secret every Project copies: the node's registry takes any credentials.
    let _ = Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "shapeblock"}})).unwrap(),
        )
        .await;
    let auth = json!({"auths": {REGISTRY: {"auth": "dGVzdDp0ZXN0"}}}).to_string();
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("registry-creds".into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(auth.into_bytes()),
        )])),
        ..Default::default()
    };
    let _ = Api::<Secret>::namespaced(admin.clone(), "shapeblock")
        .create(&PostParams::default(), &secret)
        .await;
    let kubeconfig = service_account_kubeconfig(&dir, "shapeblock-agent", "shapeblock-agent").await;
    let agent = AgentProcess::spawn_to(
        &dir,
        &hub_url,
        Some(&pki.ca_file),
        &token,
        &kubeconfig,
        "agent",
    );
    let _ = node;
    wait_for(
        "the agent connected and the hub installed the CRDs",
        Duration::from_secs(60),
        async || {
            Api::<App>::all(admin.clone())
                .list(&Default::default())
                .await
                .ok()
        },
    )
    .await;
    Fleet {
        _hub: hub,
        _agent: agent,
        admin,
    }
}

/// Waits until the app's Service answers `path` with a body containing `needle`; returns the
/// body.
async fn answers(
    node: &RealNode,
    admin: &Client,
    ns: &str,
    app: &str,
    path: &str,
    needle: &str,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last = match node.http_get(admin, ns, app, path).await {
            Ok((_, body)) if body.contains(needle) => return body,
            Ok((status, body)) => format!("HTTP {status}: {body}"),
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "{app} did not answer {path} with {needle:?} within 120 s; last answer: {last}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Start and end of the build pod's containers, from their statuses: (clone, build) seconds.
async fn step_seconds(admin: &Client, ns: &str, build: &str) -> (f64, f64) {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let selector = format!("batch.kubernetes.io/job-name={build}-build");
    let pod = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
        .into_iter()
        .next();
    let Some(status) = pod.and_then(|p| p.status) else {
        return (f64::NAN, f64::NAN);
    };
    let span = |s: &k8s_openapi::api::core::v1::ContainerStatus| {
        let t = s.state.as_ref()?.terminated.as_ref()?;
        let start = t.started_at.as_ref()?.0;
        let end = t.finished_at.as_ref()?.0;
        Some(end.duration_since(start).as_secs_f64())
    };
    let clone = status
        .init_container_statuses
        .iter()
        .flatten()
        .filter_map(span)
        .sum();
    let build = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == "build")
        .and_then(span)
        .unwrap_or(f64::NAN);
    (clone, build)
}

fn dockerfile_app(greeting: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "Dockerfile",
            format!(
                "FROM {BASE_IMAGE}\nWORKDIR /workspace\nCOPY . .\nUSER 10001\n\
                 CMD [\"httpd\", \"-f\", \"-v\", \"-p\", \"8080\", \"-h\", \"/workspace/www\"]\n"
            )
            .into_bytes(),
        ),
        ("www/index.html", format!("{greeting}\n").into_bytes()),
    ]
}

fn files<'a>(list: &'a [(&'static str, Vec<u8>)]) -> Vec<(&'static str, &'a [u8])> {
    list.iter().map(|(p, c)| (*p, c.as_slice())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dockerfile_app_is_built_from_git_deployed_and_answers_http() {
    let node = real_node::node().await;
    let fleet = fleet(node).await;
    let admin = &fleet.admin;
    let ns = active_project(admin, "shop").await;

    let repo = node.git_repo("shop");
    let first = repo.commit(
        "first",
        &files(&dockerfile_app("hello from the first commit")),
    );
    let apps: Api<App> = Api::namespaced(admin.clone(), &ns);
    apps.create(
        &PostParams::default(),
        &shapeblock(
            "App",
            "web",
            json!({"displayName": "Web", "git": {"url": repo.url, "branch": "main"},
                "registry": {"url": REGISTRY}, "build": {"type": "dockerfile"}}),
        ),
    )
    .await
    .unwrap();
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    let created = Instant::now();
    builds
        .create(
            &PostParams::default(),
            &shapeblock(
                "AppBuild",
                "web-1",
                json!({"appName": "web", "gitRef": "main"}),
            ),
        )
        .await
        .unwrap();
    let status = wait_build_within(
        &builds,
        "web-1",
        AppBuildPhase::Completed,
        Duration::from_secs(600),
    )
    .await;
    let completed = created.elapsed();
    let body = answers(node, admin, &ns, "web", "/", "hello from the first commit").await;
    let answering = created.elapsed();
    assert_eq!(body.trim(), "hello from the first commit");
    let image = status.image.clone().expect("status.image");
    assert!(
        image.starts_with(&format!("{REGISTRY}/{ns}/web")) && image.contains("@sha256:"),
        "the deployed image is the pushed digest: {image}"
    );
    wait_for("App runtime Running", Duration::from_secs(60), async || {
        let app = apps.get("web").await.ok()?;
        let runtime = app.status?.runtime?;
        (runtime.state == RuntimeState::Running).then_some(())
    })
    .await;
    let (clone, build) = step_seconds(admin, &ns, "web-1").await;
    eprintln!(
        "figures (real node, this machine): clone {clone:.1} s, build + push {build:.1} s, \
         AppBuild created -> Completed {:.1} s, -> app answering HTTP {:.1} s",
        completed.as_secs_f64(),
        answering.as_secs_f64()
    );
    assert_eq!(status.git_commit.as_deref(), Some(first.as_str()));
}
