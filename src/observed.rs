//! Pure readers of what Kubernetes reports about Jobs and Pods: how a Job ended, which
//! containers started or terminated and with what message; and, in [`workload`], how an
//! App's Deployment and pods are doing (its `status.runtime`). Shared by the controllers (which
//! decide from them) and the relay (which follows build logs), so neither imports the other.
//!
//! Depends on: crd (the App's runtime status it builds; k8s-openapi types otherwise).
//! Never uses: kube, tokio (no client, no I/O).

pub mod workload;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus, Pod};

/// How a Job ended, from its final conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Running,
    Succeeded,
    Failed { reason: String, message: String },
}

/// Reads a Job's terminal condition (`Complete` or `Failed`; the interim `SuccessCriteriaMet`
/// and `FailureTarget` are not final while pods still run) (pure).
pub fn outcome(job: &Job) -> Outcome {
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    for condition in conditions.iter().filter(|c| c.status == "True") {
        match condition.type_.as_str() {
            "Complete" => return Outcome::Succeeded,
            "Failed" => {
                return Outcome::Failed {
                    reason: condition.reason.clone().unwrap_or_default(),
                    message: condition.message.clone().unwrap_or_default(),
                };
            }
            _ => {}
        }
    }
    Outcome::Running
}

/// The statuses of a pod's containers, init containers first (pure).
pub fn container_statuses(pod: &Pod) -> impl Iterator<Item = &ContainerStatus> {
    pod.status.iter().flat_map(|status| {
        status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
    })
}

/// Whether a pod has finished (Succeeded or Failed) (pure).
pub fn pod_finished(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// Whether a container is running or has run: its state is `running` or `terminated` (pure).
pub fn has_started(status: &ContainerStatus) -> bool {
    status
        .state
        .as_ref()
        .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
}

/// The terminated state of a container (init or regular) of a pod, current or last (pure).
pub fn terminated<'a>(pod: &'a Pod, container: &str) -> Option<&'a ContainerStateTerminated> {
    container_statuses(pod)
        .filter(|c| c.name == container)
        .find_map(|c| {
            c.state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .or_else(|| c.last_state.as_ref().and_then(|s| s.terminated.as_ref()))
        })
}

/// The image digest a build container reported as its termination message, if it is one
/// (pure): kaniko's `--digest-file` writes the digest alone; the buildpacks lifecycle's
/// `-report` writes its TOML report, whose `[image]` table holds `digest` (beside `tags` and
/// `manifest-size`). Only a `sha256:` digest of 64 hex digits counts.
pub fn reported_digest(message: &str) -> Option<String> {
    let digest = |text: &str| {
        text.strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| text.to_string())
    };
    let message = message.trim();
    digest(message).or_else(|| report_value(message, "image", "digest").and_then(digest))
}

/// The string value of `key` in `[table]` of a TOML document, read line by line: enough for
/// the lifecycle's report (one key per line, basic or literal strings; a dotted `table.key`
/// at the top also counts) without a TOML dependency (pure).
fn report_value<'a>(toml: &'a str, table: &str, key: &str) -> Option<&'a str> {
    let unquote = |k: &'a str| k.trim().trim_matches(|c| c == '"' || c == '\'');
    let mut current = "";
    for line in toml.lines().map(str::trim) {
        if let Some(header) = line.strip_prefix('[') {
            current = unquote(
                header
                    .split(']')
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches('['),
            );
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let name = unquote(name);
        let dotted = current.is_empty()
            && name
                .split_once('.')
                .is_some_and(|(t, k)| unquote(t) == table && unquote(k) == key);
        if !(dotted || (current == table && name == key)) {
            continue;
        }
        let value = value.trim_start();
        let quote = value.chars().next().filter(|c| *c == '"' || *c == '\'')?;
        return value[1..].split(quote).next();
    }
    None
}

/// The last `max` bytes of a message, on a character boundary, trimmed (pure).
pub fn tail(message: &str, max: usize) -> String {
    let message = message.trim();
    if message.len() <= max {
        return message.to_string();
    }
    let mut start = message.len() - max;
    while !message.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &message[start..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn job_outcomes() {
        let job = |conditions: Value| -> Job {
            serde_json::from_value(
                json!({"metadata": {"name": "j"}, "status": {"conditions": conditions}}),
            )
            .unwrap()
        };
        assert_eq!(outcome(&job(json!([]))), Outcome::Running);
        assert_eq!(
            outcome(&job(
                json!([{"type": "SuccessCriteriaMet", "status": "True"}])
            )),
            Outcome::Running,
            "interim condition"
        );
        assert_eq!(
            outcome(&job(json!([{"type": "Complete", "status": "True"}]))),
            Outcome::Succeeded
        );
        assert_eq!(
            outcome(&job(json!([{"type": "Failed", "status": "True",
                "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"}]))),
            Outcome::Failed {
                reason: "DeadlineExceeded".into(),
                message: "Job was active longer than specified deadline".into()
            }
        );
    }

    #[test]
    fn termination_states_are_found_in_init_and_regular_containers() {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "status": {
            "initContainerStatuses": [{"name": "clone", "image": "g", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": 128, "message": "fatal: x"}}}],
            "containerStatuses": [{"name": "build", "image": "k", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}}]
        }}))
        .unwrap();
        assert_eq!(terminated(&pod, "clone").unwrap().exit_code, 128);
        assert!(terminated(&pod, "build").is_none());
    }

    /// A report.toml as the lifecycle (v0.20.20) writes it: its `files.Report` types encoded
    /// by the BurntSushi/toml v1.5.0 encoder it is built with (`internal/encoding.WriteTOML`).
    const LIFECYCLE_REPORT: &str = include_str!("observed/testdata/report.toml");

    #[test]
    fn digests_are_read_from_kaniko_and_from_the_lifecycle_report() {
        let sha = "sha256:4d7b6e5a0b0f1e2e9c8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e";
        assert_eq!(reported_digest(&format!("{sha}\n")).as_deref(), Some(sha));
        assert_eq!(reported_digest(LIFECYCLE_REPORT).as_deref(), Some(sha));
        // Other spellings TOML allows.
        for report in [
            format!("[image]\ndigest='{sha}' # pushed\n"),
            format!(
                "[build]\n[ image ]\n  tags = [\n    \"r/x:y\",\n  ]\n  \"digest\" = \"{sha}\"\n"
            ),
            format!("image.digest = \"{sha}\"\n"),
        ] {
            assert_eq!(reported_digest(&report).as_deref(), Some(sha), "{report}");
        }
        // A digest in another table, a bad digest, no report: no digest.
        for report in [
            format!("[image]\ntags = []\n[other]\ndigest = \"{sha}\"\n"),
            "[image]\ndigest = \"sha256:abc\"\n".to_string(),
            "[image]\ndigest = sha256:x\n".to_string(),
            "done".to_string(),
            String::new(),
        ] {
            assert_eq!(reported_digest(&report), None, "{report}");
        }
    }

    #[test]
    fn tails_keep_the_end_on_char_boundaries() {
        assert_eq!(tail("  short \n", 10), "short");
        let long = format!("{}é end", "x".repeat(100));
        let t = tail(&long, 6);
        assert!(t.ends_with("é end") || t.ends_with(" end"), "{t}");
    }
}
