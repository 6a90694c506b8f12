//! The hub's HTTP API for the ShapeBlock server (and an operator with curl), one file per
//! resource: `clusters` (registration, tokens, install manifests, connection status),
//! `resources` (the ShapeBlock kinds inside a cluster, through its tunnel), `credentials`
//! (registry credentials of a cluster and of a project), `apps` (an App's
//! logs and its rollback in one call), `kubectl` (kubeconfigs for people, revoking their
//! tokens, the audit trail), [`events`] (the relay's events and build logs as streams) and
//! `health` (liveness, readiness, metrics). The Kubernetes API of each cluster for kubectl,
//! `/k8s/clusters/…`, is served by `crate::hub::kubectl`, with its own tokens.
//! This file holds what they share: state, errors, authentication and the router. Documented
//! by the OpenAPI document generated from the handlers (`GET /api/v1/openapi.json`, committed
//! as `openapi.json`).
//!
//! Every `/api/v1` route needs `Authorization: Bearer <token>`: admin tokens may do
//! everything, viewer tokens only read. Errors are JSON `{code, reason, message}`.
//!
//! Depends on: hub, relay, render, crd, secret, controllers (`credentials` checks a registry
//! Secret as the Project controller does).

mod apps;
pub(crate) mod clusters;
pub mod credentials;
pub mod events;
mod health;
mod kubectl;
mod resources;
mod schema;

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Method, StatusCode, header};
use serde::Serialize;
use subtle::ConstantTimeEq;
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::hub::config::{TokenHash, hash_token};
use crate::hub::gateway::{Gateway, LongRunningLimit, TunnelError};
use crate::hub::registry::{Registry, StoreError};

/// What the API handlers share.
pub struct ApiState {
    pub registry: Arc<Registry>,
    /// Signs and checks the tokens of issued kubeconfigs.
    pub kubectl_tokens: Arc<crate::hub::kubectl::Tokens>,
    /// The audit trail of requests made for people.
    pub audit: Arc<crate::hub::kubectl::Audit>,
    /// kubectl token lifetimes.
    pub kubectl: crate::hub::kubectl::KubectlConfig,
    /// Largest request body accepted (`max_request_body_bytes`).
    pub max_body: usize,
    /// The per-cluster controllers, when the hub runs them.
    pub runtimes: Option<Arc<crate::hub::runtime::Runtimes>>,
    /// The fleet's agent upgrades.
    pub upgrades: Arc<crate::hub::upgrades::Upgrades>,
    pub gateway: Arc<Gateway>,
    pub admin_tokens: Vec<TokenHash>,
    pub viewer_tokens: Vec<TokenHash>,
    pub public_url: Option<String>,
    pub agent_image: String,
    /// The hub's CA certificates (PEM) embedded into install manifests, if any.
    pub agent_hub_ca: Option<String>,
    /// Install manifests may name a loopback or `ws://` hub URL.
    pub allow_insecure_hub_url: bool,
    /// The controllers' `registry_source_namespace`, which the install manifest grants the
    /// agent reading Secrets in.
    pub registry_namespace: String,
    /// The controllers' `default_registry_secret`: the cluster's registry Secret in
    /// `registry_namespace`, which `registry-credentials` writes and the agent may write.
    pub registry_secret: String,
    /// Whether the hub itself serves TLS (for URLs derived from requests).
    pub tls: bool,
    pub metrics: Arc<prometheus_client::registry::Registry>,
    /// Relayed events, for `/api/v1/events`.
    pub journal: Arc<crate::relay::Journal>,
    /// Set once the listener accepts connections (readiness).
    pub serving: std::sync::atomic::AtomicBool,
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
    pub(crate) fn new(status: StatusCode, reason: &str, message: impl Into<String>) -> Self {
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
            StatusCode::TOO_MANY_REQUESTS => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
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

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request(rejection.body_text())
    }
}

