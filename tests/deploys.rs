//! Deploys of Apps that run, through the tunnel against the real control plane: the deploy
//! Job's helm runs for real ([`support::run_helm_job`]: its own argv, the shipped chart laid out
//! from its ConfigMap, its values Secret, as the project's deployer), the Deployment rolls out
//! on the kwok node, and the AppBuild is Completed only then. Covered: a release that runs
//! no Deployment of the image (`DeployedNothing`), releases on a `spec.run` change, rollback
//! to an earlier build's exact image and values, and the bounded build history.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use shapeblock::crd::{App, AppBuild, AppBuildPhase, AppBuildStatus};
use shapeblock::render::app::AppSettings;
use support::cluster::{
    active_project, connected_cluster, connected_cluster_with, helm_runs, ready_app, shapeblock,
    wait_build, wait_for, wait_job,
};
use support::{PodEnd, finish_job_pod};

const WAIT: Duration = Duration::from_secs(60);
const IMAGE: &str = "registry.example.com:5000/team/web";

/// Creates an AppBuild, runs its deploy Job's helm for real and waits for `Completed`.
async fn deploy(
    admin: &Client,
    ns: &str,
    builds: &Api<AppBuild>,
    name: &str,
    spec: Value,
) -> AppBuildStatus {
    builds
        .create(&PostParams::default(), &shapeblock("AppBuild", name, spec))
        .await
        .unwrap();
    helm_runs(admin, ns, &format!("{name}-deploy")).await;
    wait_build(builds, name, AppBuildPhase::Completed).await
}

async fn deployment(admin: &Client, ns: &str, name: &str) -> Deployment {
    Api::<Deployment>::namespaced(admin.clone(), ns)
        .get(name)
        .await
        .unwrap()
}

fn app_container(d: &Deployment) -> k8s_openapi::api::core::v1::Container {
    d.spec.clone().unwrap().template.spec.unwrap().containers[0].clone()
}

async fn values_of(admin: &Client, ns: &str, build: &str) -> Value {
    let secret = Api::<Secret>::namespaced(admin.clone(), ns)
        .get(&format!("{build}-values"))
        .await
        .unwrap();
    serde_json::from_slice(&secret.data.unwrap()["values.yaml"].0).unwrap()
}

fn image_app(tag: &str) -> Value {
    json!({"displayName": "Web", "registry": {},
        "build": {"type": "image", "image": format!("{IMAGE}:{tag}")}})
}

#[tokio::test]
async fn a_release_that_runs_no_deployment_of_the_image_deployed_nothing() {
    support::jobs().await;
    let cluster = connected_cluster("deployed-nothing").await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "nothing").await;
    ready_app(&admin, &ns, "web", image_app("1.0")).await;
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);

    // helm reports success, but the release holds nothing (a chart whose values define no
    // workload, as nxs-universal-chart without `deployments:`).
    builds
        .create(
            &PostParams::default(),
            &shapeblock("AppBuild", "web-1", json!({"appName": "web"})),
        )
        .await
        .unwrap();
    wait_job(&admin, &ns, "web-1-deploy").await;
    finish_job_pod(
        &admin,
        &ns,
        "web-1-deploy",
        PodEnd {
            phase: "Succeeded",
            init: vec![],
            containers: vec![("helm", 0, "Completed", "")],
        },
    )
    .await;
    let status = wait_build(&builds, "web-1", AppBuildPhase::Failed).await;
    assert_eq!(status.reason.as_deref(), Some("DeployedNothing"));
    let message = status.message.unwrap();
    assert!(message.contains("holds no Deployment at all"), "{message}");
    assert!(message.contains(&format!("{IMAGE}:1.0")), "{message}");
    let deployed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Deployed")
        .unwrap();
    assert_eq!(
        (deployed.status.as_str(), deployed.reason.as_str()),
        ("False", "DeployedNothing")
    );

    // helm really installs the shipped chart, but helmValues swap the image: the release runs
    // a Deployment, not of the image the build is about.
    builds
        .create(
            &PostParams::default(),
            &shapeblock("AppBuild", "web-2",
                json!({"appName": "web", "helmValues": {"image": "registry.example.com:5000/team/other:9"}})),
        )
        .await
        .unwrap();
    helm_runs(&admin, &ns, "web-2-deploy").await;
    let status = wait_build(&builds, "web-2", AppBuildPhase::Failed).await;
    assert_eq!(status.reason.as_deref(), Some("DeployedNothing"));
    let message = status.message.unwrap();
    assert!(
        message.contains("web (registry.example.com:5000/team/other:9)"),
        "{message}"
    );
    let apps: Api<App> = Api::namespaced(admin.clone(), &ns);
    assert_eq!(
        apps.get("web").await.unwrap().status.unwrap().current_image,
        None,
        "a deploy that deployed nothing is not the current image"
    );
}

