//! The agent gateway: the websocket endpoint agents dial, one live tunnel per cluster, and a
//! `kube::Client` per cluster that sends its requests through whichever tunnel is current.
//!
//! A handshake is authenticated (bearer token against the stored hashes) and rate limited
//! (globally and per source address) before the websocket upgrade. After the upgrade the hub
//! is the HTTP/2 client: the tunnel counts as connected only once an HTTP/2 handshake and a
//! `GET /version` through it succeed within the handshake timeout. A newer tunnel for the
//! same cluster replaces the older. Liveness is HTTP/2 PING with a deadline (hyper's
//! keep-alive) plus a periodic ping request to the agent, which also measures round-trip time.
//!
//! Two kinds of traffic share a tunnel, and API callers can never starve the controllers:
//! [`Gateway::client`] is the controllers' (and the hub's own), [`Gateway::caller_client`]
//! the API callers'. Callers have their own request budget per cluster, and may hold at most
//! [`CALLER_STREAMS`] of the tunnel's [`tunnel::H2_MAX_STREAMS`] streams at once (a stream is
//! held until its response body is dropped). Long-running requests (log streams) are also
//! counted per cluster and per API token ([`Gateway::long_running`]).

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dashmap::DashMap;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::metrics::{ClusterLabel, TunnelMetrics, VersionLabel};
use super::registry::{ClusterId, Registry};
use crate::secret::Secret;
use crate::tunnel::{self, ByteCounters, CloseReason, CloseSignal, WsIo};

/// Streams of one tunnel that API callers may hold at once: half, so the controllers always
/// have the other half.
pub const CALLER_STREAMS: usize = tunnel::H2_MAX_STREAMS as usize / 2;

/// Gateway settings: the tunnel keys at the top level of the hub's configuration file
/// (flattened into it by [`crate::hub::config`], which rejects unknown keys and validates).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default)]
pub struct GatewayConfig {
    /// Upgrade, HTTP/2 handshake and first request through the tunnel must finish within this.
    #[serde(
        rename = "handshake_timeout_seconds",
        deserialize_with = "crate::config::seconds"
    )]
    pub handshake_timeout: Duration,
    /// Handshakes accepted per second across all agents (burst: 2 seconds' worth).
    pub handshakes_per_second: u32,
    /// Handshakes accepted per second from one source address (burst: 5 seconds' worth).
    pub handshakes_per_second_per_ip: u32,
    /// How often the hub pings each agent to measure round-trip time.
    #[serde(
        rename = "ping_interval_seconds",
        deserialize_with = "crate::config::seconds"
    )]
    pub ping_interval: Duration,
    /// A ping unanswered for this long ends the tunnel.
    #[serde(
        rename = "ping_timeout_seconds",
        deserialize_with = "crate::config::seconds"
    )]
    pub ping_timeout: Duration,
    /// Kubernetes API requests per second the hub sends to one cluster (burst: twice that).
    #[serde(rename = "api_qps_per_cluster")]
    pub api_qps: u32,
    /// Long-running API requests (log streams) open at once through one cluster's tunnel.
    pub long_running_requests_per_cluster: usize,
    /// Long-running API requests open at once with one API token, over all clusters.
    pub long_running_requests_per_token: usize,
    /// Rate-limit handshakes by the rightmost `X-Forwarded-For` address (the address the
    /// nearest proxy saw) instead of the socket's peer. Only for a hub reachable solely
    /// through such a proxy: behind an ingress every agent arrives from the proxy's address.
    pub trust_forwarded_for: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            handshakes_per_second: 200,
            handshakes_per_second_per_ip: 20,
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(10),
            api_qps: 50,
            long_running_requests_per_cluster: 32,
            long_running_requests_per_token: 16,
            trust_forwarded_for: false,
        }
    }
}

/// Connection state of one cluster, for the API and metrics.
#[derive(Clone, Debug, Default, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionState {
    /// Whether the agent has a live tunnel to this hub.
    pub connected: bool,
    /// When the current tunnel was established (Unix time, seconds).
    #[serde(skip_serializing_if = "Option::is_none", with = "unix_time")]
    #[schema(value_type = Option<f64>)]
    pub connected_since: Option<SystemTime>,
    /// When the hub last heard from the agent (handshake or answered ping; Unix time, seconds).
    #[serde(skip_serializing_if = "Option::is_none", with = "unix_time")]
    #[schema(value_type = Option<f64>)]
    pub last_seen: Option<SystemTime>,
    /// Round-trip time of the last ping, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// The agent's version, from its handshake.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The managed cluster's Kubernetes version, as the agent reported it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes_version: Option<String>,
    /// The address the agent's tunnel came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_addr: Option<String>,
    /// Tunnels established since the hub started.
    pub connects: u64,
}

