//! The relay: every status transition of every ShapeBlock resource in every cluster, and build
//! log lines, as numbered events for the ShapeBlock server ([`outbound`]) and for other
//! consumers of `/api/v1/events`.
//!
//! Events come from the controllers' own watches (a tap in front of each controller's cache,
//! so no extra watch), are numbered once by the [`Journal`], kept in a bounded ring for
//! resuming consumers, and folded into the current state of every resource for snapshots and
//! resyncs. Nothing is dropped silently: the outbound queue is bounded and a full queue makes
//! the producers wait (backpressure down to the watches, whose data then waits in the tunnel's
//! flow control), and the only events ever discarded are those queued while the ShapeBlock
//! server is unreachable, which the resync after reconnecting replaces, and build log lines,
//! which [`delivery`] re-reads from the cluster and re-sends.
//!
//! Depends on: crd, observed, secret, tunnel.
//! Never uses: axum (the relay knows nothing of the hub's HTTP API).

pub mod delivery;
pub mod logs;
pub mod outbound;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::watcher;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use tokio::sync::{Mutex, broadcast, mpsc};

use crate::crd::{App, AppBuild, Project, RuntimeStatus, Service};

/// One message: a status transition (seed operator shape, plus `id` and `cluster`) or a
/// build log line (`type: BUILD_LOG`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Position in the hub's event sequence: strictly increasing, for ordering, resuming and
    /// de-duplication.
    pub id: u64,
    /// `BUILD_LOG` for a log line; absent for a status update (as the first operator sent).
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub message_type: Option<&'static str>,
    pub cluster: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<&'static str>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// RFC 3339, UTC, when the hub saw the change.
    pub timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_tag: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Apps: how the App runs (`status.runtime`), as it was at the last change of its state
    /// or reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeStatus>,
    /// Set on events sent as part of a snapshot or resync (the current state, not a change).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resync: bool,
    /// BUILD_LOG: the AppBuild name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    /// BUILD_LOG: the container the line came from (`clone`, `build`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// BUILD_LOG: the line's number in its container's log, from 1. With `cluster`,
    /// `namespace`, `buildId` and `container` it is the line's position: the server keeps one
    /// line per position and drops repeats. Absent on the `final` message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// BUILD_LOG: one line, with its trailing newline; empty with `final` set at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// BUILD_LOG: the last message of a build's log.
    #[serde(rename = "final", skip_serializing_if = "std::ops::Not::not")]
    pub last: bool,
    /// BUILD_LOG `final`: how many lines each container's log has, so the server can tell
    /// whether it holds them all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line_counts: Option<BTreeMap<String, u64>>,
    /// BUILD_LOG: always present; `true` when the server may have had this message already
    /// (re-read from the cluster after a reconnect, or after a hub restart).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resent: Option<bool>,
}

impl Event {
    /// An event with no content yet: the id is given when the journal appends it.
    fn blank(cluster: &str, namespace: &str) -> Self {
        Self {
            id: 0,
            message_type: None,
            cluster: cluster.into(),
            resource_type: None,
            name: String::new(),
            namespace: namespace.into(),
            status: None,
            timestamp: now(),
            message: None,
            pod_name: None,
            app_name: None,
            image_tag: None,
            labels: BTreeMap::new(),
            runtime: None,
            resync: false,
            build_id: None,
            container: None,
            line: None,
            log: None,
            last: false,
            line_counts: None,
            resent: None,
        }
    }
}

/// What a resource's status says, as relayed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Status {
    pub status: String,
    pub message: Option<String>,
    pub pod_name: Option<String>,
    pub app_name: Option<String>,
    pub image_tag: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Apps: `status.runtime`. A change of its state or reason is a transition; a change of
    /// its counts or message alone is not (restarts would otherwise relay an event each).
    pub runtime: Option<RuntimeStatus>,
}

