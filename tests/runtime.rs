//! An App's runtime health (`status.runtime`) reconciled by the hub through the tunnel, against
//! the real control plane: the App's Deployment is the first-party chart's, rendered by the real
//! helm binary; kube-controller-manager runs its ReplicaSets, kube-scheduler places its pods on
//! the kwok node and kwok starts them. The test then plays the kubelet: it writes the pods'
//! container states (crash loops with exit codes and termination messages, OOM kills, image
//! pulls that fail) and the scheduler's verdict comes from the real scheduler (a request no node
//! can hold). kwok leaves a Running pod's status alone (its only later stage is for Job pods),
//! so what the test writes stays until it writes again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use shapeblock::crd::{App, RuntimeState, RuntimeStatus};
use support::cluster::{active_project, connected_cluster, ready_app, wait_for};

const WAIT: Duration = Duration::from_secs(60);
const V1: &str = "registry.example.com/shop/web:v1";
const V2: &str = "registry.example.com/shop/web:v2";

/// The helm binary built by tests/control-plane/build.sh (no helm, no test: it fails).
fn helm() -> PathBuf {
    let dir = std::env::var("SHAPEBLOCK_TEST_BINS")
        .expect("SHAPEBLOCK_TEST_BINS must name the directory tests/control-plane/build.sh prints");
    let helm = PathBuf::from(dir).join("helm");
    assert!(helm.exists(), "helm not found at {}", helm.display());
    helm
}

/// The Deployment the first-party chart renders for App `web` with these values.
fn chart_deployment(ns: &str, values: &[&str]) -> Value {
    let chart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/shapeblock-app");
    let mut args = vec![
        "template".to_string(),
        "web".into(),
        chart.display().to_string(),
        "--namespace".into(),
        ns.into(),
        "--set".into(),
        "app=web".into(),
    ];
    for value in values {
        args.extend(["--set".to_string(), value.to_string()]);
    }
    let out = Command::new(helm()).args(&args).output().expect("run helm");
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    yaml.split("\n---")
        .map(|d| d.trim_start_matches("---"))
        .filter_map(|doc| serde_saphyr::from_str::<Value>(doc).ok())
        .find(|doc| doc["kind"] == "Deployment")
        .expect("the chart renders a Deployment")
}

async fn runtime(apps: &Api<App>) -> Option<RuntimeStatus> {
    apps.get_opt("web").await.ok()??.status?.runtime
}

/// Waits until `status.runtime` has this state and reason; returns it.
async fn wait_runtime(
    apps: &Api<App>,
    state: RuntimeState,
    reason: Option<&str>,
    and: impl Fn(&RuntimeStatus) -> bool,
) -> RuntimeStatus {
    let what = format!("App web runtime {state:?} {reason:?}");
    let last: Mutex<Option<RuntimeStatus>> = Mutex::new(None);
    let found = tokio::time::timeout(
        WAIT,
        wait_for(&what, WAIT + Duration::from_secs(1), async || {
            let status = runtime(apps).await?;
            *last.lock().unwrap() = Some(status.clone());
            (status.state == state && status.reason.as_deref() == reason && and(&status))
                .then_some(status)
        }),
    )
    .await;
    match found {
        Ok(status) => status,
        Err(_) => panic!("{what} not reached within {WAIT:?}; last seen: {last:#?}"),
    }
}

/// The App's pods, oldest name first; waits until `count` of them run `image`.
async fn running_pods(pods: &Api<Pod>, image: &str, count: usize) -> Vec<String> {
    wait_for(
        &format!("{count} running pods of {image}"),
        WAIT,
        async || {
            let list = pods
                .list(&ListParams::default().labels("shapeblock.io/app=web"))
                .await
                .ok()?;
            let mut names: Vec<String> = list
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .filter(|p| p.spec.as_ref().unwrap().containers[0].image.as_deref() == Some(image))
                .map(|p| p.name_any())
                .collect();
            names.sort();
            (names.len() == count).then_some(names)
        },
    )
    .await
}

