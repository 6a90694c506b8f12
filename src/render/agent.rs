//! The agent install manifest: everything a managed cluster needs to run the agent, and
//! nothing more. The hub serves it per cluster, with that cluster's token.

use serde_json::{Value, json};

/// Namespace the agent runs in.
pub const NAMESPACE: &str = "shapeblock-agent";
/// Name of the agent's ServiceAccount, ClusterRole, ClusterRoleBinding and Deployment.
pub const NAME: &str = "shapeblock-agent";
/// ClusterRole bound (by RoleBinding) to each project's deployer ServiceAccount.
pub const DEPLOYER_ROLE: &str = "shapeblock-deployer";
/// Secret holding the cluster token.
pub const TOKEN_SECRET: &str = "shapeblock-agent-token";

/// What varies per cluster.
#[derive(Clone, Debug)]
pub struct AgentManifestParams {
    pub cluster_id: String,
    /// URL the agent dials (`wss://…`).
    pub hub_url: String,
    pub image: String,
    /// The cluster token, written into the Secret.
    pub token: String,
}

fn labels(cluster_id: &str) -> Value {
    json!({
        "app.kubernetes.io/name": NAME,
        "app.kubernetes.io/part-of": "shapeblock",
        "app.kubernetes.io/managed-by": "shapeblock-hub",
        "shapeblock.io/cluster": cluster_id,
    })
}

/// What the hub's controllers and its resource API do in a managed cluster, and so all the
/// agent may do: each verb below is used by some code path, and nothing else is granted.
/// Server-side apply counts as `patch`, and as `create` too when the object is new. Writes
/// are limited to the kinds ShapeBlock manages; it reads pods (build progress, logs, App
/// health) and Deployments (rollouts) but cannot exec into pods; it can bind project deployers
/// only to `shapeblock-deployer`.
///
/// Secrets are readable cluster-wide because project namespaces are created at run time and
/// RBAC cannot scope a rule to namespaces by label: the controllers copy the registry
/// Secret into each project, create deploy keys and Helm values, and watch the Secrets they
/// manage (by label, metadata only).
pub fn agent_rules() -> Value {
    let applied = ["create", "patch"];
    json!([
        // Installed by server-side apply at each connect; only ShapeBlock's may change.
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
         "verbs": ["get", "list", "watch", "create"]},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
         "resourceNames": ["projects.apps.shapeblock.io", "apps.apps.shapeblock.io",
                           "appbuilds.apps.shapeblock.io", "services.apps.shapeblock.io"],
         "verbs": ["patch"]},
        // Watched by the controllers; created, applied, read and deleted by the API.
        {"apiGroups": ["apps.shapeblock.io"],
         "resources": ["projects", "apps", "appbuilds", "services"],
         "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": ["apps.shapeblock.io"],
         "resources": ["projects/status", "apps/status", "appbuilds/status", "services/status"],
         "verbs": ["get", "patch"]},
        // Children owned with blockOwnerDeletion need `update` on the owner's finalizers.
        {"apiGroups": ["apps.shapeblock.io"],
         "resources": ["projects/finalizers", "apps/finalizers", "appbuilds/finalizers",
                       "services/finalizers"],
         "verbs": ["update"]},
        // A project's namespace: applied, labelled, watched, deleted with the project.
        {"apiGroups": [""], "resources": ["namespaces"],
         "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["secrets"],
         "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create", "patch"]},
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": applied},
        {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list", "watch"]},
        // Apps' Deployments: the rollout a deploy follows, and the App's runtime status.
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["batch"], "resources": ["jobs"],
         "verbs": ["get", "list", "watch", "create", "delete"]},
        // Events on the ShapeBlock objects (`kubectl describe`), created once each; and the
        // Job controller's `FailedCreate` Events on a build Job that has no pod, read by field
        // selector.
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["rolebindings"], "verbs": applied},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"],
         "resourceNames": [DEPLOYER_ROLE], "verbs": ["bind"]},
    ])
}

