//! Controllers run by the hub through the tunnel against the real control plane (with
//! kube-controller-manager, which namespace deletion needs). The agent runs as the install
//! manifest's own ServiceAccount, so every write also proves the least-privilege role.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use shapeblock::crd::{BuildType, Project, ProjectPhase};
use shapeblock::render::image::ImageRef;
use shapeblock::render::jobs::{BuildJob, GitAuth, JobSettings, build_job};
use support::TestNamespace;
use support::cluster::{
    active_project, connected_cluster, phase, project_active, registry_secret, wait_for,
};

#[tokio::test]
async fn projects_get_a_namespace_registry_secret_and_deployer_and_are_deleted_with_it() {
    support::jobs().await; // namespace deletion needs kube-controller-manager
    let cluster = connected_cluster("ctl-project").await;
    let admin = cluster.admin.clone();
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let sources: Api<Secret> = Api::namespaced(admin.clone(), "shapeblock");
    let projects: Api<Project> = Api::all(admin.clone());
    let name = format!("proj-{}", support::random_suffix());
    let project: Project = serde_json::from_value(json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
        "metadata": {"name": name}, "spec": {"displayName": "Controller test"}
    }))
    .unwrap();
    let created_at = Instant::now();
    projects
        .create(&PostParams::default(), &project)
        .await
        .unwrap();
    let (_, message) = wait_for("Project Active", Duration::from_secs(60), async || {
        phase(&projects, &name)
            .await
            .filter(|(p, _)| *p == ProjectPhase::Active)
    })
    .await;
    eprintln!(
        "Project Active {:?} after creation ({message})",
        created_at.elapsed()
    );

    let ns = namespaces.get(&name).await.unwrap();
    assert_eq!(ns.labels().get("shapeblock.io/project"), Some(&name));
    assert_eq!(
        ns.labels()
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("baseline")
    );
    assert_eq!(ns.owner_references()[0].kind, "Project");
    let copy = Api::<Secret>::namespaced(admin.clone(), &name)
        .get("registry-creds")
        .await
        .unwrap();
    assert_eq!(
        copy.type_.as_deref(),
        Some("kubernetes.io/dockerconfigjson")
    );
    assert_eq!(copy.data, sources.get("registry-creds").await.unwrap().data);
    let sa = Api::<ServiceAccount>::namespaced(admin.clone(), &name)
        .get("deployer")
        .await
        .unwrap();
    assert_eq!(sa.image_pull_secrets.unwrap()[0].name, "registry-creds");
    let binding = Api::<RoleBinding>::namespaced(admin.clone(), &name)
        .get("deployer")
        .await
        .unwrap();
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, "shapeblock-deployer");
    let finalizers = projects.get(&name).await.unwrap().finalizers().to_vec();
    assert!(
        finalizers.contains(&"apps.shapeblock.io/project-namespace".to_string()),
        "{finalizers:?}"
    );

    // The copy follows its source.
    sources
        .replace("registry-creds", &PostParams::default(), &{
            let mut s = sources.get("registry-creds").await.unwrap();
            s.data = registry_secret("registry-creds", "dXNlcjp0d28=").data;
            s
        })
        .await
        .unwrap();
    let expected = sources.get("registry-creds").await.unwrap().data;
    wait_for(
        "registry secret re-synced",
        Duration::from_secs(30),
        async || {
            let copy = Api::<Secret>::namespaced(admin.clone(), &name)
                .get("registry-creds")
                .await
                .ok()?;
            (copy.data == expected).then_some(())
        },
    )
    .await;

    // A project whose registry secret does not exist fails with the reason, and recovers on
    // its own once the secret appears.
    let waiting = format!("wait-{}", support::random_suffix());
    let waiting_project: Project = serde_json::from_value(json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
        "metadata": {"name": waiting}, "spec": {"registrySecret": "team-registry"}
    }))
    .unwrap();
    projects
        .create(&PostParams::default(), &waiting_project)
        .await
        .unwrap();
    let (_, reason) = wait_for("Project Failed", Duration::from_secs(60), async || {
        phase(&projects, &waiting)
            .await
            .filter(|(p, _)| *p == ProjectPhase::Failed)
    })
    .await;
    assert!(
        reason.contains("shapeblock/team-registry not found"),
        "{reason}"
    );
    // The failure is a Warning Event on the Project (cluster-scoped: Events go to `default`),
    // with its category as the reason.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(admin.clone(), "default");
    let warning = wait_for(
        "Warning Event on the Project",
        Duration::from_secs(60),
        async || {
            events
                .list(&Default::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(waiting.as_str())
                        && e.type_.as_deref() == Some("Warning")
                })
        },
    )
    .await;
    assert_eq!(warning.reason.as_deref(), Some("DependencyMissing"));
    assert_eq!(
        warning.reporting_controller.as_deref(),
        Some("shapeblock-hub")
    );
    assert!(
        warning.note.unwrap_or_default().contains("team-registry"),
        "the note says what is missing"
    );
    sources
        .create(
            &PostParams::default(),
            &registry_secret("team-registry", "dXNlcjp0ZWFt"),
        )
        .await
        .unwrap();
    project_active(&projects, &waiting, "Project recovered").await;

    // Deleting a Project deletes its namespace, then the Project itself goes.
    for project in [&name, &waiting] {
        projects
            .delete(project, &DeleteParams::default())
            .await
            .unwrap();
    }
    for project in [&name, &waiting] {
        wait_for(
            "namespace and Project gone",
            Duration::from_secs(90),
            async || {
                let ns_gone = namespaces.get_opt(project).await.ok()?.is_none();
                let project_gone = projects.get_opt(project).await.ok()?.is_none();
                (ns_gone && project_gone).then_some(())
            },
        )
        .await;
    }
}

