//! `App`: where an application's code comes from, how it is built and where images go.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::rules::{dns_label_re, git_url_re, image_ref_re, registry_re, repo_path_rule};
use super::run::{RunSpec, RuntimeStatus};

/// A ShapeBlock application: its git source, its image registry and its build strategy.
/// Each build and deploy of it is an `AppBuild`. The App name is also the Helm release name,
/// so it is a DNS label of at most 53 characters.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "apps.shapeblock.io",
    version = "v1alpha1",
    kind = "App",
    doc = "A ShapeBlock application: git source, image registry and build strategy. Each build and deploy of it is an AppBuild.",
    namespaced,
    status = "AppStatus",
    shortname = "sbapp",
    category = "shapeblock",
    printcolumn(name = "Build", type_ = "string", json_path = ".spec.build.type"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Runtime", type_ = "string", json_path = ".status.runtime.state"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.runtime.readyReplicas"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.runtime.reason"),
    printcolumn(name = "Image", type_ = "string", json_path = ".status.currentImage", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(concat!("self.metadata.name.matches('", dns_label_re!(), "') && size(self.metadata.name) <= 53"))
        .message("the App name is its Helm release name: use at most 53 lowercase letters, digits and '-', starting and ending with a letter or digit"),
)]
#[x_kube(
    validation = Rule::new("self.build.type != 'image' || has(self.build.image)")
        .message("spec.build.image is required when spec.build.type is 'image'"),
    validation = Rule::new("self.build.type == 'image' || has(self.git)")
        .message("spec.git is required when spec.build.type is 'dockerfile' or 'buildpack': the code is built from it"),
    validation = Rule::new("self.build.type == 'image' || has(self.registry.url)")
        .message("spec.registry.url is required when spec.build.type is 'dockerfile' or 'buildpack': built images are pushed there"),
    validation = Rule::new("self.build.type == 'buildpack' || !has(self.build.builderImage)")
        .message("spec.build.builderImage is only used when spec.build.type is 'buildpack'"),
    validation = Rule::new("self.build.type == 'buildpack' || self.build.type == 'dockerfile' || !has(self.build.contextDir)")
        .message("spec.build.contextDir is only used when spec.build.type is 'dockerfile' or 'buildpack'"),
    validation = Rule::new("self.build.type == 'dockerfile' || !has(self.build.dockerfilePath)")
        .message("spec.build.dockerfilePath is only used when spec.build.type is 'dockerfile'"),
    validation = Rule::new("self.build.type == 'image' || !has(self.build.image)")
        .message("spec.build.image is only used when spec.build.type is 'image'"),
)]
#[serde(rename_all = "camelCase")]
pub struct AppSpec {
    /// Human-readable name shown in the ShapeBlock UI.
    #[schemars(length(min = 1, max = 253))]
    pub display_name: String,
    /// Free-form description of the application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub description: Option<String>,
    /// Git repository the application is built from. Required for `dockerfile` and `buildpack`
    /// builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitSource>,
    /// Registry that built images are pushed to and pulled from.
    pub registry: Registry,
    /// How the application's image is produced.
    pub build: AppBuildStrategy,
    /// How the application runs: port, replicas, command, environment, domains, resources,
    /// health check and autoscaling. Changing it releases the current image again with the
    /// new settings, without a rebuild.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunSpec>,
}

/// A git repository and how to reach it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GitSource {
    /// Repository URL: `https://…`, `ssh://…` or scp-like `git@host:org/repo.git`.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new(concat!("self.matches('", git_url_re!(), "')"))
        .message("spec.git.url must be an https://, http://, ssh:// or git:// URL, or scp-like user@host:path, without whitespace"))]
    pub url: String,
    /// Default branch, built when an AppBuild names no `gitRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    #[x_kube(validation = Rule::new(concat!("self.matches('", super::rules::git_ref_re!(), "') && !self.contains('..')"))
        .message("spec.git.branch must be a git branch name: letters, digits and ._/+-, not starting with '-' or containing '..'"))]
    pub branch: Option<String>,
    /// Secret in the App's namespace with the credentials of a private repository: for an SSH
    /// URL its private key (`ssh-privatekey`); for an https URL `username`, `password` or
    /// `token`, and `host`, the host (with its port, if any) the credentials are for: they are
    /// sent to that host only, over https. When a private SSH repository names none, the hub
    /// generates an ed25519 deploy key, stores it as a Secret and shows its public key in
    /// `status.deployKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), regex(pattern = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub secret_name: Option<String>,
    /// Whether the repository needs credentials to clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_private: Option<bool>,
    /// Extra SSH `known_hosts` lines for hosts other than github.com, gitlab.com and
    /// bitbucket.org, whose keys ship with ShapeBlock. Host keys are always checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub known_hosts: Option<String>,
}

