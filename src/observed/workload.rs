//! Pure readers of an App's workload: whether a Deployment has rolled out, which images a
//! release runs, and what keeps a pod from serving (a [`PodProblem`] with the container's
//! exit code and last termination message); and, from those, the App's
//! [`runtime_status`].

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{RuntimeState, RuntimeStatus};

/// Annotation helm puts on every object of a release: the release's name.
pub const HELM_RELEASE_ANNOTATION: &str = "meta.helm.sh/release-name";

/// What keeps a pod of an App from serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodProblem {
    /// The container keeps exiting and the kubelet backs off restarting it.
    CrashLoopBackOff,
    /// The container was killed for exceeding its memory limit.
    OomKilled,
    /// The image cannot be pulled (kubelet backing off).
    ImagePullBackOff,
    /// The image cannot be pulled (first attempts).
    ErrImagePull,
    /// The image reference is not valid.
    InvalidImageName,
    /// The runtime could not create the container.
    CreateContainerError,
    /// The container's configuration is unusable: a missing Secret or ConfigMap, or an image
    /// whose user cannot be verified as non-root.
    CreateContainerConfigError,
    /// No node can take the pod.
    Unschedulable,
    /// The container runs but fails its health check.
    ProbeFailing,
}

impl PodProblem {
    pub fn as_str(self) -> &'static str {
        match self {
            PodProblem::CrashLoopBackOff => "CrashLoopBackOff",
            PodProblem::OomKilled => "OOMKilled",
            PodProblem::ImagePullBackOff => "ImagePullBackOff",
            PodProblem::ErrImagePull => "ErrImagePull",
            PodProblem::InvalidImageName => "InvalidImageName",
            PodProblem::CreateContainerError => "CreateContainerError",
            PodProblem::CreateContainerConfigError => "CreateContainerConfigError",
            PodProblem::Unschedulable => "Unschedulable",
            PodProblem::ProbeFailing => "ProbeFailing",
        }
    }

    /// The problem a `reason` string names (as [`PodProblem::as_str`] writes it).
    pub fn parse(reason: &str) -> Option<Self> {
        ALL.iter().copied().find(|p| p.as_str() == reason)
    }

    /// Whether the problem will not cure itself by waiting: a rollout showing it has failed
    /// (a probe that fails may still pass, a pod not yet scheduled may find a node as the
    /// cluster scales).
    pub fn fatal(self) -> bool {
        !matches!(self, PodProblem::ProbeFailing | PodProblem::Unschedulable)
    }
}

const ALL: [PodProblem; 9] = [
    PodProblem::CrashLoopBackOff,
    PodProblem::OomKilled,
    PodProblem::ImagePullBackOff,
    PodProblem::ErrImagePull,
    PodProblem::InvalidImageName,
    PodProblem::CreateContainerError,
    PodProblem::CreateContainerConfigError,
    PodProblem::Unschedulable,
    PodProblem::ProbeFailing,
];

/// A pod's problem and its human explanation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub kind: PodProblem,
    /// Names the pod and container; includes the exit code and the last termination message
    /// when the container ran.
    pub message: String,
}

fn last_exit(status: &ContainerStatus) -> String {
    let terminated = status
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| status.state.as_ref().and_then(|s| s.terminated.as_ref()));
    match terminated {
        Some(t) => {
            let mut text = format!(", exit code {}", t.exit_code);
            if let Some(reason) = t.reason.as_deref().filter(|r| !r.is_empty()) {
                text.push_str(&format!(" ({reason})"));
            }
            if let Some(message) = t
                .message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
            {
                text.push_str(&format!(": {}", super::tail(message, 1024)));
            }
            text
        }
        None => String::new(),
    }
}

/// The problem a container's waiting reason names, if any (pure).
fn waiting_kind(c: &ContainerStatus) -> Option<PodProblem> {
    let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref())?;
    match waiting.reason.as_deref()? {
        "CrashLoopBackOff" => Some(PodProblem::CrashLoopBackOff),
        "ImagePullBackOff" => Some(PodProblem::ImagePullBackOff),
        "ErrImagePull" => Some(PodProblem::ErrImagePull),
        "InvalidImageName" => Some(PodProblem::InvalidImageName),
        "CreateContainerError" | "RunContainerError" => Some(PodProblem::CreateContainerError),
        "CreateContainerConfigError" => Some(PodProblem::CreateContainerConfigError),
        _ => None,
    }
}

