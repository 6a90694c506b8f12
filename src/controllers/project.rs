//! Project: a namespace with ShapeBlock labels, the registry Secret copied (and kept in sync)
//! from the `shapeblock` namespace, and a `deployer` ServiceAccount bound, in that namespace
//! only, to the `shapeblock-deployer` ClusterRole. Deleting a Project deletes its namespace
//! (finalizer); the reconcile never waits for that: the namespace's own watch event brings
//! the Project back once the namespace is gone.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::{Context, MANAGED_BY, ReconcileError};
use crate::crd::{FIELD_MANAGER, Project, ProjectPhase};
use crate::render::agent::DEPLOYER_ROLE;

/// Finalizer that makes deletion remove the namespace first.
pub const FINALIZER: &str = "apps.shapeblock.io/project-namespace";
/// Label on every object created for a project.
pub const PROJECT_LABEL: &str = "shapeblock.io/project";
/// Name of the registry Secret in each project namespace.
pub const REGISTRY_SECRET: &str = "registry-creds";
/// Name of the project's deployer ServiceAccount and its RoleBinding.
pub const DEPLOYER: &str = "deployer";

fn labels(project: &str) -> Value {
    json!({ PROJECT_LABEL: project, MANAGED_BY.0: MANAGED_BY.1 })
}

/// The namespace of a project (pure).
pub fn namespace(project: &Project) -> Value {
    let name = project.name_any();
    let owner = project
        .controller_owner_ref(&())
        .map(|o| serde_json::to_value(o).unwrap_or(Value::Null));
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels(&name), "ownerReferences": owner.into_iter().collect::<Vec<_>>()}
    })
}

/// The project's copy of the registry Secret (pure): same type and data, fixed name.
pub fn registry_copy(project: &str, source: &Secret) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": REGISTRY_SECRET, "namespace": project, "labels": labels(project)},
        "type": source.type_.clone().unwrap_or_else(|| "Opaque".into()),
        "data": source.data.clone().unwrap_or_default(),
    })
}

/// The deployer ServiceAccount and its namespace-scoped binding (pure).
pub fn deployer(project: &str) -> [Value; 2] {
    [
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": DEPLOYER, "namespace": project, "labels": labels(project)},
            "imagePullSecrets": [{"name": REGISTRY_SECRET}]
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": DEPLOYER, "namespace": project, "labels": labels(project)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": DEPLOYER_ROLE},
            "subjects": [{"kind": "ServiceAccount", "name": DEPLOYER, "namespace": project}]
        }),
    ]
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

async fn write_status(
    api: &Api<Project>,
    project: &Project,
    phase: ProjectPhase,
    message: &str,
) -> Result<(), kube::Error> {
    let current = project.status.as_ref();
    if current.and_then(|s| s.phase) == Some(phase)
        && current.and_then(|s| s.message.as_deref()) == Some(message)
    {
        return Ok(());
    }
    let status = json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
        "status": {
            "phase": phase, "message": message, "namespace": project.name_any(),
            "observedGeneration": project.metadata.generation,
            "lastUpdated": Time(jiff::Timestamp::now()),
        }
    });
    api.patch_status(&project.name_any(), &apply_params(), &Patch::Apply(&status))
        .await?;
    Ok(())
}

