//! kubectl for people through the hub. Managed clusters take no inbound connection, so the hub
//! serves each cluster's Kubernetes API at `/k8s/clusters/<cluster>` and forwards every
//! request through the cluster's tunnel as the person who made it:
//!
//! - [`Tokens`]: the credential of an issued kubeconfig, a short-lived token the hub signs
//!   (HMAC-SHA256 with a key kept in the data directory, mode 0600): it names the user and the
//!   cluster and expires; all of a user's tokens are revoked at once by a per-user
//!   "not before". Nothing about a token is stored, and a token is never logged.
//! - [`proxy`]: the handler. It refuses a request that carries its own `Impersonate-*`
//!   headers or asks for a connection upgrade (exec, attach, port-forward: the tunnel carries
//!   HTTP requests, not upgraded streams), and asks the agent to act for the user and the
//!   Teams the cluster's Team controller knows them in (the `x-shapeblock-act-as-*` headers).
//!   The agent impersonates `shapeblock:user:<id>` and `shapeblock:team:<name>`, and nothing
//!   else, so what the person may do is what Teams' RoleBindings grant.
//! - [`Audit`]: one structured log line (target `shapeblock::audit`) per request, counted
//!   in `shapeblock_kubectl_requests_total`, and kept for `GET /api/v1/audit`.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::api::ApiState;
use super::registry::{StoreError, write_atomically};
use crate::secret::Secret;
use crate::tunnel::{ACT_AS_TEAM_HEADER, ACT_AS_USER_HEADER};

/// Where the hub serves each cluster's Kubernetes API: `/k8s/clusters/<cluster>/…`.
pub const PATH_PREFIX: &str = "/k8s/clusters/";
/// How issued tokens begin (so a leaked one is recognisable, and never confused with an API
/// or cluster token).
pub const TOKEN_PREFIX: &str = "sbk_";
/// The file beside the registry that holds the signing key and the revocations.
pub const TOKENS_FILE: &str = "kubectl-tokens.json";

/// The `kubectl:` section of the hub's configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubectlConfig {
    /// Lifetime of an issued kubeconfig's token when the request names none.
    #[serde(
        rename = "token_ttl_seconds",
        deserialize_with = "crate::config::seconds"
    )]
    pub token_ttl: Duration,
    /// The longest lifetime a request may ask for.
    #[serde(
        rename = "max_token_ttl_seconds",
        deserialize_with = "crate::config::seconds"
    )]
    pub max_token_ttl: Duration,
    /// Audit records kept in memory for `GET /api/v1/audit` (the log has them all).
    pub audit_capacity: usize,
}

