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
use shapeblock::crd::{App, AppBuild, AppBuildPhase, AppBuildStatus, RuntimeState};
use shapeblock::render::agent::{AgentManifestParams, agent_manifest};
use support::cluster::{active_project, shapeblock, wait_build_within, wait_for};
use support::hub::{AgentProcess, scratch_dir, service_account_kubeconfig};
use support::hub_process::{HubProcess, HubSettings, Pki};
use support::process::{free_port, sibling_binary};
use support::real_node::{self, BASE_IMAGE, REGISTRY, RealNode};

const ADMIN_TOKEN: &str = "real-node-admin-token-0123456789";

/// The hub binary with Jobs that run the node's images, and one agent connecting the node:
/// one per test binary (a second hub on the same cluster would fight the first).
struct Fleet {
    node: &'static RealNode,
    _hub: HubProcess,
    _agent: AgentProcess,
}

static FLEET: tokio::sync::OnceCell<Fleet> = tokio::sync::OnceCell::const_new();
/// Builds share two cores: one scenario at a time keeps the figures readable.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn fleet() -> (&'static RealNode, Client) {
    let fleet = FLEET.get_or_init(start_fleet).await;
    (fleet.node, support::client().await)
}

async fn start_fleet() -> Fleet {
    let node = real_node::node().await;
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
        registry_namespace: "shapeblock".into(),
        registry_secret: "registry-creds".into(),
        hub_ca: None,
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
        node,
        _hub: hub,
        _agent: agent,
    }
}

/// Creates AppBuild `name` with `spec` and waits (up to `wait`) until it reaches `phase`.
async fn build_ends(
    builds: &Api<AppBuild>,
    name: &str,
    spec: serde_json::Value,
    phase: AppBuildPhase,
    wait: Duration,
) -> AppBuildStatus {
    builds
        .create(&PostParams::default(), &shapeblock("AppBuild", name, spec))
        .await
        .unwrap();
    wait_build_within(builds, name, phase, wait).await
}

