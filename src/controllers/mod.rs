//! Controllers that reconcile ShapeBlock resources in a managed cluster, run by the hub
//! through that cluster's tunnel client (one set per connected cluster; see
//! [`crate::hub::runtime`]).
//!
//! Each reconcile reads, decides with pure functions, applies with server-side apply under
//! the field manager [`crate::crd::FIELD_MANAGER`], and reports status. Errors carry a
//! category that decides what happens next: an invalid spec waits for a change, anything
//! else is retried with backoff. Depends on [`crate::crd`] and kube; nothing of the hub.

pub mod app;
pub mod appbuild;
pub mod jobs;
pub mod project;
pub mod service;

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;

/// Settings shared by the controllers of every cluster (keys of the hub's configuration file).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default)]
pub struct ControllerConfig {
    /// Namespace in each managed cluster that holds the registry Secret projects copy.
    pub registry_source_namespace: String,
    /// Name of that Secret when a Project names none.
    pub default_registry_secret: String,
    /// Images, chart and limits of build and Helm Jobs.
    pub jobs: crate::render::jobs::JobSettings,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            registry_source_namespace: "shapeblock".into(),
            default_registry_secret: "registry-creds".into(),
            jobs: Default::default(),
        }
    }
}

/// What a reconcile needs.
pub struct Context {
    pub client: kube::Client,
    pub cluster: String,
    pub config: ControllerConfig,
    /// Where status transitions are relayed (absent in set-ups without a relay).
    pub journal: Option<std::sync::Arc<crate::relay::Journal>>,
    /// Builds (`namespace/name`) whose log is being relayed.
    pub log_followers: dashmap::DashSet<String>,
    /// Reconcile counts by controller and result.
    pub metrics: std::sync::Arc<crate::hub::metrics::ControllerMetrics>,
    /// Hub-wide bound on reconciles running at once, shared by every cluster (see [`bounded`]).
    pub reconciles: std::sync::Arc<tokio::sync::Semaphore>,
}

/// Reconciles running at once across every cluster of a hub. Reconciles wait on the network
/// (each is a few API calls through a tunnel), so this bounds memory, not throughput: a queued
/// reconcile costs a few hundred bytes, a running one its whole future (kilobytes).
pub const MAX_CONCURRENT_RECONCILES: usize = 256;

/// Reconciles of one controller in one cluster running at once, so that a burst in one
/// cluster cannot take every hub-wide permit.
pub const RECONCILES_PER_CONTROLLER: u16 = 4;

/// Settings of every controller.
pub fn controller_config() -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(RECONCILES_PER_CONTROLLER)
}

/// Wraps a reconciler so each reconcile runs once the hub-wide bound allows, and its future is
/// allocated only then: when 1,000 clusters connect at once with 20 Apps each, 20,000 queued
/// reconciles would otherwise each hold their full future (measured: a 40 MB peak at 200
/// clusters, which the allocator keeps as resident memory for the rest of the process's life).
pub fn bounded<K, Fut>(
    reconcile: impl Fn(Arc<K>, Arc<Context>) -> Fut + Send + Sync + 'static,
) -> impl FnMut(Arc<K>, Arc<Context>) -> BoxFuture<Fut::Output>
where
    K: Send + Sync + 'static,
    Fut: std::future::Future + Send + 'static,
{
    let reconcile = Arc::new(reconcile);
    move |object, ctx| {
        let reconcile = reconcile.clone();
        Box::pin(async move {
            let _permit = ctx.reconciles.clone().acquire_owned().await.ok();
            Box::pin(reconcile(object, ctx)).await
        })
    }
}

/// A boxed reconcile future.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// Why a reconcile did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The apiserver (through the tunnel) refused or failed; retried with backoff.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Something the resource needs does not exist yet (e.g. the registry Secret); retried,
    /// and reconciled again as soon as it appears.
    #[error("{0}")]
    Missing(String),
    /// The resource cannot be reconciled as specified; waits for a change.
    #[error("{0}")]
    Invalid(String),
}

impl ReconcileError {
    /// Label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            ReconcileError::Kube(_) => "transient",
            ReconcileError::Missing(_) => "missing_dependency",
            ReconcileError::Invalid(_) => "invalid_spec",
        }
    }

    /// Short machine-readable reason for status conditions.
    pub fn reason(&self) -> &'static str {
        match self {
            ReconcileError::Kube(_) => "ApiError",
            ReconcileError::Missing(_) => "DependencyMissing",
            ReconcileError::Invalid(_) => "InvalidSpec",
        }
    }
}

/// Requeue policy by error category. Watches bring changes in immediately; these delays only
/// bound how long a failure waits for a retry when nothing changes.
pub fn retry_after(error: &ReconcileError) -> Action {
    match error {
        ReconcileError::Invalid(_) => Action::await_change(),
        ReconcileError::Missing(_) => Action::requeue(Duration::from_secs(60)),
        // A write based on a cache that lagged behind: the newer version is on its way.
        ReconcileError::Kube(kube::Error::Api(e)) if e.code == 409 => {
            Action::requeue(Duration::from_millis(500))
        }
        ReconcileError::Kube(_) => Action::requeue(Duration::from_secs(10)),
    }
}

/// Labels every object the hub creates carries.
pub const MANAGED_BY: (&str, &str) = (crate::crd::MANAGED_BY_LABEL, crate::crd::MANAGED_BY_VALUE);

/// A reflector for a controller's main resource whose cache drops `managedFields` (often
/// half of an object's size, and never read by a reconcile). Every change passes the relay's
/// journal first, so status transitions are relayed from the watch the controller needs anyway.
pub fn trimmed_reflector<K>(
    api: kube::Api<K>,
    ctx: &Context,
) -> (
    kube::runtime::reflector::Store<K>,
    impl futures_util::Stream<Item = Result<K, kube::runtime::watcher::Error>> + Send + 'static,
)
where
    K: crate::relay::Relayed
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    use futures_util::{StreamExt, TryStreamExt};
    use kube::ResourceExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let (store, writer) = reflector::store();
    let mut tap = ctx
        .journal
        .as_ref()
        .map(|journal| journal.tap::<K>(ctx.cluster.clone()));
    let events = watcher(api, watcher::Config::default())
        .modify(|object| {
            object.managed_fields_mut().clear();
        })
        .and_then(move |event| {
            // The event moves through the tap (which hands it back): no copy per watch event.
            let relayed = match tap.as_mut() {
                Some(tap) => futures_util::future::Either::Left(tap(event)),
                None => futures_util::future::Either::Right(futures_util::future::ready(event)),
            };
            async move { Ok(relayed.await) }
        })
        .boxed();
    let stream = reflector(writer, events).applied_objects();
    (store, stream)
}
