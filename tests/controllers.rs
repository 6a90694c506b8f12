//! Controllers run by the hub through the tunnel against the real control plane (with
//! kube-controller-manager, which namespace deletion needs). The agent runs as the install
//! manifest's own ServiceAccount, so every write also proves the least-privilege role.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock::crd::{Project, ProjectPhase};
use shapeblock::hub::Registry;
use shapeblock::render::agent::{AgentManifestParams, agent_manifest};
use support::hub::{AgentProcess, TestHub, scratch_dir, service_account_kubeconfig};

async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Installs the agent's RBAC from the install manifest (everything but the Deployment, which
/// the test replaces with a local agent process) and returns that agent's kubeconfig.
async fn install_agent_rbac(
    admin: &Client,
    dir: &std::path::Path,
    cluster: &str,
    hub: &TestHub,
) -> std::path::PathBuf {
    let objects = agent_manifest(&AgentManifestParams {
        cluster_id: cluster.into(),
        hub_url: hub.url(),
        image: "shapeblock-agent:test".into(),
        token: "unused".into(),
    });
    for object in objects.iter().filter(|o| o["kind"] != "Deployment") {
        let (group, version) = object["apiVersion"]
            .as_str()
            .unwrap()
            .split_once('/')
            .unwrap_or(("", "v1"));
        let gvk =
            kube::core::GroupVersionKind::gvk(group, version, object["kind"].as_str().unwrap());
        let (resource, caps) = kube::discovery::pinned_kind(admin, &gvk).await.unwrap();
        let api: Api<kube::api::DynamicObject> = match object["metadata"]["namespace"].as_str() {
            Some(ns) if caps.scope == kube::discovery::Scope::Namespaced => {
                Api::namespaced_with(admin.clone(), ns, &resource)
            }
            _ => Api::all_with(admin.clone(), &resource),
        };
        let dynamic: kube::api::DynamicObject = serde_json::from_value(object.clone()).unwrap();
        api.patch(
            object["metadata"]["name"].as_str().unwrap(),
            &PatchParams::apply("test").force(),
            &Patch::Apply(&dynamic),
        )
        .await
        .unwrap();
    }
    service_account_kubeconfig(dir, "shapeblock-agent", "shapeblock-agent").await
}

fn registry_secret(name: &str, auth: &str) -> Secret {
    let config = json!({"auths": {"registry.example.com": {"auth": auth}}}).to_string();
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(config.into_bytes()),
        )])),
        ..Default::default()
    }
}

async fn phase(projects: &Api<Project>, name: &str) -> Option<(ProjectPhase, String)> {
    let project = projects.get_opt(name).await.ok()??;
    let status = project.status?;
    Some((status.phase?, status.message.unwrap_or_default()))
}

#[tokio::test]
async fn projects_get_a_namespace_registry_secret_and_deployer_and_are_deleted_with_it() {
    support::jobs().await;
    let admin = support::client().await;
    let dir = scratch_dir("ctl-project");
    let hub = TestHub::start_tls_controllers(&dir, Arc::new(Registry::in_memory())).await;
    let (record, token) = hub.registry.register("ctl", Default::default()).unwrap();
    let kubeconfig = install_agent_rbac(&admin, &dir, &record.id, &hub).await;

    // The registry secret every project copies, in the `shapeblock` namespace.
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let shapeblock: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "shapeblock"}})).unwrap();
    let _ = namespaces.create(&PostParams::default(), &shapeblock).await;
    let sources: Api<Secret> = Api::namespaced(admin.clone(), "shapeblock");
    let _ = sources
        .delete("registry-creds", &DeleteParams::default())
        .await;
    sources
        .create(
            &PostParams::default(),
            &registry_secret("registry-creds", "dXNlcjpvbmU="),
        )
        .await
        .unwrap();

    let _agent = AgentProcess::spawn(&dir, &hub, token.expose(), &kubeconfig, "agent");
    hub.wait_connected(&record.id).await;

    // The hub installs the CRDs itself through the tunnel, then reconciles.
    let projects: Api<Project> = Api::all(admin.clone());
    wait_for(
        "CRDs installed by the hub",
        Duration::from_secs(60),
        async || projects.list(&Default::default()).await.ok(),
    )
    .await;
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
    sources
        .create(
            &PostParams::default(),
            &registry_secret("team-registry", "dXNlcjp0ZWFt"),
        )
        .await
        .unwrap();
    wait_for("Project recovered", Duration::from_secs(60), async || {
        phase(&projects, &waiting)
            .await
            .filter(|(p, _)| *p == ProjectPhase::Active)
    })
    .await;

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

#[tokio::test]
async fn a_namespace_that_is_not_the_projects_is_never_taken_over() {
    let admin = support::client().await;
    let dir = scratch_dir("ctl-takeover");
    let hub = TestHub::start_tls_controllers(&dir, Arc::new(Registry::in_memory())).await;
    let (record, token) = hub
        .registry
        .register("takeover", Default::default())
        .unwrap();
    let kubeconfig = install_agent_rbac(&admin, &dir, &record.id, &hub).await;
    let _agent = AgentProcess::spawn(&dir, &hub, token.expose(), &kubeconfig, "agent");
    hub.wait_connected(&record.id).await;
    let projects: Api<Project> = Api::all(admin.clone());
    wait_for(
        "CRDs installed by the hub",
        Duration::from_secs(60),
        async || projects.list(&Default::default()).await.ok(),
    )
    .await;

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
