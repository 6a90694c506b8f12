//! Build log lines that reach the ShapeBlock server even across its outages: every line has a
//! position (cluster, namespace, build, container, line number from 1); the hub learns which
//! lines the server surely has, and after a reconnect re-reads the others from the cluster and
//! sends them again with `resent: true`. The server keeps one line per position.
//!
//! Acknowledgement needs nothing from the server but RFC 6455: the outbound session sends a
//! websocket ping after a batch of lines, and the pong proves the server read every frame sent
//! before that ping (one TCP stream, frames in order), so the lines before it are acknowledged
//! ([`Acks`]). The hub keeps no log text: per build only the pod, and per container the number
//! of lines produced and acknowledged ([`Deliveries`]); what is missing is read again from the
//! build pod's container log through the tunnel.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams};

use super::{Event, Journal};
use crate::tunnel::Backoff;

/// How long after a build's log ended the lines the server may have missed are still re-sent
/// after a reconnect. The record is a few hundred bytes per build; past this, an outage of the
/// server that long has outlived the builds' pods anyway (Jobs are cleaned up).
pub const KEEP_ENDED: Duration = Duration::from_secs(3600);
/// After a hub restart, the logs of builds whose build ended less than this long before are
/// re-sent from their first line (the restarted hub does not know what the server got).
pub const RESEND_AFTER_RESTART: Duration = Duration::from_secs(600);
/// How long a build log whose reads keep failing (with no line read) is retried before its end
/// is relayed as it stands: long enough for an agent to come back, bounded so a cluster that
/// is gone for good does not keep a follower forever.
pub const FOLLOW_RETRIES_FOR: Duration = Duration::from_secs(900);
/// Lines sent between acknowledgement pings at most, while lines keep coming.
const LINES_PER_PING: usize = 1000;
/// Pings awaiting their pong at most; beyond, lines wait for the next ping to be acknowledged.
const MAX_PENDING_PINGS: usize = 16;

/// One build's log.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BuildKey {
    pub cluster: String,
    pub namespace: String,
    /// The AppBuild's name.
    pub build: String,
}

/// A line's position.
#[derive(Clone, Copy, Debug)]
pub struct LogLine<'a> {
    pub build: &'a BuildKey,
    pub container: &'a str,
    /// From 1 in each container.
    pub line: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    /// Lines handed to the journal.
    produced: u64,
    /// Lines the server surely has (every line up to this one).
    acked: u64,
}

struct BuildLog {
    pods: Api<Pod>,
    pod: String,
    /// In the order the containers ran.
    containers: Vec<(String, Progress)>,
    /// When the final message was produced.
    ended: Option<Instant>,
    end_acked: bool,
    /// Held by the follower while it numbers and queues a line, and by a re-send for its whole
    /// run: re-sent lines go out before any newer line, so the acknowledged prefix grows.
    gate: Arc<tokio::sync::Mutex<()>>,
    resend: Option<tokio::task::AbortHandle>,
}

impl BuildLog {
    fn lines_acked(&self) -> bool {
        self.containers.iter().all(|(_, p)| p.acked >= p.produced)
    }

    fn unacked_lines(&self) -> u64 {
        self.containers
            .iter()
            .map(|(_, p)| p.produced.saturating_sub(p.acked))
            .sum()
    }

    fn progress(&mut self, container: &str) -> &mut Progress {
        let at = match self.containers.iter().position(|(c, _)| c == container) {
            Some(at) => at,
            None => {
                self.containers
                    .push((container.to_string(), Progress::default()));
                self.containers.len() - 1
            }
        };
        &mut self.containers[at].1
    }

    fn line_counts(&self) -> BTreeMap<String, u64> {
        self.containers
            .iter()
            .map(|(c, p)| (c.clone(), p.produced))
            .collect()
    }
}

/// Per build log: the pod, and per container the lines produced and acknowledged.
#[derive(Default)]
pub struct Deliveries {
    builds: Mutex<HashMap<BuildKey, BuildLog>>,
}

