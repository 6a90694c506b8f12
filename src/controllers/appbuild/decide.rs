//! The AppBuild state machine, as pure functions: [`decide`] takes what the cluster holds for
//! one AppBuild ([`Observed`]) and returns the one [`Step`] to take next; [`status_after`] says
//! what the status becomes once that step is applied. Nothing here does I/O, so every branch
//! is unit-tested without a cluster.
//!
//! ```text
//!  (new) ──Accept──▶ Pending ──UseImage (pre-built, redeploy, reused)──────────┐
//!                      │ └──StartBuild──▶ (job) ──BuildRunning──▶ Building      │
//!                      │                           └──BuildSucceeded──▶ (image) ┘
//!                      ▼                                                  │
//!                   Failed ◀──Fail (any step, with a FailureReason)       ▼
//!                                 Deploying ◀──StartDeploy / DeployRunning
//!                                     └──Deployed──▶ Completed
//! ```
//!
//! The state is read from `status` alone: no image and no `jobName` means the image source is
//! still to be chosen; `jobName` without an image means a build runs; an image means deploy.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::failure::{FailureReason, build_failure};
use super::{BUILT, DEPLOYED, INPUTS_LABEL, image_tag, inputs_hash};
use crate::crd::{App, AppBuild, AppBuildPhase, AppBuildStatus, AppPhase, BuildType};
use crate::observed::workload::{self, PodProblem, Rollout};
use crate::observed::{self, Outcome};
use crate::render::build::destinations;
use crate::render::image::ImageRef;
use crate::render::jobs::{self as render, BUILD_CONTAINER, COMMIT_CONTAINER, JobSettings};

/// What the cluster holds for one AppBuild, read before anything is decided.
pub struct Observed<'a> {
    pub build: &'a AppBuild,
    /// Why the AppBuild's namespace is not a project's, when it is not.
    pub not_in_project: Option<&'a crate::controllers::tenancy::NotInProject>,
    /// The AppBuild's App, unless it is missing or being deleted.
    pub app: Option<&'a App>,
    /// The other AppBuilds of the namespace (for reusing an image built from the same inputs).
    pub siblings: &'a [std::sync::Arc<AppBuild>],
    /// The build Job named in `status.jobName`, and its pods.
    pub build_job: Option<&'a Job>,
    pub build_pods: &'a [Pod],
    /// The `FailedCreate` Events of the build Job, read only while it has had no pod for
    /// [`POD_CREATE_GRACE`] (see [`awaiting_pod`]); empty otherwise.
    pub build_job_failures: &'a [Event],
    /// The deploy Job, once the image is known.
    pub deploy_job: Option<&'a Job>,
    /// The helm output of a failed deploy Job (read only when it failed).
    pub deploy_output: Option<&'a str>,
    /// For `spec.rollbackTo`, before its deploy starts: the target's Helm values as it
    /// deployed them (`None` when they are gone).
    pub rollback_values: Option<&'a serde_json::Value>,
    /// Once the deploy Job succeeded: the Deployments of the App's release.
    pub workloads: Option<&'a [Deployment]>,
    pub settings: &'a JobSettings,
}

/// Where an image that needs no build comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageOrigin {
    /// `spec.build.image` of an App of build type `image`.
    Prebuilt,
    /// The App's current image, for an AppBuild with neither ref nor tag.
    Redeploy,
    /// The image of an earlier build of the same commit and build inputs.
    Reused { from: String },
    /// `spec.rollbackTo`: the image (and, at deploy, the values) of an earlier build.
    Rollback { from: String },
}

/// What a build pod has reported so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BuildProgress {
    /// The commit the ref resolved to (the commit container's termination message).
    pub commit: Option<String>,
    /// The pod that just started running (the build becomes `Building`).
    pub started_pod: Option<String>,
    /// The pod whose log is relayed.
    pub log_pod: Option<String>,
}

/// The one thing to do next for an AppBuild.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Finished (Completed or Failed) or being deleted: nothing to do.
    Nothing,
    /// The namespace is not a project's: create nothing, say why (Pending, condition `Built`
    /// False with reason `NotInProject`), and look again when the Project may have come.
    NotInProject(crate::controllers::tenancy::NotInProject),
    /// First sight: record `Pending` and the start time.
    Accept,
    /// Waiting for the App (to exist, or to be Ready); the message says which.
    Wait { message: String },
    /// End `Failed`.
    Fail {
        reason: FailureReason,
        message: String,
        progress: BuildProgress,
    },
    /// Deploy an image that needs no build; `inputs` labels the AppBuild for later reuse.
    UseImage {
        image: String,
        tag: Option<String>,
        commit: Option<String>,
        origin: ImageOrigin,
        inputs: Option<String>,
    },
    /// Create the build Job (and the buildpacks env Secret when there are build vars).
    StartBuild {
        git_ref: String,
        tag: String,
        image: ImageRef,
        cache: ImageRef,
        inputs: Option<String>,
    },
    /// The build Job runs.
    BuildRunning { progress: BuildProgress },
    /// The build Job succeeded: deploy `image` (with the digest kaniko reported) next.
    BuildSucceeded {
        image: ImageRef,
        finished: Option<Time>,
        progress: BuildProgress,
    },
    /// Another build of the same App is deploying: deploys of one App wait for each other.
    WaitForDeploy { other: String },
    /// Create the deploy Job (and its values Secret): values rendered from the App, or for a
    /// rollback, the target's values as they were.
    StartDeploy {
        image: ImageRef,
        values: Option<serde_json::Value>,
    },
    /// The deploy Job runs.
    DeployRunning,
    /// helm applied the release; the Deployment rolls out (the message says how far).
    RollingOut { message: String },
    /// The deploy Job succeeded: record the deploy on the App, end `Completed`.
    Deployed { image: ImageRef },
}

/// Decides the next step (pure).
pub fn decide(o: &Observed) -> Step {
    let status = o.build.status.clone().unwrap_or_default();
    if o.build.metadata.deletion_timestamp.is_some()
        || matches!(
            status.phase,
            Some(AppBuildPhase::Completed | AppBuildPhase::Failed)
        )
    {
        return Step::Nothing;
    }
    if let Some(why) = o.not_in_project {
        return Step::NotInProject(why.clone());
    }
    if status.phase.is_none() {
        return Step::Accept;
    }
    let app_name = &o.build.spec.app_name;
    let Some(app) = o.app else {
        return Step::Wait {
            message: format!("waiting for App {app_name} to exist"),
        };
    };
    if let Some(image) = &status.image {
        return decide_deploy(o, image);
    }
    if status.job_name.is_some() {
        return decide_build(o, app);
    }
    let app_status = app.status.as_ref();
    if app_status.and_then(|s| s.phase) != Some(AppPhase::Ready) {
        let detail = app_status
            .and_then(|s| s.message.clone())
            .unwrap_or_default();
        return Step::Wait {
            message: format!("waiting for App {app_name} to be Ready: {detail}")
                .trim_end_matches([' ', ':'])
                .to_string(),
        };
    }
    decide_source(o, app)
}

fn fail(reason: FailureReason, message: impl Into<String>) -> Step {
    Step::Fail {
        reason,
        message: message.into(),
        progress: BuildProgress::default(),
    }
}

