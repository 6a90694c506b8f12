//! The agent install manifest: everything a managed cluster needs to run the agent, and
//! nothing more. The hub serves it per cluster, with that cluster's token.

use serde_json::{Value, json};

/// Namespace the agent runs in.
pub const NAMESPACE: &str = "shapeblock-agent";
/// Name of the agent's ServiceAccount, ClusterRole, ClusterRoleBinding, Deployment and of its
/// admission policy.
pub const NAME: &str = "shapeblock-agent";
/// ClusterRole bound (by RoleBinding) to each project's deployer ServiceAccount.
pub const DEPLOYER_ROLE: &str = "shapeblock-deployer";
/// Name of each project's deployer ServiceAccount (and of its RoleBinding).
pub const DEPLOYER_ACCOUNT: &str = "deployer";
/// ClusterRole the Project controller binds to the agent inside each project namespace: all
/// the agent may write there, and nothing outside.
pub const PROJECT_ROLE: &str = "shapeblock-agent-project";
/// Name of the RoleBinding of [`PROJECT_ROLE`] in each project namespace.
pub const PROJECT_BINDING: &str = "shapeblock-agent";
/// Role (and RoleBinding) of the agent in the registry source namespace.
pub const REGISTRY_ROLE: &str = "shapeblock-agent-registry";
/// Role (and RoleBinding) of the agent over its own Deployment, in [`NAMESPACE`]: the hub's
/// fleet upgrades set the agent's image through it (`crate::hub::upgrades`).
pub const SELF_ROLE: &str = "shapeblock-agent-self";
/// ClusterRole that lets the agent impersonate people: the users and team groups of the kubectl
/// requests the hub forwards ([`IMPERSONATED_USER_PREFIX`], [`IMPERSONATED_GROUP_PREFIX`]).
pub const IMPERSONATOR_ROLE: &str = "shapeblock-agent-impersonator";
pub use crate::tunnel::{IMPERSONATED_GROUP_PREFIX, IMPERSONATED_USER_PREFIX};
/// The ClusterRoles a Team binds in a project namespace, by role (`shapeblock-team-<role>`).
pub const TEAM_ROLES: [&str; 3] = [
    "shapeblock-team-admin",
    "shapeblock-team-developer",
    "shapeblock-team-viewer",
];
/// The agent's container in its Deployment.
pub const CONTAINER: &str = "agent";
/// Label on every project namespace (its value: the Project's name, which is also the
/// namespace's). The admission policy lets the agent write only in namespaces carrying it.
pub const PROJECT_LABEL: &str = "shapeblock.io/project";
/// Secret holding the cluster token.
pub const TOKEN_SECRET: &str = "shapeblock-agent-token";
/// ConfigMap holding the hub's CA certificates (key `ca.crt`), when the hub has a private CA.
pub const HUB_CA_CONFIG_MAP: &str = "shapeblock-agent-hub-ca";
/// Where the agent's container finds the hub's CA certificates.
const HUB_CA_DIR: &str = "/etc/shapeblock/hub-ca";

/// The username the apiserver gives the agent's ServiceAccount.
pub fn agent_user() -> String {
    format!("system:serviceaccount:{NAMESPACE}:{NAME}")
}

/// What varies per cluster.
#[derive(Clone, Debug)]
pub struct AgentManifestParams {
    pub cluster_id: String,
    /// URL the agent dials (`wss://…`).
    pub hub_url: String,
    pub image: String,
    /// The cluster token, written into the Secret.
    pub token: String,
    /// Namespace holding the registry Secrets Projects copy (the hub's
    /// `registry_source_namespace`): the agent may read Secrets there and nowhere else
    /// outside project namespaces.
    pub registry_namespace: String,
    /// The cluster's registry Secret in `registry_namespace` (the hub's
    /// `default_registry_secret`): the one Secret outside project namespaces the agent may
    /// write, so the hub's API can set and rotate it.
    pub registry_secret: String,
    /// The hub's CA certificates (PEM), when the hub's certificate is from a private CA: put in
    /// a ConfigMap the agent trusts instead of the web's roots (`--hub-ca-file`).
    pub hub_ca: Option<String>,
}

fn labels(cluster_id: &str) -> Value {
    json!({
        "app.kubernetes.io/name": NAME,
        "app.kubernetes.io/part-of": "shapeblock",
        "app.kubernetes.io/managed-by": "shapeblock-hub",
        "shapeblock.io/cluster": cluster_id,
    })
}

