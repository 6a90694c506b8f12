//! The ShapeBlock server's side of the relay, for the load test: accepts the hub's websocket,
//! reads every event, and measures how long each status change took from the moment the
//! simulated cluster committed it (see [`crate::sim::Cluster`]) to its arrival here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::{DashMap, DashSet};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::net::TcpListener;

use crate::sim::{HEALTH_KIND, phase_key};

/// What the relay server has received.
#[derive(Default)]
pub struct Received {
    pub events: AtomicU64,
    pub log_lines: AtomicU64,
    /// Status changes whose commit time was known: kind and latency.
    latencies: Mutex<Vec<(String, Duration)>>,
    /// Measure latencies only while this is set.
    pub measuring: AtomicBool,
    /// Projects and Apps (`cluster/kind/namespace/name`) seen since the last
    /// [`Received::reset_seen`].
    seen: DashSet<String>,
}

impl Received {
    /// Takes the latencies measured so far for one kind (`AppBuild`, `App`, `Project`).
    pub fn take_latencies(&self, kind: &str) -> Vec<Duration> {
        let mut all = self.latencies.lock().expect("latencies");
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *all)
            .into_iter()
            .partition(|(k, _)| k == kind);
        *all = kept;
        taken.into_iter().map(|(_, d)| d).collect()
    }

    /// Latencies measured so far for one kind.
    pub fn latency_count(&self, kind: &str) -> usize {
        let all = self.latencies.lock().expect("latencies");
        all.iter().filter(|(k, _)| k == kind).count()
    }

    pub fn reset_seen(&self) {
        self.seen.clear();
    }

    /// Resources seen since the last reset.
    pub fn seen(&self) -> usize {
        self.seen.len()
    }
}

/// Starts the server; returns its `ws://` URL.
pub async fn start(phases: Arc<DashMap<String, Instant>>, received: Arc<Received>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("relay listener");
    let url = format!("ws://{}/ws", listener.local_addr().expect("relay address"));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let phases = phases.clone();
            let received = received.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    let at = Instant::now();
                    let Ok(text) = message.to_text() else {
                        continue;
                    };
                    let Ok(event) = serde_json::from_str::<Value>(text) else {
                        continue;
                    };
                    record(&event, at, &phases, &received);
                }
            });
        }
    });
    url
}

fn record(event: &Value, at: Instant, phases: &DashMap<String, Instant>, received: &Received) {
    received.events.fetch_add(1, Ordering::Relaxed);
    if event["type"] == "BUILD_LOG" {
        received.log_lines.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let field = |f: &str| event[f].as_str().unwrap_or_default();
    let (cluster, kind, ns, name, status) = (
        field("cluster"),
        field("resourceType"),
        field("namespace"),
        field("name"),
        field("status"),
    );
    if kind == "Project" || kind == "App" {
        received
            .seen
            .insert(format!("{cluster}/{kind}/{ns}/{name}"));
    }
    if event["resync"] == true {
        return;
    }
    // The first arrival of each stamped phase removes the stamp (and counts, while measuring):
    // a later event with the same phase (an App stays Ready through many status changes) is
    // not a change of phase and has no commit time to measure from.
    let stamp = phases.remove(&phase_key(cluster, kind, ns, name, status));
    if let Some((_, committed)) = stamp
        && received.measuring.load(Ordering::Relaxed)
    {
        received
            .latencies
            .lock()
            .expect("latencies")
            .push((kind.to_string(), at.saturating_duration_since(committed)));
    }
    // An App's health event: its runtime state, stamped when the simulated helm committed the
    // Deployment.
    if kind == "App"
        && let Some(state) = event["runtime"]["state"].as_str()
        && let Some((_, committed)) =
            phases.remove(&phase_key(cluster, HEALTH_KIND, ns, name, state))
        && received.measuring.load(Ordering::Relaxed)
    {
        received.latencies.lock().expect("latencies").push((
            HEALTH_KIND.to_string(),
            at.saturating_duration_since(committed),
        ));
    }
}
