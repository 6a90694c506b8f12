//! AppBuild: builds an App's image with a Job (git clone, then kaniko or the buildpacks
//! `creator`), or takes a pre-built or earlier image, then deploys it with a Helm Job, and
//! records every step in status: Pending → Building → Deploying → Completed | Failed.
//!
//! Watch-driven: the AppBuild, its Jobs, the pods of its Jobs (metadata only) and its App
//! bring reconciles; nothing polls. Every child has a deterministic name, so a hub restarted
//! mid-build finds what it created instead of creating it twice, and every decision is taken
//! again from what the cluster holds.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use sha2::Digest;

use super::jobs::{self, Outcome};
use super::{Context, ReconcileError, retry_after};
use crate::crd::{
    App, AppBuild, AppBuildPhase, AppBuildStatus, AppPhase, BuildType, FIELD_MANAGER,
};
use crate::render::build::{build_args, child_name, destinations, helm_values, platform_env};
use crate::render::image::ImageRef;
use crate::render::jobs::{
    self as render, APP_LABEL, BUILD_CONTAINER, BUILD_LABEL, BuildJob, CLONE_CONTAINER,
    COMMIT_CONTAINER, Chart, GitAuth, HelmAction, HelmJob, PREPARE_CONTAINER, STEP_LABEL,
};

/// Label on an AppBuild holding the hash of its build inputs (repository, commit, strategy,
/// build vars): a Completed build with the same label is reused instead of rebuilt.
pub const INPUTS_LABEL: &str = "shapeblock.io/inputs";
/// Field manager of the App status fields this controller owns (`currentImage`,
/// `previousImage`, `latestBuild`), apart from the App controller's own.
pub const APP_STATUS_MANAGER: &str = "shapeblock-hub-builds";

/// Names of an AppBuild's children (pure, deterministic).
pub fn build_job_name(build: &str) -> String {
    child_name(build, "build")
}
pub fn deploy_job_name(build: &str) -> String {
    child_name(build, "deploy")
}
pub fn values_secret_name(build: &str) -> String {
    child_name(build, "values")
}
pub fn env_secret_name(build: &str) -> String {
    child_name(build, "env")
}

