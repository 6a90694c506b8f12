//! The hub's HTTP API for the ShapeBlock server (and an operator with curl): clusters, their
//! tokens and install manifests, connection status, and the ShapeBlock resources inside each
//! cluster through its tunnel. Documented by the OpenAPI document generated from these
//! handlers (`GET /api/v1/openapi.json`, committed as `openapi.json`).
//!
//! Every `/api/v1` route needs `Authorization: Bearer <token>`: admin tokens may do
//! everything, viewer tokens only read. Errors are JSON `{code, reason, message}`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use subtle::ConstantTimeEq;
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::config::{TokenHash, hash_token};
use super::gateway::{ConnectionState, Gateway, TunnelError};
use super::registry::{ClusterRecord, Registry, StoreError};
use crate::render::agent::{AgentManifestParams, agent_manifest, to_yaml};

/// What the API handlers share.
pub struct ApiState {
    pub registry: Arc<Registry>,
    /// The per-cluster controllers, when the hub runs them.
    pub runtimes: Option<Arc<super::runtime::Runtimes>>,
    pub gateway: Arc<Gateway>,
    pub admin_tokens: Vec<TokenHash>,
    pub viewer_tokens: Vec<TokenHash>,
    pub public_url: Option<String>,
    pub agent_image: String,
    /// Whether the hub itself serves TLS (for URLs derived from requests).
    pub tls: bool,
    pub metrics: Arc<prometheus_client::registry::Registry>,
    /// Relayed events, for `/api/v1/events`.
    pub journal: Arc<crate::relay::Journal>,
}

type Shared = State<Arc<ApiState>>;

/// An API error: HTTP status, a machine-readable reason, a human message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// Machine-readable reason, e.g. `NotFound`, `Invalid`, `ClusterNotConnected`.
    pub reason: String,
    /// What went wrong, for a human.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, reason: &str, message: impl Into<String>) -> Self {
        Self {
            code: status.as_u16(),
            reason: reason.into(),
            message: message.into(),
        }
    }

    pub(crate) fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{what} not found"),
        )
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(&self)).into_response();
        match status {
            StatusCode::UNAUTHORIZED => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"shapeblock-hub\""),
                );
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            }
            _ => {}
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let reason = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "RequestEntityTooLarge",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "UnsupportedMediaType",
            StatusCode::UNPROCESSABLE_ENTITY => "Invalid",
            _ => "BadRequest",
        };
        Self::new(status, reason, rejection.body_text())
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        tracing::error!(error = %err, "cluster store write failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "StoreFailed",
            format!("the change was not saved: {err}"),
        )
    }
}

/// Finds a [`TunnelError`] anywhere in an error's source chain.
fn tunnel_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a TunnelError> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(t) = e.downcast_ref::<TunnelError>() {
            return Some(t);
        }
        current = e.source();
    }
    None
}

impl From<kube::Error> for ApiError {
    fn from(err: kube::Error) -> Self {
        match &err {
            kube::Error::Api(status) => {
                let code = StatusCode::from_u16(status.code).unwrap_or(StatusCode::BAD_GATEWAY);
                Self::new(code, &status.reason, status.message.clone())
            }
            _ => match tunnel_error(&err) {
                Some(TunnelError::NotConnected(cluster)) => Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ClusterNotConnected",
                    format!(
                        "cluster {cluster} is offline: its agent has no live tunnel to the hub; nothing was changed"
                    ),
                ),
                Some(other) => Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "TunnelFailed",
                    other.to_string(),
                ),
                None => Self::new(
                    StatusCode::BAD_GATEWAY,
                    "ClusterRequestFailed",
                    err.to_string(),
                ),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Admin,
    Viewer,
}

fn matches_any(presented: &str, hashes: &[TokenHash]) -> bool {
    // Compare against every configured hash so timing does not reveal which one matched.
    hashes.iter().fold(false, |found, h| {
        found | bool::from(presented.as_bytes().ct_eq(h.0.as_bytes()))
    })
}

/// Checks the bearer token of every `/api/v1` request.
async fn authenticate(State(state): Shared, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| hash_token(t.trim()));
    let role = match presented {
        Some(h) if matches_any(&h, &state.admin_tokens) => Role::Admin,
        Some(h) if matches_any(&h, &state.viewer_tokens) => Role::Viewer,
        Some(_) => {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "the API token is not valid",
            )
            .into_response();
        }
        None => {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "an API token is required: Authorization: Bearer <token>",
            )
            .into_response();
        }
    };
    let read_only = matches!(*request.method(), Method::GET | Method::HEAD);
    if role == Role::Viewer && !read_only {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "this token may only read; changes need an admin token",
        )
        .into_response();
    }
    next.run(request).await
}

