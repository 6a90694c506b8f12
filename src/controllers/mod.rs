//! Controllers that reconcile ShapeBlock resources in a managed cluster, run by the hub
//! through that cluster's tunnel client (one set per connected cluster, started by the hub's
//! per-cluster runtime).
//!
//! Each reconcile reads, decides with pure functions, applies with server-side apply under
//! the field manager [`crate::crd::FIELD_MANAGER`], and reports status (and Events). Errors
//! carry an [`ErrorCategory`] that decides what happens next: an invalid spec waits for a
//! change, anything else is retried with per-object exponential backoff ([`retry_delay`]).
//!
//! Depends on: crd, render, observed, relay. Knows nothing of the hub, the tunnel or
//! websockets: a controller gets a `kube::Client`, whatever carries its requests.
//! Never uses: tokio_tungstenite, axum, hyper (no websockets, no HTTP serving).

pub mod app;
pub mod appbuild;
pub mod events;
pub mod jobs;
pub mod metrics;
pub mod project;
pub mod runtime;
pub mod service;
pub mod shared;
pub mod team;
pub mod tenancy;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Resource;
use kube::runtime::controller::Action;
use serde::de::DeserializeOwned;

use crate::relay::Relayed;

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
    /// How Apps are deployed and reached: the chart, the TLS issuer, the ingress class, the
    /// builds kept.
    pub apps: crate::render::app::AppSettings,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            registry_source_namespace: "shapeblock".into(),
            default_registry_secret: "registry-creds".into(),
            jobs: Default::default(),
            apps: Default::default(),
        }
    }
}

/// What a reconcile needs.
pub struct Context {
    pub client: kube::Client,
    pub cluster: String,
    pub config: ControllerConfig,
    /// Where status transitions are relayed (absent in set-ups without a relay).
    pub journal: Option<Arc<crate::relay::Journal>>,
    /// Builds (`namespace/name`) whose log is being relayed.
    pub log_followers: dashmap::DashSet<String>,
    /// Reconcile counts by controller and result, durations, permit waits.
    pub metrics: Arc<metrics::ControllerMetrics>,
    /// Hub-wide bound on reconciles running at once, shared by every cluster (see [`bounded`]).
    pub reconciles: Arc<tokio::sync::Semaphore>,
    /// Consecutive failures of each object that is failing (`controller/namespace/name`),
    /// which set its backoff; an entry goes when the object reconciles.
    pub failures: dashmap::DashMap<String, u32>,
}

impl Context {
    /// The context of one cluster's controllers.
    pub fn new(
        client: kube::Client,
        cluster: String,
        config: ControllerConfig,
        journal: Option<Arc<crate::relay::Journal>>,
        metrics: Arc<metrics::ControllerMetrics>,
        reconciles: Arc<tokio::sync::Semaphore>,
    ) -> Self {
        Self {
            client,
            cluster,
            config,
            journal,
            log_followers: Default::default(),
            metrics,
            reconciles,
            failures: Default::default(),
        }
    }
}

/// Reconciles running at once across every cluster of a hub. Reconciles wait on the network
/// (each is a few API calls through a tunnel), so this bounds memory, not throughput: a queued
/// reconcile costs a few hundred bytes, a running one its whole future (kilobytes).
pub const MAX_CONCURRENT_RECONCILES: usize = 256;

/// Reconciles of one controller in one cluster running at once, so that a burst in one
/// cluster cannot take every hub-wide permit.
pub const RECONCILES_PER_CONTROLLER: u16 = 4;

/// The shortest time the apiserver keeps one watch request open; each watch draws its own
/// between this and twice this, so a fleet's watches do not end together.
///
/// kube's default is 290 s. At 10,000 clusters × 12 watches that is about 410 watch requests a
/// second through the tunnels that only resume where the last one ended; this makes it about
/// 90. The apiserver's own default is 30 to 60 minutes, and client-go's 5 to 10.
/// A lost tunnel or apiserver connection still ends a watch at once (HTTP/2 PING; the agent's
/// TCP keepalive), so a long watch hides nothing.
pub const WATCH_SECONDS: u32 = 15 * 60;

