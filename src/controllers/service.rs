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
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use sha2::Digest;

use super::jobs::{self, Uninstall};
use super::{Context, MANAGED_BY, ReconcileError};
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

async fn delete(service: &Service, ctx: &Context) -> Result<Action, ReconcileError> {
    let ns = service.namespace().unwrap_or_default();
    let name = service.name_any();
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    if !service.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let mut status = service.status.clone().unwrap_or_default();
    if jobs::namespace_terminating(&ctx.client, &ns).await? {
        // The namespace takes the release's objects with it; a Job could not start there.
        jobs::remove_finalizer(&api, service, FINALIZER).await?;
        return Ok(Action::await_change());
    }
    let installed_jobs = Api::<Job>::namespaced(ctx.client.clone(), &ns)
        .list_metadata(
            &ListParams::default().labels(&format!("{SERVICE_LABEL}={name},{STEP_LABEL}=install")),
        )
        .await?;
    let maybe_installed = status.applied_hash.is_some()
        || !installed_jobs.items.is_empty()
        || jobs::release_exists(&ctx.client, &ns, &name).await?;
    if !maybe_installed {
        jobs::remove_finalizer(&api, service, FINALIZER).await?;
        return Ok(Action::await_change());
    }
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
    match jobs::uninstall(&ctx.client, &job, &job_name, &ns).await? {
        Uninstall::Done => {
            jobs::remove_finalizer(&api, service, FINALIZER).await?;
            Ok(Action::await_change())
        }
        Uninstall::Running => {
            status.phase = Some(ServicePhase::Deleting);
            status.message = Some(format!("uninstalling release {name}"));
            write_status(&api, service, status).await?;
            Ok(Action::await_change())
        }
        Uninstall::Failed(message) => {
            status.phase = Some(ServicePhase::Deleting);
            status.message = Some(format!("helm uninstall failed; retrying\n{message}"));
            write_status(&api, service, status).await?;
            Ok(Action::requeue(std::time::Duration::from_secs(30)))
        }
    }
}

async fn reconcile(service: Arc<Service>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    if service.metadata.deletion_timestamp.is_some() {
        return delete(&service, &ctx).await;
    }
    let ns = service.namespace().unwrap_or_default();
    let name = service.name_any();
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    if !service.finalizers().iter().any(|f| f == FINALIZER) {
        jobs::add_finalizer(&api, &service, FINALIZER).await?;
        return Ok(Action::await_change());
    }
    let mut status = service.status.clone().unwrap_or_default();
    status.helm_release = Some(name.clone());
    let chart = match chart(&service.spec.chart) {
        Ok(chart) => chart,
        Err(err) => {
            status.phase = Some(ServicePhase::Failed);
            status.message = Some(err.to_string());
            write_status(&api, &service, status).await?;
            return Ok(Action::await_change());
        }
    };
    let hash = spec_hash(&service.spec);
    if status.applied_hash.as_deref() == Some(hash.as_str())
        && status.phase == Some(ServicePhase::Deployed)
    {
        write_status(&api, &service, status).await?;
        return Ok(Action::await_change());
    }

    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let job_name = install_job_name(&name, &hash);
    let selector = format!("{SERVICE_LABEL}={name},{STEP_LABEL}=install");
    let installs = jobs_api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    if let Some(busy) = installs
        .iter()
        .find(|j| j.name_any() != job_name && observed::outcome(j) == Outcome::Running)
    {
        status.phase = Some(ServicePhase::Deploying);
        status.message = Some(format!(
            "waiting for the previous helm Job {} to finish before applying the change",
            busy.name_any()
        ));
        write_status(&api, &service, status).await?;
        return Ok(Action::await_change());
    }

    let owner = owner(&service);
    let labels = [
        (SERVICE_LABEL, name.as_str()),
        (STEP_LABEL, "install"),
        (HASH_LABEL, hash.as_str()),
    ];
    let values_name = values_secret_name(&name, &hash);
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
    let job = render::helm_job(
        &HelmJob {
            name: &job_name,
            namespace: &ns,
            release: &name,
            action: HelmAction::Upgrade {
                chart: &chart,
                version: service.spec.chart.version.as_deref(),
                values_secret: &values_name,
            },
            labels: labels.to_vec(),
            owner,
            service_account: super::project::DEPLOYER,
        },
        &ctx.config.jobs,
    );
    let job = jobs::create_once(&jobs_api, &job).await?;
    match observed::outcome(&job) {
        Outcome::Running => {
            status.phase = Some(ServicePhase::Deploying);
            status.message = Some(format!(
                "installing {} with helm ({job_name})",
                service.spec.chart.name
            ));
        }
        Outcome::Succeeded => {
            status.phase = Some(ServicePhase::Deployed);
            status.message = Some(format!("release {name} is installed"));
            status.applied_hash = Some(hash.clone());
            // Earlier installs are history now: remove their Jobs and values.
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            for old in installs.iter().filter(|j| j.name_any() != job_name) {
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
        Outcome::Failed { message, .. } => {
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            let output = jobs::helm_failure(&pods, &job_name, &message).await?;
            status.phase = Some(ServicePhase::Failed);
            status.message = Some(format!(
                "helm upgrade --install failed (change the Service to try again)\n{output}"
            ));
        }
    }
    write_status(&api, &service, status).await?;
    Ok(Action::await_change())
}

/// Runs the Service controller; stop it by dropping the future.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let metrics = ctx.metrics.clone();
    let managed = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    let (store, stream) = super::trimmed_reflector(Api::<Service>::all(client.clone()), &ctx);
    Controller::for_stream(stream, store)
        .with_config(super::controller_config())
        .owns_stream(
            watcher(
                Api::<PartialObjectMeta<Job>>::all(client),
                watcher::Config::default().labels(&managed),
            )
            .touched_objects(),
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
}
