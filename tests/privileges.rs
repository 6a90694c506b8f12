//! The agent's identity is not cluster-admin (issue 14, item 7): requests made with the
//! install manifest's own ServiceAccount token (a real bound token, as the agent's pod has)
//! against the real control plane (RBAC authorization, the manifest's admission policy).
//! Refused: reading Secrets or ConfigMaps outside project namespaces, writing any Secret of
//! the registry namespace but the cluster's registry Secret, creating pods or Jobs in
//! `kube-system`, binding `cluster-admin`, binding the ShapeBlock roles to anyone else or
//! outside a project, deleting or adopting a namespace it did not create. Allowed: its work
//! in a project namespace. It also prints the identity's rules as `kubectl auth can-i --list`
//! does (the README's table).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use k8s_openapi::api::authorization::v1::{SelfSubjectRulesReview, SelfSubjectRulesReviewSpec};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use shapeblock::render::agent::{NAME, NAMESPACE, PROJECT_BINDING, PROJECT_ROLE};
use support::TestNamespace;
use support::cluster::{active_project, connected_cluster};
use support::hub::{scratch_dir, service_account_kubeconfig};

/// A client with the agent's own credentials.
async fn agent_client(test: &str) -> Client {
    let dir = scratch_dir(test);
    let path = service_account_kubeconfig(&dir, NAMESPACE, NAME).await;
    let kubeconfig = kube::config::Kubeconfig::read_from(path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// The apiserver's refusal of `result`: its code and message.
fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(e)) => (e.code, e.message),
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

/// Refused by RBAC (the authorizer, or its escalation check on a binding), before any
/// admission policy is asked.
fn forbidden<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>) {
    let (code, message) = refused(what, result);
    assert_eq!(code, 403, "{what}: {message}");
    assert!(
        !message.contains("ValidatingAdmissionPolicy")
            && (message.contains("cannot") || message.contains("not currently held")),
        "{what}: not refused by RBAC: {message}"
    );
}

/// Refused by the manifest's admission policy (RBAC alone would have let it through).
fn fenced<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>) {
    let (code, message) = refused(what, result);
    assert_eq!(code, 403, "{what}: {message}");
    assert!(
        message.contains("ValidatingAdmissionPolicy") && message.contains("the ShapeBlock agent"),
        "{what}: not refused by the agent's admission policy: {message}"
    );
}

fn object<K: serde::de::DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).unwrap()
}

fn binding(namespace: &str, role: &str, subject: Value) -> RoleBinding {
    object(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": format!("escalate-{}", support::random_suffix()), "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [subject]
    }))
}

fn job(name: &str) -> Job {
    object(json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": "busybox:1.36", "command": ["true"]}]}}}
    }))
}