/// Settings of every watch the controllers open (a server-side timeout from [`WATCH_SECONDS`]).
pub fn watch_config() -> kube::runtime::watcher::Config {
    kube::runtime::watcher::Config::default()
        .timeout(WATCH_SECONDS + rand::random_range(0..=WATCH_SECONDS))
}

/// Settings of every controller.
pub fn controller_config() -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(RECONCILES_PER_CONTROLLER)
}

/// Wraps a reconciler so each reconcile runs once the hub-wide bound allows, and its future is
/// allocated only then: when 1,000 clusters connect at once with 20 Apps each, 20,000 queued
/// reconciles would otherwise each hold their full future (measured: a 40 MB peak at 200
/// clusters, which the allocator keeps as resident memory for the rest of the process's life).
/// It also times the wait and the run, and forgets an object's failures once it reconciles.
pub fn bounded<K, Fut>(
    controller: &'static str,
    reconcile: impl Fn(Arc<K>, Arc<Context>) -> Fut + Send + Sync + 'static,
) -> impl FnMut(Arc<K>, Arc<Context>) -> BoxFuture<Fut::Output>
where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Action, ReconcileError>> + Send + 'static,
{
    let reconcile = Arc::new(reconcile);
    move |object, ctx| {
        let reconcile = reconcile.clone();
        Box::pin(async move {
            let queued = Instant::now();
            let _permit = ctx.reconciles.clone().acquire_owned().await.ok();
            let started = Instant::now();
            let result = Box::pin(reconcile(object.clone(), ctx.clone())).await;
            ctx.metrics
                .observe(controller, started - queued, started.elapsed());
            // Most reconciles run with no object failing: no key is built for them.
            if result.is_ok() && !ctx.failures.is_empty() {
                ctx.failures
                    .remove(&failure_key(controller, object.as_ref()));
            }
            result
        })
    }
}

/// A boxed reconcile future.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// What kind of failure a reconcile met: it labels metrics and Warning Events, and decides
/// when the object is tried again (see [`retry_delay`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCategory {
    /// The network, the tunnel or the apiserver failed; it will likely work again soon.
    Transient,
    /// A write lost a race with another writer (409): the newer object is on its way.
    Conflict,
    /// The apiserver refused the agent's identity a permission (403): an RBAC rule is missing.
    Forbidden,
    /// Something the resource needs does not exist yet (a Secret, the App of a build).
    MissingDependency,
    /// The resource cannot be reconciled as specified (422 included); waits for a change.
    InvalidSpec,
    /// A bug or a misconfiguration of the hub, not of the resource.
    Internal,
}

impl ErrorCategory {
    /// Label for metrics and logs; also the reason of the Warning Event (in CamelCase there).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCategory::Transient => "transient",
            ErrorCategory::Conflict => "conflict",
            ErrorCategory::Forbidden => "forbidden",
            ErrorCategory::MissingDependency => "missing_dependency",
            ErrorCategory::InvalidSpec => "invalid_spec",
            ErrorCategory::Internal => "internal",
        }
    }

    /// Reason of the Warning Event published for a failure of this category.
    pub fn event_reason(self) -> &'static str {
        match self {
            ErrorCategory::Transient => "ReconcileFailed",
            ErrorCategory::Conflict => "Conflict",
            ErrorCategory::Forbidden => "Forbidden",
            ErrorCategory::MissingDependency => "DependencyMissing",
            ErrorCategory::InvalidSpec => "InvalidSpec",
            ErrorCategory::Internal => "InternalError",
        }
    }
}