impl From<LongRunningLimit> for ApiError {
    fn from(limit: LongRunningLimit) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            limit.to_string(),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        if let StoreError::NameTaken(_) = err {
            return Self::new(StatusCode::CONFLICT, "AlreadyExists", err.to_string());
        }
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
            // kube's stand-in for an error answer that is not a Kubernetes Status (an agent's
            // or a proxy's plain-text 431, 502, …): say what the cluster answered.
            kube::Error::Api(status) if status.reason == "Failed to parse error data" => {
                let code = StatusCode::from_u16(status.code).unwrap_or(StatusCode::BAD_GATEWAY);
                let text: String = status.message.chars().take(256).collect();
                Self::new(
                    code,
                    &reason_of(code),
                    format!(
                        "the cluster answered HTTP {code}{}{text}",
                        if text.is_empty() { "" } else { ": " }
                    ),
                )
            }
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
                Some(busy @ TunnelError::CallerStreamsExhausted(_)) => Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TooManyRequests",
                    busy.to_string(),
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

/// A status code's reason phrase as an API reason: `431` → `RequestHeaderFieldsTooLarge`.
fn reason_of(code: StatusCode) -> String {
    code.canonical_reason()
        .unwrap_or("ClusterRequestFailed")
        .split(|c: char| !c.is_ascii_alphanumeric())
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map_or(String::new(), |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect()
}

/// Refuses a path segment that is not a Kubernetes name before it reaches a cluster (a `%2F`
/// decoded to `/` would otherwise change the path the tunnel is asked for).
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
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

// ---------------------------------------------------------------------------------------------
// Authentication

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Admin,
    Viewer,
}

/// Who made an API request: the hash of its token (limits are counted per token).
#[derive(Clone, Debug)]
pub struct Caller(pub(crate) String);

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
        .and_then(crate::secret::bearer_token)
        .map(|t| hash_token(t.trim()));
    let role = match &presented {
        Some(h) if matches_any(h, &state.admin_tokens) => Role::Admin,
        Some(h) if matches_any(h, &state.viewer_tokens) => Role::Viewer,
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
    let mut request = request;
    if let Some(hash) = presented {
        request.extensions_mut().insert(Caller(hash));
    }
    next.run(request).await
}

#[derive(OpenApi)]
#[openapi(
    info(title = "ShapeBlock hub API", description = "Clusters, tokens, agent install manifests and ShapeBlock resources across managed clusters."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags((name = "clusters", description = "Managed clusters and their agents"),
         (name = "kubectl", description = "kubeconfigs for people, revocation, and the audit trail of their requests"),
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
        .routes(routes!(clusters::list_clusters, clusters::register_cluster))
        .routes(routes!(clusters::get_cluster, clusters::delete_cluster))
        .routes(routes!(clusters::cluster_status))
        .routes(routes!(clusters::rotate_token))
        .routes(routes!(clusters::agent_manifest_yaml))
        .routes(routes!(clusters::pin_agent, clusters::unpin_agent))
        .routes(routes!(clusters::agent_upgrades))
        .routes(routes!(clusters::resume_agent_upgrades))
        .routes(routes!(
            credentials::get_cluster_credentials,
            credentials::put_cluster_credentials,
            credentials::delete_cluster_credentials
        ))
        .routes(routes!(
            credentials::get_project_credentials,
            credentials::put_project_credentials,
            credentials::delete_project_credentials
        ))
        .routes(routes!(resources::list_projects, resources::create_project))
        .routes(routes!(
            resources::get_project,
            resources::apply_project,
            resources::delete_project
        ))
        .routes(routes!(resources::list_apps, resources::create_app))
        .routes(routes!(
            resources::get_app,
            resources::apply_app,
            resources::delete_app
        ))
        .routes(routes!(
            resources::list_appbuilds,
            resources::create_appbuild
        ))
        .routes(routes!(
            resources::get_appbuild,
            resources::apply_appbuild,
            resources::delete_appbuild
        ))
        .routes(routes!(resources::list_services, resources::create_service))
        .routes(routes!(
            resources::get_service,
            resources::apply_service,
            resources::delete_service
        ))
        .routes(routes!(resources::list_teams, resources::create_team))
        .routes(routes!(
            resources::get_team,
            resources::apply_team,
            resources::delete_team
        ))
        .routes(routes!(kubectl::issue_kubeconfig))
        .routes(routes!(kubectl::revoke_kubectl_tokens))
        .routes(routes!(kubectl::audit))
        .routes(routes!(events::events))
        .routes(routes!(events::build_logs))
        .routes(routes!(apps::app_logs))
        .routes(routes!(apps::rollback_app))
}

/// The OpenAPI document of the API, as committed in `openapi.json`.
pub fn openapi() -> Result<serde_json::Value, serde_json::Error> {
    let mut doc = api_routes().into_openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    schema::declare_errors(&mut doc);
    let mut document = serde_json::to_value(&doc)?;
    schema::insert(&mut document);
    Ok(document)
}

/// The hub's HTTP routes (the gateway adds its own).
pub fn router(state: Arc<ApiState>, max_body: usize) -> axum::Router {
    let (api, _) = api_routes().split_for_parts();
    let document = Arc::new(openapi().map_err(|e| e.to_string()));
    let api = api
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(max_body));
    // Every cluster's id, name and agent version are in the metrics: a token on the API port
    // (a viewer's will do); `metrics_listen` serves them without one on an internal address.
    let metrics = axum::Router::new()
        .route("/metrics", axum::routing::get(health::prometheus))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ));
    // The Kubernetes API of each cluster, for kubectl: authenticated by its own tokens.
    let kubernetes = axum::Router::new()
        .route(
            "/k8s/clusters/{cluster}",
            axum::routing::any(crate::hub::kubectl::proxy),
        )
        .route(
            "/k8s/clusters/{cluster}/{*path}",
            axum::routing::any(crate::hub::kubectl::proxy),
        )
        .layer(axum::extract::DefaultBodyLimit::disable());
    axum::Router::new()
        .merge(kubernetes)
        .route("/healthz", axum::routing::get(health::healthz))
        .route("/readyz", axum::routing::get(health::readyz))
        .merge(metrics)
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || async move {
                match document.as_ref() {
                    Ok(document) => Json(document.clone()).into_response(),
                    Err(e) => ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Internal",
                        format!("the OpenAPI document: {e}"),
                    )
                    .into_response(),
                }
            }),
        )
        .merge(api)
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|method: Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} is not allowed on this path (see /api/v1/openapi.json)"),
            )
        })
        .with_state(state)
}

/// The `metrics_listen` listener's routes: `/metrics`, unauthenticated, and nothing else.
pub fn metrics_router(state: Arc<ApiState>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(health::prometheus))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                "this listener serves only /metrics",
            )
        })
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_answer_that_is_not_a_status_says_what_the_cluster_answered() {
        let unparsed = |code: u16, text: &str| {
            let status =
                kube::core::Status::failure(text, "Failed to parse error data").with_code(code);
            ApiError::from(kube::Error::Api(status.boxed()))
        };
        let empty = unparsed(431, "");
        assert_eq!(
            (empty.code, empty.reason.as_str(), empty.message.as_str()),
            (
                431,
                "RequestHeaderFieldsTooLarge",
                "the cluster answered HTTP 431 Request Header Fields Too Large"
            )
        );
        let text = unparsed(502, "upstream connect error");
        assert_eq!(text.reason, "BadGateway");
        assert!(
            text.message.ends_with(": upstream connect error"),
            "{}",
            text.message
        );
        assert_eq!(reason_of(StatusCode::NOT_FOUND), "NotFound");
    }
}