/// `problem` of a pod's container, told: the pod, the container, the kubelet's waiting
/// message, restarts and the last exit (pure).
fn describe(pod_name: &str, c: &ContainerStatus, kind: PodProblem) -> Problem {
    let detail = c
        .state
        .as_ref()
        .and_then(|s| s.waiting.as_ref())
        .and_then(|w| w.message.as_deref())
        .map(|m| format!(": {}", super::tail(m, 1024)))
        .unwrap_or_default();
    let restarts = match c.restart_count {
        0 => String::new(),
        1 => ", restarted once".to_string(),
        n => format!(", restarted {n} times"),
    };
    Problem {
        kind,
        message: format!(
            "pod {pod_name}, container {}: {}{detail}{restarts}{}",
            c.name,
            kind.as_str(),
            last_exit(c)
        ),
    }
}

/// The first container of a pod, init containers first, that waits with a problem (an image
/// that cannot be pulled, a configuration the kubelet cannot use) (pure). For pods that run
/// once, like a build's, where a waiting container never starts by itself.
pub fn waiting_problem(pod: &Pod) -> Option<Problem> {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    super::container_statuses(pod)
        .find_map(|c| waiting_kind(c).map(|kind| describe(&pod_name, c, kind)))
}

/// What keeps `container` of a pod from serving, if anything (pure). Waiting reasons come
/// first, then an OOM kill, then an unscheduled pod, then a running container that is not
/// ready.
pub fn pod_problem(pod: &Pod, container: &str) -> Option<Problem> {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let status = pod.status.as_ref()?;
    let container_status = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == container);
    if let Some(c) = container_status {
        let oom = c
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .or_else(|| c.state.as_ref().and_then(|s| s.terminated.as_ref()))
            .is_some_and(|t| t.reason.as_deref() == Some("OOMKilled"));
        let kind = match waiting_kind(c) {
            Some(PodProblem::CrashLoopBackOff) | None if oom => Some(PodProblem::OomKilled),
            kind => kind,
        };
        if let Some(kind) = kind {
            return Some(describe(&pod_name, c, kind));
        }
    }
    let conditions = status.conditions.iter().flatten();
    if let Some(unschedulable) = conditions.clone().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    }) {
        return Some(Problem {
            kind: PodProblem::Unschedulable,
            message: format!(
                "pod {pod_name} cannot be scheduled: {}",
                unschedulable.message.clone().unwrap_or_default()
            ),
        });
    }
    let c = container_status?;
    let running = c.state.as_ref().is_some_and(|s| s.running.is_some());
    if running && !c.ready && status.phase.as_deref() == Some("Running") {
        // A new container is not ready until its first check passes: only one the kubelet
        // has restarted (its liveness check failed, or it exited) is failing its check.
        if c.restart_count > 0 {
            return Some(Problem {
                kind: PodProblem::ProbeFailing,
                message: format!(
                    "pod {pod_name}, container {container}: running but failing its health check, restarted {} times{}",
                    c.restart_count,
                    last_exit(c)
                ),
            });
        }
    }
    None
}

/// How far a Deployment's rollout is, as `kubectl rollout status` judges it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    /// Every replica runs the current template and is available.
    Done,
    /// Still rolling; the message says what it waits for.
    Waiting(String),
    /// The Deployment controller gave up (`ProgressDeadlineExceeded`).
    Stuck(String),
}

/// Reads a Deployment's rollout (pure).
pub fn rollout(deployment: &Deployment) -> Rollout {
    let name = deployment.metadata.name.clone().unwrap_or_default();
    let generation = deployment.metadata.generation.unwrap_or_default();
    let Some(status) = deployment.status.as_ref() else {
        return Rollout::Waiting(format!("Deployment {name} has no status yet"));
    };
    if status.observed_generation.unwrap_or_default() < generation {
        return Rollout::Waiting(format!(
            "Deployment {name}: waiting for the controller to see the update"
        ));
    }
    if let Some(stuck) = status.conditions.iter().flatten().find(|c| {
        c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    }) {
        return Rollout::Stuck(format!(
            "Deployment {name} {}",
            stuck
                .message
                .clone()
                .unwrap_or_else(|| "exceeded its progress deadline".into())
        ));
    }
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let updated = status.updated_replicas.unwrap_or_default();
    let replicas = status.replicas.unwrap_or_default();
    let available = status.available_replicas.unwrap_or_default();
    if updated < desired {
        return Rollout::Waiting(format!(
            "{updated} of {desired} replicas run the new version"
        ));
    }
    if replicas > updated {
        return Rollout::Waiting(format!(
            "{} old replicas are still being replaced",
            replicas - updated
        ));
    }
    if available < updated {
        return Rollout::Waiting(format!(
            "{available} of {updated} updated replicas are available"
        ));
    }
    Rollout::Done
}

