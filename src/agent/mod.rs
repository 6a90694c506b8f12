//! The tunnel agent that runs in each managed cluster (DESIGN.md, "The tunnel").
//!
//! It dials the hub's websocket endpoint, then serves HTTP/2 on that byte stream: every
//! request the hub sends is checked against [`proxy::Policy`] and forwarded to this cluster's
//! own kube-apiserver with the agent's own credentials; responses (watches included) stream
//! back with HTTP/2 flow control. It can reach nothing but its apiserver. It reconnects with
//! exponential backoff and full jitter, and runs on a single-threaded runtime.
//!
//! When the hub closes the tunnel it says why ([`CloseReason`]), and the agent acts on it:
//! - token revoked, cluster deleted, or a handshake answered 401: the token will not work
//!   again, so the agent does not dial with it; it re-reads the token file every
//!   [`TOKEN_POLL`] and dials as soon as it holds a new token (with the same token only every
//!   [`REVOKED_RETRY`], in case the hub's registry is restored);
//! - replaced by a newer tunnel with the same token: another agent holds the cluster, so this
//!   one waits `replaced_backoff_ms` (doubling with each replacement in a row, with jitter)
//!   instead of taking it back at once, and takes over only if that one has gone.
//!
//! Depends on [`crate::tunnel`] for the wire and on nothing of the hub.
//!
//! Depends on: tunnel, config, secret, telemetry.

pub mod apiserver;
pub mod config;
pub mod proxy;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use http::{HeaderMap, HeaderValue};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::secret::Secret;
use crate::tunnel::{self, Backoff, CloseReason, CloseSignal, DialError, DialOptions, Trust, WsIo};
pub use apiserver::{Apiserver, Upstream};
pub use config::{AgentArgs, AgentConfig, ConfigError};
use proxy::{Policy, Proxy};

/// How long dialing, TLS and the websocket handshake may take together.
const DIAL_TIMEOUT: Duration = Duration::from_secs(15);
/// A tunnel that lived this long resets the reconnect backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// How often an agent whose token was revoked looks for a new one in its token file.
pub const TOKEN_POLL: Duration = Duration::from_secs(2);
/// How often an agent whose token was revoked tries that same token again.
pub const REVOKED_RETRY: Duration = Duration::from_secs(600);
/// How many replacements in a row double the wait of a replaced agent (at most 16×).
const REPLACED_DOUBLINGS: u32 = 4;

/// Why the agent cannot run, or why one tunnel attempt ended.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot set up the client of this cluster's apiserver: {0}")]
    Apiserver(#[from] apiserver::ApiserverError),
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
    #[error("the hub closed the tunnel: {message}")]
    ClosedByHub {
        reason: CloseReason,
        message: String,
    },
}

/// What the agent does after a tunnel attempt ended, by how it ended.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Dial again after the usual backoff.
    Reconnect,
    /// Another agent holds the cluster: wait longer before taking it back.
    BackOffReplaced,
    /// The token is revoked: wait for a new one.
    AwaitNewToken,
}

impl Next {
    /// The decision for a tunnel that ended with `result` (pure).
    fn after(result: &Result<(), AgentError>) -> Self {
        match result {
            Err(AgentError::ClosedByHub {
                reason: CloseReason::TokenRevoked | CloseReason::ClusterDeleted,
                ..
            })
            | Err(AgentError::Refused { status: 401, .. }) => Self::AwaitNewToken,
            Err(AgentError::ClosedByHub {
                reason: CloseReason::Replaced,
                ..
            }) => Self::BackOffReplaced,
            _ => Self::Reconnect,
        }
    }
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
    let apiserver = match &config.kubeconfig {
        Some(path) => Apiserver::from_kubeconfig(path)?,
        None => Apiserver::in_cluster()?,
    };
    run_with_upstream(config, Arc::new(apiserver), shutdown).await
}

