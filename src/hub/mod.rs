//! The hub process: the agent gateway, the cluster registry, the HTTP API the ShapeBlock
//! server talks to and each cluster's Kubernetes API for people's kubectl, served on one listener (TLS with rustls, or plain HTTP behind an ingress),
//! and optionally `/metrics` alone on a second, internal one.
//!
//! The hub starts with an embedded default configuration and no external services. It wires
//! the other modules together, so nothing depends on it.
//!
//! Depends on: tunnel, crd, render, observed, controllers, relay, secret, config, telemetry.

pub mod api;
pub mod config;

pub mod gateway;
pub mod kubectl;
pub mod metrics;
pub mod registry;
pub mod runtime;
pub mod upgrades;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::tunnel::tls::{Reload, ServerCertificate};

pub use config::{HubArgs, HubConfig};
pub use gateway::{ConnectionState, Gateway, GatewayConfig, TunnelError};
pub use registry::{ClusterId, ClusterRecord, Registry};

/// Errors that stop the hub from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The listen address could not be bound (in use, or not permitted).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tunnel::TlsError),
    /// The controller shards (threads with their own runtimes) could not be started.
    #[error("starting the controller shards: {0}")]
    Shards(#[source] std::io::Error),
    /// The hub's own cluster (`local_cluster`) could not be registered.
    #[error("registering the local cluster: {0}")]
    LocalCluster(#[source] registry::StoreError),
    /// The kubectl token key could not be read or created in the data directory.
    #[error("the kubectl token key: {0}")]
    KubectlTokens(#[source] registry::StoreError),
}

/// Certificate and key files for serving TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Time a client has to send its request headers (or finish TLS) before it is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound hub. Binding first lets callers (and tests) learn the actual address when port 0
/// was asked for, and use the registry and gateway before serving.
pub struct Hub {
    listener: TcpListener,
    /// `metrics_listen`: `/metrics` without a token, for a Prometheus on the internal network.
    metrics_listener: Option<TcpListener>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// The certificate `tls` presents, re-read when its files change.
    certificate: Option<Arc<ServerCertificate>>,
    pub registry: Arc<Registry>,
    pub gateway: Arc<Gateway>,
    api: Arc<api::ApiState>,
    /// Every status transition relayed (also handed to the outbound relay when configured).
    pub journal: Arc<crate::relay::Journal>,
    max_body: usize,
    /// Stops the per-cluster runtimes when the hub stops.
    runtime_shutdown: CancellationToken,
}

impl Hub {
    /// Binds the listener and builds the hub's state around `registry`.
    pub async fn bind(config: &HubConfig, registry: Arc<Registry>) -> Result<Self, HubError> {
        // Before the listener exists, so the local agent's first handshake finds its token.
        if let Some(local) = &config.local_cluster {
            let record = registry
                .ensure_local(&local.name, &local.token)
                .map_err(HubError::LocalCluster)?;
            tracing::info!(cluster = %record.id, name = %record.name, "local cluster registered");
        }
        let (tls, certificate) = match config.tls.as_ref().map(tls_acceptor).transpose()? {
            Some((acceptor, certificate)) => (Some(acceptor), Some(certificate)),
            None => (None, None),
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| HubError::Bind {
                addr: config.listen,
                source,
            })?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| HubError::Bind { addr, source })?,
            ),
            None => None,
        };
        if let Some(url) = &config.public_url
            && !config.allow_insecure_hub_url
            && let Some(why) = api::clusters::insecure(url)
        {
            tracing::warn!(
                public_url = %url,
                "public_url is {why}; install manifests will be refused until it is the wss:// \
                 address managed clusters reach (or allow_insecure_hub_url is set)"
            );
        }
        let tunnel_metrics = Arc::new(metrics::TunnelMetrics::default());
        let mut prometheus = prometheus_client::registry::Registry::default();
        tunnel_metrics.register(&mut prometheus);
        let gateway = Gateway::new(registry.clone(), tunnel_metrics, config.gateway.clone());
        let runtime_shutdown = CancellationToken::new();
        let (outbound, outbound_events) = match &config.relay {
            Some(relay) => {
                let (tx, rx) = tokio::sync::mpsc::channel(relay.buffer);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let journal = crate::relay::Journal::new(config.events_capacity, outbound);
        journal.stats.register(&mut prometheus);
        if let (Some(relay), Some(events)) = (config.relay.clone(), outbound_events) {
            tokio::spawn(crate::relay::outbound::run(
                relay,
                journal.clone(),
                events,
                runtime_shutdown.clone(),
            ));
        }
        let controller_metrics =
            Arc::new(crate::controllers::metrics::ControllerMetrics::default());
        controller_metrics.register(&mut prometheus);
        let runtimes = config
            .controllers
            .then(|| {
                runtime::Runtimes::start(
                    gateway.clone(),
                    config.runtime.clone(),
                    Some(journal.clone()),
                    controller_metrics,
                    runtime_shutdown.clone(),
                )
            })
            .transpose()
            .map_err(HubError::Shards)?;
        let upgrades = upgrades::Upgrades::new(
            config.agent_upgrades.clone(),
            config.agent_image.clone(),
            gateway.clone(),
            registry.clone(),
        );
        upgrades.register_metrics(&mut prometheus);
        tokio::spawn(upgrades.clone().run(runtime_shutdown.clone()));
        let kubectl_tokens =
            Arc::new(kubectl::Tokens::open(registry.dir()).map_err(HubError::KubectlTokens)?);
        let audit = Arc::new(kubectl::Audit::new(config.kubectl.audit_capacity));
        audit.register_metrics(&mut prometheus);
        let api = Arc::new(api::ApiState {
            kubectl_tokens,
            audit,
            kubectl: config.kubectl.clone(),
            max_body: config.max_request_body_bytes,
            runtimes,
            upgrades,
            registry: registry.clone(),
            gateway: gateway.clone(),
            admin_tokens: config.admin_tokens.clone(),
            viewer_tokens: config.viewer_tokens.clone(),
            public_url: config.public_url.clone(),
            agent_image: config.agent_image.clone(),
            agent_hub_ca: config.agent_hub_ca.clone(),
            allow_insecure_hub_url: config.allow_insecure_hub_url,
            registry_namespace: config.runtime.controllers.registry_source_namespace.clone(),
            registry_secret: config.runtime.controllers.default_registry_secret.clone(),
            tls: tls.is_some(),
            metrics: Arc::new(prometheus),
            journal: journal.clone(),
            serving: Default::default(),
        });
        Ok(Self {
            listener,
            metrics_listener,
            tls,
            certificate,
            registry,
            gateway,
            api,
            journal,
            max_body: config.max_request_body_bytes,
            runtime_shutdown,
        })
    }

    /// The address the hub is listening on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The address of the `metrics_listen` listener, when configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref()?.local_addr().ok()
    }

    /// Serves until `shutdown` is cancelled, then closes every tunnel and drains requests.
    pub async fn serve(mut self, shutdown: CancellationToken) {
        if let Some(certificate) = self.certificate.take() {
            tokio::spawn(reload_certificate(certificate, shutdown.clone()));
        }
        if let Some(listener) = self.metrics_listener.take() {
            tracing::info!(addr = ?listener.local_addr().ok(), "metrics listening");
            let router = api::metrics_router(self.api.clone());
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let served = axum::serve(listener, router)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(err) = served {
                    tracing::warn!(error = %err, "the metrics listener stopped");
                }
            });
        }
        let router = api::router(self.api.clone(), self.max_body).merge(self.gateway.routes());
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tracing::info!(addr = ?self.listener.local_addr().ok(), tls = self.tls.is_some(), "hub listening");
        self.api
            .serving
            .store(true, std::sync::atomic::Ordering::SeqCst);
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            let _ = tcp.set_nodelay(true);
            let service = router.clone().map_request(
                move |mut request: axum::extract::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(remote));
                    request
                },
            );
            let service = hyper_util::service::TowerToHyperService::new(service);
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let tls = self.tls.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let result = match tls {
                    Some(acceptor) => {
                        match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => {
                                let conn = builder
                                    .serve_connection_with_upgrades(TokioIo::new(stream), service);
                                watcher.watch(conn.into_owned()).await
                            }
                            Ok(Err(err)) => {
                                tracing::debug!(%remote, error = %err, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        }
                    }
                    None => {
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
                        watcher.watch(conn.into_owned()).await
                    }
                };
                if let Err(err) = result {
                    tracing::debug!(%remote, error = %err, "connection ended with an error");
                }
            });
        }
        self.runtime_shutdown.cancel();
        self.gateway.shutdown();
        if let Err(err) = tokio::task::spawn_blocking({
            let registry = self.registry.clone();
            move || registry.flush()
        })
        .await
        .unwrap_or(Ok(()))
        {
            tracing::warn!(error = %err, "writing connection details at shutdown failed");
        }
        if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after 10s; closing them");
        }
        tracing::info!("hub stopped");
    }
}

fn tls_acceptor(
    files: &TlsFiles,
) -> Result<(tokio_rustls::TlsAcceptor, Arc<ServerCertificate>), HubError> {
    let certificate = ServerCertificate::load(&files.cert_file, &files.key_file)?;
    let config = crate::tunnel::tls::server_config(certificate.clone())?;
    Ok((tokio_rustls::TlsAcceptor::from(config), certificate))
}

/// How often the certificate files are compared with the pair being served. cert-manager
/// renews weeks before expiry, and a check reads two small files.
const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Serves renewed certificates from the next handshake on; open connections (every agent's
/// tunnel) keep the session they have.
async fn reload_certificate(certificate: Arc<ServerCertificate>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(TLS_RELOAD_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let check = certificate.clone();
        match tokio::task::spawn_blocking(move || check.reload()).await {
            Ok(Reload::Unchanged) | Err(_) => {}
            Ok(Reload::Reloaded) => {
                tracing::info!("TLS certificate reloaded: new handshakes present it")
            }
            Ok(Reload::Refused(err)) => tracing::warn!(
                error = %err,
                "the TLS certificate files changed but do not make a valid pair; still serving the previous certificate"
            ),
        }
    }
}
