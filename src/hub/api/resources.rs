//! The ShapeBlock resources inside a cluster (Projects, Teams, Apps, AppBuilds, Services), read and
//! written through the cluster's tunnel with the hub's own field manager.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use http::{Method, StatusCode, header};
use serde_json::Value;
use std::sync::Arc;

use super::{ApiError, ApiState, Shared, check_name};
use crate::crd::{App, AppBuild, Project, Service, Team};

pub(super) const FIELD_MANAGER: &str = "shapeblock-api";

/// The ShapeBlock kinds the API serves, by URL plural.
fn kind_of(plural: &str) -> Option<&'static str> {
    match plural {
        "projects" => Some("Project"),
        "apps" => Some("App"),
        "appbuilds" => Some("AppBuild"),
        "services" => Some("Service"),
        "teams" => Some("Team"),
        _ => None,
    }
}

fn collection_path(namespace: Option<&str>, plural: &str) -> String {
    let group = format!("/apis/{}/{}", crate::crd::GROUP, crate::crd::VERSION);
    match namespace {
        Some(ns) => format!("{group}/namespaces/{ns}/{plural}"),
        None => format!("{group}/{plural}"),
    }
}

/// A DNS-1123 subdomain, as the apiserver requires of names; checked here so a bad name
/// cannot alter the request path.
struct Target {
    client: kube::Client,
    kind: &'static str,
    collection: String,
}

fn target(
    state: &ApiState,
    cluster: &str,
    namespace: Option<&str>,
    plural: &str,
) -> Result<Target, ApiError> {
    state
        .registry
        .get(cluster)
        .ok_or_else(|| ApiError::not_found(format!("cluster {cluster}")))?;
    let kind =
        kind_of(plural).ok_or_else(|| ApiError::not_found(format!("resource type {plural:?}")))?;
    match (kind, namespace) {
        ("Project" | "Team", Some(_)) => {
            return Err(ApiError::not_found(format!(
                "{plural} are cluster-scoped; resource path"
            )));
        }
        ("Project" | "Team", None) => {}
        (_, None) => {
            return Err(ApiError::not_found(format!(
                "{plural} are namespaced; resource path"
            )));
        }
        (_, Some(ns)) => check_name("namespace", ns)?,
    }
    Ok(Target {
        client: state.gateway.caller_client(cluster),
        kind,
        collection: collection_path(namespace, plural),
    })
}

/// Checks a resource body: a JSON object of the right kind, named as the path says.
fn check_body(body: &mut Value, kind: &str, name: Option<&str>) -> Result<String, ApiError> {
    let object = body
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let api_version = format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION);
    match object.get("apiVersion").and_then(Value::as_str) {
        None => {
            object.insert("apiVersion".into(), Value::String(api_version));
        }
        Some(v) if v == api_version => {}
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "apiVersion {v:?} does not match {api_version}"
            )));
        }
    }
    match object.get("kind").and_then(Value::as_str) {
        None => {
            object.insert("kind".into(), Value::String(kind.into()));
        }
        Some(k) if k == kind => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "kind {k:?} does not match {kind} for this path"
            )));
        }
    }
    let body_name = object
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let name = match (name, body_name) {
        (Some(path), Some(body)) if path != body => {
            return Err(ApiError::bad_request(format!(
                "metadata.name {body:?} does not match the path's {path:?}"
            )));
        }
        (Some(path), _) => path.to_string(),
        (None, Some(body)) => body,
        (None, None) => return Err(ApiError::bad_request("metadata.name is required")),
    };
    check_name("name", &name)?;
    if object.contains_key("status") {
        return Err(ApiError::bad_request(
            "status is written by the hub, not through the API",
        ));
    }
    Ok(name)
}

async fn send(client: &kube::Client, request: http::Request<Vec<u8>>) -> Result<Value, ApiError> {
    client
        .request::<Value>(request)
        .await
        .map_err(ApiError::from)
}

fn json_request(
    method: Method,
    uri: String,
    body: &Value,
    content_type: &str,
) -> Result<http::Request<Vec<u8>>, ApiError> {
    http::Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::ACCEPT, "application/json")
        .body(serde_json::to_vec(body).map_err(|e| ApiError::bad_request(e.to_string()))?)
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

