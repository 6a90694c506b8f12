//! AppBuilds and Services reconciled by the hub through the tunnel, against the real control
//! plane with kube-controller-manager (Job controller, garbage collector), kube-scheduler and a
//! kwok node. The hub's build and Helm pods run on the kwok node and stay Running until the
//! test ends them as the kubelet would ([`support::finish_job_pod`]): exit codes and the
//! termination messages the real containers write (the commit SHA from `git log --output`,
//! kaniko's `--digest-file`, git's and helm's output through `FallbackToLogsOnError`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use shapeblock::crd::{AppBuild, AppBuildPhase, AppPhase, Service, ServicePhase};
use support::cluster::{
    ConnectedCluster, active_project, connected_cluster, helm_runs, ready_app, shapeblock,
    wait_build, wait_for, wait_job,
};
use support::{PodEnd, finish_job_pod};

const SHA: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";
const WAIT: Duration = Duration::from_secs(60);

fn digest() -> String {
    format!("sha256:{}", "ab".repeat(32))
}

fn appbuild(name: &str, spec: Value) -> AppBuild {
    shapeblock("AppBuild", name, spec)
}

/// Waits until the Events on the object named `name` include every `(type, reason)` wanted.
async fn wait_events(admin: &Client, ns: &str, name: &str, wanted: &[(&str, &str)]) {
    use k8s_openapi::api::events::v1::Event;
    let events: Api<Event> = Api::namespaced(admin.clone(), ns);
    wait_for(&format!("Events {wanted:?} on {name}"), WAIT, async || {
        let seen: Vec<(String, String)> = events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default()))
            .collect();
        wanted
            .iter()
            .all(|(t, r)| seen.iter().any(|(st, sr)| st == t && sr == r))
            .then_some(())
    })
    .await;
}

fn args_of(job: &Job, container: &str) -> Vec<String> {
    let spec = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == container)
        .unwrap_or_else(|| panic!("no container {container}"))
        .args
        .clone()
        .unwrap_or_default()
}

/// A successful build pod: clone, the commit it resolved to, and the build's digest.
fn built(commit: &str, digest: &str) -> PodEnd<'static> {
    let commit: &'static str = Box::leak(format!("{commit}\n").into_boxed_str());
    let digest: &'static str = Box::leak(digest.to_string().into_boxed_str());
    PodEnd {
        phase: "Succeeded",
        init: vec![("clone", 0, ""), ("commit", 0, commit)],
        containers: vec![("build", 0, "Completed", digest)],
    }
}

fn helm_ok() -> PodEnd<'static> {
    PodEnd {
        phase: "Succeeded",
        init: vec![],
        containers: vec![("helm", 0, "Completed", "")],
    }
}

async fn values_of(admin: &Client, ns: &str, secret: &str) -> Value {
    let secret = Api::<Secret>::namespaced(admin.clone(), ns)
        .get(secret)
        .await
        .unwrap();
    let text = secret.data.unwrap()["values.yaml"].0.clone();
    serde_json::from_slice(&text).unwrap()
}

