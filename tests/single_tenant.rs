//! Single tenant on a real node (issue 20, items 1 and 9): the hub chart with
//! `localCluster.enabled`, installed by the real `helm install`, runs the hub and its agent as
//! real pods from images of the static musl binaries (`SHAPEBLOCK_MUSL_HUB`,
//! `SHAPEBLOCK_MUSL_AGENT`, which `.ci/run` builds before the tests), and then, through the
//! in-pod hub's API only, as a user would: registry credentials, a Project, a Dockerfile App
//! from git and an AppBuild of its branch; the kubelet runs the clone, kaniko and Helm Jobs, and
//! the app answers HTTP through its Service. `tests/local_cluster.rs` proves the chart's
//! objects in the kwok tier; this is the same chart with nothing stood in for.
//!
//! The node has no cluster DNS, so, as the README says for such a cluster, the agent is given
//! the hub Service's ClusterIP (`localCluster.hubAddress`) by a `helm upgrade`. The node has no
//! Ingress controller either: the API is called at the Service's address from inside the node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use shapeblock_test_support as support;
use support::cluster::wait_for;
use support::hub::scratch_dir;
use support::real_node::{BASE_IMAGE, REGISTRY, RealNode};

const RELEASE: &str = "shapeblock-hub";
const NAMESPACE: &str = "shapeblock";
const HUB_IMAGE: &str = "shapeblock.test/shapeblock-hub";
const AGENT_IMAGE: &str = "shapeblock.test/shapeblock-agent";
/// The tag the chart defaults to: its appVersion, the crate's version.
const TAG: &str = env!("CARGO_PKG_VERSION");

fn musl_binary(variable: &str) -> PathBuf {
    let path = std::env::var(variable).unwrap_or_else(|_| {
        panic!(
            "{variable} is not set: the static musl binary the pod's image is made of \
             (.ci/run builds it before the tests and sets it)"
        )
    });
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "{variable}={} does not exist",
        path.display()
    );
    path
}

fn run(command: &mut Command, what: &str) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An image of one static binary (entrypoint `/<name>`, user 65532), imported into the node's
/// containerd under `reference`.
fn import_image(node: &RealNode, dir: &Path, binary: &Path, reference: &str) {
    let name = binary.file_name().unwrap().to_str().unwrap();
    let rootfs = dir.join(format!("{name}-rootfs"));
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::copy(binary, rootfs.join(name)).unwrap();
    let tar = dir.join(format!("{name}.tar"));
    let script = support::process::repository().join("tests/real-node/oci-image.py");
    run(
        Command::new("python3")
            .arg(script)
            .arg(&rootfs)
            .arg(&tar)
            .arg(reference)
            .args(["--entrypoint", &format!("[\"/{name}\"]"), "--user", "65532"]),
        "writing the image",
    );
    let socket = node.dir.join("containerd.sock");
    node.run_in_node(
        Path::new("ctr"),
        &[
            "--address",
            socket.to_str().unwrap(),
            "-n",
            "k8s.io",
            "images",
            "import",
            tar.to_str().unwrap(),
        ],
    );
}

/// The in-pod hub's API, called from inside the node (as a pod or the Ingress would).
struct HubApi<'a> {
    node: &'a RealNode,
    base: String,
    token: String,
}

