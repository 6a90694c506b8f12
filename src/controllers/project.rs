//! Project: a namespace with ShapeBlock labels, the agent's rights in it (a RoleBinding of
//! `shapeblock-agent-project`, first: the agent can write nothing there before), the
//! registry Secret copied (and kept in sync)
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
use crate::render::agent::{DEPLOYER_ROLE, PROJECT_BINDING, PROJECT_ROLE};

/// Finalizer that makes deletion remove the namespace first.
pub const FINALIZER: &str = "apps.shapeblock.io/project-namespace";
/// Label on every object created for a project (on its namespace, the admission policy's
/// mark of a project namespace).
pub const PROJECT_LABEL: &str = crate::render::agent::PROJECT_LABEL;
/// Name of the registry Secret in each project namespace.
pub const REGISTRY_SECRET: &str = "registry-creds";
/// Name of a project's own registry Secret in its namespace as the API writes it
/// (`spec.ownRegistrySecret`), copied to [`REGISTRY_SECRET`].
pub const OWN_REGISTRY_SECRET: &str = "registry-creds-own";
/// Name of the project's deployer ServiceAccount and its RoleBinding.
pub const DEPLOYER: &str = crate::render::agent::DEPLOYER_ACCOUNT;

fn labels(project: &str) -> Value {
    json!({ PROJECT_LABEL: project, MANAGED_BY.0: MANAGED_BY.1 })
}

/// The Pod Security level a project namespace enforces, whatever the cluster's default.
///
/// `baseline`, not `restricted`: the build pod runs its git steps, kaniko and the buildpacks
/// `creator` as root (kaniko unpacks images as root; the creator starts as root to drop to
/// the builder's user), which `restricted` forbids and `baseline` allows, since none of them
/// is privileged, shares a host namespace or mounts a host path. The Apps' own pods are
/// rendered to `restricted` anyway. No `warn` or `audit` label at `restricted`: every build
/// Job created would then come back with warnings no one can act on.
pub const POD_SECURITY_ENFORCE: (&str, &str) = ("pod-security.kubernetes.io/enforce", "baseline");
/// The policy version enforced: the cluster's own (`latest`), not one pinned to a release.
pub const POD_SECURITY_ENFORCE_VERSION: (&str, &str) =
    ("pod-security.kubernetes.io/enforce-version", "latest");

/// The namespace of a project (pure).
pub fn namespace(project: &Project) -> Value {
    let name = project.name_any();
    let owner = project
        .controller_owner_ref(&())
        .map(|o| serde_json::to_value(o).unwrap_or(Value::Null));
    let mut labels = labels(&name);
    for (key, value) in [POD_SECURITY_ENFORCE, POD_SECURITY_ENFORCE_VERSION] {
        labels[key] = value.into();
    }
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels, "ownerReferences": owner.into_iter().collect::<Vec<_>>()}
    })
}

/// The agent's own rights in the project namespace (pure): [`PROJECT_ROLE`] bound to its
/// ServiceAccount, owned by the Project. Outside project namespaces the agent can write
/// nothing, so this is the first object the Project controller creates in a new one.
pub fn agent_binding(project: &Project) -> Value {
    let name = project.name_any();
    let owner = project
        .controller_owner_ref(&())
        .map(|o| serde_json::to_value(o).unwrap_or(Value::Null));
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": PROJECT_BINDING, "namespace": name, "labels": labels(&name),
                     "ownerReferences": owner.into_iter().collect::<Vec<_>>()},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": PROJECT_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": crate::render::agent::NAME,
                      "namespace": crate::render::agent::NAMESPACE}]
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

/// The type of the condition a Project carries: its namespace is ready for apps.
pub const READY: &str = "Ready";
/// Reason of a Project whose registry Secret is not a `kubernetes.io/dockerconfigjson` with a
/// parseable `.dockerconfigjson`: nothing is copied.
pub const REGISTRY_SECRET_NOT_DOCKER_CONFIG_JSON: &str = "RegistrySecretNotDockerConfigJson";

