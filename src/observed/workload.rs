//! Pure readers of an App's workload: whether a Deployment has rolled out, which images a
//! release runs, and what keeps a pod from serving (a [`PodProblem`] with the container's
//! exit code and last termination message).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

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
        let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
        let waiting_reason = waiting
            .and_then(|w| w.reason.as_deref())
            .unwrap_or_default();
        let detail = waiting
            .and_then(|w| w.message.as_deref())
            .map(|m| format!(": {}", super::tail(m, 1024)))
            .unwrap_or_default();
        let oom = c
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .or_else(|| c.state.as_ref().and_then(|s| s.terminated.as_ref()))
            .is_some_and(|t| t.reason.as_deref() == Some("OOMKilled"));
        let kind = match waiting_reason {
            "CrashLoopBackOff" if oom => Some(PodProblem::OomKilled),
            "CrashLoopBackOff" => Some(PodProblem::CrashLoopBackOff),
            "ImagePullBackOff" => Some(PodProblem::ImagePullBackOff),
            "ErrImagePull" => Some(PodProblem::ErrImagePull),
            "InvalidImageName" => Some(PodProblem::InvalidImageName),
            "CreateContainerError" | "RunContainerError" => Some(PodProblem::CreateContainerError),
            "CreateContainerConfigError" => Some(PodProblem::CreateContainerConfigError),
            _ if oom => Some(PodProblem::OomKilled),
            _ => None,
        };
        if let Some(kind) = kind {
            let restarts = match c.restart_count {
                0 => String::new(),
                1 => ", restarted once".to_string(),
                n => format!(", restarted {n} times"),
            };
            return Some(Problem {
                kind,
                message: format!(
                    "pod {pod_name}, container {container}: {}{detail}{restarts}{}",
                    kind.as_str(),
                    last_exit(c)
                ),
            });
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
}