#[tokio::test]
async fn changing_spec_run_releases_the_current_image_with_the_new_settings() {
    support::jobs().await;
    let cluster = connected_cluster("releases").await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "release").await;
    let apps = ready_app(&admin, &ns, "web", image_app("1.0")).await;
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    deploy(
        &admin,
        &ns,
        &builds,
        "web-1",
        json!({"appName": "web", "helmValues": {"labels": {"team": "a"}}}),
    )
    .await;
    let first = deployment(&admin, &ns, "web").await;
    assert_eq!(first.spec.as_ref().unwrap().replicas, Some(1));
    let container = app_container(&first);
    assert_eq!(
        container.image.as_deref(),
        Some(format!("{IMAGE}:1.0").as_str())
    );
    assert_eq!(
        container.ports.unwrap()[0].container_port,
        8080,
        "the default port"
    );
    assert!(
        container.readiness_probe.unwrap().tcp_socket.is_some(),
        "TCP check by default"
    );

    // The settings page: more replicas, a port, a variable, an HTTP health check.
    apps.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"run": {"replicas": 2, "port": 3000,
            "env": [{"name": "GREETING", "value": "hello $(whoami) `id`"}],
            "healthCheck": {"path": "/healthz"}}}})),
    )
    .await
    .unwrap();
    let generation = apps.get("web").await.unwrap().metadata.generation.unwrap();
    let release = format!("web-release-{generation}");
    helm_runs(&admin, &ns, &format!("{release}-deploy")).await;
    let status = wait_build(&builds, &release, AppBuildPhase::Completed).await;
    assert_eq!(
        status.image.as_deref(),
        Some(format!("{IMAGE}:1.0").as_str()),
        "no rebuild"
    );
    assert!(status.job_name.is_none(), "nothing was built");

    let second = deployment(&admin, &ns, "web").await;
    assert_eq!(second.spec.as_ref().unwrap().replicas, Some(2));
    assert_eq!(second.status.as_ref().unwrap().available_replicas, Some(2));
    let container = app_container(&second);
    assert_eq!(container.ports.clone().unwrap()[0].container_port, 3000);
    let env: Vec<(String, String)> = container
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect();
    assert_eq!(
        env,
        [
            ("PORT".to_string(), "3000".to_string()),
            ("GREETING".to_string(), "hello $(whoami) `id`".to_string())
        ]
    );
    let probe = container.readiness_probe.unwrap().http_get.unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz"));
    assert_eq!(
        second
            .metadata
            .labels
            .unwrap()
            .get("team")
            .map(String::as_str),
        Some("a"),
        "the latest deploy's helmValues carried over"
    );
    // Two replicas: a PodDisruptionBudget keeps one up through drains.
    let pdbs: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
        Api::namespaced(admin.clone(), &ns);
    assert!(pdbs.get_opt("web").await.unwrap().is_some());
    let app_status = apps.get("web").await.unwrap().status.unwrap();
    assert_eq!(app_status.latest_build.as_deref(), Some(release.as_str()));

    // A status-only change releases nothing; the same settings again release nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let releases = builds
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|b| b.name_any().starts_with("web-release-"))
        .count();
    assert_eq!(releases, 1, "one release per change");
}

