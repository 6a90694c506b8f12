//! `Team`: people who share access to projects, with a role in each.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::rules::dns_label_re;

/// A regular expression for a ShapeBlock user id: what follows `shapeblock:user:` in the name
/// the apiserver sees (impersonated by the agent). Letters, digits and `._@+-`, at most 128,
/// starting and ending with a letter or digit, so an id is never empty and never `system:…`.
macro_rules! user_id_re {
    () => {
        "^[A-Za-z0-9]([A-Za-z0-9._@+-]{0,126}[A-Za-z0-9])?$"
    };
}

/// A ShapeBlock team: its members (ShapeBlock user ids) and the projects it may use, each with
/// a role. The hub binds the team's group (`shapeblock:team:<name>`) and each member
/// (`shapeblock:user:<id>`) to the role's ClusterRole in each project's namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "apps.shapeblock.io",
    version = "v1alpha1",
    kind = "Team",
    doc = "A ShapeBlock team: members (ShapeBlock user ids) and the projects they may use, each with a role (admin, developer, viewer). Reconciled into RoleBindings in each project's namespace.",
    status = "TeamStatus",
    shortname = "sbteam",
    category = "shapeblock",
    printcolumn(name = "Members", type_ = "integer", json_path = ".status.memberCount"),
    printcolumn(name = "Projects", type_ = "string", json_path = ".status.boundProjects"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(concat!("self.metadata.name.matches('", dns_label_re!(), "') && size(self.metadata.name) <= 63"))
        .message("the Team name becomes part of a group and RoleBinding name: use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"),
)]
#[serde(rename_all = "camelCase")]
pub struct TeamSpec {
    /// Human-readable name shown in the ShapeBlock UI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub display_name: Option<String>,
    /// ShapeBlock user ids of the members (each impersonated as `shapeblock:user:<id>`).
    #[serde(default)]
    #[schemars(length(max = 1000), inner(regex(pattern = user_id_re!()), length(max = 128)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub members: Vec<String>,
    /// The projects the team may use, each with the team's role in it.
    #[serde(default)]
    #[schemars(length(max = 500))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["project"]))]
    pub projects: Vec<TeamProject>,
}

/// One project of a team and the team's role in it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TeamProject {
    /// Name of the Project (and of its namespace).
    #[schemars(length(min = 1, max = 63), regex(pattern = dns_label_re!()))]
    pub project: String,
    /// What the team may do in the project's namespace.
    pub role: TeamRole,
}

/// A team's role in a project, bound to the ClusterRole `shapeblock-team-<role>`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TeamRole {
    /// Everything a developer may, and the project's Secrets and ConfigMaps.
    Admin,
    /// Manages Apps, AppBuilds and Services; reads pods, their logs and the workloads.
    Developer,
    /// Reads the ShapeBlock kinds, pods, logs and workloads; never Secrets.
    Viewer,
}

impl TeamRole {
    /// Its name in the API (`admin`, `developer`, `viewer`).
    pub fn as_str(self) -> &'static str {
        match self {
            TeamRole::Admin => "admin",
            TeamRole::Developer => "developer",
            TeamRole::Viewer => "viewer",
        }
    }
}

/// Observed state of a Team, written by the hub.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TeamStatus {
    /// Projects whose namespace holds the team's RoleBinding.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bound_projects: Vec<String>,
    /// Projects named in the spec that do not exist (or whose namespace is not ready yet):
    /// bound as soon as they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_projects: Vec<String>,
    /// Number of members.
    #[serde(default)]
    pub member_count: i64,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<Time>,
    /// Standard conditions (`Ready`: every project of the spec is bound).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