mod unix_time {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let secs = t
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64());
        match secs {
            Some(secs) => s.serialize_f64(secs),
            None => s.serialize_none(),
        }
    }
}

/// Why a request through a tunnel failed before reaching the agent.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cluster {0} is not connected: its agent has no live tunnel to the hub")]
    NotConnected(ClusterId),
    #[error("the tunnel to cluster {cluster} failed: {source}")]
    Broken {
        cluster: ClusterId,
        #[source]
        source: hyper::Error,
    },
    #[error("bad request URI: {0}")]
    Uri(#[from] http::Error),
    #[error(
        "API requests already hold {CALLER_STREAMS} streams of cluster {0}'s tunnel (the rest \
         are the controllers'); retry when some have finished"
    )]
    CallerStreamsExhausted(ClusterId),
}

/// A long-running request refused because a limit is reached.
#[derive(Debug, thiserror::Error)]
pub enum LongRunningLimit {
    #[error(
        "cluster {cluster} already serves {limit} long-running API requests (log streams); \
         close one or retry later"
    )]
    Cluster { cluster: ClusterId, limit: usize },
    #[error(
        "this API token already holds {limit} long-running requests (log streams); close one \
         or retry later"
    )]
    Token { limit: usize },
}

/// A long-running API request's place under its cluster's and its token's limits, given
/// back when dropped.
#[must_use = "the request counts against the limits only while this is held"]
pub struct LongRunning {
    _cluster: tokio::sync::OwnedSemaphorePermit,
    _token: tokio::sync::OwnedSemaphorePermit,
}

/// A response body from a tunnel. An API caller's holds one of the caller streams of its
/// tunnel until it is dropped, so a stream the caller abandoned is given back with it.
pub struct TunnelBody {
    inner: Incoming,
    _stream: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Whose requests a [`Gateway`] client carries: they have separate budgets.
#[derive(Clone, Copy)]
enum Traffic {
    Controllers,
    Callers,
}

impl http_body::Body for TunnelBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Clone)]
struct Tunnel {
    sender: SendRequest<kube::client::Body>,
    generation: u64,
    /// Ends the session task.
    closed: CancellationToken,
    /// Ends the byte stream, which hyper's connection task owns, and with it every stream
    /// on the tunnel and the socket; the agent learns the reason from the close frame.
    stream: Arc<CloseSignal>,
}

impl Tunnel {
    fn close(&self, reason: CloseReason) {
        self.stream.close(reason);
        self.closed.cancel();
    }
}

/// Everything the hub keeps for one cluster across tunnels.
struct ClusterSlot {
    id: ClusterId,
    current: RwLock<Option<Tunnel>>,
    state: Mutex<ConnectionState>,
    generation: AtomicU64,
    /// The tunnel streams API callers may still take ([`CALLER_STREAMS`] in all).
    caller_streams: Arc<tokio::sync::Semaphore>,
    /// Long-running API requests this cluster may still take.
    long_running: Arc<tokio::sync::Semaphore>,
}

impl ClusterSlot {
    fn current(&self) -> Option<Tunnel> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ConnectionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `tunnel` current and closes the one it replaces, if `still_valid` holds. It is
    /// checked under the lock a revocation's [`Gateway::disconnect`] also takes, after the
    /// registry has changed: a handshake authenticated just before a token rotation or a
    /// cluster deletion either goes live before the revocation (which then closes it) or is
    /// refused here, never live after it.
    fn publish(&self, tunnel: Tunnel, still_valid: impl FnOnce() -> bool) -> bool {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if !still_valid() {
            return false;
        }
        if let Some(old) = current.replace(tunnel) {
            old.close(CloseReason::Replaced);
        }
        true
    }

    /// Closes the current tunnel, if any.
    fn close_current(&self, reason: CloseReason) {
        let current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if let Some(tunnel) = current.as_ref() {
            tunnel.close(reason);
        }
    }

