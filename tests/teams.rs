//! Teams and kubectl for people through the hub (issue 17), against the real control plane
//! with RBAC, the real agent binary and the real `kubectl` (built from the Go module proxy
//! with the control plane, `SHAPEBLOCK_TEST_BINS/kubectl`):
//!
//! - a Team becomes RoleBindings of the team roles in its projects' namespaces; a developer of
//!   team A lists pods, reads logs, follows a watch and applies an App in A's project with an
//!   issued kubeconfig, and is forbidden in project B, in `kube-system`, on Secrets and on
//!   cluster-scoped objects; a viewer reads but never Secrets;
//! - a Team edit grants and revokes access within seconds, a Team's deletion removes it;
//! - an expired or revoked token gets 401; `--as` and `exec` are refused with a clear error;
//! - the agent, asked directly as a compromised hub would, impersonates nothing but
//!   ShapeBlock users and teams;
//! - every request has an audit line; the added latency of a GET through the hub is printed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use shapeblock::crd::Team;
use support::cluster::{active_project, connected_cluster, wait_for};

const WAIT: Duration = Duration::from_secs(60);

/// One hub with controllers at a time in this binary.
static ONE_CONTROLLING_HUB: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn kubectl_bin() -> PathBuf {
    let bins = std::env::var("SHAPEBLOCK_TEST_BINS").expect(
        "SHAPEBLOCK_TEST_BINS (the control-plane cache with kubectl; .ci/run sets it) is not set",
    );
    let kubectl = PathBuf::from(bins).join("kubectl");
    assert!(
        kubectl.is_file(),
        "{} is missing: tests/control-plane/build.sh builds it",
        kubectl.display()
    );
    kubectl
}

/// What a kubectl run printed, and whether it succeeded.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs kubectl with `kubeconfig` (the hub's CA given on the command line: the test hub's
/// certificate is from a test CA).
async fn kubectl(kubeconfig: &Path, ca: &Path, args: &[&str]) -> Run {
    // Async: the hub serves on this test's runtime.
    let out = tokio::process::Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--certificate-authority")
        .arg(ca)
        .arg("--request-timeout=30s")
        .args(args)
        .env("HOME", kubeconfig.parent().unwrap())
        .output()
        .await
        .expect("run kubectl");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(run: Run, what: &str) -> String {
    assert!(run.ok, "{what} failed:\n{}\n{}", run.stdout, run.stderr);
    run.stdout
}

fn refused(run: Run, what: &str, needle: &str) -> String {
    assert!(!run.ok, "{what} should have been refused:\n{}", run.stdout);
    assert!(
        run.stderr.contains(needle),
        "{what}: expected {needle:?} in:\n{}",
        run.stderr
    );
    run.stderr
}

/// Issues a kubeconfig for `user` through the API and writes it to `dir/<name>`.
async fn issue(
    hub: &support::hub::TestHub,
    cluster: &str,
    user: &str,
    ttl: Option<u64>,
    path: &Path,
) -> Value {
    let mut body = json!({"user": user});
    if let Some(ttl) = ttl {
        body["ttlSeconds"] = ttl.into();
    }
    let response = hub
        .api(
            "POST",
            &format!("/api/v1/clusters/{cluster}/kubeconfig"),
            Some(body),
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let issued = response.json();
    // The server is the hub as the request named it (`Host: localhost`, what the test client
    // sends); kubectl reaches the test hub on its port.
    let server = format!("https://localhost/k8s/clusters/{cluster}");
    assert_eq!(issued["server"], server.as_str(), "{issued}");
    let kubeconfig = issued["kubeconfig"].as_str().unwrap().replace(
        &server,
        &format!(
            "https://localhost:{}/k8s/clusters/{cluster}",
            hub.addr.port()
        ),
    );
    std::fs::write(path, kubeconfig).unwrap();
    issued
}

async fn team(admin: &kube::Client, name: &str, members: &[&str], projects: Value) {
    let team: Team = serde_json::from_value(json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Team",
        "metadata": {"name": name}, "spec": {"members": members, "projects": projects}
    }))
    .unwrap();
    Api::<Team>::all(admin.clone())
        .patch(
            name,
            &PatchParams::apply("tests").force(),
            &Patch::Apply(&team),
        )
        .await
        .unwrap();
}

