//! `Service`: a Helm chart (a database, a cache, …) installed in a project.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::appbuild::free_form_object;
use super::rules::dns_label_re;

/// A service such as a database, installed from a Helm chart by a Helm Job and upgraded
/// whenever the spec changes; deleting it uninstalls the release. The Service name is the
/// Helm release name, so it is a DNS label of at most 53 characters.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "apps.shapeblock.io",
    version = "v1alpha1",
    kind = "Service",
    doc = "A service such as a database, installed from a Helm chart and upgraded when the spec changes; deleting it uninstalls the release.",
    namespaced,
    status = "ServiceStatus",
    shortname = "sbservice",
    shortname = "sbsvc",
    category = "shapeblock",
    printcolumn(name = "Chart", type_ = "string", json_path = ".spec.chart.name"),
    printcolumn(name = "Version", type_ = "string", json_path = ".spec.chart.version"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(concat!("self.metadata.name.matches('", dns_label_re!(), "') && size(self.metadata.name) <= 53"))
        .message("the Service name is its Helm release name: use at most 53 lowercase letters, digits and '-', starting and ending with a letter or digit"),
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// The chart to install.
    pub chart: ChartSource,
    /// Helm values for the chart, used as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub helm_values: Option<BTreeMap<String, serde_json::Value>>,
}

/// Where a chart comes from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.repoURL)")
    .message("spec.chart.repoURL is required: an https:// chart repository or an oci:// registry path"))]
pub struct ChartSource {
    /// Chart name, e.g. `postgresql`. With an `oci://` repoURL the chart is pulled from
    /// `<repoURL>/<name>`.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._-]*$')")
        .message("spec.chart.name must be a chart name: letters, digits, '.', '_' and '-', not starting with a symbol"))]
    pub name: String,
    /// Chart version or version constraint. Defaults to the newest version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9^~<>=*][A-Za-z0-9.+_^~<>=*, -]*$')")
        .message("spec.chart.version must be a chart version such as 15.5.2 or a constraint such as ^15.0"))]
    pub version: Option<String>,
    /// Name of a predefined repository (kept for compatibility with the first ShapeBlock
    /// operator; `repoURL` is what the hub uses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub repo: Option<String>,
    /// Chart repository: an `https://` (or `http://`) Helm repository URL, or an `oci://`
    /// registry path holding the chart.
    #[serde(default, rename = "repoURL", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^(https?|oci)://[^[:space:]]+$')")
        .message("spec.chart.repoURL must be an https:// or http:// Helm repository URL, or an oci:// registry path"))]
    pub repo_url: Option<String>,
}

/// Lifecycle of a Service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServicePhase {
    /// Accepted; the Helm Job has not started yet.
    #[default]
    Pending,
    /// The Helm Job is installing or upgrading the chart.
    Deploying,
    /// The release is installed with the current spec.
    Deployed,
    /// Installing or upgrading failed; `message` says why.
    Failed,
    /// The release is being uninstalled.
    Deleting,
}

/// Observed state of a Service, written by the hub.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// Where the Service is in its lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ServicePhase>,
    /// Human-readable detail about the phase, such as why the install failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Name of the Helm release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helm_release: Option<String>,
    /// URL where the service can be reached, when the chart exposes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Hash of the chart and values last installed; a different hash triggers an upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_hash: Option<String>,
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