/// Hash of what decides a build's result when the commit is fixed (pure).
pub fn inputs_hash(
    app: &App,
    build: &AppBuild,
    commit: &str,
    settings: &render::JobSettings,
) -> String {
    let s = &app.spec.build;
    let mut vars: Vec<(&str, &str)> = build
        .spec
        .build_vars
        .iter()
        .map(|v| (v.key.as_str(), v.value.as_str()))
        .collect();
    vars.sort();
    let inputs = json!([
        app.spec.git.as_ref().map(|g| &g.url),
        commit,
        s.build_type,
        s.dockerfile_path,
        s.context_dir,
        s.builder_image
            .as_deref()
            .unwrap_or(&settings.builder_image),
        app.spec.registry.url,
        vars,
    ]);
    let digest = sha2::Sha256::digest(inputs.to_string().as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Tag of a new build's image: `spec.imageTag`, else the commit's first 12 hex digits when
/// the ref is a commit, else the AppBuild's name (unique in the namespace) (pure).
pub fn image_tag(build: &AppBuild, git_ref: &str) -> String {
    if let Some(tag) = &build.spec.image_tag {
        return tag.clone();
    }
    if render::is_commit_sha(git_ref) {
        return git_ref[..12].to_string();
    }
    build.name_any()
}

/// A user-facing explanation of a failed clone from git's output (pure).
pub fn clone_failure(output: &str, git_ref: &str) -> String {
    let hint = if output.contains("Permission denied (publickey)") {
        "the git host refused the SSH key: add the App's status.deployKey to the repository as a read-only deploy key, or fix spec.git.secretName".to_string()
    } else if output.contains("Host key verification failed") {
        "the git host's key is not trusted: add it to spec.git.knownHosts".to_string()
    } else if output.contains("not found in upstream")
        || output.contains("couldn't find remote ref")
        || output.contains("not our ref")
        || output.contains("Could not find remote branch")
    {
        format!("git ref '{git_ref}' was not found in the repository")
    } else if output.contains("Authentication failed") || output.contains("could not read Username")
    {
        "the git host refused the credentials in spec.git.secretName".to_string()
    } else if output.contains("Repository not found") || output.contains("does not exist") {
        "repository not found, or no access to it".to_string()
    } else if output.contains("Could not resolve host") {
        "the git host name could not be resolved".to_string()
    } else {
        "git clone failed".to_string()
    };
    format!("{hint}\n{}", jobs::tail(output, 1500))
}

/// Why a build Job failed: (reason, message) from the Job condition, the pod's containers
/// (exit codes, OOM, termination messages) and the buildpacks exit-code bands (pure).
pub fn build_failure(
    condition_reason: &str,
    condition_message: &str,
    pods: &[Pod],
    build_type: BuildType,
    git_ref: &str,
    settings: &render::JobSettings,
) -> (&'static str, String) {
    if condition_reason == "DeadlineExceeded" {
        return (
            "BuildTimedOut",
            format!(
                "the build did not finish within {} s (jobs.build_deadline_seconds)",
                settings.build_deadline_seconds
            ),
        );
    }
    for pod in pods {
        let failed = |name: &str| jobs::terminated(pod, name).filter(|t| t.exit_code != 0);
        for step in [CLONE_CONTAINER, COMMIT_CONTAINER] {
            if let Some(t) = failed(step) {
                let output = t.message.as_deref().unwrap_or_default();
                return ("GitCloneFailed", clone_failure(output, git_ref));
            }
        }
        if let Some(t) = failed(PREPARE_CONTAINER) {
            let output = t.message.as_deref().unwrap_or_default();
            return (
                "BuildFailed",
                format!(
                    "preparing the build workspace failed\n{}",
                    jobs::tail(output, 1500)
                ),
            );
        }
        if let Some(t) = failed(BUILD_CONTAINER) {
            if t.reason.as_deref() == Some("OOMKilled") {
                return (
                    "BuildOutOfMemory",
                    format!(
                        "the build ran out of memory (limit {}; jobs.build_memory_limit)",
                        settings.build_memory_limit
                    ),
                );
            }
            let output = jobs::tail(t.message.as_deref().unwrap_or_default(), 1500);
            let what = match build_type {
                BuildType::Buildpack => render::lifecycle_exit(t.exit_code)
                    .map(|band| format!("buildpacks: {band}, exit code {}", t.exit_code)),
                _ => None,
            }
            .unwrap_or_else(|| format!("the build failed with exit code {}", t.exit_code));
            return ("BuildFailed", format!("{what}\n{output}"));
        }
    }
    (
        "BuildFailed",
        format!("the build Job failed: {condition_reason} {condition_message}")
            .trim()
            .to_string(),
    )
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

fn set_condition(
    status: &mut AppBuildStatus,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let value = if ok { "True" } else { "False" };
    if let Some(existing) = status.conditions.iter_mut().find(|c| c.type_ == type_) {
        if existing.status != value || existing.reason != reason {
            existing.last_transition_time = now();
        }
        existing.status = value.into();
        existing.reason = reason.into();
        existing.message = message.into();
        existing.observed_generation = generation;
        return;
    }
    status.conditions.push(Condition {
        type_: type_.into(),
        status: value.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now(),
    });
}

/// Writes the whole status (server-side apply, so it is idempotent) unless unchanged.
/// Writes the whole status (server-side apply) unless unchanged, on the condition that the
/// AppBuild is still at `version`: a reconcile working from a cache that lags behind (another
/// writer, or the relay holding the watch back) gets a conflict and runs again on fresh data,
/// instead of setting the status back. `version` follows each write.
async fn write_status(
    api: &Api<AppBuild>,
    build: &AppBuild,
    status: &AppBuildStatus,
    version: &mut Option<String>,
) -> Result<(), ReconcileError> {
    if build.status.as_ref() == Some(status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
        "metadata": {"resourceVersion": version},
        "status": status,
    });
    let written = api
        .patch_status(
            &build.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    *version = written.resource_version();
    Ok(())
}

fn fail(status: &mut AppBuildStatus, reason: &str, message: String, generation: Option<i64>) {
    let condition = if status.image.is_some() && reason.starts_with("Deploy") {
        "Deployed"
    } else {
        "Built"
    };
    set_condition(status, condition, false, reason, &message, generation);
    status.phase = Some(AppBuildPhase::Failed);
    status.reason = Some(reason.to_string());
    status.message = Some(message);
    status.completion_time = Some(now());
}

fn owner(build: &AppBuild) -> Value {
    build
        .controller_owner_ref(&())
        .map(|o| serde_json::to_value(o).unwrap_or(Value::Null))
        .unwrap_or(Value::Null)
}

/// Ties the AppBuild to its App (deleting the App deletes its builds) and labels it.
async fn adopt(
    api: &Api<AppBuild>,
    build: &AppBuild,
    app: &App,
    inputs: Option<&str>,
    version: &mut Option<String>,
) -> Result<(), ReconcileError> {
    let has_owner = build
        .owner_references()
        .iter()
        .any(|o| Some(&o.uid) == app.metadata.uid.as_ref());
    let labelled = build.labels().get(APP_LABEL) == Some(&app.name_any())
        && inputs.is_none_or(|h| build.labels().get(INPUTS_LABEL).map(String::as_str) == Some(h));
    if has_owner && labelled {
        return Ok(());
    }
    let mut owner = app
        .owner_ref(&())
        .map(|o| serde_json::to_value(o).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    owner["blockOwnerDeletion"] = false.into();
    let mut labels = json!({ APP_LABEL: app.name_any() });
    if let Some(hash) = inputs {
        labels[INPUTS_LABEL] = hash.into();
    }
    let patch = json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
        "metadata": {"name": build.name_any(), "labels": labels, "ownerReferences": [owner],
            "resourceVersion": version},
    });
    let written = api
        .patch(
            &build.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    *version = written.resource_version();
    Ok(())
}

fn git_auth(app: &App) -> GitAuth {
    let Some(git) = &app.spec.git else {
        return GitAuth::None;
    };
    let known_hosts_config_map = super::app::known_hosts_config_map(&app.name_any());
    match (super::app::git_remote(&git.url), &git.secret_name) {
        (super::app::GitRemote::Ssh { .. }, Some(secret)) => GitAuth::Ssh {
            secret: secret.clone(),
            known_hosts_config_map,
        },
        (super::app::GitRemote::Ssh { .. }, None) => GitAuth::Ssh {
            secret: super::app::deploy_key_secret(&app.name_any()),
            known_hosts_config_map,
        },
        (super::app::GitRemote::Other, Some(secret)) => GitAuth::Https {
            secret: secret.clone(),
        },
        (super::app::GitRemote::Other, None) => GitAuth::None,
    }
}

fn registry_secret(app: &App) -> String {
    app.spec
        .registry
        .secret_name
        .clone()
        .unwrap_or_else(|| crate::controllers::project::REGISTRY_SECRET.into())
}

/// Decides where a Pending build's image comes from, creating the build Job when it must be
/// built. Leaves `status.image` set (deploy next) or `status.jobName` set (build running).
async fn start(
    build: &AppBuild,
    app: &App,
    status: &mut AppBuildStatus,
    ctx: &Context,
    store: &Store<AppBuild>,
    version: &mut Option<String>,
) -> Result<(), ReconcileError> {
    let ns = build.namespace().unwrap_or_default();
    let name = build.name_any();
    let generation = build.metadata.generation;
    let api: Api<AppBuild> = Api::namespaced(ctx.client.clone(), &ns);
    let settings = &ctx.config.jobs;

    if app.spec.build.build_type == BuildType::Image {
        let reference = app.spec.build.image.clone().unwrap_or_default();
        let mut image = ImageRef::parse(&reference)
            .map_err(|e| ReconcileError::Invalid(format!("spec.build.image: {e}")))?;
        if let Some(tag) = &build.spec.image_tag {
            image.tag = Some(tag.clone());
            image.digest = None;
        }
        adopt(&api, build, app, None, version).await?;
        status.image_tag = image.tag.clone();
        status.image = Some(image.to_string());
        let message = format!("pre-built image {image}");
        set_condition(status, "Built", true, "PrebuiltImage", &message, generation);
        status.message = Some(message);
        return Ok(());
    }

    let git_ref = match (&build.spec.git_ref, &build.spec.image_tag) {
        (None, None) => {
            adopt(&api, build, app, None, version).await?;
            let current = app.status.as_ref().and_then(|s| s.current_image.clone());
            let Some(image) = current else {
                fail(
                    status,
                    "NothingToRedeploy",
                    "neither spec.gitRef nor spec.imageTag is set, which redeploys the App's current image, and the App has none yet".into(),
                    generation,
                );
                return Ok(());
            };
            status.image_tag = ImageRef::parse(&image).ok().and_then(|i| i.tag);
            let message = format!("redeploying the App's current image {image}");
            set_condition(status, "Built", true, "Redeploy", &message, generation);
            status.message = Some(message);
            status.image = Some(image);
            return Ok(());
        }
        (Some(git_ref), _) => git_ref.clone(),
        (None, Some(_)) => match app.spec.git.as_ref().and_then(|g| g.branch.clone()) {
            Some(branch) => branch,
            None => {
                fail(
                    status,
                    "InvalidSpec",
                    "spec.gitRef is empty and the App has no spec.git.branch to build".into(),
                    generation,
                );
                return Ok(());
            }
        },
    };

    // The same commit built with the same inputs already: reuse its image.
    let inputs =
        render::is_commit_sha(&git_ref).then(|| inputs_hash(app, build, &git_ref, settings));
    if let Some(hash) = &inputs {
        let earlier = store
            .state()
            .into_iter()
            .filter(|b| {
                b.namespace() == build.namespace()
                    && b.name_any() != name
                    && b.labels().get(INPUTS_LABEL) == Some(hash)
                    && b.status.as_ref().and_then(|s| s.phase) == Some(AppBuildPhase::Completed)
                    && b.status.as_ref().is_some_and(|s| s.image.is_some())
            })
            .max_by_key(|b| {
                b.status
                    .as_ref()
                    .and_then(|s| s.completion_time.clone())
                    .map(|t| t.0)
            });
        if let Some(earlier) = earlier {
            let earlier_status = earlier.status.clone().unwrap_or_default();
            adopt(&api, build, app, Some(hash), version).await?;
            status.image = earlier_status.image;
            status.image_tag = earlier_status.image_tag;
            status.git_commit = earlier_status.git_commit;
            let message = format!(
                "reusing the image of build {} (same commit and build inputs)",
                earlier.name_any()
            );
            set_condition(status, "Built", true, "Reused", &message, generation);
            status.message = Some(message);
            return Ok(());
        }
    }

    let registry = app.spec.registry.url.clone().unwrap_or_default();
    let tag = image_tag(build, &git_ref);
    let (image, cache) = destinations(&registry, &ns, &app.name_any(), &tag)
        .map_err(|e| ReconcileError::Invalid(format!("image destination: {e}")))?;
    adopt(&api, build, app, inputs.as_deref(), version).await?;

    let owner = owner(build);
    let env_secret = env_secret_name(&name);
    let use_env =
        app.spec.build.build_type == BuildType::Buildpack && !build.spec.build_vars.is_empty();
    if use_env {
        let secret = render::platform_env_secret(
            &env_secret,
            &ns,
            &platform_env(&build.spec.build_vars),
            &[(APP_LABEL, &app.name_any()), (BUILD_LABEL, &name)],
            owner.clone(),
        );
        jobs::create_once(&Api::<Secret>::namespaced(ctx.client.clone(), &ns), &secret).await?;
    }
    let job_name = build_job_name(&name);
    let app_name = app.name_any();
    let git = app.spec.git.clone().unwrap_or_default();
    let node_affinity = build
        .spec
        .build_node_affinity
        .as_ref()
        .map(|a| serde_json::to_value(a).unwrap_or(Value::Null));
    let registry_secret = registry_secret(app);
    let spec = BuildJob {
        name: &job_name,
        namespace: &ns,
        build: &name,
        app: &app_name,
        build_type: app.spec.build.build_type,
        git_url: &git.url,
        git_ref: &git_ref,
        git_auth: git_auth(app),
        context_dir: app.spec.build.context_dir.as_deref(),
        dockerfile_path: app.spec.build.dockerfile_path.as_deref(),
        builder_image: app.spec.build.builder_image.as_deref(),
        image: &image,
        cache: &cache,
        build_args: build_args(&build.spec.build_vars),
        platform_env_secret: use_env.then_some(env_secret.as_str()),
        registry_secret: &registry_secret,
        owner,
        node_affinity,
    };
    let job = render::build_job(&spec, settings);
    jobs::create_once(&Api::<Job>::namespaced(ctx.client.clone(), &ns), &job).await?;
    status.job_name = Some(job_name);
    status.image_tag = Some(tag);
    status.message = Some(format!("building {git_ref} into {image}"));
    set_condition(
        status,
        "Built",
        false,
        "Building",
        "the build Job runs",
        generation,
    );
    Ok(())
}

/// Follows the build Job: Building when its pod runs, Deploying when it succeeded (with the
/// commit and image digest its containers reported), Failed with the reason when it failed.
async fn follow_build(
    build: &AppBuild,
    app: &App,
    status: &mut AppBuildStatus,
    ctx: &Context,
    store: &Store<AppBuild>,
) -> Result<(), ReconcileError> {
    let ns = build.namespace().unwrap_or_default();
    let generation = build.metadata.generation;
    let job_name = status.job_name.clone().unwrap_or_default();
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(job) = jobs_api.get_opt(&job_name).await? else {
        fail(
            status,
            "BuildJobLost",
            format!(
                "the build Job {job_name} was deleted (or expired) before its result was recorded"
            ),
            generation,
        );
        return Ok(());
    };
    let pods = jobs::job_pods(&pods_api, &job_name).await?;
    if let Some(pod) = pods.first() {
        relay_log(ctx, store, &ns, &build.name_any(), &pod.name_any());
    }
    for pod in &pods {
        if let Some(commit) = jobs::terminated(pod, COMMIT_CONTAINER)
            .filter(|t| t.exit_code == 0)
            .and_then(|t| t.message.as_deref())
            .map(str::trim)
            .filter(|m| render::is_commit_sha(m))
        {
            status.git_commit = Some(commit.to_string());
        }
        if started(pod) && status.phase != Some(AppBuildPhase::Building) {
            status.phase = Some(AppBuildPhase::Building);
            status.pod_name = Some(pod.name_any());
            status.build_start_time = Some(now());
        }
    }
    let git_ref = build.spec.git_ref.clone().unwrap_or_default();
    match jobs::outcome(&job) {
        Outcome::Running => {}
        Outcome::Succeeded => {
            let tag = status.image_tag.clone().unwrap_or_default();
            let registry = app.spec.registry.url.clone().unwrap_or_default();
            let (mut image, _) = destinations(&registry, &ns, &app.name_any(), &tag)
                .map_err(|e| ReconcileError::Invalid(format!("image destination: {e}")))?;
            // kaniko writes the pushed digest as its termination message: deploy exactly it.
            image.digest = pods
                .iter()
                .find_map(|p| jobs::terminated(p, BUILD_CONTAINER))
                .and_then(|t| t.message.as_deref())
                .map(str::trim)
                .filter(|m| {
                    m.strip_prefix("sha256:")
                        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                })
                .map(String::from);
            status.image = Some(image.to_string());
            status.build_end_time = Some(
                job.status
                    .as_ref()
                    .and_then(|s| s.completion_time.clone())
                    .unwrap_or_else(now),
            );
            status.message = Some(format!("built {image}"));
            set_condition(
                status,
                "Built",
                true,
                "BuildSucceeded",
                &format!("built {image}"),
                generation,
            );
        }
        Outcome::Failed { reason, message } => {
            let (reason, message) = build_failure(
                &reason,
                &message,
                &pods,
                app.spec.build.build_type,
                &git_ref,
                &ctx.config.jobs,
            );
            status.build_end_time = Some(now());
            fail(status, reason, message, generation);
        }
    }
    Ok(())
}

/// Whether a build pod has started: running, or (while init containers run the clone, the
/// pod's phase is still Pending) any container has started (pure).
pub fn started(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        || jobs::container_statuses(pod).any(jobs::has_started)
}

/// Starts relaying the build pod's log, once per build for the life of the hub (a reconcile
/// may run on a cache that lags behind while the relay pushes back, so the record of a
/// relayed log outlives its follower; records of builds that are gone are pruned).
fn relay_log(ctx: &Context, store: &Store<AppBuild>, ns: &str, build: &str, pod: &str) {
    let Some(journal) = ctx.journal.clone() else {
        return;
    };
    if ctx.log_followers.len() > 4096 {
        ctx.log_followers.retain(|key| {
            let (ns, name) = key.split_once('/').unwrap_or_default();
            store.get(&ObjectRef::new(name).within(ns)).is_some()
        });
    }
    if !ctx.log_followers.insert(format!("{ns}/{build}")) {
        return;
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let (cluster, ns, build, pod) = (
        ctx.cluster.clone(),
        ns.to_string(),
        build.to_string(),
        pod.to_string(),
    );
    tokio::spawn(async move {
        let result = crate::relay::logs::follow_pod(&pods, &pod, true, |container, line| {
            let journal = journal.clone();
            let (cluster, ns, build) = (cluster.clone(), ns.clone(), build.clone());
            async move {
                journal
                    .log_line(&cluster, &ns, &build, &container, line, false)
                    .await;
                true
            }
        })
        .await;
        if let Err(err) = &result {
            tracing::warn!(%cluster, namespace = %ns, %build, error = %err, "following the build log failed");
        }
        journal
            .log_line(&cluster, &ns, &build, "", String::new(), true)
            .await;
    });
}

/// Deploys `status.image` with a Helm Job and follows it to Completed or Failed.
async fn deploy(
    build: &AppBuild,
    app: &App,
    status: &mut AppBuildStatus,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let ns = build.namespace().unwrap_or_default();
    let name = build.name_any();
    let generation = build.metadata.generation;
    let settings = &ctx.config.jobs;
    let image_text = status.image.clone().unwrap_or_default();
    let image = ImageRef::parse(&image_text)
        .map_err(|e| ReconcileError::Invalid(format!("image to deploy: {e}")))?;
    let app_name = app.name_any();
    let owner = owner(build);
    let labels = [
        (APP_LABEL, app_name.as_str()),
        (BUILD_LABEL, name.as_str()),
        (STEP_LABEL, "deploy"),
    ];
    let values_name = values_secret_name(&name);
    let values = helm_values(
        &image,
        &registry_secret(app),
        build.spec.helm_values.as_ref(),
    );
    let secret = render::values_secret(&values_name, &ns, &values, &labels, Some(owner.clone()));
    jobs::create_once(&Api::<Secret>::namespaced(ctx.client.clone(), &ns), &secret).await?;
    let chart = Chart::parse(&settings.app_chart).ok_or_else(|| {
        ReconcileError::Invalid(format!(
            "jobs.app_chart {:?} is not a chart reference",
            settings.app_chart
        ))
    })?;
    let job_name = deploy_job_name(&name);
    let job = render::helm_job(
        &HelmJob {
            name: &job_name,
            namespace: &ns,
            release: &app_name,
            action: HelmAction::Upgrade {
                chart: &chart,
                version: Some(&settings.app_chart_version),
                values_secret: &values_name,
            },
            labels: labels.to_vec(),
            owner: Some(owner),
            service_account: crate::controllers::project::DEPLOYER,
        },
        settings,
    );
    let job = jobs::create_once(&Api::<Job>::namespaced(ctx.client.clone(), &ns), &job).await?;
    if status.phase != Some(AppBuildPhase::Deploying) {
        // Say where the image came from (built, reused, pre-built, redeployed) and what now.
        let origin = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Built" && c.status == "True")
            .map(|c| c.message.clone())
            .unwrap_or_else(|| format!("image {image}"));
        status.phase = Some(AppBuildPhase::Deploying);
        status.helm_job_name = Some(job_name.clone());
        status.message = Some(format!("{origin}; deploying with helm"));
    }
    match jobs::outcome(&job) {
        Outcome::Running => {}
        Outcome::Succeeded => {
            record_deploy(ctx, &ns, &app_name, &image_text, &name).await?;
            status.phase = Some(AppBuildPhase::Completed);
            status.reason = None;
            status.message = Some(format!("deployed {image}"));
            status.completion_time = Some(now());
            set_condition(
                status,
                "Deployed",
                true,
                "Deployed",
                &format!("release {app_name} runs {image}"),
                generation,
            );
        }
        Outcome::Failed { message, .. } => {
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            let output = jobs::helm_failure(&pods, &job_name, &message).await?;
            status.failed_helm_job_name = Some(job_name);
            fail(
                status,
                "DeployFailed",
                format!("helm upgrade --install failed\n{output}"),
                generation,
            );
        }
    }
    Ok(())
}

/// Records a successful deploy on the App: current image, the one before it, latest build.
/// Guarded by the App's resourceVersion, so two builds finishing at once cannot interleave.
async fn record_deploy(
    ctx: &Context,
    ns: &str,
    app_name: &str,
    image: &str,
    build: &str,
) -> Result<(), ReconcileError> {
    let apps: Api<App> = Api::namespaced(ctx.client.clone(), ns);
    let Some(app) = apps.get_opt(app_name).await? else {
        return Ok(());
    };
    let status = app.status.clone().unwrap_or_default();
    if status.current_image.as_deref() == Some(image)
        && status.latest_build.as_deref() == Some(build)
    {
        return Ok(());
    }
    let previous = match &status.current_image {
        Some(current) if current != image => Some(current.clone()),
        _ => status.previous_image.clone(),
    };
    let patch = json!({
        "metadata": {"resourceVersion": app.resource_version()},
        "status": {"currentImage": image, "previousImage": previous, "latestBuild": build},
    });
    let params = PatchParams {
        field_manager: Some(APP_STATUS_MANAGER.into()),
        ..Default::default()
    };
    apps.patch_status(app_name, &params, &Patch::Merge(&patch))
        .await?;
    Ok(())
}

async fn reconcile(
    build: Arc<AppBuild>,
    ctx: Arc<Context>,
    store: Store<AppBuild>,
) -> Result<Action, ReconcileError> {
    if build.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = build.namespace().unwrap_or_default();
    let api: Api<AppBuild> = Api::namespaced(ctx.client.clone(), &ns);
    let original = build.status.clone().unwrap_or_default();
    if matches!(
        original.phase,
        Some(AppBuildPhase::Completed | AppBuildPhase::Failed)
    ) {
        return Ok(Action::await_change());
    }
    let mut status = original.clone();
    let mut version = build.resource_version();
    status.observed_generation = build.metadata.generation;
    if status.phase.is_none() {
        // Accepted: recorded on its own, so Pending is seen even when the build starts at once.
        status.phase = Some(AppBuildPhase::Pending);
        status.start_time = Some(now());
        status.message = Some("accepted".into());
        write_status(&api, &build, &status, &mut version).await?;
    }

    let apps: Api<App> = Api::namespaced(ctx.client.clone(), &ns);
    let app_name = &build.spec.app_name;
    let app = match apps.get_opt(app_name).await? {
        Some(app) if app.metadata.deletion_timestamp.is_none() => app,
        // The App's creation (a watched event) brings the next reconcile.
        _ => {
            status.message = Some(format!("waiting for App {app_name} to exist"));
            write_status(&api, &build, &status, &mut version).await?;
            return Ok(Action::await_change());
        }
    };
    let app_phase = app.status.as_ref().and_then(|s| s.phase);
    let result = if status.phase == Some(AppBuildPhase::Pending)
        && status.job_name.is_none()
        && status.image.is_none()
    {
        if app_phase != Some(AppPhase::Ready) {
            let detail = app
                .status
                .as_ref()
                .and_then(|s| s.message.clone())
                .unwrap_or_default();
            status.message = Some(
                format!("waiting for App {app_name} to be Ready: {detail}")
                    .trim_end_matches([' ', ':'])
                    .to_string(),
            );
            write_status(&api, &build, &status, &mut version).await?;
            return Ok(Action::await_change());
        }
        start(&build, &app, &mut status, &ctx, &store, &mut version).await
    } else {
        Ok(())
    };
    let result = match result {
        Ok(()) if status.phase == Some(AppBuildPhase::Failed) => Ok(()),
        Ok(()) if status.image.is_none() => {
            follow_build(&build, &app, &mut status, &ctx, &store).await
        }
        other => other,
    };
    let result = match result {
        Ok(()) if status.image.is_some() && status.phase != Some(AppBuildPhase::Failed) => {
            deploy(&build, &app, &mut status, &ctx).await
        }
        other => other,
    };
    if let Err(ReconcileError::Invalid(message)) = &result {
        fail(
            &mut status,
            "InvalidSpec",
            message.clone(),
            build.metadata.generation,
        );
    }
    write_status(&api, &build, &status, &mut version).await?;
    match result {
        Err(ReconcileError::Invalid(_)) => Ok(Action::await_change()),
        other => other.map(|()| Action::await_change()),
    }
}

fn error_policy(build: Arc<AppBuild>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    tracing::warn!(cluster = %ctx.cluster, build = %build.name_any(), namespace = ?build.namespace(),
        category = error.category(), %error, "reconcile failed");
    retry_after(error)
}

/// Runs the AppBuild controller; stop it by dropping the future.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let metrics = ctx.metrics.clone();
    let managed = format!("{}={}", super::MANAGED_BY.0, super::MANAGED_BY.1);
    let (store, stream) = super::trimmed_reflector(Api::<AppBuild>::all(client.clone()), &ctx);
    let reconcile_store = store.clone();
    let app_store = store.clone();
    let pod_selector = format!("{managed},{BUILD_LABEL}");
    Controller::for_stream(stream, store)
        .with_config(super::controller_config())
        .owns_stream(
            watcher(
                Api::<PartialObjectMeta<Job>>::all(client.clone()),
                watcher::Config::default().labels(&managed),
            )
            .touched_objects(),
        )
        // Pods of build and deploy Jobs (metadata only: a status change still bumps the
        // resourceVersion and so arrives as an event).
        .watches_stream(
            watcher(
                Api::<PartialObjectMeta<Pod>>::all(client.clone()),
                watcher::Config::default().labels(&pod_selector),
            )
            .touched_objects(),
            |pod| {
                let build = pod.labels().get(BUILD_LABEL)?;
                Some(ObjectRef::<AppBuild>::new(build).within(&pod.namespace()?))
            },
        )
        // An App becoming Ready (or appearing) starts the builds waiting for it.
        .watches_stream(
            watcher(
                Api::<PartialObjectMeta<App>>::all(client),
                watcher::Config::default(),
            )
            .touched_objects(),
            move |app| {
                let ns = app.namespace();
                let name = app.name_any();
                app_store
                    .state()
                    .iter()
                    .filter(|b| b.namespace() == ns && b.spec.app_name == name)
                    .filter(|b| {
                        b.status
                            .as_ref()
                            .and_then(|s| s.job_name.as_ref())
                            .is_none()
                    })
                    .map(|b| ObjectRef::from_obj(b.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .run(
            super::bounded(move |build, ctx| reconcile(build, ctx, reconcile_store.clone())),
            error_policy,
            ctx,
        )
        .for_each(|result| {
            metrics.record("appbuild", &result);
            async {}
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::jobs::JobSettings;

    fn pod(statuses: Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "status": statuses})).unwrap()
    }

    fn terminated(name: &str, code: i32, reason: &str, message: &str) -> Value {
        json!({"name": name, "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": reason, "message": message}}})
    }

    #[test]
    fn failures_name_their_cause() {
        let settings = JobSettings::default();
        let clone = pod(json!({"initContainerStatuses": [terminated(
            "clone", 128, "Error", "fatal: Remote branch nope not found in upstream origin")]}));
        let (reason, message) = build_failure(
            "BackoffLimitExceeded",
            "",
            &[clone],
            BuildType::Dockerfile,
            "nope",
            &settings,
        );
        assert_eq!(reason, "GitCloneFailed");
        assert!(
            message.starts_with("git ref 'nope' was not found"),
            "{message}"
        );
        assert!(message.contains("fatal: Remote branch nope"), "{message}");

        let key = pod(json!({"initContainerStatuses": [terminated(
            "clone", 128, "Error", "git@github.com: Permission denied (publickey).")]}));
        let (_, message) = build_failure("", "", &[key], BuildType::Dockerfile, "main", &settings);
        assert!(message.contains("status.deployKey"), "{message}");

        let cnb = pod(
            json!({"initContainerStatuses": [terminated("clone", 0, "Completed", "")],
            "containerStatuses": [terminated("build", 20, "Error", "ERROR: No buildpack groups passed detection.")]}),
        );
        let (reason, message) =
            build_failure("", "", &[cnb], BuildType::Buildpack, "main", &settings);
        assert_eq!(reason, "BuildFailed");
        assert!(
            message.starts_with("buildpacks: no buildpack detected"),
            "{message}"
        );
        assert!(message.contains("No buildpack groups passed detection"));

        let oom = pod(json!({"containerStatuses": [terminated("build", 137, "OOMKilled", "")]}));
        assert_eq!(
            build_failure("", "", &[oom], BuildType::Dockerfile, "main", &settings).0,
            "BuildOutOfMemory"
        );
        let kaniko = pod(json!({"containerStatuses": [terminated(
            "build", 1, "Error", "error building image: RUN false: exit status 1")]}));
        let (reason, message) =
            build_failure("", "", &[kaniko], BuildType::Dockerfile, "main", &settings);
        assert_eq!(reason, "BuildFailed");
        assert!(
            message.contains("exit code 1") && message.contains("RUN false"),
            "{message}"
        );
        assert_eq!(
            build_failure(
                "DeadlineExceeded",
                "",
                &[],
                BuildType::Dockerfile,
                "main",
                &settings
            )
            .0,
            "BuildTimedOut"
        );
    }

    #[test]
    fn image_tags_default_to_the_commit_or_the_build_name() {
        let mut build = AppBuild::new("web-7", Default::default());
        let sha = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(image_tag(&build, sha), "0123456789ab");
        assert_eq!(image_tag(&build, "main"), "web-7");
        build.spec.image_tag = Some("v1.2".into());
        assert_eq!(image_tag(&build, sha), "v1.2");
    }

    #[test]
    fn inputs_hash_changes_with_build_vars_but_not_their_order() {
        let settings = JobSettings::default();
        let app: App = serde_json::from_value(json!({"apiVersion": "apps.shapeblock.io/v1alpha1",
            "kind": "App", "metadata": {"name": "web"}, "spec": {"displayName": "Web",
            "git": {"url": "https://x/r.git"}, "registry": {"url": "r.example.com"},
            "build": {"type": "dockerfile"}}}))
        .unwrap();
        let build = |vars: Value| -> AppBuild {
            serde_json::from_value(json!({"apiVersion": "apps.shapeblock.io/v1alpha1",
                "kind": "AppBuild", "metadata": {"name": "b"}, "spec": {"appName": "web",
                "buildVars": vars}}))
            .unwrap()
        };
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let a = inputs_hash(
            &app,
            &build(json!([{"key": "A", "value": "1"}, {"key": "B", "value": "2"}])),
            sha,
            &settings,
        );
        let b = inputs_hash(
            &app,
            &build(json!([{"key": "B", "value": "2"}, {"key": "A", "value": "1"}])),
            sha,
            &settings,
        );
        let c = inputs_hash(
            &app,
            &build(json!([{"key": "A", "value": "1"}])),
            sha,
            &settings,
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 16);
        assert_ne!(
            a,
            inputs_hash(
                &app,
                &build(json!([{"key": "A", "value": "1"}, {"key": "B", "value": "2"}])),
                &"f".repeat(40),
                &settings
            )
        );
    }
}
