//! Registry credentials without kubectl: the cluster's registry Secret (in the registry
//! namespace, copied into every project namespace by the Project controller) and a project's
//! own (in its namespace, for a project that pushes to another registry), set, rotated, read
//! (never the secret parts) and removed through the cluster's tunnel.
//!
//! A body is checked in full before anything is written, and the password never leaves this
//! module other than inside the Secret: not in a response, an error or a log line.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use http::StatusCode;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::resources::FIELD_MANAGER;
use super::{ApiError, ApiState, Shared, check_name};
use crate::controllers::project::{OWN_REGISTRY_SECRET, docker_config_json};
use crate::crd::Project;

/// Annotation on a Secret written here: when it was set (RFC 3339).
pub const UPDATED_ANNOTATION: &str = "shapeblock.io/registry-credentials-updated";
/// Annotation on a Project whose own registry Secret was written here: the Secret's
/// resourceVersion, so that a rotation is an event the Project controller sees (it watches no
/// Secret in project namespaces).
pub const PROJECT_ANNOTATION: &str = "shapeblock.io/own-registry-secret-version";

/// Body of `PUT …/registry-credentials`: either `server`, `username` and `password`, or a
/// whole `dockerConfigJson`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegistryCredentials {
    /// Registry host, optionally with a port and path: `ghcr.io`, `registry.example.com:5000`,
    /// `https://index.docker.io/v1/` (Docker Hub).
    #[serde(default)]
    pub server: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// Never shown again, logged or echoed in an error.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password)]
    pub password: Option<crate::secret::Secret>,
    /// A complete `.dockerconfigjson` document (`{"auths": {"<server>": {…}}}`), as an object or
    /// as a JSON string, instead of the three fields above.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub docker_config_json: Option<Value>,
}

/// Registry credentials as the hub reports them: where they are, for which registries and
/// since when; never a username's password or an `auth`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryCredentialsView {
    /// Whether the Secret exists.
    pub set: bool,
    /// `namespace/name` of the Secret.
    pub secret: String,
    /// The registries it holds credentials for (the keys of its `auths`).
    pub servers: Vec<String>,
    /// When it was last set through this API (RFC 3339), or created, if not through it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated: Option<String>,
    /// Why Projects refuse to copy it, when they do (it was written by something else).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > max {
        return Err(invalid(format!("{field} must be 1 to {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{field} must not contain control characters (newlines, escapes)"
        )));
    }
    Ok(())
}

fn check_server(server: &str) -> Result<(), ApiError> {
    check_text("server", server, 253)?;
    let host = server
        .strip_prefix("https://")
        .or_else(|| server.strip_prefix("http://"))
        .unwrap_or(server);
    let ok = !host.is_empty()
        && host.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '[')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_:/[]".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "server {server:?} is not a registry host (such as ghcr.io or registry.example.com:5000)"
        )))
    }
}