/// The images of a Deployment's pod template, containers only (pure).
pub fn template_images(deployment: &Deployment) -> Vec<String> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| {
            p.containers
                .iter()
                .filter_map(|c| c.image.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a Deployment belongs to helm release `release` (pure).
pub fn in_release(deployment: &Deployment, release: &str) -> bool {
    deployment
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(HELM_RELEASE_ANNOTATION))
        .is_some_and(|r| r == release)
}

/// Whether two image references name the same image: equal, or the same repository with the
/// same digest (a tag beside a digest does not count), or the same repository and tag when
/// neither has a digest (pure).
pub fn same_image(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let split = |r: &str| -> (String, Option<String>, Option<String>) {
        let (name, digest) = match r.split_once('@') {
            Some((n, d)) => (n.to_string(), Some(d.to_string())),
            None => (r.to_string(), None),
        };
        // The tag follows the last ':' after the last '/', so a registry port is not a tag.
        let slash = name.rfind('/').map_or(0, |i| i + 1);
        match name[slash..].rfind(':') {
            Some(i) => (
                name[..slash + i].to_string(),
                Some(name[slash + i + 1..].to_string()),
                digest,
            ),
            None => (name, None, digest),
        }
    };
    let (repo_a, tag_a, digest_a) = split(a);
    let (repo_b, tag_b, digest_b) = split(b);
    if repo_a != repo_b {
        return false;
    }
    match (digest_a, digest_b) {
        (Some(x), Some(y)) => x == y,
        (None, None) => {
            tag_a.unwrap_or_else(|| "latest".into()) == tag_b.unwrap_or_else(|| "latest".into())
        }
        _ => false,
    }
}

/// Name of the container that runs the App in the first-party chart's pods (the same as
/// `render::app::APP_CONTAINER`, which this module may not import; a test ties the two).
pub const APP_CONTAINER: &str = "app";

/// `reason` of an App whose Deployment gave up (`ProgressDeadlineExceeded`) while no pod
/// shows a problem to name.
pub const ROLLOUT_STUCK: &str = "RolloutStuck";

/// The container of a Deployment's pod template that runs the App: `app` (the first-party
/// chart), else the first one (another chart's single container) (pure).
pub fn app_container(deployment: &Deployment) -> Option<&Container> {
    let containers = &deployment.spec.as_ref()?.template.spec.as_ref()?.containers;
    containers
        .iter()
        .find(|c| c.name == APP_CONTAINER)
        .or_else(|| containers.first())
}

/// Whether a pod runs the Deployment's current template, as far as the App is concerned: it
/// is not terminating, and its `container` runs `image` (pure). Comparing images (not the
/// ReplicaSet's pod-template-hash) keeps ReplicaSets out of the hub's watches; a release that
/// changes only settings keeps the image, and then old and new pods count alike, which is
/// what an image-based build check needs.
fn is_current(pod: &Pod, container: &str, image: &str) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .find(|c| c.name == container)
            .and_then(|c| c.image.as_deref())
            .is_some_and(|i| same_image(i, image))
}

/// The most telling problem of `problems` and how many pods share its kind: fatal before
/// non-fatal (a crash says more than a pod waiting for a node), then the kind most pods
/// show, then the kinds' order in [`PodProblem`]; the message is that of the first such pod
/// by name (pure).
fn most_telling(mut problems: Vec<(String, Problem)>) -> Option<(Problem, usize)> {
    problems.sort_by(|a, b| a.0.cmp(&b.0));
    let rank = |kind: PodProblem| ALL.iter().position(|k| *k == kind).unwrap_or(ALL.len());
    let count = |kind: PodProblem| problems.iter().filter(|(_, p)| p.kind == kind).count();
    let best = problems
        .iter()
        .map(|(_, p)| p.kind)
        .min_by_key(|kind| (!kind.fatal(), std::cmp::Reverse(count(*kind)), rank(*kind)))?;
    let shared = count(best);
    let (_, problem) = problems.into_iter().find(|(_, p)| p.kind == best)?;
    Some((problem, shared))
}