/// Creates AppBuild `name` with `spec` and waits (up to 10 minutes) until it Completed.
async fn completed(builds: &Api<AppBuild>, name: &str, spec: serde_json::Value) -> AppBuildStatus {
    build_ends(
        builds,
        name,
        spec,
        AppBuildPhase::Completed,
        Duration::from_secs(600),
    )
    .await
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

/// Seconds (the kubelet's timestamps have whole seconds) of the clone (pod start to the
/// build container's start: the git containers) and of the build and push (the build
/// container's run), from the build pod's status.
async fn build_pod_seconds(admin: &Client, ns: &str, build: &str) -> (i64, i64) {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let selector = format!("batch.kubernetes.io/job-name={build}-build");
    let status = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
        .into_iter()
        .next()
        .and_then(|p| p.status)
        .expect("the build pod's status");
    let pod_start = status.start_time.as_ref().expect("pod start").0;
    let build = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == "build")
        .and_then(|c| c.state.as_ref()?.terminated.clone())
        .expect("the build container's end");
    let started = build.started_at.expect("build start").0;
    let finished = build.finished_at.expect("build end").0;
    (
        started.duration_since(pod_start).as_secs(),
        finished.duration_since(started).as_secs(),
    )
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

/// Creates a dockerfile App `name` building from `repo`, pushing to the node's registry.
async fn dockerfile_app_object(admin: &Client, ns: &str, name: &str, url: &str) -> Api<App> {
    let apps: Api<App> = Api::namespaced(admin.clone(), ns);
    apps.create(
        &PostParams::default(),
        &shapeblock(
            "App",
            name,
            json!({"displayName": name, "git": {"url": url, "branch": "main"},
                "registry": {"url": REGISTRY}, "build": {"type": "dockerfile"}}),
        ),
    )
    .await
    .unwrap();
    apps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dockerfile_app_is_built_from_git_deployed_and_answers_http() {
    let (node, admin) = fleet().await;
    let _serial = SERIAL.lock().await;
    let admin = &admin;
    let ns = active_project(admin, "shop").await;
    let repo = node.git_repo("shop");
    let first = repo.commit(
        "first",
        &files(&dockerfile_app("hello from the first commit")),
    );
    let apps = dockerfile_app_object(admin, &ns, "web", &repo.url).await;
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);

    let created = Instant::now();
    let status = completed(&builds, "web-1", json!({"appName": "web", "gitRef": first})).await;
    let completed_after = created.elapsed();
    let body = answers(node, admin, &ns, "web", "/", "hello from the first commit").await;
    let answering = created.elapsed();
    assert_eq!(body.trim(), "hello from the first commit");
    let image = status.image.clone().expect("status.image");
    assert!(
        image.starts_with(&format!("{REGISTRY}/{ns}/web")) && image.contains("@sha256:"),
        "the deployed image is the pushed digest: {image}"
    );
    assert_eq!(status.git_commit.as_deref(), Some(first.as_str()));
    wait_for("App runtime Running", Duration::from_secs(60), async || {
        let runtime = apps.get("web").await.ok()?.status?.runtime?;
        (runtime.state == RuntimeState::Running).then_some(())
    })
    .await;
    let (clone, build) = build_pod_seconds(admin, &ns, "web-1").await;
    let seconds = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.as_ref().expect("a status time").0.as_second()
    };
    let deploy = seconds(&status.completion_time) - seconds(&status.build_end_time);
    support::figures::report(&format!(
        "figures (real node, this machine): clone {clone} s, build + push {build} s, \
         deploy {deploy} s (whole seconds); AppBuild created -> Completed {:.1} s, \
         -> app answering HTTP {:.1} s",
        completed_after.as_secs_f64(),
        answering.as_secs_f64()
    ));

    // A new commit rolls out and serves its content.
    let second = repo.commit(
        "second",
        &files(&dockerfile_app("hello from the second commit")),
    );
    let rolled = Instant::now();
    let second_status = completed(
        &builds,
        "web-2",
        json!({"appName": "web", "gitRef": second}),
    )
    .await;
    answers(node, admin, &ns, "web", "/", "hello from the second commit").await;
    support::figures::report(&format!(
        "figures: a new commit built, rolled out and answering after {:.1} s",
        rolled.elapsed().as_secs_f64()
    ));
    // The same commit again: no build, the image of web-2.
    let reused = completed(
        &builds,
        "web-3",
        json!({"appName": "web", "gitRef": second}),
    )
    .await;
    assert_eq!(
        reused.image, second_status.image,
        "web-3 reuses web-2's image"
    );
    let built = reused.conditions.iter().find(|c| c.type_ == "Built");
    assert!(
        built.is_some_and(|c| c.reason == "Reused" && c.message.contains("web-2")),
        "web-3 says it reused web-2: {reused:#?}"
    );
    let web3_jobs = Api::<k8s_openapi::api::batch::v1::Job>::namespaced(admin.clone(), &ns)
        .get_opt("web-3-build")
        .await
        .unwrap();
    assert!(web3_jobs.is_none(), "a reused build runs no build Job");
    // A rollback serves the first commit's content again.
    completed(
        &builds,
        "web-4",
        json!({"appName": "web", "rollbackTo": "web-1"}),
    )
    .await;
    answers(node, admin, &ns, "web", "/", "hello from the first commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_exits_at_start_is_down_with_its_own_last_words() {
    let (node, admin) = fleet().await;
    let _serial = SERIAL.lock().await;
    let admin = &admin;
    let ns = active_project(admin, "crash").await;
    let repo = node.git_repo("crash");
    let commit = repo.commit(
        "exits",
        &[(
            "Dockerfile",
            format!(
                "FROM {BASE_IMAGE}\nUSER 10001\n\
                 CMD [\"sh\", \"-c\", \"echo 'fatal: DATABASE_URL is not set'; exit 3\"]\n"
            )
            .as_bytes(),
        )],
    );
    let apps = dockerfile_app_object(admin, &ns, "api", &repo.url).await;
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    let failed = build_ends(
        &builds,
        "api-1",
        json!({"appName": "api", "gitRef": commit}),
        AppBuildPhase::Failed,
        Duration::from_secs(600),
    )
    .await;
    let message = failed.message.clone().unwrap_or_default();
    assert!(
        message.contains("CrashLoopBackOff") && message.contains("DATABASE_URL is not set"),
        "the build fails with the app's crash and its last output: {failed:#?}"
    );
    let runtime = wait_for("App runtime Down", Duration::from_secs(120), async || {
        let runtime = apps.get("api").await.ok()?.status?.runtime?;
        (runtime.state == RuntimeState::Down).then_some(runtime)
    })
    .await;
    let said = format!("{runtime:?}");
    assert!(
        said.contains("CrashLoopBackOff") && said.contains("DATABASE_URL is not set"),
        "App status.runtime names the crash and the app's last output: {runtime:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_cannot_be_pulled_fails_the_deploy_quickly() {
    let (_node, admin) = fleet().await;
    let _serial = SERIAL.lock().await;
    let admin = &admin;
    let ns = active_project(admin, "pull").await;
    let apps: Api<App> = Api::namespaced(admin.clone(), &ns);
    apps.create(
        &PostParams::default(),
        &shapeblock(
            "App",
            "ghost",
            json!({"displayName": "Ghost", "registry": {},
                "build": {"type": "image", "image": format!("{REGISTRY}/nobody/ghost:1.0")}}),
        ),
    )
    .await
    .unwrap();
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    let started = Instant::now();
    let failed = build_ends(
        &builds,
        "ghost-1",
        json!({"appName": "ghost"}),
        AppBuildPhase::Failed,
        Duration::from_secs(300),
    )
    .await;
    let message = failed.message.clone().unwrap_or_default();
    assert!(
        message.contains("ImagePullBackOff") || message.contains("ErrImagePull"),
        "the deploy fails with the pull error: {failed:#?}"
    );
    support::figures::report(&format!(
        "figures: an unpullable image failed its deploy after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
}

/// A small chart for a ShapeBlock Service: a web server that says `greeting` (restricted pod
/// security, so it runs in any namespace).
fn greeter_chart(dir: &std::path::Path) {
    let templates = dir.join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(
        dir.join("Chart.yaml"),
        "apiVersion: v2\nname: greeter\nversion: 0.1.0\n",
    )
    .unwrap();
    std::fs::write(dir.join("values.yaml"), "greeting: hello\n").unwrap();
    std::fs::write(
        templates.join("greeter.yaml"),
        format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: "{{{{ .Release.Name }}}}"}}
spec:
  selector: {{matchLabels: {{greeter: "{{{{ .Release.Name }}}}"}}}}
  template:
    metadata: {{labels: {{greeter: "{{{{ .Release.Name }}}}"}}}}
    spec:
      securityContext: {{runAsNonRoot: true, runAsUser: 10001, seccompProfile: {{type: RuntimeDefault}}}}
      containers:
      - name: web
        image: {BASE_IMAGE}
        command: ["sh", "-c", 'mkdir -p /tmp/www && echo "$GREETING" > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www']
        env: [{{name: GREETING, value: {{{{ .Values.greeting | quote }}}}}}]
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{tcpSocket: {{port: http}}, periodSeconds: 1}}
        securityContext: {{allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: "{{{{ .Release.Name }}}}"}}
spec:
  selector: {{greeter: "{{{{ .Release.Name }}}}"}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"#
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_chart_is_installed_upgraded_and_uninstalled_for_real() {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::{DeleteParams, Patch, PatchParams};
    use shapeblock::crd::{Service, ServicePhase};
    let (node, admin) = fleet().await;
    let _serial = SERIAL.lock().await;
    let admin = &admin;
    let ns = active_project(admin, "svc").await;
    let chart = scratch_dir("greeter-chart").join("greeter");
    greeter_chart(&chart);
    let repository = node.push_chart(&chart);
    let services: Api<Service> = Api::namespaced(admin.clone(), &ns);
    services
        .create(
            &PostParams::default(),
            &shapeblock(
                "Service",
                "greeter",
                json!({"chart": {"name": "greeter", "version": "0.1.0", "repoURL": repository},
                    "helmValues": {"greeting": "hello from the first values"}}),
            ),
        )
        .await
        .unwrap();
    let deployed = async |generation: i64| {
        wait_for("Service Deployed", Duration::from_secs(300), async || {
            let status = services.get("greeter").await.ok()?.status?;
            assert_ne!(
                status.phase,
                Some(ServicePhase::Failed),
                "the Service failed: {status:#?}"
            );
            (status.phase == Some(ServicePhase::Deployed)
                && status.observed_generation == Some(generation))
            .then_some(())
        })
        .await
    };
    deployed(1).await;
    let answer = async |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let last = match node.http_get(admin, &ns, "greeter", "/").await {
                Ok((_, body)) if body.contains(needle) => return,
                Ok((status, body)) => format!("HTTP {status}: {body}"),
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "the greeter did not say {needle:?}; last answer: {last}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    answer("hello from the first values").await;

    services
        .patch(
            "greeter",
            &PatchParams::default(),
            &Patch::Merge(
                &json!({"spec": {"helmValues": {"greeting": "hello after the upgrade"}}}),
            ),
        )
        .await
        .unwrap();
    deployed(2).await;
    answer("hello after the upgrade").await;

    services
        .delete("greeter", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("Service gone", Duration::from_secs(300), async || {
        services
            .get_opt("greeter")
            .await
            .ok()
            .and_then(|s| s.is_none().then_some(()))
    })
    .await;
    let left = Api::<Deployment>::namespaced(admin.clone(), &ns)
        .get_opt("greeter")
        .await
        .unwrap();
    assert!(
        left.is_none_or(|d| d.metadata.deletion_timestamp.is_some()),
        "helm uninstall removed the release's Deployment"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_enforces_restricted_pod_security_where_a_namespace_does_not_choose() {
    use kube::ResourceExt;
    let (_node, admin) = fleet().await;
    let plain = support::TestNamespace::new("plain").await;
    let root_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "root"},
        "spec": {"containers": [{"name": "c", "image": BASE_IMAGE,
            "securityContext": {"runAsUser": 0}}]}
    }))
    .unwrap();
    let refused = Api::<Pod>::namespaced(admin.clone(), &plain.name)
        .create(&PostParams::default(), &root_pod)
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.message.contains("violates PodSecurity")),
        "an unlabelled namespace refuses a root pod: {refused:?}"
    );
    // A Project's namespace chooses baseline, so its build pods (kaniko runs as root) run:
    // the build tests above are the proof; here, the label itself.
    let ns = active_project(&admin, "psa").await;
    let namespace = Api::<Namespace>::all(admin.clone()).get(&ns).await.unwrap();
    assert_eq!(
        namespace
            .labels()
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("baseline")
    );
}

/// An ed25519 key pair made by the host's ssh-keygen in `dir`: (private key file, public
/// key line without its comment).
fn ssh_host_key(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    let key = dir.join(name);
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(key.with_extension("pub"));
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen");
    assert!(made.status.success(), "ssh-keygen: {made:?}");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let public = public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    (key, public)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_repositories_clone_over_ssh_with_the_deploy_key_and_over_https_with_credentials() {
    let (node, admin) = fleet().await;
    let _serial = SERIAL.lock().await;
    let admin = &admin;
    let ns = active_project(admin, "private").await;
    let repo = node.git_repo("private");
    let commit = repo.commit(
        "private",
        &files(&dockerfile_app("hello from a private repository")),
    );
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    let apps: Api<App> = Api::namespaced(admin.clone(), &ns);

    // SSH: sshd (Debian's) in the node, the App's generated deploy key as the only key it
    // accepts (git-shell only), its host key pinned in the App.
    let dir = scratch_dir("sshd");
    let (host_key, host_public) = ssh_host_key(&dir, "host_key");
    let known_hosts = format!("[{}]:2222 {host_public}", real_node::NODE_ADDRESS);
    let url = format!(
        "ssh://root@{}:2222{}",
        real_node::NODE_ADDRESS,
        repo.dir.display()
    );
    let app = |name: &str, url: &str, known_hosts: &str| {
        shapeblock::<App>(
            "App",
            name,
            json!({"displayName": name,
                "git": {"url": url, "branch": "main", "isPrivate": true, "knownHosts": known_hosts},
                "registry": {"url": REGISTRY}, "build": {"type": "dockerfile"}}),
        )
    };
    apps.create(&PostParams::default(), &app("bysh", &url, &known_hosts))
        .await
        .unwrap();
    let deploy_key = wait_for(
        "the App's deploy key",
        Duration::from_secs(60),
        async || apps.get("bysh").await.ok()?.status?.deploy_key,
    )
    .await;
    let authorized = dir.join("authorized_keys");
    std::fs::write(
        &authorized,
        format!("restrict,command=\"git-shell -c \\\"$SSH_ORIGINAL_COMMAND\\\"\" {deploy_key}\n"),
    )
    .unwrap();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress {}:2222\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
             PermitRootLogin forced-commands-only\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n",
            real_node::NODE_ADDRESS,
            host_key.display(),
            authorized.display(),
            dir.join("sshd.pid").display()
        ),
    )
    .unwrap();
    let sshd = node.spawn_in_node(
        "sshd",
        std::path::Path::new("/bin/sh"),
        &[
            "-c",
            "mkdir -p /run/sshd && chmod 0755 /run/sshd && exec /usr/sbin/sshd -D -e -f \"$0\"",
            config.to_str().unwrap(),
        ],
    );
    node.wait_listening(&format!("{}:2222", real_node::NODE_ADDRESS), &sshd)
        .await;
    completed(
        &builds,
        "bysh-1",
        json!({"appName": "bysh", "gitRef": commit}),
    )
    .await;
    answers(
        node,
        admin,
        &ns,
        "bysh",
        "/",
        "hello from a private repository",
    )
    .await;

    // A host key other than the pinned one: the clone refuses, and says what to do.
    let (_, other_public) = ssh_host_key(&dir, "other_key");
    let wrong = format!("[{}]:2222 {other_public}", real_node::NODE_ADDRESS);
    apps.create(&PostParams::default(), &app("spoofed", &url, &wrong))
        .await
        .unwrap();
    wait_for(
        "the second deploy key",
        Duration::from_secs(60),
        async || apps.get("spoofed").await.ok()?.status?.deploy_key,
    )
    .await;
    let failed = build_ends(
        &builds,
        "spoofed-1",
        json!({"appName": "spoofed", "gitRef": commit}),
        AppBuildPhase::Failed,
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(
        failed.reason.as_deref(),
        Some("GitCloneFailed"),
        "{failed:#?}"
    );
    assert!(
        failed
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("spec.git.knownHosts"),
        "the failure says to pin the host key: {failed:#?}"
    );
    drop(sshd);

    // HTTPS with a username and password from a Secret, to a server that refuses without.
    let images = &node.images;
    let https = node.spawn_in_node(
        "git-https",
        std::path::Path::new("/usr/bin/python3"),
        &[
            support::process::repository()
                .join("tests/real-node/git-https.py")
                .to_str()
                .unwrap(),
            node.dir.join("git").to_str().unwrap(),
            real_node::NODE_ADDRESS,
            "8443",
            images.join("registry.crt").to_str().unwrap(),
            images.join("registry.key").to_str().unwrap(),
            "deployer",
            "s3cret-password",
        ],
    );
    node.wait_listening(&format!("{}:8443", real_node::NODE_ADDRESS), &https)
        .await;
    let credentials = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("git-creds".into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([
            ("username".to_string(), "deployer".to_string()),
            ("password".to_string(), "s3cret-password".to_string()),
            // The host (and port) git names to the credential helper: the only one it answers.
            (
                "host".to_string(),
                format!("{}:8443", real_node::NODE_ADDRESS),
            ),
        ])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &credentials)
        .await
        .unwrap();
    apps.create(
        &PostParams::default(),
        &shapeblock(
            "App",
            "byhttps",
            json!({"displayName": "byhttps",
                "git": {"url": format!("https://{}:8443/private", real_node::NODE_ADDRESS),
                    "branch": "main", "isPrivate": true, "secretName": "git-creds"},
                "registry": {"url": REGISTRY}, "build": {"type": "dockerfile"}}),
        ),
    )
    .await
    .unwrap();
    completed(
        &builds,
        "byhttps-1",
        json!({"appName": "byhttps", "gitRef": commit}),
    )
    .await;
    answers(
        node,
        admin,
        &ns,
        "byhttps",
        "/",
        "hello from a private repository",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buildpack_app_is_built_by_the_test_builder_with_its_build_vars() {
    let (node, admin) = fleet().await;
    let _serial = SERIAL.lock().await;
    let admin = &admin;
    let ns = active_project(admin, "cnb").await;
    let repo = node.git_repo("cnb");
    let commit = repo.commit(
        "static site",
        &[(
            "www/index.html",
            b"hello from a buildpack build\n".as_slice(),
        )],
    );
    let apps: Api<App> = Api::namespaced(admin.clone(), &ns);
    apps.create(
        &PostParams::default(),
        &shapeblock(
            "App",
            "site",
            json!({"displayName": "Site", "git": {"url": repo.url, "branch": "main"},
                "registry": {"url": REGISTRY},
                "build": {"type": "buildpack", "builderImage": "shapeblock.test/builder:1"}}),
        ),
    )
    .await
    .unwrap();
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    let created = Instant::now();
    let status = completed(
        &builds,
        "site-1",
        json!({"appName": "site", "gitRef": commit,
            "buildVars": [{"key": "GREETING", "value": "hello from a build var"}]}),
    )
    .await;
    answers(
        node,
        admin,
        &ns,
        "site",
        "/",
        "hello from a buildpack build",
    )
    .await;
    answers(
        node,
        admin,
        &ns,
        "site",
        "/greeting.txt",
        "hello from a build var",
    )
    .await;
    // The lifecycle dropped to the builder's own user (1002), not a uid the hub assumed.
    answers(
        node,
        admin,
        &ns,
        "site",
        "/builder.txt",
        "built by 1002:1000",
    )
    .await;
    let image = status.image.clone().expect("status.image");
    assert!(
        image.contains("@sha256:"),
        "the digest from the lifecycle's report is deployed: {image}"
    );
    support::figures::report(&format!(
        "figures: buildpack AppBuild created -> app answering HTTP {:.1} s",
        created.elapsed().as_secs_f64()
    ));
}
