//! Managed clusters: registration, listing, connection status, deletion, token rotation, the
//! agent install manifest, and the fleet's agent upgrades (pins, report, resume).

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, Uri, header};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use utoipa::ToSchema;

use super::{ApiError, ApiState, Shared};
use crate::hub::gateway::ConnectionState;
use crate::hub::registry::{ClusterRecord, StoreError};
use crate::hub::upgrades::{AgentUpgradeView, FleetUpgrades};
use crate::render::agent::{AgentManifestParams, agent_manifest, to_yaml};

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
    /// The hub's own cluster (its `local_cluster`): registered and given its token by the
    /// hub's configuration, so it cannot be deleted, nor its token rotated, through the API.
    pub local: bool,
    /// Fleet upgrades leave this cluster's agent alone (`PUT …/agent-pin`).
    pub agent_pinned: bool,
    /// Its agent against the hub's `agent_image`, once the hub has read the agent's Deployment
    /// (at each connect).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_upgrade: Option<AgentUpgradeView>,
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
        agent_upgrade: state.upgrades.view(&record.id),
        agent_pinned: record.agent_pinned,
        id: record.id,
        name: record.name,
        labels: record.labels,
        created: record.created.to_string(),
        token_issued: record.token_issued.to_string(),
        last_connected: record.last_connected.map(|t| t.to_string()),
        local: record.local,
    }
}

/// Refuses a change the hub's configuration owns: the local cluster's token comes from
/// `local_cluster.token_file`, which its agent reads too, and the hub registers it again at
/// every start.
fn not_local(state: &ApiState, cluster: &str, what: &str) -> Result<(), ApiError> {
    match state.registry.get(cluster) {
        Some(record) if record.local => Err(ApiError::new(
            StatusCode::CONFLICT,
            "LocalCluster",
            format!(
                "cluster {cluster} ({}) is the hub's own cluster: {what} is done through the \
                 hub's configuration (local_cluster.token_file, given by the hub chart's \
                 localCluster values), not the API",
                record.name
            ),
        )),
        _ => Ok(()),
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
    if let Some(problem) = crate::hub::registry::name_problem(&body.name) {
        return invalid(format!("name {problem}"));
    }
    // Labels, like names, reach log lines, metrics and the UI.
    let control = |text: &str| text.chars().any(char::is_control);
    if let Some((k, _)) = body.labels.iter().find(|(k, v)| control(k) || control(v)) {
        return invalid(format!(
            "label {k:?}: keys and values must not contain control characters"
        ));
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

/// The URL agents dial, from `public_url` or the request: its `Host` header (HTTP/1.1) or its
/// `:authority` (HTTP/2 has no `Host`). Computed and checked before any change, so a request
/// whose URL cannot be derived, or would not work from a managed cluster, changes nothing (no
/// cluster registered, no token rotated and lost).
fn hub_url(state: &ApiState, headers: &HeaderMap, uri: &Uri) -> Result<String, ApiError> {
    let url = derived_hub_url(state, headers, uri)?;
    if !state.allow_insecure_hub_url
        && let Some(why) = insecure(&url)
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "InsecureHubUrl",
            format!(
                "the install manifest would tell agents to dial {url}, {why}; set public_url \
                 (--public-url or SHAPEBLOCK_HUB_PUBLIC_URL) to the wss:// address managed \
                 clusters reach this hub at, e.g. wss://hub.example.com, or, for agents on this \
                 machine or a trusted network only, allow_insecure_hub_url \
                 (--allow-insecure-hub-url)"
            ),
        ));
    }
    Ok(url)
}

/// Why agents in a managed cluster could not use `url` safely, if they could not.
pub(crate) fn insecure(url: &str) -> Option<&'static str> {
    let uri = url.parse::<Uri>().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.to_ascii_lowercase().ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified());
    if loopback {
        Some("a loopback address: from a pod it is the pod itself")
    } else if uri.scheme_str() == Some("ws") {
        Some("which is not encrypted: the agent's token would travel in clear")
    } else {
        None
    }
}

fn derived_hub_url(state: &ApiState, headers: &HeaderMap, uri: &Uri) -> Result<String, ApiError> {
    if let Some(url) = &state.public_url {
        return Ok(url
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1));
    }
    request_base(state, headers, uri, ("wss", "ws"))
}