#[tokio::test]
async fn a_dockerfile_build_clones_builds_and_deploys_and_the_same_commit_is_reused() {
    support::jobs().await;
    let cluster = connected_cluster("builds-docker").await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "docker").await;
    let hostile_url = "https://github.com/org/web.git?$(touch${IFS}/tmp/pwned);`id`|x&&y";
    let apps = ready_app(
        &admin,
        &ns,
        "web",
        json!({"displayName": "Web", "git": {"url": hostile_url, "branch": "main"},
            "registry": {"url": "registry.example.com:5000"},
            "build": {"type": "dockerfile", "contextDir": "svc", "dockerfilePath": "docker/web.Dockerfile"}}),
    )
    .await;
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    let hostile_vars = json!([
        {"key": "GREETING", "value": "hello $(reboot); `id` && rm -rf / | tee"},
        {"key": "MULTI", "value": "line one\nline two\n--build-arg=EVIL=1"},
        {"key": "OPTION", "value": "--insecure"},
    ]);
    let created = Instant::now();
    builds
        .create(
            &PostParams::default(),
            &appbuild(
                "web-1",
                json!({"appName": "web", "gitRef": SHA, "buildVars": hostile_vars,
                "helmValues": {"replicas": 2, "labels": {"team": "a"}}}),
            ),
        )
        .await
        .unwrap();
    let job = wait_job(&admin, &ns, "web-1-build").await;
    eprintln!(
        "AppBuild created -> build Job created: {:?}",
        created.elapsed()
    );

    // Every user string is one argv element, verbatim; no container runs a shell.
    // A commit: git init, a shallow fetch of exactly that commit (the `clone` step), a
    // detached checkout; nothing that needs git ≥ 2.49.
    assert_eq!(
        args_of(&job, "git-init"),
        ["init", "-q", "/workspace/source"]
    );
    let clone = args_of(&job, "clone");
    assert_eq!(
        clone,
        [
            "-C",
            "/workspace/source",
            "fetch",
            "--depth=1",
            "--no-tags",
            "--",
            hostile_url,
            SHA
        ]
    );
    assert_eq!(
        args_of(&job, "checkout"),
        [
            "-C",
            "/workspace/source",
            "checkout",
            "-q",
            "--detach",
            "FETCH_HEAD"
        ]
    );
    let kaniko = args_of(&job, "build");
    for expected in [
        "--context=dir:///kaniko/buildcontext/source/svc",
        "--dockerfile=/kaniko/buildcontext/source/docker/web.Dockerfile",
        &format!(
            "--destination=registry.example.com:5000/{ns}/web:{}",
            &SHA[..12]
        ),
        &format!("--cache-repo=registry.example.com:5000/{ns}/web-cache"),
        "GREETING=hello $(reboot); `id` && rm -rf / | tee",
        "MULTI=line one\nline two\n--build-arg=EVIL=1",
        "OPTION=--insecure",
    ] {
        assert!(
            kaniko.iter().any(|a| a == expected),
            "{expected:?} not an argument of {kaniko:?}"
        );
    }
    let pod_spec = job.spec.as_ref().unwrap().template.spec.clone().unwrap();
    for c in pod_spec
        .init_containers
        .iter()
        .flatten()
        .chain(&pod_spec.containers)
    {
        let command = c.command.clone().unwrap_or_default().join(" ");
        assert!(
            !command.ends_with("sh") && !command.contains("sh -c"),
            "{} runs a shell: {command}",
            c.name
        );
    }
    // The registry Secret pulls the build's own images too (a private builder, say).
    let pull_secrets: Vec<String> = pod_spec
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(pull_secrets, ["registry-creds"]);
    assert_eq!(job.owner_references()[0].kind, "AppBuild");
    assert_eq!(job.spec.as_ref().unwrap().backoff_limit, Some(0));

    // The pod runs: Building.
    wait_build(&builds, "web-1", AppBuildPhase::Building).await;
    let finished = Instant::now();
    finish_job_pod(&admin, &ns, "web-1-build", built(SHA, &digest())).await;
    let status = wait_build(&builds, "web-1", AppBuildPhase::Deploying).await;
    eprintln!(
        "build pod finished -> AppBuild Deploying: {:?}",
        finished.elapsed()
    );
    assert_eq!(status.git_commit.as_deref(), Some(SHA));
    let image = format!(
        "registry.example.com:5000/{ns}/web:{}@{}",
        &SHA[..12],
        digest()
    );
    assert_eq!(status.image.as_deref(), Some(image.as_str()));

    // The deploy: helm under the deployer ServiceAccount, values with the built image.
    let deploy = wait_job(&admin, &ns, "web-1-deploy").await;
    let deploy_spec = deploy.spec.as_ref().unwrap().template.spec.clone().unwrap();
    assert_eq!(
        deploy_spec.service_account_name.as_deref(),
        Some("deployer")
    );
    let helm = args_of(&deploy, "helm");
    assert_eq!(&helm[..3], ["upgrade", "--install", "web"]);
    assert_eq!(
        helm[3], "/etc/shapeblock/chart",
        "the shipped chart, no repository"
    );
    assert!(
        !helm.contains(&"--wait".to_string()),
        "the hub follows the rollout"
    );
    let values = values_of(&admin, &ns, "web-1-values").await;
    assert_eq!(values["image"], image);
    assert_eq!(values["port"], 8080);
    assert_eq!(values["replicas"], 2, "helmValues win");
    assert_eq!(values["labels"]["team"], "a");
    assert_eq!(values["imagePullSecrets"][0], "registry-creds");
    // helm installs the shipped chart for real, as the deployer; the Deployment rolls out on
    // the kwok node; only then is the build Completed.
    helm_runs(&admin, &ns, "web-1-deploy").await;
    let status = wait_build(&builds, "web-1", AppBuildPhase::Completed).await;
    let deployment = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(admin.clone(), &ns)
        .get("web")
        .await
        .unwrap();
    let ready = deployment
        .status
        .as_ref()
        .and_then(|s| s.available_replicas);
    assert_eq!(
        ready,
        Some(2),
        "Completed only once both replicas are available"
    );
    let containers = deployment.spec.unwrap().template.spec.unwrap().containers;
    assert_eq!(containers[0].image.as_deref(), Some(image.as_str()));
    // `kubectl describe appbuild` tells the story: a Normal Event for each phase.
    wait_events(
        &admin,
        &ns,
        "web-1",
        &[
            ("Normal", "Pending"),
            ("Normal", "Building"),
            ("Normal", "Deploying"),
            ("Normal", "Completed"),
        ],
    )
    .await;
    assert!(status.completion_time.is_some() && status.build_end_time.is_some());
    let app_status = apps.get("web").await.unwrap().status.unwrap();
    assert_eq!(app_status.current_image.as_deref(), Some(image.as_str()));
    assert_eq!(app_status.latest_build.as_deref(), Some("web-1"));
    assert_eq!(
        app_status.phase,
        Some(AppPhase::Ready),
        "the App controller kept its fields"
    );

    // The same commit with the same inputs again: no build, the image is reused.
    builds
        .create(
            &PostParams::default(),
            &appbuild(
                "web-2",
                json!({"appName": "web", "gitRef": SHA, "buildVars": hostile_vars}),
            ),
        )
        .await
        .unwrap();
    let status = wait_build(&builds, "web-2", AppBuildPhase::Deploying).await;
    assert_eq!(status.image.as_deref(), Some(image.as_str()));
    assert!(
        status
            .message
            .unwrap()
            .contains("reusing the image of build web-1"),
        "reuse is said"
    );
    wait_job(&admin, &ns, "web-2-deploy").await;
    assert!(
        Api::<Job>::namespaced(admin.clone(), &ns)
            .get_opt("web-2-build")
            .await
            .unwrap()
            .is_none(),
        "a reused image must not be rebuilt"
    );
    helm_runs(&admin, &ns, "web-2-deploy").await;
    wait_build(&builds, "web-2", AppBuildPhase::Completed).await;

    // A branch build gets the App's name-based tag; a later build of another image moves
    // the current image to previousImage.
    builds
        .create(
            &PostParams::default(),
            &appbuild("web-3", json!({"appName": "web", "gitRef": "main"})),
        )
        .await
        .unwrap();
    let job = wait_job(&admin, &ns, "web-3-build").await;
    assert!(args_of(&job, "clone").contains(&"--branch=main".to_string()));
    let branch_head = "0123456789abcdef0123456789abcdef01234567";
    finish_job_pod(&admin, &ns, "web-3-build", built(branch_head, "")).await;
    let status = wait_build(&builds, "web-3", AppBuildPhase::Deploying).await;
    assert_eq!(status.git_commit.as_deref(), Some(branch_head));
    let third = format!("registry.example.com:5000/{ns}/web:web-3");
    assert_eq!(
        status.image.as_deref(),
        Some(third.as_str()),
        "no digest reported: by tag"
    );
    helm_runs(&admin, &ns, "web-3-deploy").await;
    wait_build(&builds, "web-3", AppBuildPhase::Completed).await;
    let app_status = apps.get("web").await.unwrap().status.unwrap();
    assert_eq!(app_status.current_image.as_deref(), Some(third.as_str()));
    assert_eq!(app_status.previous_image.as_deref(), Some(image.as_str()));

    // Deleting the App uninstalls its release, then the App, its AppBuilds, their Jobs and
    // Secrets all go.
    apps.delete("web", &DeleteParams::default()).await.unwrap();
    let uninstall = wait_job(&admin, &ns, "web-uninstall").await;
    assert_eq!(
        &args_of(&uninstall, "helm")[..3],
        ["uninstall", "web", "--ignore-not-found"]
    );
    helm_runs(&admin, &ns, "web-uninstall").await;
    wait_for(
        "App, builds, Jobs and Secrets gone",
        Duration::from_secs(90),
        async || {
            let app_gone = apps.get_opt("web").await.ok()?.is_none();
            let builds_left = builds.list(&ListParams::default()).await.ok()?.items.len();
            let jobs_left = Api::<Job>::namespaced(admin.clone(), &ns)
                .list(&ListParams::default().labels("shapeblock.io/app=web"))
                .await
                .ok()?
                .items
                .len();
            let secrets_left = Api::<Secret>::namespaced(admin.clone(), &ns)
                .list(&ListParams::default().labels("shapeblock.io/app=web"))
                .await
                .ok()?
                .items
                .len();
            (app_gone && builds_left == 0 && jobs_left == 0 && secrets_left == 0).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn clone_build_and_deploy_failures_end_failed_with_a_reason() {
    support::jobs().await;
    let cluster = connected_cluster("builds-fail").await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "fail").await;
    ready_app(
        &admin,
        &ns,
        "api",
        json!({"displayName": "API", "git": {"url": "git@github.com:org/api.git", "isPrivate": true},
            "registry": {"url": "registry.example.com"}, "build": {"type": "dockerfile"}}),
    )
    .await;
    ready_app(
        &admin,
        &ns,
        "worker",
        json!({"displayName": "Worker", "git": {"url": "https://github.com/org/worker.git"},
            "registry": {"url": "registry.example.com"},
            "build": {"type": "buildpack", "builderImage": "paketobuildpacks/builder-jammy-base:0.4.500"}}),
    )
    .await;
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    for (name, app, git_ref) in [
        ("clone-fails", "api", "nope"),
        ("build-fails", "api", "main"),
        ("deploy-fails", "api", "main"),
        ("detect-fails", "worker", "main"),
    ] {
        builds
            .create(
                &PostParams::default(),
                &appbuild(
                    name,
                    json!({"appName": app, "gitRef": git_ref,
                    "buildVars": [{"key": "BP_NODE_VERSION", "value": "22"}]}),
                ),
            )
            .await
            .unwrap();
    }

    // The SSH clone uses the generated deploy key and the pinned host keys.
    let job = wait_job(&admin, &ns, "clone-fails-build").await;
    let pod = job.spec.unwrap().template.spec.unwrap();
    let clone = pod
        .init_containers
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.name == "clone")
        .unwrap();
    let ssh = clone
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "GIT_SSH_COMMAND")
        .unwrap();
    assert!(
        ssh.value
            .as_deref()
            .unwrap()
            .contains("StrictHostKeyChecking=yes")
    );
    let key_volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "git-ssh")
        .unwrap();
    assert_eq!(
        key_volume.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("api-deploy-key")
    );
    finish_job_pod(
        &admin,
        &ns,
        "clone-fails-build",
        PodEnd {
            phase: "Failed",
            init: vec![(
                "clone",
                128,
                "Cloning into '/workspace/source'...\nwarning: Could not find remote branch nope to clone.\nfatal: Remote branch nope not found in upstream origin",
            )],
            containers: vec![],
        },
    )
    .await;
    let status = wait_build(&builds, "clone-fails", AppBuildPhase::Failed).await;
    assert_eq!(status.reason.as_deref(), Some("GitCloneFailed"));
    let message = status.message.unwrap();
    assert!(
        message.starts_with("git ref 'nope' was not found"),
        "{message}"
    );
    assert!(message.contains("fatal: Remote branch nope"), "{message}");
    assert!(status.completion_time.is_some());
    wait_events(&admin, &ns, "clone-fails", &[("Warning", "GitCloneFailed")]).await;

    finish_job_pod(
        &admin,
        &ns,
        "build-fails-build",
        PodEnd {
            phase: "Failed",
            init: vec![("clone", 0, ""), ("commit", 0, SHA)],
            containers: vec![(
                "build",
                1,
                "Error",
                "error building image: error building stage: failed to execute command: RUN npm ci: exit status 1",
            )],
        },
    )
    .await;
    let status = wait_build(&builds, "build-fails", AppBuildPhase::Failed).await;
    assert_eq!(status.reason.as_deref(), Some("BuildFailed"));
    let message = status.message.unwrap();
    assert!(
        message.contains("exit code 1") && message.contains("RUN npm ci"),
        "{message}"
    );
    assert_eq!(
        status.git_commit.as_deref(),
        Some(SHA),
        "the commit is known even so"
    );

    finish_job_pod(&admin, &ns, "deploy-fails-build", built(SHA, &digest())).await;
    wait_job(&admin, &ns, "deploy-fails-deploy").await;
    finish_job_pod(
        &admin,
        &ns,
        "deploy-fails-deploy",
        PodEnd {
            phase: "Failed",
            init: vec![],
            containers: vec![(
                "helm",
                1,
                "Error",
                "Error: UPGRADE FAILED: context deadline exceeded",
            )],
        },
    )
    .await;
    let status = wait_build(&builds, "deploy-fails", AppBuildPhase::Failed).await;
    assert_eq!(status.reason.as_deref(), Some("DeployFailed"));
    assert!(
        status
            .message
            .unwrap()
            .contains("UPGRADE FAILED: context deadline exceeded"),
        "helm's own words"
    );
    assert_eq!(
        status.failed_helm_job_name.as_deref(),
        Some("deploy-fails-deploy")
    );

    // Buildpacks: build vars become platform env files; exit code 20 is the detect band.
    let job = wait_job(&admin, &ns, "detect-fails-build").await;
    let creator = args_of(&job, "build");
    assert!(
        creator[0].starts_with("-app=/workspace/source"),
        "{creator:?}"
    );
    let env = Api::<Secret>::namespaced(admin.clone(), &ns)
        .get("detect-fails-env")
        .await
        .unwrap();
    assert_eq!(env.data.unwrap()["BP_NODE_VERSION"].0, b"22");
    finish_job_pod(
        &admin,
        &ns,
        "detect-fails-build",
        PodEnd {
            phase: "Failed",
            init: vec![("clone", 0, ""), ("commit", 0, SHA), ("prepare", 0, "")],
            containers: vec![(
                "build",
                20,
                "Error",
                "ERROR: No buildpack groups passed detection.",
            )],
        },
    )
    .await;
    let status = wait_build(&builds, "detect-fails", AppBuildPhase::Failed).await;
    let message = status.message.unwrap();
    assert!(
        message.starts_with("buildpacks: no buildpack detected the application"),
        "{message}"
    );
}