/// The pod of a build Job the hub renders, for an App of this build type in `namespace`.
fn build_pod(namespace: &str, build_type: BuildType) -> Pod {
    let image = ImageRef::parse("registry.example.com/shop/web:t").unwrap();
    let cache = ImageRef::parse("registry.example.com/shop/web-cache").unwrap();
    let job = build_job(
        &BuildJob {
            name: "web-1-build",
            namespace,
            build: "web-1",
            app: "web",
            build_type,
            git_url: "git@github.com:org/web.git",
            git_ref: "4b825dc642cb6eb9a060e54bf8d69288fbee4904",
            git_auth: GitAuth::Ssh {
                secret: "web-deploy-key".into(),
                known_hosts_config_map: "web-git-known-hosts".into(),
            },
            context_dir: None,
            dockerfile_path: None,
            builder_image: None,
            image: &image,
            cache: &cache,
            build_args: vec![],
            platform_env_secret: Some("web-1-env"),
            registry_secret: "registry-creds",
            owner: json!({"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u"}),
            node_affinity: None,
        },
        &JobSettings::default(),
    );
    let mut pod: Value = job["spec"]["template"].clone();
    pod["apiVersion"] = "v1".into();
    pod["kind"] = "Pod".into();
    pod["metadata"]["name"] = format!("{build_type:?}-build").to_lowercase().into();
    serde_json::from_value(pod).unwrap()
}

#[tokio::test]
async fn project_namespaces_admit_build_pods_where_the_cluster_default_is_restricted() {
    let cluster = connected_cluster("ctl-podsec").await;
    let admin = cluster.admin.clone();
    let project = active_project(&admin, "podsec").await;
    let labels = Api::<Namespace>::all(admin.clone())
        .get(&project)
        .await
        .unwrap()
        .labels()
        .clone();
    assert_eq!(labels["pod-security.kubernetes.io/enforce"], "baseline");
    assert_eq!(
        labels["pod-security.kubernetes.io/enforce-version"],
        "latest"
    );
    // A namespace as a cluster whose default level is `restricted` leaves it: the build pod,
    // which runs as root, is rejected there by the apiserver's PodSecurity admission.
    let strict = TestNamespace::new("strict").await;
    Api::<Namespace>::all(admin.clone())
        .patch(
            &strict.name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted"}}})),
        )
        .await
        .unwrap();
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    for build_type in [BuildType::Dockerfile, BuildType::Buildpack] {
        let rejected = Api::<Pod>::namespaced(admin.clone(), &strict.name)
            .create(&dry_run, &build_pod(&strict.name, build_type))
            .await
            .expect_err("a root build pod under `restricted`");
        assert!(
            rejected.to_string().contains("violates PodSecurity"),
            "{build_type:?}: {rejected}"
        );
        Api::<Pod>::namespaced(admin.clone(), &project)
            .create(&dry_run, &build_pod(&project, build_type))
            .await
            .unwrap_or_else(|e| panic!("{build_type:?} build pod refused in a project: {e}"));
    }
}