/// Whether two runtime statuses tell the same story: the same state and reason.
fn same_runtime(a: Option<&RuntimeStatus>, b: Option<&RuntimeStatus>) -> bool {
    a.map(|r| (r.state, r.reason.as_deref())) == b.map(|r| (r.state, r.reason.as_deref()))
}

/// A ShapeBlock kind whose status is relayed.
pub trait Relayed: kube::Resource<DynamicType = ()> {
    const TYPE: &'static str;
    /// The relayed status; None while the hub has written none.
    fn relayed(&self) -> Option<Status>;
}

fn phase_name(phase: impl std::fmt::Debug) -> String {
    format!("{phase:?}")
}

impl Relayed for Project {
    const TYPE: &'static str = "Project";
    fn relayed(&self) -> Option<Status> {
        let status = self.status.as_ref()?;
        Some(Status {
            status: phase_name(status.phase?),
            message: status.message.clone(),
            labels: BTreeMap::from([("shapeblock.io/project-id".into(), self.name_any())]),
            ..Default::default()
        })
    }
}

impl Relayed for App {
    const TYPE: &'static str = "App";
    fn relayed(&self) -> Option<Status> {
        let status = self.status.as_ref()?;
        Some(Status {
            status: phase_name(status.phase?),
            message: status.message.clone(),
            image_tag: status.current_image.clone(),
            runtime: status.runtime.clone(),
            ..Default::default()
        })
    }
}

impl Relayed for AppBuild {
    const TYPE: &'static str = "AppBuild";
    fn relayed(&self) -> Option<Status> {
        let status = self.status.as_ref()?;
        Some(Status {
            status: phase_name(status.phase?),
            message: status.message.clone(),
            pod_name: status.pod_name.clone(),
            app_name: Some(self.spec.app_name.clone()),
            image_tag: status.image_tag.clone(),
            labels: BTreeMap::from([("build.shapeblock.io/id".into(), self.name_any())]),
            runtime: None,
        })
    }
}

impl Relayed for Service {
    const TYPE: &'static str = "Service";
    fn relayed(&self) -> Option<Status> {
        let status = self.status.as_ref()?;
        Some(Status {
            status: phase_name(status.phase?),
            message: status.message.clone(),
            labels: BTreeMap::from([("service.shapeblock.io/id".into(), self.name_any())]),
            ..Default::default()
        })
    }
}

type Key = (String, &'static str, String, String);
/// Resources (namespace, name) seen during a watch's initial listing.
type Listed = HashSet<(String, String)>;

struct State {
    /// The id of this process's first event (see [`first_id`]).
    first_id: u64,
    next_id: u64,
    ring: VecDeque<Arc<Event>>,
    current: HashMap<Key, Arc<Event>>,
}

/// Counters and gauges of the relay (exported on `/metrics` under `shapeblock_relay_`).
#[derive(Default, Debug)]
pub struct JournalStats {
    /// Events numbered so far.
    pub events: Counter,
    /// Times a producer found the outbound queue full and waited.
    pub backpressure_waits: Counter,
    /// Events dropped from the outbound queue while the server was unreachable (replaced by
    /// the resync that follows a reconnect).
    pub replaced_by_resync: Counter,
    /// Connections made to the ShapeBlock server.
    pub connects: Counter,
    /// 1 while connected to the ShapeBlock server.
    pub connected: Gauge,
    /// Build log lines re-read from the cluster and sent again (after a reconnect).
    pub log_lines_resent: Counter,
    /// Build log lines the server may have missed and that could not be re-read (the pod or
    /// its log was gone, or the build ended longer ago than [`delivery::KEEP_ENDED`]).
    pub log_lines_lost: Counter,
}

impl JournalStats {
    /// Registers the relay's metrics.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let sub = registry.sub_registry_with_prefix("shapeblock_relay");
        sub.register(
            "events",
            "Status events and log lines numbered",
            self.events.clone(),
        );
        sub.register(
            "backpressure_waits",
            "Times a producer waited for the queue to the ShapeBlock server",
            self.backpressure_waits.clone(),
        );
        sub.register(
            "replaced_by_resync",
            "Events queued while the server was unreachable, replaced by the resync",
            self.replaced_by_resync.clone(),
        );
        sub.register(
            "connects",
            "Connections made to the ShapeBlock server",
            self.connects.clone(),
        );
        sub.register(
            "connected",
            "1 while connected to the ShapeBlock server",
            self.connected.clone(),
        );
        sub.register(
            "log_lines_resent",
            "Build log lines re-read from the cluster and sent again after a reconnect",
            self.log_lines_resent.clone(),
        );
        sub.register(
            "log_lines_lost",
            "Build log lines the server may have missed that could not be re-read",
            self.log_lines_lost.clone(),
        );
    }
}