async fn write_status(
    api: &Api<Project>,
    project: &Project,
    phase: ProjectPhase,
    reason: &str,
    message: &str,
) -> Result<(), kube::Error> {
    let current = project.status.as_ref();
    let now = Time(jiff::Timestamp::now());
    let mut conditions = current.map(|s| s.conditions.clone()).unwrap_or_default();
    super::set_condition(
        &mut conditions,
        READY,
        phase == ProjectPhase::Active,
        reason,
        message,
        project.metadata.generation,
        &now,
    );
    if current.and_then(|s| s.phase) == Some(phase)
        && current.and_then(|s| s.message.as_deref()) == Some(message)
        && current.map(|s| &s.conditions) == Some(&conditions)
    {
        return Ok(());
    }
    let ready: Vec<_> = conditions.iter().filter(|c| c.type_ == READY).collect();
    let status = json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
        "status": {
            "phase": phase, "message": message, "namespace": project.name_any(),
            "observedGeneration": project.metadata.generation,
            "lastUpdated": now,
            "conditions": ready,
        }
    });
    api.patch_status(&project.name_any(), &apply_params(), &Patch::Apply(&status))
        .await?;
    Ok(())
}

/// What the cluster holds for one Project.
#[derive(Default)]
pub struct Observed {
    /// The namespace of the Project's name, if any (ours or not).
    pub namespace: Option<Namespace>,
    /// The registry Secret to copy (absent on deletion, or when it does not exist).
    pub registry_source: Option<Secret>,
}

/// The one thing to do next for a Project.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Deleted without our finalizer.
    Nothing,
    AddFinalizer,
    /// Deleting: delete the Project's own namespace (never one it found already there).
    DeleteNamespace,
    /// Deleting: the namespace terminates; its deletion event brings the Project back.
    WaitForNamespace,
    /// Deleting: the namespace is gone, let the Project go.
    RemoveFinalizer,
    /// The Project copies a Secret of its own namespace (`spec.ownRegistrySecret`), which
    /// does not exist yet: apply the namespace and the agent's RoleBinding (its event brings
    /// the Project back).
    PrepareNamespace,
    /// The namespace exists and belongs to someone else.
    NamespaceTaken {
        namespace: String,
    },
    /// The registry Secret to copy does not exist (yet).
    RegistrySourceMissing {
        source: String,
    },
    /// The registry Secret is not a `kubernetes.io/dockerconfigjson` with a parseable
    /// `.dockerconfigjson` (`detail` says what is wrong): nothing is copied.
    RegistrySourceInvalid {
        source: String,
        detail: String,
    },
    /// Apply the namespace, the agent's RoleBinding, the registry copy and the deployer.
    Ensure,
}

/// Decides the next step (pure). `source` is the registry Secret's name in the source namespace.
pub fn decide(project: &Project, o: &Observed, source: &str) -> Step {
    let name = project.name_any();
    let has_finalizer = project.finalizers().iter().any(|f| f == FINALIZER);
    let own = o
        .namespace
        .as_ref()
        .filter(|ns| ns.labels().get(PROJECT_LABEL) == Some(&name));
    if project.metadata.deletion_timestamp.is_some() {
        return match (has_finalizer, own) {
            (false, _) => Step::Nothing,
            (true, Some(ns)) if ns.metadata.deletion_timestamp.is_none() => Step::DeleteNamespace,
            (true, Some(_)) => Step::WaitForNamespace,
            (true, None) => Step::RemoveFinalizer,
        };
    }
    if !has_finalizer {
        return Step::AddFinalizer;
    }
    if o.namespace.is_some() && own.is_none() {
        return Step::NamespaceTaken { namespace: name };
    }
    if project.spec.own_registry_secret.is_some() && own.is_none() {
        return Step::PrepareNamespace;
    }
    let Some(registry) = &o.registry_source else {
        return Step::RegistrySourceMissing {
            source: source.to_string(),
        };
    };
    if let Err(detail) = docker_config_json(registry) {
        return Step::RegistrySourceInvalid {
            source: source.to_string(),
            detail,
        };
    }
    Step::Ensure
}

