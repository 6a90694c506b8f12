//! Per-cluster runtime: when a cluster first connects, install (or upgrade) its CRDs with
//! server-side apply and start its controllers over the cluster's tunnel client; stop them
//! when the cluster is deleted or the hub stops. A global bound on concurrent initial syncs
//! keeps a reconnect storm after a hub restart from flattening the hub or the clusters.
//!
//! Clusters are spread over shards: each shard is an OS thread with its own single-threaded
//! Tokio runtime, and a cluster's controllers always run on the shard its id hashes to. A
//! cluster whose reconciles burn CPU (thousands of objects, a burst of builds) then slows only
//! the clusters of its shard, while the tunnels, the API and the other shards keep going.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::gateway::Gateway;
use super::registry::ClusterId;
use crate::controllers::{self, Context, ControllerConfig};

/// Runtime settings: keys at the top level of the hub's configuration file (flattened into it
/// by [`crate::hub::config`], which rejects unknown keys and validates).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default)]
pub struct RuntimeConfig {
    /// Clusters installing CRDs and starting controllers at the same time. An install is one
    /// round trip when the CRDs are there already (a hub restart), so 10,000 clusters pass
    /// through 50 of these within a minute even when each round trip takes a quarter second.
    pub max_concurrent_initial_syncs: usize,
    /// Read from the file beside the runtime keys rather than through them: serde rejects
    /// unknown keys only one `flatten` deep, and the file's `controllers` key is the on/off
    /// switch, not this.
    #[serde(skip)]
    pub controllers: ControllerConfig,
    /// Shards (threads) the clusters' controllers are spread over.
    pub shards: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_concurrent_initial_syncs: 50,
            controllers: ControllerConfig::default(),
            shards: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// The controllers running for each cluster.
pub struct Runtimes {
    gateway: Arc<Gateway>,
    /// Each running cluster's stop signal and its Teams' membership.
    running: DashMap<ClusterId, (CancellationToken, Arc<controllers::team::Directory>)>,
    initial_syncs: Arc<Semaphore>,
    config: RuntimeConfig,
    shutdown: CancellationToken,
    shards: Vec<Shard>,
    journal: Option<Arc<crate::relay::Journal>>,
    metrics: Arc<controllers::metrics::ControllerMetrics>,
    reconciles: Arc<Semaphore>,
}

/// A shard: a thread running a current-thread runtime until the hub stops.
struct Shard {
    handle: tokio::runtime::Handle,
    thread: std::thread::JoinHandle<()>,
}

/// Starts `count` shard threads, each running a current-thread runtime until `shutdown`.
fn start_shards(count: usize, shutdown: &CancellationToken) -> std::io::Result<Vec<Shard>> {
    (0..count.max(1))
        .map(|index| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let shutdown = shutdown.clone();
            let thread = std::thread::Builder::new()
                .name(format!("shard-{index}"))
                .spawn(move || runtime.block_on(shutdown.cancelled()))?;
            Ok(Shard { handle, thread })
        })
        .collect()
}

/// The shard a cluster runs on (pure, stable across restarts).
pub fn shard_of(cluster: &str, shards: usize) -> usize {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(cluster.as_bytes());
    (u64::from_be_bytes(digest[..8].try_into().unwrap_or_default()) % shards.max(1) as u64) as usize
}