/// A relayed runtime transition: state and reason.
type Transition = (RuntimeState, Option<String>);

/// What the kubelet reports of the `app` container.
enum Kubelet<'a> {
    Ready,
    /// Waiting with this reason and message; the last termination (exit code, reason, message).
    Waiting(&'a str, &'a str, Option<(i32, &'a str, &'a str)>, i32),
}

/// Writes a pod's status as the kubelet would.
async fn kubelet_writes(pods: &Api<Pod>, pod: &str, image: &str, state: Kubelet<'_>) {
    let now = jiff::Timestamp::now().to_string();
    let condition = |type_: &str, ok: bool| {
        json!({"type": type_, "status": if ok { "True" } else { "False" },
            "lastTransitionTime": now})
    };
    let (ready, container) = match state {
        Kubelet::Ready => (
            true,
            json!({"name": "app", "image": image, "imageID": "", "ready": true,
                "restartCount": 0, "started": true, "state": {"running": {"startedAt": now}}}),
        ),
        Kubelet::Waiting(reason, message, last, restarts) => {
            let last_state = match last {
                Some((code, reason, message)) => json!({"terminated": {"exitCode": code,
                    "reason": reason, "message": message, "startedAt": now, "finishedAt": now}}),
                None => json!({}),
            };
            (
                false,
                json!({"name": "app", "image": image, "imageID": "", "ready": false,
                    "restartCount": restarts, "started": false,
                    "state": {"waiting": {"reason": reason, "message": message}},
                    "lastState": last_state}),
            )
        }
    };
    let status = json!({"status": {"phase": "Running", "conditions": [
        condition("PodScheduled", true), condition("Initialized", true),
        condition("Ready", ready), condition("ContainersReady", ready)],
        "containerStatuses": [container]}});
    pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("writing the status of pod {pod}: {e}"));
}

