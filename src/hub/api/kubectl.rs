//! kubectl for people: issuing a kubeconfig for a user and a cluster, revoking a user's
//! tokens, and the audit trail of their requests (`crate::hub::kubectl` serves the requests).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::{HeaderMap, StatusCode, Uri, header};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ApiState, Shared};
use crate::hub::kubectl::{AuditRecord, PATH_PREFIX};

/// Who a kubeconfig is for.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeconfigRequest {
    /// The ShapeBlock user id (as in Teams' `members`): requests run as
    /// `shapeblock:user:<user>`, with the rights of the Teams that name them.
    pub user: String,
    /// Lifetime of the token, in seconds (default `kubectl.token_ttl_seconds`; at most
    /// `kubectl.max_token_ttl_seconds`).
    pub ttl_seconds: Option<u64>,
}

/// An issued kubeconfig.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuedKubeconfig {
    pub user: String,
    pub cluster: String,
    /// The Kubernetes API URL of the cluster on this hub.
    pub server: String,
    /// When the token expires (Unix time, seconds).
    pub expires_at: u64,
    /// The kubeconfig (YAML), to write to a file for `kubectl --kubeconfig`. It holds the
    /// token: hand it to the user only.
    pub kubeconfig: String,
}

/// The hub's HTTPS base URL for people: `public_url` (its `wss://` as `https://`), or the
/// request's host. A plain `http://` one is refused unless `allow_insecure_hub_url`: the token
/// would travel in clear.
fn server_base(state: &ApiState, headers: &HeaderMap, uri: &Uri) -> Result<String, ApiError> {
    let base = match &state.public_url {
        Some(url) => url
            .replacen("wss://", "https://", 1)
            .replacen("ws://", "http://", 1)
            .trim_end_matches('/')
            .to_string(),
        None => super::clusters::request_base(state, headers, uri, ("https", "http"))?,
    };
    if base.starts_with("http://") && !state.allow_insecure_hub_url {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "InsecureHubUrl",
            format!(
                "the kubeconfig would send its token to {base} in clear; serve the hub over TLS \
                 and set public_url to its https:// (or wss://) address, or allow_insecure_hub_url"
            ),
        ));
    }
    Ok(base)
}

/// Issue a kubeconfig for a user on a cluster: its server is this hub, its credential a
/// short-lived token. The user can do what the cluster's Teams grant them, nothing more.
#[utoipa::path(post, path = "/api/v1/clusters/{cluster}/kubeconfig", tag = "kubectl",
    params(("cluster" = String, Path, description = "Cluster id")), request_body = KubeconfigRequest,
    responses((status = 200, body = IssuedKubeconfig), (status = 400, body = ApiError),
              (status = 404, body = ApiError), (status = 422, body = ApiError)))]
pub(super) async fn issue_kubeconfig(
    State(state): Shared,
    Path(cluster): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Json<KubeconfigRequest>, JsonRejection>,
) -> Result<Json<IssuedKubeconfig>, ApiError> {
    let Json(request) = body?;
    let record = state
        .registry
        .get(&cluster)
        .ok_or_else(|| ApiError::not_found(format!("cluster {cluster}")))?;
    if !crate::tunnel::valid_user_id(&request.user) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!(
                "user {:?} is not a ShapeBlock user id: 1 to 128 letters, digits and ._@+-, starting and ending with a letter or digit",
                request.user
            ),
        ));
    }
    let ttl = match request.ttl_seconds {
        None => state.kubectl.token_ttl,
        Some(0) => return Err(ApiError::bad_request("ttlSeconds must be positive")),
        Some(seconds) if Duration::from_secs(seconds) > state.kubectl.max_token_ttl => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                format!(
                    "ttlSeconds {seconds} is more than kubectl.max_token_ttl_seconds ({})",
                    state.kubectl.max_token_ttl.as_secs()
                ),
            ));
        }
        Some(seconds) => Duration::from_secs(seconds),
    };
    let server = format!(
        "{}{PATH_PREFIX}{cluster}",
        server_base(&state, &headers, &uri)?
    );
    let now = SystemTime::now();
    let token = state
        .kubectl_tokens
        .issue(&request.user, &cluster, ttl, now);
    let expires_at = (now + ttl)
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let context = format!("{}-{}", record.name, request.user);
    let mut cluster_entry = serde_json::json!({"server": server});
    if let Some(ca) = &state.agent_hub_ca {
        cluster_entry["certificate-authority-data"] =
            base64::engine::general_purpose::STANDARD.encode(ca).into();
    }
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": record.name, "cluster": cluster_entry}],
        "users": [{"name": format!("shapeblock-{}", request.user), "user": {"token": token.expose()}}],
        "contexts": [{"name": context, "context": {
            "cluster": record.name, "user": format!("shapeblock-{}", request.user)}}],
        "current-context": context,
    });
    // Plain scalars: the token on one line, as kubeconfigs usually have it.
    let options = serde_saphyr::ser_options! { prefer_block_scalars: false };
    let kubeconfig = serde_saphyr::to_string_with_options(&kubeconfig, options).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            format!("rendering the kubeconfig: {e}"),
        )
    })?;
    tracing::info!(target: "shapeblock::audit", user = %request.user, %cluster,
        ttl_seconds = ttl.as_secs(), "kubeconfig issued");
    Ok(Json(IssuedKubeconfig {
        user: request.user,
        cluster,
        server,
        expires_at,
        kubeconfig,
    }))
}