#[tokio::test]
async fn a_rollback_redeploys_an_earlier_builds_exact_image_and_values() {
    support::jobs().await;
    let cluster = connected_cluster("rollback").await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "rollback").await;
    let apps = ready_app(&admin, &ns, "web", image_app("1.0")).await;
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    deploy(
        &admin,
        &ns,
        &builds,
        "web-1",
        json!({"appName": "web", "imageTag": "1.0",
        "helmValues": {"labels": {"release": "one"}}}),
    )
    .await;
    deploy(
        &admin,
        &ns,
        &builds,
        "web-2",
        json!({"appName": "web", "imageTag": "2.0"}),
    )
    .await;
    assert_eq!(
        app_container(&deployment(&admin, &ns, "web").await)
            .image
            .as_deref(),
        Some(format!("{IMAGE}:2.0").as_str())
    );

    let status = deploy(
        &admin,
        &ns,
        &builds,
        "web-3",
        json!({"appName": "web", "rollbackTo": "web-1"}),
    )
    .await;
    assert_eq!(
        status.image.as_deref(),
        Some(format!("{IMAGE}:1.0").as_str())
    );
    assert!(status.message.unwrap().contains("deployed"));
    let built = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Built")
        .unwrap();
    assert_eq!(built.reason, "Rollback");
    assert_eq!(
        values_of(&admin, &ns, "web-3").await,
        values_of(&admin, &ns, "web-1").await,
        "the exact values"
    );
    let rolled_back = deployment(&admin, &ns, "web").await;
    assert_eq!(
        app_container(&rolled_back).image.as_deref(),
        Some(format!("{IMAGE}:1.0").as_str())
    );
    assert_eq!(rolled_back.metadata.labels.unwrap()["release"], "one");
    let app_status = apps.get("web").await.unwrap().status.unwrap();
    assert_eq!(
        app_status.current_image.as_deref(),
        Some(format!("{IMAGE}:1.0").as_str())
    );
    assert_eq!(
        app_status.previous_image.as_deref(),
        Some(format!("{IMAGE}:2.0").as_str())
    );

    // Only a build that deployed can be rolled back to; the schema keeps a rollback pure.
    builds
        .create(
            &PostParams::default(),
            &shapeblock(
                "AppBuild",
                "web-4",
                json!({"appName": "web", "rollbackTo": "web-9"}),
            ),
        )
        .await
        .unwrap();
    let status = wait_build(&builds, "web-4", AppBuildPhase::Failed).await;
    assert_eq!(status.reason.as_deref(), Some("RollbackUnusable"));
    builds
        .create(
            &PostParams::default(),
            &shapeblock(
                "AppBuild",
                "web-5",
                json!({"appName": "web", "rollbackTo": "web-4"}),
            ),
        )
        .await
        .unwrap();
    let status = wait_build(&builds, "web-5", AppBuildPhase::Failed).await;
    assert!(status.message.unwrap().contains("not Completed"));
    let err = builds
        .create(
            &PostParams::default(),
            &shapeblock(
                "AppBuild",
                "web-6",
                json!({"appName": "web", "rollbackTo": "web-1", "imageTag": "3.0"}),
            ),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("spec.rollbackTo redeploys an earlier build as it was"),
        "{err}"
    );
}

