//! An App's build history, kept bounded: which finished AppBuilds to delete (pure). Deleting
//! an AppBuild takes its Jobs, Secrets and chart ConfigMap with it (owner references), and
//! the relay reports the deletion.

use kube::ResourceExt;

use crate::crd::{App, AppBuild, AppBuildPhase};

/// The AppBuilds of `app` to delete so that at most `keep` remain (pure): the oldest finished
/// ones. Never one in progress, never the current deploy (`status.latestBuild`), never the
/// deploy before it (the newest other Completed build, which a rollback goes back to).
pub fn prune(builds: &[&AppBuild], app: &App, keep: usize) -> Vec<String> {
    let name = app.name_any();
    let ns = app.namespace();
    let mut ours: Vec<&AppBuild> = builds
        .iter()
        .copied()
        .filter(|b| b.spec.app_name == name && b.namespace() == ns)
        .filter(|b| b.metadata.deletion_timestamp.is_none())
        .collect();
    if ours.len() <= keep {
        return vec![];
    }
    // Newest first; the name breaks ties of equal timestamps (second resolution).
    ours.sort_by(|a, b| {
        let at = |x: &AppBuild| x.metadata.creation_timestamp.clone().map(|t| t.0);
        at(b)
            .cmp(&at(a))
            .then_with(|| b.name_any().cmp(&a.name_any()))
    });
    let phase = |b: &AppBuild| b.status.as_ref().and_then(|s| s.phase);
    let finished = |b: &AppBuild| {
        matches!(
            phase(b),
            Some(AppBuildPhase::Completed | AppBuildPhase::Failed)
        )
    };
    let current = app.status.as_ref().and_then(|s| s.latest_build.clone());
    let previous = ours
        .iter()
        .filter(|b| phase(b) == Some(AppBuildPhase::Completed))
        .map(|b| b.name_any())
        .find(|n| Some(n) != current.as_ref());
    let protected = |b: &AppBuild| {
        let n = b.name_any();
        !finished(b) || Some(&n) == current.as_ref() || Some(&n) == previous.as_ref()
    };
    let mut kept = 0;
    let mut delete = vec![];
    for build in ours {
        if protected(build) || kept < keep {
            kept += 1;
        } else {
            delete.push(build.name_any());
        }
    }
    delete
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn build(name: &str, minute: u32, phase: &str) -> AppBuild {
        serde_json::from_value(json!({"apiVersion": "apps.shapeblock.io/v1alpha1",
            "kind": "AppBuild", "metadata": {"name": name, "namespace": "p",
                "creationTimestamp": format!("2026-12-01T10:{minute:02}:00Z")},
            "spec": {"appName": "web"}, "status": {"phase": phase}}))
        .unwrap()
    }

    fn app(latest: Option<&str>) -> App {
        serde_json::from_value(json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App",
            "metadata": {"name": "web", "namespace": "p"},
            "spec": {"displayName": "Web", "registry": {}, "build": {"type": "image", "image": "nginx"}},
            "status": {"latestBuild": latest}}))
        .unwrap()
    }

    #[test]
    fn the_oldest_finished_builds_go_first() {
        let builds: Vec<AppBuild> = (0..6)
            .map(|i| build(&format!("web-{i}"), i, "Completed"))
            .collect();
        let refs: Vec<&AppBuild> = builds.iter().collect();
        assert_eq!(
            prune(&refs, &app(Some("web-5")), 3),
            ["web-2", "web-1", "web-0"]
        );
        assert!(prune(&refs, &app(Some("web-5")), 6).is_empty());
    }

    #[test]
    fn the_current_and_previous_deploys_and_running_builds_are_kept() {
        let builds = [
            build("web-0", 0, "Completed"), // the current deploy (rolled back to)
            build("web-1", 1, "Failed"),
            build("web-2", 2, "Building"),
            build("web-3", 3, "Completed"), // the deploy before: newest other Completed
            build("web-4", 4, "Failed"),
            build("web-5", 5, "Deploying"),
        ];
        let refs: Vec<&AppBuild> = builds.iter().collect();
        // The two newest count as kept whatever they are; beyond them, only what must stay.
        let deleted = prune(&refs, &app(Some("web-0")), 2);
        assert_eq!(deleted, ["web-1"]);
        // keep 0 still keeps what must stay.
        let deleted = prune(&refs, &app(Some("web-0")), 0);
        assert_eq!(deleted, ["web-4", "web-1"]);
    }

    #[test]
    fn other_apps_builds_are_not_counted() {
        let mut other = build("api-0", 0, "Completed");
        other.spec.app_name = "api".into();
        let mine = build("web-1", 1, "Completed");
        let refs = [&other, &mine];
        assert!(prune(&refs, &app(Some("web-1")), 0).is_empty());
    }
}
