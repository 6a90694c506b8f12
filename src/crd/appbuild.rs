//! `AppBuild`: one build and deploy of an App.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::NodeAffinity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::rules::{dns_label_re, env_name_re, git_ref_re, image_tag_re};

/// One build and deploy of an App: a build Job (git clone, then kaniko or buildpacks) and a
/// Helm Job that deploys the image. An AppBuild is a record: its spec cannot change once
/// created; to build again, create another AppBuild.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "apps.shapeblock.io",
    version = "v1alpha1",
    kind = "AppBuild",
    doc = "One build and deploy of an App, with its phases, image, commit and failure reason in status. Immutable once created.",
    namespaced,
    status = "AppBuildStatus",
    shortname = "sbbuild",
    shortname = "ab",
    category = "shapeblock",
    printcolumn(name = "App", type_ = "string", json_path = ".spec.appName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Image", type_ = "string", json_path = ".status.image"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(concat!("self.metadata.name.matches('", dns_label_re!(), "') && size(self.metadata.name) <= 63"))
        .message("the AppBuild name labels its Jobs: use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"),
)]
#[x_kube(
    validation = Rule::new("self == oldSelf")
        .message("AppBuild spec is immutable: create a new AppBuild to build or deploy again"),
    validation = Rule::new("!has(self.rollbackTo) || !(has(self.gitRef) || has(self.imageTag) || has(self.buildVars) || has(self.helmValues))")
        .message("spec.rollbackTo redeploys an earlier build as it was: it excludes gitRef, imageTag, buildVars and helmValues"),
)]
#[serde(rename_all = "camelCase")]
pub struct AppBuildSpec {
    /// Name of the App (in the same namespace) to build and deploy.
    #[schemars(length(min = 1, max = 53))]
    #[x_kube(validation = Rule::new(concat!("self.matches('", dns_label_re!(), "')"))
        .message("spec.appName must be the name of an App: lowercase letters, digits and '-'"))]
    pub app_name: String,
    /// Git branch, tag or commit to build; a commit is given as its full SHA (40 or 64 hex
    /// digits) and checked out exactly, a branch or tag is cloned shallowly. When empty, the
    /// App's branch is built; when both `gitRef` and `imageTag` are empty, the App's current
    /// image is redeployed, or its branch built when it has no image yet. A Completed build of
    /// the same commit with the same inputs is reused instead of rebuilt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new(concat!("self.matches('", git_ref_re!(), "') && !self.contains('..') && !self.endsWith('.lock') && !self.endsWith('/')"))
        .message("spec.gitRef must be a git branch, tag or commit: letters, digits and ._/+-, not starting with '-' or containing '..'"))]
    pub git_ref: Option<String>,
    /// Tag given to the built image. Defaults to the commit's first 12 hex digits when
    /// `gitRef` is a commit SHA, else to the AppBuild's name (unique in the namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new(concat!("self.matches('", image_tag_re!(), "')"))
        .message("spec.imageTag must be an image tag: up to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'"))]
    pub image_tag: Option<String>,
    /// Build-time variables: `--build-arg` for Dockerfile builds, platform env files for
    /// buildpack builds. Values are passed as data, never through a shell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["key"]))]
    pub build_vars: Vec<BuildVar>,
    /// Redeploys the image (by digest) and the exact Helm values of this earlier Completed
    /// AppBuild of the same App, without building. Excludes `gitRef`, `imageTag`, `buildVars`
    /// and `helmValues`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new(concat!("self.matches('", dns_label_re!(), "')"))
        .message("spec.rollbackTo must be the name of an AppBuild"))]
    pub rollback_to: Option<String>,
    /// Helm values deep-merged last over the values the hub renders from the App's
    /// `spec.run` (the escape hatch): keys of the configured app chart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub helm_values: Option<BTreeMap<String, serde_json::Value>>,
    /// Node affinity for the build pod (e.g. to build on large nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_node_affinity: Option<NodeAffinity>,
}

/// One build-time variable.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct BuildVar {
    /// Variable name, like an environment variable name.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(concat!("self.matches('", env_name_re!(), "')"))
        .message("buildVars key must be a variable name: letters, digits and '_', not starting with a digit"))]
    pub key: String,
    /// Variable value, passed verbatim.
    #[schemars(length(max = 32768))]
    pub value: String,
}

/// A JSON object with any content, kept as given (`x-kubernetes-preserve-unknown-fields`).
pub(crate) fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// Lifecycle of an AppBuild.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AppBuildPhase {
    /// Accepted; the build Job has not started yet.
    #[default]
    Pending,
    /// The build Job is cloning and building.
    Building,
    /// The image exists; the Helm Job is deploying it.
    Deploying,
    /// The image is built and deployed.
    Completed,
    /// The build or deploy failed; `reason` and `message` say why.
    Failed,
}

/// Observed state of an AppBuild, written by the hub.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppBuildStatus {
    /// Where the build is in its lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AppBuildPhase>,
    /// Human-readable detail about the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// On failure, a short machine-readable reason (e.g. `GitCloneFailed`, `BuildFailed`,
    /// `DeployFailed`); `message` holds the human explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Name of the build Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// Name of the build pod, for following its logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// Name of the Helm deploy Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helm_job_name: Option<String>,
    /// Name of a Helm Job seen failed; kept so a failed deploy is not retried by accident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_helm_job_name: Option<String>,
    /// Full reference of the image built and deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Tag of the image deployed: `spec.imageTag`, or the tag of a reused build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_tag: Option<String>,
    /// Commit SHA the ref resolved to when cloned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
    /// When the hub accepted the build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the build pod started running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_start_time: Option<Time>,
    /// When the build Job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_end_time: Option<Time>,
    /// When the AppBuild reached `Completed` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions (`Built`, `Deployed`) with reasons a program can act on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
