//! Tenants stay in their namespaces (issue 14, item 6), against a hub with controllers and the
//! real control plane: Apps, AppBuilds and Services are reconciled only in the namespace of a
//! Project (anywhere else nothing is created and their status says `NotInProject`, until the
//! Project comes); an https git Secret goes only to the host it is bound to (the controller
//! refuses any other, and the build Job's credential helper answers no other); a Project's
//! registry Secret must be a `kubernetes.io/dockerconfigjson`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use shapeblock::crd::{App, AppBuild, Project, ProjectPhase, Service};
use support::TestNamespace;
use support::cluster::{
    active_project, connected_cluster, project_active, shapeblock, wait_for, wait_job,
};

const WAIT: Duration = Duration::from_secs(60);

/// One hub with controllers at a time: each reconciles every namespace of the shared
/// apiserver, and these tests put objects in the shared `shapeblock` and `kube-system`.
static ONE_CONTROLLING_HUB: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn web_spec(git: Value) -> Value {
    json!({"displayName": "Web", "git": git, "registry": {"url": "registry.example.com"},
        "build": {"type": "dockerfile"}})
}

fn db_spec() -> Value {
    json!({"chart": {"name": "postgresql", "version": "15.5.2",
        "repoURL": "oci://registry-1.docker.io/bitnamicharts"}})
}

fn condition(conditions: &[Condition], type_: &str) -> Option<Condition> {
    conditions.iter().find(|c| c.type_ == type_).cloned()
}

/// Waits until the condition `type_` of `name` (from `conditions`) has `reason`; returns it.
async fn reason_of<K>(
    api: &Api<K>,
    name: &str,
    type_: &str,
    reason: &str,
    conditions: fn(K) -> Option<Vec<Condition>>,
) -> Condition
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_for(
        &format!("{} {name}: {type_} condition {reason}", K::kind(&())),
        WAIT,
        async || {
            let object = api.get_opt(name).await.ok()??;
            condition(&conditions(object)?, type_).filter(|c| c.reason == reason)
        },
    )
    .await
}

/// Waits until the App's `Ready` condition has `reason`; returns it.
async fn app_reason(apps: &Api<App>, name: &str, reason: &str) -> Condition {
    reason_of(apps, name, "Ready", reason, |a| Some(a.status?.conditions)).await
}

async fn build_reason(builds: &Api<AppBuild>, name: &str, reason: &str) -> Condition {
    reason_of(builds, name, "Built", reason, |b| {
        Some(b.status?.conditions)
    })
    .await
}

async fn service_reason(services: &Api<Service>, name: &str, reason: &str) -> Condition {
    reason_of(services, name, "Ready", reason, |s| {
        Some(s.status?.conditions)
    })
    .await
}

/// The Jobs of a namespace that the hub made for `app` or `service`.
async fn jobs_for(admin: &kube::Client, ns: &str, label: &str) -> Vec<String> {
    Api::<Job>::namespaced(admin.clone(), ns)
        .list(&ListParams::default().labels(label))
        .await
        .unwrap()
        .items
        .iter()
        .map(|j| j.name_any())
        .collect()
}

/// Creates App `app`, AppBuild `<app>-1` of its branch, and Service `<app>-db` in `ns`.
async fn create_trio(admin: &kube::Client, ns: &str, app: &str) {
    Api::<App>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &shapeblock(
                "App",
                app,
                web_spec(json!({"url": "https://github.com/org/web.git", "branch": "main"})),
            ),
        )
        .await
        .unwrap();
    Api::<AppBuild>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &shapeblock(
                "AppBuild",
                &format!("{app}-1"),
                json!({"appName": app, "gitRef": "main"}),
            ),
        )
        .await
        .unwrap();
    Api::<Service>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &shapeblock("Service", &format!("{app}-db"), db_spec()),
        )
        .await
        .unwrap();
}