fn get_request(uri: String) -> Result<http::Request<Vec<u8>>, ApiError> {
    http::Request::get(uri)
        .body(Vec::new())
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn list_in(
    state: Arc<ApiState>,
    cluster: String,
    namespace: Option<String>,
    plural: String,
) -> Result<Json<Value>, ApiError> {
    let t = target(&state, &cluster, namespace.as_deref(), &plural)?;
    Ok(Json(send(&t.client, get_request(t.collection)?).await?))
}

async fn create_in(
    state: Arc<ApiState>,
    cluster: String,
    namespace: Option<String>,
    plural: String,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(mut body) = body?;
    let t = target(&state, &cluster, namespace.as_deref(), &plural)?;
    check_body(&mut body, t.kind, None)?;
    let uri = format!(
        "{}?fieldManager={FIELD_MANAGER}&fieldValidation=Strict",
        t.collection
    );
    let created = send(
        &t.client,
        json_request(Method::POST, uri, &body, "application/json")?,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

async fn get_in(
    state: Arc<ApiState>,
    cluster: String,
    namespace: Option<String>,
    plural: String,
    name: String,
) -> Result<Json<Value>, ApiError> {
    let t = target(&state, &cluster, namespace.as_deref(), &plural)?;
    check_name("name", &name)?;
    Ok(Json(
        send(&t.client, get_request(format!("{}/{name}", t.collection))?).await?,
    ))
}

async fn apply_in(
    state: Arc<ApiState>,
    cluster: String,
    namespace: Option<String>,
    plural: String,
    name: String,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(mut body) = body?;
    let t = target(&state, &cluster, namespace.as_deref(), &plural)?;
    check_name("name", &name)?;
    check_body(&mut body, t.kind, Some(&name))?;
    let uri = format!(
        "{}/{name}?fieldManager={FIELD_MANAGER}&force=true&fieldValidation=Strict",
        t.collection
    );
    let request = json_request(Method::PATCH, uri, &body, "application/apply-patch+yaml")?;
    Ok(Json(send(&t.client, request).await?))
}

async fn delete_in(
    state: Arc<ApiState>,
    cluster: String,
    namespace: Option<String>,
    plural: String,
    name: String,
) -> Result<Json<Value>, ApiError> {
    let t = target(&state, &cluster, namespace.as_deref(), &plural)?;
    check_name("name", &name)?;
    let uri = format!("{}/{name}?propagationPolicy=Background", t.collection);
    let request = http::Request::delete(uri)
        .body(Vec::new())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(send(&t.client, request).await?))
}

/// The operations on one namespaced kind, each a route of its own in the OpenAPI document (so
/// a client gets typed methods: `create_app(body: App) -> App`), served by the functions above.
macro_rules! namespaced_routes {
    (
        kind: $kind:ident, list_type: $list_type:ident, plural: $plural:literal, deleted: $deleted:ident,
        collection: $collection:literal, item: $item:literal,
        list: $list:ident, create: $create:ident, get: $get:ident, apply: $apply:ident, delete: $delete:ident,
        docs: [$list_doc:literal, $create_doc:literal, $get_doc:literal, $apply_doc:literal, $delete_doc:literal]
    ) => {
        #[doc = $list_doc]
        #[utoipa::path(get, path = $collection, tag = "resources",
            params(("cluster" = String, Path, description = "Cluster id"), ("namespace" = String, Path, description = "Namespace (a Project's)")),
            responses((status = 200, body = super::schema::$list_type),
                      (status = 400, body = ApiError), (status = 404, body = ApiError)))]
        pub(super) async fn $list(
            State(state): Shared,
            Path((cluster, namespace)): Path<(String, String)>,
        ) -> Result<Json<Value>, ApiError> {
            list_in(state, cluster, Some(namespace), $plural.into()).await
        }

        #[doc = $create_doc]
        #[utoipa::path(post, path = $collection, tag = "resources",
            params(("cluster" = String, Path, description = "Cluster id"), ("namespace" = String, Path, description = "Namespace (a Project's)")),
            request_body = $kind,
            responses((status = 201, body = $kind), (status = 400, body = ApiError),
                      (status = 404, body = ApiError), (status = 409, body = ApiError),
                      (status = 413, body = ApiError), (status = 415, body = ApiError),
                      (status = 422, body = ApiError)))]
        pub(super) async fn $create(
            State(state): Shared,
            Path((cluster, namespace)): Path<(String, String)>,
            body: Result<Json<Value>, JsonRejection>,
        ) -> Result<(StatusCode, Json<Value>), ApiError> {
            create_in(state, cluster, Some(namespace), $plural.into(), body).await
        }

        #[doc = $get_doc]
        #[utoipa::path(get, path = $item, tag = "resources",
            params(("cluster" = String, Path, description = "Cluster id"), ("namespace" = String, Path, description = "Namespace (a Project's)"), ("name" = String, Path)),
            responses((status = 200, body = $kind), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
        pub(super) async fn $get(
            State(state): Shared,
            Path((cluster, namespace, name)): Path<(String, String, String)>,
        ) -> Result<Json<Value>, ApiError> {
            get_in(state, cluster, Some(namespace), $plural.into(), name).await
        }

        #[doc = $apply_doc]
        #[utoipa::path(put, path = $item, tag = "resources",
            params(("cluster" = String, Path, description = "Cluster id"), ("namespace" = String, Path, description = "Namespace (a Project's)"), ("name" = String, Path)),
            request_body = $kind,
            responses((status = 200, body = $kind), (status = 400, body = ApiError),
                      (status = 404, body = ApiError), (status = 409, body = ApiError),
                      (status = 413, body = ApiError), (status = 415, body = ApiError),
                      (status = 422, body = ApiError)))]
        pub(super) async fn $apply(
            State(state): Shared,
            Path((cluster, namespace, name)): Path<(String, String, String)>,
            body: Result<Json<Value>, JsonRejection>,
        ) -> Result<Json<Value>, ApiError> {
            apply_in(state, cluster, Some(namespace), $plural.into(), name, body).await
        }

        /// What deleting answers: the object, still there while its finalizers run, or a
        /// `Status` once it is gone.
        #[derive(serde::Serialize, utoipa::ToSchema)]
        #[serde(untagged)]
        #[allow(dead_code, clippy::large_enum_variant)] // a shape for the OpenAPI document only
        pub(super) enum $deleted {
            Object($kind),
            Gone(super::schema::Status),
        }

        #[doc = $delete_doc]
        #[utoipa::path(delete, path = $item, tag = "resources",
            params(("cluster" = String, Path, description = "Cluster id"), ("namespace" = String, Path, description = "Namespace (a Project's)"), ("name" = String, Path)),
            responses((status = 200, body = $deleted), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
        pub(super) async fn $delete(
            State(state): Shared,
            Path((cluster, namespace, name)): Path<(String, String, String)>,
        ) -> Result<Json<Value>, ApiError> {
            delete_in(state, cluster, Some(namespace), $plural.into(), name).await
        }
    };
}