    /// Clears the current tunnel if it is still `generation`.
    fn retire(&self, generation: u64) -> bool {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|t| t.generation == generation) {
            *current = None;
            return true;
        }
        false
    }

    async fn send(
        &self,
        request: http::Request<kube::client::Body>,
    ) -> Result<http::Response<Incoming>, TunnelError> {
        let tunnel = self
            .current()
            .ok_or_else(|| TunnelError::NotConnected(self.id.clone()))?;
        send_via(&self.id, tunnel, request).await
    }
}

/// Waits until `limiter` lets one more request go to cluster `id`: a per-cluster request rate,
/// so one busy cluster cannot flood its apiserver or the hub. Only a request that must wait
/// is timed (and costs a clock read).
async fn pace(
    limiter: &DefaultKeyedRateLimiter<ClusterId>,
    id: &ClusterId,
    metrics: &TunnelMetrics,
) {
    if limiter.check_key(id).is_err() {
        let waiting = Instant::now();
        limiter.until_key_ready(id).await;
        metrics
            .api_limiter_wait
            .0
            .observe(waiting.elapsed().as_secs_f64());
    }
}

/// Sends one request through `tunnel`.
async fn send_via(
    id: &str,
    tunnel: Tunnel,
    mut request: http::Request<kube::client::Body>,
) -> Result<http::Response<Incoming>, TunnelError> {
    // HTTP/2 needs a scheme and authority; the agent ignores them and uses its apiserver.
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *request.uri_mut() = http::Uri::builder()
        .scheme("http")
        .authority(format!("{id}.tunnel.shapeblock"))
        .path_and_query(path)
        .build()?;
    let broken = |source| TunnelError::Broken {
        cluster: id.to_string(),
        source,
    };
    let mut sender = tunnel.sender;
    sender.ready().await.map_err(broken)?;
    sender.send_request(request).await.map_err(broken)
}

/// The agent gateway.
pub struct Gateway {
    registry: Arc<Registry>,
    slots: DashMap<ClusterId, Arc<ClusterSlot>>,
    global_limiter: DefaultDirectRateLimiter,
    ip_limiter: DefaultKeyedRateLimiter<IpAddr>,
    api_limiter: Arc<DefaultKeyedRateLimiter<ClusterId>>,
    /// API callers' own request budget per cluster, apart from the controllers'.
    caller_limiter: Arc<DefaultKeyedRateLimiter<ClusterId>>,
    /// Long-running requests each API token (by hash) may still take.
    long_running_per_token: DashMap<String, Arc<tokio::sync::Semaphore>>,
    metrics: Arc<TunnelMetrics>,
    config: GatewayConfig,
    shutdown: CancellationToken,
    connects: tokio::sync::broadcast::Sender<ClusterId>,
}

