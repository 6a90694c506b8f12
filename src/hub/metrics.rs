//! Prometheus metrics of the hub, served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster: String,
}

/// The versions a cluster's agent reported at its last handshake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub cluster: String,
    pub agent_version: String,
    pub kubernetes_version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Time requests to a cluster waited for its API rate limit (`api_qps_per_cluster`), summed
/// over clusters: zero while controllers keep within the limit, growing when one cluster is
/// busier than its limit allows.
pub struct LimiterWait(pub Histogram);

impl Default for LimiterWait {
    fn default() -> Self {
        Self(Histogram::new([0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]))
    }
}

/// Tunnel metrics, one series per cluster.
#[derive(Default)]
pub struct TunnelMetrics {
    /// Requests that had to wait for their cluster's API rate limit, and for how long.
    pub api_limiter_wait: LimiterWait,
    /// 1 while the cluster has a live tunnel.
    pub connected: Family<ClusterLabel, Gauge>,
    /// Unix time the current tunnel was established.
    pub connected_since: Family<ClusterLabel, Gauge<f64, AtomicU64>>,
    /// Round-trip time of the last tunnel ping.
    pub rtt_seconds: Family<ClusterLabel, Gauge<f64, AtomicU64>>,
    /// Unix time the hub last heard from the agent (handshake or answered ping).
    pub last_seen: Family<ClusterLabel, Gauge<f64, AtomicU64>>,
    /// 1 for the agent and Kubernetes versions of the cluster's last tunnel.
    pub info: Family<VersionLabel, Gauge>,
    /// Tunnels established.
    pub connects: Family<ClusterLabel, Counter>,
    /// Tunnels that ended (dropped, replaced, revoked or timed out).
    pub disconnects: Family<ClusterLabel, Counter>,
    /// Websocket handshakes refused, by reason.
    pub handshakes_rejected: Family<ReasonLabel, Counter>,
    /// Bytes of HTTP/2 the hub sent to the cluster's agent through its tunnels.
    pub sent_bytes: Family<ClusterLabel, Counter>,
    /// Bytes of HTTP/2 the hub received from the cluster's agent through its tunnels.
    pub received_bytes: Family<ClusterLabel, Counter>,
}

impl TunnelMetrics {
    pub fn register(self: &std::sync::Arc<Self>, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("shapeblock_tunnel");
        sub.register(
            "api_limiter_wait_seconds",
            "Time a request to a cluster waited for the cluster's API rate limit (requests that waited)",
            self.api_limiter_wait.0.clone(),
        );
        sub.register(
            "connected",
            "1 while the cluster has a live tunnel",
            self.connected.clone(),
        );
        sub.register(
            "connected_since_seconds",
            "Unix time the current tunnel was established",
            self.connected_since.clone(),
        );
        sub.register(
            "rtt_seconds",
            "Round-trip time of the last tunnel ping",
            self.rtt_seconds.clone(),
        );
        sub.register(
            "last_seen_seconds",
            "Unix time the hub last heard from the agent (handshake or answered ping)",
            self.last_seen.clone(),
        );
        sub.register(
            "info",
            "1 for the agent and Kubernetes versions of the cluster's last tunnel",
            self.info.clone(),
        );
        sub.register("connects", "Tunnels established", self.connects.clone());
        sub.register(
            "disconnects",
            "Tunnels that ended",
            self.disconnects.clone(),
        );
        sub.register(
            "handshakes_rejected",
            "Websocket handshakes refused, by reason",
            self.handshakes_rejected.clone(),
        );
        // `_bytes_total`: the unit goes into the name, as Prometheus conventions ask.
        sub.register_with_unit(
            "sent",
            "Bytes the hub sent to the cluster's agent through its tunnels",
            Unit::Bytes,
            self.sent_bytes.clone(),
        );
        sub.register_with_unit(
            "received",
            "Bytes the hub received from the cluster's agent through its tunnels",
            Unit::Bytes,
            self.received_bytes.clone(),
        );
    }

    pub fn reject(&self, reason: &'static str) {
        self.handshakes_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_bytes_are_counters_in_bytes_per_cluster() {
        let metrics = std::sync::Arc::new(TunnelMetrics::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let label = ClusterLabel {
            cluster: "c1".into(),
        };
        metrics.sent_bytes.get_or_create(&label).inc_by(10);
        metrics.received_bytes.get_or_create(&label).inc_by(20);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("shapeblock_tunnel_sent_bytes_total{cluster=\"c1\"} 10"),
            "{text}"
        );
        assert!(
            text.contains("shapeblock_tunnel_received_bytes_total{cluster=\"c1\"} 20"),
            "{text}"
        );
    }
}
