//! The hub's connection to the ShapeBlock server: one task dials its websocket (`ws://` or
//! `wss://` with rustls, by [`crate::tunnel::dial()`]), sends a resync of the current state,
//! then every event in id order, and is the only writer on the connection. It pings, reads
//! pongs and the server's frames, and reconnects with the tunnel's [`Backoff`] (exponential,
//! full jitter).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_util::sync::CancellationToken;

use super::delivery::Acks;
use super::{Event, Journal};
use crate::secret::Secret;
use crate::tunnel::{self, Backoff, ClientWebSocket, DialError, DialOptions, TlsError, Trust};

/// How long TCP connect, TLS and the websocket handshake may take together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Reconnect delays: from 250 ms doubling up to 30 s, fully jittered.
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// The shortest wait between attempts, so that a jitter near zero does not retry at once.
const RECONNECT_FLOOR: Duration = Duration::from_millis(50);

/// Where and how to reach the ShapeBlock server.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// `wss://…` (or `ws://…` on a trusted network, when the configuration allows it).
    pub url: String,
    /// Sent as `Authorization: Bearer`.
    pub api_key: Secret,
    /// Also send the key as `api_key` in the URL's query, as the first operator's server reads
    /// it. Off by default: query strings end up in proxies' and servers' access logs.
    pub api_key_in_query: bool,
    /// Events queued for the server; when full, producers wait.
    pub buffer: usize,
    pub ping_interval: Duration,
    /// A frame the server does not take within this, or no pong for three intervals, ends the
    /// connection.
    pub write_timeout: Duration,
    /// Extra CA (PEM) to trust for `wss://`, besides the web PKI roots.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Why the relay could not connect, or why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("TLS set-up: {0}")]
    Tls(#[from] TlsError),
    #[error("the relay API key is not a valid header value")]
    ApiKey,
    #[error("relay URL {url}: {source}")]
    Dial {
        /// Without the API key.
        url: String,
        #[source]
        source: DialError,
    },
    #[error("encoding an event: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("send: {0}")]
    Send(#[source] tokio_tungstenite::tungstenite::Error),
    #[error("the server took no frame for {0:?}")]
    WriteTimeout(Duration),
    #[error("closed by the server: {0:?}")]
    Closed(Option<CloseFrame>),
    #[error("read: {0}")]
    Read(#[source] tokio_tungstenite::tungstenite::Error),
    #[error("the server closed the connection")]
    Eof,
    #[error("no pong from the server")]
    NoPong,
    #[error("ping timed out")]
    PingTimeout,
    #[error("ping: {0}")]
    Ping(#[source] tokio_tungstenite::tungstenite::Error),
}

/// The URL with `api_key` added to its query.
fn url_with_key(url: &str, key: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    let encoded: String = key
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("{url}{separator}api_key={encoded}")
}

async fn connect(config: &RelayConfig) -> Result<ClientWebSocket, RelayError> {
    // Built per attempt, so a replaced CA file takes effect at the next reconnect.
    let trust = match &config.ca_file {
        Some(path) => Trust::WebPkiAnd(path),
        None => Trust::WebPki,
    };
    let tls = tokio_rustls::TlsConnector::from(tunnel::tls::client_config(trust)?);
    let mut headers = http::HeaderMap::new();
    let bearer = format!("Bearer {}", config.api_key.expose());
    headers.insert(
        http::header::AUTHORIZATION,
        bearer.parse().map_err(|_| RelayError::ApiKey)?,
    );
    headers.insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("shapeblock-hub/", env!("CARGO_PKG_VERSION"))),
    );
    let options = DialOptions {
        tls: &tls,
        websocket: None,
        timeout: CONNECT_TIMEOUT,
    };
    let with_key;
    let url = if config.api_key_in_query {
        with_key = url_with_key(&config.url, config.api_key.expose());
        &with_key
    } else {
        &config.url
    };
    tunnel::dial(url, headers, options)
        .await
        .map_err(|source| RelayError::Dial {
            url: config.url.clone(),
            source,
        })
}

async fn send<S>(ws: &mut S, event: &Event, timeout: Duration) -> Result<(), RelayError>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let text = serde_json::to_string(event)?;
    match tokio::time::timeout(timeout, ws.send(Message::text(text))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(RelayError::Send(e)),
        Err(_) => Err(RelayError::WriteTimeout(timeout)),
    }
}

/// Reads the server's frames until the connection ends: pongs acknowledge build log lines
/// ([`Acks`]). Its own task, so pongs are read while the writer waits on a slow server (else the
/// lines' acknowledgements would wait for the writer, and a cut would re-send them all).
async fn read_frames(
    mut frames: futures_util::stream::SplitStream<ClientWebSocket>,
    journal: Arc<Journal>,
    acks: Arc<std::sync::Mutex<Acks>>,
    last_pong: Arc<std::sync::Mutex<Instant>>,
) -> RelayError {
    loop {
        match frames.next().await {
            Some(Ok(Message::Pong(payload))) => {
                *last_pong.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                locked(&acks).pong(&journal.deliveries, &payload);
            }
            Some(Ok(Message::Close(frame))) => return RelayError::Closed(frame),
            Some(Ok(_)) => {} // pings are answered by the library; other frames are ignored
            Some(Err(e)) => return RelayError::Read(e),
            None => return RelayError::Eof,
        }
    }
}

