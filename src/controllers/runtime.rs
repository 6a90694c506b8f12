//! Runtime: how each App runs, in `App.status.runtime` — its state (`Running`, `Degraded`,
//! `Down`…), replica counts, restarts, URLs and, when unhealthy, the reason with the
//! container's exit code and last termination message — observed from watches of the Apps'
//! Deployments and pods, and a Kubernetes Event at each change of state or reason.
//!
//! Read: the cached Deployment and pods of the App (label `shapeblock.io/app` and the App's
//! namespace; no API call). Decide: [`observed::workload::runtime_status`] (pure). Apply:
//! `status.runtime` only, by server-side apply under its own field manager
//! ([`RUNTIME_FIELD_MANAGER`]), so the other writers of the App's status never take or drop
//! its fields; and only when it changed. Report: an Event when state or reason changed; the
//! relay sees the new status through the App controller's watch, like every status change.
//!
//! Every cached workload is trimmed to the fields read ([`trim_deployment`], [`trim_pod`]): a
//! hub caches these for every App of thousands of clusters, and a pod as the apiserver sends
//! it is mostly spec and managed fields nobody here reads. The Apps and their Deployments come
//! from the cluster's shared watches ([`super::shared::Watches`]): the App controller's cache
//! is this controller's too, instead of a second, trimmed copy of every App.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{Context, ReconcileError, events};
use crate::crd::{App, RuntimeState, RuntimeStatus};
use crate::observed::workload;
use crate::render::app::{APP_LABEL, hosts, urls};

/// Field manager of `status.runtime`, apart from the hub's other writes.
pub const RUNTIME_FIELD_MANAGER: &str = "shapeblock-hub-runtime";

/// Pods of App releases: labelled with an App, not a Job's (the hub's build and deploy pods
/// carry the App label too, and a chart's Jobs never make up the App's Deployment).
pub const POD_SELECTOR: &str = concat!(
    "shapeblock.io/app,",
    "app.kubernetes.io/managed-by!=shapeblock-hub,",
    "!batch.kubernetes.io/job-name"
);

/// The caches of the Apps' workloads, filled by the watches of [`run`].
pub struct Workloads {
    pub deployments: Store<Deployment>,
    pub pods: Store<Pod>,
}

impl Workloads {
    /// The App's Deployment and its labelled pods, from the caches.
    fn of(&self, namespace: &str, app: &str) -> (Option<Arc<Deployment>>, Vec<Pod>) {
        let belongs = |meta: &ObjectMeta| {
            meta.namespace.as_deref() == Some(namespace)
                && meta
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(APP_LABEL))
                    .map(String::as_str)
                    == Some(app)
        };
        let deployments = self.deployments.state_filter(|d| belongs(&d.metadata));
        let pods = self
            .pods
            .state_filter(|p| belongs(&p.metadata))
            .iter()
            .map(|p| (**p).clone())
            .collect();
        (pick_deployment(deployments, app), pods)
    }
}

/// The App's Deployment among those labelled with its name: the one named after the App (the
/// first-party chart's), else the first by name (another chart's single workload) (pure).
pub fn pick_deployment(mut labelled: Vec<Arc<Deployment>>, app: &str) -> Option<Arc<Deployment>> {
    labelled.sort_by_key(|d| d.name_any());
    match labelled.iter().position(|d| d.name_any() == app) {
        Some(i) => Some(labelled.swap_remove(i)),
        None => labelled.into_iter().next(),
    }
}

/// Whether a new runtime status is a transition to tell with an Event: its state or reason
/// changed. The first status of an App that was never deployed tells nothing (pure).
pub fn is_transition(before: Option<&RuntimeStatus>, after: &RuntimeStatus) -> bool {
    match before {
        None => after.state != RuntimeState::NotDeployed,
        Some(b) => b.state != after.state || b.reason != after.reason,
    }
}