impl Default for KubectlConfig {
    fn default() -> Self {
        Self {
            token_ttl: Duration::from_secs(3600),
            max_token_ttl: Duration::from_secs(24 * 3600),
            audit_capacity: 10_000,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens

type HmacSha256 = Hmac<Sha256>;

/// What a token says: who, for which cluster, issued when (ms), expiring when (s).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(rename = "u")]
    pub user: String,
    #[serde(rename = "c")]
    pub cluster: String,
    /// Issued at, Unix milliseconds.
    #[serde(rename = "i")]
    pub issued_ms: u64,
    /// Expires at, Unix seconds.
    #[serde(rename = "e")]
    pub expires: u64,
}

/// Why a token was refused; the message goes to the client (kubectl shows it).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a ShapeBlock kubectl token")]
    Malformed,
    #[error("the token's signature is not valid")]
    BadSignature,
    #[error("the token expired; ask ShapeBlock for a new kubeconfig")]
    Expired,
    #[error("the token was revoked; ask ShapeBlock for a new kubeconfig")]
    Revoked,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokensFile {
    version: u32,
    /// The signing key, hex.
    signing_key: String,
    /// Per user: tokens issued before this (Unix ms) are refused.
    #[serde(default)]
    revoked_before: BTreeMap<String, u64>,
}

struct TokenState {
    key: [u8; 32],
    revoked_before: BTreeMap<String, u64>,
}

/// Issues and checks kubectl tokens.
pub struct Tokens {
    state: RwLock<TokenState>,
    /// Where the key and revocations persist (None: in memory, for in-memory registries).
    dir: Option<PathBuf>,
    writer: Mutex<()>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Tokens {
    /// Loads the key and revocations from `dir`, creating a new key on first use; in memory
    /// when `dir` is None.
    pub fn open(dir: Option<&Path>) -> Result<Self, StoreError> {
        let fresh = || TokenState {
            key: rand::random(),
            revoked_before: BTreeMap::new(),
        };
        let state = match dir {
            None => fresh(),
            Some(dir) => {
                let path = dir.join(TOKENS_FILE);
                let corrupt = |message: String| StoreError::Corrupt {
                    path: path.clone(),
                    message,
                };
                match std::fs::read(&path) {
                    Ok(bytes) => {
                        let file: TokensFile =
                            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                        let key = unhex(&file.signing_key)
                            .and_then(|k| <[u8; 32]>::try_from(k).ok())
                            .ok_or_else(|| corrupt("signingKey is not 32 bytes of hex".into()))?;
                        TokenState {
                            key,
                            revoked_before: file.revoked_before,
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let state = fresh();
                        persist(dir, &state)?;
                        state
                    }
                    Err(source) => return Err(StoreError::Io { path, source }),
                }
            }
        };
        Ok(Self {
            state: RwLock::new(state),
            dir: dir.map(Path::to_path_buf),
            writer: Mutex::new(()),
        })
    }

    /// A token for `user` on `cluster`, valid for `ttl` from `now`.
    pub fn issue(&self, user: &str, cluster: &str, ttl: Duration, now: SystemTime) -> Secret {
        let claims = Claims {
            user: user.into(),
            cluster: cluster.into(),
            issued_ms: unix_ms(now),
            expires: (now + ttl)
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signature = URL_SAFE_NO_PAD.encode(self.sign(&payload));
        Secret::new(format!("{TOKEN_PREFIX}{payload}.{signature}"))
    }

    /// The MAC of the current key (HMAC takes keys of any length, so there always is one).
    fn mac(&self) -> Option<HmacSha256> {
        let key = self.state.read().unwrap_or_else(|p| p.into_inner()).key;
        <HmacSha256 as Mac>::new_from_slice(&key).ok()
    }

    fn sign(&self, payload: &str) -> Vec<u8> {
        self.mac().map_or_else(Vec::new, |mut mac| {
            mac.update(payload.as_bytes());
            mac.finalize().into_bytes().to_vec()
        })
    }

    /// What a token says, if it is ours, unexpired and not revoked at `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, TokenError> {
        let rest = token
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Malformed)?;
        let (payload, signature) = rest.split_once('.').ok_or(TokenError::Malformed)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac().ok_or(TokenError::BadSignature)?;
        mac.update(payload.as_bytes());
        // Constant time: the signature is checked before anything in the payload is trusted.
        mac.verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or(TokenError::Malformed)?;
        if claims.expires <= now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) {
            return Err(TokenError::Expired);
        }
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        if state
            .revoked_before
            .get(&claims.user)
            .is_some_and(|before| claims.issued_ms <= *before)
        {
            return Err(TokenError::Revoked);
        }
        Ok(claims)
    }

    /// Revokes every token of `user` issued up to `now`; returns that instant (Unix ms).
    /// Persisted before it returns: a revocation survives a restart.
    pub fn revoke(&self, user: &str, now: SystemTime) -> Result<u64, StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let at = unix_ms(now);
        let mut next = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            TokenState {
                key: state.key,
                revoked_before: state.revoked_before.clone(),
            }
        };
        next.revoked_before.insert(user.to_string(), at);
        if let Some(dir) = &self.dir {
            persist(dir, &next)?;
        }
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(at)
    }
}

fn persist(dir: &Path, state: &TokenState) -> Result<(), StoreError> {
    let file = TokensFile {
        version: 1,
        signing_key: hex(&state.key),
        revoked_before: state.revoked_before.clone(),
    };
    let body = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Corrupt {
        path: dir.join(TOKENS_FILE),
        message: e.to_string(),
    })?;
    write_atomically(dir, TOKENS_FILE, &body)
}

// ---------------------------------------------------------------------------------------------
// What a request asks for

/// What the apiserver would call a request (pure): its verb, resource, namespace and name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestInfo {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`; for
    /// a path that is not a resource (`/api`, `/version`), the method in lower case.
    pub verb: String,
    /// The resource with its API group (`pods`, `deployments.apps`), and `/subresource`
    /// (`pods/log`); for other paths, the path.
    pub resource: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Parses a Kubernetes API request as the apiserver's request-info resolver does (pure).