namespaced_routes! {
    kind: App, list_type: AppList, plural: "apps", deleted: AppDeleted,
    collection: "/api/v1/clusters/{cluster}/namespaces/{namespace}/apps",
    item: "/api/v1/clusters/{cluster}/namespaces/{namespace}/apps/{name}",
    list: list_apps, create: create_app, get: get_app, apply: apply_app, delete: delete_app,
    docs: ["List the Apps of a namespace.",
           "Create an App (validated by the CRD schema; unknown fields are rejected).",
           "Get an App.",
           "Create or update an App with server-side apply.",
           "Delete an App."]
}

namespaced_routes! {
    kind: AppBuild, list_type: AppBuildList, plural: "appbuilds", deleted: AppBuildDeleted,
    collection: "/api/v1/clusters/{cluster}/namespaces/{namespace}/appbuilds",
    item: "/api/v1/clusters/{cluster}/namespaces/{namespace}/appbuilds/{name}",
    list: list_appbuilds, create: create_appbuild, get: get_appbuild, apply: apply_appbuild, delete: delete_appbuild,
    docs: ["List the AppBuilds of a namespace.",
           "Create an AppBuild: build and deploy an App (validated by the CRD schema; unknown fields are rejected).",
           "Get an AppBuild, with its phase, image and failure reason in status.",
           "Create an AppBuild with server-side apply (an AppBuild's spec cannot change once created).",
           "Delete an AppBuild."]
}

namespaced_routes! {
    kind: Service, list_type: ServiceList, plural: "services", deleted: ServiceDeleted,
    collection: "/api/v1/clusters/{cluster}/namespaces/{namespace}/services",
    item: "/api/v1/clusters/{cluster}/namespaces/{namespace}/services/{name}",
    list: list_services, create: create_service, get: get_service, apply: apply_service, delete: delete_service,
    docs: ["List the Services of a namespace.",
           "Create a Service (validated by the CRD schema; unknown fields are rejected).",
           "Get a Service.",
           "Create or update a Service with server-side apply.",
           "Delete a Service."]
}

/// What deleting a Project answers: the Project, still there while its namespace goes, or a
/// `Status` once it is gone.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code, clippy::large_enum_variant)] // a shape for the OpenAPI document only
pub(super) enum ProjectDeleted {
    Object(Project),
    Gone(super::schema::Status),
}

/// List Projects in a cluster.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/projects", tag = "resources",
    params(("cluster" = String, Path, description = "Cluster id")),
    responses((status = 200, body = super::schema::ProjectList), (status = 404, body = ApiError)))]
pub(super) async fn list_projects(
    State(state): Shared,
    Path(cluster): Path<String>,
) -> Result<Json<Value>, ApiError> {
    list_in(state, cluster, None, "projects".into()).await
}

/// Create a Project (validated by the cluster's CRD schema; unknown fields are rejected).
#[utoipa::path(post, path = "/api/v1/clusters/{cluster}/projects", tag = "resources",
    params(("cluster" = String, Path, description = "Cluster id")), request_body = Project,
    responses((status = 201, body = Project), (status = 400, body = ApiError), (status = 404, body = ApiError),
              (status = 409, body = ApiError), (status = 413, body = ApiError), (status = 415, body = ApiError),
              (status = 422, body = ApiError)))]
