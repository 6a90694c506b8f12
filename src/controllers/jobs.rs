//! What the controllers share about the Jobs they run: creating a Job exactly once under its
//! deterministic name, reading how it ended, and the Helm uninstall behind the App and Service
//! finalizers.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::ReconcileError;
use crate::crd::FIELD_MANAGER;
use crate::observed::{Outcome, outcome, tail, terminated};

/// Creates an object unless one of that name exists (deterministic names make a restarted hub
/// find, not duplicate, what it created before). Returns the object as it is in the cluster.
pub async fn create_once<K>(api: &Api<K>, object: &Value) -> Result<K, ReconcileError>
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let typed: K = serde_json::from_value(object.clone())
        .map_err(|e| ReconcileError::Internal(format!("rendering an object: {e}")))?;
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&params, &typed).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(api.get(&typed.name_any()).await?),
        Err(e) => Err(e.into()),
    }
}

/// Pods of a Job, by the `batch.kubernetes.io/job-name` label the Job controller sets.
pub async fn job_pods(pods: &Api<Pod>, job: &str) -> Result<Vec<Pod>, ReconcileError> {
    let selector = format!("batch.kubernetes.io/job-name={job}");
    Ok(pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}

/// The `FailedCreate` Warning Events the Job controller recorded on a Job (the pod it could
/// not create, and why: Pod Security admission, a quota, a webhook). One LIST by field
/// selector, on the Job's uid so that an earlier Job of the same name does not count.
pub async fn failed_creates(
    client: &kube::Client,
    job: &Job,
) -> Result<Vec<Event>, ReconcileError> {
    let (Some(namespace), Some(uid)) = (job.namespace(), job.metadata.uid.as_deref()) else {
        return Ok(vec![]);
    };
    let fields = format!("involvedObject.uid={uid},reason=FailedCreate");
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    Ok(events
        .list(&ListParams::default().fields(&fields))
        .await?
        .items)
}

/// Deletes a Job and its pods (background propagation); one already gone is fine.
pub async fn delete_job(client: &kube::Client, job: &Job) -> Result<(), ReconcileError> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), &job.namespace().unwrap_or_default());
    match jobs
        .delete(&job.name_any(), &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The most telling message of a failed Helm Job: the helm container's termination message
/// (its output, through `FallbackToLogsOnError`), else the Job condition's.
pub async fn helm_failure(
    pods: &Api<Pod>,
    job: &str,
    condition_message: &str,
) -> Result<String, ReconcileError> {
    let output = job_pods(pods, job)
        .await?
        .iter()
        .find_map(|pod| terminated(pod, crate::render::jobs::HELM_CONTAINER).cloned())
        .and_then(|t| t.message)
        .filter(|m| !m.trim().is_empty());
    Ok(tail(output.as_deref().unwrap_or(condition_message), 2000))
}

/// Adds a finalizer (optimistic concurrency: the resourceVersion guards the list).
pub async fn add_finalizer<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<(), ReconcileError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut finalizers = obj.finalizers().to_vec();
    finalizers.push(finalizer.to_string());
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": obj.resource_version()}});
    api.patch(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Removes a finalizer.
pub async fn remove_finalizer<K>(
    api: &Api<K>,
    obj: &K,
    finalizer: &str,
) -> Result<(), ReconcileError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let remaining: Vec<&String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != finalizer)
        .collect();
    let patch =
        json!({"metadata": {"finalizers": remaining, "resourceVersion": obj.resource_version()}});
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether a namespace is being deleted (or gone): then everything in it goes anyway, and a
/// Job created there would be refused, so finalizers must not wait for one.
pub async fn namespace_terminating(
    client: &kube::Client,
    namespace: &str,
) -> Result<bool, ReconcileError> {
    let ns = Api::<Namespace>::all(client.clone())
        .get_opt(namespace)
        .await?;
    Ok(ns.is_none_or(|ns| ns.metadata.deletion_timestamp.is_some()))
}

/// Whether Helm holds a release of this name in the namespace (its storage Secrets).
pub async fn release_exists(
    client: &kube::Client,
    namespace: &str,
    release: &str,
) -> Result<bool, ReconcileError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let selector = format!("owner=helm,name={release}");
    let found = secrets
        .list_metadata(&ListParams::default().labels(&selector).limit(1))
        .await?;
    Ok(!found.items.is_empty())
}

/// Progress of an uninstall behind a finalizer.
#[derive(Debug, PartialEq, Eq)]
pub enum Uninstall {
    /// The release is gone: remove the finalizer.
    Done,
    /// The uninstall Job runs; its events bring the next reconcile.
    Running,
    /// The uninstall failed with this message; the Job was deleted so a retry starts afresh.
    Failed(String),
}

/// Drives `helm uninstall` through a Job named `job_name`.
pub async fn uninstall(
    client: &kube::Client,
    job: &Value,
    job_name: &str,
    namespace: &str,
) -> Result<Uninstall, ReconcileError> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let existing = create_once(&jobs, job).await?;
    match outcome(&existing) {
        Outcome::Running => Ok(Uninstall::Running),
        Outcome::Succeeded => {
            jobs.delete(job_name, &DeleteParams::background())
                .await
                .ok();
            Ok(Uninstall::Done)
        }
        Outcome::Failed { message, .. } => {
            let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
            let message = helm_failure(&pods, job_name, &message).await?;
            jobs.delete(job_name, &DeleteParams::background()).await?;
            Ok(Uninstall::Failed(message))
        }
    }
}