/// Whether a Secret is a registry Secret: of type `kubernetes.io/dockerconfigjson`, with a
/// `.dockerconfigjson` that is a JSON object whose `auths` is an object (pure). Anything else
/// (an Opaque Secret with a token, say) is never copied into a tenant's namespace.
pub fn docker_config_json(secret: &Secret) -> Result<(), String> {
    const TYPE: &str = "kubernetes.io/dockerconfigjson";
    if secret.type_.as_deref() != Some(TYPE) {
        return Err(format!(
            "it is of type {}, not {TYPE}",
            secret.type_.as_deref().unwrap_or("Opaque")
        ));
    }
    let Some(bytes) = secret
        .data
        .as_ref()
        .and_then(|d| d.get(".dockerconfigjson"))
    else {
        return Err("it has no key .dockerconfigjson".into());
    };
    match serde_json::from_slice::<Value>(&bytes.0) {
        Ok(config) if config.get("auths").is_some_and(Value::is_object) => Ok(()),
        Ok(_) => Err("its .dockerconfigjson has no \"auths\" object".into()),
        Err(e) => Err(format!("its .dockerconfigjson is not JSON ({e})")),
    }
}

/// The reason of the `Ready` condition a step leads to (pure).
pub fn reason(step: &Step) -> &'static str {
    match step {
        Step::NamespaceTaken { .. } => "NamespaceTaken",
        Step::RegistrySourceMissing { .. } => "RegistrySecretMissing",
        Step::RegistrySourceInvalid { .. } => REGISTRY_SECRET_NOT_DOCKER_CONFIG_JSON,
        Step::DeleteNamespace | Step::WaitForNamespace => "Terminating",
        Step::PrepareNamespace => "Initializing",
        _ => "Active",
    }
}

/// The phase and message a step leads to, or None when it writes no status (pure).
pub fn status_after(step: &Step, source_namespace: &str) -> Option<(ProjectPhase, String)> {
    match step {
        Step::Nothing | Step::AddFinalizer | Step::RemoveFinalizer => None,
        Step::DeleteNamespace | Step::WaitForNamespace => Some((
            ProjectPhase::Terminating,
            "deleting the project namespace".into(),
        )),
        Step::PrepareNamespace => Some((
            ProjectPhase::Initializing,
            "creating the project namespace for its own registry Secret".into(),
        )),
        Step::NamespaceTaken { .. }
        | Step::RegistrySourceMissing { .. }
        | Step::RegistrySourceInvalid { .. } => Some((
            ProjectPhase::Failed,
            failure(step, source_namespace)?.to_string(),
        )),
        Step::Ensure => Some((ProjectPhase::Active, "Project setup completed".into())),
    }
}

/// The error a failing step reports (its category sets the retry), or None (pure).
fn failure(step: &Step, source_namespace: &str) -> Option<ReconcileError> {
    match step {
        Step::NamespaceTaken { namespace } => Some(ReconcileError::Invalid(format!(
            "namespace {namespace} already exists and does not belong to this project; choose another project name"
        ))),
        Step::RegistrySourceMissing { source } => Some(ReconcileError::Missing(format!(
            "registry secret {source_namespace}/{source} not found; set it with PUT …/registry-credentials of the hub's API (or create it), the project picks it up automatically"
        ))),
        Step::RegistrySourceInvalid { source, detail } => Some(ReconcileError::Refused {
            reason: REGISTRY_SECRET_NOT_DOCKER_CONFIG_JSON,
            message: format!(
                "registry secret {source_namespace}/{source} must be a kubernetes.io/dockerconfigjson Secret with a parseable .dockerconfigjson, and {detail}; nothing is copied into the project"
            ),
        }),
        _ => None,
    }
}