pub(super) async fn create_project(
    State(state): Shared,
    Path(cluster): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    create_in(state, cluster, None, "projects".into(), body).await
}

/// Get a Project.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/projects/{name}", tag = "resources",
    params(("cluster" = String, Path, description = "Cluster id"), ("name" = String, Path)),
    responses((status = 200, body = Project), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub(super) async fn get_project(
    State(state): Shared,
    Path((cluster, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    get_in(state, cluster, None, "projects".into(), name).await
}

/// Create or update a Project with server-side apply.
#[utoipa::path(put, path = "/api/v1/clusters/{cluster}/projects/{name}", tag = "resources",
    params(("cluster" = String, Path, description = "Cluster id"), ("name" = String, Path)), request_body = Project,
    responses((status = 200, body = Project), (status = 400, body = ApiError), (status = 404, body = ApiError),
              (status = 409, body = ApiError), (status = 413, body = ApiError), (status = 415, body = ApiError),
              (status = 422, body = ApiError)))]
pub(super) async fn apply_project(
    State(state): Shared,
    Path((cluster, name)): Path<(String, String)>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    apply_in(state, cluster, None, "projects".into(), name, body).await
}

/// Delete a Project (and with it, its namespace).
#[utoipa::path(delete, path = "/api/v1/clusters/{cluster}/projects/{name}", tag = "resources",
    params(("cluster" = String, Path, description = "Cluster id"), ("name" = String, Path)),
    responses((status = 200, body = ProjectDeleted), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub(super) async fn delete_project(
    State(state): Shared,
    Path((cluster, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    delete_in(state, cluster, None, "projects".into(), name).await
}

/// What deleting a Team answers: the Team, still there while its RoleBindings go, or a
/// `Status` once it is gone.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code, clippy::large_enum_variant)] // a shape for the OpenAPI document only
pub(super) enum TeamDeleted {
    Object(Team),
    Gone(super::schema::Status),
}

/// List the Teams of a cluster.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/teams", tag = "resources",
    params(("cluster" = String, Path, description = "Cluster id")),
    responses((status = 200, body = super::schema::TeamList), (status = 404, body = ApiError)))]
pub(super) async fn list_teams(
    State(state): Shared,
    Path(cluster): Path<String>,
) -> Result<Json<Value>, ApiError> {
    list_in(state, cluster, None, "teams".into()).await
}

/// Create a Team: its members get their role's rights in each of its projects' namespaces
/// (validated by the cluster's CRD schema; unknown fields are rejected).
#[utoipa::path(post, path = "/api/v1/clusters/{cluster}/teams", tag = "resources",
    params(("cluster" = String, Path, description = "Cluster id")), request_body = Team,
    responses((status = 201, body = Team), (status = 400, body = ApiError), (status = 404, body = ApiError),
              (status = 409, body = ApiError), (status = 413, body = ApiError), (status = 415, body = ApiError),
              (status = 422, body = ApiError)))]
pub(super) async fn create_team(
    State(state): Shared,
    Path(cluster): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    create_in(state, cluster, None, "teams".into(), body).await
}

/// Get a Team, with the projects bound and missing in status.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/teams/{name}", tag = "resources",
    params(("cluster" = String, Path, description = "Cluster id"), ("name" = String, Path)),
    responses((status = 200, body = Team), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub(super) async fn get_team(
    State(state): Shared,
    Path((cluster, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    get_in(state, cluster, None, "teams".into(), name).await
}

/// Create or update a Team with server-side apply: access follows within seconds.
#[utoipa::path(put, path = "/api/v1/clusters/{cluster}/teams/{name}", tag = "resources",
    params(("cluster" = String, Path, description = "Cluster id"), ("name" = String, Path)), request_body = Team,
    responses((status = 200, body = Team), (status = 400, body = ApiError), (status = 404, body = ApiError),
              (status = 409, body = ApiError), (status = 413, body = ApiError), (status = 415, body = ApiError),
              (status = 422, body = ApiError)))]
pub(super) async fn apply_team(
    State(state): Shared,
    Path((cluster, name)): Path<(String, String)>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    apply_in(state, cluster, None, "teams".into(), name, body).await
}

/// Delete a Team (and with it, its members' access to its projects).
#[utoipa::path(delete, path = "/api/v1/clusters/{cluster}/teams/{name}", tag = "resources",
    params(("cluster" = String, Path, description = "Cluster id"), ("name" = String, Path)),
    responses((status = 200, body = TeamDeleted), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub(super) async fn delete_team(
    State(state): Shared,
    Path((cluster, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    delete_in(state, cluster, None, "teams".into(), name).await
}