/// Chooses where a Pending build's image comes from.
fn decide_source(o: &Observed, app: &App) -> Step {
    let build = o.build;
    if let Some(target) = &build.spec.rollback_to {
        return decide_rollback(o, target);
    }
    if app.spec.build.build_type == BuildType::Image {
        let reference = app.spec.build.image.clone().unwrap_or_default();
        let mut image = match ImageRef::parse(&reference) {
            Ok(image) => image,
            Err(e) => return fail(FailureReason::InvalidSpec, format!("spec.build.image: {e}")),
        };
        if let Some(tag) = &build.spec.image_tag {
            image.tag = Some(tag.clone());
            image.digest = None;
        }
        return Step::UseImage {
            tag: image.tag.clone(),
            image: image.to_string(),
            commit: None,
            origin: ImageOrigin::Prebuilt,
            inputs: None,
        };
    }
    let branch = app.spec.git.as_ref().and_then(|g| g.branch.clone());
    let current = app.status.as_ref().and_then(|s| s.current_image.clone());
    let git_ref = match (&build.spec.git_ref, &build.spec.image_tag) {
        (None, None) => match (current, branch) {
            (Some(image), _) => {
                return Step::UseImage {
                    tag: ImageRef::parse(&image).ok().and_then(|i| i.tag),
                    image,
                    commit: None,
                    origin: ImageOrigin::Redeploy,
                    inputs: None,
                };
            }
            // Nothing deployed yet: the first build of the App's branch.
            (None, Some(branch)) => branch,
            (None, None) => {
                return fail(
                    FailureReason::NothingToRedeploy,
                    "neither spec.gitRef nor spec.imageTag is set, which redeploys the App's current image, and the App has none yet nor a spec.git.branch to build",
                );
            }
        },
        (Some(git_ref), _) => git_ref.clone(),
        (None, Some(_)) => match branch {
            Some(branch) => branch,
            None => {
                return fail(
                    FailureReason::InvalidSpec,
                    "spec.gitRef is empty and the App has no spec.git.branch to build",
                );
            }
        },
    };

    // The same commit built with the same inputs already: reuse its image.
    let inputs =
        render::is_commit_sha(&git_ref).then(|| inputs_hash(app, build, &git_ref, o.settings));
    if let Some(hash) = &inputs
        && let Some(earlier) = reusable(o, hash)
    {
        let earlier_status = earlier.status.clone().unwrap_or_default();
        return Step::UseImage {
            image: earlier_status.image.unwrap_or_default(),
            tag: earlier_status.image_tag,
            commit: earlier_status.git_commit,
            origin: ImageOrigin::Reused {
                from: earlier.name_any(),
            },
            inputs,
        };
    }

    let registry = app.spec.registry.url.clone().unwrap_or_default();
    let tag = image_tag(build, &git_ref);
    let ns = build.namespace().unwrap_or_default();
    match destinations(&registry, &ns, &app.name_any(), &tag) {
        Ok((image, cache)) => Step::StartBuild {
            git_ref,
            tag,
            image,
            cache,
            inputs,
        },
        Err(e) => fail(
            FailureReason::InvalidSpec,
            format!("image destination: {e}"),
        ),
    }
}

/// Takes the image of the build a rollback names: an earlier Completed build of the same App.
fn decide_rollback(o: &Observed, target: &str) -> Step {
    let build = o.build;
    let found = o.siblings.iter().map(|b| b.as_ref()).find(|b| {
        b.namespace() == build.namespace()
            && b.name_any() == *target
            && b.name_any() != build.name_any()
    });
    let Some(found) = found else {
        return fail(
            FailureReason::RollbackUnusable,
            format!(
                "spec.rollbackTo: AppBuild {target} not found (builds beyond apps.keep_builds are pruned)"
            ),
        );
    };
    let status = found.status.clone().unwrap_or_default();
    if found.spec.app_name != build.spec.app_name {
        return fail(
            FailureReason::RollbackUnusable,
            format!(
                "spec.rollbackTo: AppBuild {target} belongs to App {}, not {}",
                found.spec.app_name, build.spec.app_name
            ),
        );
    }
    match (status.phase, status.image) {
        (Some(AppBuildPhase::Completed), Some(image)) => Step::UseImage {
            tag: status.image_tag,
            image,
            commit: status.git_commit,
            origin: ImageOrigin::Rollback {
                from: target.to_string(),
            },
            inputs: None,
        },
        (phase, _) => fail(
            FailureReason::RollbackUnusable,
            format!(
                "spec.rollbackTo: AppBuild {target} is {phase:?}, not Completed: only a build that deployed can be rolled back to"
            ),
        ),
    }
}

/// The newest Completed AppBuild of the namespace built from the same inputs.
fn reusable<'a>(o: &'a Observed, hash: &str) -> Option<&'a AppBuild> {
    o.siblings
        .iter()
        .map(|b| b.as_ref())
        .filter(|b| {
            b.namespace() == o.build.namespace()
                && b.spec.app_name == o.build.spec.app_name
                && b.name_any() != o.build.name_any()
                && b.labels().get(INPUTS_LABEL).map(String::as_str) == Some(hash)
                && b.status.as_ref().and_then(|s| s.phase) == Some(AppBuildPhase::Completed)
                && b.status.as_ref().is_some_and(|s| s.image.is_some())
        })
        .max_by_key(|b| {
            b.status
                .as_ref()
                .and_then(|s| s.completion_time.clone())
                .map(|t| t.0)
        })
}

/// Whether a build pod has started: running, or (while init containers run the clone, the
/// pod's phase is still Pending) any container has started (pure).
pub fn started(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        || observed::container_statuses(pod).any(observed::has_started)
}

/// How long a running build Job may have no pod before its Events are read for why: the Job
/// controller creates the pod (or records `FailedCreate`) within a second or two.
pub const POD_CREATE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// How often a build Job that still has no pod is looked at again: its `FailedCreate` Events
/// change nothing the hub watches (the Job stays as it is).
pub const POD_CREATE_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a running build Job has been without a pod, if it has none (pure).
pub fn awaiting_pod(job: &Job, pods: &[Pod], now: jiff::Timestamp) -> Option<std::time::Duration> {
    if !pods.is_empty() || observed::outcome(job) != Outcome::Running {
        return None;
    }
    let created = job.metadata.creation_timestamp.as_ref()?.0;
    let age = now.duration_since(created);
    Some(std::time::Duration::try_from(age).unwrap_or_default())
}

/// When to look at a build Job with no pod again: at the end of [`POD_CREATE_GRACE`], then
/// every [`POD_CREATE_RECHECK`] (pure).
pub fn recheck_pod_creation(waited: std::time::Duration) -> std::time::Duration {
    POD_CREATE_GRACE
        .checked_sub(waited)
        .filter(|left| !left.is_zero())
        .unwrap_or(POD_CREATE_RECHECK)
}