impl HubApi<'_> {
    /// (status, body as JSON, or as a string when it is not JSON); status 0 when the hub
    /// could not be reached (not listening yet).
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let auth = format!("Authorization: Bearer {}", self.token);
        let body = body.map(|b| b.to_string());
        let mut args = vec![
            "-sS",
            "--max-time",
            "30",
            "-X",
            method,
            "-H",
            &auth,
            "-H",
            "content-type: application/json",
            "-w",
            "\n%{http_code}",
        ];
        if let Some(body) = &body {
            args.extend(["--data-binary", body]);
        }
        args.push(&url);
        // Failures name no argument: one of them is the admin token.
        let out = match self.node.try_run_in_node(Path::new("curl"), &args) {
            Ok(out) => out,
            Err(why) => return (0, Value::String(why)),
        };
        let (text, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
        let code: u16 = code.parse().unwrap_or_else(|_| panic!("curl said {out}"));
        let value = serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.into()));
        (code, value)
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (code, value) = self.call(method, path, body);
        assert!(
            (200..300).contains(&code),
            "{method} {path}: {code} {value}"
        );
        value
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_helm_install_runs_shapeblock_and_a_dockerfile_app_answers() {
    let hub_binary = musl_binary("SHAPEBLOCK_MUSL_HUB");
    let agent_binary = musl_binary("SHAPEBLOCK_MUSL_AGENT");
    let node = support::real_node::node().await;
    let admin = support::client().await;
    let dir = scratch_dir("single-tenant");
    import_image(node, &dir, &hub_binary, &format!("{HUB_IMAGE}:{TAG}"));
    import_image(node, &dir, &agent_binary, &format!("{AGENT_IMAGE}:{TAG}"));

    // The README's single-tenant install, with this node's images, no volume provisioner and
    // the Jobs' images of the real-node tier.
    let chart = support::process::repository().join("charts/shapeblock-hub");
    let started = Instant::now();
    support::helm(
        &node.kubeconfig,
        &[
            "install",
            RELEASE,
            chart.to_str().unwrap(),
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--set",
            "localCluster.enabled=true,ingress.host=hub.example.com,persistence.enabled=false",
            "--set",
            &format!(
                "image.repository={HUB_IMAGE},localCluster.agentImage.repository={AGENT_IMAGE}"
            ),
            "--set",
            "config.jobs.git_image=shapeblock.test/git:1,config.jobs.kaniko_image=shapeblock.test/kaniko:v1.24.0,\
             config.jobs.helm_image=shapeblock.test/helm:1,config.jobs.helm_timeout_seconds=120",
        ],
    );
    let services: Api<Service> = Api::namespaced(admin.clone(), NAMESPACE);
    let cluster_ip = services
        .get(RELEASE)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("the hub Service's ClusterIP");
    // No cluster DNS on this node: the agent dials the ClusterIP.
    support::helm(
        &node.kubeconfig,
        &[
            "upgrade",
            RELEASE,
            chart.to_str().unwrap(),
            "--namespace",
            NAMESPACE,
            "--reuse-values",
            "--set",
            &format!("localCluster.hubAddress={cluster_ip}:8080"),
        ],
    );
    let secret = Api::<Secret>::namespaced(admin.clone(), NAMESPACE)
        .get(RELEASE)
        .await
        .unwrap();
    let token = String::from_utf8(secret.data.unwrap()["admin-token"].0.clone()).unwrap();
    let hub = HubApi {
        node,
        base: format!("http://{cluster_ip}:8080"),
        token,
    };

    // Both pods run the images; the local cluster connects with no API call.
    let pods: Api<Pod> = Api::all(admin.clone());
    let local = wait_for(
        "the local cluster connected through the agent's pod",
        Duration::from_secs(180),
        async || {
            let (code, clusters) = hub.call("GET", "/api/v1/clusters", None);
            let local = clusters.as_array()?.first()?.clone();
            (code == 200 && local["status"]["connected"] == true).then_some(local)
        },
    )
    .await;
    support::figures::report(&format!(
        "single tenant: helm install to the local cluster connected {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let images: Vec<String> = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|p| p.spec.as_ref()?.containers.first()?.image.clone())
        .collect();
    assert!(
        images.contains(&format!("{HUB_IMAGE}:{TAG}"))
            && images.contains(&format!("{AGENT_IMAGE}:{TAG}")),
        "the hub and the agent run as pods: {images:?}"
    );
    assert_eq!(local["name"], "local");
    assert_eq!(local["local"], true);
    let id = local["id"].as_str().unwrap().to_string();
    let cluster = format!("/api/v1/clusters/{id}");
    let upgrade = wait_for(
        "the local agent read",
        Duration::from_secs(30),
        async || {
            let upgrade = hub.ok("GET", &cluster, None)["agentUpgrade"].clone();
            (!upgrade.is_null()).then_some(upgrade)
        },
    )
    .await;
    assert_eq!(upgrade["state"], "Pinned", "{upgrade}");
    assert_eq!(upgrade["image"], format!("{AGENT_IMAGE}:{TAG}"));

    // What a user does next, through the API only.
    let credentials = hub.ok(
        "PUT",
        &format!("{cluster}/registry-credentials"),
        Some(json!({"server": REGISTRY, "username": "ci", "password": "registry-password"})),
    );
    assert_eq!(credentials["set"], true, "{credentials}");
    wait_for(
        "the ShapeBlock kinds served in the local cluster",
        Duration::from_secs(60),
        async || (hub.call("GET", &format!("{cluster}/projects"), None).0 == 200).then_some(()),
    )
    .await;
    hub.ok(
        "POST",
        &format!("{cluster}/projects"),
        Some(
            json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
                    "metadata": {"name": "shop"}, "spec": {"displayName": "Shop"}}),
        ),
    );
    wait_for("Project shop Active", Duration::from_secs(60), async || {
        let project = hub.ok("GET", &format!("{cluster}/projects/shop"), None);
        (project["status"]["phase"] == "Active").then_some(())
    })
    .await;
    let repo = node.git_repo("single-tenant");
    let commit = repo.commit(
        "first",
        &[
            (
                "Dockerfile",
                format!(
                    "FROM {BASE_IMAGE}\nWORKDIR /workspace\nCOPY . .\nUSER 10001\n\
                     CMD [\"httpd\", \"-f\", \"-v\", \"-p\", \"8080\", \"-h\", \"/workspace/www\"]\n"
                )
                .as_bytes(),
            ),
            ("www/index.html", b"hello from a single-tenant ShapeBlock\n"),
        ],
    );
    let ns = format!("{cluster}/namespaces/shop");
    hub.ok(
        "POST",
        &format!("{ns}/apps"),
        Some(
            json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App",
                    "metadata": {"name": "web"},
                    "spec": {"displayName": "Web", "git": {"url": repo.url, "branch": "main"},
                             "registry": {"url": REGISTRY}, "build": {"type": "dockerfile"}}}),
        ),
    );
    // No gitRef: the App's branch is built.
    let build_started = Instant::now();
    hub.ok(
        "POST",
        &format!("{ns}/appbuilds"),
        Some(
            json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
                    "metadata": {"name": "web-1"}, "spec": {"appName": "web"}}),
        ),
    );
    let status = wait_for(
        "AppBuild web-1 finished",
        Duration::from_secs(300),
        async || {
            let build = hub.ok("GET", &format!("{ns}/appbuilds/web-1"), None);
            let status = build["status"].clone();
            matches!(status["phase"].as_str(), Some("Completed" | "Failed")).then_some(status)
        },
    )
    .await;
    assert_eq!(status["phase"], "Completed", "{status}");
    assert_eq!(status["gitCommit"], commit.as_str());
    let built = build_started.elapsed();
    let log = hub.ok("GET", &format!("{ns}/appbuilds/web-1/logs"), None);
    let log = log.as_str().unwrap_or_default();
    assert!(log.contains("Pushed"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "the build log has no colour codes: {log}"
    );

    // The app answers through its Service (the apiserver's service proxy, from inside the node).
    let body = wait_for(
        "the app answering",
        Duration::from_secs(60),
        async || match node.http_get(&admin, "shop", "web", "/").await {
            Ok((200, body)) => Some(body),
            _ => None,
        },
    )
    .await;
    assert_eq!(body.trim(), "hello from a single-tenant ShapeBlock");
    let app = hub.ok("GET", &format!("{ns}/apps/web"), None);
    assert_eq!(app["status"]["runtime"]["state"], "Running", "{app}");
    support::figures::report(&format!(
        "single tenant (real node, this machine): AppBuild created -> Completed {:.1} s, \
         -> app answering HTTP {:.1} s",
        built.as_secs_f64(),
        build_started.elapsed().as_secs_f64()
    ));
}
