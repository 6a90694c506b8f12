//! Tenancy: the namespaces ShapeBlock's namespaced kinds (App, AppBuild, Service) act in.
//!
//! A namespace is a project's only when it is not reserved (`kube-*`, `default`, `shapeblock`,
//! the agent's namespace, the registry source namespace), a Project of the same name exists,
//! and the namespace carries that Project's label and a controller owner reference to that
//! Project's uid — what the Project controller writes when it creates the namespace, and
//! what no tenant can forge. Anywhere else the controllers create nothing: a build in
//! `shapeblock` would mount the master registry credentials, a Helm Job in `kube-system`
//! would run with whatever that namespace grants.
//!
//! [`decide`] is pure; [`read`] fetches what it needs (nothing for a reserved namespace).

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;

use super::project::PROJECT_LABEL;
use crate::crd::Project;

/// Reason (status conditions, Events) of an object outside a project namespace.
pub const NOT_IN_PROJECT: &str = "NotInProject";

/// Why a namespace is not a project's; its `Display` is the human message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotInProject {
    #[error(
        "namespace {0} is reserved for the system and ShapeBlock itself: Apps, AppBuilds and Services are reconciled only in the namespace of a Project; create a Project and use its namespace"
    )]
    Reserved(String),
    #[error(
        "no Project {0}: Apps, AppBuilds and Services are reconciled only in the namespace of a Project; create Project {0} (it adopts this namespace if it carries the label shapeblock.io/project={0}) or move this object into a Project's namespace"
    )]
    NoProject(String),
    #[error(
        "namespace {0} does not exist yet: Project {0} creates it once its registry Secret is there"
    )]
    NoNamespace(String),
    #[error(
        "namespace {0} was not created by Project {0} (it lacks the label shapeblock.io/project={0} or the Project's owner reference): Apps, AppBuilds and Services are reconciled only in the namespace of a Project"
    )]
    NotTheProjects(String),
}

/// Whether a namespace can never be a project's (pure): the system's, ShapeBlock's own (the
/// registry source holds the master registry credentials), the agent's.
pub fn reserved(namespace: &str, registry_source_namespace: &str) -> bool {
    namespace.starts_with("kube-")
        || namespace == "default"
        || namespace == "shapeblock"
        || namespace == crate::render::agent::NAMESPACE
        || namespace == registry_source_namespace
}

/// What the cluster holds about one namespace's tenancy.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The namespace's metadata, if it exists.
    pub namespace: Option<ObjectMeta>,
    /// The metadata of the Project named like the namespace, if it exists.
    pub project: Option<ObjectMeta>,
}

/// Whether `namespace` belongs to a project (pure).
pub fn decide(
    namespace: &str,
    registry_source_namespace: &str,
    o: &Observed,
) -> Result<(), NotInProject> {
    let ns = namespace.to_string();
    if reserved(namespace, registry_source_namespace) {
        return Err(NotInProject::Reserved(ns));
    }
    let Some(project) = &o.project else {
        return Err(NotInProject::NoProject(ns));
    };
    let Some(meta) = &o.namespace else {
        return Err(NotInProject::NoNamespace(ns));
    };
    let labelled = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(PROJECT_LABEL))
        .is_some_and(|v| v == namespace);
    // The uid, not the name: a Project deleted and made again does not inherit a namespace
    // still owned by the old one.
    let owned = project.uid.as_ref().is_some_and(|uid| {
        meta.owner_references.iter().flatten().any(|o| {
            o.controller == Some(true)
                && o.kind == "Project"
                && o.api_version.starts_with("apps.shapeblock.io/")
                && &o.uid == uid
        })
    });
    if labelled && owned {
        Ok(())
    } else {
        Err(NotInProject::NotTheProjects(ns))
    }
}