/// Where images are pushed and pulled.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Registry {
    /// Registry location without scheme, e.g. `registry.example.com` or
    /// `registry.example.com:5000/team`. Images are pushed to `<url>/<namespace>/<app>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new(concat!("self.matches('", registry_re!(), "')"))
        .message("spec.registry.url must be a registry host such as registry.example.com or registry.example.com:5000/team, without a scheme"))]
    pub url: Option<String>,
    /// Secret of type `kubernetes.io/dockerconfigjson` in the App's namespace with push and
    /// pull credentials. Defaults to `registry-creds`, the Secret every Project receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), regex(pattern = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub secret_name: Option<String>,
}

/// Build strategy of an App.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BuildType {
    /// Build with the repository's Dockerfile (kaniko).
    #[default]
    Dockerfile,
    /// Build with Cloud Native Buildpacks (the lifecycle `creator`).
    Buildpack,
    /// Deploy a pre-built image; nothing is built.
    Image,
}

/// How the App's image is produced.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AppBuildStrategy {
    /// The build strategy: `dockerfile`, `buildpack` or `image`.
    #[serde(rename = "type")]
    pub build_type: BuildType,
    /// Cloud Native Buildpacks builder image for `buildpack` builds. Defaults to the hub's
    /// configured builder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new(concat!("self.matches('", image_ref_re!(), "')"))
        .message("spec.build.builderImage must be an image reference such as paketobuildpacks/builder-jammy-base:0.4 or registry.example.com:5000/builder@sha256:<digest>"))]
    pub builder_image: Option<String>,
    /// Pre-built image for `image` builds, with a tag or digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new(concat!("self.matches('", image_ref_re!(), "')"))
        .message("spec.build.image must be an image reference such as registry.example.com:5000/team/app:1.2.3 or nginx@sha256:<digest>"))]
    pub image: Option<String>,
    /// Path of the Dockerfile inside the repository, for `dockerfile` builds. Defaults to
    /// `Dockerfile` in the context directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new(repo_path_rule!())
        .message("spec.build.dockerfilePath must be a relative path inside the repository, without '..' or whitespace"))]
    pub dockerfile_path: Option<String>,
    /// Directory inside the repository used as the build context (dockerfile) or application
    /// directory (buildpack). Defaults to the repository root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new(repo_path_rule!())
        .message("spec.build.contextDir must be a relative path inside the repository, without '..' or whitespace"))]
    pub context_dir: Option<String>,
}

/// Lifecycle of an App.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AppPhase {
    /// The hub is checking the spec and preparing credentials.
    #[default]
    Initializing,
    /// The App can be built and deployed.
    Ready,
    /// The App cannot be built as specified; `message` says why.
    Failed,
}

/// Observed state of an App, written by the hub.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppStatus {
    /// Where the App is in its lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AppPhase>,
    /// Human-readable detail about the phase, such as why the App failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Name of the latest AppBuild that completed successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_build: Option<String>,
    /// Image currently deployed (`repository:tag` or with a digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_image: Option<String>,
    /// Image deployed before the current one, for rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_image: Option<String>,
    /// Public key (OpenSSH format) of the deploy key the hub generated for a private repository;
    /// add it to the repository as a read-only deploy key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_key: Option<String>,
    /// Hash of the `spec.run` last released: when `spec.run` changes, the hub releases the
    /// current image again with the new settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_hash: Option<String>,
    /// How the deployed App is running, observed from its workload and pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeStatus>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<Time>,
    /// Standard conditions (`Ready`) with reasons a program can act on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