/// The registry Secret a Project copies, `(namespace, name)`: its own (in its namespace) or
/// the cluster's (in the registry source namespace).
fn registry_source(project: &Project, ctx: &Context) -> (String, String) {
    match &project.spec.own_registry_secret {
        Some(own) => (project.name_any(), own.clone()),
        None => (
            ctx.config.registry_source_namespace.clone(),
            project
                .spec
                .registry_secret
                .clone()
                .unwrap_or_else(|| ctx.config.default_registry_secret.clone()),
        ),
    }
}

async fn read(project: &Project, ctx: &Context) -> Result<Observed, ReconcileError> {
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let mut o = Observed {
        namespace: namespaces.get_opt(&project.name_any()).await?,
        registry_source: None,
    };
    let own_namespace = o
        .namespace
        .as_ref()
        .is_some_and(|ns| ns.labels().get(PROJECT_LABEL) == Some(&project.name_any()));
    // A Secret of the project's namespace is read only once that namespace is its own.
    if project.metadata.deletion_timestamp.is_none()
        && (project.spec.own_registry_secret.is_none() || own_namespace)
    {
        let (namespace, name) = registry_source(project, ctx);
        let sources: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
        o.registry_source = sources.get_opt(&name).await?;
    }
    Ok(o)
}

/// The namespace, then the agent's rights in it (before anything else is written there).
async fn prepare_namespace(project: &Project, ctx: &Context) -> Result<(), ReconcileError> {
    let name = project.name_any();
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    namespaces
        .patch(&name, &apply_params(), &Patch::Apply(&namespace(project)))
        .await?;
    let rb_api: Api<k8s_openapi::api::rbac::v1::RoleBinding> =
        Api::namespaced(ctx.client.clone(), &name);
    rb_api
        .patch(
            PROJECT_BINDING,
            &apply_params(),
            &Patch::Apply(&agent_binding(project)),
        )
        .await?;
    Ok(())
}

async fn apply(
    project: &Project,
    step: &Step,
    o: &Observed,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let name = project.name_any();
    let client = &ctx.client;
    let projects: Api<Project> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match step {
        Step::Nothing
        | Step::WaitForNamespace
        | Step::NamespaceTaken { .. }
        | Step::RegistrySourceMissing { .. }
        | Step::RegistrySourceInvalid { .. } => {}
        Step::AddFinalizer => super::jobs::add_finalizer(&projects, project, FINALIZER).await?,
        Step::RemoveFinalizer => {
            super::jobs::remove_finalizer(&projects, project, FINALIZER).await?;
        }
        Step::DeleteNamespace => {
            namespaces
                .delete(&name, &DeleteParams::background())
                .await?;
        }
        Step::PrepareNamespace => {
            prepare_namespace(project, ctx).await?;
        }
        Step::Ensure => {
            let Some(source) = &o.registry_source else {
                return Ok(());
            };
            prepare_namespace(project, ctx).await?;
            let rb_api: Api<k8s_openapi::api::rbac::v1::RoleBinding> =
                Api::namespaced(client.clone(), &name);
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &name);
            secrets
                .patch(
                    REGISTRY_SECRET,
                    &apply_params(),
                    &Patch::Apply(&registry_copy(&name, source)),
                )
                .await
                .map_err(|e| match e {
                    // The apiserver's authorizer sees a new RoleBinding a moment after it is
                    // stored: retried soon, not as a missing RBAC rule.
                    kube::Error::Api(e) if e.code == 403 => ReconcileError::Missing(format!(
                        "the agent's rights in namespace {name} (RoleBinding {PROJECT_BINDING} to ClusterRole \
                         {PROJECT_ROLE}) are not in effect yet; if this lasts, apply the agent's install \
                         manifest again: {}", e.message
                    )),
                    e => e.into(),
                })?;
            let [service_account, binding] = deployer(&name);
            let sa_api: Api<k8s_openapi::api::core::v1::ServiceAccount> =
                Api::namespaced(client.clone(), &name);
            sa_api
                .patch(DEPLOYER, &apply_params(), &Patch::Apply(&service_account))
                .await?;
            rb_api
                .patch(DEPLOYER, &apply_params(), &Patch::Apply(&binding))
                .await?;
        }
    }
    Ok(())
}

