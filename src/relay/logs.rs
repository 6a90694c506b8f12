//! Build logs: the build pod's containers (clone, commit, prepare, build), one after the
//! other, followed through the tunnel as they run, line by line.

use futures_util::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_run_init_first() {
        let pod: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "p"},
            "spec": {"initContainers": [{"name": "clone"}, {"name": "commit"}],
                     "containers": [{"name": "build"}]}}))
        .unwrap();
        assert_eq!(containers_in_order(&pod), ["clone", "commit", "build"]);
    }
}