/// How an App runs, from its Deployment (`None`: nothing deployed) and the pods labelled
/// with its name (pure). `before` is the status written last, whose `lastTransitionTime`
/// stays unless `state` or `reason` changes (`now` then).
///
/// Only the pods of the current template (those whose App container runs the template's
/// image, not terminating) are judged, so that during a rollout `reason` describes the new
/// version, never an old pod on its way out. In order:
///
/// - no Deployment: `NotDeployed`, nothing counted, no URL (nothing answers);
/// - a problem on a current pod ([`pod_problem`]), else the Deployment's `ReplicaFailure`
///   (pods it cannot create: a quota, an admission webhook), else a rollout past its progress
///   deadline (`RolloutStuck`): `Degraded` while some replica is ready (old replicas count:
///   they still serve), `Down` when none is;
/// - a rollout under way: `Progressing` (the message says what it waits for);
/// - otherwise `Running`, also for a Deployment scaled to 0 replicas on purpose: the App is
///   as asked, nothing fails, and `desiredReplicas: 0` says why no URL answers (an App
///   deliberately stopped must not raise Warnings).
///
/// `restarts` sums the restarts of the current pods' App containers; with several current
/// pods the message says how many share the reason.
pub fn runtime_status(
    deployment: Option<&Deployment>,
    pods: &[Pod],
    urls: Vec<String>,
    before: Option<&RuntimeStatus>,
    now: &Time,
) -> RuntimeStatus {
    let mut status = match deployment {
        None => RuntimeStatus::default(),
        Some(deployment) => deployed(deployment, pods, urls),
    };
    let unchanged = before.filter(|b| b.state == status.state && b.reason == status.reason);
    status.last_transition_time = Some(
        unchanged
            .and_then(|b| b.last_transition_time.clone())
            .unwrap_or_else(|| now.clone()),
    );
    status
}

/// [`runtime_status`] of a deployed App, without its transition time (pure).
fn deployed(deployment: &Deployment, pods: &[Pod], urls: Vec<String>) -> RuntimeStatus {
    let counts = deployment.status.as_ref();
    let ready = counts.and_then(|s| s.ready_replicas).unwrap_or_default();
    let mut status = RuntimeStatus {
        state: RuntimeState::Running,
        // Kubernetes defaults an absent `replicas` to 1.
        desired_replicas: deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1),
        ready_replicas: ready,
        updated_replicas: counts.and_then(|s| s.updated_replicas).unwrap_or_default(),
        available_replicas: counts
            .and_then(|s| s.available_replicas)
            .unwrap_or_default(),
        urls,
        ..Default::default()
    };
    let container = app_container(deployment);
    let name = container.map(|c| c.name.as_str()).unwrap_or(APP_CONTAINER);
    status.image = container.and_then(|c| c.image.clone());
    let current: Vec<&Pod> = match status.image.as_deref() {
        Some(image) => pods.iter().filter(|p| is_current(p, name, image)).collect(),
        None => vec![],
    };
    status.restarts = current
        .iter()
        .flat_map(|p| p.status.iter())
        .flat_map(|s| s.container_statuses.iter().flatten())
        .filter(|c| c.name == name)
        .map(|c| c.restart_count)
        .sum();
    let problems = current
        .iter()
        .filter_map(|p| {
            let problem = pod_problem(p, name)?;
            Some((p.metadata.name.clone().unwrap_or_default(), problem))
        })
        .collect();
    let rollout = rollout(deployment);
    let failure = match most_telling(problems) {
        Some((problem, shared)) => {
            let mut message = problem.message;
            if current.len() > 1 {
                message.push_str(&format!(
                    " ({shared} of {} current pods show {})",
                    current.len(),
                    problem.kind.as_str()
                ));
            }
            Some((problem.kind.as_str().to_string(), message))
        }
        None => replica_failure(deployment).or_else(|| match &rollout {
            Rollout::Stuck(message) => Some((ROLLOUT_STUCK.to_string(), message.clone())),
            _ => None,
        }),
    };
    match (failure, rollout) {
        (Some((reason, message)), _) => {
            status.state = if ready > 0 {
                RuntimeState::Degraded
            } else {
                RuntimeState::Down
            };
            status.reason = Some(reason);
            status.message = Some(message);
        }
        (None, Rollout::Waiting(message)) => {
            status.state = RuntimeState::Progressing;
            status.message = Some(message);
        }
        (None, _) => {}
    }
    status
}