/// A running build whose pod can never start, and why (pure): the Job could not create it
/// (its latest `FailedCreate` Event), or a container waits for what will not come by itself
/// (an image that cannot be pulled, a configuration the kubelet cannot use). Waiting reasons
/// that pass with time (`ContainerCreating`, `PodInitializing`) are not failures; neither is an
/// unschedulable pod, which may find a node as the cluster scales.
fn unstartable(o: &Observed) -> Option<(FailureReason, String)> {
    if o.build_pods.is_empty() {
        let latest = o
            .build_job_failures
            .iter()
            .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
            .max_by_key(|e| {
                (e.last_timestamp.as_ref().map(|t| t.0))
                    .or_else(|| e.event_time.as_ref().map(|t| t.0))
            })?;
        return Some((
            FailureReason::BuildPodRejected,
            format!(
                "the build Job cannot create its pod: {}",
                observed::tail(latest.message.as_deref().unwrap_or("FailedCreate"), 1500)
            ),
        ));
    }
    o.build_pods
        .iter()
        .filter(|p| !observed::pod_finished(p))
        .find_map(|pod| {
            let problem = workload::waiting_problem(pod)?;
            let reason = match problem.kind {
                PodProblem::ErrImagePull
                | PodProblem::ImagePullBackOff
                | PodProblem::InvalidImageName => FailureReason::BuildImagePullFailed,
                PodProblem::CreateContainerConfigError => FailureReason::BuildPodRejected,
                _ => return None,
            };
            Some((
                reason,
                format!("the build pod cannot start: {}", problem.message),
            ))
        })
}

/// Follows the build Job.
fn decide_build(o: &Observed, app: &App) -> Step {
    let status = o.build.status.clone().unwrap_or_default();
    let job_name = status.job_name.clone().unwrap_or_default();
    let Some(job) = o.build_job else {
        return fail(
            FailureReason::BuildJobLost,
            format!(
                "the build Job {job_name} was deleted (or expired) before its result was recorded"
            ),
        );
    };
    let mut progress = BuildProgress {
        log_pod: o.build_pods.first().map(|p| p.name_any()),
        ..Default::default()
    };
    for pod in o.build_pods {
        if let Some(commit) = observed::terminated(pod, COMMIT_CONTAINER)
            .filter(|t| t.exit_code == 0)
            .and_then(|t| t.message.as_deref())
            .map(str::trim)
            .filter(|m| render::is_commit_sha(m))
        {
            progress.commit = Some(commit.to_string());
        }
        if started(pod) && status.phase != Some(AppBuildPhase::Building) {
            progress.started_pod = Some(pod.name_any());
        }
    }
    match observed::outcome(job) {
        Outcome::Running => match unstartable(o) {
            Some((reason, message)) => Step::Fail {
                reason,
                message,
                progress,
            },
            None => Step::BuildRunning { progress },
        },
        Outcome::Succeeded => {
            let tag = status.image_tag.clone().unwrap_or_default();
            let registry = app.spec.registry.url.clone().unwrap_or_default();
            let ns = o.build.namespace().unwrap_or_default();
            let mut image = match destinations(&registry, &ns, &app.name_any(), &tag) {
                Ok((image, _)) => image,
                Err(e) => {
                    return fail(
                        FailureReason::InvalidSpec,
                        format!("image destination: {e}"),
                    );
                }
            };
            // kaniko (the digest) and the lifecycle (its report) write what they pushed as the
            // termination message: deploy exactly that digest.
            image.digest = o
                .build_pods
                .iter()
                .find_map(|p| observed::terminated(p, BUILD_CONTAINER))
                .and_then(|t| t.message.as_deref())
                .and_then(observed::reported_digest);
            Step::BuildSucceeded {
                image,
                finished: job.status.as_ref().and_then(|s| s.completion_time.clone()),
                progress,
            }
        }
        Outcome::Failed { reason, message } => {
            let git_ref = o.build.spec.git_ref.clone().unwrap_or_default();
            let (reason, message) = build_failure(
                &reason,
                &message,
                o.build_pods,
                app.spec.build.build_type,
                &git_ref,
                o.settings,
            );
            Step::Fail {
                reason,
                message,
                progress,
            }
        }
    }
}

/// Another build of the same App that is deploying now (pure).
fn deploying_sibling(o: &Observed) -> Option<String> {
    o.siblings
        .iter()
        .find(|b| {
            b.namespace() == o.build.namespace()
                && b.name_any() != o.build.name_any()
                && b.spec.app_name == o.build.spec.app_name
                && b.status.as_ref().and_then(|s| s.phase) == Some(AppBuildPhase::Deploying)
        })
        .map(|b| b.name_any())
}

/// Deploys the image with the deploy Job, then follows the rollout of the release's
/// Deployment to the end: all replicas on the new version and available, or a failure.
fn decide_deploy(o: &Observed, image: &str) -> Step {
    let image = match ImageRef::parse(image) {
        Ok(image) => image,
        Err(e) => return fail(FailureReason::InvalidSpec, format!("image to deploy: {e}")),
    };
    let Some(job) = o.deploy_job else {
        let phase = o.build.status.as_ref().and_then(|s| s.phase);
        if phase != Some(AppBuildPhase::Deploying)
            && let Some(other) = deploying_sibling(o)
        {
            return Step::WaitForDeploy { other };
        }
        let values = match &o.build.spec.rollback_to {
            Some(target) => match o.rollback_values {
                Some(values) => Some(values.clone()),
                None => {
                    return fail(
                        FailureReason::RollbackUnusable,
                        format!(
                            "spec.rollbackTo: the Helm values of AppBuild {target} are gone (its values Secret was deleted)"
                        ),
                    );
                }
            },
            None => None,
        };
        return Step::StartDeploy { image, values };
    };
    match observed::outcome(job) {
        Outcome::Running => Step::DeployRunning,
        Outcome::Succeeded => decide_rollout(o, image),
        Outcome::Failed { message, .. } => fail(
            FailureReason::DeployFailed,
            format!(
                "helm upgrade --install failed\n{}",
                o.deploy_output.unwrap_or(message.as_str())
            ),
        ),
    }
}

/// After helm: the release must hold a Deployment running the image, and it must roll out.
fn decide_rollout(o: &Observed, image: ImageRef) -> Step {
    let release = &o.build.spec.app_name;
    let wanted = image.to_string();
    let workloads = o.workloads.unwrap_or_default();
    let ours: Vec<&Deployment> = workloads
        .iter()
        .filter(|d| workload::in_release(d, release))
        .filter(|d| {
            workload::template_images(d)
                .iter()
                .any(|i| workload::same_image(i, &wanted))
        })
        .collect();
    if ours.is_empty() {
        let found: Vec<String> = workloads
            .iter()
            .filter(|d| workload::in_release(d, release))
            .map(|d| {
                format!(
                    "{} ({})",
                    d.name_any(),
                    workload::template_images(d).join(", ")
                )
            })
            .collect();
        let held = if found.is_empty() {
            "it holds no Deployment at all".to_string()
        } else {
            format!("its Deployments run other images: {}", found.join("; "))
        };
        return fail(
            FailureReason::DeployedNothing,
            format!(
                "helm deployed release {release}, but no Deployment of it runs {wanted}: {held}. \
                 The chart created no workload from these values; check the App's spec.run and the AppBuild's helmValues"
            ),
        );
    }
    // The new version's pods, as the App's runtime status describes them.
    let runtime = o
        .app
        .and_then(|a| a.status.as_ref())
        .and_then(|s| s.runtime.as_ref())
        .filter(|r| {
            r.image
                .as_deref()
                .is_some_and(|i| workload::same_image(i, &wanted))
        });
    if let Some(runtime) = runtime
        && let Some(problem) = runtime.reason.as_deref().and_then(PodProblem::parse)
        && problem.fatal()
    {
        return fail(
            FailureReason::Runtime(problem),
            format!(
                "the new version cannot run: {}",
                runtime
                    .message
                    .clone()
                    .unwrap_or_else(|| problem.as_str().into())
            ),
        );
    }
    let mut waiting = vec![];
    for deployment in ours {
        match workload::rollout(deployment) {
            Rollout::Done => {}
            Rollout::Waiting(message) => waiting.push(message),
            Rollout::Stuck(message) => return fail(FailureReason::RolloutStuck, message),
        }
    }
    if waiting.is_empty() {
        Step::Deployed { image }
    } else {
        Step::RollingOut {
            message: waiting.join("; "),
        }
    }
}