/// Reads what [`decide`] needs and decides: the namespace and the Project of its name (two
/// GETs; none for a reserved namespace, one when there is no such Project).
pub async fn read(
    client: &kube::Client,
    namespace: &str,
    registry_source_namespace: &str,
) -> Result<Result<(), NotInProject>, kube::Error> {
    let mut o = Observed::default();
    if !reserved(namespace, registry_source_namespace) {
        let projects: Api<Project> = Api::all(client.clone());
        o.project = projects.get_opt(namespace).await?.map(|p| p.metadata);
        if o.project.is_some() {
            let namespaces: Api<Namespace> = Api::all(client.clone());
            o.namespace = namespaces.get_opt(namespace).await?.map(|n| n.metadata);
        }
    }
    Ok(decide(namespace, registry_source_namespace, &o))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(value: serde_json::Value) -> ObjectMeta {
        serde_json::from_value(value).unwrap()
    }

    fn project() -> ObjectMeta {
        meta(json!({"name": "shop", "uid": "u-1"}))
    }

    fn namespace(label: Option<&str>, owner_uid: Option<&str>, controller: bool) -> ObjectMeta {
        let mut ns = json!({"name": "shop"});
        if let Some(label) = label {
            ns["labels"] = json!({PROJECT_LABEL: label});
        }
        if let Some(uid) = owner_uid {
            ns["ownerReferences"] = json!([{"apiVersion": "apps.shapeblock.io/v1alpha1",
                "kind": "Project", "name": "shop", "uid": uid, "controller": controller}]);
        }
        meta(ns)
    }

    fn observed(project: Option<ObjectMeta>, namespace: Option<ObjectMeta>) -> Observed {
        Observed { namespace, project }
    }

    #[test]
    fn reserved_namespaces_are_never_a_projects() {
        let own = observed(
            Some(project()),
            Some(namespace(Some("kube-system"), Some("u-1"), true)),
        );
        for ns in [
            "kube-system",
            "kube-public",
            "kube-node-lease",
            "default",
            "shapeblock",
            "shapeblock-agent",
            "platform",
        ] {
            assert_eq!(
                decide(ns, "platform", &own),
                Err(NotInProject::Reserved(ns.into())),
                "{ns}"
            );
        }
        assert!(!reserved("shop", "shapeblock"));
        assert!(!reserved("kubeflow", "shapeblock"), "only the kube- prefix");
    }

    #[test]
    fn a_project_namespace_has_its_project_its_label_and_its_owner() {
        let ok = observed(
            Some(project()),
            Some(namespace(Some("shop"), Some("u-1"), true)),
        );
        assert_eq!(decide("shop", "shapeblock", &ok), Ok(()));
    }

    #[test]
    fn anything_less_is_not_in_a_project() {
        let cases = [
            (observed(None, None), NotInProject::NoProject("shop".into())),
            (
                observed(None, Some(namespace(Some("shop"), Some("u-1"), true))),
                NotInProject::NoProject("shop".into()),
            ),
            (
                observed(Some(project()), None),
                NotInProject::NoNamespace("shop".into()),
            ),
            // A plain namespace, a label without the owner, an owner without the label.
            (
                observed(Some(project()), Some(namespace(None, None, false))),
                NotInProject::NotTheProjects("shop".into()),
            ),
            (
                observed(Some(project()), Some(namespace(Some("shop"), None, false))),
                NotInProject::NotTheProjects("shop".into()),
            ),
            (
                observed(Some(project()), Some(namespace(None, Some("u-1"), true))),
                NotInProject::NotTheProjects("shop".into()),
            ),
            // Another project's label; an older Project's uid; an owner that is not the controller.
            (
                observed(
                    Some(project()),
                    Some(namespace(Some("other"), Some("u-1"), true)),
                ),
                NotInProject::NotTheProjects("shop".into()),
            ),
            (
                observed(
                    Some(project()),
                    Some(namespace(Some("shop"), Some("u-0"), true)),
                ),
                NotInProject::NotTheProjects("shop".into()),
            ),
            (
                observed(
                    Some(project()),
                    Some(namespace(Some("shop"), Some("u-1"), false)),
                ),
                NotInProject::NotTheProjects("shop".into()),
            ),
        ];
        for (o, expected) in cases {
            assert_eq!(decide("shop", "shapeblock", &o), Err(expected));
        }
        let message = NotInProject::NoProject("shop".into()).to_string();
        assert!(message.starts_with("no Project shop:"), "{message}");
    }
}