impl Runtimes {
    /// Starts a runtime for every cluster as it connects, until `shutdown`.
    pub fn start(
        gateway: Arc<Gateway>,
        config: RuntimeConfig,
        journal: Option<Arc<crate::relay::Journal>>,
        metrics: Arc<controllers::metrics::ControllerMetrics>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Arc<Self>> {
        let runtimes = Arc::new(Self {
            initial_syncs: Arc::new(Semaphore::new(config.max_concurrent_initial_syncs.max(1))),
            gateway: gateway.clone(),
            running: DashMap::new(),
            shards: start_shards(config.shards, &shutdown)?,
            journal,
            metrics,
            reconciles: Arc::new(Semaphore::new(controllers::MAX_CONCURRENT_RECONCILES)),
            config,
            shutdown: shutdown.clone(),
        });
        let mut connects = gateway.subscribe_connects();
        let this = runtimes.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = connects.recv() => match event {
                        Ok(cluster) => this.ensure(&cluster),
                        // Missed notifications: make sure every connected cluster runs.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            for cluster in this.gateway.connected_clusters() {
                                this.ensure(&cluster);
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    _ = shutdown.cancelled() => return,
                }
            }
        });
        Ok(runtimes)
    }

    /// Starts the cluster's runtime unless it runs already.
    pub fn ensure(&self, cluster: &str) {
        if self.running.contains_key(cluster) {
            return;
        }
        let cancel = self.shutdown.child_token();
        let directory = Arc::new(controllers::team::Directory::default());
        self.running
            .insert(cluster.to_string(), (cancel.clone(), directory.clone()));
        let ctx = Arc::new(Context::new(
            self.gateway.client(cluster),
            cluster.to_string(),
            self.config.controllers.clone(),
            self.journal.clone(),
            self.metrics.clone(),
            self.reconciles.clone(),
        ));
        let permits = self.initial_syncs.clone();
        let span = tracing::info_span!("cluster", cluster = %cluster);
        let shard = &self.shards[shard_of(cluster, self.shards.len())].handle;
        shard.spawn(run_cluster(ctx, directory, permits, cancel).instrument(span));
    }

    /// Stops the cluster's controllers (the cluster was deleted).
    pub fn stop(&self, cluster: &str) {
        if let Some((_, (cancel, _))) = self.running.remove(cluster) {
            cancel.cancel();
        }
    }

    /// The Team groups (`shapeblock:team:<name>`) `user` belongs to in `cluster`, as its
    /// Team controller last saw them; None while that is not known (the cluster's
    /// controllers are not running, or have not listed its Teams yet).
    pub fn team_groups(&self, cluster: &str, user: &str) -> Option<Vec<String>> {
        self.running
            .get(cluster)
            .and_then(|entry| entry.value().1.groups_of(user))
    }

    /// Whether every shard thread still runs (one ends only when the hub stops, or by a bug).
    pub fn shards_running(&self) -> bool {
        self.shards.iter().all(|shard| !shard.thread.is_finished())
    }

    /// Number of clusters with running controllers.
    pub fn running(&self) -> usize {
        self.running.len()
    }
}

async fn run_cluster(
    ctx: Arc<Context>,
    directory: Arc<controllers::team::Directory>,
    permits: Arc<Semaphore>,
    cancel: CancellationToken,
) {
    let installed = {
        let Ok(_permit) = (tokio::select! {
            permit = permits.acquire_owned() => permit,
            _ = cancel.cancelled() => return,
        }) else {
            return;
        };
        let mut delay = Duration::from_secs(1);
        let installed = loop {
            let install = crate::crd::install(ctx.client.clone(), Duration::from_secs(60));
            tokio::select! {
                result = install => match result {
                    Ok(installed) => break installed,
                    Err(err) => tracing::warn!(error = %err, retry_in = ?delay, "installing CRDs failed"),
                },
                _ = cancel.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => return,
            }
            delay = (delay * 2).min(Duration::from_secs(60));
        };
        tracing::info!("CRDs installed; starting controllers");
        installed
    };
    // One watch per kind that several controllers read (see `controllers::shared`).
    let watches = controllers::shared::Watches::new();
    // Without the Team CRD (an agent installed before Teams) there is nothing to watch.
    let teams = async {
        match installed.teams_refused {
            None => controllers::team::run(ctx.clone(), directory, &watches).await,
            Some(message) => {
                tracing::warn!(%message,
                    "the agent may not install the Team CRD: its install manifest predates Teams; \
                     apply the current manifest to enable Teams and kubectl for people");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = watches.run(&ctx) => tracing::warn!("shared watches stopped"),
        _ = controllers::project::run(ctx.clone(), &watches) => tracing::warn!("project controller stopped"),
        _ = controllers::app::run(ctx.clone(), &watches) => tracing::warn!("app controller stopped"),
        _ = controllers::appbuild::run(ctx.clone(), &watches) => tracing::warn!("appbuild controller stopped"),
        _ = controllers::service::run(ctx.clone(), &watches) => tracing::warn!("service controller stopped"),
        _ = controllers::runtime::run(ctx.clone(), &watches) => tracing::warn!("runtime controller stopped"),
        _ = teams => tracing::warn!("team controller stopped"),
        _ = cancel.cancelled() => tracing::info!("controllers stopped"),
    }
}