/// A user's revoked tokens.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevokedTokens {
    pub user: String,
    /// Every token of the user issued up to this instant (Unix time, milliseconds) is refused.
    pub revoked_before: u64,
}

/// Revoke every kubectl token issued to a user so far, on every cluster: their next request
/// gets 401. Kubeconfigs issued afterwards work.
#[utoipa::path(delete, path = "/api/v1/users/{user}/kubectl-tokens", tag = "kubectl",
    params(("user" = String, Path, description = "ShapeBlock user id")),
    responses((status = 200, body = RevokedTokens), (status = 422, body = ApiError),
              (status = 500, body = ApiError)))]
pub(super) async fn revoke_kubectl_tokens(
    State(state): Shared,
    Path(user): Path<String>,
) -> Result<Json<RevokedTokens>, ApiError> {
    if !crate::tunnel::valid_user_id(&user) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("user {user:?} is not a ShapeBlock user id"),
        ));
    }
    let revoked_before = state
        .kubectl_tokens
        .revoke(&user, SystemTime::now())
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "StoreFailed",
                format!("the revocation could not be saved, so it is not in effect: {e}"),
            )
        })?;
    tracing::info!(target: "shapeblock::audit", %user, "kubectl tokens revoked");
    Ok(Json(RevokedTokens {
        user,
        revoked_before,
    }))
}

/// Which audit records to stream.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Start after this record (`seq` of the last one received).
    pub after: Option<u64>,
    /// Keep streaming new records as they come.
    #[serde(default)]
    pub follow: bool,
    /// Only this cluster's requests.
    pub cluster: Option<String>,
    /// Only this user's requests.
    pub user: Option<String>,
}

/// The audit trail of requests made for people through the hub: JSON lines, one
/// [`AuditRecord`] each, oldest first (the records the hub keeps, `kubectl.audit_capacity`),
/// then, with `follow=true`, each new one as it happens. A follower too slow to keep up gets
/// `{"type":"GAP","after":N}` where records were lost, then continues.
#[utoipa::path(get, path = "/api/v1/audit", tag = "kubectl", params(AuditQuery),
    responses((status = 200, description = "JSON lines of audit records", body = AuditRecord,
               content_type = "application/x-ndjson"), (status = 400, body = ApiError)))]
pub(super) async fn audit(
    State(state): Shared,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let (kept, mut live) = state.audit.since(query.after.unwrap_or(0));
    let wanted = move |r: &AuditRecord| {
        query.cluster.as_ref().is_none_or(|c| *c == r.cluster)
            && query.user.as_ref().is_none_or(|u| *u == r.user)
    };
    let line = |r: &AuditRecord| {
        let mut text = serde_json::to_string(r).unwrap_or_default();
        text.push('\n');
        bytes::Bytes::from(text)
    };
    let mut last = query.after.unwrap_or(0);
    let mut first = Vec::new();
    for record in &kept {
        last = record.seq;
        if wanted(record) {
            first.push(line(record));
        }
    }
    let head = futures_util::stream::iter(first.into_iter().map(Ok::<_, std::convert::Infallible>));
    if !query.follow {
        return Ok((
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            axum::body::Body::from_stream(head),
        )
            .into_response());
    }
    let audit = state.audit.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(256);
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let records = tokio::select! {
                received = live.recv() => match received {
                    Ok(record) => vec![record],
                    // Fell behind: what is still kept is sent, and a gap marks the rest.
                    Err(RecvError::Lagged(_)) => {
                        let kept = audit.kept_after(last);
                        if kept.first().is_none_or(|r| r.seq != last + 1) {
                            let gap = format!("{{\"type\":\"GAP\",\"after\":{last}}}\n");
                            if tx.send(gap.into()).await.is_err() {
                                return;
                            }
                        }
                        kept
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            };
            for record in records {
                if record.seq <= last {
                    continue;
                }
                last = record.seq;
                if wanted(&record) && tx.send(line(&record)).await.is_err() {
                    return;
                }
            }
        }
    });
    let tail = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, std::convert::Infallible>(bytes), rx))
    });
    use futures_util::StreamExt;
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(head.chain(tail)),
    )
        .into_response())
}