// ---------------------------------------------------------------------------------------------
// Clusters

/// Body of `POST /api/v1/clusters`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterCluster {
    /// Human-readable name (1–63 characters).
    pub name: String,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A registered cluster and its connection state.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// RFC 3339.
    pub created: String,
    /// When the current token was issued (RFC 3339).
    pub token_issued: String,
    /// When the agent last established a tunnel (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_connected: Option<String>,
    #[schema(value_type = Object)]
    pub status: ConnectionState,
}

/// A cluster with a newly issued token (shown once; the hub keeps only its hash).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterWithToken {
    pub cluster: ClusterView,
    /// The cluster token. Store it now: it cannot be shown again.
    pub token: String,
    /// The agent install manifest (multi-document YAML) carrying this token.
    pub manifest: String,
}

fn view(state: &ApiState, record: ClusterRecord) -> ClusterView {
    ClusterView {
        status: state.gateway.status(&record.id),
        id: record.id,
        name: record.name,
        labels: record.labels,
        created: record.created.to_string(),
        token_issued: record.token_issued.to_string(),
        last_connected: record.last_connected.map(|t| t.to_string()),
    }
}

fn validate_registration(body: &RegisterCluster) -> Result<(), ApiError> {
    let invalid = |m: String| {
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            m,
        ))
    };
    if body.name.trim().is_empty() || body.name.len() > 63 {
        return invalid("name must be 1 to 63 characters".into());
    }
    if body.labels.len() > 64 {
        return invalid("at most 64 labels".into());
    }
    if let Some((k, _)) = body
        .labels
        .iter()
        .find(|(k, v)| k.is_empty() || k.len() > 63 || v.len() > 253)
    {
        return invalid(format!(
            "label {k:?}: keys must be 1 to 63 characters, values at most 253"
        ));
    }
    Ok(())
}

/// The URL agents dial: the configured public URL, or the one this request came in on.
fn hub_url(state: &ApiState, headers: &HeaderMap) -> Result<String, ApiError> {
    if let Some(url) = &state.public_url {
        return Ok(url
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1));
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .ok_or_else(|| ApiError::bad_request("no usable Host header; configure public_url"))?;
    let forwarded_tls = headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v == "https");
    let scheme = if state.tls || forwarded_tls {
        "wss"
    } else {
        "ws"
    };
    Ok(format!("{scheme}://{host}"))
}

fn manifest(
    state: &ApiState,
    headers: &HeaderMap,
    cluster_id: &str,
    token: &str,
) -> Result<String, ApiError> {
    let params = AgentManifestParams {
        cluster_id: cluster_id.to_string(),
        hub_url: hub_url(state, headers)?,
        image: state.agent_image.clone(),
        token: token.to_string(),
    };
    to_yaml(&agent_manifest(&params)).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "RenderFailed",
            e.to_string(),
        )
    })
}

/// Runs a registry change off the async workers (it syncs to disk).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()))?
        .map_err(ApiError::from)
}

/// List registered clusters with their connection state.
#[utoipa::path(get, path = "/api/v1/clusters", tag = "clusters",
    responses((status = 200, body = Vec<ClusterView>), (status = 401, body = ApiError)))]
async fn list_clusters(State(state): Shared) -> Json<Vec<ClusterView>> {
    Json(
        state
            .registry
            .list()
            .into_iter()
            .map(|r| view(&state, r))
            .collect(),
    )
}

/// Register a cluster. The response carries its token and install manifest, once.
#[utoipa::path(post, path = "/api/v1/clusters", tag = "clusters", request_body = RegisterCluster,
    responses((status = 201, body = ClusterWithToken), (status = 400, body = ApiError),
              (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 422, body = ApiError)))]