/// Each of the three reports `NotInProject`, and nothing was made for any of them.
async fn refused_outside_a_project(admin: &kube::Client, ns: &str, app: &str) {
    let apps: Api<App> = Api::namespaced(admin.clone(), ns);
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), ns);
    let services: Api<Service> = Api::namespaced(admin.clone(), ns);
    let ready = app_reason(&apps, app, "NotInProject").await;
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains("Project"),
        "{ns}: a human message: {}",
        ready.message
    );
    let built = build_reason(&builds, &format!("{app}-1"), "NotInProject").await;
    assert_eq!(built.status, "False");
    service_reason(&services, &format!("{app}-db"), "NotInProject").await;
    // Decided before anything was made (the status is written after the decision): no Job,
    // no Deployment, not even a finalizer that would need the hub to let the object go.
    assert_eq!(
        jobs_for(admin, ns, &format!("shapeblock.io/app={app}")).await,
        Vec::<String>::new(),
        "{ns}: build or deploy Jobs"
    );
    assert_eq!(
        jobs_for(admin, ns, &format!("shapeblock.io/service={app}-db")).await,
        Vec::<String>::new(),
        "{ns}: Helm Jobs of the Service"
    );
    let deployments = Api::<Deployment>::namespaced(admin.clone(), ns)
        .list(&ListParams::default().labels(&format!("shapeblock.io/app={app}")))
        .await
        .unwrap();
    assert!(deployments.items.is_empty(), "{ns}: Deployments");
    let build = builds.get(&format!("{app}-1")).await.unwrap();
    assert!(
        build.status.unwrap().job_name.is_none(),
        "{ns}: a build Job"
    );
    assert!(apps.get(app).await.unwrap().finalizers().is_empty());
    assert!(
        services
            .get(&format!("{app}-db"))
            .await
            .unwrap()
            .finalizers()
            .is_empty()
    );
}

async fn delete_trio(admin: &kube::Client, ns: &str, app: &str) {
    let _ = Api::<AppBuild>::namespaced(admin.clone(), ns)
        .delete(&format!("{app}-1"), &DeleteParams::default())
        .await;
    let _ = Api::<Service>::namespaced(admin.clone(), ns)
        .delete(&format!("{app}-db"), &DeleteParams::default())
        .await;
    let _ = Api::<App>::namespaced(admin.clone(), ns)
        .delete(app, &DeleteParams::default())
        .await;
}

#[tokio::test]
async fn outside_a_project_namespace_nothing_is_created_and_the_status_says_why() {
    let _one = ONE_CONTROLLING_HUB.lock().await;
    let cluster = connected_cluster("tenancy-outside").await;
    let admin = cluster.admin.clone();
    let plain = TestNamespace::new("plain").await;
    // `shapeblock` holds the master registry Secret (an App there was Ready, and its build
    // mounted it); `kube-system` is the cluster's own; a plain namespace has no Project.
    let app = format!("web-{}", support::random_suffix());
    for ns in ["shapeblock", "kube-system", plain.name.as_str()] {
        create_trio(&admin, ns, &app).await;
    }
    for ns in ["shapeblock", "kube-system", plain.name.as_str()] {
        refused_outside_a_project(&admin, ns, &app).await;
    }
    // A Warning Event tells `kubectl describe` the same.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(admin.clone(), "shapeblock");
    wait_for("a NotInProject Warning Event", WAIT, async || {
        events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(app.as_str())
                    && e.reason.as_deref() == Some("NotInProject")
                    && e.type_.as_deref() == Some("Warning")
            })
    })
    .await;
    for ns in ["shapeblock", "kube-system", plain.name.as_str()] {
        delete_trio(&admin, ns, &app).await;
    }
}