impl Gateway {
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<TunnelMetrics>,
        config: GatewayConfig,
    ) -> Arc<Self> {
        let per_sec = |n: u32| NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN);
        let global = Quota::per_second(per_sec(config.handshakes_per_second))
            .allow_burst(per_sec(config.handshakes_per_second.saturating_mul(2)));
        let per_ip = Quota::per_second(per_sec(config.handshakes_per_second_per_ip)).allow_burst(
            per_sec(config.handshakes_per_second_per_ip.saturating_mul(5)),
        );
        let api = Quota::per_second(per_sec(config.api_qps))
            .allow_burst(per_sec(config.api_qps.saturating_mul(2)));
        Arc::new(Self {
            registry,
            slots: DashMap::new(),
            global_limiter: RateLimiter::direct(global),
            ip_limiter: RateLimiter::keyed(per_ip),
            api_limiter: Arc::new(RateLimiter::keyed(api)),
            caller_limiter: Arc::new(RateLimiter::keyed(api)),
            long_running_per_token: DashMap::new(),
            metrics,
            config,
            shutdown: CancellationToken::new(),
            connects: tokio::sync::broadcast::channel(1024).0,
        })
    }

    /// Routes served by the gateway.
    pub fn routes(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route(tunnel::CONNECT_PATH, get(connect))
            .with_state(self.clone())
    }

    fn slot(&self, id: &str) -> Arc<ClusterSlot> {
        self.slots
            .entry(id.to_string())
            .or_insert_with(|| {
                Arc::new(ClusterSlot {
                    id: id.to_string(),
                    current: RwLock::new(None),
                    state: Mutex::new(ConnectionState::default()),
                    generation: AtomicU64::new(0),
                    caller_streams: Arc::new(tokio::sync::Semaphore::new(CALLER_STREAMS)),
                    long_running: Arc::new(tokio::sync::Semaphore::new(
                        self.config.long_running_requests_per_cluster,
                    )),
                })
            })
            .clone()
    }

    /// A client for a cluster's apiserver through its tunnel. It keeps working across agent
    /// reconnects: each request uses the tunnel current at that moment, and fails fast with
    /// [`TunnelError::NotConnected`] while there is none (watchers back off and resume).
    /// Must be called within a Tokio runtime.
    pub fn client(&self, id: &str) -> kube::Client {
        self.client_for(id, Traffic::Controllers)
    }

    /// A client for API callers' requests to a cluster: like [`Gateway::client`], with the
    /// callers' own request budget, and at most [`CALLER_STREAMS`] streams held at once
    /// (beyond that a request fails at once with [`TunnelError::CallerStreamsExhausted`]).
    pub fn caller_client(&self, id: &str) -> kube::Client {
        self.client_for(id, Traffic::Callers)
    }

    fn client_for(&self, id: &str, traffic: Traffic) -> kube::Client {
        let slot = self.slot(id);
        let limiter = match traffic {
            Traffic::Controllers => self.api_limiter.clone(),
            Traffic::Callers => self.caller_limiter.clone(),
        };
        let metrics = self.metrics.clone();
        let service = tower::service_fn(move |request| {
            let slot = slot.clone();
            let limiter = limiter.clone();
            let metrics = metrics.clone();
            async move {
                let stream = match traffic {
                    Traffic::Controllers => None,
                    Traffic::Callers => Some(
                        slot.caller_streams
                            .clone()
                            .try_acquire_owned()
                            .map_err(|_| TunnelError::CallerStreamsExhausted(slot.id.clone()))?,
                    ),
                };
                pace(&limiter, &slot.id, &metrics).await;
                let response = slot.send(request).await?;
                Ok::<_, TunnelError>(response.map(|inner| TunnelBody {
                    inner,
                    _stream: stream,
                }))
            }
        });
        kube::Client::new(service, "default")
    }

    /// A place for one long-running API request (a log stream) to cluster `id` by the API
    /// token whose hash is `caller`, if both have one left; held while the request runs.
    pub fn long_running(&self, id: &str, caller: &str) -> Result<LongRunning, LongRunningLimit> {
        let slot = self.slot(id);
        let cluster = slot.long_running.clone().try_acquire_owned().map_err(|_| {
            LongRunningLimit::Cluster {
                cluster: id.to_string(),
                limit: self.config.long_running_requests_per_cluster,
            }
        })?;
        let per_token = self.config.long_running_requests_per_token;
        let token = self
            .long_running_per_token
            .entry(caller.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(per_token)))
            .clone()
            .try_acquire_owned()
            .map_err(|_| LongRunningLimit::Token { limit: per_token })?;
        Ok(LongRunning {
            _cluster: cluster,
            _token: token,
        })
    }

    /// Connection state of a cluster (all defaults if it never connected).
    pub fn status(&self, id: &str) -> ConnectionState {
        self.slots
            .get(id)
            .map(|s| s.state().clone())
            .unwrap_or_default()
    }

    /// Closes the cluster's live tunnel, if any, telling its agent `reason` (after its token
    /// was rotated). The socket is closed, not only the hub's use of it: nothing more moves
    /// on it, and every request in flight through it fails.
    pub fn disconnect(&self, id: &str, reason: CloseReason) {
        let slot = self.slots.get(id).map(|slot| slot.clone());
        if let Some(slot) = slot {
            slot.close_current(reason);
        }
    }

    /// Forgets a deleted cluster: closes its tunnel and drops its state and metrics.
    pub fn forget(&self, id: &str) {
        self.disconnect(id, CloseReason::ClusterDeleted);
        if let Some(versions) = self
            .slots
            .remove(id)
            .and_then(|(_, slot)| version_label(id, &slot.state()))
        {
            self.metrics.info.remove(&versions);
        }
        let label = ClusterLabel {
            cluster: id.to_string(),
        };
        self.metrics.connected.remove(&label);
        self.metrics.connected_since.remove(&label);
        self.metrics.rtt_seconds.remove(&label);
        self.metrics.last_seen.remove(&label);
        self.metrics.connects.remove(&label);
        self.metrics.disconnects.remove(&label);
        self.metrics.sent_bytes.remove(&label);
        self.metrics.received_bytes.remove(&label);
    }

    /// Closes every tunnel; used when the hub stops.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Notifies each time a cluster's tunnel is established.
    pub fn subscribe_connects(&self) -> tokio::sync::broadcast::Receiver<ClusterId> {
        self.connects.subscribe()
    }

    /// Clusters with a live tunnel.
    pub fn connected_clusters(&self) -> Vec<ClusterId> {
        self.slots
            .iter()
            .filter(|s| s.current().is_some())
            .map(|s| s.id.clone())
            .collect()
    }

    /// Number of clusters with a live tunnel.
    pub fn connected_count(&self) -> usize {
        self.slots.iter().filter(|s| s.current().is_some()).count()
    }

    /// Runs one tunnel from the HTTP/2 handshake to its end.
    async fn run_session(
        self: Arc<Self>,
        id: ClusterId,
        ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
        token: Secret,
        agent_version: Option<String>,
        remote: IpAddr,
    ) {
        let label = ClusterLabel {
            cluster: id.clone(),
        };
        let counters = ByteCounters {
            sent: self.metrics.sent_bytes.get_or_create(&label).clone(),
            received: self.metrics.received_bytes.get_or_create(&label).clone(),
        };
        // `forget` drops a deleted cluster's series after the registry dropped the cluster; a
        // cluster deleted since this handshake was authenticated must not get them back (its
        // tunnel is refused before it goes live, below).
        if self.registry.get(&id).is_none() {
            self.metrics.sent_bytes.remove(&label);
            self.metrics.received_bytes.remove(&label);
        }
        let stream = Arc::new(CloseSignal::default());
        let io = WsIo::counted(ws, counters).with_close(stream.clone());
        let handshake = tunnel::http2::client().handshake(TokioIo::new(io));
        let (sender, connection) =
            match tokio::time::timeout(self.config.handshake_timeout, handshake).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "HTTP/2 handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!("HTTP/2 handshake timed out");
                    self.metrics.reject("handshake_timeout");
                    return;
                }
            };
        let mut connection = tokio::spawn(connection);
        let slot = self.slot(&id);
        let generation = slot.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let closed = self.shutdown.child_token();
        let probe = Tunnel {
            sender,
            generation,
            closed: closed.clone(),
            stream,
        };

        // The tunnel is only published once a request through it reaches the apiserver.
        let version = tokio::time::timeout(
            self.config.handshake_timeout,
            kubernetes_version(&slot.id, &probe),
        )
        .await;
        let kubernetes_version = match version {
            Ok(Ok(v)) => v,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "tunnel opened but the apiserver did not answer");
                probe.close(CloseReason::Unhealthy);
                connection.abort();
                return;
            }
            Err(_) => {
                tracing::warn!("no answer through the new tunnel within the handshake timeout");
                self.metrics.reject("handshake_timeout");
                probe.close(CloseReason::Unhealthy);
                connection.abort();
                return;
            }
        };
        // The token was checked at the upgrade; it may have been rotated or the cluster
        // deleted while the tunnel was being set up.
        let registry = &self.registry;
        let still_valid = || registry.authenticate(token.expose()).as_ref() == Some(&id);
        if !slot.publish(probe.clone(), still_valid) {
            tracing::info!("token revoked while the tunnel was being set up; closing it");
            self.metrics.reject("unauthorized");
            probe.close(if self.registry.get(&id).is_none() {
                CloseReason::ClusterDeleted
            } else {
                CloseReason::TokenRevoked
            });
            connection.abort();
            return;
        }
        drop(token);
        let now = SystemTime::now();
        let (agent_version, previous_versions, versions) = {
            let mut state = slot.state();
            let previous = version_label(&id, &state);
            state.connected = true;
            state.connected_since = Some(now);
            state.last_seen = Some(now);
            state.agent_version = agent_version;
            state.kubernetes_version = Some(kubernetes_version.clone());
            state.remote_addr = Some(remote.to_string());
            state.rtt_ms = None;
            state.connects += 1;
            (
                state.agent_version.clone(),
                previous,
                version_label(&id, &state),
            )
        };
        self.registry
            .note_connected(&id, agent_version, Some(kubernetes_version.clone()));
        self.metrics.connected.get_or_create(&label).set(1);
        self.metrics
            .connected_since
            .get_or_create(&label)
            .set(unix_seconds(now));
        self.metrics.connects.get_or_create(&label).inc();
        self.metrics
            .last_seen
            .get_or_create(&label)
            .set(unix_seconds(now));
        if let Some(previous) = previous_versions {
            self.metrics.info.remove(&previous);
        }
        if let Some(versions) = versions {
            self.metrics.info.get_or_create(&versions).set(1);
        }
        tracing::info!(kubernetes = %kubernetes_version, "tunnel connected");
        let _ = self.connects.send(id.clone());

        let mut ticker = tokio::time::interval(self.config.ping_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reason = loop {
            tokio::select! {
                _ = closed.cancelled() => break probe.stream.requested().map_or(
                    "closed by the hub: the hub is stopping",
                    |reason| reason.message(),
                ),
                result = &mut connection => break match result {
                    Ok(Ok(())) => "agent closed the tunnel",
                    _ => "tunnel connection failed",
                },
                _ = ticker.tick() => {
                    match tokio::time::timeout(self.config.ping_timeout, ping(&slot.id, &probe)).await {
                        // A ping answered after the tunnel was closed (a deleted cluster's
                        // metrics are already gone) must not bring its series back.
                        Ok(Ok(_)) if closed.is_cancelled() => {}
                        Ok(Ok(rtt)) => {
                            let now = SystemTime::now();
                            let mut state = slot.state();
                            state.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
                            state.last_seen = Some(now);
                            self.metrics.rtt_seconds.get_or_create(&label).set(rtt.as_secs_f64());
                            self.metrics.last_seen.get_or_create(&label).set(unix_seconds(now));
                        }
                        Ok(Err(err)) => {
                            tracing::warn!(error = %err, "ping failed");
                            break "ping failed";
                        }
                        Err(_) => break "ping timed out",
                    }
                }
            }
        };
        // Whatever ended the session, the byte stream ends with it: a no-op when a reason
        // was already given or the agent closed; otherwise the hub is stopping or the pings
        // went unanswered.
        probe.close(if self.shutdown.is_cancelled() {
            CloseReason::HubStopping
        } else {
            CloseReason::Unhealthy
        });
        connection.abort();
        let retired = slot.retire(generation);
        if retired {
            slot.state().connected = false;
        }
        // A deleted cluster's slot and metrics are gone (`forget`); do not bring them back.
        let forgotten = !self
            .slots
            .get(&id)
            .is_some_and(|current| Arc::ptr_eq(&current, &slot));
        if !forgotten {
            if retired {
                self.metrics.connected.get_or_create(&label).set(0);
            }
            self.metrics.disconnects.get_or_create(&label).inc();
        }
        tracing::info!(reason, "tunnel ended");
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The `shapeblock_tunnel_info` series of a cluster's state, once it has connected.
fn version_label(id: &str, state: &ConnectionState) -> Option<VersionLabel> {
    Some(VersionLabel {
        cluster: id.to_string(),
        agent_version: state
            .agent_version
            .clone()
            .unwrap_or_else(|| "unknown".into()),
        kubernetes_version: state.kubernetes_version.clone()?,
    })
}

async fn send_probe(
    id: &str,
    tunnel: &Tunnel,
    path: &str,
) -> Result<http::Response<Incoming>, TunnelError> {
    let request = http::Request::get(path).body(kube::client::Body::from(Vec::new()))?;
    send_via(id, tunnel.clone(), request).await
}

/// Why a request the hub itself sends through a tunnel (version probe, ping) failed.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error("reading the answer: {0}")]
    Body(String),
    #[error("GET /version: HTTP {status}: {body}")]
    Version { status: StatusCode, body: String },
    #[error("GET /version: {0}")]
    VersionJson(#[source] serde_json::Error),
    #[error("agent answered ping with HTTP {0}")]
    Ping(StatusCode),
}

/// The most the hub reads of an agent's `/version` answer (a real one is under 1 KiB): an
/// agent, or whatever answers in its place, cannot make the hub buffer more.
const VERSION_BODY_LIMIT: usize = 64 * 1024;

async fn kubernetes_version(id: &str, tunnel: &Tunnel) -> Result<String, ProbeError> {
    let response = send_probe(id, tunnel, "/version").await?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), VERSION_BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| ProbeError::Body(e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        return Err(ProbeError::Version {
            status,
            body: text.chars().take(256).collect(),
        });
    }
    let info: serde_json::Value = serde_json::from_slice(&body).map_err(ProbeError::VersionJson)?;
    Ok(reported_version(info["gitVersion"].as_str()))
}