/// `<scheme>://<host>` of the hub as a request reached it: its `Host` header (HTTP/1.1) or its
/// `:authority` (HTTP/2), with the `secure` scheme when the hub serves TLS or a proxy says it
/// did (`X-Forwarded-Proto: https`), the `plain` one otherwise.
pub(super) fn request_base(
    state: &ApiState,
    headers: &HeaderMap,
    uri: &Uri,
    (secure, plain): (&str, &str),
) -> Result<String, ApiError> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .ok_or_else(|| {
            ApiError::bad_request(
                "no usable Host header or :authority to derive the hub URL agents dial; configure public_url",
            )
        })?;
    let forwarded_tls = headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v == "https");
    let scheme = if state.tls || forwarded_tls {
        secure
    } else {
        plain
    };
    Ok(format!("{scheme}://{host}"))
}

fn manifest(
    state: &ApiState,
    hub_url: &str,
    cluster_id: &str,
    token: &str,
) -> Result<String, ApiError> {
    let params = AgentManifestParams {
        cluster_id: cluster_id.to_string(),
        hub_url: hub_url.to_string(),
        image: state.agent_image.clone(),
        token: token.to_string(),
        registry_namespace: state.registry_namespace.clone(),
        registry_secret: state.registry_secret.clone(),
        hub_ca: state.agent_hub_ca.clone(),
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
pub(super) async fn list_clusters(State(state): Shared) -> Json<Vec<ClusterView>> {
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
              (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 409, body = ApiError),
              (status = 413, body = ApiError), (status = 415, body = ApiError), (status = 422, body = ApiError),
              (status = 500, body = ApiError)))]
pub(super) async fn register_cluster(
    State(state): Shared,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Json<RegisterCluster>, JsonRejection>,
) -> Result<(StatusCode, Json<ClusterWithToken>), ApiError> {
    let Json(body) = body?;
    validate_registration(&body)?;
    let hub_url = hub_url(&state, &headers, &uri)?;
    let registry = state.registry.clone();
    let (record, token) =
        blocking(move || registry.register(body.name.trim(), body.labels)).await?;
    tracing::info!(cluster = %record.id, name = %record.name, "cluster registered");
    let manifest = manifest(&state, &hub_url, &record.id, token.expose())?;
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
pub(super) async fn get_cluster(
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
    responses((status = 200, body = ConnectionState), (status = 404, body = ApiError)))]
pub(super) async fn cluster_status(
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
    responses((status = 204, description = "forgotten"), (status = 404, body = ApiError), (status = 409, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn delete_cluster(
    State(state): Shared,
    Path(cluster): Path<String>,
) -> Result<StatusCode, ApiError> {
    not_local(&state, &cluster, "removing it (localCluster.enabled=false)")?;
    let registry = state.registry.clone();
    let id = cluster.clone();
    if !blocking(move || registry.remove(&id)).await? {
        return Err(ApiError::not_found(format!("cluster {cluster}")));
    }
    if let Some(runtimes) = &state.runtimes {
        runtimes.stop(&cluster);
    }
    state.gateway.forget(&cluster);
    state.upgrades.forget(&cluster);
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
    state
        .gateway
        .disconnect(cluster, crate::tunnel::CloseReason::TokenRevoked);
    tracing::info!(%cluster, "cluster token rotated");
    Ok(token.expose().to_string())
}

/// Rotate a cluster's token. The old token stops working and the live tunnel is closed.
#[utoipa::path(post, path = "/api/v1/clusters/{cluster}/token", tag = "clusters",
    params(("cluster" = String, Path, description = "Cluster id")),
    responses((status = 200, body = RotatedToken), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError),
              (status = 500, body = ApiError)))]
pub(super) async fn rotate_token(
    State(state): Shared,
    headers: HeaderMap,
    uri: Uri,
    Path(cluster): Path<String>,
) -> Result<Json<RotatedToken>, ApiError> {
    not_local(&state, &cluster, "rotating its token")?;
    let hub_url = hub_url(&state, &headers, &uri)?;
    let token = rotate(&state, &cluster).await?;
    let manifest = manifest(&state, &hub_url, &cluster, &token)?;
    Ok(Json(RotatedToken { token, manifest }))
}