/// Why a reconcile did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The apiserver (through the tunnel) refused or failed; categorised by its status code.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Something the resource needs does not exist yet (e.g. the registry Secret); retried,
    /// and reconciled again as soon as it appears.
    #[error("{0}")]
    Missing(String),
    /// The resource cannot be reconciled as specified; waits for a change.
    #[error("{0}")]
    Invalid(String),
    /// The resource is outside a Project's namespace: nothing is created for it. Retried like a
    /// missing dependency (its Project may come), and its Warning Event says `NotInProject`.
    #[error("{0}")]
    NotInProject(#[from] tenancy::NotInProject),
    /// Refused for a reason a program can act on (`reason`, CamelCase, also in status), such
    /// as a git Secret bound to another host; retried like a missing dependency, since the
    /// fix is often made to another object (a Secret) that no watch brings back.
    #[error("{message}")]
    Refused {
        reason: &'static str,
        message: String,
    },
    /// The hub failed at something that does not depend on the resource (encoding an object it
    /// rendered, generating a key, its own configuration): a bug or a misconfiguration.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ReconcileError {
    pub fn category(&self) -> ErrorCategory {
        match self {
            ReconcileError::Kube(kube::Error::Api(e)) => match e.code {
                403 => ErrorCategory::Forbidden,
                409 => ErrorCategory::Conflict,
                // The apiserver refused an object rendered from the resource's own fields.
                422 => ErrorCategory::InvalidSpec,
                _ => ErrorCategory::Transient,
            },
            ReconcileError::Kube(_) => ErrorCategory::Transient,
            ReconcileError::Missing(_)
            | ReconcileError::NotInProject(_)
            | ReconcileError::Refused { .. } => ErrorCategory::MissingDependency,
            ReconcileError::Invalid(_) => ErrorCategory::InvalidSpec,
            ReconcileError::Internal(_) => ErrorCategory::Internal,
        }
    }

    /// Reason of the Warning Event published for this failure: its own when it has one,
    /// otherwise its category's.
    pub fn event_reason(&self) -> &'static str {
        match self {
            ReconcileError::NotInProject(_) => tenancy::NOT_IN_PROJECT,
            ReconcileError::Refused { reason, .. } => reason,
            other => other.category().event_reason(),
        }
    }
}

/// Sets the condition `type_` in `conditions`, moving its transition time only when its
/// status or reason changes (pure).
pub fn set_condition(
    conditions: &mut Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) {
    let value = if ok { "True" } else { "False" };
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if existing.status != value || existing.reason != reason {
            existing.last_transition_time = now.clone();
        }
        existing.status = value.into();
        existing.reason = reason.into();
        existing.message = message.into();
        existing.observed_generation = generation;
        return;
    }
    conditions.push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        type_: type_.into(),
        status: value.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    });
}

/// When an object that failed `failures` times in a row (this failure included) is tried
/// again, before jitter; `None`: only when it changes. Watches bring changes in at once; these
/// delays bound how long a failure waits when nothing changes, doubling per failure up to a
/// cap, so a broken object (or a missing RBAC rule) costs little however long it stays broken
/// (pure).
pub fn retry_delay(category: ErrorCategory, failures: u32) -> Option<Duration> {
    let (first, cap) = match category {
        ErrorCategory::InvalidSpec => return None,
        ErrorCategory::Conflict => (Duration::from_millis(500), Duration::from_secs(5)),
        ErrorCategory::Transient => (Duration::from_secs(2), Duration::from_secs(300)),
        ErrorCategory::MissingDependency => (Duration::from_secs(15), Duration::from_secs(300)),
        ErrorCategory::Forbidden => (Duration::from_secs(30), Duration::from_secs(600)),
        ErrorCategory::Internal => (Duration::from_secs(60), Duration::from_secs(1800)),
    };
    let doublings = failures.saturating_sub(1).min(16);
    Some(first.saturating_mul(1 << doublings).min(cap))
}

