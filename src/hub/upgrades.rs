//! Fleet agent upgrades: the hub sets each connected cluster's agent to its `agent_image`,
//! through that agent (which may read and patch only its own Deployment, and there change only
//! the image's tag: `crate::render::agent::self_rules` and its admission policy), a few clusters
//! at a time, and halts when upgraded agents do not come back.
//!
//! Read → decide → apply → report: when a cluster's tunnel comes up the hub reads the agent's
//! Deployment ([`Observed`]); [`transition`] (pure) says what that makes of the cluster's
//! upgrade; [`plan`] (pure) picks the upgrades that start and those that timed out; the runner
//! patches the container's image and reports (`agentUpgrade` on each cluster in the API,
//! `GET /api/v1/agent-upgrades`, metrics).
//!
//! The agent's Deployment uses the Recreate strategy: the patched agent's tunnel ends and the
//! new agent's begins. An upgrade succeeds when the cluster connects again with the new image
//! in its Deployment, and fails when it has not within `timeout_seconds` (a hub cannot reach a
//! cluster whose agent does not start; its operator rolls it back, see the README). The first
//! upgrade of a hub's run is alone (a canary), then up to `max_concurrent` run at once; after
//! `max_failures` failures no new upgrade starts until `POST /api/v1/agent-upgrades/resume`.
//! State lives in memory: a restarted hub reads every Deployment again as clusters reconnect.
//!
//! Depends on: hub (gateway, registry), render (the agent's names).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::hub::gateway::Gateway;
use crate::hub::registry::{ClusterId, Registry};
use crate::render::agent::{CONTAINER, NAME, NAMESPACE};

/// The `agent_upgrades:` section of the hub's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpgradeConfig {
    /// Upgrade connected agents whose Deployment runs another image than `agent_image`.
    pub enabled: bool,
    /// Upgrades in progress at once (after the first, which runs alone).
    pub max_concurrent: usize,
    /// An upgraded agent that has not reconnected within this has failed.
    #[serde(
        rename = "timeout_seconds",
        deserialize_with = "crate::config::seconds"
    )]
    pub timeout: Duration,
    /// Failed upgrades after which no new one starts until resumed.
    pub max_failures: usize,
}

impl Default for UpgradeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_concurrent: 10,
            timeout: Duration::from_secs(300),
            max_failures: 3,
        }
    }
}

/// Where a cluster's agent stands against the hub's `agent_image`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub enum UpgradeState {
    /// Its Deployment runs `agent_image`.
    UpToDate,
    /// It runs another image and waits for a free upgrade slot.
    Pending,
    /// Its image was set; the hub waits for the new agent's tunnel.
    Upgrading,
    /// The new agent did not come back in time (or its image was set back); not retried
    /// until resumed.
    Failed,
    /// Left alone: pinned through the API, or the hub's own cluster (upgraded by the chart).
    Pinned,
    /// The agent may not read or change its Deployment (installed from a manifest older than
    /// upgrades, or the image is not of the manifest's repository).
    NotPermitted,
    /// No agent Deployment to upgrade (the agent was not installed by the manifest or chart).
    NotInstalled,
}

impl UpgradeState {
    const ALL: [UpgradeState; 7] = [
        Self::UpToDate,
        Self::Pending,
        Self::Upgrading,
        Self::Failed,
        Self::Pinned,
        Self::NotPermitted,
        Self::NotInstalled,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::UpToDate => "UpToDate",
            Self::Pending => "Pending",
            Self::Upgrading => "Upgrading",
            Self::Failed => "Failed",
            Self::Pinned => "Pinned",
            Self::NotPermitted => "NotPermitted",
            Self::NotInstalled => "NotInstalled",
        }
    }
}

/// What the hub read of a cluster's agent Deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// The image of its agent container.
    Image(String),
    /// The Deployment has no container named `agent`.
    NoContainer,
    /// There is no such Deployment.
    Missing,
    /// The agent may not read it (the apiserver's message).
    Forbidden(String),
}

/// One cluster's upgrade.
#[derive(Clone, Debug)]
pub struct Entry {
    pub state: UpgradeState,
    /// The image its Deployment ran when last read.
    pub image: Option<String>,
    pub reason: Option<String>,
    /// When `state` was entered.
    pub since: Timestamp,
    /// When the upgrade started (`Upgrading`).
    started: Option<Instant>,
    /// The image patch was accepted (`Upgrading`).
    patched: bool,
    /// A `Pending` cluster whose patch failed waits until then.
    retry_at: Option<Instant>,
}