impl Deliveries {
    fn lock(&self) -> MutexGuard<'_, HashMap<BuildKey, BuildLog>> {
        self.builds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a build log being followed from `pod`; returns its gate.
    fn follow(&self, key: &BuildKey, pods: Api<Pod>, pod: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut builds = self.lock();
        expire(&mut builds);
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        builds.insert(
            key.clone(),
            BuildLog {
                pods,
                pod: pod.to_string(),
                containers: Vec::new(),
                ended: None,
                end_acked: false,
                gate: gate.clone(),
                resend: None,
            },
        );
        gate
    }

    fn produced(&self, key: &BuildKey, container: &str, line: u64) {
        if let Some(build) = self.lock().get_mut(key) {
            let progress = build.progress(container);
            progress.produced = progress.produced.max(line);
        }
    }

    fn ended(&self, key: &BuildKey) -> BTreeMap<String, u64> {
        let mut builds = self.lock();
        let Some(build) = builds.get_mut(key) else {
            return BTreeMap::new();
        };
        build.ended = Some(Instant::now());
        build.line_counts()
    }

    /// The last line of a container the server surely has (0: none).
    pub fn acked(&self, key: &BuildKey, container: &str) -> u64 {
        self.lock()
            .get(key)
            .and_then(|b| b.containers.iter().find(|(c, _)| c == container))
            .map_or(0, |(_, p)| p.acked)
    }

    fn ack(&self, key: &BuildKey, container: Option<&str>, through: u64) {
        let mut builds = self.lock();
        let Some(build) = builds.get_mut(key) else {
            return;
        };
        match container {
            Some(container) => {
                let progress = build.progress(container);
                progress.acked = progress.acked.max(through);
            }
            None => build.end_acked = true,
        }
        if build.end_acked && build.lines_acked() {
            builds.remove(key);
        }
    }

    /// Build logs tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }
}

/// Drops the records of logs that ended more than [`KEEP_ENDED`] ago; returns how many of
/// their lines were not acknowledged.
fn expire(builds: &mut HashMap<BuildKey, BuildLog>) -> u64 {
    let mut unacked = 0;
    builds.retain(|_, build| {
        let keep = build.ended.is_none_or(|at| at.elapsed() < KEEP_ENDED);
        if !keep {
            unacked += build.unacked_lines();
        }
        keep
    });
    unacked
}

impl Journal {
    /// After a (re)connect: re-sends, from the cluster, what the server may have missed of every
    /// build log, each build in its own task (replacing one still running from an earlier
    /// connection). Records of logs that ended more than [`KEEP_ENDED`] ago are dropped.
    pub fn resend_unacknowledged(self: &Arc<Self>) {
        let mut builds = self.deliveries.lock();
        self.stats.log_lines_lost.inc_by(expire(&mut builds));
        for (key, build) in builds.iter_mut() {
            if build.lines_acked() && (build.ended.is_none() || build.end_acked) {
                continue;
            }
            if let Some(previous) = build.resend.take() {
                previous.abort();
            }
            let task = tokio::spawn(resend(self.clone(), key.clone(), build.gate.clone()));
            build.resend = Some(task.abort_handle());
        }
    }
}

/// Why a re-read failed.
enum ReadFailed {
    /// The pod or its container's log is gone: retrying cannot help.
    Gone(kube::Error),
    Transient(kube::Error),
}