/// Numbers events, keeps the recent ones and the current state, and hands them on.
pub struct Journal {
    /// Held from numbering an event until it is queued, so ids reach the queue in order.
    order: Mutex<()>,
    /// Never held while waiting for the queue: snapshots and cursors do not wait for a slow
    /// server (the relay itself takes a snapshot when it reconnects).
    state: Mutex<State>,
    capacity: usize,
    live: broadcast::Sender<Arc<Event>>,
    outbound: Option<mpsc::Sender<Arc<Event>>>,
    pub stats: JournalStats,
    /// Which build log lines the server surely has.
    pub deliveries: delivery::Deliveries,
    /// When this journal (this hub process) started: a build pod older than it may have had
    /// lines sent by the process before.
    pub started: jiff::Timestamp,
}

/// A cursor the journal cannot resume from without a gap: older than the events kept, from
/// before this hub process started, or ahead of the newest event.
#[derive(Debug, thiserror::Error)]
pub enum CursorUnusable {
    #[error("cursor {0} is older than the events kept (oldest {1}); start from a snapshot")]
    TooOld(u64, u64),
    #[error(
        "cursor {0} is from before this hub process started (its first event is {1}); start from a snapshot"
    )]
    BeforeStart(u64, u64),
    #[error("cursor {0} is ahead of the newest event ({1}); start from a snapshot")]
    Ahead(u64, u64),
}