impl Entry {
    fn new(state: UpgradeState, image: Option<String>, reason: Option<String>) -> Self {
        Self {
            state,
            image,
            reason,
            since: Timestamp::now(),
            started: None,
            patched: false,
            retry_at: None,
        }
    }
}

/// What an observation does to a cluster's upgrade.
#[derive(Debug, PartialEq, Eq)]
pub struct Transition {
    pub state: UpgradeState,
    pub reason: Option<String>,
    /// An upgrade finished: the new agent is back.
    pub succeeded: bool,
    /// An upgrade failed (counts towards `max_failures`).
    pub failed: bool,
}

fn to(state: UpgradeState, reason: Option<String>) -> Option<Transition> {
    Some(Transition {
        state,
        reason,
        succeeded: false,
        failed: false,
    })
}

/// The state `observed` puts a cluster in, given where its upgrade was (`current`); None when
/// nothing changes (an upgrade whose patch is still in flight).
pub fn transition(
    current: Option<&Entry>,
    observed: &Observed,
    pinned: bool,
    local: bool,
    target: &str,
) -> Option<Transition> {
    let running = match observed {
        Observed::Image(image) => Some(image.as_str()),
        _ => None,
    };
    if let Some(entry) = current {
        match entry.state {
            UpgradeState::Upgrading if !entry.patched => return None,
            UpgradeState::Upgrading => {
                return Some(match running {
                    Some(image) if image == target => Transition {
                        state: UpgradeState::UpToDate,
                        reason: None,
                        succeeded: true,
                        failed: false,
                    },
                    _ => Transition {
                        state: UpgradeState::Failed,
                        reason: Some(format!(
                            "the agent reconnected, but its Deployment runs {} instead of {target}: \
                             changed back since the upgrade set it",
                            running.unwrap_or("no agent container")
                        )),
                        succeeded: false,
                        failed: true,
                    },
                });
            }
            UpgradeState::Failed if running != Some(target) && !pinned && !local => return None,
            _ => {}
        }
    }
    if local {
        return to(
            UpgradeState::Pinned,
            Some(
                "the hub's own cluster: its agent is upgraded with the hub chart (helm upgrade)"
                    .into(),
            ),
        );
    }
    match observed {
        Observed::Missing => to(
            UpgradeState::NotInstalled,
            Some(format!(
                "no Deployment {NAMESPACE}/{NAME}: this agent was not installed by the install \
                 manifest or chart, so the hub cannot upgrade it"
            )),
        ),
        Observed::NoContainer => to(
            UpgradeState::NotInstalled,
            Some(format!(
                "Deployment {NAMESPACE}/{NAME} has no container named {CONTAINER}"
            )),
        ),
        Observed::Forbidden(message) => to(
            UpgradeState::NotPermitted,
            Some(format!(
                "the agent may not read its own Deployment (installed from a manifest older than \
                 fleet upgrades?); apply its install manifest once more: {message}"
            )),
        ),
        Observed::Image(_) if pinned => {
            to(UpgradeState::Pinned, Some("pinned through the API".into()))
        }
        Observed::Image(image) if image == target => to(UpgradeState::UpToDate, None),
        Observed::Image(image) => to(
            UpgradeState::Pending,
            Some(format!("runs {image}; to be upgraded to {target}")),
        ),
    }
}

/// The next step for the whole fleet.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Upgrades that have waited longer than `timeout` for the new agent.
    pub timed_out: Vec<ClusterId>,
    /// Pending clusters whose upgrade starts now.
    pub start: Vec<ClusterId>,
}

