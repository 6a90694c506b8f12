//! Registry credentials through the API (issue 20, item 3), against the real control plane
//! with the agent's own least-privilege identity: a cluster as the install manifest leaves it
//! (no registry Secret) gets one from `PUT …/registry-credentials`, its Projects become Active
//! with the copy, a rotation reaches every project namespace, a project's own credentials
//! replace the cluster's in that project only; bad bodies and viewer tokens change nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use shapeblock::crd::{Project, ProjectPhase};
use shapeblock_test_support as support;
use support::cluster::{connected_cluster_without_registry_secret, phase, wait_for};
use support::hub::VIEWER_TOKEN;

/// The `.dockerconfigjson` of a Secret, parsed.
fn config_of(secret: &Secret) -> Value {
    let bytes = &secret.data.as_ref().unwrap()[".dockerconfigjson"].0;
    serde_json::from_slice(bytes).unwrap()
}

async fn copy_in(admin: &kube::Client, project: &str) -> Option<Value> {
    Api::<Secret>::namespaced(admin.clone(), project)
        .get_opt("registry-creds")
        .await
        .ok()
        .flatten()
        .map(|s| config_of(&s))
}

/// Waits until the project's `registry-creds` copy holds `password` for `server`.
async fn copy_holds(admin: &kube::Client, project: &str, server: &str, password: &str) {
    wait_for(
        &format!("{project}'s registry copy holds the new password for {server}"),
        Duration::from_secs(60),
        async || {
            copy_in(admin, project)
                .await
                .filter(|c| c["auths"][server]["password"] == password)
        },
    )
    .await;
}

async fn project_with_reason(projects: &Api<Project>, name: &str, reason: &str) {
    wait_for(
        &format!("Project {name} reports {reason}"),
        Duration::from_secs(60),
        async || {
            let project = projects.get_opt(name).await.ok()??;
            project
                .status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.reason == reason)
                .then_some(())
        },
    )
    .await;
}

async fn create_project(projects: &Api<Project>, name: &str) {
    let project: Project = serde_json::from_value(json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
        "metadata": {"name": name}, "spec": {}
    }))
    .unwrap();
    projects
        .create(&PostParams::default(), &project)
        .await
        .unwrap();
}