pub fn request_info(method: &Method, path: &str, query: Option<&str>) -> RequestInfo {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => {
            return RequestInfo {
                verb: method.as_str().to_ascii_lowercase(),
                resource: path.to_string(),
                ..Default::default()
            };
        }
    };
    let (legacy_watch, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        rest => (false, rest),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (resource, name, subresource) = match rest {
        [] => {
            return RequestInfo {
                verb: method.as_str().to_ascii_lowercase(),
                resource: path.to_string(),
                ..Default::default()
            };
        }
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(name.to_string()), None),
        [resource, name, sub, ..] => (*resource, Some(name.to_string()), Some(*sub)),
    };
    let watch = legacy_watch
        || query.is_some_and(|q| {
            q.split('&')
                .any(|kv| kv == "watch=true" || kv == "watch=1" || kv == "watch")
        });
    let verb = match (method, name.is_some()) {
        (&Method::GET | &Method::HEAD, _) if watch => "watch",
        (&Method::GET | &Method::HEAD, true) => "get",
        (&Method::GET | &Method::HEAD, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        (other, _) => {
            return RequestInfo {
                verb: other.as_str().to_ascii_lowercase(),
                resource: path.to_string(),
                ..Default::default()
            };
        }
    };
    let mut full = resource.to_string();
    if !group.is_empty() {
        full = format!("{full}.{group}");
    }
    if let Some(sub) = subresource {
        full = format!("{full}/{sub}");
    }
    RequestInfo {
        verb: verb.into(),
        resource: full,
        namespace,
        name,
    }
}

/// Whether a request runs until the client stops it: a watch, or a followed log.
fn long_running(info: &RequestInfo, query: Option<&str>) -> bool {
    info.verb == "watch"
        || (info.resource.ends_with("/log")
            && query.is_some_and(|q| q.split('&').any(|kv| kv == "follow=true")))
}

// ---------------------------------------------------------------------------------------------
// Audit

/// One request made for a person, as the audit trail keeps it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// Position in the hub's audit trail (1, 2, …; `after` resumes from one).
    pub seq: u64,
    /// When the response began (Unix time, seconds).
    pub time: f64,
    /// The ShapeBlock user id.
    pub user: String,
    pub cluster: String,
    #[serde(flatten)]
    pub request: RequestInfo,
    /// The HTTP status answered.
    pub code: u16,
    /// Time to the response's headers, milliseconds.
    pub latency_ms: f64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuditLabel {
    cluster: String,
    verb: String,
    code: u16,
}

/// The audit trail of requests made for people.
pub struct Audit {
    kept: Mutex<VecDeque<AuditRecord>>,
    capacity: usize,
    next: AtomicU64,
    live: tokio::sync::broadcast::Sender<AuditRecord>,
    requests: Family<AuditLabel, Counter>,
}

impl Audit {
    pub fn new(capacity: usize) -> Self {
        Self {
            kept: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            next: AtomicU64::new(1),
            live: tokio::sync::broadcast::channel(1024).0,
            requests: Family::default(),
        }
    }

    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "shapeblock_kubectl_requests",
            "Kubernetes API requests made for people through the hub (kubectl), by cluster, verb and response code",
            self.requests.clone(),
        );
    }

    /// Records a request: the audit log line, the counter, the kept record, the live streams.
    pub fn record(
        &self,
        user: &str,
        cluster: &str,
        request: RequestInfo,
        code: u16,
        latency: Duration,
    ) {
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let latency_ms = latency.as_secs_f64() * 1000.0;
        tracing::info!(target: "shapeblock::audit", user, cluster, verb = %request.verb,
            resource = %request.resource, namespace = request.namespace.as_deref().unwrap_or(""),
            name = request.name.as_deref().unwrap_or(""), code, latency_ms, "kubectl request");
        self.requests
            .get_or_create(&AuditLabel {
                cluster: cluster.into(),
                verb: request.verb.clone(),
                code,
            })
            .inc();
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        // Numbered under the lock, so the kept records and the live stream are in order.
        let record = AuditRecord {
            seq: self.next.fetch_add(1, Ordering::Relaxed),
            time,
            user: user.into(),
            cluster: cluster.into(),
            request,
            code,
            latency_ms,
        };
        if kept.len() == self.capacity {
            kept.pop_front();
        }
        kept.push_back(record.clone());
        let _ = self.live.send(record);
    }

    /// The kept records after `after`, and a subscription to the ones that follow: taken
    /// together under the lock, so none falls between them.
    pub fn since(
        &self,
        after: u64,
    ) -> (
        Vec<AuditRecord>,
        tokio::sync::broadcast::Receiver<AuditRecord>,
    ) {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let live = self.live.subscribe();
        let records = kept.iter().filter(|r| r.seq > after).cloned().collect();
        (records, live)
    }

    /// Records kept after `after` (for a follower that fell behind).
    pub fn kept_after(&self, after: u64) -> Vec<AuditRecord> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.iter().filter(|r| r.seq > after).cloned().collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy

/// A Kubernetes `Status` answer, which kubectl prints as `Error from server (<reason>): …`.
pub fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
    });
    let mut response = (code, axum::Json(body)).into_response();
    if code == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"shapeblock-hub kubectl\""),
        );
    }
    response
}

/// Request headers passed on to the cluster: what kubectl's requests need, and nothing that
/// names an identity (the hub's `Authorization` is the token; the agent sets its own).
const FORWARDED_REQUEST_HEADERS: [&str; 6] = [
    "accept",
    "accept-encoding",
    "content-type",
    "user-agent",
    "kubectl-command",
    "kubectl-session",
];

/// Response headers passed back.
const FORWARDED_RESPONSE_HEADERS: [&str; 5] = [
    "content-type",
    "content-encoding",
    "cache-control",
    "warning",
    "audit-id",
];

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap, names: &[&str]) {
    for name in names {
        for value in from.get_all(*name) {
            if let Ok(name) = http::HeaderName::from_bytes(name.as_bytes()) {
                to.append(name, value.clone());
            }
        }
    }
}

/// A response body that holds a long-running request's place until it ends.
struct Held<B> {
    body: B,
    _place: Option<super::gateway::LongRunning>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves `/k8s/clusters/<cluster>/<Kubernetes API path>` for the holder of a kubectl token.
pub async fn proxy(State(state): State<Arc<ApiState>>, request: Request) -> Response {
    let started = Instant::now();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().map(str::to_owned);
    let Some(rest) = path.strip_prefix(PATH_PREFIX) else {
        return status(StatusCode::NOT_FOUND, "NotFound", "no such path");
    };
    let (cluster, api_path) = match rest.split_once('/') {
        Some((cluster, api_path)) => (cluster.to_string(), format!("/{api_path}")),
        None => (rest.to_string(), "/".to_string()),
    };
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::secret::bearer_token)
        .map(str::trim);
    let Some(token) = token else {
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "a ShapeBlock kubectl token is required: get a kubeconfig from ShapeBlock",
        );
    };
    let claims = match state.kubectl_tokens.verify(token, SystemTime::now()) {
        Ok(claims) => claims,
        Err(error) => {
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", &error.to_string());
        }
    };
    let info = request_info(request.method(), &api_path, query.as_deref());
    // From here on, every answer is for a person: audited.
    let answer = |response: Response| {
        state.audit.record(
            &claims.user,
            &cluster,
            info.clone(),
            response.status().as_u16(),
            started.elapsed(),
        );
        response
    };
    if claims.cluster != cluster {
        return answer(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "this kubeconfig's token is for another cluster",
        ));
    }
    if state.registry.get(&cluster).is_none() {
        return answer(status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("cluster {cluster} is not registered with this hub"),
        ));
    }
    if let Some(name) = request
        .headers()
        .keys()
        .find(|k| k.as_str().starts_with("impersonate-"))
    {
        return answer(status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "impersonation ({name}) is not allowed through the ShapeBlock hub: requests run as the kubeconfig's user, with the rights of their Teams"
            ),
        ));
    }
    if request.headers().contains_key(header::UPGRADE) {
        return answer(status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "exec, attach and port-forward are not available through the ShapeBlock hub: the tunnel to the cluster carries API requests, not upgraded connections",
        ));
    }
    let place = if long_running(&info, query.as_deref()) {
        match state
            .gateway
            .long_running(&cluster, &format!("kubectl:{}", claims.user))
        {
            Ok(place) => Some(place),
            Err(limit) => {
                return answer(status(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TooManyRequests",
                    &limit.to_string(),
                ));
            }
        }
    } else {
        None
    };
    let (parts, body) = request.into_parts();
    let body = match http_body_util::Limited::new(body, state.max_body)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return answer(status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                &format!(
                    "the request body is larger than the hub's limit of {} bytes",
                    state.max_body
                ),
            ));
        }
    };
    let target = match &query {
        Some(q) => format!("{api_path}?{q}"),
        None => api_path.clone(),
    };
    let mut upstream = match http::Request::builder()
        .method(parts.method.clone())
        .uri(target)
        .body(kube::client::Body::from(body.to_vec()))
    {
        Ok(upstream) => upstream,
        Err(e) => {
            return answer(status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("invalid request: {e}"),
            ));
        }
    };
    copy_headers(
        &parts.headers,
        upstream.headers_mut(),
        &FORWARDED_REQUEST_HEADERS,
    );
    // A user in no Team can do nothing: said here, rather than as the apiserver's refusal
    // of the agent's impersonation. While the Teams are not known yet, the agent and the
    // apiserver decide.
    let teams = state
        .runtimes
        .as_ref()
        .and_then(|r| r.team_groups(&cluster, &claims.user));
    if teams.as_ref().is_some_and(Vec::is_empty) {
        return answer(status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "user {} is in no Team of cluster {cluster}: a Team grants access to its projects",
                claims.user
            ),
        ));
    }
    let teams = teams.unwrap_or_default();
    let headers = upstream.headers_mut();
    let Ok(user) = HeaderValue::from_str(&claims.user) else {
        return answer(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "the token's user is not a valid header value",
        ));
    };
    headers.insert(ACT_AS_USER_HEADER, user);
    for group in teams {
        let team = group
            .strip_prefix(crate::tunnel::IMPERSONATED_GROUP_PREFIX)
            .unwrap_or(&group);
        if let Ok(team) = HeaderValue::from_str(team) {
            headers.append(ACT_AS_TEAM_HEADER, team);
        }
    }
    let client = state.gateway.caller_client(&cluster);
    match client.send(upstream).await {
        Ok(response) => {
            let (from, body) = response.into_parts();
            let mut out = Response::new(axum::body::Body::new(Held {
                body,
                _place: place,
            }));
            *out.status_mut() = from.status;
            copy_headers(
                &from.headers,
                out.headers_mut(),
                &FORWARDED_RESPONSE_HEADERS,
            );
            answer(out)
        }
        Err(error) => {
            let error = super::api::ApiError::from(error);
            let code = StatusCode::from_u16(error.code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            answer(status(code, &error.reason, &error.message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_user_and_cluster_until_it_expires_or_is_revoked() {
        let tokens = Tokens::open(None).unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let token = tokens.issue("alice", "c1", Duration::from_secs(60), t0);
        assert!(token.expose().starts_with(TOKEN_PREFIX));
        let claims = tokens.verify(token.expose(), t0).unwrap();
        assert_eq!(
            (claims.user.as_str(), claims.cluster.as_str()),
            ("alice", "c1")
        );
        assert_eq!(
            tokens.verify(token.expose(), t0 + Duration::from_secs(60)),
            Err(TokenError::Expired)
        );
        // Tampering with the payload (another user) breaks the signature.
        let (payload, signature) = token.expose()[TOKEN_PREFIX.len()..]
            .split_once('.')
            .unwrap();
        let forged_claims = Claims {
            user: "admin".into(),
            ..claims.clone()
        };
        let forged = format!(
            "{TOKEN_PREFIX}{}.{signature}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged_claims).unwrap())
        );
        assert_ne!(payload, &forged[TOKEN_PREFIX.len()..]);
        assert_eq!(tokens.verify(&forged, t0), Err(TokenError::BadSignature));
        assert_eq!(tokens.verify("sbk_nodot", t0), Err(TokenError::Malformed));
        assert_eq!(tokens.verify("Bearer x", t0), Err(TokenError::Malformed));
        // Another hub's key does not verify.
        let other = Tokens::open(None).unwrap();
        assert_eq!(
            other.verify(token.expose(), t0),
            Err(TokenError::BadSignature)
        );
        // Revoking a user ends their tokens, not the ones issued after, nor others'.
        let bob = tokens.issue("bob", "c1", Duration::from_secs(60), t0);
        tokens
            .revoke("alice", t0 + Duration::from_millis(5))
            .unwrap();
        assert_eq!(tokens.verify(token.expose(), t0), Err(TokenError::Revoked));
        assert!(tokens.verify(bob.expose(), t0).is_ok());
        let again = tokens.issue(
            "alice",
            "c1",
            Duration::from_secs(60),
            t0 + Duration::from_millis(6),
        );
        assert!(tokens.verify(again.expose(), t0).is_ok());
    }

    #[test]
    fn the_key_and_revocations_survive_a_restart_in_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sb-kubectl-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let now = SystemTime::now();
        let tokens = Tokens::open(Some(&dir)).unwrap();
        let alice = tokens.issue("alice", "c1", Duration::from_secs(60), now);
        let bob = tokens.issue("bob", "c1", Duration::from_secs(60), now);
        tokens.revoke("bob", now).unwrap();
        drop(tokens);
        let mode = std::fs::metadata(dir.join(TOKENS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let reopened = Tokens::open(Some(&dir)).unwrap();
        assert!(reopened.verify(alice.expose(), now).is_ok());
        assert_eq!(reopened.verify(bob.expose(), now), Err(TokenError::Revoked));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn requests_are_named_as_the_apiserver_names_them() {
        let info = |method: Method, path: &str, query: Option<&str>| {
            let i = request_info(&method, path, query);
            (
                i.verb,
                i.resource,
                i.namespace.unwrap_or_default(),
                i.name.unwrap_or_default(),
            )
        };
        let s = |v: &str, r: &str, ns: &str, n: &str| {
            (v.to_string(), r.to_string(), ns.to_string(), n.to_string())
        };
        assert_eq!(
            info(Method::GET, "/api/v1/namespaces/shop/pods", None),
            s("list", "pods", "shop", "")
        );
        assert_eq!(
            info(
                Method::GET,
                "/api/v1/namespaces/shop/pods",
                Some("watch=true&resourceVersion=1")
            ),
            s("watch", "pods", "shop", "")
        );
        assert_eq!(
            info(
                Method::GET,
                "/api/v1/namespaces/shop/pods/web-1/log",
                Some("follow=true")
            ),
            s("get", "pods/log", "shop", "web-1")
        );
        assert_eq!(
            info(
                Method::PATCH,
                "/apis/apps.shapeblock.io/v1alpha1/namespaces/shop/apps/web",
                None
            ),
            s("patch", "apps.apps.shapeblock.io", "shop", "web")
        );
        assert_eq!(
            info(Method::DELETE, "/api/v1/namespaces/shop/secrets", None),
            s("deletecollection", "secrets", "shop", "")
        );
        assert_eq!(
            info(Method::GET, "/api/v1/namespaces/shop", None),
            s("get", "namespaces", "", "shop")
        );
        assert_eq!(
            info(
                Method::GET,
                "/apis/rbac.authorization.k8s.io/v1/clusterroles",
                None
            ),
            s("list", "clusterroles.rbac.authorization.k8s.io", "", "")
        );
        assert_eq!(info(Method::GET, "/api", None), s("get", "/api", "", ""));
        assert_eq!(
            info(Method::GET, "/version", None),
            s("get", "/version", "", "")
        );
        assert!(long_running(
            &request_info(
                &Method::GET,
                "/api/v1/namespaces/a/pods/p/log",
                Some("follow=true")
            ),
            Some("follow=true")
        ));
        assert!(!long_running(
            &request_info(&Method::GET, "/api/v1/namespaces/a/pods/p/log", None),
            None
        ));
    }

    #[test]
    fn the_audit_keeps_the_latest_records_in_order() {
        let audit = Audit::new(2);
        for user in ["a", "b", "c"] {
            audit.record(user, "c1", RequestInfo::default(), 200, Duration::ZERO);
        }
        let (kept, _live) = audit.since(0);
        let users: Vec<(u64, &str)> = kept.iter().map(|r| (r.seq, r.user.as_str())).collect();
        assert_eq!(users, [(2, "b"), (3, "c")]);
        assert_eq!(audit.kept_after(2).len(), 1);
    }
}