/// Which upgrades time out and which start: none start once `failures` (with the ones timing
/// out now) reach `max_failures`; one runs alone until one has succeeded in this run
/// (`canary_passed`), then up to `max_concurrent`. Pending clusters go in id order, connected
/// ones only (the patch travels through the tunnel).
pub fn plan(
    entries: &BTreeMap<ClusterId, Entry>,
    connected: impl Fn(&str) -> bool,
    now: Instant,
    config: &UpgradeConfig,
    failures: usize,
    halted: bool,
    canary_passed: bool,
) -> Plan {
    let upgrading = |e: &Entry| e.state == UpgradeState::Upgrading;
    let timed_out: Vec<ClusterId> = entries
        .iter()
        .filter(|(_, e)| upgrading(e) && e.started.is_some_and(|t| now >= t + config.timeout))
        .map(|(id, _)| id.clone())
        .collect();
    if halted || failures + timed_out.len() >= config.max_failures {
        return Plan {
            timed_out,
            start: Vec::new(),
        };
    }
    let limit = if canary_passed {
        config.max_concurrent
    } else {
        1
    };
    let in_progress = entries.values().filter(|e| upgrading(e)).count() - timed_out.len();
    let start = entries
        .iter()
        .filter(|(id, e)| {
            e.state == UpgradeState::Pending && e.retry_at.is_none_or(|t| now >= t) && connected(id)
        })
        .take(limit.saturating_sub(in_progress))
        .map(|(id, _)| id.clone())
        .collect();
    Plan { timed_out, start }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterStateLabel {
    cluster: String,
    state: &'static str,
}

/// Metrics of the fleet's upgrades.
#[derive(Default)]
struct UpgradeMetrics {
    /// Clusters in each upgrade state.
    states: Family<StateLabel, Gauge>,
    /// 1 for each cluster's upgrade state.
    cluster_state: Family<ClusterStateLabel, Gauge>,
    /// Upgrades whose agent did not come back.
    failures: Counter,
    /// Upgrades whose agent came back with the new image.
    successes: Counter,
    /// 1 while no new upgrade starts (too many failures).
    halted: Gauge,
}

/// A cluster's upgrade, for the API.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentUpgradeView {
    pub state: UpgradeState,
    /// The image the agent's Deployment ran when the hub last read it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The hub's `agent_image`.
    pub target: String,
    /// When the cluster entered this state (RFC 3339).
    pub since: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One cluster in the fleet's upgrade report.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterUpgrade {
    pub cluster: String,
    pub name: String,
    /// The agent version from its last handshake.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    pub upgrade: AgentUpgradeView,
}

/// The fleet's upgrades (`GET /api/v1/agent-upgrades`).
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetUpgrades {
    /// `agent_upgrades.enabled`.
    pub enabled: bool,
    /// The image agents are upgraded to (`agent_image`).
    pub target: String,
    /// No new upgrade starts until resumed.
    pub halted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub halt_reason: Option<String>,
    /// Failed upgrades since the hub started or was last resumed.
    pub failures: usize,
    pub max_failures: usize,
    pub max_concurrent: usize,
    /// Clusters per state.
    pub counts: BTreeMap<String, usize>,
    /// Every cluster the hub has read the agent Deployment of, by id.
    pub clusters: Vec<ClusterUpgrade>,
}

#[derive(Default)]
struct Fleet {
    entries: BTreeMap<ClusterId, Entry>,
    failures: usize,
    succeeded: usize,
    halted: Option<String>,
}

/// Reads of agent Deployments in flight at once (a hub restart reconnects the whole fleet).
const CONCURRENT_READS: usize = 64;
/// A Pending cluster whose patch failed (tunnel broke, apiserver error) is tried again after.
const RETRY_AFTER: Duration = Duration::from_secs(30);
const FIELD_MANAGER: &str = "shapeblock-hub-upgrades";

/// The fleet's agent upgrades.
pub struct Upgrades {
    config: UpgradeConfig,
    target: String,
    gateway: Arc<Gateway>,
    registry: Arc<Registry>,
    fleet: Mutex<Fleet>,
    metrics: UpgradeMetrics,
    reads: Semaphore,
}