/// The Event of a transition: a Warning named by the reason when the App is unhealthy, a
/// Normal one named by the state otherwise (pure).
pub fn transition_event(after: &RuntimeStatus) -> kube::runtime::events::Event {
    let replicas = format!(
        "{} of {} replicas ready",
        after.ready_replicas, after.desired_replicas
    );
    let image = after.image.as_deref().unwrap_or("no image");
    match (after.state, after.reason.as_deref()) {
        (RuntimeState::Degraded | RuntimeState::Down, reason) => {
            let state = format!("{:?}", after.state);
            events::failed(
                reason.unwrap_or(state.as_str()),
                format!(
                    "{state}, {replicas}: {}",
                    after.message.as_deref().unwrap_or_default()
                ),
            )
        }
        (RuntimeState::Running, _) => events::phase("Running", format!("{replicas}, {image}")),
        (RuntimeState::Progressing, _) => events::phase(
            "Progressing",
            format!(
                "rolling out {image}: {}",
                after.message.as_deref().unwrap_or(&replicas)
            ),
        ),
        (RuntimeState::NotDeployed, _) => {
            events::phase("NotDeployed", "the App's Deployment is gone".into())
        }
    }
}

/// Keeps only the App label of an object's metadata, besides its identity.
fn trim_metadata(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|k, _| k == APP_LABEL);
    }
}

/// A container reduced to its name and image.
fn named_image(container: &Container) -> Container {
    Container {
        name: container.name.clone(),
        image: container.image.clone(),
        ..Default::default()
    }
}

/// Keeps what [`workload::runtime_status`] reads of a Deployment: generation, replicas, the
/// App container's name and image, and the status (counts and conditions, small).
pub fn trim_deployment(deployment: &mut Deployment) {
    trim_metadata(&mut deployment.metadata);
    let container = workload::app_container(deployment).map(named_image);
    if let Some(spec) = deployment.spec.as_mut() {
        spec.selector = Default::default();
        spec.strategy = None;
        spec.template.metadata = None;
        spec.template.spec = Some(PodSpec {
            containers: container.into_iter().collect(),
            ..Default::default()
        });
    }
}