/// One connection: resync, then events in order, until it fails or the hub stops.
async fn session(
    ws: ClientWebSocket,
    journal: &Arc<Journal>,
    events: &mut mpsc::Receiver<Arc<Event>>,
    config: &RelayConfig,
    shutdown: &CancellationToken,
) -> Result<(), RelayError> {
    let (mut ws, frames) = ws.split();
    let acks = Arc::new(std::sync::Mutex::new(Acks::default()));
    let last_pong = Arc::new(std::sync::Mutex::new(Instant::now()));
    let mut reader = tokio::spawn(read_frames(
        frames,
        journal.clone(),
        acks.clone(),
        last_pong.clone(),
    ));
    let _reader = AbortOnDrop(reader.abort_handle());
    let (snapshot, mark) = journal.snapshot().await;
    tracing::info!(
        resources = snapshot.len(),
        up_to = mark,
        "relay connected; resyncing"
    );
    for event in &snapshot {
        send(&mut ws, event, config.write_timeout).await?;
    }
    // After the snapshot, so every line numbered before it is either still queued or re-sent.
    journal.resend_unacknowledged();
    let mut ping = tokio::time::interval(config.ping_interval);
    ping.tick().await;
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { return Ok(()) };
                // Log lines are not in the snapshot: each goes, whatever its id.
                if event.id > mark || event.message_type.is_some() {
                    send(&mut ws, &event, config.write_timeout).await?;
                    let payload = {
                        let mut acks = locked(&acks);
                        acks.sent(&journal.deliveries, &event);
                        acks.wants_ping(events.is_empty()).then(|| acks.ping())
                    };
                    if let Some(payload) = payload {
                        tokio::time::timeout(config.write_timeout, ws.send(Message::Ping(payload.into())))
                            .await
                            .map_err(|_| RelayError::PingTimeout)?
                            .map_err(RelayError::Ping)?;
                    }
                }
            }
            ended = &mut reader => return Err(ended.unwrap_or(RelayError::Eof)),
            _ = ping.tick() => {
                let silent = last_pong.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
                if silent > config.ping_interval * 3 {
                    return Err(RelayError::NoPong);
                }
                let payload = locked(&acks).ping();
                tokio::time::timeout(config.write_timeout, ws.send(Message::Ping(payload.into())))
                    .await
                    .map_err(|_| RelayError::PingTimeout)?
                    .map_err(RelayError::Ping)?;
            }
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close()).await;
                return Ok(());
            }
        }
    }
}

fn locked(acks: &std::sync::Mutex<Acks>) -> std::sync::MutexGuard<'_, Acks> {
    acks.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ends the frame reader with its session.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the relay until `shutdown`.
pub async fn run(
    config: RelayConfig,
    journal: Arc<Journal>,
    mut events: mpsc::Receiver<Arc<Event>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
    loop {
        let connected = tokio::select! {
            result = connect(&config) => result,
            _ = shutdown.cancelled() => return,
        };
        let wait = backoff_after(&mut backoff, connected.is_ok());
        match connected {
            Ok(ws) => {
                journal.stats.connects.inc();
                journal.stats.connected.set(1);
                let ended = session(ws, &journal, &mut events, &config, &shutdown).await;
                journal.stats.connected.set(0);
                match ended {
                    Ok(()) => return,
                    Err(reason) => tracing::warn!(%reason, "relay connection lost; reconnecting"),
                }
            }
            Err(reason) => {
                tracing::warn!(%reason, retry_in = ?wait, "relay cannot reach the ShapeBlock server")
            }
        }
        // Away from the server: what queues now is replaced by the resync on reconnect (status)
        // or re-read from the cluster then (log lines), so keep the queue moving rather than
        // stall the controllers.
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                event = events.recv() => match event {
                    Some(_) => { journal.stats.replaced_by_resync.inc(); }
                    None => return,
                },
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// The wait before the next attempt; a connection that was made starts the delays again.
fn backoff_after(backoff: &mut Backoff, connected: bool) -> Duration {
    if connected {
        backoff.reset();
    }
    backoff.next_delay().max(RECONNECT_FLOOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_added_to_the_query_encoded() {
        assert_eq!(
            url_with_key("wss://sb.example.com/ws", "k&y=1"),
            "wss://sb.example.com/ws?api_key=k%26y%3D1"
        );
        assert_eq!(
            url_with_key("wss://sb.example.com/ws?x=1", "abc"),
            "wss://sb.example.com/ws?x=1&api_key=abc"
        );
    }
}