async fn register_cluster(
    State(state): Shared,
    headers: HeaderMap,
    body: Result<Json<RegisterCluster>, JsonRejection>,
) -> Result<(StatusCode, Json<ClusterWithToken>), ApiError> {
    let Json(body) = body?;
    validate_registration(&body)?;
    let registry = state.registry.clone();
    let (record, token) =
        blocking(move || registry.register(body.name.trim(), body.labels)).await?;
    tracing::info!(cluster = %record.id, name = %record.name, "cluster registered");
    let manifest = manifest(&state, &headers, &record.id, token.expose())?;
    Ok((
        StatusCode::CREATED,
        Json(ClusterWithToken {
            cluster: view(&state, record),
            token: token.expose().to_string(),
            manifest,
        }),
    ))
}

/// Get one cluster with its connection state.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}", tag = "clusters",
    params(("cluster" = String, Path, description = "Cluster id")),
    responses((status = 200, body = ClusterView), (status = 404, body = ApiError)))]
async fn get_cluster(
    State(state): Shared,
    Path(cluster): Path<String>,
) -> Result<Json<ClusterView>, ApiError> {
    let record = state
        .registry
        .get(&cluster)
        .ok_or_else(|| ApiError::not_found(format!("cluster {cluster}")))?;
    Ok(Json(view(&state, record)))
}

/// Connection state of a cluster: connected, since, last seen, round-trip time, versions.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/status", tag = "clusters",
    params(("cluster" = String, Path, description = "Cluster id")),
    responses((status = 200, body = Object), (status = 404, body = ApiError)))]
async fn cluster_status(
    State(state): Shared,
    Path(cluster): Path<String>,
) -> Result<Json<ConnectionState>, ApiError> {
    state
        .registry
        .get(&cluster)
        .ok_or_else(|| ApiError::not_found(format!("cluster {cluster}")))?;
    Ok(Json(state.gateway.status(&cluster)))
}

/// Delete a cluster: its token stops working and its tunnel is closed.
#[utoipa::path(delete, path = "/api/v1/clusters/{cluster}", tag = "clusters",
    params(("cluster" = String, Path, description = "Cluster id")),
    responses((status = 204), (status = 404, body = ApiError)))]
async fn delete_cluster(
    State(state): Shared,
    Path(cluster): Path<String>,
) -> Result<StatusCode, ApiError> {
    let registry = state.registry.clone();
    let id = cluster.clone();
    if !blocking(move || registry.remove(&id)).await? {
        return Err(ApiError::not_found(format!("cluster {cluster}")));
    }
    if let Some(runtimes) = &state.runtimes {
        runtimes.stop(&cluster);
    }
    state.gateway.forget(&cluster);
    tracing::info!(%cluster, "cluster deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// A rotated token.
#[derive(Debug, Serialize, ToSchema)]
pub struct RotatedToken {
    /// The new cluster token. Store it now: it cannot be shown again.
    pub token: String,
    /// The agent install manifest carrying the new token.
    pub manifest: String,
}

async fn rotate(state: &ApiState, cluster: &str) -> Result<String, ApiError> {
    let registry = state.registry.clone();
    let id = cluster.to_string();
    let token = blocking(move || registry.rotate_token(&id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("cluster {cluster}")))?;
    // The old token no longer authenticates; close the tunnel it opened.
    state.gateway.disconnect(cluster);
    tracing::info!(%cluster, "cluster token rotated");
    Ok(token.expose().to_string())
}

/// Rotate a cluster's token. The old token stops working and the live tunnel is closed.
#[utoipa::path(post, path = "/api/v1/clusters/{cluster}/token", tag = "clusters",
    params(("cluster" = String, Path, description = "Cluster id")),
    responses((status = 200, body = RotatedToken), (status = 404, body = ApiError)))]
async fn rotate_token(
    State(state): Shared,
    headers: HeaderMap,
    Path(cluster): Path<String>,
) -> Result<Json<RotatedToken>, ApiError> {
    let token = rotate(&state, &cluster).await?;
    let manifest = manifest(&state, &headers, &cluster, &token)?;
    Ok(Json(RotatedToken { token, manifest }))
}