/// [`run`] with where requests are forwarded already chosen: the binary passes its
/// apiserver; the load test (`loadtest/`) passes a simulated cluster.
pub async fn run_with_upstream(
    config: AgentConfig,
    upstream: Arc<dyn Upstream>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let refused = config::REFUSED_SUBRESOURCES
        .iter()
        .filter(|s| !config.allowed_subresources.iter().any(|a| a == *s))
        .map(|s| s.to_string())
        .collect();
    let proxy = Arc::new(Proxy::new(
        upstream,
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
    let mut replacements = 0u32;
    loop {
        let started = Instant::now();
        // Re-read at every attempt, so a rotated token file takes effect.
        let (result, token) = match config.token.read() {
            Ok(token) => (
                session(&config, &token, &tls, proxy.clone(), &shutdown).await,
                Some(token),
            ),
            Err(err) => (Err(AgentError::Config(err)), None),
        };
        match &result {
            Ok(()) => tracing::info!("tunnel closed"),
            Err(err) => tracing::warn!(error = %err, "tunnel failed"),
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        if started.elapsed() >= HEALTHY_SESSION {
            backoff.reset();
        }
        let next = match token {
            Some(_) => Next::after(&result),
            None => Next::Reconnect,
        };
        if next != Next::BackOffReplaced {
            replacements = 0;
        }
        let waited = match next {
            Next::Reconnect => {
                let delay = backoff.next_delay();
                tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting");
                sleep_or_shutdown(delay, &shutdown).await
            }
            Next::BackOffReplaced => {
                let delay = replaced_delay(config.replaced_backoff, replacements);
                replacements = replacements.saturating_add(1);
                tracing::warn!(
                    delay_ms = delay.as_millis() as u64,
                    "another agent with this cluster's token took over the tunnel (two agents \
                     share one token?); waiting before taking it back"
                );
                sleep_or_shutdown(delay, &shutdown).await
            }
            Next::AwaitNewToken => match &token {
                Some(token) => await_new_token(&config, token, &shutdown).await,
                None => true,
            },
        };
        if !waited {
            return Ok(());
        }
    }
}

/// Sleeps for `delay`; false if the agent is stopping instead.
async fn sleep_or_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = shutdown.cancelled() => false,
    }
}

/// The wait of a tunnel replaced `replacements` times in a row before: `base`, doubled per
/// replacement up to 16×, times a jitter in [0.5, 1] so agents fighting over one token drift
/// apart.
fn replaced_delay(base: Duration, replacements: u32) -> Duration {
    base.saturating_mul(1 << replacements.min(REPLACED_DOUBLINGS))
        .mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// Waits until the token source holds a token other than the revoked one, or
/// [`REVOKED_RETRY`] has passed; false if the agent is stopping instead.
async fn await_new_token(
    config: &AgentConfig,
    revoked: &Secret,
    shutdown: &CancellationToken,
) -> bool {
    tracing::error!(
        source = %config.token.describe(),
        retry_s = REVOKED_RETRY.as_secs(),
        "the hub no longer accepts this cluster token; waiting for a new one (rotate it with \
         POST /api/v1/clusters/{{id}}/token and update the agent's token Secret)"
    );
    let deadline = Instant::now() + REVOKED_RETRY;
    while Instant::now() < deadline {
        if !sleep_or_shutdown(TOKEN_POLL, shutdown).await {
            return false;
        }
        match config.token.read() {
            Ok(token) if token.expose() != revoked.expose() && !token.expose().is_empty() => {
                tracing::info!("a new cluster token is in place; reconnecting");
                return true;
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "cannot read the cluster token"),
        }
    }
    true
}

/// Dials the hub with `token` and serves the tunnel until it ends. A tunnel the hub closed
/// with a reason ends as [`AgentError::ClosedByHub`].
async fn session(
    config: &AgentConfig,
    token: &Secret,
    tls: &tokio_rustls::TlsConnector,
    proxy: Arc<Proxy>,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let ws = tokio::select! {
        ws = dial(config, token, tls) => ws?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    tracing::info!(hub = %config.connect_url, "tunnel established");
    let service = hyper::service::service_fn(move |request| {
        let proxy = proxy.clone();
        async move { proxy.handle(request).await }
    });
    let hub_close = Arc::new(CloseSignal::default());
    let io = WsIo::new(ws).with_close(hub_close.clone());
    let connection = tunnel::http2::server().serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let ended = tokio::select! {
        result = connection.as_mut() => result.map_err(|e| AgentError::Session(e.to_string())),
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
            return Ok(());
        }
    };
    match hub_close.received() {
        Some(close) => match close.reason() {
            Some(reason) => Err(AgentError::ClosedByHub {
                reason,
                message: close.message,
            }),
            None => Err(AgentError::Session(format!(
                "the hub closed the tunnel with code {}: {}",
                close.code, close.message
            ))),
        },
        None => ended,
    }
}

/// Dials the hub with the cluster token.
async fn dial(
    config: &AgentConfig,
    token: &Secret,
    tls: &tokio_rustls::TlsConnector,
) -> Result<tunnel::ClientWebSocket, AgentError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(reason: CloseReason) -> Result<(), AgentError> {
        Err(AgentError::ClosedByHub {
            reason,
            message: reason.message().into(),
        })
    }

    #[test]
    fn a_revoked_token_is_not_redialled_and_a_replaced_agent_backs_off() {
        assert_eq!(
            Next::after(&closed(CloseReason::TokenRevoked)),
            Next::AwaitNewToken
        );
        assert_eq!(
            Next::after(&closed(CloseReason::ClusterDeleted)),
            Next::AwaitNewToken
        );
        let unauthorized = Err(AgentError::Refused {
            status: 401,
            hint: "",
        });
        assert_eq!(Next::after(&unauthorized), Next::AwaitNewToken);
        assert_eq!(
            Next::after(&closed(CloseReason::Replaced)),
            Next::BackOffReplaced
        );
        for reconnect in [
            closed(CloseReason::HubStopping),
            closed(CloseReason::Unhealthy),
            Err(AgentError::Refused {
                status: 429,
                hint: "",
            }),
            Err(AgentError::Session("reset".into())),
            Ok(()),
        ] {
            assert_eq!(Next::after(&reconnect), Next::Reconnect, "{reconnect:?}");
        }
    }

    #[test]
    fn a_replaced_agent_waits_longer_each_time_up_to_sixteen_times() {
        let base = Duration::from_secs(30);
        for (replacements, factor) in [(0, 1), (1, 2), (3, 8), (4, 16), (9, 16)] {
            for _ in 0..50 {
                let delay = replaced_delay(base, replacements);
                assert!(
                    delay >= base * factor / 2 && delay <= base * factor,
                    "{replacements} replacements: {delay:?}"
                );
            }
        }
    }
}
