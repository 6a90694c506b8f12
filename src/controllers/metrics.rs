//! Prometheus metrics of the controllers, summed over clusters (a per-cluster series would cost
//! memory per cluster for little use; the logs carry the cluster on every line). The hub
//! registers them with its `/metrics`; nothing here knows the hub.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::ReconcileError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabel {
    /// `project`, `app`, `appbuild` or `service`.
    pub controller: &'static str,
    /// `ok`, or the error's category (see [`ReconcileError::category`]), or `watch`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: &'static str,
}

/// Reconciles are a few API calls through a tunnel: milliseconds to a few seconds.
fn reconcile_buckets() -> impl Iterator<Item = f64> {
    [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

/// Waiting for a hub-wide permit is zero when the hub keeps up, and grows under a storm.
fn wait_buckets() -> impl Iterator<Item = f64> {
    [0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0].into_iter()
}

/// Controller metrics.
#[derive(Debug)]
pub struct ControllerMetrics {
    pub reconciles: Family<ReconcileLabel, Counter>,
    /// Time a reconcile ran, once it had its permit.
    pub reconcile_duration: Family<ControllerLabel, Histogram>,
    /// Time a reconcile waited for one of the hub-wide permits (see [`super::bounded`]).
    pub permit_wait: Histogram,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            reconcile_duration: Family::new_with_constructor(
                || Histogram::new(reconcile_buckets()),
            ),
            permit_wait: Histogram::new(wait_buckets()),
        }
    }
}

impl ControllerMetrics {
    pub fn register(self: &std::sync::Arc<Self>, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("shapeblock_controller");
        sub.register(
            "reconciles",
            "Reconciles by controller and result (ok or the error category)",
            self.reconciles.clone(),
        );
        sub.register(
            "reconcile_duration_seconds",
            "Time a reconcile ran, by controller",
            self.reconcile_duration.clone(),
        );
        sub.register(
            "reconcile_permit_wait_seconds",
            "Time a reconcile waited for a hub-wide reconcile permit",
            self.permit_wait.clone(),
        );
    }

    /// Counts one controller result.
    pub fn record<T>(
        &self,
        controller: &'static str,
        result: &Result<
            T,
            kube::runtime::controller::Error<ReconcileError, kube::runtime::watcher::Error>,
        >,
    ) {
        use kube::runtime::controller::Error;
        let result = match result {
            Ok(_) => "ok",
            Err(Error::ReconcilerFailed(err, _)) => err.category().as_str(),
            Err(_) => "watch",
        };
        self.reconciles
            .get_or_create(&ReconcileLabel { controller, result })
            .inc();
    }

    /// Records how long one reconcile waited for its permit and then ran.
    pub fn observe(&self, controller: &'static str, waited: Duration, ran: Duration) {
        self.permit_wait.observe(waited.as_secs_f64());
        self.reconcile_duration
            .get_or_create(&ControllerLabel { controller })
            .observe(ran.as_secs_f64());
    }
}