/// What the agent may do cluster-wide: only what cannot be scoped to a namespace the hub
/// creates. Each verb below is used by some code path, and nothing else is granted.
/// Server-side apply counts as `patch`, and as `create` too when the object is new.
///
/// - the ShapeBlock kinds (the hub's resource API and the controllers' status and finalizers);
/// - namespaces: projects' namespaces are created, labelled and deleted here (the admission
///   policy of [`admission_policy`] fences which: only those labelled [`PROJECT_LABEL`]);
/// - reading what the controllers watch across namespaces: pods, Jobs and Deployments
///   (never Secrets or ConfigMaps, which are read by name inside project namespaces);
/// - Events (Projects' go to `default`);
/// - RoleBindings, because the first one in a new project namespace (the agent's own, to
///   [`PROJECT_ROLE`]) must be created before the agent holds anything there, and Teams'
///   bindings are listed and removed by label; `bind` only on the ShapeBlock ClusterRoles
///   (the agent's, the deployer's, the three team roles), and the admission policy fences
///   their subjects.
///
/// - the ClusterRole [`IMPERSONATOR_ROLE`] (patch and escalate, by name): its rules, fenced by
///   the admission policy, are the impersonation of the people Teams name.
///
/// Everything else it writes (Jobs, Secrets, ConfigMaps, ServiceAccounts…) comes from
/// [`project_rules`], bound inside each project namespace.
pub fn agent_rules() -> Value {
    let applied = ["create", "patch"];
    let read = ["get", "list", "watch"];
    json!([
        // Installed by server-side apply at each connect; only ShapeBlock's may change.
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
         "verbs": ["get", "list", "watch", "create"]},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
         "resourceNames": ["projects.apps.shapeblock.io", "apps.apps.shapeblock.io",
                           "appbuilds.apps.shapeblock.io", "services.apps.shapeblock.io",
                           "teams.apps.shapeblock.io"],
         "verbs": ["patch"]},
        // Watched by the controllers; created, applied, read and deleted by the API.
        {"apiGroups": ["apps.shapeblock.io"],
         "resources": ["projects", "apps", "appbuilds", "services", "teams"],
         "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": ["apps.shapeblock.io"],
         "resources": ["projects/status", "apps/status", "appbuilds/status", "services/status",
                       "teams/status"],
         "verbs": ["get", "patch"]},
        // Children owned with blockOwnerDeletion need `update` on the owner's finalizers.
        {"apiGroups": ["apps.shapeblock.io"],
         "resources": ["projects/finalizers", "apps/finalizers", "appbuilds/finalizers",
                       "services/finalizers", "teams/finalizers"],
         "verbs": ["update"]},
        // A project's namespace: applied, labelled, watched, deleted with the project.
        {"apiGroups": [""], "resources": ["namespaces"],
         "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        // Watched across namespaces: build and App pods, Jobs, Apps' Deployments (rollouts).
        {"apiGroups": [""], "resources": ["pods"], "verbs": read},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": read},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": read},
        // Events on the ShapeBlock objects (`kubectl describe`), created once each.
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["rolebindings"], "verbs": applied},
        // Teams' RoleBindings: found by label across namespaces, removed when a Team changes.
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["rolebindings"],
         "verbs": ["list", "watch", "delete"]},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"],
         "resourceNames": [PROJECT_ROLE, DEPLOYER_ROLE, TEAM_ROLES[0], TEAM_ROLES[1], TEAM_ROLES[2]],
         "verbs": ["bind"]},
        // The impersonation of the people Teams name, kept by the Team controller. `escalate`
        // because the agent does not hold what it grants; the admission policy fences the
        // rules to impersonating ShapeBlock users and teams by name.
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"],
         "resourceNames": [IMPERSONATOR_ROLE], "verbs": ["patch", "escalate"]},
    ])
}

/// What the agent does inside one project namespace, bound there by the Project controller
/// (RoleBinding [`PROJECT_BINDING`]) before it creates anything else in it: the registry copy,
/// deploy keys, Helm values and their Secrets (Helm's release Secrets listed, metadata only),
/// known_hosts ConfigMaps, the deployer ServiceAccount, build and Helm Jobs, pod logs, and the
/// Job controller's `FailedCreate` Events on a build Job that has no pod (listed by field
/// selector).
pub fn project_rules() -> Value {
    json!([
        {"apiGroups": [""], "resources": ["secrets"],
         "verbs": ["get", "list", "create", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "patch"]},
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["create", "patch"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "delete"]},
    ])
}

/// What the agent does in the registry source namespace: reads the registry Secrets Projects
/// copy (any name a Project's `spec.registrySecret` gives, so not by resource name), and
/// watches them, metadata only, to re-sync the copies; writes the cluster's own registry
/// Secret, `registry_secret`, and no other (the API's `registry-credentials`; by server-side
/// apply, so `create` is asked with the name and `resourceNames` holds for it too).
pub fn registry_rules(registry_secret: &str) -> Value {
    json!([
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [registry_secret],
         "verbs": ["create", "patch", "delete"]},
    ])
}

/// What the agent may do to itself: read and patch its own Deployment, by name, so the hub can
/// upgrade it. The admission policy fences the patch to a new image of the same repository.
pub fn self_rules() -> Value {
    json!([
        {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": [NAME],
         "verbs": ["get", "patch"]},
    ])
}

/// The repository of an image reference: `registry:5000/agent:1.2` → `registry:5000/agent`
/// (a tag is after the last `:` only when no `/` follows it; a digest after `@`).
pub fn image_repository(image: &str) -> &str {
    let image = image.split_once('@').map_or(image, |(name, _)| name);
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => &image[..colon],
        _ => image,
    }
}