async fn reconcile(project: Arc<Project>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let name = project.name_any();
    let projects: Api<Project> = Api::all(ctx.client.clone());
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());

    if project.metadata.deletion_timestamp.is_some() {
        if !project.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(Action::await_change());
        }
        if project.status.as_ref().and_then(|s| s.phase) != Some(ProjectPhase::Terminating) {
            write_status(
                &projects,
                &project,
                ProjectPhase::Terminating,
                "deleting the project namespace",
            )
            .await?;
        }
        // Only the project's own namespace is deleted, never one it found already there.
        let own = namespaces
            .get_opt(&name)
            .await?
            .filter(|ns| ns.labels().get(PROJECT_LABEL) == Some(&name));
        match own {
            Some(ns) if ns.metadata.deletion_timestamp.is_none() => {
                namespaces
                    .delete(&name, &DeleteParams::background())
                    .await?;
                return Ok(Action::await_change());
            }
            // Terminating: the namespace's deletion event reconciles this Project again.
            Some(_) => return Ok(Action::await_change()),
            None => {}
        }
        let remaining: Vec<&String> = project
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .collect();
        let patch = json!({"metadata": {"finalizers": remaining, "resourceVersion": project.resource_version()}});
        projects
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        return Ok(Action::await_change());
    }

    if !project.finalizers().iter().any(|f| f == FINALIZER) {
        let mut finalizers = project.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": project.resource_version()}});
        projects
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        return Ok(Action::await_change()); // the update event brings the next step
    }

    let result = ensure(&project, &ctx).await;
    match &result {
        Ok(()) => {
            write_status(
                &projects,
                &project,
                ProjectPhase::Active,
                "Project setup completed",
            )
            .await?
        }
        Err(err) => {
            write_status(&projects, &project, ProjectPhase::Failed, &err.to_string()).await?
        }
    }
    result.map(|()| Action::await_change())
}

/// Brings the project's objects to their desired state.
async fn ensure(project: &Project, ctx: &Context) -> Result<(), ReconcileError> {
    let name = project.name_any();
    let client = &ctx.client;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if let Some(ns) = namespaces.get_opt(&name).await? {
        let ours = ns.labels().get(PROJECT_LABEL) == Some(&name);
        if !ours {
            return Err(ReconcileError::Invalid(format!(
                "namespace {name} already exists and does not belong to this project; choose another project name"
            )));
        }
    }
    namespaces
        .patch(&name, &apply_params(), &Patch::Apply(&namespace(project)))
        .await?;

    let source_name = project
        .spec
        .registry_secret
        .clone()
        .unwrap_or_else(|| ctx.config.default_registry_secret.clone());
    let sources: Api<Secret> =
        Api::namespaced(client.clone(), &ctx.config.registry_source_namespace);
    let source = sources.get_opt(&source_name).await?.ok_or_else(|| {
        ReconcileError::Missing(format!(
            "registry secret {}/{source_name} not found; create it, the project picks it up automatically",
            ctx.config.registry_source_namespace
        ))
    })?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &name);
    secrets
        .patch(
            REGISTRY_SECRET,
            &apply_params(),
            &Patch::Apply(&registry_copy(&name, &source)),
        )
        .await?;

    let [service_account, binding] = deployer(&name);
    let sa_api: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), &name);
    sa_api
        .patch(DEPLOYER, &apply_params(), &Patch::Apply(&service_account))
        .await?;
    let rb_api: Api<k8s_openapi::api::rbac::v1::RoleBinding> =
        Api::namespaced(client.clone(), &name);
    rb_api
        .patch(DEPLOYER, &apply_params(), &Patch::Apply(&binding))
        .await?;
    Ok(())
}

/// Runs the Project controller; stop it by dropping the future.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let metrics = ctx.metrics.clone();
    let namespaces: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
    let sources: Api<PartialObjectMeta<Secret>> =
        Api::namespaced(client.clone(), &ctx.config.registry_source_namespace);
    let managed = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    let (store, stream) = super::trimmed_reflector(Api::<Project>::all(client), &ctx);
    let default_source = ctx.config.default_registry_secret.clone();
    Controller::for_stream(stream, store.clone())
        .with_config(super::controller_config())
        .owns_stream(
            watcher(namespaces, watcher::Config::default().labels(&managed)).touched_objects(),
        )
        // A change to a registry source Secret re-syncs every project that copies it (metadata
        // only: a data change still moves the resourceVersion, which is an event).
        .watches_stream(
            watcher(sources, watcher::Config::default()).touched_objects(),
            move |secret| {
                let changed = secret.name_any();
                store
                    .state()
                    .iter()
                    .filter(|p| {
                        p.spec.registry_secret.as_deref().unwrap_or(&default_source) == changed
                    })
                    .map(|p| ObjectRef::from_obj(p.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .run(
            super::bounded("project", reconcile),
            |object, error, ctx| super::on_error("project", object, error, ctx),
            ctx,
        )
        .for_each(|result| {
            metrics.record("project", &result);
            async {}
        })
        .await;
}