/// Keeps what [`workload::pod_problem`] and the image check read of a pod: its containers'
/// names and images, phase, `PodScheduled` condition and container states (termination
/// messages included); drops volumes, env, IPs, init containers and the rest.
pub fn trim_pod(pod: &mut Pod) {
    trim_metadata(&mut pod.metadata);
    if let Some(spec) = pod.spec.as_mut() {
        *spec = PodSpec {
            containers: spec.containers.iter().map(named_image).collect(),
            ..Default::default()
        };
    }
    if let Some(status) = pod.status.as_mut() {
        *status = PodStatus {
            phase: status.phase.take(),
            conditions: status.conditions.take().map(|conditions| {
                conditions
                    .into_iter()
                    .filter(|c| c.type_ == "PodScheduled")
                    .map(|mut c| {
                        c.last_probe_time = None;
                        c.last_transition_time = None;
                        c
                    })
                    .collect()
            }),
            container_statuses: status.container_statuses.take().map(|statuses| {
                statuses
                    .into_iter()
                    .map(|c| ContainerStatus {
                        name: c.name,
                        ready: c.ready,
                        restart_count: c.restart_count,
                        state: c.state,
                        last_state: c.last_state,
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        };
    }
}

async fn reconcile(
    app: Arc<App>,
    ctx: Arc<Context>,
    workloads: Arc<Workloads>,
) -> Result<Action, ReconcileError> {
    // An App being deleted is uninstalled by the App controller: nothing to tell.
    if app.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // Before both caches are listed, an App would read as not deployed, then flap back.
    let unsynced = |_| ReconcileError::Internal("the workload caches stopped".into());
    workloads
        .deployments
        .wait_until_ready()
        .await
        .map_err(unsynced)?;
    workloads.pods.wait_until_ready().await.map_err(unsynced)?;
    let ns = app.namespace().unwrap_or_default();
    let name = app.name_any();
    let (deployment, pods) = workloads.of(&ns, &name);
    let before = app.status.as_ref().and_then(|s| s.runtime.as_ref());
    let urls = urls(&hosts(app.spec.run.as_ref(), &ctx.config.apps));
    let runtime = workload::runtime_status(
        deployment.as_deref(),
        &pods,
        urls,
        before,
        &Time(jiff::Timestamp::now()),
    );
    if before == Some(&runtime) {
        return Ok(Action::await_change());
    }
    let apps: Api<App> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App",
        "status": {"runtime": runtime}});
    apps.patch_status(
        &name,
        &PatchParams::apply(RUNTIME_FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    if is_transition(before, &runtime) {
        tracing::info!(cluster = %ctx.cluster, namespace = %ns, app = %name,
            state = ?runtime.state, reason = ?runtime.reason, "runtime state changed");
        events::publish(
            &ctx.client,
            &app.object_ref(&()),
            transition_event(&runtime),
        )
        .await;
    }
    // The status just written, or the next change of the workload, brings the next look.
    Ok(Action::await_change())
}

/// The App of a labelled Deployment or pod.
fn owning_app(meta: &ObjectMeta) -> Option<ObjectRef<App>> {
    let app = meta.labels.as_ref()?.get(APP_LABEL)?;
    Some(ObjectRef::new(app).within(meta.namespace.as_deref()?))
}

/// Runs the runtime controller on the cluster's shared App and Deployment watches (its pods
/// are its own); stop it by dropping the future.
pub async fn run(ctx: Arc<Context>, watches: &super::shared::Watches) {
    let client = ctx.client.clone();
    let metrics = ctx.metrics.clone();
    let deployments = watches.deployments.store();
    let (pods, pods_writer) = reflector::store();
    let pod_stream = watcher(
        Api::<Pod>::all(client),
        super::watch_config().labels(POD_SELECTOR),
    )
    .modify(trim_pod)
    .reflect(pods_writer)
    .touched_objects();
    let workloads = Arc::new(Workloads { deployments, pods });
    Controller::for_shared_stream(watches.apps.applied(), watches.apps.store())
        .with_config(super::controller_config())
        .watches_shared_stream(watches.deployments.touched(), |d: Arc<Deployment>| {
            owning_app(&d.metadata)
        })
        .watches_stream(pod_stream, |p: Pod| owning_app(&p.metadata))
        .run(
            super::bounded("runtime", move |app, ctx| {
                reconcile(app, ctx, workloads.clone())
            }),
            |object, error, ctx| super::on_error("runtime", object, error, ctx),
            ctx,
        )
        .for_each(|result| {
            metrics.record("runtime", &result);
            async {}
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn the_observed_container_is_the_charts() {
        assert_eq!(workload::APP_CONTAINER, crate::render::app::APP_CONTAINER);
        assert!(POD_SELECTOR.starts_with(APP_LABEL));
        assert!(POD_SELECTOR.contains(crate::crd::MANAGED_BY_LABEL));
    }

    fn deployment(name: &str) -> Arc<Deployment> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"selector": {},
            "template": {}}}))
            .unwrap(),
        )
    }

    #[test]
    fn the_deployment_named_after_the_app_is_its_own() {
        let picked = pick_deployment(
            vec![deployment("web-worker"), deployment("web"), deployment("a")],
            "web",
        );
        assert_eq!(picked.unwrap().name_any(), "web");
        let picked = pick_deployment(vec![deployment("z"), deployment("b")], "web");
        assert_eq!(picked.unwrap().name_any(), "b");
        assert!(pick_deployment(vec![], "web").is_none());
    }

    fn runtime(state: RuntimeState, reason: Option<&str>) -> RuntimeStatus {
        RuntimeStatus {
            state,
            reason: reason.map(Into::into),
            message: reason.map(|r| format!("pod web-a, container app: {r}, exit code 3")),
            desired_replicas: 1,
            image: Some("r/web:2".into()),
            ..Default::default()
        }
    }

    #[test]
    fn state_and_reason_changes_are_transitions_and_the_first_look_at_nothing_is_not() {
        let down = runtime(RuntimeState::Down, Some("CrashLoopBackOff"));
        assert!(!is_transition(
            None,
            &runtime(RuntimeState::NotDeployed, None)
        ));
        assert!(is_transition(None, &down));
        assert!(is_transition(
            Some(&down),
            &runtime(RuntimeState::Down, Some("OOMKilled"))
        ));
        assert!(is_transition(
            Some(&down),
            &runtime(RuntimeState::Running, None)
        ));
        let mut restarted = down.clone();
        restarted.restarts = 9;
        restarted.message = Some("restarted 9 times".into());
        assert!(
            !is_transition(Some(&down), &restarted),
            "a new restart is no transition"
        );
    }

    #[test]
    fn unhealthy_apps_get_a_warning_named_by_the_reason() {
        let event = transition_event(&runtime(RuntimeState::Down, Some("CrashLoopBackOff")));
        assert!(matches!(
            event.type_,
            kube::runtime::events::EventType::Warning
        ));
        assert_eq!(event.reason, "CrashLoopBackOff");
        assert!(event.note.unwrap().contains("exit code 3"));
        let event = transition_event(&runtime(RuntimeState::Running, None));
        assert!(matches!(
            event.type_,
            kube::runtime::events::EventType::Normal
        ));
        assert_eq!(event.reason, "Running");
        assert_eq!(
            transition_event(&runtime(RuntimeState::Progressing, None)).reason,
            "Progressing"
        );
    }

    #[test]
    fn caches_keep_only_what_is_read() {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-a", "namespace": "shop",
                "labels": {"shapeblock.io/app": "web", "pod-template-hash": "7d9f"},
                "annotations": {"kubectl.kubernetes.io/restartedAt": "x"},
                "managedFields": [{"manager": "kubelet"}]},
            "spec": {"containers": [{"name": "app", "image": "r/web:2",
                "env": [{"name": "SECRET", "value": "s"}]}],
                "volumes": [{"name": "v", "emptyDir": {}}], "nodeName": "n"},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                "conditions": [{"type": "Ready", "status": "False"},
                    {"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [{"name": "app", "image": "r/web:2", "imageID": "sha",
                    "ready": false, "restartCount": 4,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 3, "message": "boom"}}}]}}))
        .unwrap();
        let before = workload::pod_problem(&pod, "app");
        trim_pod(&mut pod);
        assert_eq!(workload::pod_problem(&pod, "app"), before, "same reading");
        let trimmed: Value = serde_json::to_value(&pod).unwrap();
        assert_eq!(
            trimmed["metadata"],
            json!({"name": "web-a", "namespace": "shop", "labels": {"shapeblock.io/app": "web"}})
        );
        assert_eq!(
            trimmed["spec"],
            json!({"containers": [{"name": "app", "image": "r/web:2"}]})
        );
        assert_eq!(
            trimmed["status"]["conditions"],
            json!([{"type": "PodScheduled", "status": "True"}])
        );
        assert!(trimmed["status"].get("podIP").is_none());

        let mut deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "generation": 2,
                "labels": {"shapeblock.io/app": "web", "helm.sh/chart": "c"},
                "annotations": {"meta.helm.sh/release-name": "web"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"a": "b"}},
                "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [
                    {"name": "sidecar", "image": "proxy"},
                    {"name": "app", "image": "r/web:2", "env": [{"name": "X", "value": "y"}]}]}}},
            "status": {"replicas": 2, "readyReplicas": 1}}))
        .unwrap();
        trim_deployment(&mut deployment);
        let trimmed: Value = serde_json::to_value(&deployment).unwrap();
        assert_eq!(
            trimmed["spec"]["template"],
            json!({"spec": {"containers": [{"name": "app", "image": "r/web:2"}]}})
        );
        assert_eq!(trimmed["spec"]["replicas"], 2);
        assert_eq!(trimmed["metadata"]["generation"], 2);
        assert_eq!(trimmed["status"]["readyReplicas"], 1);
    }
}