/// CEL of the agent's admission policy: the only writes it lets through are in project
/// namespaces, to project namespaces, RoleBindings of the ShapeBlock roles to the
/// ShapeBlock accounts, and the cluster's registry Secret (`registry_secret` in
/// `registry_namespace`, by name). RBAC cannot say "namespaces with this label", and a hub
/// that is compromised holds the agent's rights: this is what keeps it from widening them.
///
/// Its own Deployment the agent may only update (the hub's fleet upgrades), to an image of
/// `image_repository` (the manifest's), with every other part of its containers, its volumes
/// and its ServiceAccount unchanged: a compromised hub cannot run another program, or the
/// agent's program with other arguments or credentials, in the cluster.
pub fn admission_policy(
    registry_namespace: &str,
    registry_secret: &str,
    image_repository: &str,
) -> Value {
    let user = agent_user();
    let label = PROJECT_LABEL;
    // A namespace object (`object` or `oldObject`) that is a project's: labelled with its own name.
    let project_namespace = |o: &str| {
        format!(
            "{o} != null && has({o}.metadata.labels) && '{label}' in {o}.metadata.labels \
             && {o}.metadata.labels['{label}'] == {o}.metadata.name"
        )
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": NAME},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": ["*"], "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE", "DELETE"],
                "resources": ["*/*"], "scope": "*"
            }]},
            "matchConditions": [{"name": "the-shapeblock-agent",
                "expression": format!("request.userInfo.username == '{user}'")}],
            "variables": [
                // Absent, not empty, on a cluster-scoped request.
                {"name": "requestNamespace", "expression": "has(request.namespace) ? request.namespace : ''"},
                {"name": "isNamespace",
                 "expression": "request.resource.group == '' && request.resource.resource == 'namespaces'"},
                {"name": "inProject", "expression": project_namespace("namespaceObject")},
                {"name": "oldIsProject", "expression": project_namespace("oldObject")},
                {"name": "newIsProject", "expression": project_namespace("object")},
                // What the controllers report on an object wherever it is, including why they
                // refuse one outside a project (NotInProject): the status of a ShapeBlock kind,
                // and an Event. Neither grants anything.
                {"name": "isReport",
                 "expression": "(request.resource.group == 'apps.shapeblock.io' && has(request.subResource) && request.subResource == 'status') \
                                || (request.resource.group == 'events.k8s.io' && request.resource.resource == 'events' \
                                    && request.operation == 'CREATE')"},
                {"name": "isRoleBinding",
                 "expression": "request.resource.group == 'rbac.authorization.k8s.io' && request.resource.resource == 'rolebindings'"},
                // The cluster's registry Secret, which the API sets and rotates; no other object
                // of the registry namespace.
                {"name": "isRegistrySecret",
                 "expression": format!("request.resource.group == '' && request.resource.resource == 'secrets' \
                                        && variables.requestNamespace == '{registry_namespace}' \
                                        && !has(request.subResource) \
                                        && has(request.name) && request.name == '{registry_secret}'")},
                {"name": "isClusterRole",
                 "expression": "request.resource.group == 'rbac.authorization.k8s.io' && request.resource.resource == 'clusterroles'"},
                {"name": "isAgentDeployment",
                 "expression": format!("request.resource.group == 'apps' && request.resource.resource == 'deployments' \
                                        && variables.requestNamespace == '{NAMESPACE}'")},
            ],
            "validations": [
                {
                    // A namespace's own request carries its name as `request.namespace` but no
                    // `namespaceObject`: namespaces are judged by the next rule.
                    "expression": "variables.requestNamespace == '' || variables.isNamespace || variables.inProject \
                                   || variables.isReport || variables.isRegistrySecret || variables.isAgentDeployment",
                    "messageExpression": format!("'the ShapeBlock agent writes only in project namespaces (labelled {label}) and the registry Secret {registry_namespace}/{registry_secret}, not in ' + variables.requestNamespace"),
                    "reason": "Forbidden"
                },
                {
                    "expression": "!variables.isNamespace || (request.operation == 'DELETE' ? variables.oldIsProject \
                                   : variables.newIsProject && (request.operation == 'CREATE' || variables.oldIsProject))",
                    "messageExpression": format!("'the ShapeBlock agent creates, changes and deletes only project namespaces (labelled {label} with their own name), not ' + (has(request.name) ? request.name : '')"),
                    "reason": "Forbidden"
                },
                {
                    "expression": format!(
                        "!variables.isRoleBinding || request.operation == 'DELETE' || \
                         (object.roleRef.kind == 'ClusterRole' && \
                          ((object.roleRef.name == '{DEPLOYER_ROLE}' && (!has(object.subjects) || \
                            object.subjects.all(s, s.kind == 'ServiceAccount' && s.name == '{DEPLOYER_ACCOUNT}' \
                              && s.namespace == variables.requestNamespace))) || \
                           (object.roleRef.name == '{PROJECT_ROLE}' && (!has(object.subjects) || \
                            object.subjects.all(s, s.kind == 'ServiceAccount' && s.name == '{NAME}' \
                              && s.namespace == '{NAMESPACE}'))) || \
                           (object.roleRef.name in ['{team_admin}', '{team_developer}', '{team_viewer}'] \
                            && (!has(object.subjects) || object.subjects.all(s, \
                              (s.kind == 'User' && s.name.startsWith('{IMPERSONATED_USER_PREFIX}')) || \
                              (s.kind == 'Group' && s.name.startsWith('{IMPERSONATED_GROUP_PREFIX}')))))))",
                        team_admin = TEAM_ROLES[0], team_developer = TEAM_ROLES[1], team_viewer = TEAM_ROLES[2]),
                    "message": format!("the ShapeBlock agent binds only ClusterRole {DEPLOYER_ROLE} to its namespace's {DEPLOYER_ACCOUNT} ServiceAccount, {PROJECT_ROLE} to itself, and the team roles to ShapeBlock users ({IMPERSONATED_USER_PREFIX}…) and teams ({IMPERSONATED_GROUP_PREFIX}…)"),
                    "reason": "Forbidden"
                },
                {
                    "expression": format!(
                        "!variables.isClusterRole || (request.operation == 'UPDATE' && request.name == '{IMPERSONATOR_ROLE}' \
                         && !has(object.aggregationRule) && (!has(object.rules) || object.rules.all(r, \
                              r.apiGroups == [''] && r.verbs == ['impersonate'] && size(r.resources) == 1 \
                              && !has(r.nonResourceURLs) && has(r.resourceNames) && size(r.resourceNames) > 0 \
                              && ((r.resources[0] == 'users' && r.resourceNames.all(n, n.startsWith('{IMPERSONATED_USER_PREFIX}'))) \
                                  || (r.resources[0] == 'groups' && r.resourceNames.all(n, n.startsWith('{IMPERSONATED_GROUP_PREFIX}')))))))"),
                    "message": format!("the ShapeBlock agent changes only ClusterRole {IMPERSONATOR_ROLE}, to impersonate ShapeBlock users ({IMPERSONATED_USER_PREFIX}…) and teams ({IMPERSONATED_GROUP_PREFIX}…) by name"),
                    "reason": "Forbidden"
                },
                {
                    "expression": format!(
                        "!variables.isAgentDeployment || (request.operation == 'UPDATE' && !has(request.subResource) \
                         && request.name == '{NAME}' \
                         && object.spec.?replicas == oldObject.spec.?replicas \
                         && object.spec.template.spec.?serviceAccountName == oldObject.spec.template.spec.?serviceAccountName \
                         && object.spec.template.spec.?volumes == oldObject.spec.template.spec.?volumes \
                         && size(object.spec.template.spec.containers) == size(oldObject.spec.template.spec.containers) \
                         && !has(object.spec.template.spec.initContainers) \
                         && object.spec.template.spec.containers.all(c, \
                              (c.image.startsWith('{image_repository}:') || c.image.startsWith('{image_repository}@')) \
                              && oldObject.spec.template.spec.containers.exists(o, o.name == c.name \
                                   && o.?command == c.?command && o.?args == c.?args && o.?env == c.?env \
                                   && o.?envFrom == c.?envFrom && o.?volumeMounts == c.?volumeMounts)))"),
                    "message": format!("the ShapeBlock agent changes only the image of its own Deployment {NAMESPACE}/{NAME}, to another tag of {image_repository}"),
                    "reason": "Forbidden"
                },
            ]
        }
    })
}