/// A connected cluster with a Project holding a Ready buildpack App `app` built with
/// `builder`; the cluster, the Project's namespace and its AppBuilds.
async fn buildpack_app(
    prefix: &str,
    app: &str,
    builder: &str,
) -> (ConnectedCluster, String, Api<AppBuild>) {
    support::jobs().await;
    let cluster = connected_cluster(&format!("builds-{prefix}")).await;
    let ns = active_project(&cluster.admin, prefix).await;
    ready_app(
        &cluster.admin,
        &ns,
        app,
        json!({"displayName": app, "git": {"url": format!("https://github.com/org/{app}.git")},
            "registry": {"url": "registry.example.com"},
            "build": {"type": "buildpack", "builderImage": builder}}),
    )
    .await;
    let builds = Api::namespaced(cluster.admin.clone(), &ns);
    (cluster, ns, builds)
}

#[tokio::test]
async fn a_buildpack_build_deploys_the_digest_of_the_lifecycle_report() {
    let (cluster, ns, builds) = buildpack_app("cnb", "site", "heroku/builder:24").await;
    let admin = cluster.admin.clone();
    builds
        .create(
            &PostParams::default(),
            &appbuild("site-1", json!({"appName": "site", "gitRef": SHA})),
        )
        .await
        .unwrap();
    let job = wait_job(&admin, &ns, "site-1-build").await;
    let creator = args_of(&job, "build");
    assert!(
        creator.contains(&"-report=/dev/termination-log".to_string()),
        "{creator:?}"
    );
    // The lifecycle writes its report.toml to /dev/termination-log: the kubelet's message.
    let image = format!("registry.example.com/{ns}/site:{}", &SHA[..12]);
    let report = format!(
        "[image]\n  tags = [\"{image}\"]\n  digest = \"{}\"\n  manifest-size = 1721\n",
        digest()
    );
    finish_job_pod(
        &admin,
        &ns,
        "site-1-build",
        PodEnd {
            phase: "Succeeded",
            init: vec![
                ("git-init", 0, ""),
                ("clone", 0, ""),
                ("checkout", 0, ""),
                ("commit", 0, SHA),
                ("prepare", 0, ""),
            ],
            containers: vec![("build", 0, "Completed", &report)],
        },
    )
    .await;
    let status = wait_build(&builds, "site-1", AppBuildPhase::Deploying).await;
    assert_eq!(
        status.image.as_deref(),
        Some(format!("{image}@{}", digest()).as_str())
    );
}

