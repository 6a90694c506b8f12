//! The ShapeBlock resources inside a cluster (Projects, Apps, AppBuilds, Services), read and
//! written through the cluster's tunnel with the hub's own field manager.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use http::{Method, StatusCode, header};
use serde_json::Value;
use std::sync::Arc;

use super::{ApiError, ApiState, Shared, check_name};

const FIELD_MANAGER: &str = "shapeblock-api";

/// The ShapeBlock kinds the API serves, by URL plural.
fn kind_of(plural: &str) -> Option<&'static str> {
    match plural {
        "projects" => Some("Project"),
        "apps" => Some("App"),
        "appbuilds" => Some("AppBuild"),
        "services" => Some("Service"),
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
        ("Project", Some(_)) => {
            return Err(ApiError::not_found(
                "projects are cluster-scoped; resource path",
            ));
        }
        ("Project", None) => {}
        (_, None) => {
            return Err(ApiError::not_found(format!(
                "{plural} are namespaced; resource path"
            )));
        }
        (_, Some(ns)) => check_name("namespace", ns)?,
    }
    Ok(Target {
        client: state.gateway.client(cluster),
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

/// List Projects in a cluster.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/projects", tag = "resources",
    params(("cluster" = String, Path)),
    responses((status = 200, body = Object, description = "A ProjectList"), (status = 503, body = ApiError)))]
pub(super) async fn list_projects(
    State(state): Shared,
    Path(cluster): Path<String>,
) -> Result<Json<Value>, ApiError> {
    list_in(state, cluster, None, "projects".into()).await
}

/// Create a Project (validated by the cluster's CRD schema; unknown fields are rejected).
#[utoipa::path(post, path = "/api/v1/clusters/{cluster}/projects", tag = "resources",
    params(("cluster" = String, Path)), request_body = Object,
    responses((status = 201, body = Object), (status = 400, body = ApiError), (status = 409, body = ApiError),
              (status = 422, body = ApiError), (status = 503, body = ApiError)))]
pub(super) async fn create_project(
    State(state): Shared,
    Path(cluster): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    create_in(state, cluster, None, "projects".into(), body).await
}

/// Get a Project.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/projects/{name}", tag = "resources",
    params(("cluster" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ApiError), (status = 503, body = ApiError)))]
pub(super) async fn get_project(
    State(state): Shared,
    Path((cluster, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    get_in(state, cluster, None, "projects".into(), name).await
}

/// Create or update a Project with server-side apply.
#[utoipa::path(put, path = "/api/v1/clusters/{cluster}/projects/{name}", tag = "resources",
    params(("cluster" = String, Path), ("name" = String, Path)), request_body = Object,
    responses((status = 200, body = Object), (status = 400, body = ApiError), (status = 422, body = ApiError), (status = 503, body = ApiError)))]
pub(super) async fn apply_project(
    State(state): Shared,
    Path((cluster, name)): Path<(String, String)>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    apply_in(state, cluster, None, "projects".into(), name, body).await
}

/// Delete a Project (and with it, its namespace).
#[utoipa::path(delete, path = "/api/v1/clusters/{cluster}/projects/{name}", tag = "resources",
    params(("cluster" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ApiError), (status = 503, body = ApiError)))]
pub(super) async fn delete_project(
    State(state): Shared,
    Path((cluster, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    delete_in(state, cluster, None, "projects".into(), name).await
}

/// List Apps, AppBuilds or Services in a namespace.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/namespaces/{namespace}/{kind}", tag = "resources",
    params(("cluster" = String, Path), ("namespace" = String, Path),
           ("kind" = String, Path, description = "apps, appbuilds or services")),
    responses((status = 200, body = Object), (status = 404, body = ApiError), (status = 503, body = ApiError)))]
pub(super) async fn list_namespaced(
    State(state): Shared,
    Path((cluster, namespace, kind)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    list_in(state, cluster, Some(namespace), kind).await
}

/// Create an App, AppBuild or Service (validated by the CRD schema; unknown fields rejected).
#[utoipa::path(post, path = "/api/v1/clusters/{cluster}/namespaces/{namespace}/{kind}", tag = "resources",
    params(("cluster" = String, Path), ("namespace" = String, Path),
           ("kind" = String, Path, description = "apps, appbuilds or services")), request_body = Object,
    responses((status = 201, body = Object), (status = 400, body = ApiError), (status = 409, body = ApiError),
              (status = 422, body = ApiError), (status = 503, body = ApiError)))]
pub(super) async fn create_namespaced(
    State(state): Shared,
    Path((cluster, namespace, kind)): Path<(String, String, String)>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    create_in(state, cluster, Some(namespace), kind, body).await
}

/// Get an App, AppBuild or Service.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/namespaces/{namespace}/{kind}/{name}", tag = "resources",
    params(("cluster" = String, Path), ("namespace" = String, Path),
           ("kind" = String, Path, description = "apps, appbuilds or services"), ("name" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ApiError), (status = 503, body = ApiError)))]
pub(super) async fn get_namespaced(
    State(state): Shared,
    Path((cluster, namespace, kind, name)): Path<(String, String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    get_in(state, cluster, Some(namespace), kind, name).await
}

/// Create or update an App, AppBuild or Service with server-side apply.
#[utoipa::path(put, path = "/api/v1/clusters/{cluster}/namespaces/{namespace}/{kind}/{name}", tag = "resources",
    params(("cluster" = String, Path), ("namespace" = String, Path),
           ("kind" = String, Path, description = "apps, appbuilds or services"), ("name" = String, Path)),
    request_body = Object,
    responses((status = 200, body = Object), (status = 400, body = ApiError), (status = 422, body = ApiError), (status = 503, body = ApiError)))]
pub(super) async fn apply_namespaced(
    State(state): Shared,
    Path((cluster, namespace, kind, name)): Path<(String, String, String, String)>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    apply_in(state, cluster, Some(namespace), kind, name, body).await
}

/// Delete an App, AppBuild or Service.
#[utoipa::path(delete, path = "/api/v1/clusters/{cluster}/namespaces/{namespace}/{kind}/{name}", tag = "resources",
    params(("cluster" = String, Path), ("namespace" = String, Path),
           ("kind" = String, Path, description = "apps, appbuilds or services"), ("name" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = ApiError), (status = 503, body = ApiError)))]
pub(super) async fn delete_namespaced(
    State(state): Shared,
    Path((cluster, namespace, kind, name)): Path<(String, String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    delete_in(state, cluster, Some(namespace), kind, name).await
}