/// The `.dockerconfigjson` a body stands for, checked (pure).
pub fn docker_config(body: &RegistryCredentials) -> Result<Vec<u8>, ApiError> {
    let fields = [
        body.server.is_some(),
        body.username.is_some(),
        body.password.is_some(),
    ];
    match (&body.docker_config_json, fields) {
        (Some(_), f) if f.iter().any(|set| *set) => Err(invalid(
            "give either server, username and password, or dockerConfigJson, not both",
        )),
        (Some(raw), _) => {
            let config = match raw {
                Value::String(text) => serde_json::from_str::<Value>(text).map_err(|e| {
                    invalid(format!(
                        "dockerConfigJson is not JSON (line {}, column {})",
                        e.line(),
                        e.column()
                    ))
                })?,
                other => other.clone(),
            };
            let Some(auths) = config.get("auths").and_then(Value::as_object) else {
                return Err(invalid(
                    "dockerConfigJson must be an object with an \"auths\" object",
                ));
            };
            if auths.is_empty() {
                return Err(invalid("dockerConfigJson's \"auths\" names no registry"));
            }
            for (server, entry) in auths {
                check_server(server)?;
                if !entry.is_object() {
                    return Err(invalid(format!(
                        "dockerConfigJson's auths[{server:?}] must be an object"
                    )));
                }
            }
            serde_json::to_vec(&config).map_err(|e| invalid(e.to_string()))
        }
        (None, [true, true, true]) => {
            let (Some(server), Some(username), Some(password)) =
                (&body.server, &body.username, &body.password)
            else {
                return Err(invalid("server, username and password are required"));
            };
            check_server(server)?;
            check_text("username", username, 255)?;
            if username.contains(':') {
                // `auth` is base64("username:password"), split at the first colon.
                return Err(invalid("username must not contain ':'"));
            }
            check_text("password", password.expose(), 4096)?;
            // ByteString serializes as base64, as `auth` is.
            let auth = serde_json::to_value(ByteString(
                format!("{username}:{}", password.expose()).into_bytes(),
            ))
            .map_err(|e| invalid(e.to_string()))?;
            let config = json!({"auths": {server.as_str(): {
                "username": username, "password": password.expose(), "auth": auth}}});
            serde_json::to_vec(&config).map_err(|e| invalid(e.to_string()))
        }
        (None, _) => {
            let missing: Vec<&str> = ["server", "username", "password"]
                .into_iter()
                .zip(fields)
                .filter(|(_, set)| !set)
                .map(|(name, _)| name)
                .collect();
            Err(invalid(format!(
                "missing {}: give server, username and password, or dockerConfigJson",
                missing.join(", ")
            )))
        }
    }
}

/// What is reported of a registry Secret (pure).
pub fn view(namespace: &str, name: &str, secret: Option<&Secret>) -> RegistryCredentialsView {
    let path = format!("{namespace}/{name}");
    let Some(secret) = secret else {
        return RegistryCredentialsView {
            set: false,
            secret: path,
            servers: vec![],
            updated: None,
            problem: None,
        };
    };
    let servers = secret
        .data
        .as_ref()
        .and_then(|d| d.get(".dockerconfigjson"))
        .and_then(|b| serde_json::from_slice::<Value>(&b.0).ok())
        .and_then(|c| {
            c.get("auths")
                .and_then(Value::as_object)
                .map(|a| a.keys().cloned().collect())
        })
        .unwrap_or_default();
    let updated = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(UPDATED_ANNOTATION).cloned())
        .or_else(|| {
            secret
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
        });
    RegistryCredentialsView {
        set: true,
        secret: path,
        servers,
        updated,
        problem: docker_config_json(secret).err(),
    }
}

/// The Secret as applied (pure).
fn secret_object(namespace: &str, name: &str, config: Vec<u8>) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace,
            "labels": {crate::crd::MANAGED_BY_LABEL: crate::crd::MANAGED_BY_VALUE},
            "annotations": {UPDATED_ANNOTATION: jiff::Timestamp::now().to_string()}},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": ByteString(config)},
    })
}

fn client(state: &ApiState, cluster: &str) -> Result<kube::Client, ApiError> {
    state
        .registry
        .get(cluster)
        .ok_or_else(|| ApiError::not_found(format!("cluster {cluster}")))?;
    Ok(state.gateway.caller_client(cluster))
}

/// Applies the Secret; a 422 of the cluster (an existing Secret of another type: the type
/// cannot change) says what to do.
async fn write(secrets: &Api<Secret>, name: &str, object: &Value) -> Result<Secret, ApiError> {
    secrets
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(|e| match ApiError::from(e) {
            e if e.code == 422 => ApiError::new(
                StatusCode::CONFLICT,
                "SecretConflict",
                format!(
                    "Secret {name} exists and cannot become a kubernetes.io/dockerconfigjson Secret \
                     ({}); delete it (DELETE on this path) and set the credentials again",
                    e.message
                ),
            ),
            e => e,
        })
}

fn cluster_path(state: &ApiState) -> (String, String) {
    (
        state.registry_namespace.clone(),
        state.registry_secret.clone(),
    )
}