#[tokio::test]
async fn the_build_history_is_pruned_with_its_jobs_and_secrets() {
    support::jobs().await;
    let apps_settings = AppSettings {
        keep_builds: 2,
        ..Default::default()
    };
    let cluster = connected_cluster_with("history", None, apps_settings).await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "history").await;
    ready_app(&admin, &ns, "web", image_app("1.0")).await;
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    for i in 1..=4 {
        deploy(
            &admin,
            &ns,
            &builds,
            &format!("web-{i}"),
            json!({"appName": "web", "imageTag": format!("{i}.0")}),
        )
        .await;
        // Creation timestamps have one-second resolution: keep the order unambiguous.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    wait_for("the two oldest builds pruned", WAIT, async || {
        let mut names: Vec<String> = builds
            .list(&Default::default())
            .await
            .ok()?
            .items
            .iter()
            .map(|b| b.name_any())
            .collect();
        names.sort();
        (names == ["web-3", "web-4"]).then_some(())
    })
    .await;
    // Their Jobs, values Secrets and chart ConfigMaps go with them (owner references).
    wait_for("the pruned builds' children gone", WAIT, async || {
        let jobs = Api::<Job>::namespaced(admin.clone(), &ns);
        let secrets = Api::<Secret>::namespaced(admin.clone(), &ns);
        let maps = Api::<ConfigMap>::namespaced(admin.clone(), &ns);
        for old in ["web-1", "web-2"] {
            if jobs.get_opt(&format!("{old}-deploy")).await.ok()?.is_some()
                || secrets
                    .get_opt(&format!("{old}-values"))
                    .await
                    .ok()?
                    .is_some()
                || maps.get_opt(&format!("{old}-chart")).await.ok()?.is_some()
            {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(
        Api::<Secret>::namespaced(admin.clone(), &ns)
            .get_opt("web-4-values")
            .await
            .unwrap()
            .is_some(),
        "the current deploy keeps its values (a rollback needs them)"
    );
}

#[tokio::test]
async fn deploys_of_one_app_wait_for_each_other() {
    support::jobs().await;
    let cluster = connected_cluster("deploy-queue").await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "queue").await;
    ready_app(&admin, &ns, "web", image_app("1.0")).await;
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    builds
        .create(
            &PostParams::default(),
            &shapeblock(
                "AppBuild",
                "web-1",
                json!({"appName": "web", "imageTag": "1.0"}),
            ),
        )
        .await
        .unwrap();
    wait_build(&builds, "web-1", AppBuildPhase::Deploying).await;
    builds
        .create(
            &PostParams::default(),
            &shapeblock(
                "AppBuild",
                "web-2",
                json!({"appName": "web", "imageTag": "2.0"}),
            ),
        )
        .await
        .unwrap();
    wait_for("web-2 waiting for web-1", WAIT, async || {
        let message = builds.get("web-2").await.ok()?.status?.message?;
        message
            .contains("waiting for the deploy of web-1")
            .then_some(())
    })
    .await;
    assert!(
        Api::<Job>::namespaced(admin.clone(), &ns)
            .get_opt("web-2-deploy")
            .await
            .unwrap()
            .is_none(),
        "no second helm while the first runs"
    );
    helm_runs(&admin, &ns, "web-1-deploy").await;
    wait_build(&builds, "web-1", AppBuildPhase::Completed).await;
    // The first deploy's end moves the second on, with no poll.
    helm_runs(&admin, &ns, "web-2-deploy").await;
    wait_build(&builds, "web-2", AppBuildPhase::Completed).await;
    assert_eq!(
        app_container(&deployment(&admin, &ns, "web").await)
            .image
            .as_deref(),
        Some(format!("{IMAGE}:2.0").as_str())
    );
}

#[tokio::test]
async fn a_rollout_whose_new_pods_cannot_run_fails_at_once_with_their_reason() {
    use k8s_openapi::api::core::v1::Pod;
    support::jobs().await;
    let cluster = connected_cluster("deploy-crash").await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "crash").await;
    let apps = ready_app(&admin, &ns, "web", image_app("1.0")).await;
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    // kwok leaves this App's pods alone: the test is their kubelet.
    builds
        .create(
            &PostParams::default(),
            &shapeblock(
                "AppBuild",
                "web-1",
                json!({"appName": "web",
                "helmValues": {"labels": {support::TEST_KUBELET_LABEL: "test"}}}),
            ),
        )
        .await
        .unwrap();
    helm_runs(&admin, &ns, "web-1-deploy").await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let pod = wait_for("the App's pod scheduled", WAIT, async || {
        // The App's own pods, not the deploy Job's (which carries the App label too).
        pods.list(
            &kube::api::ListParams::default()
                .labels("shapeblock.io/app=web,!batch.kubernetes.io/job-name"),
        )
        .await
        .ok()?
        .items
        .into_iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
    })
    .await;
    let status = builds.get("web-1").await.unwrap().status.unwrap();
    assert_eq!(
        status.phase,
        Some(AppBuildPhase::Deploying),
        "rolling out: {status:?}"
    );
    // The container exits at start, again and again: the kubelet backs off.
    let now = jiff::Timestamp::now().to_string();
    pods.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": {"phase": "Running", "startTime": now,
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "app", "image": format!("{IMAGE}:1.0"), "imageID": "",
                "ready": false, "restartCount": 3, "started": false,
                "state": {"waiting": {"reason": "CrashLoopBackOff",
                    "message": "back-off 40s restarting failed container=app"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                    "message": "Error: Cannot find module 'express'", "startedAt": now, "finishedAt": now}}}]}})),
    )
    .await
    .unwrap();
    let written = Instant::now();
    let status = wait_build(&builds, "web-1", AppBuildPhase::Failed).await;
    eprintln!(
        "pod crash-looping -> AppBuild Failed: {:?}",
        written.elapsed()
    );
    assert_eq!(status.reason.as_deref(), Some("CrashLoopBackOff"));
    let message = status.message.unwrap();
    assert!(message.contains("exit code 1"), "{message}");
    assert!(
        message.contains("Cannot find module 'express'"),
        "{message}"
    );
    let runtime = apps
        .get("web")
        .await
        .unwrap()
        .status
        .unwrap()
        .runtime
        .unwrap();
    assert_eq!(runtime.state, shapeblock::crd::RuntimeState::Down);
    assert_eq!(runtime.reason.as_deref(), Some("CrashLoopBackOff"));
    assert_eq!(
        apps.get("web").await.unwrap().status.unwrap().current_image,
        None,
        "a release that cannot run is not the current one"
    );
}

#[tokio::test]
async fn a_deploy_retried_after_its_chart_config_map_was_created_goes_on() {
    use k8s_openapi::api::core::v1::ConfigMap;
    support::jobs().await;
    let cluster = connected_cluster("deploy-retried").await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "retried").await;
    ready_app(&admin, &ns, "web", image_app("1.0")).await;
    // An earlier attempt of this deploy created the chart ConfigMap, then failed (a conflict,
    // a dropped tunnel): the retry finds it there and must read it, not stop at Forbidden.
    let earlier: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "web-1-chart", "namespace": ns}, "data": {"Chart.yaml": "x"}
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &earlier)
        .await
        .unwrap();
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    builds
        .create(
            &PostParams::default(),
            &shapeblock("AppBuild", "web-1", json!({"appName": "web"})),
        )
        .await
        .unwrap();
    wait_build(&builds, "web-1", AppBuildPhase::Deploying).await;
}