async fn bound(admin: &kube::Client, name: &str, bound: &[&str], missing: &[&str]) {
    let teams: Api<Team> = Api::all(admin.clone());
    wait_for(
        &format!("Team {name} bound in {bound:?}, missing {missing:?}"),
        WAIT,
        async || {
            let status = teams.get(name).await.ok()?.status?;
            let generation = teams.get(name).await.ok()?.metadata.generation;
            (status.bound_projects == bound
                && status.missing_projects == missing
                && status.observed_generation == generation)
                .then_some(())
        },
    )
    .await;
}

/// A pod with a container `app` (kwok runs it and serves its log).
async fn pod(admin: &kube::Client, ns: &str, name: &str) {
    support::cluster::running_pod(admin, ns, name, json!({})).await;
}

type Lines = tokio::sync::mpsc::UnboundedReceiver<String>;

/// Starts a kubectl that streams (a watch, `logs -f`); its stdout comes line by line.
fn streaming(kubeconfig: &Path, ca: &Path, args: &[&str]) -> (std::process::Child, Lines) {
    let mut child = std::process::Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--certificate-authority")
        .arg(ca)
        .args(args)
        .env("HOME", kubeconfig.parent().unwrap())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    (child, lines)
}

/// Waits until a streaming kubectl prints `line`.
async fn seen_line(lines: &mut Lines, line: &str) {
    tokio::time::timeout(WAIT, async {
        while let Some(next) = lines.recv().await {
            if next == line {
                return;
            }
        }
        panic!("the stream ended before {line:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("the stream did not show {line:?}"));
}

/// Waits until the output of `kubectl get --watch --output=name` shows pod `name`.
async fn seen(lines: &mut Lines, name: &str) {
    seen_line(lines, &format!("pod/{name}")).await
}

/// Retries kubectl until `done` holds for its run (access changes within seconds).
async fn eventually(
    what: &str,
    mut attempt: impl AsyncFnMut() -> Run,
    done: impl Fn(&Run) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let run = attempt().await;
        if done(&run) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {WAIT:?}; last run:\n{}\n{}",
            run.stdout,
            run.stderr
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_team_member_uses_kubectl_through_the_hub_with_the_rights_of_their_teams() {
    let _one = ONE_CONTROLLING_HUB.lock().await;
    support::jobs().await;
    support::write_container_log("app", &["listening on :8080", "GET / 200"]);
    let cluster = connected_cluster("teams").await;
    let admin = cluster.admin.clone();
    let hub = cluster.hub.as_ref().unwrap();
    let id = cluster.cluster_id.clone();
    let ca = hub.ca_file.clone().unwrap();
    let dir = support::hub::scratch_dir("teams-kubeconfigs");
    let a = active_project(&admin, "team-a").await;
    let b = active_project(&admin, "team-b").await;
    pod(&admin, &a, "web-1").await;
    pod(&admin, &b, "other-1").await;
    let suffix = support::random_suffix();
    let (team_a, viewers) = (format!("a-{suffix}"), format!("v-{suffix}"));
    let ghost = format!("ghost-{suffix}");
    team(
        &admin,
        &team_a,
        &["dev"],
        json!([{"project": a, "role": "developer"}, {"project": ghost, "role": "admin"}]),
    )
    .await;
    team(
        &admin,
        &viewers,
        &["watcher"],
        json!([{"project": a, "role": "viewer"}]),
    )
    .await;
    // A project that does not exist is reported, the others bound.
    bound(&admin, &team_a, &[&a], &[&ghost]).await;
    bound(&admin, &viewers, &[&a], &[]).await;
    let binding = Api::<RoleBinding>::namespaced(admin.clone(), &a)
        .get(&format!("shapeblock-team-{team_a}"))
        .await
        .unwrap();
    assert_eq!(binding.role_ref.name, "shapeblock-team-developer");

    let dev = dir.join("dev.kubeconfig");
    let issued = issue(hub, &id, "dev", None, &dev).await;
    assert!(
        issued["server"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/k8s/clusters/{id}")),
        "{issued}"
    );
    let text = std::fs::read_to_string(&dev).unwrap();
    assert!(text.contains("token: sbk_"), "{text}");
    let kc = async |args: &[&str]| kubectl(&dev, &ca, args).await;

    // The developer's project: pods, logs, a watch, an App applied and deleted.
    let pods = ok(kc(&["get", "pods", "-n", &a]).await, "get pods in A");
    assert!(pods.contains("web-1"), "{pods}");
    support::figures::report(&format!("$ kubectl -n {a} get pods\n{pods}"));
    let logs = ok(kc(&["logs", "-n", &a, "web-1"]).await, "logs in A");
    assert_eq!(logs, "listening on :8080\nGET / 200\n");
    // Followed: the lines arrive while the stream stays open, until kubectl is stopped.
    let (mut follow, mut followed) = streaming(&dev, &ca, &["logs", "-f", "-n", &a, "web-1"]);
    seen_line(&mut followed, "GET / 200").await;
    let _ = follow.kill();
    let _ = follow.wait();
    let app = dir.join("app.yaml");
    std::fs::write(
        &app,
        format!(
            "apiVersion: apps.shapeblock.io/v1alpha1\nkind: App\nmetadata:\n  name: web\n  namespace: {a}\n\
             spec:\n  displayName: Web\n  git:\n    url: https://github.com/org/web.git\n  registry:\n    url: registry.example.com\n  build:\n    type: dockerfile\n"
        ),
    )
    .unwrap();
    let applied = ok(
        kc(&["apply", "-f", app.to_str().unwrap()]).await,
        "apply an App in A",
    );
    assert!(
        applied.contains("app.apps.shapeblock.io/web created"),
        "{applied}"
    );
    let applied = ok(
        kc(&["apply", "--server-side", "-f", app.to_str().unwrap()]).await,
        "apply an App in A server-side",
    );
    assert!(applied.contains("web"), "{applied}");
    ok(
        kc(&["delete", "-f", app.to_str().unwrap()]).await,
        "delete the App",
    );
    let (mut watch, mut lines) = streaming(
        &dev,
        &ca,
        &["get", "pods", "-n", &a, "--watch", "--output=name"],
    );
    seen(&mut lines, "web-1").await;
    pod(&admin, &a, "web-2").await;
    seen(&mut lines, "web-2").await;
    let _ = watch.kill();
    let _ = watch.wait();

    // Everything else is forbidden, with the apiserver's own answer naming the user.
    let user = "User \"shapeblock:user:dev\"";
    let denied = refused(kc(&["get", "pods", "-n", &b]).await, "get pods in B", user);
    support::figures::report(&format!("$ kubectl -n {b} get pods\n{denied}"));
    refused(
        kc(&["get", "pods", "-n", "kube-system"]).await,
        "kube-system",
        user,
    );
    refused(
        kc(&["get", "secrets", "-n", &a]).await,
        "secrets as developer",
        user,
    );
    refused(kc(&["get", "namespaces"]).await, "namespaces", user);
    refused(kc(&["get", "nodes"]).await, "nodes", user);
    refused(
        kc(&["get", "clusterroles"]).await,
        "cluster-scoped RBAC",
        "forbidden",
    );
    refused(
        kc(&[
            "create",
            "rolebinding",
            "x",
            "-n",
            &a,
            "--clusterrole=admin",
            "--user=dev",
        ])
        .await,
        "RBAC in A",
        "forbidden",
    );
    // Impersonation of one's own and interactive access: refused by the hub, clearly.
    refused(
        kc(&["get", "pods", "-n", &a, "--as=system:admin"]).await,
        "--as",
        "impersonation (impersonate-user) is not allowed through the ShapeBlock hub",
    );
    refused(
        kc(&["exec", "-n", &a, "web-1", "--", "true"]).await,
        "exec",
        "exec, attach and port-forward are not available through the ShapeBlock hub",
    );

    // A viewer reads the ShapeBlock kinds and pods, never Secrets, and changes nothing.
    let watcher = dir.join("watcher.kubeconfig");
    issue(hub, &id, "watcher", None, &watcher).await;
    let vc = async |args: &[&str]| kubectl(&watcher, &ca, args).await;
    ok(vc(&["get", "pods", "-n", &a]).await, "viewer lists pods");
    ok(
        vc(&["get", "apps.apps.shapeblock.io", "-n", &a]).await,
        "viewer lists Apps",
    );
    refused(
        vc(&["get", "secrets", "-n", &a]).await,
        "viewer secrets",
        "forbidden",
    );
    refused(
        vc(&["apply", "--server-side", "-f", app.to_str().unwrap()]).await,
        "viewer applies an App",
        "forbidden",
    );

    // A Team edit grants, then revokes, within seconds.
    team(
        &admin,
        &team_a,
        &["dev"],
        json!([{"project": a, "role": "developer"}, {"project": b, "role": "admin"}]),
    )
    .await;
    let granted = Instant::now();
    eventually(
        "access to B",
        async || kc(&["get", "secrets", "-n", &b]).await,
        |r| r.ok,
    )
    .await;
    let granted = granted.elapsed();
    team(
        &admin,
        &team_a,
        &[],
        json!([{"project": a, "role": "developer"}]),
    )
    .await;
    let revoked = Instant::now();
    eventually(
        "access to B and A revoked",
        async || kc(&["get", "pods", "-n", &a]).await,
        |r| {
            !r.ok
                && r.stderr
                    .contains("Error from server (Forbidden): user dev is in no Team of cluster")
        },
    )
    .await;
    let revoked = revoked.elapsed();
    refused(
        kc(&["get", "pods", "-n", &b]).await,
        "B after the edit",
        "user dev is in no Team",
    );
    support::figures::report(&format!(
        "teams: a Team edit granted access in {} and revoked it in {} (kubectl polling every 200 ms)",
        support::figures::ms(granted),
        support::figures::ms(revoked)
    ));
    team(
        &admin,
        &team_a,
        &["dev"],
        json!([{"project": a, "role": "developer"}]),
    )
    .await;
    eventually(
        "access to A again",
        async || kc(&["get", "pods", "-n", &a]).await,
        |r| r.ok,
    )
    .await;

    // The audit trail has the developer's requests, allowed and refused.
    let audit = hub.api("GET", "/api/v1/audit?user=dev", None).await.text();
    let records: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let has = |verb: &str, resource: &str, ns: &str, code: u16| {
        records.iter().any(|r| {
            r["verb"] == verb
                && r["resource"] == resource
                && r["namespace"].as_str().unwrap_or("") == ns
                && r["code"] == code
                && r["cluster"] == id.as_str()
        })
    };
    assert!(has("list", "pods", &a, 200), "{audit}");
    assert!(has("get", "pods/log", &a, 200), "{audit}");
    assert!(has("watch", "pods", &a, 200), "{audit}");
    assert!(has("list", "pods", &b, 403), "{audit}");
    assert!(has("list", "secrets", &a, 403), "{audit}");
    assert!(has("list", "pods", &a, 403), "{audit}");
    assert!(records.iter().all(|r| r["user"] == "dev"), "{audit}");
    let metrics = hub.metrics().await;
    assert!(
        metrics.contains(&format!(
            "shapeblock_kubectl_requests_total{{cluster=\"{id}\",verb=\"list\",code=\"403\"}}"
        )),
        "{metrics}"
    );

    // Tokens: revoked → 401, expired → 401, and a fresh one works.
    let revoke = hub
        .api("DELETE", "/api/v1/users/dev/kubectl-tokens", None)
        .await;
    assert_eq!(revoke.status, 200, "{}", revoke.text());
    refused(
        kc(&["get", "pods", "-n", &a]).await,
        "revoked token",
        "You must be logged in to the server (the token was revoked",
    );
    issue(hub, &id, "dev", Some(1), &dev).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    refused(
        kc(&["get", "pods", "-n", &a]).await,
        "expired token",
        "You must be logged in to the server (the token expired",
    );
    issue(hub, &id, "dev", None, &dev).await;
    ok(kc(&["get", "pods", "-n", &a]).await, "a fresh token");

    // Added latency of a GET through the hub against the apiserver directly, as the same user.
    let direct = {
        let mut config = support::config().await;
        config.auth_info.impersonate = Some("shapeblock:user:dev".into());
        kube::Client::try_from(config).unwrap()
    };
    let token = serde_json::from_str::<Value>(
        &hub.api(
            "POST",
            &format!("/api/v1/clusters/{id}/kubeconfig"),
            Some(json!({"user": "dev"})),
        )
        .await
        .text(),
    )
    .unwrap()["kubeconfig"]
        .as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: ").map(str::to_owned))
        .unwrap();
    let path = format!("/k8s/clusters/{id}/api/v1/namespaces/{a}/pods/web-1");
    let mut through = Vec::new();
    let mut straight = Vec::new();
    let pods: Api<Pod> = Api::namespaced(direct, &a);
    pods.get("web-1").await.unwrap();
    // One kept-alive connection to the hub, as the direct client keeps one to the apiserver.
    let (mut sender, _connection) = support::hub::hub_connection(hub.addr, Some(&ca)).await;
    for _ in 0..200 {
        use http_body_util::BodyExt;
        let start = Instant::now();
        let response = sender
            .send_request(support::hub::hub_get(&path, &token))
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        through.push(start.elapsed());
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let start = Instant::now();
        pods.get("web-1").await.unwrap();
        straight.push(start.elapsed());
    }
    let (p50, p99) = (
        support::figures::percentile(&mut through, 0.5),
        support::figures::percentile(&mut through, 0.99),
    );
    let (d50, d99) = (
        support::figures::percentile(&mut straight, 0.5),
        support::figures::percentile(&mut straight, 0.99),
    );
    support::figures::report(&format!(
        "kubectl GET pod through the hub: p50 {} p99 {}; direct to the apiserver: p50 {} p99 {} \
         (200 requests each over a kept-alive connection; debug build)",
        support::figures::ms(p50),
        support::figures::ms(p99),
        support::figures::ms(d50),
        support::figures::ms(d99)
    ));

    // Deleting the Team removes its bindings; deleting a Project removes its namespace's.
    team(
        &admin,
        &viewers,
        &["watcher"],
        json!([{"project": a, "role": "viewer"}, {"project": b, "role": "viewer"}]),
    )
    .await;
    bound(&admin, &viewers, &[&a, &b], &[]).await;
    Api::<Team>::all(admin.clone())
        .delete(&team_a, &DeleteParams::default())
        .await
        .unwrap();
    let bindings_a: Api<RoleBinding> = Api::namespaced(admin.clone(), &a);
    wait_for("Team A gone with its binding", WAIT, async || {
        let team_gone = Api::<Team>::all(admin.clone())
            .get_opt(&team_a)
            .await
            .ok()?
            .is_none();
        let binding_gone = bindings_a
            .get_opt(&format!("shapeblock-team-{team_a}"))
            .await
            .ok()?
            .is_none();
        (team_gone && binding_gone).then_some(())
    })
    .await;
    refused(
        kc(&["get", "pods", "-n", &a]).await,
        "after the Team's deletion",
        "user dev is in no Team",
    );
    Api::<shapeblock::crd::Project>::all(admin.clone())
        .delete(&b, &DeleteParams::default())
        .await
        .unwrap();
    bound(&admin, &viewers, &[&a], &[&b]).await;
    let bindings_b: Api<RoleBinding> = Api::namespaced(admin.clone(), &b);
    wait_for("B's binding gone with its namespace", WAIT, async || {
        bindings_b
            .get_opt(&format!("shapeblock-team-{viewers}"))
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    Api::<Team>::all(admin.clone())
        .delete(&viewers, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn the_agent_impersonates_only_shapeblock_users_and_teams_whatever_the_hub_asks() {
    let _one = ONE_CONTROLLING_HUB.lock().await;
    let cluster = connected_cluster("impersonation").await;
    let admin = cluster.admin.clone();
    let hub = cluster.hub.as_ref().unwrap();
    // Team `web` names user `dev`: the agent may impersonate exactly them (its
    // impersonator ClusterRole, kept by the Team controller).
    team(&admin, "web", &["dev"], json!([])).await;
    bound(&admin, "web", &[], &[]).await;
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    wait_for(
        "the agent's impersonation of dev and web",
        WAIT,
        async || {
            let rules = roles
                .get("shapeblock-agent-impersonator")
                .await
                .ok()?
                .rules?;
            let names: Vec<String> = rules
                .iter()
                .flat_map(|r| r.resource_names.clone().unwrap_or_default())
                .collect();
            (names == ["shapeblock:user:dev", "shapeblock:team:web"]).then_some(())
        },
    )
    .await;
    // The hub's side of the tunnel, as a compromised hub would use it.
    let tunnel = hub.gateway.client(&cluster.cluster_id);
    let review = |headers: Vec<(&'static str, &'static str)>| {
        let tunnel = tunnel.clone();
        async move {
            let mut request =
                http::Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
                    .header("content-type", "application/json");
            for (name, value) in headers {
                request = request.header(name, value);
            }
            let body =
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"});
            let response = tunnel
                .send(
                    request
                        .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = response.status().as_u16();
            use http_body_util::BodyExt;
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap())
        }
    };
    // Acting for a person: exactly their ShapeBlock user and team names.
    let (status, answer) = review(vec![
        ("x-shapeblock-act-as-user", "dev"),
        ("x-shapeblock-act-as-team", "web"),
    ])
    .await;
    assert_eq!(status, 201, "{answer}");
    let info = &answer["status"]["userInfo"];
    assert_eq!(info["username"], "shapeblock:user:dev", "{answer}");
    let groups: Vec<&str> = info["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap())
        .collect();
    assert_eq!(
        groups,
        ["shapeblock:team:web", "system:authenticated"],
        "{answer}"
    );
    // Without act-as headers the agent is itself.
    let (_, answer) = review(vec![]).await;
    assert_eq!(
        answer["status"]["userInfo"]["username"],
        "system:serviceaccount:shapeblock-agent:shapeblock-agent"
    );
    // A well-formed user no Team names: the agent asks, and its own rights refuse it (it
    // may impersonate only the people Teams name).
    let (status, answer) = review(vec![("x-shapeblock-act-as-user", "mallory")]).await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("cannot impersonate resource \"users\""),
        "{answer}"
    );
    let (status, answer) = review(vec![
        ("x-shapeblock-act-as-user", "dev"),
        ("x-shapeblock-act-as-team", "ops"),
    ])
    .await;
    assert_eq!(status, 403, "a team no Team is: {answer}");
    // Whatever else a hub asks is refused by the agent before it reaches the apiserver.
    for headers in [
        vec![("impersonate-user", "system:admin")],
        vec![("impersonate-user", "shapeblock:user:dev")],
        vec![("impersonate-group", "system:masters")],
        vec![
            ("x-shapeblock-act-as-user", "dev"),
            ("impersonate-group", "system:masters"),
        ],
        vec![
            ("x-shapeblock-act-as-user", "dev"),
            ("impersonate-uid", "0"),
        ],
        vec![
            ("x-shapeblock-act-as-user", "dev"),
            ("impersonate-extra-scopes", "all"),
        ],
        vec![("x-shapeblock-act-as-user", "system:admin")],
        vec![
            ("x-shapeblock-act-as-user", "dev"),
            ("x-shapeblock-act-as-team", "system:masters"),
        ],
        vec![("x-shapeblock-act-as-team", "web")],
        vec![
            ("x-shapeblock-act-as-user", "dev"),
            ("x-shapeblock-act-as-user", "ops"),
        ],
    ] {
        let (status, answer) = review(headers.clone()).await;
        assert_eq!(status, 403, "{headers:?}: {answer}");
        assert_eq!(answer["kind"], "Status", "{headers:?}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .starts_with("the ShapeBlock agent "),
            "{headers:?}: {answer}"
        );
    }

    // Even the agent's own token (a compromised agent) impersonates only the people Teams
    // name, and cannot widen that.
    let dir = support::hub::scratch_dir("impersonation-agent");
    let agent_kubeconfig =
        support::hub::service_account_kubeconfig(&dir, "shapeblock-agent", "shapeblock-agent")
            .await;
    let as_agent = |user: &str| {
        let path = agent_kubeconfig.clone();
        let user = user.to_string();
        async move {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).unwrap();
            let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .unwrap();
            config.auth_info.impersonate = Some(user);
            kube::Client::try_from(config).unwrap()
        }
    };
    let namespaces = |client: kube::Client| async move {
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
            .list(&Default::default())
            .await
    };
    for user in ["system:admin", "shapeblock:user:mallory"] {
        match namespaces(as_agent(user).await).await {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 403, "{user}: {e:?}");
                assert!(
                    e.message.contains("cannot impersonate"),
                    "{user}: {}",
                    e.message
                );
            }
            other => panic!("the agent's token impersonated {user}: {other:?}"),
        }
    }
    // dev may be impersonated, and can do nothing Teams do not grant.
    match namespaces(as_agent("shapeblock:user:dev").await).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{e:?}");
            assert!(
                e.message
                    .contains("User \"shapeblock:user:dev\" cannot list"),
                "{}",
                e.message
            );
        }
        other => panic!("dev listed namespaces: {other:?}"),
    }
    let kubeconfig = kube::config::Kubeconfig::read_from(&agent_kubeconfig).unwrap();
    let agent = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let widened = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "shapeblock-agent-impersonator"},
        "rules": [{"apiGroups": [""], "resources": ["users"], "verbs": ["impersonate"],
                   "resourceNames": ["shapeblock:user:dev", "system:admin"]}]
    });
    match Api::<ClusterRole>::all(agent.clone())
        .patch(
            "shapeblock-agent-impersonator",
            &PatchParams::apply("compromised").force(),
            &Patch::Apply(&widened),
        )
        .await
    {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{e:?}");
            assert!(
                e.message.contains("ValidatingAdmissionPolicy")
                    && e.message
                        .contains("the ShapeBlock agent changes only ClusterRole"),
                "{}",
                e.message
            );
        }
        other => panic!("the agent widened its impersonation: {other:?}"),
    }
    let every_name = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "shapeblock-agent-impersonator"},
        "rules": [{"apiGroups": [""], "resources": ["users"], "verbs": ["impersonate"]}]
    });
    assert!(
        Api::<ClusterRole>::all(agent.clone())
            .patch(
                "shapeblock-agent-impersonator",
                &PatchParams::apply("compromised").force(),
                &Patch::Apply(&every_name),
            )
            .await
            .is_err(),
        "the agent made its impersonation cover every user"
    );
    // Nor any other ClusterRole.
    let admin_role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "shapeblock-team-viewer"},
        "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]
    });
    assert!(
        Api::<ClusterRole>::all(agent)
            .patch(
                "shapeblock-team-viewer",
                &PatchParams::apply("compromised").force(),
                &Patch::Apply(&admin_role),
            )
            .await
            .is_err(),
        "the agent rewrote a team role"
    );
    Api::<Team>::all(admin)
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
}

/// A cluster whose agent was installed from a manifest older than Teams (its ClusterRole may
/// not patch the Team CRD): everything else is reconciled as before, and Teams wait.
#[tokio::test]
async fn an_agent_installed_before_teams_keeps_working_without_them() {
    let _one = ONE_CONTROLLING_HUB.lock().await;
    let mut cluster = connected_cluster("before-teams").await;
    let admin = cluster.admin.clone();
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let mut role = roles.get("shapeblock-agent").await.unwrap();
    for rule in role.rules.iter_mut().flatten() {
        if let Some(names) = rule.resource_names.as_mut() {
            names.retain(|n| n != "teams.apps.shapeblock.io");
        }
    }
    role.metadata.managed_fields = None;
    roles
        .replace("shapeblock-agent", &PostParams::default(), &role)
        .await
        .unwrap();
    // The hub installs the CRDs again when it starts: the Team CRD is refused.
    cluster.restart_hub().await;
    let project = active_project(&admin, "before-teams").await;
    assert!(!project.is_empty());
}