#[tokio::test]
async fn the_agent_cannot_reach_outside_shapeblock_namespaces() {
    let cluster = connected_cluster("privileges").await;
    let admin = cluster.admin.clone();
    let project = active_project(&admin, "priv").await;
    let agent = agent_client("privileges-agent").await;
    let post = PostParams::default();

    // Secrets and ConfigMaps of kube-system (say, EKS's aws-auth): neither read nor listed,
    // and no Secret is listable across namespaces.
    let secret: Secret = object(json!({"metadata": {"name": "crown-jewels"},
        "stringData": {"password": "hunter2"}}));
    let _ = Api::<Secret>::namespaced(admin.clone(), "kube-system")
        .create(&post, &secret)
        .await;
    let config_map: ConfigMap =
        object(json!({"metadata": {"name": "aws-auth"}, "data": {"mapRoles": "[]"}}));
    let _ = Api::<ConfigMap>::namespaced(admin.clone(), "kube-system")
        .create(&post, &config_map)
        .await;
    let system_secrets: Api<Secret> = Api::namespaced(agent.clone(), "kube-system");
    forbidden(
        "get a Secret in kube-system",
        system_secrets.get("crown-jewels").await,
    );
    forbidden(
        "list Secrets in kube-system",
        system_secrets.list(&ListParams::default()).await,
    );
    forbidden(
        "list Secrets cluster-wide",
        Api::<Secret>::all(agent.clone())
            .list_metadata(&ListParams::default())
            .await,
    );
    let system_config_maps: Api<ConfigMap> = Api::namespaced(agent.clone(), "kube-system");
    forbidden(
        "get a ConfigMap in kube-system",
        system_config_maps.get("aws-auth").await,
    );
    forbidden(
        "list ConfigMaps in kube-system",
        system_config_maps.list(&ListParams::default()).await,
    );
    // Nor in its own namespace: its token Secret is its pod's, mounted, not read through the API.
    forbidden(
        "get its own token Secret",
        Api::<Secret>::namespaced(agent.clone(), NAMESPACE)
            .get("shapeblock-agent-token")
            .await,
    );

    // No workload of its own outside a project: neither a pod nor a Job in kube-system.
    let pod: Pod = object(json!({"metadata": {"name": "root-shell"}, "spec": {
        "hostPID": true, "containers": [{"name": "c", "image": "busybox:1.36",
            "securityContext": {"privileged": true}}]}}));
    forbidden(
        "create a pod in kube-system",
        Api::<Pod>::namespaced(agent.clone(), "kube-system")
            .create(&post, &pod)
            .await,
    );
    forbidden(
        "create a Job in kube-system",
        Api::<Job>::namespaced(agent.clone(), "kube-system")
            .create(&post, &job("miner"))
            .await,
    );

    // cluster-admin cannot be bound, by RoleBinding (anywhere, its project included) or
    // ClusterRoleBinding.
    let me = json!({"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE});
    for namespace in ["kube-system", project.as_str()] {
        forbidden(
            &format!("bind cluster-admin in {namespace}"),
            Api::<RoleBinding>::namespaced(agent.clone(), namespace)
                .create(&post, &binding(namespace, "cluster-admin", me.clone()))
                .await,
        );
    }
    let cluster_binding: ClusterRoleBinding = object(json!({
        "metadata": {"name": "shapeblock-agent-escalates"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [me]}));
    forbidden(
        "bind cluster-admin cluster-wide",
        Api::<ClusterRoleBinding>::all(agent.clone())
            .create(&post, &cluster_binding)
            .await,
    );
    // What RBAC lets through (it may bind the ShapeBlock roles, and RoleBindings are created
    // before the agent holds anything in a new namespace), the admission policy fences: the
    // roles only inside projects, and only to the ShapeBlock accounts.
    fenced(
        "bind its project role in kube-system",
        Api::<RoleBinding>::namespaced(agent.clone(), "kube-system")
            .create(&post, &binding("kube-system", PROJECT_ROLE, me.clone()))
            .await,
    );
    fenced(
        "bind the deployer role in kube-system",
        Api::<RoleBinding>::namespaced(agent.clone(), "kube-system")
            .create(
                &post,
                &binding(
                    "kube-system",
                    "shapeblock-deployer",
                    json!({"kind": "ServiceAccount", "name": "deployer", "namespace": "kube-system"}),
                ),
            )
            .await,
    );
    let outsider =
        json!({"kind": "User", "name": "mallory", "apiGroup": "rbac.authorization.k8s.io"});
    for role in [
        "shapeblock-deployer",
        PROJECT_ROLE,
        "shapeblock-team-admin",
        "shapeblock-team-viewer",
    ] {
        fenced(
            &format!("bind {role} to someone else in its project"),
            Api::<RoleBinding>::namespaced(agent.clone(), &project)
                .create(&post, &binding(&project, role, outsider.clone()))
                .await,
        );
    }

    // A team role only to ShapeBlock users and teams, and only in a project: not to a
    // ServiceAccount (which the agent could then use), nor in kube-system.
    fenced(
        "bind a team role to a ServiceAccount in its project",
        Api::<RoleBinding>::namespaced(agent.clone(), &project)
            .create(
                &post,
                &binding(&project, "shapeblock-team-admin", me.clone()),
            )
            .await,
    );
    let member = json!({"kind": "User", "name": "shapeblock:user:dev",
                        "apiGroup": "rbac.authorization.k8s.io"});
    fenced(
        "bind a team role in kube-system",
        Api::<RoleBinding>::namespaced(agent.clone(), "kube-system")
            .create(
                &post,
                &binding("kube-system", "shapeblock-team-admin", member.clone()),
            )
            .await,
    );
    Api::<RoleBinding>::namespaced(agent.clone(), &project)
        .create(&post, &binding(&project, "shapeblock-team-admin", member))
        .await
        .expect("the agent binds a team role to a ShapeBlock user in its project");
    // Of the ClusterRoles it changes only its impersonation: not a team role (RBAC), and not
    // its impersonation to cover a name that is no ShapeBlock user's (the policy).
    forbidden(
        "rewrite a team role",
        Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(agent.clone())
            .patch(
                "shapeblock-team-viewer",
                &PatchParams::default(),
                &Patch::Merge(
                    &json!({"rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}),
                ),
            )
            .await,
    );
    fenced(
        "impersonate system:admin",
        Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(agent.clone())
            .patch(
                "shapeblock-agent-impersonator",
                &PatchParams::default(),
                &Patch::Merge(
                    &json!({"rules": [{"apiGroups": [""], "resources": ["users"],
                    "verbs": ["impersonate"], "resourceNames": ["system:admin"]}]}),
                ),
            )
            .await,
    );

    // Namespaces: only project namespaces are created, changed or deleted.
    let foreign = TestNamespace::new("not-the-agents").await;
    let namespaces: Api<Namespace> = Api::all(agent.clone());
    fenced(
        "delete a namespace it did not create",
        namespaces
            .delete(&foreign.name, &DeleteParams::background())
            .await,
    );
    fenced(
        "adopt a namespace by labelling it a project's",
        namespaces
            .patch(
                &foreign.name,
                &PatchParams::default(),
                &Patch::Merge(
                    &json!({"metadata": {"labels": {"shapeblock.io/project": foreign.name}}}),
                ),
            )
            .await,
    );
    fenced(
        "create a namespace that is no project's",
        namespaces
            .create(
                &post,
                &object(
                    json!({"metadata": {"name": format!("free-{}", support::random_suffix())}}),
                ),
            )
            .await,
    );
    // A namespaced write in a namespace that is no project's, where RBAC would allow it (the
    // ShapeBlock kinds are granted cluster-wide).
    let app: shapeblock::crd::App = support::cluster::shapeblock(
        "App",
        "web",
        json!({"displayName": "Web", "registry": {}, "build": {"type": "image", "image": "nginx:1.27"}}),
    );
    fenced(
        "create an App outside a project",
        Api::<shapeblock::crd::App>::namespaced(agent.clone(), &foreign.name)
            .create(&post, &app)
            .await,
    );
    // One made there by someone else: the agent may say why it is not served (its status,
    // NotInProject), and nothing more.
    Api::<shapeblock::crd::App>::namespaced(admin.clone(), &foreign.name)
        .create(&post, &app)
        .await
        .unwrap();
    let foreign_apps = Api::<shapeblock::crd::App>::namespaced(agent.clone(), &foreign.name);
    let status = json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App",
        "status": {"phase": "Failed", "message": "not in a project"}});
    foreign_apps
        .patch_status(
            "web",
            &PatchParams::apply("privileges-test"),
            &Patch::Apply(&status),
        )
        .await
        .expect("the agent reports an App outside a project in its status");
    fenced(
        "change an App outside a project",
        foreign_apps
            .patch(
                "web",
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"displayName": "Taken"}})),
            )
            .await,
    );
    // The registry namespace is read; of its objects only the cluster's registry Secret is
    // written (the API's registry-credentials, by server-side apply as the hub does).
    let registry = Api::<Secret>::namespaced(agent.clone(), "shapeblock");
    let current = registry
        .get("registry-creds")
        .await
        .expect("the agent reads the registry Secret");
    let apply = PatchParams::apply("privileges-test").force();
    let same = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "registry-creds", "namespace": "shapeblock"},
        "type": "kubernetes.io/dockerconfigjson", "data": current.data});
    registry
        .patch("registry-creds", &apply, &Patch::Apply(&same))
        .await
        .expect("the agent writes the cluster's registry Secret");
    forbidden(
        "write in the registry namespace",
        registry.create(&post, &secret).await,
    );
    let other = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "team-registry-forged", "namespace": "shapeblock"},
        "type": "kubernetes.io/dockerconfigjson", "data": current.data});
    forbidden(
        "apply another Secret in the registry namespace",
        registry
            .patch("team-registry-forged", &apply, &Patch::Apply(&other))
            .await,
    );
    forbidden(
        "delete another Secret in the registry namespace",
        registry
            .delete("team-registry", &DeleteParams::default())
            .await,
    );
    // Its name in another namespace is still no project's.
    let in_system = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "registry-creds", "namespace": "kube-system"},
        "type": "kubernetes.io/dockerconfigjson", "data": current.data});
    forbidden(
        "apply a registry-creds Secret in kube-system",
        Api::<Secret>::namespaced(agent.clone(), "kube-system")
            .patch("registry-creds", &apply, &Patch::Apply(&in_system))
            .await,
    );

    // Its project: the Project controller bound it there first, owned by the Project, and it
    // does its work (a Secret, a Job; the rest is proven by the controllers' tests).
    let bound = Api::<RoleBinding>::namespaced(admin.clone(), &project)
        .get(PROJECT_BINDING)
        .await
        .expect("the agent's RoleBinding in its project");
    assert_eq!(bound.role_ref.name, PROJECT_ROLE);
    assert_eq!(bound.owner_references()[0].kind, "Project");
    assert_eq!(bound.owner_references()[0].name, project);
    let secrets: Api<Secret> = Api::namespaced(agent.clone(), &project);
    secrets
        .create(&post, &secret)
        .await
        .expect("a Secret in its project");
    secrets.get("crown-jewels").await.expect("reading it back");
    let jobs: Api<Job> = Api::namespaced(agent.clone(), &project);
    jobs.create(&post, &job("build"))
        .await
        .expect("a Job in its project");
    jobs.delete("build", &DeleteParams::background())
        .await
        .expect("deleting its Job");
    // A privileged pod in its project would be refused anyway (baseline Pod Security), but it
    // may not create pods at all: they come from its Jobs.
    forbidden(
        "create a pod in its project",
        Api::<Pod>::namespaced(agent.clone(), &project)
            .create(&post, &pod)
            .await,
    );

    // What `kubectl auth can-i --list` says (the README's table), cluster-wide and in a project.
    for (namespace, heading) in [
        ("default", "cluster-wide (namespace default)".to_string()),
        (project.as_str(), format!("in project namespace {project}")),
    ] {
        let rules = rules_review(&agent, namespace).await;
        println!(
            "kubectl auth can-i --list --as=system:serviceaccount:{NAMESPACE}:{NAME} # {heading}\n{rules}"
        );
        for line in rules.lines() {
            let resource = line.split_whitespace().next().unwrap_or_default();
            if namespace == "default" {
                assert!(
                    resource != "secrets" && resource != "configmaps",
                    "{resource} readable outside projects: {line}"
                );
            }
        }
        assert!(
            !rules.contains("[*]") && !rules.lines().any(|l| l.starts_with("*.*")),
            "{rules}"
        );
    }
}