/// Applies [`admission_policy`] to every request of the agent, refusing what it does not allow.
pub fn admission_policy_binding() -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": NAME},
        "spec": {"policyName": NAME, "validationActions": ["Deny"]}
    })
}

/// What a Team's role grants in each of its projects' namespaces (bound there by RoleBinding,
/// never cluster-wide), for `role` in `admin`, `developer`, `viewer`:
///
/// - a viewer reads the ShapeBlock kinds, pods and their logs, Services, Events and the
///   workloads (Deployments, Jobs, Ingresses…), and never Secrets or ConfigMaps;
/// - a developer also creates, changes and deletes Apps, AppBuilds and Services (the
///   ShapeBlock kinds);
/// - an admin also manages the namespace's Secrets and ConfigMaps.
///
/// None grants RBAC, exec, attach, port-forward or proxy, or anything cluster-scoped.
pub fn team_rules(role: crate::crd::TeamRole) -> Value {
    use crate::crd::TeamRole;
    let read = json!(["get", "list", "watch"]);
    let write = json!([
        "get", "list", "watch", "create", "update", "patch", "delete"
    ]);
    let shapeblock = json!(["apps", "appbuilds", "services"]);
    let mut rules = vec![
        json!({"apiGroups": ["apps.shapeblock.io"], "resources": shapeblock,
               "verbs": if role == TeamRole::Viewer { read.clone() } else { write.clone() }}),
        json!({"apiGroups": [""],
               "resources": ["pods", "pods/log", "services", "endpoints", "events", "persistentvolumeclaims"],
               "verbs": read}),
        json!({"apiGroups": ["apps"], "resources": ["deployments", "replicasets", "statefulsets"], "verbs": read}),
        json!({"apiGroups": ["batch"], "resources": ["jobs", "cronjobs"], "verbs": read}),
        json!({"apiGroups": ["networking.k8s.io"], "resources": ["ingresses"], "verbs": read}),
        json!({"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": read}),
        json!({"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": read}),
    ];
    if role == TeamRole::Admin {
        rules.push(
            json!({"apiGroups": [""], "resources": ["secrets", "configmaps"], "verbs": write}),
        );
    }
    Value::Array(rules)
}

/// The ClusterRole of a Team role (`shapeblock-team-admin` …).
pub fn team_role_name(role: crate::crd::TeamRole) -> &'static str {
    use crate::crd::TeamRole;
    match role {
        TeamRole::Admin => TEAM_ROLES[0],
        TeamRole::Developer => TEAM_ROLES[1],
        TeamRole::Viewer => TEAM_ROLES[2],
    }
}

/// What the agent may impersonate to act for people: exactly the users and the team groups
/// that some Team of the cluster names (`shapeblock:user:<id>` for each member,
/// `shapeblock:team:<name>` for each Team), by resource name. The Team controller keeps these
/// rules in the ClusterRole [`IMPERSONATOR_ROLE`] (the install manifest ships it without rules,
/// so re-applying the manifest leaves them alone); the admission policy lets the agent write
/// nothing else there. So even the agent's own token impersonates no one but the people Teams
/// name, who can do only what Teams' RoleBindings grant; and the agent's code refuses any other
/// name, a uid or extra fields before a request reaches the apiserver (`crate::agent::proxy`).
pub fn impersonator_rules(users: &[String], groups: &[String]) -> Value {
    let mut rules = Vec::new();
    for (resource, names) in [("users", users), ("groups", groups)] {
        if !names.is_empty() {
            rules.push(json!({"apiGroups": [""], "resources": [resource],
                              "resourceNames": names, "verbs": ["impersonate"]}));
        }
    }
    Value::Array(rules)
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
    let mut objects = vec![
        json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": merge(&labels, json!({
                "pod-security.kubernetes.io/enforce": "restricted"}))}
        }),
        // Registry Secrets live here; the agent needs the namespace to exist to be granted
        // reading them.
        json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": p.registry_namespace, "labels": labels}
        }),
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": labels}
        }),
        // The fence first: the agent never holds its rights without it.
        with_labels(
            admission_policy(
                &p.registry_namespace,
                &p.registry_secret,
                image_repository(&p.image),
            ),
            &labels,
        ),
        with_labels(admission_policy_binding(), &labels),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": NAME, "labels": labels},
            "rules": agent_rules()
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": PROJECT_ROLE, "labels": labels},
            "rules": project_rules()
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": DEPLOYER_ROLE, "labels": labels},
            "rules": deployer_rules()
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": TEAM_ROLES[0], "labels": labels},
            "rules": team_rules(crate::crd::TeamRole::Admin)
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": TEAM_ROLES[1], "labels": labels},
            "rules": team_rules(crate::crd::TeamRole::Developer)
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": TEAM_ROLES[2], "labels": labels},
            "rules": team_rules(crate::crd::TeamRole::Viewer)
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": NAME, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
        }),
        // Its rules are the Team controller's (`impersonator_rules`): none here, so that
        // applying the manifest again does not take them away.
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": IMPERSONATOR_ROLE, "labels": labels}
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": IMPERSONATOR_ROLE, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": IMPERSONATOR_ROLE},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": REGISTRY_ROLE, "namespace": p.registry_namespace, "labels": labels},
            "rules": registry_rules(&p.registry_secret)
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": REGISTRY_ROLE, "namespace": p.registry_namespace, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": REGISTRY_ROLE},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": SELF_ROLE, "namespace": NAMESPACE, "labels": labels},
            "rules": self_rules()
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": SELF_ROLE, "namespace": NAMESPACE, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SELF_ROLE},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
        }),
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": TOKEN_SECRET, "namespace": NAMESPACE, "labels": labels},
            "type": "Opaque",
            "stringData": {"token": p.token}
        }),
    ];
    if let Some(ca) = &p.hub_ca {
        objects.push(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": HUB_CA_CONFIG_MAP, "namespace": NAMESPACE, "labels": labels},
            "data": {"ca.crt": ca}
        }));
    }
    let mut mounts =
        vec![json!({"name": "token", "mountPath": "/var/run/shapeblock", "readOnly": true})];
    let mut volumes = vec![json!({"name": "token", "secret": {
        "secretName": TOKEN_SECRET, "defaultMode": 0o440,
        "items": [{"key": "token", "path": "token"}]
    }})];
    if p.hub_ca.is_some() {
        mounts.push(json!({"name": "hub-ca", "mountPath": HUB_CA_DIR, "readOnly": true}));
        volumes.push(json!({"name": "hub-ca", "configMap": {
            "name": HUB_CA_CONFIG_MAP, "items": [{"key": "ca.crt", "path": "ca.crt"}]
        }}));
    }
    objects.push(json!({
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
                        // The token file is mode 0440: readable by the agent through its
                        // group, which the kubelet gives the Secret volume's files.
                        "fsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"}
                    },
                    "containers": [{
                        "name": CONTAINER,
                        "image": p.image,
                        "args": agent_args(&p.hub_url, p.hub_ca.is_some()),
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
                        "volumeMounts": mounts
                    }],
                    "volumes": volumes
                }
            }
        }
    }));
    objects
}