/// Whether the cluster's registry Secret is set, for which registries and since when.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/registry-credentials", tag = "clusters",
    params(("cluster" = String, Path, description = "Cluster id")),
    responses((status = 200, body = RegistryCredentialsView), (status = 404, body = ApiError),
              (status = 503, body = ApiError)))]
pub(super) async fn get_cluster_credentials(
    State(state): Shared,
    Path(cluster): Path<String>,
) -> Result<Json<RegistryCredentialsView>, ApiError> {
    let client = client(&state, &cluster)?;
    let (namespace, name) = cluster_path(&state);
    let secret = Api::<Secret>::namespaced(client, &namespace)
        .get_opt(&name)
        .await?;
    Ok(Json(view(&namespace, &name, secret.as_ref())))
}

/// Set or rotate the cluster's registry credentials: the `kubernetes.io/dockerconfigjson`
/// Secret in the registry namespace that every Project copies (a rotation reaches every
/// project namespace). Admin token only.
#[utoipa::path(put, path = "/api/v1/clusters/{cluster}/registry-credentials", tag = "clusters",
    request_body = RegistryCredentials,
    params(("cluster" = String, Path, description = "Cluster id")),
    responses((status = 200, body = RegistryCredentialsView), (status = 400, body = ApiError),
              (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError),
              (status = 422, body = ApiError), (status = 503, body = ApiError)))]
pub(super) async fn put_cluster_credentials(
    State(state): Shared,
    Path(cluster): Path<String>,
    body: Result<Json<RegistryCredentials>, JsonRejection>,
) -> Result<Json<RegistryCredentialsView>, ApiError> {
    let Json(body) = body?;
    let config = docker_config(&body)?;
    let client = client(&state, &cluster)?;
    let (namespace, name) = cluster_path(&state);
    let secrets = Api::<Secret>::namespaced(client, &namespace);
    let written = write(&secrets, &name, &secret_object(&namespace, &name, config))
        .await
        .map_err(|e| match e.code {
            // An agent installed before it was allowed this Secret (its Role read-only there).
            403 => ApiError::new(
                StatusCode::FORBIDDEN,
                "AgentNotPermitted",
                format!(
                    "the cluster refused the agent writing Secret {namespace}/{name} ({}); apply the \
                     agent's current install manifest (POST …/agent-manifest, or helm upgrade the \
                     agent chart), which grants it",
                    e.message
                ),
            ),
            _ => e,
        })?;
    tracing::info!(%cluster, secret = %format!("{namespace}/{name}"), "registry credentials set");
    Ok(Json(view(&namespace, &name, Some(&written))))
}

/// Delete the cluster's registry Secret. Projects keep the copies they have; new Projects
/// wait (`RegistrySecretMissing`) until credentials are set again.
#[utoipa::path(delete, path = "/api/v1/clusters/{cluster}/registry-credentials", tag = "clusters",
    params(("cluster" = String, Path, description = "Cluster id")),
    responses((status = 204, description = "deleted"), (status = 403, body = ApiError),
              (status = 404, body = ApiError), (status = 503, body = ApiError)))]
pub(super) async fn delete_cluster_credentials(
    State(state): Shared,
    Path(cluster): Path<String>,
) -> Result<StatusCode, ApiError> {
    let client = client(&state, &cluster)?;
    let (namespace, name) = cluster_path(&state);
    Api::<Secret>::namespaced(client, &namespace)
        .delete(&name, &DeleteParams::default())
        .await?;
    tracing::info!(%cluster, secret = %format!("{namespace}/{name}"), "registry credentials deleted");
    Ok(StatusCode::NO_CONTENT)
}

fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

async fn project(client: &kube::Client, name: &str) -> Result<Project, ApiError> {
    check_name("project", name)?;
    Api::<Project>::all(client.clone())
        .get_opt(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("project {name}")))
}

/// Whether a project has registry credentials of its own, for which registries and since when.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/projects/{project}/registry-credentials",
    tag = "resources",
    params(("cluster" = String, Path, description = "Cluster id"),
           ("project" = String, Path, description = "Project name")),
    responses((status = 200, body = RegistryCredentialsView), (status = 404, body = ApiError),
              (status = 503, body = ApiError)))]