/// What Helm needs inside one project namespace to install an app or a service chart. Bound
/// per namespace, never cluster-wide.
pub fn deployer_rules() -> Value {
    let rw = json!([
        "get", "list", "watch", "create", "update", "patch", "delete"
    ]);
    json!([
        {"apiGroups": [""],
         "resources": ["configmaps", "secrets", "services", "serviceaccounts", "persistentvolumeclaims",
                       "pods", "endpoints"],
         "verbs": rw},
        {"apiGroups": [""], "resources": ["pods/log", "events"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets", "daemonsets", "replicasets"], "verbs": rw},
        {"apiGroups": ["batch"], "resources": ["jobs", "cronjobs"], "verbs": rw},
        {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses", "networkpolicies"], "verbs": rw},
        {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": rw},
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": rw},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": rw},
        {"apiGroups": ["cert-manager.io"], "resources": ["certificates", "issuers"], "verbs": rw},
    ])
}

/// The objects of the install manifest, in apply order.
pub fn agent_manifest(p: &AgentManifestParams) -> Vec<Value> {
    let labels = labels(&p.cluster_id);
    vec![
        json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": merge(&labels, json!({
                "pod-security.kubernetes.io/enforce": "restricted"}))}
        }),
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": labels}
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": NAME, "labels": labels},
            "rules": agent_rules()
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": DEPLOYER_ROLE, "labels": labels},
            "rules": deployer_rules()
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": NAME, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
        }),
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": TOKEN_SECRET, "namespace": NAMESPACE, "labels": labels},
            "type": "Opaque",
            "stringData": {"token": p.token}
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": labels},
            "spec": {
                "replicas": 1,
                // One live tunnel per cluster: never run two agents during a rollout.
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": {"app.kubernetes.io/name": NAME}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": NAME,
                        "automountServiceAccountToken": true,
                        "enableServiceLinks": false,
                        "securityContext": {
                            "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"}
                        },
                        "containers": [{
                            "name": "agent",
                            "image": p.image,
                            "args": agent_args(&p.hub_url),
                            "env": [{"name": "SHAPEBLOCK_AGENT_LOG_FORMAT", "value": "json"}],
                            "resources": {
                                "requests": {"cpu": "10m", "memory": "16Mi"},
                                "limits": {"memory": "64Mi"}
                            },
                            "securityContext": {
                                "readOnlyRootFilesystem": true,
                                "allowPrivilegeEscalation": false,
                                "capabilities": {"drop": ["ALL"]}
                            },
                            "volumeMounts": [{"name": "token", "mountPath": "/var/run/shapeblock", "readOnly": true}]
                        }],
                        "volumes": [{"name": "token", "secret": {
                            "secretName": TOKEN_SECRET, "defaultMode": 0o440,
                            "items": [{"key": "token", "path": "token"}]
                        }}]
                    }
                }
            }
        }),
    ]
}

/// The agent's command line. A `ws://` hub URL is rendered only when the hub's operator allowed
/// it (`allow_insecure_hub_url`), so the agent is told to accept it too.
fn agent_args(hub_url: &str) -> Value {
    let mut args = json!([
        "--hub-url",
        hub_url,
        "--token-file",
        "/var/run/shapeblock/token"
    ]);
    if hub_url.starts_with("ws://")
        && let Some(args) = args.as_array_mut()
    {
        args.push(json!("--allow-plaintext"));
    }
    args
}

fn merge(a: &Value, b: Value) -> Value {
    let mut out = a.clone();
    if let (Some(out), Value::Object(b)) = (out.as_object_mut(), b) {
        out.extend(b);
    }
    out
}

/// The manifest as one multi-document YAML stream, ready for `kubectl apply -f -`.
pub fn to_yaml(objects: &[Value]) -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(object)?);
    }
    Ok(out)
}