/// The Events on App `web`: (type, reason, note).
async fn app_events(admin: &Client, ns: &str) -> Vec<(String, String, String)> {
    use k8s_openapi::api::events::v1::Event;
    Api::<Event>::namespaced(admin.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("App")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web")
        })
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn health_states_and_reasons_follow_the_pods_as_the_kubelet_reports_them() {
    support::jobs().await;
    let cluster = connected_cluster("runtime").await;
    let admin = cluster.admin.clone();
    // Every App event the hub relays, from now on.
    let relayed: Arc<Mutex<Vec<Transition>>> = Arc::default();
    {
        let mut live = cluster.hub.as_ref().unwrap().journal.subscribe();
        let relayed = relayed.clone();
        tokio::spawn(async move {
            while let Ok(event) = live.recv().await {
                if event.resource_type == Some("App")
                    && event.name == "web"
                    && let Some(runtime) = &event.runtime
                {
                    relayed
                        .lock()
                        .unwrap()
                        .push((runtime.state, runtime.reason.clone()));
                }
            }
        });
    }
    let ns = active_project(&admin, "runtime").await;
    let apps = ready_app(
        &admin,
        &ns,
        "web",
        json!({"displayName": "Web", "registry": {"url": "registry.example.com"},
            "build": {"type": "image", "image": V1},
            "run": {"replicas": 2, "domains": [{"host": "web.example.com"}]}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);

    // Nothing deployed yet.
    let status = wait_runtime(&apps, RuntimeState::NotDeployed, None, |_| true).await;
    assert!(
        status.urls.is_empty() && status.image.is_none(),
        "{status:?}"
    );

    // The chart's Deployment; kwok starts both pods: Running, with the URL (no TLS issuer in
    // the test hub's configuration, so http).
    let deployment = chart_deployment(&ns, &[&format!("image={V1}"), "replicas=2"]);
    support::apply_object(&admin, &deployment, &ns, false).await;
    let status = wait_runtime(&apps, RuntimeState::Running, None, |r| {
        r.ready_replicas == 2
    })
    .await;
    assert_eq!(
        (
            status.desired_replicas,
            status.updated_replicas,
            status.available_replicas
        ),
        (2, 2, 2)
    );
    assert_eq!(status.urls, ["http://web.example.com"]);
    assert_eq!(status.image.as_deref(), Some(V1));
    assert_eq!(status.restarts, 0);
    let running_since = status.last_transition_time.clone().unwrap();
    let [a, b]: [String; 2] = running_pods(&pods, V1, 2).await.try_into().unwrap();

    // One pod crash-loops: Degraded, with the exit code and the last termination message.
    // (A second later, so the transition time, in whole seconds, visibly moves.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let crash = Kubelet::Waiting(
        "CrashLoopBackOff",
        "back-off 40s restarting failed container=app",
        Some((3, "Error", "Error: DATABASE_URL is not set")),
        4,
    );
    kubelet_writes(&pods, &a, V1, crash).await;
    let status = wait_runtime(
        &apps,
        RuntimeState::Degraded,
        Some("CrashLoopBackOff"),
        |r| r.ready_replicas == 1,
    )
    .await;
    let message = status.message.clone().unwrap();
    assert!(message.contains("exit code 3"), "{message}");
    assert!(
        message.contains("Error: DATABASE_URL is not set"),
        "{message}"
    );
    assert!(message.contains(&a), "names the pod: {message}");
    assert!(
        message.contains("1 of 2 current pods"),
        "says how many: {message}"
    );
    assert_eq!(status.restarts, 4);
    assert!(status.last_transition_time.unwrap() > running_since);

    // Both crash: Down.
    let crash = Kubelet::Waiting(
        "CrashLoopBackOff",
        "back-off 40s restarting failed container=app",
        Some((3, "Error", "Error: DATABASE_URL is not set")),
        2,
    );
    kubelet_writes(&pods, &b, V1, crash).await;
    let status = wait_runtime(&apps, RuntimeState::Down, Some("CrashLoopBackOff"), |r| {
        r.ready_replicas == 0
    })
    .await;
    assert!(
        status
            .message
            .as_deref()
            .unwrap()
            .contains("2 of 2 current pods"),
        "{status:?}"
    );
    assert_eq!(status.restarts, 6);

    // One recovers, the other is killed for its memory: Degraded, OOMKilled.
    kubelet_writes(&pods, &b, V1, Kubelet::Ready).await;
    let oom = Kubelet::Waiting(
        "CrashLoopBackOff",
        "back-off 10s restarting failed container=app",
        Some((137, "OOMKilled", "")),
        5,
    );
    kubelet_writes(&pods, &a, V1, oom).await;
    let status = wait_runtime(&apps, RuntimeState::Degraded, Some("OOMKilled"), |_| true).await;
    assert!(
        status.message.as_deref().unwrap().contains("exit code 137"),
        "{status:?}"
    );

    // The image cannot be pulled: ErrImagePull on one pod, then ImagePullBackOff on the other
    // (both fatal and one each: ImagePullBackOff, the kubelet's later verdict, is told).
    kubelet_writes(&pods, &a, V1, Kubelet::Ready).await;
    let err_pull = Kubelet::Waiting(
        "ErrImagePull",
        "failed to pull and unpack image: 401 Unauthorized",
        None,
        0,
    );
    kubelet_writes(&pods, &b, V1, err_pull).await;
    let status = wait_runtime(&apps, RuntimeState::Degraded, Some("ErrImagePull"), |_| {
        true
    })
    .await;
    assert!(
        status
            .message
            .as_deref()
            .unwrap()
            .contains("401 Unauthorized"),
        "{status:?}"
    );
    let pulling = format!("Back-off pulling image \"{V1}\"");
    let back_off = Kubelet::Waiting("ImagePullBackOff", &pulling, None, 0);
    kubelet_writes(&pods, &a, V1, back_off).await;
    wait_runtime(&apps, RuntimeState::Down, Some("ImagePullBackOff"), |_| {
        true
    })
    .await;

    // Recovered: Running again.
    kubelet_writes(&pods, &a, V1, Kubelet::Ready).await;
    kubelet_writes(&pods, &b, V1, Kubelet::Ready).await;
    wait_runtime(&apps, RuntimeState::Running, None, |r| {
        r.ready_replicas == 2
    })
    .await;

    // A new version no node can hold: the scheduler says Unschedulable, the old replicas keep
    // serving (maxUnavailable 0), so Degraded, about the new image only.
    let deployment = chart_deployment(
        &ns,
        &[
            &format!("image={V2}"),
            "replicas=2",
            "resources.requests.cpu=1000",
        ],
    );
    support::apply_object(&admin, &deployment, &ns, false).await;
    let status = wait_runtime(&apps, RuntimeState::Degraded, Some("Unschedulable"), |_| {
        true
    })
    .await;
    assert_eq!(status.image.as_deref(), Some(V2));
    assert_eq!(status.ready_replicas, 2, "the old replicas serve");
    assert!(
        status
            .message
            .as_deref()
            .unwrap()
            .contains("Insufficient cpu"),
        "{status:?}"
    );

    // Back to a version that fits: Running on it.
    let deployment = chart_deployment(&ns, &[&format!("image={V2}"), "replicas=2"]);
    support::apply_object(&admin, &deployment, &ns, false).await;
    let status = wait_runtime(&apps, RuntimeState::Running, None, |r| {
        r.ready_replicas == 2 && r.updated_replicas == 2 && r.available_replicas == 2
    })
    .await;
    assert_eq!(status.image.as_deref(), Some(V2));

    // Every transition was published as an Event: Warnings named by the reason, with the
    // message, and Normal ones when it ran.
    let wanted = [
        ("Normal", "Running"),
        ("Warning", "CrashLoopBackOff"),
        ("Warning", "OOMKilled"),
        ("Warning", "ErrImagePull"),
        ("Warning", "ImagePullBackOff"),
        ("Warning", "Unschedulable"),
    ];
    let events = wait_for("the runtime Events", WAIT, async || {
        let events = app_events(&admin, &ns).await;
        wanted
            .iter()
            .all(|(t, r)| events.iter().any(|(et, er, _)| et == t && er == r))
            .then_some(events)
    })
    .await;
    let crash = events
        .iter()
        .find(|(_, reason, _)| reason == "CrashLoopBackOff")
        .unwrap();
    assert!(crash.2.contains("exit code 3"), "{crash:?}");
    assert!(
        !events.iter().any(|(_, reason, _)| reason == "NotDeployed"),
        "the first look at an undeployed App is no transition: {events:?}"
    );

    // And every change of state or reason reached the relay, in order, each once.
    let expected = [
        "Running/-",
        "Degraded/CrashLoopBackOff",
        "Down/CrashLoopBackOff",
        "Degraded/OOMKilled",
        "Degraded/ErrImagePull",
        "Down/ImagePullBackOff",
        "Running/-",
        "Degraded/Unschedulable",
        "Running/-",
    ];
    let seen = || -> Vec<String> {
        relayed
            .lock()
            .unwrap()
            .iter()
            .map(|(state, reason)| format!("{state:?}/{}", reason.as_deref().unwrap_or("-")))
            .collect()
    };
    // Whether `expected` is a subsequence of what was relayed (transient states between the
    // steps, such as Progressing, may come in between).
    let in_order = |relayed: &[String]| {
        let mut at = 0;
        for transition in relayed {
            if at < expected.len() && *transition == expected[at] {
                at += 1;
            }
        }
        at == expected.len()
    };
    let last: Mutex<Vec<String>> = Mutex::default();
    let relayed_in_order = tokio::time::timeout(WAIT, async {
        loop {
            let now = seen();
            if in_order(&now) {
                return now;
            }
            *last.lock().unwrap() = now;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "relayed {:?}, wanted {expected:?} in order",
            last.lock().unwrap()
        )
    });
    assert!(
        relayed_in_order.windows(2).all(|w| w[0] != w[1]),
        "a transition is relayed once, not at each restart: {relayed_in_order:?}"
    );
}