async fn reconcile(project: Arc<Project>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let observed = read(&project, &ctx).await?;
    let (source_namespace, source) = registry_source(&project, &ctx);
    let step = decide(&project, &observed, &source);
    let source_namespace = &source_namespace;
    if let Some((phase, message)) = status_after(&step, source_namespace)
        && phase == ProjectPhase::Terminating
    {
        // Said before the namespace goes, so the deletion is visible while it runs.
        report(&project, phase, reason(&step), &message, &ctx).await?;
    }
    apply(&project, &step, &observed, &ctx).await?;
    if let Some((phase, message)) = status_after(&step, source_namespace)
        && phase != ProjectPhase::Terminating
    {
        report(&project, phase, reason(&step), &message, &ctx).await?;
    }
    match failure(&step, source_namespace) {
        Some(error) => Err(error),
        None => Ok(Action::await_change()),
    }
}

/// Writes the status, and a Normal Event when the phase changes (failures get their Warning
/// from the error policy).
async fn report(
    project: &Project,
    phase: ProjectPhase,
    reason: &str,
    message: &str,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let projects: Api<Project> = Api::all(ctx.client.clone());
    let before = project.status.as_ref().and_then(|s| s.phase);
    write_status(&projects, project, phase, reason, message).await?;
    if before != Some(phase) && phase != ProjectPhase::Failed {
        let event = super::events::phase(&format!("{phase:?}"), message.to_string());
        super::events::publish(&ctx.client, &project.object_ref(&()), event).await;
    }
    Ok(())
}

