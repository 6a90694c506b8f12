//! The ShapeBlock custom resources (group `apps.shapeblock.io`, version `v1alpha1`).
//!
//! The Rust types here are the single source of truth for the CRDs: their `///` docs become
//! the schema descriptions, the validation rules live on the fields as CEL
//! (`x-kubernetes-validations`), and `crds/*.yaml` is generated from them by
//! `shapeblock-hub crds --out crds` (CI fails on drift).
//!
//! This module depends only on `kube` and `k8s-openapi`: it holds the data shapes, their
//! schema, and [`install`], which applies the CRDs to a cluster.
//!
//! Depends on: nothing of this crate.

mod app;
mod appbuild;
mod install;
mod project;
mod rules;
mod run;
mod service;
mod team;

pub use app::{
    App, AppBuildStrategy, AppPhase, AppSpec, AppStatus, BuildType, GitSource, Registry,
};
pub use appbuild::{AppBuild, AppBuildPhase, AppBuildSpec, AppBuildStatus, BuildVar};
pub use install::{FIELD_MANAGER, InstallError, Installed, TEAMS_CRD, install};
pub use project::{Project, ProjectPhase, ProjectSpec, ProjectStatus};
pub use run::{
    Autoscaling, DEFAULT_PORT, Domain, EnvFrom, EnvVar, HealthCheck, RunResources, RunSpec,
    RuntimeState, RuntimeStatus,
};
pub use service::{ChartSource, Service, ServicePhase, ServiceSpec, ServiceStatus};
pub use team::{Team, TeamProject, TeamRole, TeamSpec, TeamStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every ShapeBlock resource.
pub const GROUP: &str = "apps.shapeblock.io";
/// The API version of every ShapeBlock resource.
pub const VERSION: &str = "v1alpha1";

/// Label key and value on every object the hub creates in a managed cluster.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "shapeblock-hub";

/// Every ShapeBlock CRD, in a stable order (the order of the files in `crds/`).
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        Project::crd(),
        App::crd(),
        AppBuild::crd(),
        Service::crd(),
        Team::crd(),
    ]
}

/// Renders one CRD as the YAML document committed under `crds/`.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::SerializeError> {
    let body = serde_saphyr::to_string(crd)?;
    Ok(format!(
        "# Generated from the Rust types in src/crd by `shapeblock-hub crds --out crds`.\n\
         # Do not edit: change the types and regenerate.\n{body}"
    ))
}

/// The file name a CRD is written to under `crds/`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}
