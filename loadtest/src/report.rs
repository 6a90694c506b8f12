//! Figures of one fleet size, printed as the scenarios go and as a summary.

use std::time::Duration;

use shapeblock_test_support::figures::mib;

/// Everything measured for one fleet size.
#[derive(Debug, Default)]
pub struct Figures {
    pub clusters: usize,
    pub apps: usize,
    /// Hub RSS before any cluster.
    pub baseline_kib: u64,
    pub connect_seconds: f64,
    pub watch_seconds: f64,
    pub idle_kib: u64,
    pub idle_cores: f64,
    pub ready_seconds: f64,
    pub apps_kib: u64,
    pub apps_cores: f64,
    pub builds: usize,
    pub builds_failed: usize,
    pub build_cores: f64,
    pub build_peak_kib: u64,
    pub relay_samples: usize,
    pub relay_p50: Duration,
    pub relay_p99: Duration,
    pub relay_max: Duration,
    /// Relay latency of App health events (runtime state Running) during the builds.
    pub health_samples: usize,
    pub health_p50: Duration,
    pub health_p99: Duration,
    /// Relay latency of App phase changes while every App of the fleet is first reconciled.
    pub storm_p50: Duration,
    pub storm_p99: Duration,
    pub agent_idle_kib: u64,
    pub agent_busy_kib: u64,
    /// (all connected s, all watching s, all relayed s, peak RSS KiB) after a restart.
    pub restart: Option<(f64, f64, f64, u64)>,
    pub restart_settled_kib: u64,
}

impl Figures {
    fn per_cluster(&self, kib: u64) -> f64 {
        kib.saturating_sub(self.baseline_kib) as f64 / self.clusters.max(1) as f64
    }

    pub fn print(&self) {
        println!(
            "figures: {} clusters: idle {} ({:.0} KiB/cluster, {:.3} cores); {} Apps each {} ({:.0} KiB/cluster, {:.3} cores); \
             builds {} ({} failed) peak {} ({:.3} cores); relay p50 {:.1} ms p99 {:.1} ms (n={})",
            self.clusters,
            mib(self.idle_kib),
            self.per_cluster(self.idle_kib),
            self.idle_cores,
            self.apps,
            mib(self.apps_kib),
            self.per_cluster(self.apps_kib),
            self.apps_cores,
            self.builds,
            self.builds_failed,
            mib(self.build_peak_kib),
            self.build_cores,
            self.relay_p50.as_secs_f64() * 1000.0,
            self.relay_p99.as_secs_f64() * 1000.0,
            self.relay_samples
        );
    }

    /// One Markdown table row (the README's table has these columns).
    pub fn print_summary(&self) {
        let restart = match self.restart {
            Some((connected, watching, relayed, peak)) => format!(
                "{connected:.1} s / {watching:.1} s / {relayed:.1} s, peak {}",
                mib(peak)
            ),
            None => "–".into(),
        };
        println!(
            "| {} | {} ({:.0} KiB/cl.) | {:.2} | {} ({:.0} KiB/cl.) | {:.2} | {} peak, {:.2} cores | {:.1} / {:.1} ms | {:.0} / {:.0} ms | {} | {} / {} |",
            self.clusters,
            mib(self.idle_kib),
            self.per_cluster(self.idle_kib),
            self.idle_cores,
            mib(self.apps_kib),
            self.per_cluster(self.apps_kib),
            self.apps_cores,
            mib(self.build_peak_kib),
            self.build_cores,
            self.relay_p50.as_secs_f64() * 1000.0,
            self.relay_p99.as_secs_f64() * 1000.0,
            self.storm_p50.as_secs_f64() * 1000.0,
            self.storm_p99.as_secs_f64() * 1000.0,
            restart,
            mib(self.agent_idle_kib),
            mib(self.agent_busy_kib),
        );
    }

    /// Issue 18's table for this fleet size: each figure beside its target.
    pub fn print_targets(&self) {
        let row = |figure: &str, measured: String, target: &str| {
            println!("| {figure} | {measured} | {target} |");
        };
        println!(
            "\n| figure, {} clusters | measured | target |",
            self.clusters
        );
        println!("| --- | --- | --- |");
        row(
            &format!(
                "hub RSS per cluster, {} Apps each, runtime health on",
                self.apps
            ),
            format!("{:.0} KiB", self.per_cluster(self.apps_kib)),
            "≤ 200 KiB",
        );
        row(
            "hub CPU, idle fleet",
            format!("{:.3} cores", self.idle_cores),
            "≤ 0.1 core",
        );
        if let Some((connected, watching, relayed, peak)) = self.restart {
            row(
                "hub restart: all reconnected / all watching and resynced",
                format!("{connected:.1} s / {:.1} s", watching.max(relayed)),
                "≤ 60 s",
            );
            row(
                "hub restart: peak RSS / steady RSS",
                format!(
                    "{} / {} = {:.2}",
                    mib(peak),
                    mib(self.apps_kib),
                    peak as f64 / self.apps_kib.max(1) as f64
                ),
                "≤ 1.2",
            );
        }
        row(
            "relay latency p99, steady builds",
            format!("{:.1} ms", self.relay_p99.as_secs_f64() * 1000.0),
            "≤ 100 ms",
        );
        if self.agent_idle_kib > 0 {
            row(
                "agent process RSS in the fleet, idle / during builds",
                format!(
                    "{} / {}",
                    mib(self.agent_idle_kib),
                    mib(self.agent_busy_kib)
                ),
                "≤ 4 / ≤ 5 MiB (busy: 100 req/s, 10 watches)",
            );
        }
    }
}
