//! AppBuild: builds an App's image with a Job (git clone, then kaniko or the buildpacks
//! `creator`), or takes a pre-built or earlier image, then deploys it with a Helm Job, and
//! records every step in status: Pending → Building → Deploying → Completed | Failed.
//!
//! Each reconcile reads what the cluster holds, takes one [`decide::Step`] (pure, in
//! [`decide`]), applies it, and reports the status it leads to (with Events); failures are
//! named by [`failure::FailureReason`].
//!
//! Watch-driven: the AppBuild, its Jobs, the pods of its Jobs (metadata only) and its App
//! bring reconciles; nothing polls. Every child has a deterministic name, so a hub restarted
//! mid-build finds what it created instead of creating it twice, and every decision is taken
//! again from what the cluster holds.

mod decide;
mod failure;
mod history;

pub use decide::{
    Observed, POD_CREATE_GRACE, Step, awaiting_pod, decide, recheck_pod_creation, started,
    status_after,
};
pub use failure::{FailureReason, build_failure, clone_failure};
pub use history::prune;

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use sha2::Digest;

use super::jobs;
use super::{Context, ReconcileError};
use crate::crd::{App, AppBuild, AppBuildPhase, AppBuildStatus, BuildType, FIELD_MANAGER};
use crate::observed::{self, Outcome};
use crate::render::app::{ChartKind, Release};
use crate::render::build::{build_args, child_name, platform_env};
use crate::render::image::ImageRef;
use crate::render::jobs::{
    self as render, APP_LABEL, BUILD_LABEL, BuildJob, Chart, GitAuth, HelmAction, HelmJob,
    STEP_LABEL,
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
pub fn chart_config_map_name(build: &str) -> String {
    child_name(build, "chart")
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
    // The App is an input: its image lives under its own repository path, and another App
    // of the same repository checks the host with its own settings (knownHosts, secret).
    let inputs = json!([
        app.name_any(),
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
    let key = crate::relay::delivery::BuildKey {
        cluster: ctx.cluster.clone(),
        namespace: ns.to_string(),
        build: build.to_string(),
    };
    tokio::spawn(crate::relay::delivery::relay_build_log(
        journal,
        pods,
        key,
        pod.to_string(),
    ));
}

/// The build pod of a build whose build ended less than
/// [`RESEND_AFTER_RESTART`](crate::relay::delivery::RESEND_AFTER_RESTART) ago: after a hub
/// restart its log is sent again (the server may have missed its end while the hub was down).
fn recently_built(build: &AppBuild) -> Option<&str> {
    if build.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = build.status.as_ref()?;
    let ended = status.build_end_time.as_ref()?.0;
    let window =
        jiff::SignedDuration::try_from(crate::relay::delivery::RESEND_AFTER_RESTART).ok()?;
    (jiff::Timestamp::now().duration_since(ended) < window)
        .then_some(status.pod_name.as_deref())
        .flatten()
}

/// Records a successful deploy on the App: current image, the one before it, latest build.
/// Guarded by the App's resourceVersion, so two builds finishing at once cannot interleave.
/// Returns the App as it now stands (`None` when it is gone).
async fn record_deploy(
    ctx: &Context,
    ns: &str,
    app_name: &str,
    image: &str,
    build: &str,
) -> Result<Option<App>, ReconcileError> {
    let apps: Api<App> = Api::namespaced(ctx.client.clone(), ns);
    let Some(app) = apps.get_opt(app_name).await? else {
        return Ok(None);
    };
    let status = app.status.clone().unwrap_or_default();
    if status.current_image.as_deref() == Some(image)
        && status.latest_build.as_deref() == Some(build)
    {
        return Ok(Some(app));
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
    let recorded = apps
        .patch_status(app_name, &params, &Patch::Merge(&patch))
        .await?;
    Ok(Some(recorded))
}

/// The types of the two conditions an AppBuild carries: its image is built, and deployed.
pub const BUILT: &str = "Built";
pub const DEPLOYED: &str = "Deployed";

/// Children read for one reconcile.
#[derive(Default)]
struct Children {
    not_in_project: Option<super::tenancy::NotInProject>,
    app: Option<App>,
    build_job: Option<Job>,
    build_pods: Vec<Pod>,
    build_job_failures: Vec<Event>,
    deploy_job: Option<Job>,
    deploy_output: Option<String>,
    rollback_values: Option<Value>,
    workloads: Option<Vec<Deployment>>,
}

/// Reads what the next decision needs, and nothing more: the App, then the build Job and its
/// pods while a build runs (and its `FailedCreate` Events, only once it has had no pod for
/// [`POD_CREATE_GRACE`]), or the deploy Job (and a failed one's output) once the image is
/// known.
async fn read(build: &AppBuild, ctx: &Context) -> Result<Children, ReconcileError> {
    let ns = build.namespace().unwrap_or_default();
    let status = build.status.clone().unwrap_or_default();
    let mut children = Children::default();
    let finished = matches!(
        status.phase,
        Some(AppBuildPhase::Completed | AppBuildPhase::Failed)
    );
    if finished || build.metadata.deletion_timestamp.is_some() {
        return Ok(children);
    }
    // Before anything else: outside a project nothing more is read, nothing is created.
    children.not_in_project =
        super::tenancy::read(&ctx.client, &ns, &ctx.config.registry_source_namespace)
            .await?
            .err();
    if children.not_in_project.is_some() || status.phase.is_none() {
        return Ok(children);
    }
    children.app = Api::<App>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&build.spec.app_name)
        .await?
        .filter(|app| app.metadata.deletion_timestamp.is_none());
    if children.app.is_none() {
        return Ok(children);
    }
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    if status.image.is_some() {
        let name = deploy_job_name(&build.name_any());
        children.deploy_job = jobs_api.get_opt(&name).await?;
        match children.deploy_job.as_ref().map(observed::outcome) {
            Some(Outcome::Failed { message, .. }) => {
                children.deploy_output =
                    Some(jobs::helm_failure(&pods_api, &name, &message).await?);
            }
            Some(Outcome::Succeeded) => {
                // The release's Deployments: helm annotates every object with its release.
                let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
                children.workloads = Some(deployments.list(&ListParams::default()).await?.items);
            }
            Some(Outcome::Running) => {}
            None => {
                if let Some(target) = &build.spec.rollback_to {
                    children.rollback_values = read_values(ctx, &ns, target).await?;
                }
            }
        }
    } else if let Some(name) = &status.job_name {
        children.build_job = jobs_api.get_opt(name).await?;
        if let Some(job) = &children.build_job {
            children.build_pods = jobs::job_pods(&pods_api, name).await?;
            if awaiting_pod(job, &children.build_pods, jiff::Timestamp::now())
                .is_some_and(|waited| waited >= POD_CREATE_GRACE)
            {
                children.build_job_failures = jobs::failed_creates(&ctx.client, job).await?;
            }
        }
    }
    Ok(children)
}

/// The Helm values an earlier build deployed with, from its values Secret.
async fn read_values(
    ctx: &Context,
    ns: &str,
    build: &str,
) -> Result<Option<Value>, ReconcileError> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let Some(secret) = secrets.get_opt(&values_secret_name(build)).await? else {
        return Ok(None);
    };
    let text = secret
        .data
        .as_ref()
        .and_then(|d| d.get("values.yaml"))
        .map(|b| b.0.clone())
        .unwrap_or_default();
    // The hub writes values as JSON (valid YAML); anything else is not ours to reuse.
    Ok(serde_json::from_slice(&text).ok())
}

/// Carries out a step's effects in the cluster (the status is written afterwards, by
/// [`report`]). `version` follows the AppBuild's resourceVersion through metadata writes.
async fn apply(
    step: &Step,
    build: &AppBuild,
    app: Option<&App>,
    ctx: &Context,
    store: &Store<AppBuild>,
    version: &mut Option<String>,
) -> Result<(), ReconcileError> {
    let ns = build.namespace().unwrap_or_default();
    let name = build.name_any();
    let api: Api<AppBuild> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(app) = app else {
        return Ok(());
    };
    match step {
        Step::Nothing
        | Step::NotInProject(_)
        | Step::Accept
        | Step::Wait { .. }
        | Step::WaitForDeploy { .. }
        | Step::DeployRunning
        | Step::RollingOut { .. } => {}
        Step::Fail { progress, .. } => {
            if let Some(pod) = &progress.log_pod {
                relay_log(ctx, store, &ns, &name, pod);
            }
            prune_history(ctx, store, app).await?;
        }
        Step::BuildRunning { progress } | Step::BuildSucceeded { progress, .. } => {
            if let Some(pod) = &progress.log_pod {
                relay_log(ctx, store, &ns, &name, pod);
            }
        }
        Step::UseImage { inputs, .. } => {
            adopt(&api, build, app, inputs.as_deref(), version).await?;
        }
        Step::StartBuild {
            git_ref,
            tag: _,
            image,
            cache,
            inputs,
        } => {
            adopt(&api, build, app, inputs.as_deref(), version).await?;
            start_build(build, app, git_ref, image, cache, ctx).await?;
        }
        Step::StartDeploy { image, values } => {
            start_deploy(build, app, image, values.as_ref(), ctx).await?
        }
        Step::Deployed { image } => {
            // The App as the deploy left it: this build counts as the current one.
            if let Some(recorded) =
                record_deploy(ctx, &ns, &app.name_any(), &image.to_string(), &name).await?
            {
                prune_history(ctx, store, &recorded).await?;
            }
        }
    }
    Ok(())
}

/// Deletes the App's oldest finished builds beyond `apps.keep_builds` (their Jobs, Secrets
/// and chart ConfigMap go with them).
async fn prune_history(
    ctx: &Context,
    store: &Store<AppBuild>,
    app: &App,
) -> Result<(), ReconcileError> {
    let ns = app.namespace().unwrap_or_default();
    let builds = store.state();
    let refs: Vec<&AppBuild> = builds.iter().map(|b| b.as_ref()).collect();
    let api: Api<AppBuild> = Api::namespaced(ctx.client.clone(), &ns);
    for name in prune(&refs, app, ctx.config.apps.keep_builds as usize) {
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {
                tracing::info!(namespace = %ns, build = %name, app = %app.name_any(), "pruned an old build")
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Creates the build Job (and the buildpacks env Secret when there are build vars).
async fn start_build(
    build: &AppBuild,
    app: &App,
    git_ref: &str,
    image: &ImageRef,
    cache: &ImageRef,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let ns = build.namespace().unwrap_or_default();
    let name = build.name_any();
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
    let registry_secret = super::app::registry_secret_name(app);
    let spec = BuildJob {
        name: &job_name,
        namespace: &ns,
        build: &name,
        app: &app_name,
        build_type: app.spec.build.build_type,
        git_url: &git.url,
        git_ref,
        git_auth: git_auth(app),
        context_dir: app.spec.build.context_dir.as_deref(),
        dockerfile_path: app.spec.build.dockerfile_path.as_deref(),
        builder_image: app.spec.build.builder_image.as_deref(),
        image,
        cache,
        build_args: build_args(&build.spec.build_vars),
        platform_env_secret: use_env.then_some(env_secret.as_str()),
        registry_secret: &registry_secret,
        owner,
        node_affinity,
    };
    let job = render::build_job(&spec, &ctx.config.jobs);
    jobs::create_once(&Api::<Job>::namespaced(ctx.client.clone(), &ns), &job).await?;
    Ok(())
}

/// Creates the deploy Job and what it reads: the values Secret (rendered from the App's run
/// spec, or a rollback target's values as they were) and, for the shipped chart, the chart's
/// ConfigMap.
async fn start_deploy(
    build: &AppBuild,
    app: &App,
    image: &ImageRef,
    rollback_values: Option<&Value>,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let ns = build.namespace().unwrap_or_default();
    let name = build.name_any();
    let settings = &ctx.config.jobs;
    let app_name = app.name_any();
    let owner = owner(build);
    let labels = [
        (APP_LABEL, app_name.as_str()),
        (BUILD_LABEL, name.as_str()),
        (STEP_LABEL, "deploy"),
    ];
    let apps = &ctx.config.apps;
    let pull_secret = super::app::registry_secret_name(app);
    let chart = match apps.chart {
        ChartKind::Builtin => {
            let config_map = chart_config_map_name(&name);
            let chart = crate::render::app::chart_config_map(
                &config_map,
                &ns,
                render::labels(&labels),
                Some(owner.clone()),
            );
            jobs::create_once(
                &Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns),
                &chart,
            )
            .await?;
            Chart::Shipped { config_map }
        }
        _ => Chart::parse(&settings.app_chart).ok_or_else(|| {
            ReconcileError::Internal(format!(
                "jobs.app_chart {:?} is not a chart reference",
                settings.app_chart
            ))
        })?,
    };
    let values_name = values_secret_name(&name);
    let values = match rollback_values {
        Some(values) => values.clone(),
        None => {
            let release = Release::new(
                &app_name,
                image.clone(),
                &pull_secret,
                app.spec.run.as_ref(),
                apps,
            );
            crate::render::app::values(&apps.chart, &release, build.spec.helm_values.as_ref())
        }
    };
    let secret = render::values_secret(&values_name, &ns, &values, &labels, Some(owner.clone()));
    jobs::create_once(&Api::<Secret>::namespaced(ctx.client.clone(), &ns), &secret).await?;
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
                registry_secret: settings
                    .app_chart_registry_auth
                    .then_some(pull_secret.as_str()),
                wait: false,
            },
            labels: labels.to_vec(),
            owner: Some(owner),
            service_account: crate::controllers::project::DEPLOYER,
        },
        settings,
    );
    jobs::create_once(&Api::<Job>::namespaced(ctx.client.clone(), &ns), &job).await?;
    Ok(())
}

/// Writes the status a step leads to, and tells the story as Events: a Normal Event for each
/// phase entered, a Warning with the failure's reason when the build fails.
///
/// A build enters each phase once, so its Event is published under a name of its own, and
/// before the status: a reconcile retried after the status write (its answer lost, or the
/// hub stopped in between) sees the phase already entered and would not publish it, while
/// one retried before it publishes the same Event again, which is then found there.
async fn report(
    build: &AppBuild,
    status: &AppBuildStatus,
    ctx: &Context,
    version: &mut Option<String>,
) -> Result<(), ReconcileError> {
    let before = build.status.as_ref().and_then(|s| s.phase);
    if let Some(phase) = status.phase
        && status.phase != before
    {
        let note = status.message.clone().unwrap_or_default();
        let event = match (phase, status.reason.as_deref()) {
            (AppBuildPhase::Failed, Some(reason)) => super::events::failed(reason, note),
            (phase, _) => super::events::phase(&format!("{phase:?}"), note),
        };
        let once = format!("{phase:?}").to_lowercase();
        super::events::publish_once(&ctx.client, &build.object_ref(&()), &once, event).await?;
    }
    let api: Api<AppBuild> =
        Api::namespaced(ctx.client.clone(), &build.namespace().unwrap_or_default());
    write_status(&api, build, status, version).await
}

async fn reconcile(
    build: Arc<AppBuild>,
    ctx: Arc<Context>,
    store: Store<AppBuild>,
) -> Result<Action, ReconcileError> {
    let children = read(&build, &ctx).await?;
    let siblings = store.state();
    let step = decide(&Observed {
        build: &build,
        not_in_project: children.not_in_project.as_ref(),
        app: children.app.as_ref(),
        siblings: &siblings,
        build_job: children.build_job.as_ref(),
        build_pods: &children.build_pods,
        build_job_failures: &children.build_job_failures,
        deploy_job: children.deploy_job.as_ref(),
        deploy_output: children.deploy_output.as_deref(),
        rollback_values: children.rollback_values.as_ref(),
        workloads: children.workloads.as_deref(),
        settings: &ctx.config.jobs,
    });
    // Once per build per hub process (nothing when this process relayed the log already):
    // after a restart, a build that ended shortly before has its log sent again, as the
    // server may have missed its end while the hub was down.
    if let Some(pod) = recently_built(&build) {
        let ns = build.namespace().unwrap_or_default();
        relay_log(&ctx, &store, &ns, &build.name_any(), pod);
    }
    if step == Step::Nothing {
        return Ok(Action::await_change());
    }
    let mut version = build.resource_version();
    apply(
        &step,
        &build,
        children.app.as_ref(),
        &ctx,
        &store,
        &mut version,
    )
    .await?;
    let status = status_after(&build, &step, &Time(jiff::Timestamp::now()));
    report(&build, &status, &ctx, &mut version).await?;
    if let Step::NotInProject(why) = step {
        // Retried with backoff (and brought back sooner by its App becoming Ready).
        return Err(why.into());
    }
    if let Step::Fail { reason, .. } = &step
        && reason.leaves_the_job_running()
        && let Some(job) = &children.build_job
    {
        // Only once the failure is recorded: a Job gone before that reads as BuildJobLost.
        jobs::delete_job(&ctx.client, job).await?;
    }
    // A build Job without a pod changes nothing the hub watches while its pod cannot be
    // created: look again. Otherwise the status (or metadata) just written, or a child's next
    // change, brings the next step.
    let waiting = children
        .build_job
        .as_ref()
        .filter(|_| matches!(step, Step::BuildRunning { .. }));
    match waiting.and_then(|job| awaiting_pod(job, &children.build_pods, jiff::Timestamp::now())) {
        Some(waited) => Ok(Action::requeue(recheck_pod_creation(waited))),
        None => Ok(Action::await_change()),
    }
}

/// The builds of an App that its changes move on, every one not yet finished: those waiting
/// for it to be Ready, those waiting for another build's deploy to end (which changes the
/// App and its Deployment), and those deploying it (following its rollout and runtime
/// status).
fn waiting_on_app(
    store: &Store<AppBuild>,
    ns: Option<&str>,
    app: &str,
) -> Vec<ObjectRef<AppBuild>> {
    store
        .state()
        .iter()
        .filter(|b| b.namespace().as_deref() == ns && b.spec.app_name == app)
        .filter(|b| {
            !matches!(
                b.status.as_ref().and_then(|s| s.phase),
                Some(AppBuildPhase::Completed | AppBuildPhase::Failed)
            )
        })
        .map(|b| ObjectRef::from_obj(b.as_ref()))
        .collect()
}

/// Runs the AppBuild controller (its Jobs, Apps and Deployments from the cluster's shared
/// watches); stop it by dropping the future.
pub async fn run(ctx: Arc<Context>, watches: &super::shared::Watches) {
    let client = ctx.client.clone();
    let metrics = ctx.metrics.clone();
    let managed = format!("{}={}", super::MANAGED_BY.0, super::MANAGED_BY.1);
    let (store, stream) = super::trimmed_reflector(Api::<AppBuild>::all(client.clone()), &ctx);
    // A build that finishes moves on the builds of its App still waiting (for its deploy to
    // end, say). The cache already holds the finished build when its event passes here, so
    // the woken builds decide from it, not from a cache that still shows it deploying.
    let (wake, woken) = tokio::sync::mpsc::unbounded_channel::<ObjectRef<AppBuild>>();
    let wake_store = store.clone();
    let stream = stream.inspect(move |event| {
        if let Ok(build) = event
            && matches!(
                build.status.as_ref().and_then(|s| s.phase),
                Some(AppBuildPhase::Completed | AppBuildPhase::Failed)
            )
        {
            for waiting in waiting_on_app(
                &wake_store,
                build.namespace().as_deref(),
                &build.spec.app_name,
            ) {
                let _ = wake.send(waiting);
            }
        }
    });
    let woken = futures_util::stream::unfold(woken, |mut rx| async move {
        rx.recv().await.map(|object| (object, rx))
    });
    let reconcile_store = store.clone();
    let app_store = store.clone();
    let deployment_store = store.clone();
    let pod_selector = format!("{managed},{BUILD_LABEL}");
    Controller::for_stream(stream, store)
        .with_config(super::controller_config())
        .reconcile_on(woken)
        .owns_shared_stream(watches.jobs.touched())
        // Pods of build and deploy Jobs (metadata only: a status change still bumps the
        // resourceVersion and so arrives as an event).
        .watches_stream(
            watcher(
                Api::<PartialObjectMeta<Pod>>::all(client.clone()),
                super::watch_config().labels(&pod_selector),
            )
            .touched_objects(),
            |pod| {
                let build = pod.labels().get(BUILD_LABEL)?;
                Some(ObjectRef::<AppBuild>::new(build).within(&pod.namespace()?))
            },
        )
        // An App becoming Ready (or appearing) starts the builds waiting for it; its runtime
        // status moves the builds deploying it.
        .watches_shared_stream(watches.apps.touched(), move |app: Arc<App>| {
            let ns = app.namespace();
            let name = app.name_any();
            waiting_on_app(&app_store, ns.as_deref(), &name)
        })
        // The App's Deployment rolling out brings the builds deploying it.
        .watches_shared_stream(
            watches.deployments.touched(),
            move |deployment: Arc<Deployment>| match deployment
                .labels()
                .get(crate::render::app::APP_LABEL)
            {
                Some(app) => {
                    waiting_on_app(&deployment_store, deployment.namespace().as_deref(), app)
                }
                None => vec![],
            },
        )
        .run(
            super::bounded("appbuild", move |build, ctx| {
                reconcile(build, ctx, reconcile_store.clone())
            }),
            |object, error, ctx| super::on_error("appbuild", object, error, ctx),
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
        // Another App of the same repository and commit builds its own image.
        let mut other = app.clone();
        other.metadata.name = Some("other".into());
        let same_vars = build(json!([{"key": "A", "value": "1"}, {"key": "B", "value": "2"}]));
        assert_ne!(a, inputs_hash(&other, &same_vars, sha, &settings));
    }
}