pub(super) async fn get_project_credentials(
    State(state): Shared,
    Path((cluster, name)): Path<(String, String)>,
) -> Result<Json<RegistryCredentialsView>, ApiError> {
    let client = client(&state, &cluster)?;
    let project = project(&client, &name).await?;
    let secret = match project.spec.own_registry_secret.as_deref() {
        Some(own) => Api::<Secret>::namespaced(client, &name)
            .get_opt(own)
            .await?
            .map(|s| (own.to_string(), s)),
        None => None,
    };
    let own = secret.as_ref().map_or(OWN_REGISTRY_SECRET, |(n, _)| n);
    Ok(Json(view(&name, own, secret.as_ref().map(|(_, s)| s))))
}

/// Set or rotate a project's own registry credentials (a project that pushes to another
/// registry than the cluster's): a `kubernetes.io/dockerconfigjson` Secret in the project's
/// namespace, which the Project (`spec.ownRegistrySecret`) then copies as `registry-creds`
/// instead of the cluster's. The project's namespace must exist: a Project just created gets
/// it within moments (409 `ProjectNotReady` until then). Admin token only.
#[utoipa::path(put, path = "/api/v1/clusters/{cluster}/projects/{project}/registry-credentials",
    tag = "resources", request_body = RegistryCredentials,
    params(("cluster" = String, Path, description = "Cluster id"),
           ("project" = String, Path, description = "Project name")),
    responses((status = 200, body = RegistryCredentialsView), (status = 400, body = ApiError),
              (status = 403, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError),
              (status = 422, body = ApiError), (status = 503, body = ApiError)))]
pub(super) async fn put_project_credentials(
    State(state): Shared,
    Path((cluster, name)): Path<(String, String)>,
    body: Result<Json<RegistryCredentials>, JsonRejection>,
) -> Result<Json<RegistryCredentialsView>, ApiError> {
    let Json(body) = body?;
    let config = docker_config(&body)?;
    let client = client(&state, &cluster)?;
    let project = project(&client, &name).await?;
    let own = project
        .spec
        .own_registry_secret
        .clone()
        .unwrap_or_else(|| OWN_REGISTRY_SECRET.to_string());
    let secrets = Api::<Secret>::namespaced(client.clone(), &name);
    let written = write(&secrets, &own, &secret_object(&name, &own, config))
        .await
        .map_err(|e| match e.code {
            // No namespace yet, or the agent's rights in it not granted yet.
            403 | 404 => ApiError::new(
                StatusCode::CONFLICT,
                "ProjectNotReady",
                format!(
                    "project {name}'s namespace is not ready for its registry Secret yet ({}); retry in a moment",
                    e.message
                ),
            ),
            _ => e,
        })?;
    // The spec points at the Secret, and the annotation moves with each rotation: both are
    // events of the Project, which its controller answers by copying the Secret.
    let patch = json!({
        "metadata": {"annotations": {PROJECT_ANNOTATION: written.metadata.resource_version}},
        "spec": {"ownRegistrySecret": own},
    });
    Api::<Project>::all(client)
        .patch(&name, &merge_params(), &Patch::Merge(&patch))
        .await?;
    tracing::info!(%cluster, project = %name, secret = %own, "project registry credentials set");
    Ok(Json(view(&name, &own, Some(&written))))
}

/// Remove a project's own registry credentials: the Project copies the cluster's again.
#[utoipa::path(delete, path = "/api/v1/clusters/{cluster}/projects/{project}/registry-credentials",
    tag = "resources",
    params(("cluster" = String, Path, description = "Cluster id"),
           ("project" = String, Path, description = "Project name")),
    responses((status = 204, description = "deleted"), (status = 403, body = ApiError),
              (status = 404, body = ApiError), (status = 503, body = ApiError)))]