/// Key of an object's consecutive failures in [`Context::failures`].
fn failure_key<K: Resource<DynamicType = ()>>(controller: &'static str, object: &K) -> String {
    let meta = object.meta();
    format!(
        "{controller}/{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// The error policy of every controller: logs the failure, publishes it as a Warning Event on
/// the object (so `kubectl describe` tells the story), and schedules the retry with per-object
/// exponential backoff and jitter (so objects that failed together, when a tunnel dropped, are
/// not all retried at the same instant).
pub fn on_error<K>(
    controller: &'static str,
    object: Arc<K>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Action
where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
{
    let category = error.category();
    let failures = {
        let mut count = ctx
            .failures
            .entry(failure_key(controller, object.as_ref()))
            .or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    let meta = object.meta();
    tracing::warn!(cluster = %ctx.cluster, controller, name = ?meta.name, namespace = ?meta.namespace,
        category = category.as_str(), failures, %error, "reconcile failed");
    // A tunnel that is down cannot carry the Event either; say it once it is back.
    if category != ErrorCategory::Transient && category != ErrorCategory::Conflict {
        let reference = object.object_ref(&());
        let note = error.to_string();
        let reason = error.event_reason();
        let client = ctx.client.clone();
        tokio::spawn(async move {
            events::publish(&client, &reference, events::warning(reason, note)).await;
        });
    }
    match retry_delay(category, failures) {
        None => Action::await_change(),
        Some(delay) => Action::requeue(jittered(delay)),
    }
}

/// `delay` less up to a quarter, at random: retries of objects that failed together spread out.
fn jittered(delay: Duration) -> Duration {
    let quarter = delay / 4;
    delay - quarter.mul_f64(rand::random::<f64>())
}

/// Labels every object the hub creates carries.
pub const MANAGED_BY: (&str, &str) = (crate::crd::MANAGED_BY_LABEL, crate::crd::MANAGED_BY_VALUE);

/// A controller's main resource, whose changes the relay's journal sees.
pub trait Tapped: Relayed + Clone + Debug + DeserializeOwned + Send + Sync + 'static {}

impl<K: Relayed + Clone + Debug + DeserializeOwned + Send + Sync + 'static> Tapped for K {}

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
    K: Tapped,
{
    use kube::runtime::{WatchStreamExt, reflector};
    let (store, writer) = reflector::store();
    let stream = reflector(writer, tapped_watch(api, ctx)).applied_objects();
    (store, stream)
}

/// The watch of a controller's main resource, `managedFields` dropped, every change passed
/// through the relay's journal (see [`trimmed_reflector`]).
pub fn tapped_watch<K>(
    api: kube::Api<K>,
    ctx: &Context,
) -> impl futures_util::Stream<
    Item = Result<kube::runtime::watcher::Event<K>, kube::runtime::watcher::Error>,
> + Send
+ 'static
where
    K: Tapped,
{
    use futures_util::{StreamExt, TryStreamExt};
    use kube::ResourceExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let mut tap = ctx
        .journal
        .as_ref()
        .map(|journal| journal.tap::<K>(ctx.cluster.clone()));
    watcher(api, watch_config())
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
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> ReconcileError {
        ReconcileError::Kube(kube::Error::Api(Box::new(kube::core::Status {
            code,
            ..Default::default()
        })))
    }

    #[test]
    fn status_codes_and_variants_map_to_categories() {
        assert_eq!(api_error(403).category(), ErrorCategory::Forbidden);
        assert_eq!(api_error(409).category(), ErrorCategory::Conflict);
        assert_eq!(api_error(422).category(), ErrorCategory::InvalidSpec);
        assert_eq!(api_error(500).category(), ErrorCategory::Transient);
        assert_eq!(api_error(404).category(), ErrorCategory::Transient);
        assert_eq!(
            ReconcileError::Missing("x".into()).category(),
            ErrorCategory::MissingDependency
        );
        assert_eq!(
            ReconcileError::Invalid("x".into()).category(),
            ErrorCategory::InvalidSpec
        );
        assert_eq!(
            ReconcileError::Internal("x".into()).category(),
            ErrorCategory::Internal
        );
    }

    #[test]
    fn retries_double_per_failure_up_to_a_cap_and_invalid_specs_wait_for_a_change() {
        assert_eq!(retry_delay(ErrorCategory::InvalidSpec, 1), None);
        let transient: Vec<u64> = (1..=10)
            .map(|n| retry_delay(ErrorCategory::Transient, n).unwrap().as_secs())
            .collect();
        assert_eq!(transient, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(
            retry_delay(ErrorCategory::Forbidden, 1),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_delay(ErrorCategory::Forbidden, 100),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            retry_delay(ErrorCategory::Conflict, 1),
            Some(Duration::from_millis(500))
        );
        // However many failures, no overflow, and the cap holds.
        assert_eq!(
            retry_delay(ErrorCategory::Internal, u32::MAX),
            Some(Duration::from_secs(1800))
        );
    }

    #[test]
    fn jitter_takes_off_at_most_a_quarter() {
        let delay = Duration::from_secs(100);
        for _ in 0..1000 {
            let j = jittered(delay);
            assert!(j <= delay && j >= Duration::from_secs(75), "{j:?}");
        }
    }
}