/// Waits until Job `name` is gone.
async fn wait_job_gone(admin: &Client, ns: &str, name: &str) {
    let jobs: Api<Job> = Api::namespaced(admin.clone(), ns);
    wait_for(&format!("Job {name} deleted"), WAIT, async || {
        let job = jobs.get_opt(name).await.ok()?;
        job.is_none_or(|j| j.metadata.deletion_timestamp.is_some())
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn build_pods_that_can_never_start_fail_the_build_at_once() {
    let (cluster, ns, builds) = buildpack_app(
        "unstartable",
        "web",
        "registry.example.com/private/builder:24",
    )
    .await;
    let admin = cluster.admin.clone();

    // A builder image the registry refuses: the kubelet reports ErrImagePull on the build
    // container; the build fails with the kubelet's words, and its Job goes.
    builds
        .create(
            &PostParams::default(),
            &appbuild("pull", json!({"appName": "web", "gitRef": "main"})),
        )
        .await
        .unwrap();
    wait_job(&admin, &ns, "pull-build").await;
    let started = Instant::now();
    support::job_pod_waits(
        &admin,
        &ns,
        "pull-build",
        &["clone", "commit", "prepare"],
        "build",
        "ErrImagePull",
        "failed to pull and unpack image \"registry.example.com/private/builder:24\": 401 Unauthorized",
    )
    .await;
    let status = wait_build(&builds, "pull", AppBuildPhase::Failed).await;
    eprintln!("ErrImagePull -> AppBuild Failed: {:?}", started.elapsed());
    assert_eq!(status.reason.as_deref(), Some("BuildImagePullFailed"));
    let message = status.message.unwrap();
    assert!(
        message.starts_with("the build pod cannot start: pod pull-build-"),
        "{message}"
    );
    assert!(
        message.contains("container build: ErrImagePull: failed to pull and unpack image")
            && message.contains("401 Unauthorized"),
        "{message}"
    );
    wait_events(&admin, &ns, "pull", &[("Warning", "BuildImagePullFailed")]).await;
    wait_job_gone(&admin, &ns, "pull-build").await;

    // A namespace quota of no pods: the Job controller cannot create the pod (FailedCreate on
    // the Job, no pod at all); the build fails with the apiserver's refusal.
    let quota: k8s_openapi::api::core::v1::ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}}))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::ResourceQuota>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &quota)
        .await
        .unwrap();
    builds
        .create(
            &PostParams::default(),
            &appbuild("quota", json!({"appName": "web", "gitRef": "main"})),
        )
        .await
        .unwrap();
    wait_job(&admin, &ns, "quota-build").await;
    let started = Instant::now();
    let status = wait_build(&builds, "quota", AppBuildPhase::Failed).await;
    eprintln!(
        "build Job without a pod -> AppBuild Failed: {:?}",
        started.elapsed()
    );
    assert_eq!(status.reason.as_deref(), Some("BuildPodRejected"));
    let message = status.message.unwrap();
    assert!(
        message.starts_with("the build Job cannot create its pod: Error creating: pods"),
        "{message}"
    );
    assert!(message.contains("forbidden"), "{message}");
    wait_job_gone(&admin, &ns, "quota-build").await;
}