/// The Deployment's `ReplicaFailure` condition, as (reason, message) (pure).
fn replica_failure(deployment: &Deployment) -> Option<(String, String)> {
    let condition = deployment
        .status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")?;
    Some((
        condition
            .reason
            .clone()
            .unwrap_or_else(|| "ReplicaFailure".into()),
        condition.message.clone().unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn pod(container_status: Value, conditions: Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "web-7d9f-x2"},
            "status": {"phase": "Running", "conditions": conditions,
                "containerStatuses": [container_status]}}))
        .unwrap()
    }

    fn container(state: Value, last: Value, ready: bool, restarts: i32) -> Value {
        json!({"name": "app", "image": "r/web:1", "imageID": "", "ready": ready,
            "restartCount": restarts, "state": state, "lastState": last})
    }

    #[test]
    fn crash_loops_name_the_exit_code_and_the_last_message() {
        let p = pod(
            container(
                json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}}),
                json!({"terminated": {"exitCode": 3, "reason": "Error", "message": "Error: DATABASE_URL is not set"}}),
                false,
                4,
            ),
            json!([]),
        );
        let problem = pod_problem(&p, "app").unwrap();
        assert_eq!(problem.kind, PodProblem::CrashLoopBackOff);
        assert!(
            problem.message.contains("exit code 3"),
            "{}",
            problem.message
        );
        assert!(
            problem.message.contains("DATABASE_URL is not set"),
            "{}",
            problem.message
        );
        assert!(
            problem.message.contains("restarted 4 times"),
            "{}",
            problem.message
        );
        assert!(problem.kind.fatal());
        for kind in ALL {
            assert_eq!(PodProblem::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(PodProblem::parse("Completed"), None);
    }

    #[test]
    fn an_oom_kill_is_told_apart_from_a_crash() {
        let p = pod(
            container(
                json!({"waiting": {"reason": "CrashLoopBackOff"}}),
                json!({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}),
                false,
                2,
            ),
            json!([]),
        );
        let problem = pod_problem(&p, "app").unwrap();
        assert_eq!(problem.kind, PodProblem::OomKilled);
        assert_eq!(problem.kind.as_str(), "OOMKilled");
        assert!(
            problem.message.contains("exit code 137"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn a_waiting_init_container_is_a_problem_of_a_run_once_pod() {
        let p: Pod = serde_json::from_value(json!({"metadata": {"name": "web-1-build-x"},
            "status": {"phase": "Pending",
                "initContainerStatuses": [
                    {"name": "clone", "image": "alpine/git", "imageID": "", "ready": false,
                     "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
                    {"name": "commit", "image": "registry.example.com/git:x", "imageID": "",
                     "ready": false, "restartCount": 0, "state": {"waiting": {
                        "reason": "ErrImagePull",
                        "message": "failed to pull and unpack image: 401 Unauthorized"}}}],
                "containerStatuses": [{"name": "build", "image": "k", "imageID": "", "ready": false,
                    "restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}}]}}))
        .unwrap();
        let problem = waiting_problem(&p).unwrap();
        assert_eq!(problem.kind, PodProblem::ErrImagePull);
        assert_eq!(
            problem.message,
            "pod web-1-build-x, container commit: ErrImagePull: failed to pull and unpack image: 401 Unauthorized"
        );
        // PodInitializing, ContainerCreating: on the way, no problem.
        let starting: Pod = serde_json::from_value(json!({"metadata": {"name": "b"},
            "status": {"phase": "Pending", "containerStatuses": [{"name": "build", "image": "k",
                "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}}}]}}))
        .unwrap();
        assert_eq!(waiting_problem(&starting), None);
        // The App's container reads the same as before.
        let app = pod(
            container(
                json!({"waiting": {"reason": "CreateContainerConfigError", "message": "secret \"db\" not found"}}),
                json!({}),
                false,
                0,
            ),
            json!([]),
        );
        assert_eq!(waiting_problem(&app), pod_problem(&app, "app"));
    }

    #[test]
    fn pull_config_and_scheduling_problems() {
        for (reason, kind) in [
            ("ImagePullBackOff", PodProblem::ImagePullBackOff),
            ("ErrImagePull", PodProblem::ErrImagePull),
            ("InvalidImageName", PodProblem::InvalidImageName),
            (
                "CreateContainerConfigError",
                PodProblem::CreateContainerConfigError,
            ),
            ("CreateContainerError", PodProblem::CreateContainerError),
        ] {
            let p = pod(
                container(
                    json!({"waiting": {"reason": reason, "message": "detail"}}),
                    json!({}),
                    false,
                    0,
                ),
                json!([]),
            );
            let problem = pod_problem(&p, "app").unwrap();
            assert_eq!(problem.kind, kind, "{reason}");
            assert!(problem.message.contains("detail"));
        }
        let pending: Pod = serde_json::from_value(json!({"metadata": {"name": "web-1"},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable", "message": "0/1 nodes are available: 1 Insufficient memory."}]}}))
        .unwrap();
        let problem = pod_problem(&pending, "app").unwrap();
        assert_eq!(problem.kind, PodProblem::Unschedulable);
        assert!(problem.message.contains("Insufficient memory"));
        assert!(!problem.kind.fatal());
    }

    #[test]
    fn healthy_and_starting_pods_have_no_problem() {
        let ready = pod(
            container(json!({"running": {}}), json!({}), true, 0),
            json!([]),
        );
        assert_eq!(pod_problem(&ready, "app"), None);
        let starting = pod(
            container(json!({"running": {}}), json!({}), false, 0),
            json!([]),
        );
        assert_eq!(
            pod_problem(&starting, "app"),
            None,
            "not ready yet is not failing"
        );
        let failing = pod(
            container(
                json!({"running": {}}),
                json!({"terminated": {"exitCode": 137, "reason": "Error"}}),
                false,
                3,
            ),
            json!([]),
        );
        assert_eq!(
            pod_problem(&failing, "app").unwrap().kind,
            PodProblem::ProbeFailing
        );
    }

    fn deployment(generation: i64, replicas: i32, status: Value) -> Deployment {
        serde_json::from_value(json!({"metadata": {"name": "web", "generation": generation,
            "annotations": {"meta.helm.sh/release-name": "web"}},
            "spec": {"replicas": replicas, "selector": {}, "template": {"spec": {"containers": [
                {"name": "app", "image": "r/web:2"}]}}},
            "status": status}))
        .unwrap()
    }

    #[test]
    fn rollouts_as_kubectl_judges_them() {
        assert!(matches!(
            rollout(&deployment(2, 2, json!({"observedGeneration": 1}))),
            Rollout::Waiting(_)
        ));
        assert!(matches!(
            rollout(&deployment(2, 2, json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 1}))),
            Rollout::Waiting(m) if m.contains("1 of 2")
        ));
        assert!(matches!(
            rollout(&deployment(2, 2, json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2}))),
            Rollout::Waiting(m) if m.contains("old replicas")
        ));
        assert!(matches!(
            rollout(&deployment(
                2,
                2,
                json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 1})
            )),
            Rollout::Waiting(_)
        ));
        assert_eq!(
            rollout(&deployment(
                2,
                2,
                json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2})
            )),
            Rollout::Done
        );
        assert!(matches!(
            rollout(&deployment(
                2,
                2,
                json!({"observedGeneration": 2, "conditions": [{"type": "Progressing",
                "status": "False", "reason": "ProgressDeadlineExceeded", "message": "has timed out progressing."}]})
            )),
            Rollout::Stuck(_)
        ));
        let d = deployment(1, 1, json!({}));
        assert_eq!(template_images(&d), ["r/web:2"]);
        assert!(in_release(&d, "web") && !in_release(&d, "api"));
    }

    #[test]
    fn images_compare_by_digest_or_tag() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let other = format!("sha256:{}", "b".repeat(64));
        assert!(same_image("r:5000/p/web:v1", "r:5000/p/web:v1"));
        assert!(same_image(
            &format!("r:5000/p/web:v1@{digest}"),
            &format!("r:5000/p/web@{digest}")
        ));
        assert!(!same_image(
            &format!("r:5000/p/web:v1@{digest}"),
            &format!("r:5000/p/web:v1@{other}")
        ));
        assert!(!same_image("r:5000/p/web:v1", "r:5000/p/web:v2"));
        assert!(same_image("nginx", "nginx:latest"));
        assert!(!same_image("r:5000/p/web:v1", "r:5000/p/api:v1"));
        assert!(
            !same_image(&format!("r/web:v1@{digest}"), "r/web:v1"),
            "a digest decides"
        );
    }

    // runtime_status: one test per branch.

    /// A Deployment of `replicas` running `image`, with these status counts.
    fn app_deployment(replicas: i32, image: &str, status: Value) -> Deployment {
        serde_json::from_value(json!({"metadata": {"name": "web", "generation": 3},
            "spec": {"replicas": replicas, "selector": {}, "template": {"spec": {"containers": [
                {"name": "app", "image": image}]}}},
            "status": status}))
        .unwrap()
    }

    fn counts(replicas: i32, updated: i32, ready: i32, available: i32) -> Value {
        json!({"observedGeneration": 3, "replicas": replicas, "updatedReplicas": updated,
            "readyReplicas": ready, "availableReplicas": available})
    }

    /// A pod named `name` whose `app` container runs `image` with this status.
    fn app_pod(name: &str, image: &str, container_status: Value, conditions: Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name},
            "spec": {"containers": [{"name": "app", "image": image}]},
            "status": {"phase": "Running", "conditions": conditions,
                "containerStatuses": [container_status]}}))
        .unwrap()
    }

    fn healthy(name: &str, image: &str, restarts: i32) -> Pod {
        app_pod(
            name,
            image,
            container(json!({"running": {}}), json!({}), true, restarts),
            json!([]),
        )
    }

    fn crash_looping(name: &str, image: &str) -> Pod {
        app_pod(
            name,
            image,
            container(
                json!({"waiting": {"reason": "CrashLoopBackOff"}}),
                json!({"terminated": {"exitCode": 3, "reason": "Error", "message": "DATABASE_URL is not set"}}),
                false,
                5,
            ),
            json!([]),
        )
    }

    fn at(seconds: i64) -> Time {
        Time(jiff::Timestamp::from_second(seconds).unwrap())
    }

    const V1: &str = "r/web:1";
    const V2: &str = "r/web:2";

    fn urls() -> Vec<String> {
        vec!["https://shop.example.com".into()]
    }

    #[test]
    fn without_a_deployment_nothing_is_deployed() {
        let status = runtime_status(None, &[healthy("web-a", V1, 0)], urls(), None, &at(10));
        assert_eq!(status.state, RuntimeState::NotDeployed);
        assert_eq!(
            (
                status.desired_replicas,
                status.ready_replicas,
                status.restarts
            ),
            (0, 0, 0)
        );
        assert!(status.urls.is_empty(), "nothing answers");
        assert_eq!((status.image, status.reason), (None, None));
        assert_eq!(status.last_transition_time, Some(at(10)));
    }

    #[test]
    fn a_rolled_out_deployment_with_every_replica_ready_is_running() {
        let d = app_deployment(2, V1, counts(2, 2, 2, 2));
        let pods = [healthy("web-a", V1, 1), healthy("web-b", V1, 2)];
        let status = runtime_status(Some(&d), &pods, urls(), None, &at(10));
        assert_eq!(status.state, RuntimeState::Running);
        assert_eq!(
            (
                status.desired_replicas,
                status.ready_replicas,
                status.updated_replicas,
                status.available_replicas
            ),
            (2, 2, 2, 2)
        );
        assert_eq!(status.restarts, 3);
        assert_eq!(status.image.as_deref(), Some(V1));
        assert_eq!(status.urls, urls());
        assert_eq!((status.reason, status.message), (None, None));
    }

    #[test]
    fn an_app_scaled_to_zero_is_running_with_no_replica() {
        let d = app_deployment(0, V1, counts(0, 0, 0, 0));
        let status = runtime_status(Some(&d), &[], urls(), None, &at(10));
        assert_eq!(status.state, RuntimeState::Running);
        assert_eq!((status.desired_replicas, status.ready_replicas), (0, 0));
        assert_eq!(status.reason, None, "a deliberate stop is no failure");
    }

    #[test]
    fn a_rollout_without_problems_is_progressing() {
        let d = app_deployment(2, V2, counts(3, 1, 2, 2));
        // The new pod starts (not ready yet, never restarted): no problem.
        let starting = app_pod(
            "web-new",
            V2,
            container(json!({"running": {}}), json!({}), false, 0),
            json!([]),
        );
        let pods = [healthy("web-a", V1, 0), healthy("web-b", V1, 0), starting];
        let status = runtime_status(Some(&d), &pods, urls(), None, &at(10));
        assert_eq!(status.state, RuntimeState::Progressing);
        assert_eq!(status.image.as_deref(), Some(V2));
        assert_eq!(status.reason, None);
        assert!(
            status.message.as_deref().unwrap().contains("1 of 2"),
            "{status:?}"
        );
    }

    #[test]
    fn a_failing_new_version_beside_serving_old_replicas_is_degraded() {
        let d = app_deployment(1, V2, counts(2, 1, 1, 1));
        // The old pod serves (and once crashed: its problem is not the new version's).
        let pods = [crash_looping("web-new", V2), healthy("web-old", V1, 7)];
        let status = runtime_status(Some(&d), &pods, urls(), None, &at(10));
        assert_eq!(status.state, RuntimeState::Degraded);
        assert_eq!(status.reason.as_deref(), Some("CrashLoopBackOff"));
        let message = status.message.unwrap();
        assert!(message.contains("exit code 3"), "{message}");
        assert!(message.contains("DATABASE_URL is not set"), "{message}");
        assert!(message.contains("web-new"), "{message}");
        assert_eq!(status.restarts, 5, "restarts of current pods only");
        assert_eq!(status.image.as_deref(), Some(V2));
    }

    #[test]
    fn no_ready_replica_and_a_problem_is_down() {
        let d = app_deployment(1, V1, counts(1, 1, 0, 0));
        let status = runtime_status(
            Some(&d),
            &[crash_looping("web-a", V1)],
            urls(),
            None,
            &at(10),
        );
        assert_eq!(status.state, RuntimeState::Down);
        assert_eq!(status.reason.as_deref(), Some("CrashLoopBackOff"));
        assert!(
            !status.message.unwrap().contains("current pods"),
            "one pod: no count"
        );
    }

    #[test]
    fn the_most_telling_problem_is_reported_with_how_many_pods_share_it() {
        let d = app_deployment(4, V2, counts(4, 4, 0, 0));
        let unschedulable: Pod = serde_json::from_value(json!({"metadata": {"name": "web-a"},
            "spec": {"containers": [{"name": "app", "image": V2}]},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable", "message": "0/1 nodes are available"}]}}))
        .unwrap();
        let pull = |name: &str| {
            app_pod(
                name,
                V2,
                container(
                    json!({"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}),
                    json!({}),
                    false,
                    0,
                ),
                json!([]),
            )
        };
        let pods = [
            unschedulable.clone(),
            unschedulable,
            pull("web-c"),
            pull("web-b"),
        ];
        let status = runtime_status(Some(&d), &pods, urls(), None, &at(10));
        assert_eq!(status.state, RuntimeState::Down);
        assert_eq!(
            status.reason.as_deref(),
            Some("ImagePullBackOff"),
            "fatal before non-fatal, whatever the count"
        );
        let message = status.message.unwrap();
        assert!(
            message.starts_with("pod web-b,"),
            "first by name: {message}"
        );
        assert!(
            message.ends_with("(2 of 4 current pods show ImagePullBackOff)"),
            "{message}"
        );
    }

    #[test]
    fn a_stuck_rollout_without_a_pod_problem_says_so() {
        let mut status_json = counts(1, 0, 0, 0);
        status_json["conditions"] = json!([{"type": "Progressing", "status": "False",
            "reason": "ProgressDeadlineExceeded", "message": "has timed out progressing."}]);
        let d = app_deployment(1, V1, status_json);
        let status = runtime_status(Some(&d), &[], urls(), None, &at(10));
        assert_eq!(status.state, RuntimeState::Down);
        assert_eq!(status.reason.as_deref(), Some(ROLLOUT_STUCK));
        assert!(status.message.unwrap().contains("timed out"));
    }

    #[test]
    fn pods_the_deployment_cannot_create_are_a_failure() {
        let mut status_json = counts(2, 2, 1, 1);
        status_json["conditions"] = json!([{"type": "ReplicaFailure", "status": "True",
            "reason": "FailedCreate", "message": "pods \"web-x\" is forbidden: exceeded quota"}]);
        let d = app_deployment(2, V1, status_json);
        let status = runtime_status(Some(&d), &[healthy("web-a", V1, 0)], urls(), None, &at(10));
        assert_eq!(status.state, RuntimeState::Degraded);
        assert_eq!(status.reason.as_deref(), Some("FailedCreate"));
        assert!(status.message.unwrap().contains("exceeded quota"));
    }

    #[test]
    fn terminating_pods_are_not_judged() {
        let d = app_deployment(1, V1, counts(2, 1, 1, 1));
        let mut leaving = crash_looping("web-old", V1);
        leaving.metadata.deletion_timestamp = Some(at(5));
        let pods = [healthy("web-a", V1, 0), leaving];
        let status = runtime_status(Some(&d), &pods, urls(), None, &at(10));
        assert_eq!(status.reason, None, "{status:?}");
        assert_eq!(status.restarts, 0);
    }

    #[test]
    fn the_transition_time_moves_only_with_state_or_reason() {
        let d = app_deployment(1, V1, counts(1, 1, 0, 0));
        let first = runtime_status(
            Some(&d),
            &[crash_looping("web-a", V1)],
            urls(),
            None,
            &at(10),
        );
        // Another restart: the message changes, state and reason do not.
        let mut pod = crash_looping("web-a", V1);
        pod.status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .restart_count = 6;
        let again = runtime_status(Some(&d), &[pod], urls(), Some(&first), &at(20));
        assert_ne!(again.message, first.message);
        assert_eq!(again.last_transition_time, Some(at(10)));
        // Recovered: Running, and the time moves.
        let recovered = app_deployment(1, V1, counts(1, 1, 1, 1));
        let running = runtime_status(
            Some(&recovered),
            &[healthy("web-a", V1, 6)],
            urls(),
            Some(&again),
            &at(30),
        );
        assert_eq!(running.state, RuntimeState::Running);
        assert_eq!(running.last_transition_time, Some(at(30)));
        // A reason change alone moves it too.
        let mut oom = crash_looping("web-a", V1);
        oom.status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .last_state =
            serde_json::from_value(json!({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}))
                .unwrap();
        let oomed = runtime_status(Some(&d), &[oom], urls(), Some(&first), &at(40));
        assert_eq!(oomed.reason.as_deref(), Some("OOMKilled"));
        assert_eq!(oomed.last_transition_time, Some(at(40)));
    }
}