#[tokio::test]
async fn registry_credentials_are_set_rotated_and_overridden_per_project_through_the_api() {
    let cluster = connected_cluster_without_registry_secret("registry-credentials").await;
    let hub = cluster.hub.as_ref().unwrap();
    let admin = cluster.admin.clone();
    let projects: Api<Project> = Api::all(admin.clone());
    let sources: Api<Secret> = Api::namespaced(admin.clone(), "shapeblock");
    let path = format!(
        "/api/v1/clusters/{}/registry-credentials",
        cluster.cluster_id
    );
    let suffix = support::random_suffix();
    let first = format!("shop-{suffix}");
    let second = format!("blog-{suffix}");

    // Nothing set: a Project waits, and says where the Secret comes from.
    assert!(sources.get_opt("registry-creds").await.unwrap().is_none());
    let unset = hub.api("GET", &path, None).await;
    assert_eq!(unset.status, 200, "{}", unset.text());
    assert_eq!(unset.json()["set"], false);
    assert_eq!(unset.json()["secret"], "shapeblock/registry-creds");
    create_project(&projects, &first).await;
    project_with_reason(&projects, &first, "RegistrySecretMissing").await;

    // A viewer may look, not set; bad bodies are refused before anything is written, and the
    // password is never echoed.
    let credentials =
        json!({"server": "registry.example.com", "username": "bot", "password": "hunter2-one"});
    let viewer = hub
        .api_as(VIEWER_TOKEN, "PUT", &path, Some(credentials.clone()))
        .await;
    assert_eq!(viewer.status, 403, "{}", viewer.text());
    assert_eq!(viewer.json()["reason"], "Forbidden");
    assert_eq!(
        hub.api_as(VIEWER_TOKEN, "GET", &path, None).await.status,
        200
    );
    for bad in [
        json!({"server": "registry.example.com", "username": "bot"}),
        json!({"server": "registry.example.com", "username": "b:t", "password": "hunter2-bad"}),
        json!({"dockerConfigJson": {"token": "hunter2-bad"}}),
        json!({"server": "registry.example.com", "username": "bot", "password": "hunter2-bad", "extra": 1}),
    ] {
        let refused = hub.api("PUT", &path, Some(bad.clone())).await;
        assert_eq!(refused.status, 422, "{bad}: {}", refused.text());
        assert!(
            refused.json()["message"].is_string() && !refused.text().contains("hunter2"),
            "{}",
            refused.text()
        );
    }
    assert!(
        sources.get_opt("registry-creds").await.unwrap().is_none(),
        "a refused body wrote nothing"
    );

    // Set: the Secret is written, the waiting Project becomes Active with its copy, and a new
    // Project too.
    let set = hub.api("PUT", &path, Some(credentials)).await;
    assert_eq!(set.status, 200, "{}", set.text());
    assert!(!set.text().contains("hunter2"), "{}", set.text());
    assert_eq!(set.json()["set"], true);
    assert_eq!(set.json()["servers"], json!(["registry.example.com"]));
    let source = sources.get("registry-creds").await.unwrap();
    assert_eq!(
        source.type_.as_deref(),
        Some("kubernetes.io/dockerconfigjson")
    );
    assert_eq!(
        config_of(&source)["auths"]["registry.example.com"]["password"],
        "hunter2-one"
    );
    support::cluster::project_active(&projects, &first, "Project Active once credentials are set")
        .await;
    create_project(&projects, &second).await;
    support::cluster::project_active(&projects, &second, "a new Project Active").await;
    for project in [&first, &second] {
        copy_holds(&admin, project, "registry.example.com", "hunter2-one").await;
    }
    let shown = hub.api("GET", &path, None).await;
    assert_eq!(shown.json()["set"], true);
    assert!(shown.json()["updated"].is_string(), "{}", shown.text());
    assert!(!shown.text().contains("hunter2"), "{}", shown.text());

    // Rotated: every project namespace's copy follows.
    let rotated = hub
        .api(
            "PUT",
            &path,
            Some(json!({"server": "registry.example.com", "username": "bot", "password": "hunter2-two"})),
        )
        .await;
    assert_eq!(rotated.status, 200, "{}", rotated.text());
    for project in [&first, &second] {
        copy_holds(&admin, project, "registry.example.com", "hunter2-two").await;
    }

    // A project's own registry: written into its namespace, copied in place of the cluster's,
    // in that project only; rotated; removed, and the cluster's comes back.
    let own_path = format!(
        "/api/v1/clusters/{}/projects/{second}/registry-credentials",
        cluster.cluster_id
    );
    let own = |password: &str| {
        json!({"dockerConfigJson": {"auths": {"other.example.com": {
            "username": "team", "password": password}}}})
    };
    let bad = hub
        .api("PUT", &own_path, Some(json!({"dockerConfigJson": "{"})))
        .await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    let viewer = hub
        .api_as(VIEWER_TOKEN, "PUT", &own_path, Some(own("hunter2-own")))
        .await;
    assert_eq!(viewer.status, 403, "{}", viewer.text());
    let set_own = hub.api("PUT", &own_path, Some(own("hunter2-own"))).await;
    assert_eq!(set_own.status, 200, "{}", set_own.text());
    assert_eq!(
        set_own.json()["secret"],
        format!("{second}/registry-creds-own")
    );
    assert_eq!(set_own.json()["servers"], json!(["other.example.com"]));
    copy_holds(&admin, &second, "other.example.com", "hunter2-own").await;
    let set_own = hub
        .api("PUT", &own_path, Some(own("hunter2-own-two")))
        .await;
    assert_eq!(set_own.status, 200, "{}", set_own.text());
    copy_holds(&admin, &second, "other.example.com", "hunter2-own-two").await;
    assert_eq!(
        phase(&projects, &second).await.map(|(p, _)| p),
        Some(ProjectPhase::Active)
    );
    let first_copy = copy_in(&admin, &first).await.unwrap();
    assert_eq!(
        first_copy["auths"]["registry.example.com"]["password"], "hunter2-two",
        "the other project keeps the cluster's credentials"
    );
    assert!(first_copy["auths"].get("other.example.com").is_none());
    let got_own = hub.api("GET", &own_path, None).await;
    assert_eq!(got_own.json()["set"], true);
    assert!(!got_own.text().contains("hunter2"), "{}", got_own.text());

    let removed = hub.api("DELETE", &own_path, None).await;
    assert_eq!(removed.status, 204, "{}", removed.text());
    copy_holds(&admin, &second, "registry.example.com", "hunter2-two").await;
    assert_eq!(hub.api("GET", &own_path, None).await.json()["set"], false);
}

/// A Project that copies only its own credentials gets its namespace without any cluster
/// registry Secret, waits for its own, and becomes Active once they are set.
#[tokio::test]
async fn a_project_with_its_own_registry_needs_no_cluster_credentials() {
    let cluster = connected_cluster_without_registry_secret("own-registry").await;
    let hub = cluster.hub.as_ref().unwrap();
    let projects: Api<Project> = Api::all(cluster.admin.clone());
    let name = format!("own-{}", support::random_suffix());
    let project: Project = serde_json::from_value(json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
        "metadata": {"name": name}, "spec": {"ownRegistrySecret": "registry-creds-own"}
    }))
    .unwrap();
    projects
        .create(&PostParams::default(), &project)
        .await
        .unwrap();
    project_with_reason(&projects, &name, "RegistrySecretMissing").await;
    let (_, message) = phase(&projects, &name).await.unwrap();
    assert!(
        message.contains(&format!("{name}/registry-creds-own not found")),
        "{message}"
    );
    let path = format!(
        "/api/v1/clusters/{}/projects/{name}/registry-credentials",
        cluster.cluster_id
    );
    let set = hub
        .api(
            "PUT",
            &path,
            Some(json!({"server": "ghcr.io", "username": "team", "password": "hunter2-own"})),
        )
        .await;
    assert_eq!(set.status, 200, "{}", set.text());
    support::cluster::project_active(&projects, &name, "Project Active with its own credentials")
        .await;
    copy_holds(&cluster.admin, &name, "ghcr.io", "hunter2-own").await;
}