#[tokio::test]
async fn a_hub_restarted_mid_build_finds_its_job_and_finishes_the_build() {
    support::jobs().await;
    let mut cluster = connected_cluster("builds-restart").await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "restart").await;
    ready_app(
        &admin,
        &ns,
        "shop",
        json!({"displayName": "Shop", "git": {"url": "https://github.com/org/shop.git"},
            "registry": {"url": "registry.example.com"}, "build": {"type": "dockerfile"}}),
    )
    .await;
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    builds
        .create(
            &PostParams::default(),
            &appbuild("shop-1", json!({"appName": "shop", "gitRef": "main"})),
        )
        .await
        .unwrap();
    let job = wait_job(&admin, &ns, "shop-1-build").await;
    wait_build(&builds, "shop-1", AppBuildPhase::Building).await;

    cluster.restart_hub().await;
    // The build finishes while the new hub starts up and lists everything afresh.
    finish_job_pod(&admin, &ns, "shop-1-build", built(SHA, &digest())).await;
    wait_job(&admin, &ns, "shop-1-deploy").await;
    helm_runs(&admin, &ns, "shop-1-deploy").await;
    let status = wait_build(&builds, "shop-1", AppBuildPhase::Completed).await;
    assert_eq!(status.git_commit.as_deref(), Some(SHA));
    let jobs = Api::<Job>::namespaced(admin.clone(), &ns)
        .list(&ListParams::default().labels("shapeblock.io/build=shop-1"))
        .await
        .unwrap();
    let mut names: Vec<String> = jobs.items.iter().map(|j| j.name_any()).collect();
    names.sort();
    assert_eq!(names, ["shop-1-build", "shop-1-deploy"], "no duplicate Job");
    let build_job = jobs
        .items
        .iter()
        .find(|j| j.name_any() == "shop-1-build")
        .unwrap();
    assert_eq!(
        build_job.metadata.uid, job.metadata.uid,
        "the same Job, not a new one"
    );
}