/// Runs the Project controller on the cluster's shared Project watch; stop it by dropping
/// the future.
pub async fn run(ctx: Arc<Context>, watches: &super::shared::Watches) {
    let client = ctx.client.clone();
    let metrics = ctx.metrics.clone();
    let namespaces: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
    let sources: Api<PartialObjectMeta<Secret>> =
        Api::namespaced(client.clone(), &ctx.config.registry_source_namespace);
    let managed = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    let store = watches.projects.store();
    let default_source = ctx.config.default_registry_secret.clone();
    Controller::for_shared_stream(watches.projects.applied(), store.clone())
        .with_config(super::controller_config())
        .owns_stream(watcher(namespaces, super::watch_config().labels(&managed)).touched_objects())
        // A change to a registry source Secret re-syncs every project that copies it (metadata
        // only: a data change still moves the resourceVersion, which is an event).
        .watches_stream(
            watcher(sources, super::watch_config()).touched_objects(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn project(finalizer: bool, deleting: bool) -> Project {
        let mut project: Project = serde_json::from_value(json!({
            "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
            "metadata": {"name": "shop"}, "spec": {}}))
        .unwrap();
        if finalizer {
            project.metadata.finalizers = Some(vec![FINALIZER.into()]);
        }
        if deleting {
            project.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        }
        project
    }

    fn namespace_labelled(owner: Option<&str>, terminating: bool) -> Namespace {
        let mut ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap();
        if let Some(owner) = owner {
            ns.labels_mut().insert(PROJECT_LABEL.into(), owner.into());
        }
        if terminating {
            ns.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        }
        ns
    }

    fn registry(type_: &str, config: Option<&str>) -> Secret {
        Secret {
            type_: Some(type_.into()),
            data: config.map(|c| {
                [(
                    ".dockerconfigjson".to_string(),
                    k8s_openapi::ByteString(c.as_bytes().to_vec()),
                )]
                .into()
            }),
            ..Default::default()
        }
    }

    const CONFIG: &str = r#"{"auths": {"registry.example.com": {"auth": "dXNlcjpwYXNz"}}}"#;

    fn observed(namespace: Option<Namespace>, source: bool) -> Observed {
        Observed {
            namespace,
            registry_source: source
                .then(|| registry("kubernetes.io/dockerconfigjson", Some(CONFIG))),
        }
    }

    #[test]
    fn only_a_dockerconfigjson_registry_secret_is_copied() {
        let ready = project(true, false);
        for (source, detail) in [
            (registry("Opaque", Some(CONFIG)), "of type Opaque"),
            (
                registry("kubernetes.io/basic-auth", None),
                "of type kubernetes.io/basic-auth",
            ),
            (
                registry("kubernetes.io/dockerconfigjson", None),
                "no key .dockerconfigjson",
            ),
            (
                registry("kubernetes.io/dockerconfigjson", Some("token: x")),
                "is not JSON",
            ),
            (
                registry("kubernetes.io/dockerconfigjson", Some(r#"{"token": "x"}"#)),
                "no \"auths\" object",
            ),
        ] {
            let o = Observed {
                namespace: None,
                registry_source: Some(source),
            };
            let step = decide(&ready, &o, "registry-creds");
            assert!(
                matches!(&step, Step::RegistrySourceInvalid { detail: d, .. } if d.contains(detail)),
                "{detail}: {step:?}"
            );
            assert_eq!(reason(&step), REGISTRY_SECRET_NOT_DOCKER_CONFIG_JSON);
            assert_eq!(
                status_after(&step, "shapeblock").map(|(p, _)| p),
                Some(ProjectPhase::Failed)
            );
            let error = failure(&step, "shapeblock").unwrap();
            assert_eq!(error.event_reason(), REGISTRY_SECRET_NOT_DOCKER_CONFIG_JSON);
            assert!(error.to_string().contains("nothing is copied"), "{error}");
        }
        assert_eq!(
            decide(&ready, &observed(None, true), "registry-creds"),
            Step::Ensure
        );
    }

    #[test]
    fn a_project_gets_its_finalizer_then_its_objects() {
        assert_eq!(
            decide(
                &project(false, false),
                &observed(None, true),
                "registry-creds"
            ),
            Step::AddFinalizer
        );
        let ready = project(true, false);
        assert_eq!(
            decide(&ready, &observed(None, true), "registry-creds"),
            Step::Ensure
        );
        // Its own namespace already there: still ensured.
        let own = Some(namespace_labelled(Some("shop"), false));
        assert_eq!(
            decide(&ready, &observed(own, true), "registry-creds"),
            Step::Ensure
        );
        assert_eq!(
            status_after(&Step::Ensure, "shapeblock"),
            Some((ProjectPhase::Active, "Project setup completed".into()))
        );
    }

    #[test]
    fn a_project_namespace_enforces_the_baseline_pod_security_level() {
        let ns = namespace(&project(true, false));
        let labels = &ns["metadata"]["labels"];
        assert_eq!(labels["pod-security.kubernetes.io/enforce"], "baseline");
        assert_eq!(
            labels["pod-security.kubernetes.io/enforce-version"],
            "latest"
        );
        assert_eq!(labels[PROJECT_LABEL], "shop");
        assert_eq!(labels[MANAGED_BY.0], MANAGED_BY.1);
        let keys: Vec<&String> = labels.as_object().unwrap().keys().collect();
        assert!(
            !keys
                .iter()
                .any(|k| k.starts_with("pod-security.kubernetes.io/warn")
                    || k.starts_with("pod-security.kubernetes.io/audit")),
            "no warn or audit level: {keys:?}"
        );
    }

    #[test]
    fn the_agent_is_bound_to_its_project_role_in_the_namespace_only() {
        let mut project = project(true, false);
        project.metadata.uid = Some("u-1".into());
        let binding = agent_binding(&project);
        assert_eq!(binding["kind"], "RoleBinding");
        assert_eq!(binding["metadata"]["namespace"], "shop");
        assert_eq!(
            binding["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                   "name": "shapeblock-agent-project"})
        );
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "shapeblock-agent",
                    "namespace": "shapeblock-agent"}])
        );
        // It goes with the Project.
        let owner = &binding["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Project");
        assert_eq!(owner["uid"], "u-1");
        assert_eq!(binding["metadata"]["labels"][PROJECT_LABEL], "shop");
    }

    #[test]
    fn a_project_with_its_own_registry_secret_gets_its_namespace_first() {
        let mut own = project(true, false);
        own.spec.own_registry_secret = Some(OWN_REGISTRY_SECRET.into());
        assert_eq!(
            decide(&own, &observed(None, false), OWN_REGISTRY_SECRET),
            Step::PrepareNamespace
        );
        assert_eq!(
            status_after(&Step::PrepareNamespace, "shop").map(|(p, _)| p),
            Some(ProjectPhase::Initializing)
        );
        // Its namespace there, the Secret not yet: it waits for it, naming where it belongs.
        let namespace = Some(namespace_labelled(Some("shop"), false));
        let step = decide(
            &own,
            &observed(namespace.clone(), false),
            OWN_REGISTRY_SECRET,
        );
        let error = failure(&step, "shop").unwrap();
        assert!(
            error
                .to_string()
                .contains("shop/registry-creds-own not found"),
            "{error}"
        );
        assert_eq!(
            decide(&own, &observed(namespace, true), OWN_REGISTRY_SECRET),
            Step::Ensure
        );
        // A foreign namespace is still never taken.
        let foreign = Some(namespace_labelled(None, false));
        assert!(matches!(
            decide(&own, &observed(foreign, false), OWN_REGISTRY_SECRET),
            Step::NamespaceTaken { .. }
        ));
    }

    #[test]
    fn a_foreign_namespace_is_never_taken_over() {
        for label in [None, Some("other")] {
            let taken = Some(namespace_labelled(label, false));
            let step = decide(
                &project(true, false),
                &observed(taken, true),
                "registry-creds",
            );
            assert_eq!(
                step,
                Step::NamespaceTaken {
                    namespace: "shop".into()
                }
            );
            let (phase, message) = status_after(&step, "shapeblock").unwrap();
            assert_eq!(phase, ProjectPhase::Failed);
            assert!(
                message.contains("namespace shop already exists"),
                "{message}"
            );
            assert!(matches!(
                failure(&step, "shapeblock"),
                Some(ReconcileError::Invalid(_))
            ));
        }
    }

    #[test]
    fn a_missing_registry_secret_fails_and_is_retried() {
        let step = decide(
            &project(true, false),
            &observed(None, false),
            "team-registry",
        );
        let error = failure(&step, "shapeblock").unwrap();
        assert!(matches!(error, ReconcileError::Missing(_)));
        assert!(
            error
                .to_string()
                .contains("shapeblock/team-registry not found")
        );
    }

    #[test]
    fn deletion_removes_only_the_projects_own_namespace_then_lets_go() {
        let deleting = project(true, true);
        assert_eq!(
            decide(&project(false, true), &observed(None, false), "r"),
            Step::Nothing
        );
        let own = Some(namespace_labelled(Some("shop"), false));
        assert_eq!(
            decide(&deleting, &observed(own, false), "r"),
            Step::DeleteNamespace
        );
        let terminating = Some(namespace_labelled(Some("shop"), true));
        assert_eq!(
            decide(&deleting, &observed(terminating, false), "r"),
            Step::WaitForNamespace
        );
        // Someone else's namespace is left alone.
        let foreign = Some(namespace_labelled(None, false));
        assert_eq!(
            decide(&deleting, &observed(foreign, false), "r"),
            Step::RemoveFinalizer
        );
        assert_eq!(
            decide(&deleting, &observed(None, false), "r"),
            Step::RemoveFinalizer
        );
        assert_eq!(
            status_after(&Step::DeleteNamespace, "shapeblock").map(|(p, _)| p),
            Some(ProjectPhase::Terminating)
        );
        assert_eq!(status_after(&Step::RemoveFinalizer, "shapeblock"), None);
    }
}