pub(super) async fn delete_project_credentials(
    State(state): Shared,
    Path((cluster, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let client = client(&state, &cluster)?;
    let project = project(&client, &name).await?;
    let Some(own) = project.spec.own_registry_secret else {
        return Err(ApiError::not_found(format!(
            "registry credentials of project {name}"
        )));
    };
    let patch = json!({
        "metadata": {"annotations": {PROJECT_ANNOTATION: null}},
        "spec": {"ownRegistrySecret": null},
    });
    Api::<Project>::all(client.clone())
        .patch(&name, &merge_params(), &Patch::Merge(&patch))
        .await?;
    match Api::<Secret>::namespaced(client, &name)
        .delete(&own, &DeleteParams::default())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    tracing::info!(%cluster, project = %name, "project registry credentials deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(value: Value) -> RegistryCredentials {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_server_username_and_password_become_a_docker_config() {
        let config = docker_config(&body(json!({
            "server": "ghcr.io", "username": "bot", "password": "s3cr:et"})))
        .unwrap();
        let config: Value = serde_json::from_slice(&config).unwrap();
        let entry = &config["auths"]["ghcr.io"];
        assert_eq!(entry["username"], "bot");
        assert_eq!(entry["password"], "s3cr:et");
        // base64("bot:s3cr:et")
        assert_eq!(entry["auth"], "Ym90OnMzY3I6ZXQ=");
    }

    #[test]
    fn a_raw_docker_config_is_taken_as_an_object_or_a_string() {
        let raw = json!({"auths": {"registry.example.com:5000": {"auth": "eDp5"}}});
        for given in [raw.clone(), Value::String(raw.to_string())] {
            let config = docker_config(&body(json!({"dockerConfigJson": given}))).unwrap();
            assert_eq!(serde_json::from_slice::<Value>(&config).unwrap(), raw);
        }
    }

    #[test]
    fn bad_bodies_are_refused_without_echoing_the_password() {
        for (given, expected) in [
            (json!({}), "missing server, username, password"),
            (
                json!({"server": "ghcr.io", "username": "bot"}),
                "missing password",
            ),
            (
                json!({"server": "ghcr.io", "username": "bot", "password": "pw",
                       "dockerConfigJson": {"auths": {}}}),
                "not both",
            ),
            (
                json!({"server": "ghcr.io", "username": "b:t", "password": "hunter2"}),
                "must not contain ':'",
            ),
            (
                json!({"server": "ghcr.io", "username": "bot", "password": "hun\nter2"}),
                "control characters",
            ),
            (
                json!({"server": "not a host", "username": "bot", "password": "hunter2"}),
                "not a registry host",
            ),
            (json!({"dockerConfigJson": "{nope"}), "not JSON"),
            (
                json!({"dockerConfigJson": {"token": "x"}}),
                "\"auths\" object",
            ),
            (
                json!({"dockerConfigJson": {"auths": {}}}),
                "names no registry",
            ),
            (
                json!({"dockerConfigJson": {"auths": {"ghcr.io": "hunter2"}}}),
                "must be an object",
            ),
        ] {
            let error = docker_config(&body(given.clone())).unwrap_err();
            assert_eq!(error.code, 422, "{given}");
            assert!(
                error.message.contains(expected),
                "{given}: {}",
                error.message
            );
            assert!(!error.message.contains("hunter2"), "{}", error.message);
            assert!(!error.message.contains("hun\nter2"), "{}", error.message);
        }
    }

    #[test]
    fn the_view_names_servers_and_never_credentials() {
        let config = docker_config(&body(json!({
            "server": "ghcr.io", "username": "bot", "password": "hunter2"})))
        .unwrap();
        let object = secret_object("shapeblock", "registry-creds", config);
        let secret: Secret = serde_json::from_value(object).unwrap();
        let shown = view("shapeblock", "registry-creds", Some(&secret));
        assert!(shown.set && shown.problem.is_none());
        assert_eq!(shown.servers, ["ghcr.io"]);
        assert_eq!(shown.secret, "shapeblock/registry-creds");
        assert!(shown.updated.is_some());
        let text = serde_json::to_string(&shown).unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("Ym90"),
            "{text}"
        );
        assert!(!view("shapeblock", "registry-creds", None).set);
    }
}