/// The rules of the identity in `namespace`, formatted as `kubectl auth can-i --list` prints
/// them (it reads the same SelfSubjectRulesReview).
async fn rules_review(client: &Client, namespace: &str) -> String {
    let review = SelfSubjectRulesReview {
        spec: SelfSubjectRulesReviewSpec {
            namespace: Some(namespace.into()),
        },
        ..Default::default()
    };
    let status = Api::<SelfSubjectRulesReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .unwrap();
    let mut rows: Vec<[String; 4]> = vec![];
    for rule in status.resource_rules {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                let name = if group.is_empty() {
                    resource.clone()
                } else {
                    format!("{resource}.{group}")
                };
                rows.push([
                    name,
                    String::new(),
                    format!(
                        "[{}]",
                        rule.resource_names.clone().unwrap_or_default().join(" ")
                    ),
                    format!("[{}]", rule.verbs.join(" ")),
                ]);
            }
        }
    }
    for rule in status.non_resource_rules {
        for url in rule.non_resource_urls.unwrap_or_default() {
            rows.push([
                String::new(),
                format!("[{url}]"),
                "[]".into(),
                format!("[{}]", rule.verbs.join(" ")),
            ]);
        }
    }
    rows.sort();
    rows.dedup();
    let header = [
        "Resources".to_string(),
        "Non-Resource URLs".into(),
        "Resource Names".into(),
        "Verbs".into(),
    ];
    let widths: Vec<usize> = (0..4)
        .map(|i| {
            rows.iter()
                .chain([&header])
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in [&header].into_iter().chain(rows.iter()) {
        let line = (0..4)
            .map(|i| format!("{:width$}", row[i], width = widths[i]))
            .collect::<Vec<_>>()
            .join("   ");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
