//! `Project`: a namespace prepared for ShapeBlock apps.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::rules::dns_label_re;

/// A ShapeBlock project: a namespace with ShapeBlock labels, the registry secret copied into
/// it and a deployer ServiceAccount limited to that namespace. The namespace is named after
/// the Project, so a Project is cluster-scoped and its name must be a valid namespace name.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "apps.shapeblock.io",
    version = "v1alpha1",
    kind = "Project",
    doc = "A ShapeBlock project: a namespace with ShapeBlock labels, the registry secret and a namespace-scoped deployer ServiceAccount. Named after the namespace it creates.",
    status = "ProjectStatus",
    shortname = "sbproject",
    shortname = "sbproj",
    category = "shapeblock",
    printcolumn(name = "Display Name", type_ = "string", json_path = ".spec.displayName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(concat!("self.metadata.name.matches('", dns_label_re!(), "') && size(self.metadata.name) <= 63"))
        .message("the Project name becomes a namespace name: use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"),
    validation = Rule::new("!(self.metadata.name in ['default', 'shapeblock'] || self.metadata.name.startsWith('kube-'))")
        .message("the Project name is reserved: 'default', 'shapeblock' and names starting with 'kube-' cannot be projects"),
    validation = Rule::new("!has(self.spec) || !has(self.spec.ownRegistrySecret) || self.spec.ownRegistrySecret != 'registry-creds'")
        .message("spec.ownRegistrySecret names the Secret copied to registry-creds, so it cannot be registry-creds itself"),
)]
#[serde(rename_all = "camelCase")]
pub struct ProjectSpec {
    /// Human-readable name shown in the ShapeBlock UI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub display_name: Option<String>,
    /// Free-form description of the project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub description: Option<String>,
    /// Name of the registry Secret (type `kubernetes.io/dockerconfigjson`) in the `shapeblock`
    /// namespace that is copied into the project namespace as `registry-creds`. Defaults to
    /// `registry-creds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), regex(pattern = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub registry_secret: Option<String>,
    /// Name of a `kubernetes.io/dockerconfigjson` Secret in the project's own namespace,
    /// copied as `registry-creds` instead of `registrySecret`: for a project that pushes to a
    /// registry of its own. Set by `PUT /api/v1/clusters/{cluster}/projects/{project}/registry-credentials`
    /// (which writes `registry-creds-own`); the namespace is created first, then the Project
    /// waits (`RegistrySecretMissing`) until the Secret exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), regex(pattern = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub own_registry_secret: Option<String>,
}

/// Lifecycle of a Project.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ProjectPhase {
    /// The namespace and its objects are being created.
    #[default]
    Initializing,
    /// The namespace is ready for apps and services.
    Active,
    /// Setting up the namespace failed; `message` says why.
    Failed,
    /// The Project is being deleted together with its namespace.
    Terminating,
}

/// Observed state of a Project, written by the hub.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectStatus {
    /// Where the project is in its lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ProjectPhase>,
    /// Human-readable detail about the phase, such as why setup failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The namespace that holds the project's apps and services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
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