/// A version as the hub stores, lists and exports it: at most 64 characters of those a
/// version is made of, else `unknown` (pure). The agent reports it, so it is input.
pub fn reported_version(reported: Option<&str>) -> String {
    match reported {
        Some(v)
            if !v.is_empty()
                && v.len() <= 64
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._+-~".contains(c)) =>
        {
            v.to_string()
        }
        _ => "unknown".to_string(),
    }
}

async fn ping(id: &str, tunnel: &Tunnel) -> Result<Duration, ProbeError> {
    let start = Instant::now();
    let response = send_probe(id, tunnel, tunnel::AGENT_PING_PATH).await?;
    if response.status() != StatusCode::NO_CONTENT {
        return Err(ProbeError::Ping(response.status()));
    }
    Ok(start.elapsed())
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}

/// The rightmost address of `X-Forwarded-For`: the one the nearest proxy saw. Addresses to
/// its left come from the client and could be anything.
fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let last = headers.get_all("x-forwarded-for").iter().next_back()?;
    last.to_str().ok()?.rsplit(',').next()?.trim().parse().ok()
}

fn refuse(status: StatusCode, message: &'static str) -> Response {
    (status, message).into_response()
}

/// `GET /agent/v1/connect`: authenticate, then upgrade to a websocket and run the tunnel.
async fn connect(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let remote = if gateway.config.trust_forwarded_for {
        forwarded_for(request.headers()).unwrap_or(remote.ip())
    } else {
        remote.ip()
    };
    if gateway.ip_limiter.check_key(&remote).is_err() || gateway.global_limiter.check().is_err() {
        gateway.metrics.reject("rate_limited");
        let mut response = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "too many tunnel handshakes; retry later",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return response;
    }
    let headers = request.headers();
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let is_websocket = header_has_token(headers, header::UPGRADE, "websocket")
        && header_has_token(headers, header::CONNECTION, "upgrade")
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13");
    let Some(key) = key.filter(|_| is_websocket) else {
        gateway.metrics.reject("not_websocket");
        return refuse(
            StatusCode::BAD_REQUEST,
            "expected a websocket upgrade (version 13)",
        );
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::secret::bearer_token)
        .map(str::trim);
    let Some((cluster, token)) =
        token.and_then(|t| Some((gateway.registry.authenticate(t)?, Secret::new(t))))
    else {
        gateway.metrics.reject("unauthorized");
        tracing::info!(%remote, "tunnel handshake with a missing, wrong, unknown or revoked token");
        return refuse(StatusCode::UNAUTHORIZED, "invalid cluster token");
    };
    let agent_version = headers
        .get(tunnel::AGENT_VERSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| reported_version(Some(v)));
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(request);
    let timeout = gateway.config.handshake_timeout;
    tokio::spawn(async move {
        let upgraded = match tokio::time::timeout(timeout, on_upgrade).await {
            Ok(Ok(upgraded)) => upgraded,
            Ok(Err(err)) => {
                tracing::warn!(cluster = %cluster, error = %err, "websocket upgrade failed");
                return;
            }
            Err(_) => {
                gateway.metrics.reject("handshake_timeout");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            Some(tunnel::ws_config()),
        )
        .await;
        let span = tracing::info_span!("tunnel", cluster = %cluster, %remote);
        gateway
            .run_session(cluster, ws, token, agent_version, remote)
            .instrument(span)
            .await;
    });
    crate::tunnel::switching_protocols(&accept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    #[test]
    fn the_address_the_nearest_proxy_saw_is_the_rightmost() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // A client may send any X-Forwarded-For; the proxy appends the address it saw.
        assert_eq!(
            forwarded_for(&headers(&["6.6.6.6, 203.0.113.7"])),
            ip("203.0.113.7")
        );
        assert_eq!(
            forwarded_for(&headers(&["6.6.6.6", "2001:db8::1"])),
            ip("2001:db8::1")
        );
        assert_eq!(
            forwarded_for(&headers(&["198.51.100.2 "])),
            ip("198.51.100.2")
        );
        assert_eq!(forwarded_for(&headers(&[])), None);
        assert_eq!(forwarded_for(&headers(&["1.2.3.4, not-an-ip"])), None);
    }
}