/// Re-reads one container's log and queues lines `from + 1 ..= to`, moving `from` as it goes.
async fn resend_container(
    journal: &Journal,
    key: &BuildKey,
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    from: &mut u64,
    to: u64,
) -> Result<(), ReadFailed> {
    let params = LogParams {
        container: Some(container.to_string()),
        ..Default::default()
    };
    let stream = match pods.log_stream(pod, &params).await {
        Ok(stream) => stream,
        Err(kube::Error::Api(e)) if e.code == 400 || e.code == 404 => {
            return Err(ReadFailed::Gone(kube::Error::Api(e)));
        }
        Err(e) => return Err(ReadFailed::Transient(e)),
    };
    // The same splitting into lines as the follower's, so numbers match.
    let mut lines = stream
        .lines()
        .skip(usize::try_from(*from).unwrap_or(usize::MAX));
    while *from < to {
        let Some(text) = lines.next().await else {
            // Fewer lines than were followed: the log was rotated or cut; nothing more to read.
            return Err(ReadFailed::Gone(kube::Error::Service(
                format!("the log of {container} has only {from} of {to} lines now").into(),
            )));
        };
        let text = text.map_err(|e| ReadFailed::Transient(kube::Error::ReadEvents(e)))?;
        let line = *from + 1;
        let at = LogLine {
            build: key,
            container,
            line,
        };
        journal.log_line(&at, format!("{text}\n"), true).await;
        journal.stats.log_lines_resent.inc();
        *from = line;
    }
    Ok(())
}