#[tokio::test]
async fn a_project_made_later_brings_what_waits_in_its_namespace() {
    let _one = ONE_CONTROLLING_HUB.lock().await;
    let cluster = connected_cluster("tenancy-later").await;
    let admin = cluster.admin.clone();
    // A namespace labelled for a Project that does not exist yet (objects can only be made in
    // a namespace that exists): not a project's until the Project adopts it.
    let ns = TestNamespace::new("later").await;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .patch(
            &ns.name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"shapeblock.io/project": ns.name}}})),
        )
        .await
        .unwrap();
    create_trio(&admin, &ns.name, "web").await;
    refused_outside_a_project(&admin, &ns.name, "web").await;

    let projects: Api<Project> = Api::all(admin.clone());
    projects
        .create(
            &PostParams::default(),
            &shapeblock::<Project>("Project", &ns.name, json!({})),
        )
        .await
        .unwrap();
    project_active(&projects, &ns.name, "the late Project Active").await;
    let owner = namespaces.get(&ns.name).await.unwrap().owner_references()[0].clone();
    assert_eq!(owner.kind, "Project");
    assert_eq!(owner.controller, Some(true));

    // Brought by watches and the bounded retry: the App Ready, the build's Job, the
    // Service's install Job.
    let apps: Api<App> = Api::namespaced(admin.clone(), &ns.name);
    let ready = app_reason(&apps, "web", "Ready").await;
    assert_eq!(ready.status, "True");
    let job = wait_job(&admin, &ns.name, "web-1-build").await;
    assert_eq!(job.labels()["shapeblock.io/build"], "web-1");
    wait_for("the Service's install Job", WAIT, async || {
        jobs_for(
            &admin,
            &ns.name,
            "shapeblock.io/service=web-db,shapeblock.io/step=install",
        )
        .await
        .pop()
    })
    .await;
    // Deleting the Project takes the namespace it adopted and everything in it.
    projects
        .delete(&ns.name, &DeleteParams::default())
        .await
        .unwrap();
}

fn git_secret(name: &str, host: Option<&str>) -> Secret {
    let mut data = BTreeMap::from([
        ("username".to_string(), "deployer".to_string()),
        ("token".to_string(), "s3cret-token".to_string()),
    ]);
    if let Some(host) = host {
        data.insert("host".into(), host.into());
    }
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some(data),
        ..Default::default()
    }
}

/// What `git credential fill` gets from the build Job's helper for `url`, with the clone
/// container's environment as the kubelet would give it (Secret keys resolved from `secret`).
fn credential_fill(container: &Value, secret: &Secret, url: &str) -> String {
    use std::io::Write;
    let values: BTreeMap<String, String> = secret
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
        .collect();
    let mut command = std::process::Command::new("git");
    command
        .args(["credential", "fill"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // Only the Job's helper: none from the machine's git configuration.
        .env("GIT_CONFIG_NOSYSTEM", "1");
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap();
        if let Some(value) = var["value"].as_str() {
            command.env(name, value);
        } else if let Some(key) = var.pointer("/valueFrom/secretKeyRef/key")
            && let Some(value) = values.get(key.as_str().unwrap())
        {
            command.env(name, value);
        }
    }
    // HOME from the Job (/tmp): no git config of the machine's user takes part.
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("git on the machine");
    writeln!(child.stdin.take().unwrap(), "url={url}\n").unwrap();
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn a_git_secret_goes_only_to_the_host_it_is_bound_to() {
    let _one = ONE_CONTROLLING_HUB.lock().await;
    let cluster = connected_cluster("tenancy-git").await;
    let admin = cluster.admin.clone();
    let ns = active_project(&admin, "git").await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    let apps: Api<App> = Api::namespaced(admin.clone(), &ns);
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &ns);
    let url = "https://github.com/org/web.git";
    for (app, host, reason) in [
        ("elsewhere", Some("gitlab.com"), "GitSecretHostMismatch"),
        ("unbound", None, "GitSecretUnbound"),
        (
            "malformed",
            Some("https://github.com/org"),
            "GitSecretInvalid",
        ),
    ] {
        secrets
            .create(&PostParams::default(), &git_secret(app, host))
            .await
            .unwrap();
        apps.create(
            &PostParams::default(),
            &shapeblock(
                "App",
                app,
                web_spec(
                    json!({"url": url, "branch": "main", "isPrivate": true, "secretName": app}),
                ),
            ),
        )
        .await
        .unwrap();
        builds
            .create(
                &PostParams::default(),
                &shapeblock(
                    "AppBuild",
                    &format!("{app}-1"),
                    json!({"appName": app, "gitRef": "main"}),
                ),
            )
            .await
            .unwrap();
        let ready = app_reason(&apps, app, reason).await;
        assert_eq!(ready.status, "False", "{app}");
        assert!(
            ready.message.contains(&format!("git secret {ns}/{app}")),
            "{ready:?}"
        );
        let build = wait_for(&format!("{app}-1 waiting"), WAIT, async || {
            let status = builds.get_opt(&format!("{app}-1")).await.ok()??.status?;
            status
                .message
                .filter(|m| m.contains("to be Ready"))
                .map(|_| status.job_name)
        })
        .await;
        assert_eq!(build, None, "{app}: no build Job is rendered");
        assert_eq!(
            jobs_for(&admin, &ns, &format!("shapeblock.io/app={app}")).await,
            Vec::<String>::new()
        );
    }

    // Bound to the App's host: Ready, and the build Job's helper answers that host only.
    secrets
        .patch(
            "elsewhere",
            &PatchParams::default(),
            &Patch::Merge(&json!({"stringData": {"host": "github.com"}})),
        )
        .await
        .unwrap();
    // The fix is in the Secret, which no watch brings: the retry would; a touch is quicker.
    apps.patch(
        "elsewhere",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"description": "bound"}})),
    )
    .await
    .unwrap();
    app_reason(&apps, "elsewhere", "Ready").await;
    let job = wait_job(&admin, &ns, "elsewhere-1-build").await;
    let job = serde_json::to_value(job).unwrap();
    let clone = job["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "clone")
        .unwrap()
        .clone();
    let secret = secrets.get("elsewhere").await.unwrap();
    let answered = credential_fill(&clone, &secret, "https://github.com/org/web.git");
    assert!(
        answered.contains("password=s3cret-token"),
        "the bound host gets the token: {answered:?}"
    );
    for elsewhere in [
        "https://capture.example.com/org/web.git",
        "https://github.com.capture.example.com/org/web.git",
        "https://github.com:8443/org/web.git",
        "http://github.com/org/web.git",
    ] {
        let answered = credential_fill(&clone, &secret, elsewhere);
        assert!(
            !answered.contains("s3cret-token"),
            "{elsewhere} got the token: {answered:?}"
        );
    }
}

