//! Logs followed through the tunnel, line by line: a build pod's containers (clone, commit,
//! prepare, build) one after the other ([`follow_pod`]), and one container of every pod
//! matching a selector, picking up pods as they start ([`follow_pods`], an App's logs).

use std::collections::HashMap;

use futures_util::{AsyncBufRead, AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams, LogParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::runtime::watcher::Event;
use tokio::sync::mpsc;

use crate::observed::{container_statuses, has_started, pod_finished};

/// The containers of a build pod in the order they run: init containers, then the rest (pure).
pub fn containers_in_order(pod: &Pod) -> Vec<String> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .map(|c| c.name.clone())
        .collect()
}

/// Whether a container has started (its log can be read) or will never run (pure).
fn started_or_done(pod: &Pod, container: &str) -> bool {
    pod_finished(pod)
        || container_statuses(pod)
            .filter(|c| c.name == container)
            .any(has_started)
}

/// Whether a container has ended, or never will run (pure).
fn ended(pod: &Pod, container: &str) -> bool {
    pod_finished(pod)
        || container_statuses(pod)
            .filter(|c| c.name == container)
            .any(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some()))
}

/// Follows the pod's containers in order and hands every line (with its trailing newline) to
/// `line`, then returns. With `follow`, each container is read until it ends; a container that
/// never ran (an earlier one failed) is skipped.
pub async fn follow_pod<F, Fut>(
    pods: &Api<Pod>,
    pod_name: &str,
    follow: bool,
    mut line: F,
) -> Result<(), kube::Error>
where
    F: FnMut(String, String) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let pod = pods.get(pod_name).await?;
    for container in containers_in_order(&pod) {
        // A read without follow is of what exists now: a container that has not started has
        // no log yet, and neither have the ones after it.
        if !follow && !started_or_done(&pods.get(pod_name).await?, &container) {
            break;
        }
        // Wait (watching the pod) for the container to start: its log does not exist before.
        let name = container.clone();
        kube::runtime::wait::await_condition(pods.clone(), pod_name, move |pod: Option<&Pod>| {
            pod.is_none_or(|pod| started_or_done(pod, &name))
        })
        .await
        .map_err(|e| kube::Error::Service(Box::new(e)))?;
        // Follow while the container runs; when it has ended (the watch says so), read the
        // whole log once more and deliver only what was not delivered yet, so the end is never
        // cut off and no line comes twice.
        let mut delivered = 0usize;
        let running = follow && !ended(&pods.get(pod_name).await?, &container);
        if running {
            let params = LogParams {
                container: Some(container.clone()),
                follow: true,
                ..Default::default()
            };
            match pods.log_stream(pod_name, &params).await {
                Ok(stream) => {
                    let name = container.clone();
                    let finished = kube::runtime::wait::await_condition(
                        pods.clone(),
                        pod_name,
                        move |pod: Option<&Pod>| pod.is_none_or(|pod| ended(pod, &name)),
                    );
                    tokio::pin!(finished);
                    let mut lines = stream.lines();
                    loop {
                        tokio::select! {
                            text = lines.next() => match text {
                                Some(text) => {
                                    let text = text.map_err(kube::Error::ReadEvents)?;
                                    delivered += 1;
                                    if !line(container.clone(), format!("{text}\n")).await {
                                        return Ok(());
                                    }
                                }
                                None => break,
                            },
                            _ = &mut finished => break,
                        }
                    }
                }
                Err(kube::Error::Api(e)) if e.code == 400 => continue,
                Err(e) => return Err(e),
            }
        }
        let params = LogParams {
            container: Some(container.clone()),
            ..Default::default()
        };
        let stream = match pods.log_stream(pod_name, &params).await {
            Ok(stream) => stream,
            // A container that never ran has no log.
            Err(kube::Error::Api(e)) if e.code == 400 => continue,
            Err(e) => return Err(e),
        };
        let mut lines = stream.lines().skip(delivered);
        while let Some(text) = lines.next().await {
            let text = text.map_err(kube::Error::ReadEvents)?;
            if !line(container.clone(), format!("{text}\n")).await {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The longest line [`follow_pods`] delivers, in bytes; the rest of a longer line is dropped
/// (and the line says so), so one runaway line cannot hold a stream's memory.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// The most pods [`follow_pods`] follows at once; pods beyond are named once and skipped.
pub const MAX_PODS: usize = 100;

/// Reads `reader` line by line, keeping at most `max` bytes of each line (no newline in the
/// text returned). A line cut short ends with a marker saying so.
pub async fn next_capped_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut cut = false;
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            // End of the stream: a last line without a newline is still a line.
            return Ok((!line.is_empty() || cut).then(|| finish_line(&line, cut)));
        }
        let (text, used, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(at) => (&chunk[..at], at + 1, true),
            None => (chunk, chunk.len(), false),
        };
        let room = max.saturating_sub(line.len());
        cut |= text.len() > room;
        line.extend_from_slice(&text[..text.len().min(room)]);
        reader.consume_unpin(used);
        if done {
            return Ok(Some(finish_line(&line, cut)));
        }
    }
}