/// The agent install manifest as YAML, for `curl -X POST … | kubectl apply -f -`. Issues a new
/// token (the previous one stops working), since the hub keeps only token hashes.
#[utoipa::path(post, path = "/api/v1/clusters/{cluster}/agent-manifest", tag = "clusters",
    params(("cluster" = String, Path, description = "Cluster id")),
    responses((status = 200, content_type = "application/yaml", body = String), (status = 400, body = ApiError), (status = 409, body = ApiError),
              (status = 404, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn agent_manifest_yaml(
    State(state): Shared,
    headers: HeaderMap,
    uri: Uri,
    Path(cluster): Path<String>,
) -> Result<Response, ApiError> {
    not_local(&state, &cluster, "installing its agent")?;
    let hub_url = hub_url(&state, &headers, &uri)?;
    let token = rotate(&state, &cluster).await?;
    let yaml = manifest(&state, &hub_url, &cluster, &token)?;
    Ok(([(header::CONTENT_TYPE, "application/yaml")], yaml).into_response())
}

async fn set_pin(
    state: Arc<ApiState>,
    cluster: String,
    pinned: bool,
) -> Result<Json<ClusterView>, ApiError> {
    let registry = state.registry.clone();
    let id = cluster.clone();
    if !blocking(move || registry.set_agent_pinned(&id, pinned)).await? {
        return Err(ApiError::not_found(format!("cluster {cluster}")));
    }
    tracing::info!(%cluster, pinned, "agent pin changed");
    state.upgrades.reread(&cluster);
    let record = state
        .registry
        .get(&cluster)
        .ok_or_else(|| ApiError::not_found(format!("cluster {cluster}")))?;
    Ok(Json(view(&state, record)))
}

/// Pin a cluster's agent: fleet upgrades leave its image as it is (an upgrade already under
/// way finishes).
#[utoipa::path(put, path = "/api/v1/clusters/{cluster}/agent-pin", tag = "clusters",
    params(("cluster" = String, Path, description = "Cluster id")),
    responses((status = 200, body = ClusterView), (status = 404, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn pin_agent(
    State(state): Shared,
    Path(cluster): Path<String>,
) -> Result<Json<ClusterView>, ApiError> {
    set_pin(state, cluster, true).await
}

/// Unpin a cluster's agent: fleet upgrades bring it to the hub's `agent_image` again.
#[utoipa::path(delete, path = "/api/v1/clusters/{cluster}/agent-pin", tag = "clusters",
    params(("cluster" = String, Path, description = "Cluster id")),
    responses((status = 200, body = ClusterView), (status = 404, body = ApiError), (status = 500, body = ApiError)))]
pub(super) async fn unpin_agent(
    State(state): Shared,
    Path(cluster): Path<String>,
) -> Result<Json<ClusterView>, ApiError> {
    set_pin(state, cluster, false).await
}

/// The fleet's agent upgrades: the target image, whether they are halted and why, and each
/// cluster's state.
#[utoipa::path(get, path = "/api/v1/agent-upgrades", tag = "clusters",
    responses((status = 200, body = FleetUpgrades), (status = 401, body = ApiError)))]
pub(super) async fn agent_upgrades(State(state): Shared) -> Json<FleetUpgrades> {
    Json(state.upgrades.report())
}

/// Resume agent upgrades after a halt: the failure count starts over and failed clusters are
/// tried again (connected ones now, the others when they reconnect).
#[utoipa::path(post, path = "/api/v1/agent-upgrades/resume", tag = "clusters",
    responses((status = 200, body = FleetUpgrades), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub(super) async fn resume_agent_upgrades(State(state): Shared) -> Json<FleetUpgrades> {
    state.upgrades.resume();
    Json(state.upgrades.report())
}

#[cfg(test)]
mod tests {
    use super::insecure;

    #[test]
    fn loopback_and_plaintext_hub_urls_are_named_insecure() {
        for url in [
            "ws://127.0.0.1:8080",
            "wss://127.0.0.1:8443",
            "wss://localhost",
            "wss://hub.localhost",
            "wss://[::1]:8443",
            "wss://0.0.0.0:8080",
            "ws://hub.example.com",
        ] {
            assert!(insecure(url).is_some(), "{url}");
        }
        assert!(
            insecure("ws://10.0.0.5:8080")
                .unwrap()
                .contains("not encrypted")
        );
        assert!(insecure("wss://127.0.0.1").unwrap().contains("loopback"));
        for url in [
            "wss://hub.example.com",
            "wss://10.0.0.5:8443",
            "wss://[2001:db8::1]",
        ] {
            assert_eq!(insecure(url), None, "{url}");
        }
    }
}