/// The agent's command line. A `ws://` hub URL is rendered only when the hub's operator allowed
/// it (`allow_insecure_hub_url`), so the agent is told to accept it too. With the hub's CA
/// (`hub_ca`), the agent trusts that CA, mounted from [`HUB_CA_CONFIG_MAP`], and nothing else.
fn agent_args(hub_url: &str, hub_ca: bool) -> Value {
    let mut args = vec![
        json!("--hub-url"),
        json!(hub_url),
        json!("--token-file"),
        json!("/var/run/shapeblock/token"),
    ];
    if hub_url.starts_with("ws://") {
        args.push(json!("--allow-plaintext"));
    }
    if hub_ca {
        args.push(json!("--hub-ca-file"));
        args.push(json!(format!("{HUB_CA_DIR}/ca.crt")));
    }
    Value::Array(args)
}

/// `object` with these labels in its metadata.
fn with_labels(mut object: Value, labels: &Value) -> Value {
    object["metadata"]["labels"] = labels.clone();
    object
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

/// The image of the chart templates: whole, it becomes the chart's image expression; its
/// repository part ([`REPOSITORY_SENTINEL`], in the admission policy) the chart's repository.
const IMAGE_SENTINEL: &str = "SBCHART_IMAGE_REPOSITORY:SBCHART_IMAGE_TAG";
const REPOSITORY_SENTINEL: &str = "SBCHART_IMAGE_REPOSITORY";

/// The agent Helm chart's template: the same objects as [`agent_manifest`], with the values
/// that vary per cluster left to Helm. Generated into `charts/shapeblock-agent/templates/`
/// by `shapeblock-hub agent-chart` (CI fails on drift), so the chart and the hub's install
/// manifest cannot diverge.
pub fn helm_template() -> Result<String, serde_saphyr::SerializeError> {
    // (sentinel, the value as Helm expression), replaced by [`substitute`].
    const SENTINELS: [(&str, &str); 8] = [
        (
            "SBCHART_CLUSTER_ID",
            r#"required "clusterId is required" .Values.clusterId"#,
        ),
        (
            "SBCHART_HUB_URL",
            r#"required "hubUrl is required" .Values.hubUrl"#,
        ),
        (
            IMAGE_SENTINEL,
            r#"printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion)"#,
        ),
        (
            "SBCHART_TOKEN",
            r#"required "token is required" .Values.token"#,
        ),
        (
            "SBCHART_REGISTRY_NAMESPACE",
            r#".Values.registryNamespace | default "shapeblock""#,
        ),
        (
            "SBCHART_REGISTRY_SECRET",
            r#".Values.registrySecret | default "registry-creds""#,
        ),
        ("SBCHART_HUB_CA", ".Values.hubCA"),
        // In the admission policy's CEL (after the whole image above).
        (REPOSITORY_SENTINEL, ".Values.image.repository"),
    ];
    let params = AgentManifestParams {
        cluster_id: SENTINELS[0].0.into(),
        hub_url: SENTINELS[1].0.into(),
        image: SENTINELS[2].0.into(),
        token: SENTINELS[3].0.into(),
        registry_namespace: SENTINELS[4].0.into(),
        registry_secret: SENTINELS[5].0.into(),
        hub_ca: None,
    };
    // The objects with a hub CA (`hubCA` set) and without: one that differs is rendered both
    // ways under `if .Values.hubCA`, one only there under it, so each variant is exactly
    // what the hub renders.
    let plain = agent_manifest(&params);
    let with_ca = agent_manifest(&AgentManifestParams {
        hub_ca: Some(SENTINELS[6].0.into()),
        ..params
    });
    let key = |o: &Value| (o["kind"].clone(), o["metadata"]["name"].clone());
    let mut yaml = String::new();
    for object in &with_ca {
        let text = to_yaml(std::slice::from_ref(object))?;
        match plain.iter().find(|o| key(o) == key(object)) {
            Some(same) if same == object => yaml.push_str(&text),
            Some(other) => {
                let other = to_yaml(std::slice::from_ref(other))?;
                yaml.push_str(&format!(
                    "{{{{- if .Values.hubCA }}}}\n{text}{{{{- else }}}}\n{other}{{{{- end }}}}\n"
                ));
            }
            None => yaml.push_str(&format!(
                "{{{{- if .Values.hubCA }}}}\n{text}{{{{- end }}}}\n"
            )),
        }
    }
    let out = substitute(&yaml, &SENTINELS);
    Ok(format!(
        "# Generated by `shapeblock-hub agent-chart --out charts/shapeblock-agent` from\n\
         # src/render/agent.rs, the same code that renders the hub's install manifests. Do not edit.\n{out}"
    ))
}

/// `yaml` with each sentinel replaced by its Helm expression: a sentinel that is a whole YAML
/// value by the expression `| quote`d, one inside a longer string (the admission policy's CEL
/// names the registry Secret) by the bare value.
fn substitute(yaml: &str, sentinels: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(yaml.len() * 2);
    for line in yaml.lines() {
        let mut line = line.to_string();
        for (sentinel, expression) in sentinels {
            for whole in [
                format!("'{sentinel}'"),
                format!("\"{sentinel}\""),
                sentinel.to_string(),
            ] {
                for prefix in [": ", "- "] {
                    let value = format!("{prefix}{whole}");
                    if line.ends_with(&value) {
                        let keep = line.len() - whole.len();
                        line = format!("{}{{{{ {expression} | quote }}}}", &line[..keep]);
                    }
                }
            }
            line = line.replace(sentinel, &format!("{{{{ {expression} }}}}"));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The hub chart's template of its own cluster's agent (`localCluster.enabled`): the install
/// manifest's objects, with the token the chart generates for the hub and the agent alike, and
/// the hub's Service as a `ws://` URL inside the cluster. Generated into
/// `charts/shapeblock-hub/templates/local-cluster.yaml` by `shapeblock-hub agent-chart
/// --hub-chart charts/shapeblock-hub` (CI fails on drift).
///
/// A Namespace the release itself is installed in (`helm install -n shapeblock
/// --create-namespace`, the registry namespace's default name) is left out: Helm refuses to
/// own a namespace it did not create, and the release's namespace exists already.
pub fn local_cluster_template() -> Result<String, serde_saphyr::SerializeError> {
    let registry_namespace = r#".Values.config.registry_source_namespace | default "shapeblock""#;
    let sentinels: [(&str, &str); 7] = [
        (
            "SBCHART_CLUSTER_ID",
            r#"include "shapeblock-hub.localClusterId" ."#,
        ),
        // The host and port: the URL is rendered `ws://` (so the agent is told to accept it).
        (
            "SBCHART_HUB_URL",
            r#".Values.localCluster.hubAddress | default (printf "%s.%s.svc:%v" .Release.Name .Release.Namespace .Values.service.port)"#,
        ),
        (
            IMAGE_SENTINEL,
            r#"printf "%s:%s" .Values.localCluster.agentImage.repository (.Values.localCluster.agentImage.tag | default .Chart.AppVersion)"#,
        ),
        ("SBCHART_TOKEN", r#"include "shapeblock-hub.localToken" ."#),
        ("SBCHART_REGISTRY_NAMESPACE", registry_namespace),
        (
            "SBCHART_REGISTRY_SECRET",
            r#".Values.config.default_registry_secret | default "registry-creds""#,
        ),
        (
            REPOSITORY_SENTINEL,
            ".Values.localCluster.agentImage.repository",
        ),
    ];
    let objects = agent_manifest(&AgentManifestParams {
        cluster_id: sentinels[0].0.into(),
        hub_url: format!("ws://{}", sentinels[1].0),
        image: sentinels[2].0.into(),
        token: sentinels[3].0.into(),
        registry_namespace: sentinels[4].0.into(),
        registry_secret: sentinels[5].0.into(),
        hub_ca: None,
    });
    let mut yaml = String::new();
    for object in &objects {
        let text = to_yaml(std::slice::from_ref(object))?;
        if object["kind"] == "Namespace" {
            let name = match object["metadata"]["name"].as_str() {
                Some(name) if name == sentinels[4].0 => format!("({registry_namespace})"),
                Some(name) => format!("{name:?}"),
                None => continue,
            };
            yaml.push_str(&format!(
                "{{{{- if ne {name} .Release.Namespace }}}}\n{text}{{{{- end }}}}\n"
            ));
        } else {
            yaml.push_str(&text);
        }
    }
    Ok(format!(
        "# Generated by `shapeblock-hub agent-chart --out charts/shapeblock-agent --hub-chart\n\
         # charts/shapeblock-hub` from src/render/agent.rs, the same code that renders the hub's\n\
         # install manifests. Do not edit. The agent of the hub's own cluster (localCluster).\n\
         {{{{- if .Values.localCluster.enabled }}}}\n{}{{{{- end }}}}\n",
        substitute(&yaml, &sentinels)
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
            registry_namespace: "shapeblock".into(),
            registry_secret: "registry-creds".into(),
            hub_ca: None,
        }
    }

    #[test]
    fn a_private_hub_ca_is_mounted_from_a_config_map_and_trusted() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let objects = agent_manifest(&AgentManifestParams {
            hub_ca: Some(pem.into()),
            ..params()
        });
        let config_map = objects.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
        assert_eq!(config_map["metadata"]["name"], HUB_CA_CONFIG_MAP);
        assert_eq!(config_map["metadata"]["namespace"], NAMESPACE);
        assert_eq!(config_map["data"]["ca.crt"], pem);
        let deployment = objects.last().unwrap();
        assert_eq!(deployment["kind"], "Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        let args = pod["containers"][0]["args"].to_string();
        assert!(
            args.contains("\"--hub-ca-file\",\"/etc/shapeblock/hub-ca/ca.crt\""),
            "{args}"
        );
        assert_eq!(pod["volumes"][1]["configMap"]["name"], HUB_CA_CONFIG_MAP);
        assert_eq!(
            pod["containers"][0]["volumeMounts"][1]["mountPath"],
            "/etc/shapeblock/hub-ca"
        );
        // Without it, nothing of the kind.
        let plain = agent_manifest(&params());
        assert!(plain.iter().all(|o| o["kind"] != "ConfigMap"));
        assert!(!plain.last().unwrap().to_string().contains("hub-ca"));
    }

    #[test]
    fn a_ws_hub_url_comes_with_allow_plaintext() {
        assert_eq!(
            agent_args("wss://hub.example.com", false),
            json!([
                "--hub-url",
                "wss://hub.example.com",
                "--token-file",
                "/var/run/shapeblock/token"
            ])
        );
        let args = agent_args("ws://10.0.0.5:8080", false);
        assert_eq!(args[4], "--allow-plaintext");
        let args = agent_args("wss://hub.example.com", true);
        assert_eq!(args[4], "--hub-ca-file");
        assert_eq!(args[5], "/etc/shapeblock/hub-ca/ca.crt");
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
                "Namespace",
                "ServiceAccount",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding",
                "ClusterRole",
                "ClusterRole",
                "ClusterRole",
                "ClusterRole",
                "ClusterRole",
                "ClusterRole",
                "ClusterRoleBinding",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "Role",
                "RoleBinding",
                "Secret",
                "Deployment"
            ]
        );
        let deployment = &objects[19];
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        // The token file (0440) is readable by the agent's user through the volume's group.
        assert_eq!(pod["volumes"][0]["secret"]["defaultMode"], 0o440);
        assert_eq!(
            pod["securityContext"]["fsGroup"],
            pod["securityContext"]["runAsUser"]
        );
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
            objects[18]["stringData"]["token"],
            "sbt_c0123456789abcdef_secret"
        );
    }

    fn rules_of(rules: &Value) -> Vec<(String, String, Vec<String>, Option<Value>)> {
        let mut out = vec![];
        for rule in rules.as_array().unwrap() {
            for group in rule["apiGroups"].as_array().unwrap() {
                for resource in rule["resources"].as_array().unwrap() {
                    out.push((
                        group.as_str().unwrap().to_string(),
                        resource.as_str().unwrap().to_string(),
                        rule["verbs"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_str().unwrap().to_string())
                            .collect(),
                        rule.get("resourceNames").cloned(),
                    ));
                }
            }
        }
        out
    }

    #[test]
    fn the_agent_roles_grant_no_wildcards_and_no_interactive_access() {
        use crate::crd::TeamRole;
        let agents = [
            agent_rules(),
            project_rules(),
            registry_rules("registry-creds"),
        ]
        .map(|rules| (rules, true));
        let teams = [TeamRole::Admin, TeamRole::Developer, TeamRole::Viewer]
            .map(|role| (team_rules(role), false));
        for (rules, agent) in agents.into_iter().chain(teams) {
            for rule in rules.as_array().unwrap() {
                for field in ["apiGroups", "resources", "verbs"] {
                    assert!(
                        !rule[field].as_array().unwrap().iter().any(|v| v == "*"),
                        "wildcard in {rule}"
                    );
                }
            }
            for (_, resource, verbs, names) in &rules_of(&rules) {
                assert!(
                    ![
                        "pods/exec",
                        "pods/attach",
                        "pods/portforward",
                        "nodes/proxy",
                        "services/proxy"
                    ]
                    .contains(&resource.as_str()),
                    "{resource}"
                );
                // People may `kubectl replace` (update) in their projects; the agent never.
                for verb in [
                    "escalate",
                    "impersonate",
                    "bind",
                    "update",
                    "deletecollection",
                ] {
                    assert!(
                        !verbs.contains(&verb.to_string())
                            || (agent
                                && (resource.ends_with("/finalizers")
                                    || verb == "bind"
                                    || (verb == "escalate"
                                        && names == &Some(json!([IMPERSONATOR_ROLE])))))
                            || (!agent && verb == "update"),
                        "{verb} on {resource}"
                    );
                }
                if !agent {
                    assert!(
                        !resource.starts_with("roles") && !resource.starts_with("rolebindings"),
                        "a team role grants RBAC: {resource}"
                    );
                }
            }
        }
        let secrets = |role| {
            rules_of(&team_rules(role))
                .into_iter()
                .any(|(_, resource, _, _)| resource == "secrets" || resource == "configmaps")
        };
        assert!(secrets(TeamRole::Admin));
        assert!(!secrets(TeamRole::Developer) && !secrets(TeamRole::Viewer));
        let writes_apps = |role| {
            rules_of(&team_rules(role))
                .into_iter()
                .any(|(group, resource, verbs, _)| {
                    group == "apps.shapeblock.io"
                        && resource == "apps"
                        && verbs.contains(&"patch".into())
                })
        };
        assert!(writes_apps(TeamRole::Developer) && !writes_apps(TeamRole::Viewer));
        // Impersonation is its own role, of named users and groups only (no uids, no extras,
        // no service accounts, never every name).
        assert_eq!(
            rules_of(&impersonator_rules(
                &["shapeblock:user:dev".into()],
                &["shapeblock:team:web".into()]
            )),
            [
                (
                    "".into(),
                    "users".into(),
                    vec!["impersonate".into()],
                    Some(json!(["shapeblock:user:dev"]))
                ),
                (
                    "".into(),
                    "groups".into(),
                    vec!["impersonate".into()],
                    Some(json!(["shapeblock:team:web"]))
                )
            ]
        );
        assert_eq!(impersonator_rules(&[], &[]), json!([]));
        // Binding is only possible to the ShapeBlock roles.
        let bind: Vec<_> = rules_of(&agent_rules())
            .into_iter()
            .filter(|(_, _, verbs, _)| verbs.contains(&"bind".to_string()))
            .collect();
        assert_eq!(bind.len(), 1);
        assert_eq!(bind[0].1, "clusterroles");
        assert_eq!(
            bind[0].3,
            Some(json!([
                PROJECT_ROLE,
                DEPLOYER_ROLE,
                TEAM_ROLES[0],
                TEAM_ROLES[1],
                TEAM_ROLES[2]
            ]))
        );
    }

    #[test]
    fn cluster_wide_the_agent_reads_no_secret_or_configmap_and_writes_no_workload() {
        let cluster_wide = rules_of(&agent_rules());
        for (group, resource, verbs, _) in &cluster_wide {
            assert!(
                ![
                    "secrets",
                    "configmaps",
                    "serviceaccounts",
                    "pods/log",
                    "roles"
                ]
                .contains(&resource.as_str()),
                "{resource} granted cluster-wide"
            );
            if ["pods", "jobs", "deployments"].contains(&resource.as_str()) {
                assert_eq!(verbs, &["get", "list", "watch"], "{group}/{resource}");
            }
        }
        // Inside a project namespace: the writes, and nothing to grant further rights.
        let project = rules_of(&project_rules());
        let find = |resource: &str| {
            project
                .iter()
                .find(|(_, r, _, _)| r == resource)
                .map(|(_, _, verbs, _)| verbs.clone())
                .unwrap_or_default()
        };
        assert_eq!(
            find("secrets"),
            ["get", "list", "create", "patch", "delete"]
        );
        assert_eq!(find("jobs"), ["create", "delete"]);
        assert!(
            project
                .iter()
                .all(|(group, _, _, _)| group != "rbac.authorization.k8s.io")
        );
        // Outside them, Secrets are readable only in the registry namespace, and writable
        // there only by the name of the cluster's registry Secret.
        let objects = agent_manifest(&params());
        let role = objects.iter().find(|o| o["kind"] == "Role").unwrap();
        assert_eq!(role["metadata"]["namespace"], "shapeblock");
        assert_eq!(
            rules_of(&role["rules"]),
            [
                (
                    String::new(),
                    "secrets".to_string(),
                    vec!["get".into(), "list".into(), "watch".into()],
                    None
                ),
                (
                    String::new(),
                    "secrets".to_string(),
                    vec!["create".into(), "patch".into(), "delete".into()],
                    Some(json!(["registry-creds"]))
                )
            ]
        );
        let binding = objects.iter().find(|o| o["kind"] == "RoleBinding").unwrap();
        assert_eq!(binding["roleRef"]["kind"], "Role");
        assert_eq!(binding["subjects"][0]["name"], NAME);
        // In its own namespace, its own Deployment by name: read it and patch its image.
        let own = objects
            .iter()
            .find(|o| o["kind"] == "Role" && o["metadata"]["name"] == SELF_ROLE)
            .unwrap();
        assert_eq!(own["metadata"]["namespace"], NAMESPACE);
        assert_eq!(
            rules_of(&own["rules"]),
            [(
                "apps".to_string(),
                "deployments".to_string(),
                vec!["get".into(), "patch".into()],
                Some(json!([NAME]))
            )]
        );
        let own_binding = objects
            .iter()
            .find(|o| o["kind"] == "RoleBinding" && o["metadata"]["name"] == SELF_ROLE)
            .unwrap();
        assert_eq!(own_binding["metadata"]["namespace"], NAMESPACE);
        assert_eq!(own_binding["roleRef"]["name"], SELF_ROLE);
        assert_eq!(own_binding["subjects"][0]["name"], NAME);
    }

    #[test]
    fn an_image_repository_is_the_reference_without_tag_or_digest() {
        for (image, repository) in [
            (
                "ghcr.io/shapeblock/shapeblock-agent:0.1.0",
                "ghcr.io/shapeblock/shapeblock-agent",
            ),
            ("registry:5000/agent:1.2", "registry:5000/agent"),
            ("registry:5000/agent", "registry:5000/agent"),
            ("agent", "agent"),
            ("agent@sha256:abc", "agent"),
            ("registry:5000/agent:1@sha256:abc", "registry:5000/agent"),
        ] {
            assert_eq!(image_repository(image), repository, "{image}");
        }
    }

    #[test]
    fn the_admission_policy_fences_the_agent_alone() {
        let objects = agent_manifest(&params());
        let policy = objects
            .iter()
            .find(|o| o["kind"] == "ValidatingAdmissionPolicy")
            .unwrap();
        let spec = &policy["spec"];
        assert_eq!(spec["failurePolicy"], "Fail");
        assert_eq!(
            spec["matchConditions"][0]["expression"],
            "request.userInfo.username == 'system:serviceaccount:shapeblock-agent:shapeblock-agent'"
        );
        let rule = &spec["matchConstraints"]["resourceRules"][0];
        assert_eq!(rule["operations"], json!(["CREATE", "UPDATE", "DELETE"]));
        assert_eq!(rule["resources"], json!(["*/*"]));
        let validations = spec["validations"].as_array().unwrap();
        assert_eq!(validations.len(), 5);
        let all = validations
            .iter()
            .map(|v| v["expression"].as_str().unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        for expected in [
            "variables.inProject",
            "request.operation == 'DELETE' ? variables.oldIsProject",
            "object.roleRef.name == 'shapeblock-deployer'",
            "s.name == 'deployer'",
            "object.roleRef.name == 'shapeblock-agent-project'",
            "s.namespace == 'shapeblock-agent'",
            "variables.isRegistrySecret",
            "request.name == 'shapeblock-agent'",
            "c.image.startsWith('ghcr.io/shapeblock/shapeblock-agent:')",
            "o.?args == c.?args",
        ] {
            assert!(all.contains(expected), "{expected} missing from {all}");
        }
        let variables = spec["variables"].to_string();
        assert!(
            variables.contains("namespaceObject.metadata.labels['shapeblock.io/project'] == namespaceObject.metadata.name"),
            "{variables}"
        );
        assert!(
            variables.contains("variables.requestNamespace == 'shapeblock'")
                && variables.contains("request.name == 'registry-creds'"),
            "{variables}"
        );
        let binding = objects
            .iter()
            .find(|o| o["kind"] == "ValidatingAdmissionPolicyBinding")
            .unwrap();
        assert_eq!(binding["spec"]["policyName"], NAME);
        assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
        // Applied before the agent holds any right.
        let position = |kind: &str| objects.iter().position(|o| o["kind"] == kind).unwrap();
        assert!(position("ValidatingAdmissionPolicyBinding") < position("ClusterRoleBinding"));
    }

    #[test]
    fn yaml_is_a_multi_document_stream() {
        let yaml = to_yaml(&agent_manifest(&params())).unwrap();
        assert_eq!(yaml.matches("---\n").count(), 20);
        assert!(yaml.contains("kind: Deployment"));
    }
}