/// The agent install manifest as YAML, for `curl -X POST … | kubectl apply -f -`. Issues a new
/// token (the previous one stops working), since the hub keeps only token hashes.
#[utoipa::path(post, path = "/api/v1/clusters/{cluster}/agent-manifest", tag = "clusters",
    params(("cluster" = String, Path, description = "Cluster id")),
    responses((status = 200, content_type = "application/yaml", body = String), (status = 404, body = ApiError)))]
async fn agent_manifest_yaml(
    State(state): Shared,
    headers: HeaderMap,
    Path(cluster): Path<String>,
) -> Result<Response, ApiError> {
    let token = rotate(&state, &cluster).await?;
    let yaml = manifest(&state, &headers, &cluster, &token)?;
    Ok(([(header::CONTENT_TYPE, "application/yaml")], yaml).into_response())
}

// ---------------------------------------------------------------------------------------------
// ShapeBlock resources in a cluster

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
fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{what} {name:?} is not a valid Kubernetes name"
        )))
    }
}

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
async fn list_projects(
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
async fn create_project(
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
async fn get_project(
    State(state): Shared,
    Path((cluster, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    get_in(state, cluster, None, "projects".into(), name).await
}

/// Create or update a Project with server-side apply.
#[utoipa::path(put, path = "/api/v1/clusters/{cluster}/projects/{name}", tag = "resources",
    params(("cluster" = String, Path), ("name" = String, Path)), request_body = Object,
    responses((status = 200, body = Object), (status = 400, body = ApiError), (status = 422, body = ApiError), (status = 503, body = ApiError)))]
async fn apply_project(
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
async fn delete_project(
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
async fn list_namespaced(
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
async fn create_namespaced(
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
async fn get_namespaced(
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
async fn apply_namespaced(
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
async fn delete_namespaced(
    State(state): Shared,
    Path((cluster, namespace, kind, name)): Path<(String, String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    delete_in(state, cluster, Some(namespace), kind, name).await
}

// ---------------------------------------------------------------------------------------------
// Health, metrics, OpenAPI

#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
}

/// Liveness: the process is up and serving HTTP.
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// Readiness: the registry is loaded and the listener serves (both hold once the hub runs).
async fn readyz(State(state): Shared) -> Json<Value> {
    Json(serde_json::json!({
        "status": "ok",
        "clusters": state.registry.list().len(),
        "connected": state.gateway.connected_count(),
    }))
}

/// Prometheus text exposition.
async fn prometheus(State(state): Shared) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.metrics) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(err) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            err.to_string(),
        )
        .into_response(),
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "ShapeBlock hub API", description = "Clusters, tokens, agent install manifests and ShapeBlock resources across managed clusters."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags((name = "clusters", description = "Managed clusters and their agents"),
         (name = "resources", description = "ShapeBlock resources inside a cluster, through its tunnel"))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

fn api_routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_clusters, register_cluster))
        .routes(routes!(get_cluster, delete_cluster))
        .routes(routes!(cluster_status))
        .routes(routes!(rotate_token))
        .routes(routes!(agent_manifest_yaml))
        .routes(routes!(list_projects, create_project))
        .routes(routes!(get_project, apply_project, delete_project))
        .routes(routes!(list_namespaced, create_namespaced))
        .routes(routes!(get_namespaced, apply_namespaced, delete_namespaced))
        .routes(routes!(super::events::events))
        .routes(routes!(super::events::build_logs))
}

/// The OpenAPI document of the API, as committed in `openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api_routes().into_openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// The hub's HTTP routes (the gateway adds its own).
pub fn router(state: Arc<ApiState>, max_body: usize) -> axum::Router {
    let (api, _) = api_routes().split_for_parts();
    let document = Arc::new(openapi());
    let api = api
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(max_body));
    axum::Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(prometheus))
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || async move { Json(document.as_ref().clone()) }),
        )
        .merge(api)
        .fallback(|| async { ApiError::not_found("route") })
        .with_state(state)
}