/// The agent Helm chart's template: the same objects as [`agent_manifest`], with the values
/// that vary per cluster left to Helm. Generated into `charts/shapeblock-agent/templates/`
/// by `shapeblock-hub agent-chart` (CI fails on drift), so the chart and the hub's install
/// manifest cannot diverge.
pub fn helm_template() -> Result<String, serde_saphyr::SerializeError> {
    const SENTINELS: [(&str, &str); 4] = [
        (
            "SBCHART_CLUSTER_ID",
            r#"{{ required "clusterId is required" .Values.clusterId | quote }}"#,
        ),
        (
            "SBCHART_HUB_URL",
            r#"{{ required "hubUrl is required" .Values.hubUrl | quote }}"#,
        ),
        (
            "SBCHART_IMAGE",
            r#"{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) | quote }}"#,
        ),
        (
            "SBCHART_TOKEN",
            r#"{{ required "token is required" .Values.token | quote }}"#,
        ),
    ];
    let params = AgentManifestParams {
        cluster_id: SENTINELS[0].0.into(),
        hub_url: SENTINELS[1].0.into(),
        image: SENTINELS[2].0.into(),
        token: SENTINELS[3].0.into(),
    };
    let mut yaml = to_yaml(&agent_manifest(&params))?;
    for (sentinel, expression) in SENTINELS {
        for quoted in [
            format!("'{sentinel}'"),
            format!("\"{sentinel}\""),
            sentinel.to_string(),
        ] {
            yaml = yaml.replace(&quoted, expression);
        }
    }
    Ok(format!(
        "# Generated by `shapeblock-hub agent-chart --out charts/shapeblock-agent` from\n\
         # src/render/agent.rs, the same code that renders the hub's install manifests. Do not edit.\n{yaml}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> AgentManifestParams {
        AgentManifestParams {
            cluster_id: "c0123456789abcdef".into(),
            hub_url: "wss://hub.example.com".into(),
            image: "ghcr.io/shapeblock/shapeblock-agent:0.1.0".into(),
            token: "sbt_c0123456789abcdef_secret".into(),
        }
    }

    #[test]
    fn a_ws_hub_url_comes_with_allow_plaintext() {
        assert_eq!(
            agent_args("wss://hub.example.com"),
            json!([
                "--hub-url",
                "wss://hub.example.com",
                "--token-file",
                "/var/run/shapeblock/token"
            ])
        );
        let args = agent_args("ws://10.0.0.5:8080");
        assert_eq!(args[4], "--allow-plaintext");
    }

    #[test]
    fn the_agent_runs_locked_down() {
        let objects = agent_manifest(&params());
        let kinds: Vec<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRole",
                "ClusterRoleBinding",
                "Secret",
                "Deployment"
            ]
        );
        let deployment = &objects[6];
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        let container = &pod["containers"][0];
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(
            container["securityContext"]["allowPrivilegeEscalation"],
            false
        );
        assert_eq!(
            container["securityContext"]["capabilities"]["drop"],
            json!(["ALL"])
        );
        assert_eq!(container["resources"]["requests"]["memory"], "16Mi");
        // The token travels in the Secret, never on the command line.
        assert!(!container["args"].to_string().contains("sbt_"));
        assert_eq!(
            objects[5]["stringData"]["token"],
            "sbt_c0123456789abcdef_secret"
        );
    }

    #[test]
    fn the_agent_role_grants_no_wildcards_and_no_interactive_access() {
        let rules = agent_rules();
        for rule in rules.as_array().unwrap() {
            for field in ["apiGroups", "resources", "verbs"] {
                assert!(
                    !rule[field].as_array().unwrap().iter().any(|v| v == "*"),
                    "wildcard in {rule}"
                );
            }
            for resource in rule["resources"].as_array().unwrap() {
                let r = resource.as_str().unwrap();
                assert!(
                    ![
                        "pods/exec",
                        "pods/attach",
                        "pods/portforward",
                        "nodes/proxy",
                        "services/proxy"
                    ]
                    .contains(&r),
                    "{r}"
                );
            }
        }
        // Binding is only possible to the deployer role.
        let bind = rules
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["verbs"] == json!(["bind"]))
            .unwrap();
        assert_eq!(bind["resourceNames"], json!([DEPLOYER_ROLE]));
    }

    #[test]
    fn yaml_is_a_multi_document_stream() {
        let yaml = to_yaml(&agent_manifest(&params())).unwrap();
        assert_eq!(yaml.matches("---\n").count(), 7);
        assert!(yaml.contains("kind: Deployment"));
    }
}