fn finish_line(bytes: &[u8], cut: bool) -> String {
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if cut {
        text.push_str(&format!(" [line cut at {} bytes]", bytes.len()));
    }
    text
}

/// What [`follow_pods`] reads.
#[derive(Clone, Debug)]
pub struct PodsLogs {
    /// Label selector of the pods, e.g. `shapeblock.io/app=web`.
    pub selector: String,
    /// The container whose log is read in each pod.
    pub container: String,
    /// Lines from the end of the log of each pod already running when the stream starts
    /// (pods that start later are read from their first line).
    pub tail_lines: Option<i64>,
    /// Keep following (and pick up new pods) until the receiver goes away.
    pub follow: bool,
}

/// The container instance a follower reads: pod name and restart count, so a restarted
/// container is followed again from its first line.
type Instance = (String, i32);

/// Whether the container has started in this pod, and which instance it is (pure).
fn started_instance(pod: &Pod, container: &str) -> Option<Instance> {
    container_statuses(pod)
        .find(|c| c.name == container && has_started(c))
        .map(|c| (pod.name_any(), c.restart_count))
}

/// Sends one container's log, each line prefixed with `[pod] `, until it ends or the receiver
/// goes away. A container that has not started (the apiserver's 400) has nothing to send.
async fn send_pod_log(
    pods: &Api<Pod>,
    pod: &str,
    params: &LogParams,
    lines: &mpsc::Sender<String>,
) -> Result<(), kube::Error> {
    let mut stream = match pods.log_stream(pod, params).await {
        Ok(stream) => stream,
        Err(kube::Error::Api(e)) if e.code == 400 || e.code == 404 => return Ok(()),
        Err(e) => return Err(e),
    };
    while let Some(text) = next_capped_line(&mut stream, MAX_LINE_BYTES)
        .await
        .map_err(kube::Error::ReadEvents)?
    {
        if lines.send(format!("[{pod}] {text}\n")).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Sends the log of one container of every pod matching `what.selector` to `lines`, each line
/// prefixed with its pod's name. Without `follow`, the (tail of the) log of each current pod,
/// one pod after the other in name order, then returns. With `follow`, every pod's log at
/// once, and each pod that starts later (or whose container restarts) from its first line,
/// until `lines` is closed; dropping the returned future ends every log request it made.
/// Memory is bounded by the channel's capacity and [`MAX_PODS`] × [`MAX_LINE_BYTES`].
pub async fn follow_pods(
    pods: &Api<Pod>,
    what: &PodsLogs,
    lines: mpsc::Sender<String>,
) -> Result<(), kube::Error> {
    let params = |tail_lines: Option<i64>| LogParams {
        container: Some(what.container.clone()),
        follow: what.follow,
        tail_lines,
        ..Default::default()
    };
    if !what.follow {
        let mut current = pods
            .list(&ListParams::default().labels(&what.selector))
            .await?
            .items;
        current.sort_by_key(|p| p.name_any());
        for pod in current.iter().take(MAX_PODS) {
            if started_instance(pod, &what.container).is_some() {
                send_pod_log(pods, &pod.name_any(), &params(what.tail_lines), &lines).await?;
            }
        }
        return Ok(());
    }
    // Dropping the set (when this future is dropped or returns) aborts every follower.
    let mut followers = tokio::task::JoinSet::new();
    let mut followed: HashMap<String, i32> = HashMap::new();
    let mut refused = false;
    let mut initial = true;
    let mut events = std::pin::pin!(
        watcher(
            pods.clone(),
            watcher::Config::default().labels(&what.selector)
        )
        .default_backoff()
    );
    loop {
        let event = tokio::select! {
            _ = lines.closed() => return Ok(()),
            Some(_) = followers.join_next(), if !followers.is_empty() => continue,
            event = events.next() => event,
        };
        let pod = match event {
            None => return Ok(()),
            Some(Err(err)) => {
                // The watcher retries (backing off); say why the stream is quiet meanwhile.
                let note = format!("[shapeblock-hub] watching the pods failed, retrying: {err}\n");
                if lines.send(note).await.is_err() {
                    return Ok(());
                }
                continue;
            }
            Some(Ok(Event::Init)) => {
                initial = true;
                continue;
            }
            Some(Ok(Event::InitDone)) => {
                initial = false;
                continue;
            }
            Some(Ok(Event::Delete(pod))) => {
                followed.remove(&pod.name_any());
                continue;
            }
            Some(Ok(Event::InitApply(pod) | Event::Apply(pod))) => pod,
        };
        let Some((name, restarts)) = started_instance(&pod, &what.container) else {
            continue;
        };
        let seen = followed.get(&name).copied();
        if seen.is_some_and(|r| r >= restarts) {
            continue; // this container instance is followed already
        }
        if seen.is_none() && followed.len() >= MAX_PODS {
            if !refused {
                refused = true;
                let note = format!(
                    "[shapeblock-hub] more than {MAX_PODS} pods: {name} and later ones are not followed\n"
                );
                if lines.send(note).await.is_err() {
                    return Ok(());
                }
            }
            continue;
        }
        // Pods running before the stream started give their tail, later ones everything.
        let tail = if initial && seen.is_none() {
            what.tail_lines
        } else {
            None
        };
        followed.insert(name.clone(), restarts);
        let (pods, params, lines) = (pods.clone(), params(tail), lines.clone());
        followers.spawn(async move {
            if let Err(err) = send_pod_log(&pods, &name, &params, &lines).await {
                let _ = lines
                    .send(format!("[{name}] error reading the log: {err}\n"))
                    .await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<String> {
        futures::executor::block_on(async {
            let mut reader = futures_util::io::Cursor::new(input.to_vec());
            let mut out = Vec::new();
            while let Some(line) = next_capped_line(&mut reader, max).await.unwrap() {
                out.push(line);
            }
            out
        })
    }

    #[test]
    fn lines_are_split_and_capped() {
        assert_eq!(lines(b"a\nbb\n\nlast", 10), ["a", "bb", "", "last"]);
        assert_eq!(
            lines(b"0123456789abc\nnext\n", 4),
            ["0123 [line cut at 4 bytes]", "next"]
        );
        assert!(lines(b"", 4).is_empty());
        // Invalid UTF-8 is replaced, never an error.
        assert_eq!(lines(b"\xff ok\n", 10), ["\u{fffd} ok"]);
    }

    #[test]
    fn a_restarted_container_is_a_new_instance() {
        let pod: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "web-1"},
            "status": {"containerStatuses": [{"name": "app", "image": "x", "imageID": "",
                "ready": true, "restartCount": 2, "state": {"running": {}}},
                {"name": "sidecar", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {}}}]}}))
        .unwrap();
        assert_eq!(
            started_instance(&pod, "app"),
            Some(("web-1".to_string(), 2))
        );
        assert_eq!(started_instance(&pod, "sidecar"), None);
        assert_eq!(started_instance(&pod, "other"), None);
    }

    #[test]
    fn containers_run_init_first() {
        let pod: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "p"},
            "spec": {"initContainers": [{"name": "clone"}, {"name": "commit"}],
                     "containers": [{"name": "build"}]}}))
        .unwrap();
        assert_eq!(containers_in_order(&pod), ["clone", "commit", "build"]);
    }
}
