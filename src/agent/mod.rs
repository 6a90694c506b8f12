//! The tunnel agent that runs in each managed cluster (DESIGN.md, "The tunnel").
//!
//! It dials the hub's websocket endpoint, then serves HTTP/2 on that byte stream: every
//! request the hub sends is checked against [`proxy::Policy`] and forwarded to this cluster's
//! own kube-apiserver with the agent's own credentials; responses (watches included) stream
//! back with HTTP/2 flow control. It can reach nothing but its apiserver. It reconnects with
//! exponential backoff and full jitter, and runs on a single-threaded runtime.
//!
//! Depends on [`crate::tunnel`] for the wire and on nothing of the hub.
//!
//! Depends on: tunnel, config, secret, telemetry.

pub mod config;
pub mod proxy;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use http::{HeaderMap, HeaderValue};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::tunnel::{self, Backoff, DialError, DialOptions, Trust, WsIo};
pub use config::{AgentArgs, AgentConfig, ConfigError};
use proxy::{Policy, Proxy};

/// How long dialing, TLS and the websocket handshake may take together.
const DIAL_TIMEOUT: Duration = Duration::from_secs(15);
/// A tunnel that lived this long resets the reconnect backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

/// Why the agent cannot run, or why one tunnel attempt ended.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot load Kubernetes credentials: {0}")]
    Kube(String),
    #[error("TLS set-up: {0}")]
    Tls(#[from] tunnel::TlsError),
    #[error("cannot reach the hub at {url}: {source}")]
    Dial {
        url: String,
        #[source]
        source: DialError,
    },
    #[error("the hub refused the tunnel: HTTP {status}{hint}")]
    Refused { status: u16, hint: &'static str },
    #[error("tunnel ended: {0}")]
    Session(String),
}

/// Entry point of the `shapeblock-agent` binary.
pub fn main() -> std::process::ExitCode {
    let args = AgentArgs::parse();
    let config = match AgentConfig::load(args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("shapeblock-agent: {err}");
            return std::process::ExitCode::from(2);
        }
    };
    crate::telemetry::init(config.log_format);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("shapeblock-agent: cannot start runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let result = runtime.block_on(async {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            crate::telemetry::shutdown_signal().await;
            stop.cancel();
        });
        run(config, shutdown).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "agent stopped");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Keeps a tunnel to the hub open until `shutdown`, reconnecting after every failure.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| AgentError::Kube(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| AgentError::Kube(e.to_string()))?
        }
        None => kube::Config::incluster().map_err(|e| AgentError::Kube(e.to_string()))?,
    };
    let client =
        kube::Client::try_from(kube_config).map_err(|e| AgentError::Kube(e.to_string()))?;
    run_with_client(config, client, shutdown).await
}

/// [`run`] with the client requests are forwarded to already built: the binary passes its
/// apiserver's; the load test (`loadtest/`) passes one backed by a simulated cluster.
pub async fn run_with_client(
    config: AgentConfig,
    client: kube::Client,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let refused = config::REFUSED_SUBRESOURCES
        .iter()
        .filter(|s| !config.allowed_subresources.iter().any(|a| a == *s))
        .map(|s| s.to_string())
        .collect();
    let proxy = Arc::new(Proxy::new(
        client,
        Policy {
            refused_subresources: refused,
            max_request_body_bytes: config.max_request_body_bytes,
        },
    ));
    let trust = match &config.hub_ca_file {
        Some(path) => Trust::Pinned(path),
        None => Trust::WebPki,
    };
    let tls = tokio_rustls::TlsConnector::from(tunnel::tls::client_config(trust)?);
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    loop {
        let started = Instant::now();
        match session(&config, &tls, proxy.clone(), &shutdown).await {
            Ok(()) => tracing::info!("tunnel closed"),
            Err(err) => tracing::warn!(error = %err, "tunnel failed"),
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        if started.elapsed() >= HEALTHY_SESSION {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Dials the hub and serves the tunnel until it ends.
async fn session(
    config: &AgentConfig,
    tls: &tokio_rustls::TlsConnector,
    proxy: Arc<Proxy>,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let ws = tokio::select! {
        ws = dial(config, tls) => ws?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    tracing::info!(hub = %config.connect_url, "tunnel established");
    let service = hyper::service::service_fn(move |request| {
        let proxy = proxy.clone();
        async move { proxy.handle(request).await }
    });
    let connection = tunnel::http2::server().serve_connection(TokioIo::new(WsIo::new(ws)), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result.map_err(|e| AgentError::Session(e.to_string())),
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
            Ok(())
        }
    }
}

/// Dials the hub with the cluster token (re-read, so a rotated token file takes effect).
async fn dial(
    config: &AgentConfig,
    tls: &tokio_rustls::TlsConnector,
) -> Result<tunnel::ClientWebSocket, AgentError> {
    let token = config.token.read()?;
    let bearer = HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
        AgentError::Config(ConfigError::Invalid(
            "the cluster token has characters a header cannot carry".into(),
        ))
    })?;
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, bearer);
    headers.insert(
        tunnel::AGENT_VERSION_HEADER,
        HeaderValue::from_static(env!("CARGO_PKG_VERSION")),
    );
    let options = DialOptions {
        tls,
        websocket: Some(tunnel::ws_config()),
        timeout: DIAL_TIMEOUT,
    };
    match tunnel::dial(&config.connect_url, headers, options).await {
        Ok(ws) => Ok(ws),
        Err(DialError::Refused { status }) => {
            let hint = match status {
                401 => " (the token is wrong, unknown or revoked)",
                429 => " (too many connection attempts; backing off)",
                _ => "",
            };
            Err(AgentError::Refused { status, hint })
        }
        Err(source) => Err(AgentError::Dial {
            url: config.connect_url.clone(),
            source,
        }),
    }
}
