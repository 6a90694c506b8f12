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
use http::HeaderValue;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

use crate::tunnel::{self, WsIo};
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
    Tls(String),
    #[error("cannot reach the hub at {url}: {reason}")]
    Dial { url: String, reason: String },
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
    let tls = tls_connector(&config)?;
    let mut failures: u32 = 0;
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
            failures = 0;
        }
        let delay = backoff_delay(config.reconnect_min, config.reconnect_max, failures);
        failures = failures.saturating_add(1);
        tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Exponential backoff with full jitter: uniform in `[0, min(max, min·2^failures)]`, so a
/// fleet that lost its hub at once does not come back at once.
pub fn backoff_delay(min: Duration, max: Duration, failures: u32) -> Duration {
    let ceiling = min
        .saturating_mul(2u32.saturating_pow(failures.min(20)))
        .min(max);
    ceiling.mul_f64(rand::random::<f64>())
}

fn tls_connector(config: &AgentConfig) -> Result<tokio_rustls::TlsConnector, AgentError> {
    let mut roots = rustls::RootCertStore::empty();
    match &config.hub_ca_file {
        Some(path) => {
            use rustls_pki_types::pem::PemObject;
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| AgentError::Tls(format!("{}: {e}", path.display())))?;
            for cert in certs {
                let cert = cert.map_err(|e| AgentError::Tls(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| AgentError::Tls(format!("{}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(AgentError::Tls(format!(
                    "{} holds no certificate",
                    path.display()
                )));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AgentError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(tls)))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Dials the hub and serves the tunnel until it ends.
async fn session(
    config: &AgentConfig,
    tls: &tokio_rustls::TlsConnector,
    proxy: Arc<Proxy>,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let url = config.connect_url.clone();
    let ws = tokio::select! {
        result = tokio::time::timeout(DIAL_TIMEOUT, dial(config, tls)) => match result {
            Ok(ws) => ws?,
            Err(_) => return Err(AgentError::Dial { url, reason: format!("no handshake within {DIAL_TIMEOUT:?}") }),
        },
        _ = shutdown.cancelled() => return Ok(()),
    };
    tracing::info!(hub = %config.connect_url, "tunnel established");
    let service = hyper::service::service_fn(move |request| {
        let proxy = proxy.clone();
        async move { proxy.handle(request).await }
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(tunnel::H2_STREAM_WINDOW)
        .initial_connection_window_size(tunnel::H2_CONNECTION_WINDOW)
        .max_frame_size(tunnel::H2_MAX_FRAME)
        .max_concurrent_streams(256)
        .max_send_buf_size(tunnel::H2_STREAM_WINDOW as usize)
        .keep_alive_interval(Some(tunnel::KEEPALIVE_INTERVAL))
        .keep_alive_timeout(tunnel::KEEPALIVE_TIMEOUT)
        .serve_connection(TokioIo::new(WsIo::new(ws)), service);
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

async fn dial(
    config: &AgentConfig,
    tls: &tokio_rustls::TlsConnector,
) -> Result<tokio_tungstenite::WebSocketStream<Box<dyn Io>>, AgentError> {
    let url = config.connect_url.clone();
    let dial_err = |reason: String| AgentError::Dial {
        url: url.clone(),
        reason,
    };
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| dial_err(e.to_string()))?;
    let token = config.token.read()?;
    let bearer = HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
        AgentError::Config(ConfigError::Invalid(
            "the cluster token has characters a header cannot carry".into(),
        ))
    })?;
    request
        .headers_mut()
        .insert(http::header::AUTHORIZATION, bearer);
    request.headers_mut().insert(
        tunnel::AGENT_VERSION_HEADER,
        HeaderValue::from_static(env!("CARGO_PKG_VERSION")),
    );
    let uri = request.uri().clone();
    let host = uri
        .host()
        .ok_or_else(|| dial_err("no host".into()))?
        .to_string();
    let secure = uri.scheme_str() == Some("wss");
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
        .await
        .map_err(|e| dial_err(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = if secure {
        let name = rustls_pki_types::ServerName::try_from(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        )
        .map_err(|e| dial_err(e.to_string()))?;
        Box::new(
            tls.connect(name, tcp)
                .await
                .map_err(|e| dial_err(format!("TLS: {e}")))?,
        )
    } else {
        Box::new(tcp)
    };
    match tokio_tungstenite::client_async_with_config(request, stream, Some(tunnel::ws_config()))
        .await
    {
        Ok((ws, _response)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let hint = match status {
                401 => " (the token is wrong, unknown or revoked)",
                429 => " (too many connection attempts; backing off)",
                _ => "",
            };
            Err(AgentError::Refused { status, hint })
        }
        Err(err) => Err(dial_err(err.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_full_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for failures in 0..40 {
            let ceiling = min
                .saturating_mul(2u32.saturating_pow(failures.min(20)))
                .min(max);
            for _ in 0..50 {
                assert!(backoff_delay(min, max, failures) <= ceiling);
            }
        }
        // Full jitter spreads delays over the whole range rather than bunching at the cap.
        let samples: Vec<Duration> = (0..1000).map(|_| backoff_delay(min, max, 30)).collect();
        assert!(samples.iter().any(|d| *d < Duration::from_secs(1)));
        assert!(samples.iter().any(|d| *d > Duration::from_secs(4)));
    }
}