impl Upgrades {
    pub fn new(
        config: UpgradeConfig,
        target: String,
        gateway: Arc<Gateway>,
        registry: Arc<Registry>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            target,
            gateway,
            registry,
            fleet: Mutex::default(),
            metrics: UpgradeMetrics::default(),
            reads: Semaphore::new(CONCURRENT_READS),
        })
    }

    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "shapeblock_agent_upgrades",
            "Clusters in each agent upgrade state",
            self.metrics.states.clone(),
        );
        registry.register(
            "shapeblock_agent_upgrade_state",
            "1 for the agent upgrade state of each cluster",
            self.metrics.cluster_state.clone(),
        );
        registry.register(
            "shapeblock_agent_upgrade_failures",
            "Agent upgrades whose agent did not come back",
            self.metrics.failures.clone(),
        );
        registry.register(
            "shapeblock_agent_upgrade_successes",
            "Agent upgrades whose agent came back with the new image",
            self.metrics.successes.clone(),
        );
        registry.register(
            "shapeblock_agent_upgrades_halted",
            "1 while no new agent upgrade starts (too many failures)",
            self.metrics.halted.clone(),
        );
        for state in UpgradeState::ALL {
            let _ = self.metrics.states.get_or_create(&StateLabel {
                state: state.label(),
            });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fleet> {
        self.fleet.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads each cluster's agent Deployment when its tunnel comes up, and starts and times
    /// out upgrades every second, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if !self.config.enabled {
            return;
        }
        let mut connects = self.gateway.subscribe_connects();
        for id in self.gateway.connected_clusters() {
            self.clone().read_later(id);
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                connected = connects.recv() => match connected {
                    Ok(id) => self.clone().read_later(id),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        for id in self.gateway.connected_clusters() {
                            self.clone().read_later(id);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => self.step(),
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Reads a cluster's agent Deployment again (after a pin changed), if it is connected.
    pub fn reread(self: &Arc<Self>, id: &str) {
        if self.config.enabled && self.gateway.status(id).connected {
            self.clone().read_later(id.to_string());
        }
    }

    /// Lets upgrades start again after a halt: the failure count starts over and failed
    /// clusters are read again (connected ones now, the others when they reconnect).
    pub fn resume(self: &Arc<Self>) {
        let failed: Vec<ClusterId> = {
            let mut fleet = self.lock();
            fleet.halted = None;
            fleet.failures = 0;
            self.metrics.halted.set(0);
            let failed: Vec<ClusterId> = fleet
                .entries
                .iter()
                .filter(|(_, e)| e.state == UpgradeState::Failed)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &failed {
                if let Some(entry) = fleet.entries.remove(id) {
                    self.count(id, entry.state, -1);
                }
            }
            failed
        };
        tracing::info!(failed = failed.len(), "agent upgrades resumed");
        for id in failed {
            self.reread(&id);
        }
    }

    fn read_later(self: Arc<Self>, id: ClusterId) {
        tokio::spawn(async move {
            let Ok(_permit) = self.reads.acquire().await else {
                return;
            };
            let deployments: Api<Deployment> = Api::namespaced(self.gateway.client(&id), NAMESPACE);
            let observed = match deployments.get(NAME).await {
                Ok(deployment) => agent_image(&deployment)
                    .map_or(Observed::NoContainer, |image| Observed::Image(image.into())),
                Err(kube::Error::Api(e)) if e.code == 404 => Observed::Missing,
                Err(kube::Error::Api(e)) if e.code == 403 => Observed::Forbidden(e.message),
                Err(err) => {
                    // Read again at the next connect.
                    tracing::debug!(cluster = %id, error = %err, "reading the agent's Deployment failed");
                    return;
                }
            };
            self.observe(&id, &observed);
        });
    }

    fn observe(&self, id: &str, observed: &Observed) {
        let Some(record) = self.registry.get(id) else {
            return;
        };
        let mut fleet = self.lock();
        let Some(change) = transition(
            fleet.entries.get(id),
            observed,
            record.agent_pinned,
            record.local,
            &self.target,
        ) else {
            return;
        };
        let image = match observed {
            Observed::Image(image) => Some(image.clone()),
            _ => None,
        };
        if change.succeeded {
            fleet.succeeded += 1;
            self.metrics.successes.inc();
            tracing::info!(cluster = %id, image = %self.target, "agent upgraded");
        }
        if change.failed {
            tracing::warn!(cluster = %id, reason = ?change.reason, "agent upgrade failed");
            self.fail(&mut fleet, id);
        }
        let entry = Entry::new(change.state, image, change.reason);
        self.set(&mut fleet, id, entry);
    }

    /// Counts a failure; halts at `max_failures`.
    fn fail(&self, fleet: &mut Fleet, id: &str) {
        fleet.failures += 1;
        self.metrics.failures.inc();
        if fleet.halted.is_none() && fleet.failures >= self.config.max_failures {
            let reason = format!(
                "{} agent upgrades failed (the last: cluster {id}); no new upgrade starts until \
                 POST /api/v1/agent-upgrades/resume",
                fleet.failures
            );
            tracing::error!(%reason, "agent upgrades halted");
            fleet.halted = Some(reason);
            self.metrics.halted.set(1);
        }
    }

    /// Counts `id` in (`by` 1) or out of (-1) `state`.
    fn count(&self, id: &str, state: UpgradeState, by: i64) {
        self.metrics
            .states
            .get_or_create(&StateLabel {
                state: state.label(),
            })
            .inc_by(by);
        let label = ClusterStateLabel {
            cluster: id.to_string(),
            state: state.label(),
        };
        if by > 0 {
            self.metrics.cluster_state.get_or_create(&label).set(1);
        } else {
            self.metrics.cluster_state.remove(&label);
        }
    }

    fn set(&self, fleet: &mut Fleet, id: &str, entry: Entry) {
        let state = entry.state;
        if let Some(old) = fleet.entries.insert(id.to_string(), entry) {
            self.count(id, old.state, -1);
        }
        self.count(id, state, 1);
    }

    /// Times out and starts upgrades per [`plan`].
    fn step(self: &Arc<Self>) {
        let now = Instant::now();
        let started: Vec<ClusterId> = {
            let mut fleet = self.lock();
            let plan = plan(
                &fleet.entries,
                |id| self.gateway.status(id).connected,
                now,
                &self.config,
                fleet.failures,
                fleet.halted.is_some(),
                fleet.succeeded > 0,
            );
            for id in &plan.timed_out {
                let image = fleet.entries.get(id).and_then(|e| e.image.clone());
                let reason = format!(
                    "the agent did not reconnect within {}s of its image being set to {}; the \
                     hub cannot reach its cluster: roll it back there with kubectl -n {NAMESPACE} \
                     rollout undo deployment/{NAME}",
                    self.config.timeout.as_secs(),
                    self.target
                );
                tracing::warn!(cluster = %id, %reason, "agent upgrade failed");
                self.fail(&mut fleet, id);
                self.set(
                    &mut fleet,
                    id,
                    Entry::new(UpgradeState::Failed, image, Some(reason)),
                );
            }
            for id in &plan.start {
                let image = fleet.entries.get(id).and_then(|e| e.image.clone());
                let mut entry = Entry::new(
                    UpgradeState::Upgrading,
                    image,
                    Some(format!("setting the agent's image to {}", self.target)),
                );
                entry.started = Some(now);
                self.set(&mut fleet, id, entry);
            }
            plan.start
        };
        for id in started {
            tracing::info!(cluster = %id, image = %self.target, "upgrading the agent");
            let upgrades = self.clone();
            tokio::spawn(async move { upgrades.patch(id).await });
        }
    }

    /// Sets the agent container's image (a strategic merge patch: containers merge by name).
    async fn patch(&self, id: ClusterId) {
        let deployments: Api<Deployment> = Api::namespaced(self.gateway.client(&id), NAMESPACE);
        let patch = serde_json::json!({"spec": {"template": {"spec": {"containers": [
            {"name": CONTAINER, "image": self.target}
        ]}}}});
        let result = deployments
            .patch(
                NAME,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Strategic(&patch),
            )
            .await;
        let mut fleet = self.lock();
        let Some(entry) = fleet.entries.get_mut(&id) else {
            return;
        };
        if entry.state != UpgradeState::Upgrading || entry.patched {
            return;
        }
        let image = entry.image.clone();
        let refused = |state, reason: String| Entry::new(state, image.clone(), Some(reason));
        let next = match result {
            Ok(_) => {
                entry.patched = true;
                entry.reason = Some(format!(
                    "image set to {}; waiting for the new agent's tunnel",
                    self.target
                ));
                return;
            }
            Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422 => refused(
                UpgradeState::NotPermitted,
                format!("the cluster refused the new image: {}", e.message),
            ),
            Err(kube::Error::Api(e)) if e.code == 404 => refused(
                UpgradeState::NotInstalled,
                format!("no Deployment {NAMESPACE}/{NAME}: {}", e.message),
            ),
            Err(err) => {
                let mut retry = refused(
                    UpgradeState::Pending,
                    format!(
                        "setting the image failed, trying again in {}s: {err}",
                        RETRY_AFTER.as_secs()
                    ),
                );
                retry.retry_at = Some(Instant::now() + RETRY_AFTER);
                retry
            }
        };
        tracing::warn!(cluster = %id, reason = ?next.reason, "agent upgrade not started");
        self.set(&mut fleet, &id, next);
    }

    /// Forgets a deleted cluster's upgrade (and its metric series).
    pub fn forget(&self, id: &str) {
        let mut fleet = self.lock();
        if let Some(entry) = fleet.entries.remove(id) {
            self.count(id, entry.state, -1);
        }
    }

    /// A cluster's upgrade, once the hub has read its agent's Deployment.
    pub fn view(&self, id: &str) -> Option<AgentUpgradeView> {
        let fleet = self.lock();
        fleet.entries.get(id).map(|e| self.entry_view(e))
    }

    fn entry_view(&self, entry: &Entry) -> AgentUpgradeView {
        AgentUpgradeView {
            state: entry.state,
            image: entry.image.clone(),
            target: self.target.clone(),
            since: entry.since.to_string(),
            reason: entry.reason.clone(),
        }
    }

    /// The fleet's upgrades.
    pub fn report(&self) -> FleetUpgrades {
        let fleet = self.lock();
        let mut counts: BTreeMap<String, usize> = UpgradeState::ALL
            .iter()
            .map(|s| (s.label().to_string(), 0))
            .collect();
        let clusters = fleet
            .entries
            .iter()
            .map(|(id, entry)| {
                *counts.entry(entry.state.label().to_string()).or_default() += 1;
                let record = self.registry.get(id);
                ClusterUpgrade {
                    cluster: id.clone(),
                    name: record.as_ref().map(|r| r.name.clone()).unwrap_or_default(),
                    agent_version: record.and_then(|r| r.agent_version),
                    upgrade: self.entry_view(entry),
                }
            })
            .collect();
        FleetUpgrades {
            enabled: self.config.enabled,
            target: self.target.clone(),
            halted: fleet.halted.is_some(),
            halt_reason: fleet.halted.clone(),
            failures: fleet.failures,
            max_failures: self.config.max_failures,
            max_concurrent: self.config.max_concurrent,
            counts,
            clusters,
        }
    }
}

/// The image of the agent container of the agent's Deployment.
fn agent_image(deployment: &Deployment) -> Option<&str> {
    deployment
        .spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == CONTAINER)?
        .image
        .as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: &str = "registry.example.com/agent:2";

    fn entry(state: UpgradeState) -> Entry {
        Entry::new(state, Some("registry.example.com/agent:1".into()), None)
    }

    fn image(i: &str) -> Observed {
        Observed::Image(i.into())
    }

    fn state_of(t: Option<Transition>) -> UpgradeState {
        t.expect("a transition").state
    }

    #[test]
    fn a_first_read_classifies_the_agent() {
        let read =
            |o: &Observed, pinned, local| state_of(transition(None, o, pinned, local, TARGET));
        assert_eq!(read(&image(TARGET), false, false), UpgradeState::UpToDate);
        assert_eq!(
            read(&image("registry.example.com/agent:1"), false, false),
            UpgradeState::Pending
        );
        assert_eq!(
            read(&image("registry.example.com/agent:1"), true, false),
            UpgradeState::Pinned
        );
        assert_eq!(
            read(&image("registry.example.com/agent:1"), false, true),
            UpgradeState::Pinned
        );
        assert_eq!(
            read(&Observed::Missing, false, false),
            UpgradeState::NotInstalled
        );
        assert_eq!(
            read(&Observed::NoContainer, false, false),
            UpgradeState::NotInstalled
        );
        let forbidden = transition(
            None,
            &Observed::Forbidden("no".into()),
            false,
            false,
            TARGET,
        )
        .unwrap();
        assert_eq!(forbidden.state, UpgradeState::NotPermitted);
        assert!(
            forbidden
                .reason
                .unwrap()
                .contains("apply its install manifest once more")
        );
    }

    #[test]
    fn an_upgrade_succeeds_when_the_agent_returns_with_the_new_image() {
        let mut upgrading = entry(UpgradeState::Upgrading);
        // The patch has not been accepted yet: a read changes nothing.
        assert_eq!(
            transition(
                Some(&upgrading),
                &image("registry.example.com/agent:1"),
                false,
                false,
                TARGET
            ),
            None
        );
        upgrading.patched = true;
        let back = transition(Some(&upgrading), &image(TARGET), false, false, TARGET).unwrap();
        assert_eq!(
            (back.state, back.succeeded, back.failed),
            (UpgradeState::UpToDate, true, false)
        );
        let reverted = transition(
            Some(&upgrading),
            &image("registry.example.com/agent:1"),
            false,
            false,
            TARGET,
        )
        .unwrap();
        assert_eq!(
            (reverted.state, reverted.succeeded, reverted.failed),
            (UpgradeState::Failed, false, true)
        );
        assert!(reverted.reason.unwrap().contains("changed back"));
    }

    #[test]
    fn a_failed_cluster_stays_failed_until_it_runs_the_target() {
        let failed = entry(UpgradeState::Failed);
        assert_eq!(
            transition(
                Some(&failed),
                &image("registry.example.com/agent:1"),
                false,
                false,
                TARGET
            ),
            None
        );
        assert_eq!(
            state_of(transition(
                Some(&failed),
                &image(TARGET),
                false,
                false,
                TARGET
            )),
            UpgradeState::UpToDate
        );
        assert_eq!(
            state_of(transition(
                Some(&failed),
                &image("registry.example.com/agent:1"),
                true,
                false,
                TARGET
            )),
            UpgradeState::Pinned
        );
    }

    fn config(max_concurrent: usize, max_failures: usize) -> UpgradeConfig {
        UpgradeConfig {
            enabled: true,
            max_concurrent,
            timeout: Duration::from_secs(60),
            max_failures,
        }
    }

    fn fleet(states: &[UpgradeState]) -> BTreeMap<ClusterId, Entry> {
        states
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("c{i:02}"), entry(*s)))
            .collect()
    }

    #[test]
    fn the_first_upgrade_runs_alone_then_waves_of_max_concurrent() {
        let now = Instant::now();
        let pending = fleet(&[UpgradeState::Pending; 8]);
        let canary = plan(&pending, |_| true, now, &config(3, 2), 0, false, false);
        assert_eq!(canary.start, ["c00"]);
        let wave = plan(&pending, |_| true, now, &config(3, 2), 0, false, true);
        assert_eq!(wave.start, ["c00", "c01", "c02"]);
        // Slots taken by upgrades in progress; disconnected clusters wait.
        let mut busy = pending.clone();
        busy.get_mut("c00").unwrap().state = UpgradeState::Upgrading;
        busy.get_mut("c00").unwrap().started = Some(now);
        let next = plan(&busy, |id| id != "c01", now, &config(3, 2), 0, false, true);
        assert_eq!(next.start, ["c02", "c03"]);
        // A cluster whose patch failed waits for its retry time.
        busy.get_mut("c02").unwrap().retry_at = Some(now + Duration::from_secs(5));
        let next = plan(&busy, |_| true, now, &config(3, 2), 0, false, true);
        assert_eq!(next.start, ["c01", "c03"]);
    }

    #[test]
    fn upgrades_time_out_and_too_many_failures_halt_the_fleet() {
        let start = Instant::now();
        let mut fleet = fleet(&[
            UpgradeState::Upgrading,
            UpgradeState::Pending,
            UpgradeState::Pending,
        ]);
        fleet.get_mut("c00").unwrap().started = Some(start);
        let later = start + Duration::from_secs(61);
        // One failure of two allowed: the slot frees and the next starts.
        let next = plan(&fleet, |_| true, later, &config(1, 2), 0, false, true);
        assert_eq!(next.timed_out, ["c00"]);
        assert_eq!(next.start, ["c01"]);
        // The second failure halts: nothing starts.
        let halted = plan(&fleet, |_| true, later, &config(1, 2), 1, false, true);
        assert_eq!(halted.timed_out, ["c00"]);
        assert!(halted.start.is_empty());
        let halted = plan(&fleet, |_| true, start, &config(1, 2), 0, true, true);
        assert!(halted.start.is_empty() && halted.timed_out.is_empty());
    }

    #[test]
    fn the_section_parses_with_defaults_and_rejects_unknown_keys() {
        let parsed: UpgradeConfig =
            serde_saphyr::from_str("max_concurrent: 2\ntimeout_seconds: 30\n").unwrap();
        assert_eq!(parsed.max_concurrent, 2);
        assert_eq!(parsed.timeout, Duration::from_secs(30));
        assert!(parsed.enabled);
        assert_eq!(parsed.max_failures, 3);
        assert!(serde_saphyr::from_str::<UpgradeConfig>("max_concurent: 2\n").is_err());
    }
}
