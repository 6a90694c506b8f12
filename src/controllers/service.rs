//! Service: installs a Helm chart with a Job, upgrades it whenever the chart or values change
//! (a hash of them names the Job, so each change runs exactly once), and uninstalls the
//! release through a finalizer when the Service is deleted. Helm operations on one release
//! never overlap: a change waits for the Job still running.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use sha2::Digest;

use super::jobs;
use super::{Context, ReconcileError};
use crate::crd::{ChartSource, FIELD_MANAGER, Service, ServicePhase, ServiceSpec, ServiceStatus};
use crate::observed::{self, Outcome};
use crate::render::build::child_name;
use crate::render::jobs::{self as render, Chart, HelmAction, HelmJob, SERVICE_LABEL, STEP_LABEL};

/// Finalizer that uninstalls the Helm release (Apps and Services).
pub const FINALIZER: &str = "apps.shapeblock.io/helm-release";
/// Label on a Service's install Jobs: the hash of the chart and values they apply.
pub const HASH_LABEL: &str = "shapeblock.io/values-hash";

/// Hash of everything an install applies (pure): 16 hex digits.
pub fn spec_hash(spec: &ServiceSpec) -> String {
    let canonical = json!([spec.chart, spec.helm_values]).to_string();
    let digest = sha2::Sha256::digest(canonical.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The chart reference helm is given (pure).
pub fn chart(source: &ChartSource) -> Result<Chart, ReconcileError> {
    let url = source
        .repo_url
        .as_deref()
        .unwrap_or_default()
        .trim_end_matches('/');
    if url.starts_with("oci://") {
        return Ok(Chart::Oci(format!("{url}/{}", source.name)));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(Chart::Repo {
            repo: url.to_string(),
            name: source.name.clone(),
        });
    }
    Err(ReconcileError::Invalid(
        "spec.chart.repoURL must be an https:// Helm repository or an oci:// registry path".into(),
    ))
}

pub fn install_job_name(service: &str, hash: &str) -> String {
    child_name(service, &format!("install-{}", &hash[..10]))
}
pub fn values_secret_name(service: &str, hash: &str) -> String {
    child_name(service, &format!("values-{}", &hash[..10]))
}
pub fn uninstall_job_name(service: &str) -> String {
    child_name(service, "uninstall")
}

async fn write_status(
    api: &Api<Service>,
    service: &Service,
    mut status: ServiceStatus,
) -> Result<(), ReconcileError> {
    let current = service.status.clone().unwrap_or_default();
    status.last_updated = current.last_updated.clone();
    status.observed_generation = service.metadata.generation;
    if current == status {
        return Ok(());
    }
    status.last_updated = Some(Time(jiff::Timestamp::now()));
    // Only over the version this reconcile saw: a stale cache gets a conflict, not a regression.
    let patch = json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Service",
        "metadata": {"resourceVersion": service.resource_version()}, "status": status});
    api.patch_status(
        &service.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

fn owner(service: &Service) -> Option<Value> {
    service
        .controller_owner_ref(&())
        .and_then(|o| serde_json::to_value(o).ok())
}

/// What the cluster holds for one Service, read before anything is decided.
#[derive(Default)]
pub struct Observed {
    /// The Service's install Jobs (one per applied chart-and-values hash).
    pub installs: Vec<Job>,
    /// The helm output of the current hash's install Job, when it failed.
    pub install_output: Option<String>,
    /// Deletion only: the namespace is going away (it takes the release with it).
    pub namespace_terminating: bool,
    /// Deletion only: Helm's storage holds a release of the Service's name.
    pub release_exists: bool,
    /// Deletion only: the uninstall Job, and its helm output when it failed.
    pub uninstall: Option<Job>,
    pub uninstall_output: Option<String>,
    /// Why the Service's namespace is not a project's, when it is not.
    pub not_in_project: Option<super::tenancy::NotInProject>,
}

/// The one thing to do next for a Service.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Deleted without our finalizer, or nothing to do.
    Nothing,
    /// The namespace is not a project's: nothing is created (no finalizer either); retried,
    /// and brought back by its Project's changes.
    NotInProject(super::tenancy::NotInProject),
    /// Add the finalizer that uninstalls the release.
    AddFinalizer,
    /// The release is gone (or never was): let the Service go.
    RemoveFinalizer { uninstall_job: Option<String> },
    /// Start `helm uninstall`.
    StartUninstall,
    /// The uninstall Job runs.
    Uninstalling,
    /// The uninstall failed: delete its Job and try again later.
    UninstallFailed { output: String },
    /// The chart reference cannot be used.
    InvalidChart { message: String },
    /// The release is installed with the current spec.
    UpToDate,
    /// Another helm Job of this release still runs: never two at once.
    WaitForPrevious { job: String },
    /// Create the install Job for the current spec (and its values Secret).
    Install { chart: Chart, hash: String },
    /// The install Job runs.
    Installing { job: String },
    /// The install succeeded; earlier install Jobs (and their values) are history.
    Installed { hash: String, superseded: Vec<Job> },
    /// The install failed; a change to the Service tries again.
    InstallFailed { output: String },
}

/// Decides the next step (pure).
pub fn decide(service: &Service, o: &Observed) -> Step {
    let has_finalizer = service.finalizers().iter().any(|f| f == FINALIZER);
    let status = service.status.clone().unwrap_or_default();
    if service.metadata.deletion_timestamp.is_some() {
        if !has_finalizer {
            return Step::Nothing;
        }
        // Outside a project the hub never installed anything (its Jobs run as the project's
        // deployer), and creates nothing now: let the Service go.
        if o.not_in_project.is_some() {
            return Step::RemoveFinalizer {
                uninstall_job: None,
            };
        }
        let uninstall_job = o.uninstall.as_ref().map(|j| j.name_any());
        let maybe_installed =
            status.applied_hash.is_some() || !o.installs.is_empty() || o.release_exists;
        if o.namespace_terminating || (!maybe_installed && o.uninstall.is_none()) {
            return Step::RemoveFinalizer { uninstall_job };
        }
        return match o.uninstall.as_ref().map(observed::outcome) {
            None => Step::StartUninstall,
            Some(Outcome::Running) => Step::Uninstalling,
            Some(Outcome::Succeeded) => Step::RemoveFinalizer { uninstall_job },
            Some(Outcome::Failed { message, .. }) => Step::UninstallFailed {
                output: o.uninstall_output.clone().unwrap_or(message),
            },
        };
    }
    if let Some(why) = &o.not_in_project {
        return Step::NotInProject(why.clone());
    }
    if !has_finalizer {
        return Step::AddFinalizer;
    }
    let chart = match chart(&service.spec.chart) {
        Ok(chart) => chart,
        Err(err) => {
            return Step::InvalidChart {
                message: err.to_string(),
            };
        }
    };
    let hash = spec_hash(&service.spec);
    if status.applied_hash.as_deref() == Some(hash.as_str())
        && status.phase == Some(ServicePhase::Deployed)
    {
        return Step::UpToDate;
    }
    let job_name = install_job_name(&service.name_any(), &hash);
    if let Some(busy) = o
        .installs
        .iter()
        .find(|j| j.name_any() != job_name && observed::outcome(j) == Outcome::Running)
    {
        return Step::WaitForPrevious {
            job: busy.name_any(),
        };
    }
    let Some(current) = o.installs.iter().find(|j| j.name_any() == job_name) else {
        return Step::Install { chart, hash };
    };
    match observed::outcome(current) {
        Outcome::Running => Step::Installing { job: job_name },
        Outcome::Succeeded => Step::Installed {
            superseded: o
                .installs
                .iter()
                .filter(|j| j.name_any() != job_name)
                .cloned()
                .collect(),
            hash,
        },
        Outcome::Failed { message, .. } => Step::InstallFailed {
            output: o.install_output.clone().unwrap_or(message),
        },
    }
}

/// The type of the condition a Service carries: its release is installed with its spec.
pub const READY: &str = "Ready";

/// The status once `step` is applied, or None when the step writes none (pure; `now` stamps
/// a condition that changes).
pub fn status_after(service: &Service, step: &Step, now: &Time) -> Option<ServiceStatus> {
    let mut status = status_of(service, step)?;
    let (ok, reason) = match step {
        Step::Installed { .. } | Step::UpToDate => (true, "Deployed"),
        Step::NotInProject(_) => (false, super::tenancy::NOT_IN_PROJECT),
        Step::InvalidChart { .. } => (false, "InvalidChart"),
        Step::InstallFailed { .. } => (false, "InstallFailed"),
        Step::Uninstalling | Step::UninstallFailed { .. } => (false, "Deleting"),
        _ => (false, "Deploying"),
    };
    let message = status.message.clone().unwrap_or_default();
    super::set_condition(
        &mut status.conditions,
        READY,
        ok,
        reason,
        &message,
        service.metadata.generation,
        now,
    );
    Some(status)
}

/// The status fields but the condition once `step` is applied.
fn status_of(service: &Service, step: &Step) -> Option<ServiceStatus> {
    let name = service.name_any();
    let mut status = service.status.clone().unwrap_or_default();
    match step {
        Step::Nothing
        | Step::AddFinalizer
        | Step::RemoveFinalizer { .. }
        | Step::StartUninstall => return None,
        Step::Uninstalling => {
            status.phase = Some(ServicePhase::Deleting);
            status.message = Some(format!("uninstalling release {name}"));
            return Some(status);
        }
        Step::UninstallFailed { output } => {
            status.phase = Some(ServicePhase::Deleting);
            status.message = Some(format!("helm uninstall failed; retrying\n{output}"));
            return Some(status);
        }
        Step::NotInProject(why) => {
            status.phase = Some(ServicePhase::Pending);
            status.message = Some(why.to_string());
            return Some(status);
        }
        _ => {}
    }
    status.helm_release = Some(name.clone());
    match step {
        Step::InvalidChart { message } => {
            status.phase = Some(ServicePhase::Failed);
            status.message = Some(message.clone());
        }
        Step::WaitForPrevious { job } => {
            status.phase = Some(ServicePhase::Deploying);
            status.message = Some(format!(
                "waiting for the previous helm Job {job} to finish before applying the change"
            ));
        }
        Step::Install { hash, .. } => {
            status.phase = Some(ServicePhase::Deploying);
            status.message = Some(format!(
                "installing {} with helm ({})",
                service.spec.chart.name,
                install_job_name(&name, hash)
            ));
        }
        Step::Installing { job } => {
            status.phase = Some(ServicePhase::Deploying);
            status.message = Some(format!(
                "installing {} with helm ({job})",
                service.spec.chart.name
            ));
        }
        Step::Installed { hash, .. } => {
            status.phase = Some(ServicePhase::Deployed);
            status.message = Some(format!("release {name} is installed"));
            status.applied_hash = Some(hash.clone());
        }
        Step::InstallFailed { output } => {
            status.phase = Some(ServicePhase::Failed);
            status.message = Some(format!(
                "helm upgrade --install failed (change the Service to try again)\n{output}"
            ));
        }
        _ => {}
    }
    Some(status)
}

/// Reads what the next decision needs: the install Jobs (and a failed current one's output);
/// on deletion, also the namespace, Helm's storage and the uninstall Job.
async fn read(service: &Service, ctx: &Context) -> Result<Observed, ReconcileError> {
    let ns = service.namespace().unwrap_or_default();
    let name = service.name_any();
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut o = Observed::default();
    let deleting = service.metadata.deletion_timestamp.is_some();
    let has_finalizer = service.finalizers().iter().any(|f| f == FINALIZER);
    if deleting && !has_finalizer {
        return Ok(o);
    }
    // Before anything else: outside a project nothing more is read, nothing is created.
    o.not_in_project =
        super::tenancy::read(&ctx.client, &ns, &ctx.config.registry_source_namespace)
            .await?
            .err();
    if o.not_in_project.is_some() || !has_finalizer {
        return Ok(o);
    }
    if deleting {
        o.namespace_terminating = jobs::namespace_terminating(&ctx.client, &ns).await?;
        if o.namespace_terminating {
            return Ok(o);
        }
        o.uninstall = jobs_api.get_opt(&uninstall_job_name(&name)).await?;
        if let Some(Outcome::Failed { message, .. }) = o.uninstall.as_ref().map(observed::outcome) {
            let output = jobs::helm_failure(&pods, &uninstall_job_name(&name), &message).await?;
            o.uninstall_output = Some(output);
        }
    }
    let selector = format!("{SERVICE_LABEL}={name},{STEP_LABEL}=install");
    o.installs = jobs_api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    if deleting {
        o.release_exists = jobs::release_exists(&ctx.client, &ns, &name).await?;
        return Ok(o);
    }
    let current = install_job_name(&name, &spec_hash(&service.spec));
    if let Some(Outcome::Failed { message, .. }) = o
        .installs
        .iter()
        .find(|j| j.name_any() == current)
        .map(observed::outcome)
    {
        o.install_output = Some(jobs::helm_failure(&pods, &current, &message).await?);
    }
    Ok(o)
}

/// Carries out a step's effects in the cluster.
async fn apply(service: &Service, step: &Step, ctx: &Context) -> Result<(), ReconcileError> {
    let ns = service.namespace().unwrap_or_default();
    let name = service.name_any();
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    match step {
        Step::Nothing
        | Step::NotInProject(_)
        | Step::InvalidChart { .. }
        | Step::UpToDate
        | Step::WaitForPrevious { .. }
        | Step::Installing { .. }
        | Step::InstallFailed { .. }
        | Step::Uninstalling => {}
        Step::AddFinalizer => jobs::add_finalizer(&api, service, FINALIZER).await?,
        Step::RemoveFinalizer { uninstall_job } => {
            if let Some(job) = uninstall_job {
                jobs_api.delete(job, &DeleteParams::background()).await.ok();
            }
            jobs::remove_finalizer(&api, service, FINALIZER).await?;
        }
        Step::StartUninstall => {
            let job_name = uninstall_job_name(&name);
            let job = render::helm_job(
                &HelmJob {
                    name: &job_name,
                    namespace: &ns,
                    release: &name,
                    action: HelmAction::Uninstall,
                    labels: vec![(SERVICE_LABEL, &name), (STEP_LABEL, "uninstall")],
                    owner: owner(service),
                    service_account: super::project::DEPLOYER,
                },
                &ctx.config.jobs,
            );
            jobs::create_once(&jobs_api, &job).await?;
        }
        // A retry starts afresh with a new Job.
        Step::UninstallFailed { .. } => {
            jobs_api
                .delete(&uninstall_job_name(&name), &DeleteParams::background())
                .await?;
        }
        Step::Install { chart, hash } => install(service, chart, hash, ctx).await?,
        Step::Installed { superseded, .. } => {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            for old in superseded {
                jobs_api
                    .delete(&old.name_any(), &DeleteParams::background())
                    .await
                    .ok();
                if let Some(old_hash) = old.labels().get(HASH_LABEL).filter(|h| h.len() >= 10) {
                    secrets
                        .delete(
                            &values_secret_name(&name, old_hash),
                            &DeleteParams::default(),
                        )
                        .await
                        .ok();
                }
            }
        }
    }
    Ok(())
}

/// Creates the values Secret and the install Job of the current spec.
async fn install(
    service: &Service,
    chart: &Chart,
    hash: &str,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let ns = service.namespace().unwrap_or_default();
    let name = service.name_any();
    let owner = owner(service);
    let labels = [
        (SERVICE_LABEL, name.as_str()),
        (STEP_LABEL, "install"),
        (HASH_LABEL, hash),
    ];
    let values_name = values_secret_name(&name, hash);
    let values = Value::Object(
        service
            .spec
            .helm_values
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
    );
    let secret = render::values_secret(&values_name, &ns, &values, &labels, owner.clone());
    jobs::create_once(&Api::<Secret>::namespaced(ctx.client.clone(), &ns), &secret).await?;
    let job_name = install_job_name(&name, hash);
    let job = render::helm_job(
        &HelmJob {
            name: &job_name,
            namespace: &ns,
            release: &name,
            action: HelmAction::Upgrade {
                chart,
                version: service.spec.chart.version.as_deref(),
                values_secret: &values_name,
                registry_secret: None,
                wait: true,
            },
            labels: labels.to_vec(),
            owner,
            service_account: super::project::DEPLOYER,
        },
        &ctx.config.jobs,
    );
    jobs::create_once(&Api::<Job>::namespaced(ctx.client.clone(), &ns), &job).await?;
    Ok(())
}

async fn reconcile(service: Arc<Service>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let observed = read(&service, &ctx).await?;
    let step = decide(&service, &observed);
    apply(&service, &step, &ctx).await?;
    if let Some(status) = status_after(&service, &step, &Time(jiff::Timestamp::now())) {
        let api: Api<Service> =
            Api::namespaced(ctx.client.clone(), &service.namespace().unwrap_or_default());
        let before = service.status.as_ref().and_then(|s| s.phase);
        write_status(&api, &service, status.clone()).await?;
        if status.phase != before
            && let Some(phase) = status.phase
        {
            let note = status.message.clone().unwrap_or_default();
            let event = match phase {
                ServicePhase::Failed => super::events::failed("Failed", note),
                phase => super::events::phase(&format!("{phase:?}"), note),
            };
            super::events::publish(&ctx.client, &service.object_ref(&()), event).await;
        }
    }
    match step {
        Step::NotInProject(why) => Err(why.into()),
        // The failed uninstall Job was deleted: nothing changes by itself, so try again later.
        Step::UninstallFailed { .. } => Ok(Action::requeue(std::time::Duration::from_secs(30))),
        _ => Ok(Action::await_change()),
    }
}

/// Runs the Service controller (its Jobs and Projects from the cluster's shared watches);
/// stop it by dropping the future.
pub async fn run(ctx: Arc<Context>, watches: &super::shared::Watches) {
    let client = ctx.client.clone();
    let metrics = ctx.metrics.clone();
    let (store, stream) = super::trimmed_reflector(Api::<Service>::all(client), &ctx);
    let project_store = store.clone();
    Controller::for_stream(stream, store)
        .with_config(super::controller_config())
        .owns_shared_stream(watches.jobs.touched())
        // A Project that changes (it is made, or its namespace is ready: its status moves)
        // brings the Services of its namespace, which wait for it outside a project.
        .watches_shared_stream(
            watches.projects.touched(),
            move |project: Arc<crate::crd::Project>| {
                let ns = Some(project.name_any());
                project_store
                    .state()
                    .iter()
                    .filter(|service| service.namespace() == ns)
                    .map(|service| kube::runtime::reflector::ObjectRef::from_obj(service.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .run(
            super::bounded("service", reconcile),
            |object, error, ctx| super::on_error("service", object, error, ctx),
            ctx,
        )
        .for_each(|result| {
            metrics.record("service", &result);
            async {}
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Time {
        Time(jiff::Timestamp::now())
    }

    fn source(url: &str) -> ChartSource {
        ChartSource {
            name: "postgresql".into(),
            version: Some("15.5.2".into()),
            repo: None,
            repo_url: Some(url.into()),
        }
    }

    #[test]
    fn charts_from_https_and_oci() {
        assert_eq!(
            chart(&source("oci://registry-1.docker.io/bitnamicharts/")).unwrap(),
            Chart::Oci("oci://registry-1.docker.io/bitnamicharts/postgresql".into())
        );
        assert_eq!(
            chart(&source("https://charts.bitnami.com/bitnami")).unwrap(),
            Chart::Repo {
                repo: "https://charts.bitnami.com/bitnami".into(),
                name: "postgresql".into()
            }
        );
        assert!(chart(&source("ftp://x")).is_err());
    }

    #[test]
    fn the_hash_follows_chart_and_values() {
        let spec = |version: &str, values: Value| ServiceSpec {
            chart: ChartSource {
                version: Some(version.into()),
                ..source("https://charts.example.com")
            },
            helm_values: serde_json::from_value(values).unwrap(),
        };
        let a = spec_hash(&spec("1.0.0", json!({"a": 1, "b": {"c": 2}})));
        assert_eq!(a.len(), 16);
        assert_eq!(
            a,
            spec_hash(&spec("1.0.0", json!({"b": {"c": 2}, "a": 1}))),
            "key order"
        );
        assert_ne!(a, spec_hash(&spec("1.0.1", json!({"a": 1, "b": {"c": 2}}))));
        assert_ne!(a, spec_hash(&spec("1.0.0", json!({"a": 1, "b": {"c": 3}}))));
        assert_eq!(
            install_job_name("db", &a),
            format!("db-install-{}", &a[..10])
        );
    }
    fn service(finalizer: bool, deleting: bool, status: Value) -> Service {
        let mut service: Service = serde_json::from_value(json!({
            "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Service",
            "metadata": {"name": "db", "namespace": "p"},
            "spec": {"chart": {"name": "postgresql", "version": "15.5.2",
                "repoURL": "https://charts.example.com"}, "helmValues": {"a": 1}},
            "status": status}))
        .unwrap();
        if finalizer {
            service.metadata.finalizers = Some(vec![FINALIZER.into()]);
        }
        if deleting {
            service.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        }
        service
    }

    fn job(name: &str, conditions: Value) -> Job {
        serde_json::from_value(
            json!({"metadata": {"name": name, "labels": {HASH_LABEL: "0123456789abcdef"}},
            "status": {"conditions": conditions}}),
        )
        .unwrap()
    }
    fn running(name: &str) -> Job {
        job(name, json!([]))
    }
    fn succeeded(name: &str) -> Job {
        job(name, json!([{"type": "Complete", "status": "True"}]))
    }
    fn failed(name: &str) -> Job {
        job(
            name,
            json!([{"type": "Failed", "status": "True", "message": "backoff limit"}]),
        )
    }

    #[test]
    fn a_new_service_gets_its_finalizer_then_an_install_job() {
        let new = service(false, false, json!(null));
        assert_eq!(decide(&new, &Observed::default()), Step::AddFinalizer);
        let ready = service(true, false, json!(null));
        let step = decide(&ready, &Observed::default());
        let hash = spec_hash(&ready.spec);
        assert!(
            matches!(&step, Step::Install { hash: h, .. } if *h == hash),
            "{step:?}"
        );
        let status = status_after(&ready, &step, &now()).unwrap();
        assert_eq!(status.phase, Some(ServicePhase::Deploying));
        assert_eq!(status.helm_release.as_deref(), Some("db"));
    }

    #[test]
    fn an_install_is_followed_to_its_end() {
        let svc = service(true, false, json!(null));
        let name = install_job_name("db", &spec_hash(&svc.spec));
        let mut o = Observed {
            installs: vec![running(&name)],
            ..Default::default()
        };
        assert_eq!(decide(&svc, &o), Step::Installing { job: name.clone() });
        o.installs = vec![succeeded(&name), succeeded("db-install-old")];
        let step = decide(&svc, &o);
        match &step {
            Step::Installed { superseded, hash } => {
                assert_eq!(superseded.len(), 1);
                assert_eq!(superseded[0].name_any(), "db-install-old");
                let status = status_after(&svc, &step, &now()).unwrap();
                assert_eq!(status.phase, Some(ServicePhase::Deployed));
                assert_eq!(status.applied_hash.as_ref(), Some(hash));
            }
            other => panic!("{other:?}"),
        }
        o.installs = vec![failed(&name)];
        o.install_output = Some("Error: chart not found".into());
        let step = decide(&svc, &o);
        assert_eq!(
            step,
            Step::InstallFailed {
                output: "Error: chart not found".into()
            }
        );
        let status = status_after(&svc, &step, &now()).unwrap();
        assert_eq!(status.phase, Some(ServicePhase::Failed));
        assert!(
            status
                .message
                .unwrap()
                .contains("change the Service to try again")
        );
    }

    #[test]
    fn a_change_waits_for_the_previous_helm_job_and_an_applied_spec_is_left_alone() {
        let svc = service(true, false, json!(null));
        let o = Observed {
            installs: vec![running("db-install-previous")],
            ..Default::default()
        };
        assert_eq!(
            decide(&svc, &o),
            Step::WaitForPrevious {
                job: "db-install-previous".into()
            }
        );
        let hash = spec_hash(&svc.spec);
        let done = service(
            true,
            false,
            json!({"phase": "Deployed", "appliedHash": hash}),
        );
        assert_eq!(decide(&done, &o), Step::UpToDate);
    }

    #[test]
    fn an_unusable_chart_reference_fails_the_service() {
        let mut svc = service(true, false, json!(null));
        svc.spec.chart.repo_url = Some("ftp://charts.example.com".into());
        let step = decide(&svc, &Observed::default());
        assert!(matches!(step, Step::InvalidChart { .. }), "{step:?}");
        assert_eq!(
            status_after(&svc, &step, &now()).unwrap().phase,
            Some(ServicePhase::Failed)
        );
    }

    #[test]
    fn deletion_uninstalls_what_may_be_installed_then_lets_go() {
        let gone = service(false, true, json!(null));
        assert_eq!(decide(&gone, &Observed::default()), Step::Nothing);
        let never_installed = service(true, true, json!(null));
        assert_eq!(
            decide(&never_installed, &Observed::default()),
            Step::RemoveFinalizer {
                uninstall_job: None
            }
        );
        let terminating = Observed {
            namespace_terminating: true,
            ..Default::default()
        };
        let installed = service(true, true, json!({"appliedHash": "0123456789abcdef"}));
        assert_eq!(
            decide(&installed, &terminating),
            Step::RemoveFinalizer {
                uninstall_job: None
            }
        );
        assert_eq!(
            decide(&installed, &Observed::default()),
            Step::StartUninstall
        );
        let released = Observed {
            release_exists: true,
            ..Default::default()
        };
        assert_eq!(decide(&never_installed, &released), Step::StartUninstall);
        let mut o = Observed {
            uninstall: Some(running("db-uninstall")),
            ..Default::default()
        };
        assert_eq!(decide(&installed, &o), Step::Uninstalling);
        assert_eq!(
            status_after(&installed, &Step::Uninstalling, &now())
                .unwrap()
                .phase,
            Some(ServicePhase::Deleting)
        );
        o.uninstall = Some(succeeded("db-uninstall"));
        assert_eq!(
            decide(&installed, &o),
            Step::RemoveFinalizer {
                uninstall_job: Some("db-uninstall".into())
            }
        );
        o.uninstall = Some(failed("db-uninstall"));
        o.uninstall_output = Some("Error: uninstall: timed out".into());
        let step = decide(&installed, &o);
        assert_eq!(
            step,
            Step::UninstallFailed {
                output: "Error: uninstall: timed out".into()
            }
        );
        assert!(
            status_after(&installed, &step, &now())
                .unwrap()
                .message
                .unwrap()
                .starts_with("helm uninstall failed; retrying")
        );
    }

    #[test]
    fn outside_a_project_a_service_installs_nothing_and_says_why() {
        use crate::controllers::tenancy::NotInProject;
        let why = NotInProject::Reserved("kube-system".into());
        let o = Observed {
            not_in_project: Some(why.clone()),
            ..Default::default()
        };
        for finalizer in [false, true] {
            let svc = service(finalizer, false, json!(null));
            let step = decide(&svc, &o);
            assert_eq!(step, Step::NotInProject(why.clone()));
            let status = status_after(&svc, &step, &now()).unwrap();
            assert_eq!(status.phase, Some(ServicePhase::Pending));
            let ready = &status.conditions[0];
            assert_eq!(
                (
                    ready.type_.as_str(),
                    ready.status.as_str(),
                    ready.reason.as_str()
                ),
                (READY, "False", "NotInProject")
            );
        }
        // Once in a project, the condition follows the install.
        let svc = service(true, false, json!(null));
        let step = decide(&svc, &Observed::default());
        let status = status_after(&svc, &step, &now()).unwrap();
        assert_eq!(status.conditions[0].reason, "Deploying");
        // Deleted outside a project: let go, no uninstall Job.
        let deleting = service(true, true, json!({"appliedHash": "x"}));
        assert_eq!(
            decide(&deleting, &o),
            Step::RemoveFinalizer {
                uninstall_job: None
            }
        );
    }
}