/// The first event id of a journal made now: microseconds since the Unix epoch. Ids then grow
/// by one per event, so a restarted hub's ids stay above every id of the process before it
/// (as long as that process numbered fewer than a million events a second on average, and the
/// clock does not go back), and a consumer's cursor from before a restart is recognised and
/// answered with RESET, never taken for a position in the new numbering. Below 2^53 until the
/// year 2255, so the ids survive JSON numbers in JavaScript.
pub fn first_id() -> u64 {
    let micros = jiff::Timestamp::now().as_microsecond();
    u64::try_from(micros).unwrap_or(1).max(1)
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

impl Journal {
    /// A journal keeping `capacity` recent events, feeding `outbound` when given.
    pub fn new(capacity: usize, outbound: Option<mpsc::Sender<Arc<Event>>>) -> Arc<Self> {
        Self::starting_at(first_id(), capacity, outbound)
    }

    /// A journal whose first event has id `first`.
    pub fn starting_at(
        first: u64,
        capacity: usize,
        outbound: Option<mpsc::Sender<Arc<Event>>>,
    ) -> Arc<Self> {
        let first = first.max(1);
        let (live, _) = broadcast::channel(1024);
        Arc::new(Self {
            order: Mutex::new(()),
            state: Mutex::new(State {
                first_id: first,
                next_id: first,
                ring: VecDeque::with_capacity(capacity.min(4096)),
                current: HashMap::new(),
            }),
            capacity: capacity.max(1),
            live,
            outbound,
            stats: JournalStats::default(),
            deliveries: Default::default(),
            started: jiff::Timestamp::now(),
        })
    }

    /// Numbers an event, records it and hands it on; the outbound order is the id order.
    /// Waits while the outbound queue is full.
    async fn append(&self, mut event: Event, key: Option<Key>, remove: bool) {
        let _order = self.order.lock().await;
        let event = {
            let mut state = self.state.lock().await;
            event.id = state.next_id;
            state.next_id += 1;
            let event = Arc::new(event);
            if let Some(key) = key {
                if remove {
                    state.current.remove(&key);
                } else {
                    state.current.insert(key, event.clone());
                }
            }
            if event.message_type.is_none() {
                if state.ring.len() == self.capacity {
                    state.ring.pop_front();
                }
                state.ring.push_back(event.clone());
            }
            event
        };
        self.stats.events.inc();
        let _ = self.live.send(event.clone());
        if let Some(outbound) = &self.outbound {
            match outbound.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.stats.backpressure_waits.inc();
                    let _ = outbound.send(event).await;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Records a resource's status when it differs from the last one relayed.
    pub async fn status(
        &self,
        cluster: &str,
        kind: &'static str,
        namespace: &str,
        name: &str,
        status: Status,
    ) {
        let key: Key = (cluster.into(), kind, namespace.into(), name.into());
        {
            let state = self.state.lock().await;
            if let Some(last) = state.current.get(&key)
                && last.status.as_deref() == Some(status.status.as_str())
                && last.message == status.message
                && last.pod_name == status.pod_name
                && last.image_tag == status.image_tag
                && same_runtime(last.runtime.as_ref(), status.runtime.as_ref())
            {
                return;
            }
        }
        let event = Event {
            resource_type: Some(kind),
            name: name.into(),
            status: Some(status.status),
            message: status.message,
            pod_name: status.pod_name,
            app_name: status.app_name,
            image_tag: status.image_tag,
            labels: status.labels,
            runtime: status.runtime,
            ..Event::blank(cluster, namespace)
        };
        self.append(event, Some(key), false).await;
    }

    /// Records that a resource is gone.
    pub async fn deleted(&self, cluster: &str, kind: &'static str, namespace: &str, name: &str) {
        let key: Key = (cluster.into(), kind, namespace.into(), name.into());
        if !self.state.lock().await.current.contains_key(&key) {
            return;
        }
        let event = Event {
            resource_type: Some(kind),
            name: name.into(),
            status: Some("Deleted".into()),
            ..Event::blank(cluster, namespace)
        };
        self.append(event, Some(key), true).await;
    }

    /// After a full listing of a kind in a cluster: resources relayed before but absent now
    /// were deleted while the watch was down.
    pub async fn listed(
        &self,
        cluster: &str,
        kind: &'static str,
        present: &HashSet<(String, String)>,
    ) {
        let gone: Vec<Key> = {
            let state = self.state.lock().await;
            state
                .current
                .keys()
                .filter(|(c, k, ns, name)| {
                    c == cluster && *k == kind && !present.contains(&(ns.clone(), name.clone()))
                })
                .cloned()
                .collect()
        };
        for (cluster, kind, ns, name) in gone {
            self.deleted(&cluster, kind, &ns, &name).await;
        }
    }

    /// Relays one build log line at its position.
    pub async fn log_line(&self, at: &delivery::LogLine<'_>, text: String, resent: bool) {
        let event = Event {
            message_type: Some("BUILD_LOG"),
            build_id: Some(at.build.build.clone()),
            container: Some(at.container.into()),
            line: Some(at.line),
            log: Some(text),
            resent: Some(resent),
            ..Event::blank(&at.build.cluster, &at.build.namespace)
        };
        self.append(event, None, false).await;
    }

    /// Relays the end of a build's log, with the number of lines of each container.
    pub async fn log_end(
        &self,
        build: &delivery::BuildKey,
        line_counts: BTreeMap<String, u64>,
        resent: bool,
    ) {
        let event = Event {
            message_type: Some("BUILD_LOG"),
            build_id: Some(build.build.clone()),
            container: Some(String::new()),
            log: Some(String::new()),
            last: true,
            line_counts: Some(line_counts),
            resent: Some(resent),
            ..Event::blank(&build.cluster, &build.namespace)
        };
        self.append(event, None, false).await;
    }

    /// The current state of every resource (as resync events) and the last id it covers.
    pub async fn snapshot(&self) -> (Vec<Arc<Event>>, u64) {
        let state = self.state.lock().await;
        let mut events: Vec<Arc<Event>> = state
            .current
            .values()
            .map(|e| {
                Arc::new(Event {
                    resync: true,
                    ..(**e).clone()
                })
            })
            .collect();
        events.sort_by_key(|e| e.id);
        (events, state.next_id - 1)
    }

    /// Status events after `cursor`, oldest first, and the newest id; an error when the events
    /// after `cursor` are not all here.
    pub async fn since(&self, cursor: u64) -> Result<(Vec<Arc<Event>>, u64), CursorUnusable> {
        let state = self.state.lock().await;
        let last = state.next_id - 1;
        if cursor > last {
            return Err(CursorUnusable::Ahead(cursor, last));
        }
        if cursor + 1 < state.first_id {
            return Err(CursorUnusable::BeforeStart(cursor, state.first_id));
        }
        if let Some(oldest) = state.ring.front()
            && cursor + 1 < oldest.id
        {
            return Err(CursorUnusable::TooOld(cursor, oldest.id));
        }
        Ok((
            state
                .ring
                .iter()
                .filter(|e| e.id > cursor)
                .cloned()
                .collect(),
            last,
        ))
    }

    /// Live events from now on (a consumer too slow for 1,024 events is told it lagged).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.live.subscribe()
    }

    /// Feeds a controller's watch events to the journal for one cluster and kind; returns the
    /// events unchanged. Waits (backpressure) when the relay is behind.
    pub fn tap<K>(
        self: &Arc<Self>,
        cluster: String,
    ) -> impl FnMut(watcher::Event<K>) -> futures_util::future::BoxFuture<'static, watcher::Event<K>>
    + Send
    + 'static
    where
        K: Relayed + Clone + Send + Sync + 'static,
    {
        let journal = self.clone();
        let listing: Arc<std::sync::Mutex<Option<Listed>>> = Arc::default();
        move |event| {
            let journal = journal.clone();
            let cluster = cluster.clone();
            let listing = listing.clone();
            Box::pin(async move {
                match &event {
                    watcher::Event::Init => {
                        *listing.lock().unwrap_or_else(|e| e.into_inner()) = Some(HashSet::new());
                    }
                    watcher::Event::InitApply(obj) | watcher::Event::Apply(obj) => {
                        let ns = obj.namespace().unwrap_or_default();
                        let name = obj.name_any();
                        if matches!(event, watcher::Event::InitApply(_))
                            && let Some(seen) =
                                listing.lock().unwrap_or_else(|e| e.into_inner()).as_mut()
                        {
                            seen.insert((ns.clone(), name.clone()));
                        }
                        if let Some(status) = obj.relayed() {
                            journal.status(&cluster, K::TYPE, &ns, &name, status).await;
                        }
                    }
                    watcher::Event::Delete(obj) => {
                        let ns = obj.namespace().unwrap_or_default();
                        journal
                            .deleted(&cluster, K::TYPE, &ns, &obj.name_any())
                            .await;
                    }
                    watcher::Event::InitDone => {
                        let seen = listing.lock().unwrap_or_else(|e| e.into_inner()).take();
                        if let Some(seen) = seen {
                            journal.listed(&cluster, K::TYPE, &seen).await;
                        }
                    }
                }
                event
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: &str) -> Status {
        Status {
            status: phase.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn transitions_are_numbered_once_and_repeats_are_skipped() {
        let (tx, mut rx) = mpsc::channel(16);
        let journal = Journal::starting_at(1, 100, Some(tx));
        journal
            .status("c1", "AppBuild", "ns", "b1", status("Pending"))
            .await;
        journal
            .status("c1", "AppBuild", "ns", "b1", status("Pending"))
            .await;
        journal
            .status("c1", "AppBuild", "ns", "b1", status("Building"))
            .await;
        journal
            .status("c2", "AppBuild", "ns", "b1", status("Pending"))
            .await;
        let ids: Vec<(u64, String)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| (e.id, format!("{}:{}", e.cluster, e.status.clone().unwrap())))
            .collect();
        assert_eq!(
            ids,
            [
                (1, "c1:Pending".into()),
                (2, "c1:Building".into()),
                (3, "c2:Pending".into())
            ]
        );
        let (snapshot, mark) = journal.snapshot().await;
        assert_eq!(mark, 3);
        assert_eq!(snapshot.len(), 2);
        assert!(snapshot.iter().all(|e| e.resync));
        assert_eq!(snapshot[0].status.as_deref(), Some("Building"));
    }

    #[tokio::test]
    async fn cursors_resume_or_say_they_are_too_old() {
        let journal = Journal::starting_at(1, 3, None);
        for phase in ["A", "B", "C", "D", "E"] {
            journal.status("c", "App", "ns", "a", status(phase)).await;
        }
        let (events, last) = journal.since(3).await.unwrap();
        assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(last, 5);
        assert!(journal.since(0).await.is_err(), "ids 1 and 2 were evicted");
        assert!(
            journal.since(2).await.is_ok(),
            "3 is the oldest kept: resuming after 2 is whole"
        );
        assert!(
            matches!(journal.since(6).await, Err(CursorUnusable::Ahead(6, 5))),
            "a cursor ahead of the newest event is never accepted"
        );
    }

    #[tokio::test]
    async fn ids_continue_above_the_previous_process_and_its_cursors_are_refused() {
        let before = Journal::new(10, None);
        before.status("c", "App", "ns", "a", status("A")).await;
        let (_, cursor) = before.snapshot().await;
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        // The hub restarts: a new journal, nothing relayed yet.
        let after = Journal::new(10, None);
        assert!(
            matches!(
                after.since(cursor).await,
                Err(CursorUnusable::BeforeStart(..))
            ),
            "nothing relayed yet in the new process, and still the old cursor is refused"
        );
        after.status("c", "App", "ns", "a", status("B")).await;
        let (events, newest) = after.snapshot().await;
        assert!(events[0].id > cursor, "{} after {cursor}", events[0].id);
        assert!(
            matches!(
                after.since(cursor).await,
                Err(CursorUnusable::BeforeStart(..))
            ),
            "a cursor from the previous process gets RESET, not a silent gap"
        );
        assert!(after.since(newest).await.is_ok());
        assert!(newest < 1 << 53, "ids fit a JavaScript number");
    }

    #[tokio::test]
    async fn deletions_and_relists_remove_state() {
        let journal = Journal::starting_at(1, 10, None);
        journal.status("c", "App", "ns", "a", status("Ready")).await;
        journal.status("c", "App", "ns", "b", status("Ready")).await;
        journal.deleted("c", "App", "ns", "a").await;
        journal.deleted("c", "App", "ns", "a").await; // once only
        journal.listed("c", "App", &HashSet::new()).await; // b vanished while the watch was down
        let (events, _) = journal.since(0).await.unwrap();
        let seen: Vec<String> = events
            .iter()
            .map(|e| format!("{}:{}", e.name, e.status.clone().unwrap()))
            .collect();
        assert_eq!(seen, ["a:Ready", "b:Ready", "a:Deleted", "b:Deleted"]);
        assert!(journal.snapshot().await.0.is_empty());
    }

    #[tokio::test]
    async fn a_full_queue_makes_producers_wait_instead_of_dropping() {
        let (tx, mut rx) = mpsc::channel(2);
        let journal = Journal::starting_at(1, 100, Some(tx));
        let producer = {
            let journal = journal.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    journal
                        .status("c", "App", "ns", "a", status(&format!("P{i}")))
                        .await;
                }
            })
        };
        let mut received = Vec::new();
        while received.len() < 10 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            received.push(rx.recv().await.unwrap().id);
        }
        producer.await.unwrap();
        assert_eq!(received, (1..=10).collect::<Vec<_>>());
        assert!(journal.stats.backpressure_waits.get() > 0);
    }

    #[tokio::test]
    async fn snapshots_do_not_wait_for_a_full_queue() {
        // The relay takes a snapshot when it reconnects, while a producer may be waiting for
        // room in the queue only the relay empties: that must not deadlock.
        let (tx, mut rx) = mpsc::channel(1);
        let journal = Journal::starting_at(1, 100, Some(tx));
        journal.status("c", "App", "ns", "a", status("A")).await;
        let producer = {
            let journal = journal.clone();
            tokio::spawn(async move { journal.status("c", "App", "ns", "a", status("B")).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!producer.is_finished(), "the producer waits for room");
        let (snapshot, mark) =
            tokio::time::timeout(std::time::Duration::from_secs(2), journal.snapshot())
                .await
                .expect("a snapshot while the queue is full");
        assert_eq!(mark, 2);
        assert_eq!(snapshot[0].status.as_deref(), Some("B"));
        assert_eq!(rx.recv().await.unwrap().id, 1);
        producer.await.unwrap();
        assert_eq!(rx.recv().await.unwrap().id, 2);
    }

    #[tokio::test]
    async fn runtime_state_and_reason_changes_are_transitions_and_counts_are_not() {
        use crate::crd::RuntimeState;
        let journal = Journal::starting_at(1, 100, None);
        let app = |state: RuntimeState, reason: Option<&str>, restarts: i32| Status {
            status: "Ready".into(),
            runtime: Some(RuntimeStatus {
                state,
                reason: reason.map(Into::into),
                restarts,
                ..Default::default()
            }),
            ..Default::default()
        };
        for status in [
            app(RuntimeState::Running, None, 0),
            app(RuntimeState::Down, Some("CrashLoopBackOff"), 1),
            app(RuntimeState::Down, Some("CrashLoopBackOff"), 2),
            app(RuntimeState::Down, Some("OOMKilled"), 3),
            app(RuntimeState::Running, None, 3),
        ] {
            journal.status("c", "App", "ns", "web", status).await;
        }
        let (events, _) = journal.since(0).await.unwrap();
        let seen: Vec<(RuntimeState, Option<String>, i32)> = events
            .iter()
            .map(|e| {
                let r = e.runtime.clone().unwrap();
                (r.state, r.reason, r.restarts)
            })
            .collect();
        assert_eq!(
            seen,
            [
                (RuntimeState::Running, None, 0),
                (RuntimeState::Down, Some("CrashLoopBackOff".into()), 1),
                (RuntimeState::Down, Some("OOMKilled".into()), 3),
                (RuntimeState::Running, None, 3),
            ]
        );
        let json = serde_json::to_value(&*events[1]).unwrap();
        assert_eq!(json["runtime"]["state"], "Down");
        assert_eq!(json["runtime"]["reason"], "CrashLoopBackOff");
    }

    #[test]
    fn messages_keep_the_first_operators_shape() {
        let event = Event {
            id: 7,
            resource_type: Some("AppBuild"),
            name: "web-1".into(),
            status: Some("Building".into()),
            timestamp: "2026-11-26T12:00:00Z".into(),
            pod_name: Some("web-1-build-x".into()),
            app_name: Some("web".into()),
            labels: BTreeMap::from([("build.shapeblock.io/id".into(), "web-1".into())]),
            ..Event::blank("c1", "shop")
        };
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            serde_json::json!({"id": 7, "cluster": "c1", "resourceType": "AppBuild", "name": "web-1",
                "namespace": "shop", "status": "Building", "timestamp": "2026-11-26T12:00:00Z",
                "podName": "web-1-build-x", "appName": "web",
                "labels": {"build.shapeblock.io/id": "web-1"}})
        );
    }
}