#[tokio::test]
async fn a_registry_secret_that_is_not_a_dockerconfigjson_is_never_copied() {
    let _one = ONE_CONTROLLING_HUB.lock().await;
    let cluster = connected_cluster("tenancy-registry").await;
    let admin = cluster.admin.clone();
    let suffix = support::random_suffix();
    let source = format!("not-registry-{suffix}");
    let sources: Api<Secret> = Api::namespaced(admin.clone(), "shapeblock");
    // Any Secret of the `shapeblock` namespace, a token, say: a Project naming it got a copy.
    sources
        .create(
            &PostParams::default(),
            &Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(source.clone()),
                    ..Default::default()
                },
                string_data: Some(BTreeMap::from([(
                    "token".to_string(),
                    "master-token".to_string(),
                )])),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let projects: Api<Project> = Api::all(admin.clone());
    let name = format!("reg-{suffix}");
    projects
        .create(
            &PostParams::default(),
            &shapeblock::<Project>("Project", &name, json!({"registrySecret": source})),
        )
        .await
        .unwrap();
    let ready = wait_for("the Project refused", WAIT, async || {
        let status = projects.get_opt(&name).await.ok()??.status?;
        (status.phase == Some(ProjectPhase::Failed))
            .then(|| condition(&status.conditions, "Ready"))
            .flatten()
    })
    .await;
    assert_eq!(ready.reason, "RegistrySecretNotDockerConfigJson");
    assert!(
        ready.message.contains("kubernetes.io/dockerconfigjson"),
        "{ready:?}"
    );
    // Nothing copied: not even the namespace it would have been copied into.
    assert!(
        Api::<Namespace>::all(admin.clone())
            .get_opt(&name)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        Api::<Secret>::namespaced(admin.clone(), &name)
            .get_opt("registry-creds")
            .await
            .unwrap()
            .is_none()
    );
    projects
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    sources
        .delete(&source, &DeleteParams::default())
        .await
        .unwrap();
}