/// Sets one of the AppBuild's conditions (see [`crate::controllers::set_condition`]).
fn set_condition(
    status: &mut AppBuildStatus,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) {
    crate::controllers::set_condition(
        &mut status.conditions,
        type_,
        ok,
        reason,
        message,
        generation,
        now,
    );
}

fn apply_progress(status: &mut AppBuildStatus, progress: &BuildProgress, now: &Time) {
    if let Some(commit) = &progress.commit {
        status.git_commit = Some(commit.clone());
    }
    if let Some(pod) = &progress.started_pod {
        status.phase = Some(AppBuildPhase::Building);
        status.pod_name = Some(pod.clone());
        status.build_start_time = Some(now.clone());
    }
}

/// The status once `step` is applied (pure; `now` stamps what happens now).
pub fn status_after(build: &AppBuild, step: &Step, now: &Time) -> AppBuildStatus {
    let mut status = build.status.clone().unwrap_or_default();
    let generation = build.metadata.generation;
    status.observed_generation = generation;
    match step {
        Step::Nothing | Step::DeployRunning => {}
        Step::WaitForDeploy { other } => {
            status.message = Some(format!("waiting for the deploy of {other} to finish"));
        }
        Step::RollingOut { message } => {
            status.message = Some(format!("rolling out: {message}"));
        }
        Step::Accept => {
            status.phase = Some(AppBuildPhase::Pending);
            status.start_time = Some(now.clone());
            status.message = Some("accepted".into());
        }
        Step::Wait { message } => status.message = Some(message.clone()),
        Step::NotInProject(why) => {
            if status.phase.is_none() {
                status.phase = Some(AppBuildPhase::Pending);
                status.start_time = Some(now.clone());
            }
            let message = why.to_string();
            set_condition(
                &mut status,
                BUILT,
                false,
                crate::controllers::tenancy::NOT_IN_PROJECT,
                &message,
                generation,
                now,
            );
            status.message = Some(message);
        }
        Step::Fail {
            reason,
            message,
            progress,
        } => {
            apply_progress(&mut status, progress, now);
            // A build that ran (its Job is known, no image yet) ended now.
            if status.job_name.is_some() && status.image.is_none() {
                status.build_end_time = Some(now.clone());
            }
            if reason.condition() == super::DEPLOYED {
                status.failed_helm_job_name = status.helm_job_name.clone();
            }
            set_condition(
                &mut status,
                reason.condition(),
                false,
                reason.as_str(),
                message,
                generation,
                now,
            );
            status.phase = Some(AppBuildPhase::Failed);
            status.reason = Some(reason.as_str().to_string());
            status.message = Some(message.clone());
            status.completion_time = Some(now.clone());
        }
        Step::UseImage {
            image,
            tag,
            commit,
            origin,
            ..
        } => {
            let (reason, message) = match origin {
                ImageOrigin::Prebuilt => ("PrebuiltImage", format!("pre-built image {image}")),
                ImageOrigin::Redeploy => (
                    "Redeploy",
                    format!("redeploying the App's current image {image}"),
                ),
                ImageOrigin::Reused { from } => (
                    "Reused",
                    format!("reusing the image of build {from} (same commit and build inputs)"),
                ),
                ImageOrigin::Rollback { from } => (
                    "Rollback",
                    format!("rolling back to build {from}: its image {image} and values"),
                ),
            };
            status.image = Some(image.clone());
            status.image_tag = tag.clone();
            if commit.is_some() {
                status.git_commit = commit.clone();
            }
            set_condition(&mut status, BUILT, true, reason, &message, generation, now);
            status.message = Some(message);
        }
        Step::StartBuild {
            git_ref,
            tag,
            image,
            ..
        } => {
            status.job_name = Some(super::build_job_name(&build.name_any()));
            status.image_tag = Some(tag.clone());
            status.message = Some(format!("building {git_ref} into {image}"));
            set_condition(
                &mut status,
                BUILT,
                false,
                "Building",
                "the build Job runs",
                generation,
                now,
            );
        }
        Step::BuildRunning { progress } => apply_progress(&mut status, progress, now),
        Step::BuildSucceeded {
            image,
            finished,
            progress,
        } => {
            apply_progress(&mut status, progress, now);
            status.image = Some(image.to_string());
            status.build_end_time = Some(finished.clone().unwrap_or_else(|| now.clone()));
            let message = format!("built {image}");
            status.message = Some(message.clone());
            set_condition(
                &mut status,
                BUILT,
                true,
                "BuildSucceeded",
                &message,
                generation,
                now,
            );
        }
        Step::StartDeploy { image, .. } => {
            // Say where the image came from (built, reused, pre-built, redeployed) and what now.
            let origin = status
                .conditions
                .iter()
                .find(|c| c.type_ == BUILT && c.status == "True")
                .map(|c| c.message.clone())
                .unwrap_or_else(|| format!("image {image}"));
            status.phase = Some(AppBuildPhase::Deploying);
            status.helm_job_name = Some(super::deploy_job_name(&build.name_any()));
            status.message = Some(format!("{origin}; deploying with helm"));
        }
        Step::Deployed { image } => {
            status.phase = Some(AppBuildPhase::Completed);
            status.reason = None;
            status.message = Some(format!("deployed {image}"));
            status.completion_time = Some(now.clone());
            set_condition(
                &mut status,
                DEPLOYED,
                true,
                "Deployed",
                &format!("release {} runs {image}", build.spec.app_name),
                generation,
                now,
            );
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use std::sync::Arc;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn app(build: Value, phase: &str, current_image: Option<&str>) -> App {
        serde_json::from_value(json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App",
            "metadata": {"name": "web", "namespace": "p"},
            "spec": {"displayName": "Web", "git": {"url": "https://git.example.com/r.git", "branch": "main"},
                "registry": {"url": "registry.example.com"}, "build": build},
            "status": {"phase": phase, "message": "checking", "currentImage": current_image}}))
        .unwrap()
    }

    fn dockerfile_app() -> App {
        app(json!({"type": "dockerfile"}), "Ready", None)
    }

    fn build(spec: Value, status: Value) -> AppBuild {
        let mut spec = spec;
        spec["appName"] = "web".into();
        serde_json::from_value(json!({"apiVersion": "apps.shapeblock.io/v1alpha1",
            "kind": "AppBuild", "metadata": {"name": "web-1", "namespace": "p", "generation": 1},
            "spec": spec, "status": status}))
        .unwrap()
    }

    fn job(conditions: Value) -> Job {
        serde_json::from_value(json!({"metadata": {"name": "j"},
            "status": {"conditions": conditions}}))
        .unwrap()
    }

    fn running() -> Job {
        job(json!([]))
    }
    fn succeeded() -> Job {
        job(json!([{"type": "Complete", "status": "True"}]))
    }
    fn failed() -> Job {
        job(
            json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
            "message": "Job has reached the specified backoff limit"}]),
        )
    }

    fn pod(statuses: Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "web-1-build-x"}, "status": statuses}))
            .unwrap()
    }

    fn terminated(name: &str, code: i32, message: &str) -> Value {
        json!({"name": name, "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "message": message}}})
    }

    /// Decides for `build` with the given App and children.
    struct Case {
        build: AppBuild,
        app: Option<App>,
        siblings: Vec<Arc<AppBuild>>,
        build_job: Option<Job>,
        build_pods: Vec<Pod>,
        build_job_failures: Vec<Event>,
        deploy_job: Option<Job>,
        deploy_output: Option<String>,
        rollback_values: Option<Value>,
        workloads: Option<Vec<Deployment>>,
        not_in_project: Option<crate::controllers::tenancy::NotInProject>,
    }

    impl Case {
        fn new(build: AppBuild, app: Option<App>) -> Self {
            Self {
                build,
                app,
                siblings: vec![],
                build_job: None,
                build_pods: vec![],
                build_job_failures: vec![],
                deploy_job: None,
                deploy_output: None,
                rollback_values: None,
                workloads: None,
                not_in_project: None,
            }
        }
        fn decide(&self) -> Step {
            let settings = JobSettings::default();
            decide(&Observed {
                build: &self.build,
                not_in_project: self.not_in_project.as_ref(),
                app: self.app.as_ref(),
                siblings: &self.siblings,
                build_job: self.build_job.as_ref(),
                build_pods: &self.build_pods,
                build_job_failures: &self.build_job_failures,
                deploy_job: self.deploy_job.as_ref(),
                deploy_output: self.deploy_output.as_deref(),
                rollback_values: self.rollback_values.as_ref(),
                workloads: self.workloads.as_deref(),
                settings: &settings,
            })
        }
    }

    fn pending() -> Value {
        json!({"phase": "Pending"})
    }

    fn failure(step: &Step) -> (FailureReason, &str) {
        match step {
            Step::Fail {
                reason, message, ..
            } => (*reason, message.as_str()),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn finished_or_deleted_builds_are_left_alone() {
        for phase in ["Completed", "Failed"] {
            let case = Case::new(
                build(json!({}), json!({"phase": phase})),
                Some(dockerfile_app()),
            );
            assert_eq!(case.decide(), Step::Nothing, "{phase}");
        }
        let mut deleted = build(json!({}), pending());
        deleted.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        assert_eq!(
            Case::new(deleted, Some(dockerfile_app())).decide(),
            Step::Nothing
        );
    }

    #[test]
    fn outside_a_project_a_build_creates_nothing_and_says_why() {
        use crate::controllers::tenancy::NotInProject;
        let why = NotInProject::NoProject("p".into());
        for status in [json!(null), pending()] {
            let mut case = Case::new(
                build(json!({"gitRef": "main"}), status),
                Some(dockerfile_app()),
            );
            case.not_in_project = Some(why.clone());
            let step = case.decide();
            assert_eq!(step, Step::NotInProject(why.clone()));
            let now = Time(jiff::Timestamp::now());
            let status = status_after(&case.build, &step, &now);
            assert_eq!(status.phase, Some(AppBuildPhase::Pending));
            assert!(status.job_name.is_none());
            let built = &status.conditions[0];
            assert_eq!(
                (
                    built.type_.as_str(),
                    built.status.as_str(),
                    built.reason.as_str()
                ),
                (BUILT, "False", "NotInProject")
            );
            assert_eq!(status.message, Some(why.to_string()));
        }
    }

    #[test]
    fn a_new_build_is_accepted_first() {
        let case = Case::new(build(json!({"gitRef": "main"}), json!(null)), None);
        assert_eq!(case.decide(), Step::Accept);
    }

    #[test]
    fn builds_wait_for_their_app_to_exist_and_be_ready() {
        let missing = Case::new(build(json!({"gitRef": "main"}), pending()), None);
        assert_eq!(
            missing.decide(),
            Step::Wait {
                message: "waiting for App web to exist".into()
            }
        );
        let unready = Case::new(
            build(json!({"gitRef": "main"}), pending()),
            Some(app(json!({"type": "dockerfile"}), "Failed", None)),
        );
        assert_eq!(
            unready.decide(),
            Step::Wait {
                message: "waiting for App web to be Ready: checking".into()
            }
        );
    }

    #[test]
    fn prebuilt_images_deploy_without_a_build_and_take_the_builds_tag() {
        let image_app = app(
            json!({"type": "image", "image": "registry.example.com/web:1.0"}),
            "Ready",
            None,
        );
        let case = Case::new(
            build(json!({"imageTag": "2.0"}), pending()),
            Some(image_app),
        );
        match case.decide() {
            Step::UseImage {
                image, tag, origin, ..
            } => {
                assert_eq!(image, "registry.example.com/web:2.0");
                assert_eq!(tag.as_deref(), Some("2.0"));
                assert_eq!(origin, ImageOrigin::Prebuilt);
            }
            other => panic!("{other:?}"),
        }
        let broken = app(
            json!({"type": "image", "image": "UPPER CASE"}),
            "Ready",
            None,
        );
        let case = Case::new(build(json!({}), pending()), Some(broken));
        let step = case.decide();
        let (reason, message) = failure(&step);
        assert_eq!(reason, FailureReason::InvalidSpec);
        assert!(message.starts_with("spec.build.image"), "{message}");
    }

    #[test]
    fn no_ref_and_no_tag_redeploys_the_current_image_or_builds_the_branch_first() {
        // Nothing deployed yet: the App's branch is built (the first build).
        let first = Case::new(build(json!({}), pending()), Some(dockerfile_app()));
        match first.decide() {
            Step::StartBuild { git_ref, .. } => assert_eq!(git_ref, "main"),
            other => panic!("{other:?}"),
        }
        let mut no_branch = dockerfile_app();
        no_branch.spec.git.as_mut().unwrap().branch = None;
        let none = Case::new(build(json!({}), pending()), Some(no_branch));
        assert_eq!(failure(&none.decide()).0, FailureReason::NothingToRedeploy);
        let deployed = app(
            json!({"type": "dockerfile"}),
            "Ready",
            Some("registry.example.com/p/web:abc"),
        );
        let case = Case::new(build(json!({}), pending()), Some(deployed));
        match case.decide() {
            Step::UseImage { image, origin, .. } => {
                assert_eq!(image, "registry.example.com/p/web:abc");
                assert_eq!(origin, ImageOrigin::Redeploy);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_tag_without_a_ref_builds_the_apps_branch_or_fails_without_one() {
        let case = Case::new(
            build(json!({"imageTag": "v1"}), pending()),
            Some(dockerfile_app()),
        );
        match case.decide() {
            Step::StartBuild { git_ref, tag, .. } => {
                assert_eq!(git_ref, "main");
                assert_eq!(tag, "v1");
            }
            other => panic!("{other:?}"),
        }
        let mut no_branch = dockerfile_app();
        no_branch.spec.git.as_mut().unwrap().branch = None;
        let case = Case::new(build(json!({"imageTag": "v1"}), pending()), Some(no_branch));
        assert_eq!(failure(&case.decide()).0, FailureReason::InvalidSpec);
    }

    #[test]
    fn a_commit_built_before_with_the_same_inputs_is_reused() {
        let app = dockerfile_app();
        let new = build(json!({"gitRef": SHA}), pending());
        let hash = inputs_hash(&app, &new, SHA, &JobSettings::default());
        let mut earlier = build(
            json!({"gitRef": SHA}),
            json!({"phase": "Completed", "image": "registry.example.com/p/web:0123456789ab@sha256:aa",
                "imageTag": "0123456789ab", "gitCommit": SHA}),
        );
        earlier.metadata.name = Some("web-0".into());
        earlier
            .labels_mut()
            .insert(INPUTS_LABEL.into(), hash.clone());
        let mut case = Case::new(new, Some(app));
        case.siblings = vec![Arc::new(earlier.clone())];
        match case.decide() {
            Step::UseImage {
                image,
                origin,
                inputs,
                commit,
                ..
            } => {
                assert!(image.ends_with("@sha256:aa"), "{image}");
                assert_eq!(
                    origin,
                    ImageOrigin::Reused {
                        from: "web-0".into()
                    }
                );
                assert_eq!(inputs.as_deref(), Some(hash.as_str()));
                assert_eq!(commit.as_deref(), Some(SHA));
            }
            other => panic!("{other:?}"),
        }
        // A failed earlier build is not reused: this one builds.
        earlier.status.as_mut().unwrap().phase = Some(AppBuildPhase::Failed);
        case.siblings = vec![Arc::new(earlier)];
        match case.decide() {
            Step::StartBuild { inputs, tag, .. } => {
                assert_eq!(inputs.as_deref(), Some(hash.as_str()));
                assert_eq!(tag, "0123456789ab");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_branch_build_starts_a_job_and_is_not_labelled_for_reuse() {
        let case = Case::new(
            build(json!({"gitRef": "main"}), pending()),
            Some(dockerfile_app()),
        );
        match case.decide() {
            Step::StartBuild {
                git_ref,
                tag,
                image,
                cache,
                inputs,
            } => {
                assert_eq!(git_ref, "main");
                assert_eq!(tag, "web-1");
                assert_eq!(image.to_string(), "registry.example.com/p/web:web-1");
                assert!(cache.to_string().contains("cache"), "{cache}");
                assert_eq!(inputs, None);
            }
            other => panic!("{other:?}"),
        }
    }

    fn building() -> Value {
        json!({"phase": "Pending", "jobName": "web-1-build", "imageTag": "web-1"})
    }

    #[test]
    fn a_lost_build_job_fails_the_build() {
        let case = Case::new(
            build(json!({"gitRef": "main"}), building()),
            Some(dockerfile_app()),
        );
        assert_eq!(failure(&case.decide()).0, FailureReason::BuildJobLost);
    }

    #[test]
    fn a_running_build_reports_its_pod_and_commit() {
        let mut case = Case::new(
            build(json!({"gitRef": "main"}), building()),
            Some(dockerfile_app()),
        );
        case.build_job = Some(running());
        assert_eq!(
            case.decide(),
            Step::BuildRunning {
                progress: BuildProgress::default()
            }
        );
        case.build_pods = vec![pod(json!({"phase": "Pending",
            "initContainerStatuses": [terminated("commit", 0, &format!("{SHA}\n"))]}))];
        match case.decide() {
            Step::BuildRunning { progress } => {
                assert_eq!(progress.commit.as_deref(), Some(SHA));
                assert_eq!(progress.started_pod.as_deref(), Some("web-1-build-x"));
                assert_eq!(progress.log_pod.as_deref(), Some("web-1-build-x"));
            }
            other => panic!("{other:?}"),
        }
        // Already Building: the pod is not started again.
        case.build.status.as_mut().unwrap().phase = Some(AppBuildPhase::Building);
        match case.decide() {
            Step::BuildRunning { progress } => assert_eq!(progress.started_pod, None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_successful_build_deploys_the_digest_kaniko_reported() {
        let mut case = Case::new(
            build(json!({"gitRef": "main"}), building()),
            Some(dockerfile_app()),
        );
        case.build_job = Some(succeeded());
        let digest = format!("sha256:{}", "ab".repeat(32));
        case.build_pods = vec![pod(json!({"phase": "Succeeded",
            "containerStatuses": [terminated("build", 0, &digest)]}))];
        match case.decide() {
            Step::BuildSucceeded { image, .. } => {
                assert_eq!(image.digest.as_deref(), Some(digest.as_str()));
                assert_eq!(image.tag.as_deref(), Some("web-1"));
            }
            other => panic!("{other:?}"),
        }
        // The buildpacks lifecycle's report (TOML) as the termination message.
        let report = format!(
            "[image]\n  tags = [\"registry.example.com/p/web:web-1\"]\n  digest = \"{digest}\"\n  manifest-size = 1721\n"
        );
        case.build_pods = vec![pod(json!({"phase": "Succeeded",
            "containerStatuses": [terminated("build", 0, &report)]}))];
        match case.decide() {
            Step::BuildSucceeded { image, .. } => {
                assert_eq!(image.digest.as_deref(), Some(digest.as_str()))
            }
            other => panic!("{other:?}"),
        }
        // Anything else as a termination message is not taken for a digest.
        case.build_pods = vec![pod(json!({"phase": "Succeeded",
            "containerStatuses": [terminated("build", 0, "done")]}))];
        match case.decide() {
            Step::BuildSucceeded { image, .. } => assert_eq!(image.digest, None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_build_job_that_cannot_create_its_pod_fails_at_once() {
        let mut case = Case::new(
            build(json!({"gitRef": "main"}), building()),
            Some(dockerfile_app()),
        );
        case.build_job = Some(running());
        // No pod yet, no FailedCreate (yet): the build runs.
        assert!(matches!(case.decide(), Step::BuildRunning { .. }));
        let event = |message: &str, at: &str| -> Event {
            serde_json::from_value(json!({"metadata": {"name": "e"},
                "involvedObject": {"kind": "Job", "name": "web-1-build"},
                "type": "Warning", "reason": "FailedCreate", "message": message,
                "lastTimestamp": at}))
            .unwrap()
        };
        case.build_job_failures = vec![
            event("Error creating: older", "2026-01-01T00:00:00Z"),
            event(
                "Error creating: pods \"web-1-build-x\" is forbidden: violates PodSecurity \"restricted:latest\": runAsNonRoot != true",
                "2026-01-01T00:00:09Z",
            ),
        ];
        let step = case.decide();
        let (reason, message) = failure(&step);
        assert_eq!(reason, FailureReason::BuildPodRejected);
        assert_eq!(reason.as_str(), "BuildPodRejected");
        assert!(
            message.starts_with("the build Job cannot create its pod: Error creating: pods"),
            "{message}"
        );
        assert!(message.contains("violates PodSecurity"), "{message}");
        assert!(reason.leaves_the_job_running());
        // Once a pod exists, an earlier FailedCreate (a quota since freed) is history.
        case.build_pods = vec![pod(json!({"phase": "Running"}))];
        assert!(matches!(case.decide(), Step::BuildRunning { .. }));
    }

    #[test]
    fn a_build_pod_waiting_for_an_image_it_cannot_pull_fails_at_once() {
        let mut case = Case::new(
            build(json!({"gitRef": "main"}), building()),
            Some(dockerfile_app()),
        );
        case.build_job = Some(running());
        let waiting = |name: &str, reason: &str, message: &str| {
            json!({"name": name, "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": message}}})
        };
        for (reason, expected) in [
            ("ErrImagePull", FailureReason::BuildImagePullFailed),
            ("ImagePullBackOff", FailureReason::BuildImagePullFailed),
            ("InvalidImageName", FailureReason::BuildImagePullFailed),
            (
                "CreateContainerConfigError",
                FailureReason::BuildPodRejected,
            ),
        ] {
            case.build_pods = vec![pod(json!({"phase": "Pending", "initContainerStatuses": [
                terminated("clone", 0, ""),
                waiting("commit", "PodInitializing", "")],
                "containerStatuses": [waiting("build", reason,
                    "Back-off pulling image \"heroku/builder:nope\"")]}))];
            let step = case.decide();
            let (got, message) = failure(&step);
            assert_eq!(got, expected, "{reason}");
            assert!(
                message.starts_with(&format!(
                    "the build pod cannot start: pod web-1-build-x, container build: {reason}: Back-off pulling image"
                )),
                "{message}"
            );
        }
        // Waiting for what comes by itself is no failure.
        case.build_pods = vec![pod(json!({"phase": "Pending", "initContainerStatuses": [
            waiting("clone", "ContainerCreating", "")]}))];
        assert!(matches!(case.decide(), Step::BuildRunning { .. }));
    }

    #[test]
    fn a_build_job_without_a_pod_is_looked_at_again_after_a_grace() {
        let created = "2026-01-01T00:00:00Z";
        let job: Job = serde_json::from_value(json!({"metadata": {"name": "j",
            "creationTimestamp": created}, "status": {}}))
        .unwrap();
        let at = |secs: i64| {
            created.parse::<jiff::Timestamp>().unwrap() + jiff::SignedDuration::from_secs(secs)
        };
        let waited = awaiting_pod(&job, &[], at(2)).unwrap();
        assert_eq!(waited, std::time::Duration::from_secs(2));
        assert_eq!(
            recheck_pod_creation(waited),
            std::time::Duration::from_secs(3)
        );
        let waited = awaiting_pod(&job, &[], at(5)).unwrap();
        assert_eq!(recheck_pod_creation(waited), POD_CREATE_RECHECK);
        assert_eq!(
            recheck_pod_creation(std::time::Duration::from_secs(600)),
            POD_CREATE_RECHECK
        );
        // A Job with a pod, or one that ended, waits for nothing.
        assert_eq!(awaiting_pod(&job, &[pod(json!({}))], at(60)), None);
        assert_eq!(awaiting_pod(&failed(), &[], at(60)), None);
    }

    #[test]
    fn a_failed_build_fails_with_the_cause_its_pod_reported() {
        let mut case = Case::new(
            build(json!({"gitRef": "nope"}), building()),
            Some(dockerfile_app()),
        );
        case.build_job = Some(failed());
        case.build_pods = vec![pod(json!({"phase": "Failed", "initContainerStatuses": [
            terminated("clone", 128, "fatal: Remote branch nope not found in upstream origin")]}))];
        let step = case.decide();
        let (reason, message) = failure(&step);
        assert_eq!(reason, FailureReason::GitCloneFailed);
        assert!(
            message.starts_with("git ref 'nope' was not found"),
            "{message}"
        );
    }

    fn with_image() -> Value {
        json!({"phase": "Pending", "image": "registry.example.com/p/web:web-1", "imageTag": "web-1"})
    }

    #[test]
    fn an_image_is_deployed_by_a_helm_job_that_is_followed_to_the_end() {
        let mut case = Case::new(
            build(json!({"gitRef": "main"}), with_image()),
            Some(dockerfile_app()),
        );
        assert!(matches!(case.decide(), Step::StartDeploy { .. }));
        case.deploy_job = Some(running());
        assert_eq!(case.decide(), Step::DeployRunning);
        case.deploy_job = Some(succeeded());
        case.workloads = Some(vec![release_deployment(
            "registry.example.com/p/web:web-1",
            json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}),
        )]);
        assert!(matches!(case.decide(), Step::Deployed { .. }));
        case.deploy_job = Some(failed());
        case.deploy_output = Some("Error: UPGRADE FAILED: context deadline exceeded".into());
        let step = case.decide();
        let (reason, message) = failure(&step);
        assert_eq!(reason, FailureReason::DeployFailed);
        assert!(message.contains("UPGRADE FAILED"), "{message}");
        // Without the pod's output, the Job condition's message.
        case.deploy_output = None;
        assert!(failure(&case.decide()).1.contains("backoff limit"));
    }

    fn release_deployment(image: &str, status: Value) -> Deployment {
        serde_json::from_value(json!({"metadata": {"name": "web", "generation": 1,
            "annotations": {"meta.helm.sh/release-name": "web"}},
            "spec": {"replicas": 1, "selector": {}, "template": {"spec": {"containers": [
                {"name": "app", "image": image}]}}},
            "status": status}))
        .unwrap()
    }

    fn deployed_case() -> Case {
        let mut case = Case::new(
            build(
                json!({"gitRef": "main"}),
                json!({"phase": "Deploying", "image": "registry.example.com/p/web:web-1"}),
            ),
            Some(dockerfile_app()),
        );
        case.deploy_job = Some(succeeded());
        case
    }

    #[test]
    fn a_release_without_a_deployment_of_the_image_deployed_nothing() {
        let mut case = deployed_case();
        case.workloads = Some(vec![]);
        let step = case.decide();
        let (reason, message) = failure(&step);
        assert_eq!(reason, FailureReason::DeployedNothing);
        assert!(message.contains("holds no Deployment at all"), "{message}");
        assert_eq!(reason.condition(), DEPLOYED);

        case.workloads = Some(vec![release_deployment("nginx:1.27", json!({}))]);
        let step = case.decide();
        let (reason, message) = failure(&step);
        assert_eq!(reason, FailureReason::DeployedNothing);
        assert!(message.contains("web (nginx:1.27)"), "{message}");

        // A Deployment of another release does not count.
        let mut foreign = release_deployment("registry.example.com/p/web:web-1", json!({}));
        foreign.metadata.annotations = None;
        case.workloads = Some(vec![foreign]);
        assert_eq!(failure(&case.decide()).0, FailureReason::DeployedNothing);
    }

    #[test]
    fn a_rollout_is_followed_until_every_replica_is_available() {
        let mut case = deployed_case();
        case.workloads = Some(vec![release_deployment(
            "registry.example.com/p/web:web-1",
            json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 1}),
        )]);
        assert!(matches!(case.decide(), Step::RollingOut { .. }));
        case.workloads = Some(vec![release_deployment(
            "registry.example.com/p/web:web-1",
            json!({"observedGeneration": 1, "conditions": [{"type": "Progressing", "status": "False",
                "reason": "ProgressDeadlineExceeded", "message": "has timed out progressing."}]}),
        )]);
        assert_eq!(failure(&case.decide()).0, FailureReason::RolloutStuck);
    }

    #[test]
    fn a_rollout_whose_new_pods_cannot_run_fails_at_once() {
        let mut case = deployed_case();
        case.workloads = Some(vec![release_deployment(
            "registry.example.com/p/web:web-1",
            json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1}),
        )]);
        let runtime = |image: &str, reason: &str| {
            let mut app = dockerfile_app();
            app.status.as_mut().unwrap().runtime = Some(crate::crd::RuntimeStatus {
                state: crate::crd::RuntimeState::Down,
                image: Some(image.into()),
                reason: Some(reason.into()),
                message: Some("pod web-x, container app: CrashLoopBackOff, exit code 1".into()),
                ..Default::default()
            });
            app
        };
        case.app = Some(runtime(
            "registry.example.com/p/web:web-1",
            "CrashLoopBackOff",
        ));
        let step = case.decide();
        let (reason, message) = failure(&step);
        assert_eq!(reason, FailureReason::Runtime(PodProblem::CrashLoopBackOff));
        assert_eq!(reason.as_str(), "CrashLoopBackOff");
        assert!(message.contains("exit code 1"), "{message}");
        // The old version's problem is not the new one's.
        case.app = Some(runtime(
            "registry.example.com/p/web:old",
            "CrashLoopBackOff",
        ));
        assert!(matches!(case.decide(), Step::RollingOut { .. }));
        // A failing probe may still pass: keep rolling.
        case.app = Some(runtime("registry.example.com/p/web:web-1", "ProbeFailing"));
        assert!(matches!(case.decide(), Step::RollingOut { .. }));
    }

    #[test]
    fn deploys_of_one_app_never_overlap() {
        let mut case = Case::new(
            build(json!({"gitRef": "main"}), with_image()),
            Some(dockerfile_app()),
        );
        let mut other = build(json!({}), json!({"phase": "Deploying"}));
        other.metadata.name = Some("web-0".into());
        case.siblings = vec![Arc::new(other)];
        assert_eq!(
            case.decide(),
            Step::WaitForDeploy {
                other: "web-0".into()
            }
        );
    }

    #[test]
    fn a_rollback_takes_an_earlier_builds_image_and_values() {
        let mut target = build(
            json!({"gitRef": "main"}),
            json!({"phase": "Completed", "image": "registry.example.com/p/web:v1@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "imageTag": "v1"}),
        );
        target.metadata.name = Some("web-0".into());
        let mut case = Case::new(
            build(json!({"rollbackTo": "web-0"}), pending()),
            Some(dockerfile_app()),
        );
        assert_eq!(
            failure(&case.decide()).0,
            FailureReason::RollbackUnusable,
            "not found"
        );
        case.siblings = vec![Arc::new(target.clone())];
        match case.decide() {
            Step::UseImage { image, origin, .. } => {
                assert_eq!(
                    image,
                    "registry.example.com/p/web:v1@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                );
                assert_eq!(
                    origin,
                    ImageOrigin::Rollback {
                        from: "web-0".into()
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        let mut failed_target = target.clone();
        failed_target.status.as_mut().unwrap().phase = Some(AppBuildPhase::Failed);
        case.siblings = vec![Arc::new(failed_target)];
        assert!(failure(&case.decide()).1.contains("not Completed"));

        // At deploy: the target's values as they were, or a failure when they are gone.
        let mut deploy = Case::new(
            build(
                json!({"rollbackTo": "web-0"}),
                json!({"phase": "Pending", "image": "registry.example.com/p/web:v1@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}),
            ),
            Some(dockerfile_app()),
        );
        assert_eq!(failure(&deploy.decide()).0, FailureReason::RollbackUnusable);
        deploy.rollback_values = Some(json!({"replicas": 3}));
        match deploy.decide() {
            Step::StartDeploy { values, .. } => assert_eq!(values, Some(json!({"replicas": 3}))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_image_that_cannot_be_parsed_fails_the_deploy() {
        let case = Case::new(
            build(
                json!({}),
                json!({"phase": "Pending", "image": "NOT AN IMAGE"}),
            ),
            Some(dockerfile_app()),
        );
        let step = case.decide();
        let (reason, message) = failure(&step);
        assert_eq!(reason, FailureReason::InvalidSpec);
        assert!(message.starts_with("image to deploy"), "{message}");
    }

    fn now() -> Time {
        Time(jiff::Timestamp::now())
    }

    #[test]
    fn statuses_follow_the_steps() {
        let now = now();
        let new = build(json!({"gitRef": "main"}), json!(null));
        let accepted = status_after(&new, &Step::Accept, &now);
        assert_eq!(accepted.phase, Some(AppBuildPhase::Pending));
        assert_eq!(accepted.start_time, Some(now.clone()));
        assert_eq!(accepted.observed_generation, Some(1));

        let pending_build = build(json!({"gitRef": "main"}), pending());
        let settings = JobSettings::default();
        let step = Case::new(pending_build.clone(), Some(dockerfile_app())).decide();
        let started = status_after(&pending_build, &step, &now);
        assert_eq!(started.job_name.as_deref(), Some("web-1-build"));
        assert_eq!(started.conditions[0].type_, BUILT);
        assert_eq!(started.conditions[0].reason, "Building");
        let _ = settings;

        let failed = status_after(
            &build(json!({}), building()),
            &Step::Fail {
                reason: FailureReason::BuildFailed,
                message: "exit code 1".into(),
                progress: BuildProgress::default(),
            },
            &now,
        );
        assert_eq!(failed.phase, Some(AppBuildPhase::Failed));
        assert_eq!(failed.reason.as_deref(), Some("BuildFailed"));
        assert_eq!(failed.build_end_time, Some(now.clone()));
        assert_eq!(failed.conditions[0].type_, BUILT);
        assert_eq!(failed.conditions[0].status, "False");

        let deploying_build = build(
            json!({}),
            json!({"phase": "Deploying", "image": "r.example.com/p/web:1", "helmJobName": "web-1-deploy"}),
        );
        let deploy_failed = status_after(
            &deploying_build,
            &Step::Fail {
                reason: FailureReason::DeployFailed,
                message: "helm".into(),
                progress: BuildProgress::default(),
            },
            &now,
        );
        assert_eq!(deploy_failed.conditions[0].type_, DEPLOYED);
        assert_eq!(
            deploy_failed.failed_helm_job_name.as_deref(),
            Some("web-1-deploy")
        );
        assert_eq!(deploy_failed.build_end_time, None);

        let image = ImageRef::parse("r.example.com/p/web:1").unwrap();
        let deploying = status_after(
            &build(
                json!({}),
                json!({"phase": "Pending", "image": "r.example.com/p/web:1", "conditions": [{
                    "type": "Built", "status": "True", "reason": "PrebuiltImage",
                    "message": "pre-built image r.example.com/p/web:1",
                    "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
            ),
            &Step::StartDeploy {
                image: image.clone(),
                values: None,
            },
            &now,
        );
        assert_eq!(deploying.phase, Some(AppBuildPhase::Deploying));
        assert_eq!(
            deploying.message.as_deref(),
            Some("pre-built image r.example.com/p/web:1; deploying with helm")
        );
        let completed = status_after(&deploying_build, &Step::Deployed { image }, &now);
        assert_eq!(completed.phase, Some(AppBuildPhase::Completed));
        assert_eq!(completed.completion_time, Some(now));
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_it_holds() {
        let then = Time("2026-01-01T00:00:00Z".parse().unwrap());
        let later = now();
        let mut status = AppBuildStatus::default();
        set_condition(&mut status, BUILT, false, "Building", "runs", None, &then);
        set_condition(
            &mut status,
            BUILT,
            false,
            "Building",
            "still runs",
            None,
            &later,
        );
        assert_eq!(status.conditions[0].last_transition_time, then);
        assert_eq!(status.conditions[0].message, "still runs");
        set_condition(
            &mut status,
            BUILT,
            true,
            "BuildSucceeded",
            "built",
            None,
            &later,
        );
        assert_eq!(status.conditions[0].last_transition_time, later);
    }
}