#[tokio::test]
async fn a_namespace_that_is_not_the_projects_is_never_taken_over() {
    let cluster = connected_cluster("ctl-takeover").await;
    let admin = cluster.admin.clone();
    let projects: Api<Project> = Api::all(admin.clone());
    let existing = support::TestNamespace::new("someone-elses").await;
    let project: Project = serde_json::from_value(json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project", "metadata": {"name": existing.name}, "spec": {}
    }))
    .unwrap();
    projects
        .create(&PostParams::default(), &project)
        .await
        .unwrap();
    let (_, reason) = wait_for("Project Failed", Duration::from_secs(60), async || {
        phase(&projects, &existing.name)
            .await
            .filter(|(p, _)| *p == ProjectPhase::Failed)
    })
    .await;
    assert!(
        reason.contains("does not belong to this project"),
        "{reason}"
    );
    let ns = Api::<Namespace>::all(admin.clone())
        .get(&existing.name)
        .await
        .unwrap();
    assert!(
        ns.labels().get("shapeblock.io/project").is_none(),
        "the namespace was taken over"
    );
    // Deleting that Project must not delete the namespace it never owned.
    projects
        .delete(&existing.name, &DeleteParams::default())
        .await
        .unwrap();
    wait_for("Project gone", Duration::from_secs(60), async || {
        projects
            .get_opt(&existing.name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let ns = Api::<Namespace>::all(admin)
        .get(&existing.name)
        .await
        .unwrap();
    assert!(
        ns.metadata.deletion_timestamp.is_none(),
        "a namespace the project did not own was deleted"
    );
}

async fn app_status(
    apps: &Api<shapeblock::crd::App>,
    name: &str,
) -> Option<shapeblock::crd::AppStatus> {
    apps.get_opt(name).await.ok()??.status
}

#[tokio::test]
async fn apps_get_pinned_host_keys_a_stable_deploy_key_and_clear_failures() {
    use shapeblock::crd::{App, AppPhase};
    support::jobs().await; // garbage collection of the App's children
    let cluster = connected_cluster("ctl-app").await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "apps").await;

    let apps: Api<App> = Api::namespaced(admin.clone(), &ns);
    let app = |name: &str, spec: serde_json::Value| -> App {
        serde_json::from_value(json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": name}, "spec": spec}))
            .unwrap()
    };
    let registry = json!({"url": "registry.example.com"});
    let cases = [
        app(
            "private-ssh",
            json!({"displayName": "Private", "git": {"url": "git@github.com:org/private.git", "isPrivate": true},
            "registry": registry, "build": {"type": "dockerfile"}}),
        ),
        app(
            "public-https",
            json!({"displayName": "Public", "git": {"url": "https://github.com/org/public.git"},
            "registry": registry, "build": {"type": "dockerfile"}}),
        ),
        app(
            "unknown-host",
            json!({"displayName": "Self-hosted", "git": {"url": "ssh://git@git.example.com:2222/team/app.git"},
            "registry": registry, "build": {"type": "dockerfile"}}),
        ),
        app(
            "no-registry-secret",
            json!({"displayName": "Image", "registry": {"secretName": "team-pull"},
            "build": {"type": "image", "image": "nginx:1.27"}}),
        ),
        app(
            "private-https",
            json!({"displayName": "Private https", "git": {"url": "https://gitlab.com/org/app.git", "isPrivate": true},
            "registry": registry, "build": {"type": "dockerfile"}}),
        ),
    ];
    for app in &cases {
        apps.create(&PostParams::default(), app).await.unwrap();
    }

    // A private SSH repository with no secret: a generated ed25519 deploy key, public half in status.
    let status = wait_for("private-ssh Ready", Duration::from_secs(60), async || {
        app_status(&apps, "private-ssh")
            .await
            .filter(|s| s.phase == Some(AppPhase::Ready))
    })
    .await;
    let deploy_key = status.deploy_key.expect("deploy key in status");
    assert!(deploy_key.starts_with("ssh-ed25519 "), "{deploy_key}");
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    let key_secret = secrets.get("private-ssh-deploy-key").await.unwrap();
    assert_eq!(key_secret.type_.as_deref(), Some("kubernetes.io/ssh-auth"));
    let private = String::from_utf8(
        key_secret.data.as_ref().unwrap()["ssh-privatekey"]
            .0
            .clone(),
    )
    .unwrap();
    assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    assert_eq!(key_secret.owner_references()[0].name, "private-ssh");
    let known_hosts = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(admin.clone(), &ns)
        .get("private-ssh-git-known-hosts")
        .await
        .unwrap();
    assert!(known_hosts.data.unwrap()["known_hosts"].contains("github.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"));
    // The key is stable: a spec change re-reconciles without replacing it.
    apps.patch(
        "private-ssh",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"description": "changed"}})),
    )
    .await
    .unwrap();
    wait_for("re-reconciled", Duration::from_secs(60), async || {
        let app = apps.get("private-ssh").await.ok()?;
        (app.status?.observed_generation == app.metadata.generation).then_some(())
    })
    .await;
    assert_eq!(
        app_status(&apps, "private-ssh")
            .await
            .unwrap()
            .deploy_key
            .as_deref(),
        Some(deploy_key.as_str())
    );
    assert_eq!(
        secrets.get("private-ssh-deploy-key").await.unwrap().data,
        key_secret.data,
        "deploy key replaced"
    );

    // A public https repository needs nothing.
    let status = wait_for("public-https Ready", Duration::from_secs(60), async || {
        app_status(&apps, "public-https")
            .await
            .filter(|s| s.phase == Some(AppPhase::Ready))
    })
    .await;
    assert!(status.deploy_key.is_none());

    // Failures say what to do.
    for (name, expected) in [
        (
            "unknown-host",
            "no known host key for git.example.com; add its key to spec.git.knownHosts",
        ),
        (
            "no-registry-secret",
            &format!("registry secret {ns}/team-pull not found"),
        ),
        (
            "private-https",
            "a private https repository needs spec.git.secretName",
        ),
    ] {
        let status = wait_for(
            &format!("{name} Failed"),
            Duration::from_secs(60),
            async || {
                app_status(&apps, name)
                    .await
                    .filter(|s| s.phase == Some(AppPhase::Failed))
            },
        )
        .await;
        assert!(
            status
                .message
                .as_deref()
                .unwrap_or_default()
                .contains(expected),
            "{name}: {status:?}"
        );
    }
    // Adding the host key fixes the App without any other change.
    apps.patch(
        "unknown-host",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"git": {"knownHosts": "[git.example.com]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIazEu89wgQZ4bqs3d63QSMzYVa0MuJ2e2gKTKqu+UUO"}}})),
    )
    .await
    .unwrap();
    wait_for("unknown-host Ready", Duration::from_secs(60), async || {
        app_status(&apps, "unknown-host")
            .await
            .filter(|s| s.phase == Some(AppPhase::Ready))
    })
    .await;

    // Deleting an App leaves nothing behind.
    apps.delete("private-ssh", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "deploy key and known_hosts garbage-collected",
        Duration::from_secs(60),
        async || {
            let key_gone = secrets
                .get_opt("private-ssh-deploy-key")
                .await
                .ok()?
                .is_none();
            let hosts_gone =
                Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(admin.clone(), &ns)
                    .get_opt("private-ssh-git-known-hosts")
                    .await
                    .ok()?
                    .is_none();
            (key_gone && hosts_gone).then_some(())
        },
    )
    .await;
}