#[tokio::test]
async fn prebuilt_images_and_redeploys_skip_the_build() {
    support::jobs().await;
    let cluster = connected_cluster("builds-image").await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "image").await;
    let apps = ready_app(
        &admin,
        &ns,
        "proxy",
        json!({"displayName": "Proxy", "registry": {},
            "build": {"type": "image", "image": "registry.example.com:5000/team/nginx:1.27"}}),
    )
    .await;
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    let deploys = async |name: &str, spec: Value, image: &str| {
        builds
            .create(&PostParams::default(), &appbuild(name, spec))
            .await
            .unwrap();
        let status = wait_build(&builds, name, AppBuildPhase::Deploying).await;
        assert_eq!(status.image.as_deref(), Some(image), "{name}");
        assert!(status.job_name.is_none(), "{name}: nothing to build");
        helm_runs(&admin, &ns, &format!("{name}-deploy")).await;
        wait_build(&builds, name, AppBuildPhase::Completed).await;
    };
    // An image App deploys its image, with the tag an AppBuild names.
    deploys(
        "proxy-1",
        json!({"appName": "proxy", "imageTag": "1.27.3"}),
        "registry.example.com:5000/team/nginx:1.27.3",
    )
    .await;
    let values = values_of(&admin, &ns, "proxy-1-values").await;
    assert_eq!(
        values["image"],
        "registry.example.com:5000/team/nginx:1.27.3"
    );
    deploys(
        "proxy-2",
        json!({"appName": "proxy"}),
        "registry.example.com:5000/team/nginx:1.27",
    )
    .await;
    assert_eq!(
        apps.get("proxy")
            .await
            .unwrap()
            .status
            .unwrap()
            .latest_build
            .as_deref(),
        Some("proxy-2")
    );

    // A git App: neither gitRef nor imageTag redeploys its current image; before it has
    // one, and with no spec.git.branch to build first, that fails with the reason.
    ready_app(
        &admin,
        &ns,
        "site",
        json!({"displayName": "Site", "git": {"url": "https://github.com/org/site.git"},
            "registry": {"url": "registry.example.com"}, "build": {"type": "dockerfile"}}),
    )
    .await;
    builds
        .create(
            &PostParams::default(),
            &appbuild("site-0", json!({"appName": "site"})),
        )
        .await
        .unwrap();
    let status = wait_build(&builds, "site-0", AppBuildPhase::Failed).await;
    assert_eq!(status.reason.as_deref(), Some("NothingToRedeploy"));
    builds
        .create(
            &PostParams::default(),
            &appbuild("site-1", json!({"appName": "site", "gitRef": SHA})),
        )
        .await
        .unwrap();
    finish_job_pod(&admin, &ns, "site-1-build", built(SHA, &digest())).await;
    wait_job(&admin, &ns, "site-1-deploy").await;
    helm_runs(&admin, &ns, "site-1-deploy").await;
    let built_image = wait_build(&builds, "site-1", AppBuildPhase::Completed)
        .await
        .image
        .unwrap();
    deploys("site-2", json!({"appName": "site"}), &built_image).await;
}

