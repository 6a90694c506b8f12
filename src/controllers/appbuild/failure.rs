//! Why an AppBuild failed, for a human and for a program: the [`FailureReason`] enum (which
//! becomes `status.reason`, the failed condition's reason and the Warning Event's reason), and
//! the pure readers that explain a failed build from what its pod's containers reported.

use k8s_openapi::api::core::v1::Pod;

use crate::crd::BuildType;
use crate::observed;
use crate::observed::workload::PodProblem;
use crate::render::jobs::{
    self as render, BUILD_CONTAINER, CHECKOUT_CONTAINER, CLONE_CONTAINER, COMMIT_CONTAINER,
    GIT_INIT_CONTAINER, PREPARE_CONTAINER,
};

/// Why an AppBuild ended `Failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// The AppBuild or its App cannot be built or deployed as specified.
    InvalidSpec,
    /// Neither a ref nor a tag was given, and the App has no image to redeploy.
    NothingToRedeploy,
    /// The build Job disappeared before its result was recorded.
    BuildJobLost,
    /// `git clone` (or resolving the commit) failed.
    GitCloneFailed,
    /// kaniko or the buildpacks lifecycle failed.
    BuildFailed,
    /// The build ran out of memory.
    BuildOutOfMemory,
    /// The build ran past `jobs.build_deadline_seconds`.
    BuildTimedOut,
    /// The build pod can never start: the Job cannot create it (`FailedCreate`: refused by
    /// Pod Security admission, a quota, a webhook), or the kubelet cannot create a container
    /// from its configuration (`CreateContainerConfigError`).
    BuildPodRejected,
    /// An image of the build pod cannot be pulled (`ErrImagePull`, `ImagePullBackOff`,
    /// `InvalidImageName`).
    BuildImagePullFailed,
    /// `helm upgrade --install` failed.
    DeployFailed,
    /// helm succeeded, but the release holds no Deployment running the image.
    DeployedNothing,
    /// The Deployment stopped progressing (`ProgressDeadlineExceeded`).
    RolloutStuck,
    /// The new version's pods cannot run (crash loop, OOM kill, image pull…): the rollout
    /// fails at once instead of at the progress deadline.
    Runtime(PodProblem),
    /// `spec.rollbackTo` names no usable earlier build of the App.
    RollbackUnusable,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::InvalidSpec => "InvalidSpec",
            FailureReason::NothingToRedeploy => "NothingToRedeploy",
            FailureReason::BuildJobLost => "BuildJobLost",
            FailureReason::GitCloneFailed => "GitCloneFailed",
            FailureReason::BuildFailed => "BuildFailed",
            FailureReason::BuildOutOfMemory => "BuildOutOfMemory",
            FailureReason::BuildTimedOut => "BuildTimedOut",
            FailureReason::BuildPodRejected => "BuildPodRejected",
            FailureReason::BuildImagePullFailed => "BuildImagePullFailed",
            FailureReason::DeployFailed => "DeployFailed",
            FailureReason::DeployedNothing => "DeployedNothing",
            FailureReason::RolloutStuck => "RolloutStuck",
            FailureReason::Runtime(problem) => problem.as_str(),
            FailureReason::RollbackUnusable => "RollbackUnusable",
        }
    }

    /// Whether the build Job is left running when the build fails for this reason (its pod
    /// waits for an image, or the Job keeps retrying a pod it cannot create): the Job is then
    /// deleted, so that nothing holds the node's resources until the build deadline.
    pub fn leaves_the_job_running(self) -> bool {
        matches!(
            self,
            FailureReason::BuildPodRejected | FailureReason::BuildImagePullFailed
        )
    }

    /// The condition a failure of this kind sets to False.
    pub fn condition(self) -> &'static str {
        match self {
            FailureReason::DeployFailed
            | FailureReason::DeployedNothing
            | FailureReason::RolloutStuck
            | FailureReason::Runtime(_) => super::DEPLOYED,
            _ => super::BUILT,
        }
    }
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
    } else if output.contains("does not allow request for unadvertised object") {
        format!(
            "the git host does not serve a commit by its SHA (it speaks git protocol v0 only): build a branch or tag instead of '{git_ref}'"
        )
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
    format!("{hint}\n{}", observed::tail(output, 1500))
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
) -> (FailureReason, String) {
    if condition_reason == "DeadlineExceeded" {
        return (
            FailureReason::BuildTimedOut,
            format!(
                "the build did not finish within {} s (jobs.build_deadline_seconds)",
                settings.build_deadline_seconds
            ),
        );
    }
    for pod in pods {
        let failed = |name: &str| observed::terminated(pod, name).filter(|t| t.exit_code != 0);
        for step in [
            GIT_INIT_CONTAINER,
            CLONE_CONTAINER,
            CHECKOUT_CONTAINER,
            COMMIT_CONTAINER,
        ] {
            if let Some(t) = failed(step) {
                let output = t.message.as_deref().unwrap_or_default();
                return (
                    FailureReason::GitCloneFailed,
                    clone_failure(output, git_ref),
                );
            }
        }
        if let Some(t) = failed(PREPARE_CONTAINER) {
            let output = t.message.as_deref().unwrap_or_default();
            return (
                FailureReason::BuildFailed,
                format!(
                    "preparing the build workspace failed\n{}",
                    observed::tail(output, 1500)
                ),
            );
        }
        if let Some(t) = failed(BUILD_CONTAINER) {
            if t.reason.as_deref() == Some("OOMKilled") {
                return (
                    FailureReason::BuildOutOfMemory,
                    format!(
                        "the build ran out of memory (limit {}; jobs.build_memory_limit)",
                        settings.build_memory_limit
                    ),
                );
            }
            let output = observed::tail(t.message.as_deref().unwrap_or_default(), 1500);
            let what = match build_type {
                BuildType::Buildpack => render::lifecycle_exit(t.exit_code)
                    .map(|band| format!("buildpacks: {band}, exit code {}", t.exit_code)),
                _ => None,
            }
            .unwrap_or_else(|| format!("the build failed with exit code {}", t.exit_code));
            return (FailureReason::BuildFailed, format!("{what}\n{output}"));
        }
    }
    (
        FailureReason::BuildFailed,
        format!("the build Job failed: {condition_reason} {condition_message}")
            .trim()
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::jobs::JobSettings;
    use serde_json::{Value, json};

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
        assert_eq!(reason, FailureReason::GitCloneFailed);
        assert!(
            message.starts_with("git ref 'nope' was not found"),
            "{message}"
        );
        assert!(message.contains("fatal: Remote branch nope"), "{message}");

        // A commit the host does not have: the fetch step (named `clone`) says so.
        let fetch = pod(json!({"initContainerStatuses": [
            terminated("git-init", 0, "Completed", ""),
            terminated("clone", 128, "Error",
                "fatal: remote error: upload-pack: not our ref 0123456789abcdef0123456789abcdef01234567")]}));
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let (reason, message) =
            build_failure("", "", &[fetch], BuildType::Dockerfile, sha, &settings);
        assert_eq!(reason, FailureReason::GitCloneFailed);
        assert!(
            message.starts_with(&format!("git ref '{sha}' was not found")),
            "{message}"
        );
        let v0 = pod(
            json!({"initContainerStatuses": [terminated("clone", 1, "Error",
            "error: Server does not allow request for unadvertised object 0123")]}),
        );
        let (_, message) = build_failure("", "", &[v0], BuildType::Dockerfile, sha, &settings);
        assert!(message.contains("protocol v0"), "{message}");
        let checkout = pod(json!({"initContainerStatuses": [
            terminated("checkout", 128, "Error", "fatal: reference is not a tree: FETCH_HEAD")]}));
        assert_eq!(
            build_failure("", "", &[checkout], BuildType::Dockerfile, sha, &settings).0,
            FailureReason::GitCloneFailed
        );

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
        assert_eq!(reason, FailureReason::BuildFailed);
        assert!(
            message.starts_with("buildpacks: no buildpack detected"),
            "{message}"
        );
        assert!(message.contains("No buildpack groups passed detection"));

        let oom = pod(json!({"containerStatuses": [terminated("build", 137, "OOMKilled", "")]}));
        assert_eq!(
            build_failure("", "", &[oom], BuildType::Dockerfile, "main", &settings).0,
            FailureReason::BuildOutOfMemory
        );
        let kaniko = pod(json!({"containerStatuses": [terminated(
            "build", 1, "Error", "error building image: RUN false: exit status 1")]}));
        let (reason, message) =
            build_failure("", "", &[kaniko], BuildType::Dockerfile, "main", &settings);
        assert_eq!(reason, FailureReason::BuildFailed);
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
            FailureReason::BuildTimedOut
        );
    }
}