/// One build's re-send: holds the gate (the follower waits), re-reads each container with lines
/// not acknowledged, then sends the final message again if the log had ended.
async fn resend(journal: Arc<Journal>, key: BuildKey, gate: Arc<tokio::sync::Mutex<()>>) {
    let _gate = gate.lock_owned().await;
    let (pods, pod, containers, ended, end_acked) = {
        let builds = journal.deliveries.lock();
        let Some(build) = builds.get(&key) else {
            return;
        };
        (
            build.pods.clone(),
            build.pod.clone(),
            build.containers.clone(),
            build.ended.is_some(),
            build.end_acked,
        )
    };
    let mut resent_any = false;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    for (container, progress) in &containers {
        let mut from = progress.acked;
        resent_any |= from < progress.produced;
        while from < progress.produced {
            match resend_container(
                &journal,
                &key,
                &pods,
                &pod,
                container,
                &mut from,
                progress.produced,
            )
            .await
            {
                Ok(()) => {}
                Err(ReadFailed::Gone(error)) => {
                    let lost = progress.produced - from;
                    journal.stats.log_lines_lost.inc_by(lost);
                    tracing::warn!(cluster = %key.cluster, namespace = %key.namespace,
                        build = %key.build, %container, lost, %error,
                        "build log lines the server may have missed cannot be re-read");
                    // Nothing will bring them back: count them as delivered, so the record can go.
                    journal
                        .deliveries
                        .ack(&key, Some(container.as_str()), progress.produced);
                    break;
                }
                Err(ReadFailed::Transient(error)) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(cluster = %key.cluster, namespace = %key.namespace,
                        build = %key.build, %container, %error, retry_in = ?wait,
                        "re-reading a build log failed");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
    if ended && (resent_any || !end_acked) {
        let counts = containers
            .iter()
            .map(|(c, p)| (c.clone(), p.produced))
            .collect();
        journal.log_end(&key, counts, true).await;
    }
}

/// Follows a build pod's log and relays every line at its position, then the final message.
/// Lines of a pod created before this hub process started are marked `resent` (the process
/// before may have sent them).
///
/// A read that fails (the tunnel dropped, the agent restarted) is read again from the first
/// line of each container, after a backoff, and only the lines after those already relayed
/// go on: a dropped connection would otherwise end the log early, with the final message
/// counting only the lines read so far, and nothing would ever re-send the rest. Only a pod
/// that is gone, or [`FOLLOW_RETRIES_FOR`] of failures in a row, ends it early; its final
/// message then counts the lines relayed, and the warning says why.
pub async fn relay_build_log(journal: Arc<Journal>, pods: Api<Pod>, key: BuildKey, pod: String) {
    let gate = journal.deliveries.follow(&key, pods.clone(), &pod);
    let resent = match pods.get(&pod).await {
        Ok(found) => found
            .metadata
            .creation_timestamp
            .is_some_and(|created| created.0 < journal.started),
        Err(_) => false, // follow_pod reports it
    };
    // Per container, the lines relayed so far (the position of the last one).
    let mut relayed: HashMap<String, u64> = HashMap::new();
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut failing_since: Option<Instant> = None;
    loop {
        // This read's own count: the same splitting into lines gives the same numbers.
        let mut read: HashMap<String, u64> = HashMap::new();
        let mut progressed = false;
        let result = super::logs::follow_pod(&pods, &pod, true, |container, text| {
            let line = read.entry(container.clone()).or_default();
            *line += 1;
            let line = *line;
            let last = relayed.entry(container.clone()).or_default();
            let new = line > *last;
            if new {
                *last = line;
                progressed = true;
            }
            let (journal, key, gate) = (journal.clone(), key.clone(), gate.clone());
            async move {
                if !new {
                    return true; // relayed by an earlier read
                }
                let _gate = gate.lock().await;
                journal.deliveries.produced(&key, &container, line);
                let at = LogLine {
                    build: &key,
                    container: &container,
                    line,
                };
                journal.log_line(&at, text, resent).await;
                true
            }
        })
        .await;
        let error = match result {
            Ok(()) => break,
            Err(error) => error,
        };
        if progressed {
            failing_since = None;
            backoff.reset();
        }
        let since = *failing_since.get_or_insert_with(Instant::now);
        let gone = matches!(&error, kube::Error::Api(e) if e.code == 404);
        if gone || since.elapsed() >= FOLLOW_RETRIES_FOR {
            tracing::warn!(cluster = %key.cluster, namespace = %key.namespace, build = %key.build,
                %error, "following the build log failed; its end is relayed as it stands");
            break;
        }
        let wait = backoff.next_delay();
        tracing::warn!(cluster = %key.cluster, namespace = %key.namespace, build = %key.build,
            %error, retry_in = ?wait, "following the build log failed; reading it again");
        tokio::time::sleep(wait).await;
    }
    let _gate = gate.lock().await;
    let counts = journal.deliveries.ended(&key);
    journal.log_end(&key, counts, resent).await;
}

type Stream = (BuildKey, String);

/// One connection's view of acknowledgements (the outbound session's): what it sent in order,
/// and which pings are awaiting their pong.
#[derive(Default)]
pub struct Acks {
    /// Per build and container, the last line sent in order on this connection (starting from
    /// the acknowledged one): a line out of order (an old one still queued) moves nothing.
    sent: HashMap<BuildKey, HashMap<String, u64>>,
    /// What the next ping's pong acknowledges.
    lines: HashMap<Stream, u64>,
    ends: Vec<BuildKey>,
    /// Pings sent, oldest first, with what their pong acknowledges.
    pending: VecDeque<(u64, HashMap<Stream, u64>, Vec<BuildKey>)>,
    next_ping: u64,
    since_ping: usize,
}

impl Acks {
    /// Notes an event written to the connection.
    pub fn sent(&mut self, deliveries: &Deliveries, event: &Event) {
        let (Some("BUILD_LOG"), Some(build), Some(container)) = (
            event.message_type,
            event.build_id.as_ref(),
            event.container.as_ref(),
        ) else {
            return;
        };
        let key = BuildKey {
            cluster: event.cluster.clone(),
            namespace: event.namespace.clone(),
            build: build.clone(),
        };
        self.since_ping += 1;
        if event.last {
            self.sent.remove(&key);
            self.ends.push(key);
            return;
        }
        let Some(line) = event.line else {
            return;
        };
        let containers = self.sent.entry(key.clone()).or_default();
        let through = containers
            .entry(container.clone())
            .or_insert_with(|| deliveries.acked(&key, container));
        if line == *through + 1 {
            *through = line;
            self.lines.insert((key, container.clone()), line);
        }
    }

    /// Whether to send an acknowledgement ping now: lines were sent since the last one, and
    /// `idle` (nothing else queued) or many lines were.
    pub fn wants_ping(&self, idle: bool) -> bool {
        self.since_ping > 0
            && (idle || self.since_ping >= LINES_PER_PING)
            && self.pending.len() < MAX_PENDING_PINGS
    }

    /// The payload of the next ping, which acknowledges what was sent before it.
    pub fn ping(&mut self) -> Vec<u8> {
        let seq = self.next_ping;
        self.next_ping += 1;
        self.since_ping = 0;
        let lines = std::mem::take(&mut self.lines);
        let ends = std::mem::take(&mut self.ends);
        self.pending.push_back((seq, lines, ends));
        seq.to_be_bytes().to_vec()
    }

    /// A pong: what was sent before its ping (and every earlier one) is acknowledged.
    pub fn pong(&mut self, deliveries: &Deliveries, payload: &[u8]) {
        let Ok(bytes) = <[u8; 8]>::try_from(payload) else {
            return; // not one of ours (an unsolicited pong)
        };
        let seq = u64::from_be_bytes(bytes);
        while self.pending.front().is_some_and(|(s, _, _)| *s <= seq) {
            let Some((_, lines, ends)) = self.pending.pop_front() else {
                break;
            };
            for ((key, container), through) in lines {
                deliveries.ack(&key, Some(&container), through);
            }
            for key in ends {
                deliveries.ack(&key, None, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> BuildKey {
        BuildKey {
            cluster: "c".into(),
            namespace: "ns".into(),
            build: "b".into(),
        }
    }

    fn line(container: &str, n: u64) -> Event {
        Event {
            message_type: Some("BUILD_LOG"),
            build_id: Some("b".into()),
            container: Some(container.into()),
            line: Some(n),
            ..Event::blank("c", "ns")
        }
    }

    async fn deliveries_with(produced: &[(&str, u64)]) -> Deliveries {
        let deliveries = Deliveries::default();
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        deliveries.follow(&key(), Api::namespaced(client, "ns"), "pod");
        for (container, n) in produced {
            deliveries.produced(&key(), container, *n);
        }
        deliveries
    }

    #[tokio::test]
    async fn a_pong_acknowledges_what_was_sent_before_its_ping_and_only_in_order() {
        let deliveries = deliveries_with(&[("clone", 5), ("build", 3)]).await;
        let mut acks = Acks::default();
        for n in 1..=3 {
            acks.sent(&deliveries, &line("clone", n));
        }
        let first = acks.ping();
        // An old line still queued from before, then one out of order: they move nothing.
        acks.sent(&deliveries, &line("build", 2));
        acks.sent(&deliveries, &line("clone", 5));
        let second = acks.ping();
        acks.pong(&deliveries, &first);
        assert_eq!(deliveries.acked(&key(), "clone"), 3);
        acks.sent(&deliveries, &line("clone", 4));
        acks.pong(&deliveries, &second);
        assert_eq!(
            deliveries.acked(&key(), "clone"),
            3,
            "4 went after the ping"
        );
        assert_eq!(deliveries.acked(&key(), "build"), 0);
        let third = acks.ping();
        acks.pong(&deliveries, b"unsolicited");
        assert_eq!(deliveries.acked(&key(), "clone"), 3);
        acks.pong(&deliveries, &third);
        assert_eq!(deliveries.acked(&key(), "clone"), 4);
    }

    #[tokio::test]
    async fn a_log_acknowledged_to_its_end_is_forgotten() {
        let deliveries = deliveries_with(&[("build", 2)]).await;
        deliveries.ended(&key());
        let mut acks = Acks::default();
        acks.sent(&deliveries, &line("build", 1));
        acks.sent(
            &deliveries,
            &Event {
                last: true,
                line: None,
                ..line("", 0)
            },
        );
        let ping = acks.ping();
        acks.pong(&deliveries, &ping);
        assert_eq!(deliveries.tracked(), 1, "line 2 is not acknowledged yet");
        // After the final, line 2 (re-sent): it continues from what is acknowledged.
        acks.sent(&deliveries, &line("build", 2));
        let ping = acks.ping();
        acks.pong(&deliveries, &ping);
        assert_eq!(deliveries.tracked(), 0);
    }
}