#[tokio::test]
async fn services_install_upgrade_on_change_and_uninstall_on_delete() {
    support::jobs().await;
    let cluster = connected_cluster("services").await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "svc").await;
    let services: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Service", "metadata": {"name": "db"},
        "spec": {"chart": {"name": "postgresql", "version": "15.5.2",
            "repoURL": "oci://registry-1.docker.io/bitnamicharts"},
            "helmValues": {"auth": {"database": "shop", "password": "$(not a command)"}}}
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ns);
    let install_job = |jobs: Api<Job>| async move {
        wait_for("an install Job", WAIT, async || {
            let list = jobs
                .list(
                    &ListParams::default()
                        .labels("shapeblock.io/service=db,shapeblock.io/step=install"),
                )
                .await
                .ok()?;
            list.items.into_iter().find(|j| {
                j.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_none_or(|c| c.is_empty())
            })
        })
        .await
    };
    let first = install_job(jobs.clone()).await;
    let helm = args_of(&first, "helm");
    assert_eq!(
        &helm[..6],
        [
            "upgrade",
            "--install",
            "db",
            "oci://registry-1.docker.io/bitnamicharts/postgresql",
            "--version",
            "15.5.2"
        ]
    );
    let values_secret = first
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "values")
        .unwrap()
        .secret
        .as_ref()
        .unwrap()
        .secret_name
        .clone()
        .unwrap();
    assert_eq!(
        values_of(&admin, &ns, &values_secret).await["auth"]["password"],
        "$(not a command)"
    );
    finish_job_pod(&admin, &ns, &first.name_any(), helm_ok()).await;
    let deployed = wait_for("Service Deployed", WAIT, async || {
        let status = services.get_opt("db").await.ok()??.status?;
        (status.phase == Some(ServicePhase::Deployed)).then_some(status)
    })
    .await;
    let first_hash = deployed.applied_hash.clone().unwrap();

    // A values change upgrades with a new Job; the old Job and values go once it succeeds.
    services
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(
                &json!({"spec": {"helmValues": {"primary": {"persistence": {"size": "20Gi"}}}}}),
            ),
        )
        .await
        .unwrap();
    let second = install_job(jobs.clone()).await;
    assert_ne!(second.name_any(), first.name_any());
    finish_job_pod(&admin, &ns, &second.name_any(), helm_ok()).await;
    wait_for("Service upgraded", WAIT, async || {
        let status = services.get_opt("db").await.ok()??.status?;
        (status.phase == Some(ServicePhase::Deployed)
            && status.applied_hash.as_deref() != Some(first_hash.as_str()))
        .then_some(())
    })
    .await;
    wait_for("old install Job removed", WAIT, async || {
        jobs.get_opt(&first.name_any())
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;

    // Deleting the Service uninstalls the release first.
    services
        .delete("db", &DeleteParams::default())
        .await
        .unwrap();
    wait_job(&admin, &ns, "db-uninstall").await;
    wait_for("Service Deleting", WAIT, async || {
        let status = services.get_opt("db").await.ok()??.status?;
        (status.phase == Some(ServicePhase::Deleting)).then_some(())
    })
    .await;
    finish_job_pod(&admin, &ns, "db-uninstall", helm_ok()).await;
    wait_for(
        "Service and its Jobs gone",
        Duration::from_secs(90),
        async || {
            let gone = services.get_opt("db").await.ok()?.is_none();
            let left = jobs
                .list(&ListParams::default().labels("shapeblock.io/service=db"))
                .await
                .ok()?
                .items
                .len();
            (gone && left == 0).then_some(())
        },
    )
    .await;
}
