//! The hub's connection to the ShapeBlock server: one task dials its websocket (`ws://` or
//! `wss://` with rustls), sends a resync of the current state, then every event in id order,
//! and is the only writer on the connection. It pings, reads pongs and the server's frames,
//! and reconnects with exponential backoff and full jitter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

use super::{Event, Journal};
use crate::secret::Secret;

/// Where and how to reach the ShapeBlock server.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// `wss://…` (or `ws://…` on a trusted network).
    pub url: String,
    /// Sent as `Authorization: Bearer` and, as the first operator did, as `api_key` in the query.
    pub api_key: Secret,
    /// Events queued for the server; when full, producers wait.
    pub buffer: usize,
    pub ping_interval: Duration,
    /// A frame the server does not take within this, or no pong for three intervals, ends the
    /// connection.
    pub write_timeout: Duration,
    /// Extra CA (PEM) to trust for `wss://`, besides the web PKI roots.
    pub ca_file: Option<std::path::PathBuf>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Ws = WebSocketStream<Box<dyn Io>>;

fn tls_config(config: &RelayConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &config.ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        use rustls_pki_types::pem::PemObject;
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(tls))
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

async fn connect(config: &RelayConfig) -> Result<Ws, String> {
    let url = url_with_key(&config.url, config.api_key.expose());
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("relay URL: {e}"))?;
    let bearer = format!("Bearer {}", config.api_key.expose());
    request.headers_mut().insert(
        http::header::AUTHORIZATION,
        bearer
            .parse()
            .map_err(|_| "the relay API key is not a valid header value")?,
    );
    request.headers_mut().insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("shapeblock-hub/", env!("CARGO_PKG_VERSION"))),
    );
    let uri = request.uri().clone();
    let host = uri.host().ok_or("relay URL has no host")?.to_string();
    let tls = match uri.scheme_str() {
        Some("wss") => true,
        Some("ws") => false,
        _ => return Err("relay URL must be wss:// or ws://".into()),
    };
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    tcp.set_nodelay(true).ok();
    let stream: Box<dyn Io> = if tls {
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("server name {host}: {e}"))?;
        let connector = tokio_rustls::TlsConnector::from(tls_config(config)?);
        Box::new(
            connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}: {e}"))?,
        )
    } else {
        Box::new(tcp)
    };
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, None)
        .await
        .map_err(|e| format!("websocket handshake: {e}"))?;
    Ok(ws)
}

async fn send(ws: &mut Ws, event: &Event, timeout: Duration) -> Result<(), String> {
    let text = serde_json::to_string(event).map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, ws.send(Message::text(text))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("send: {e}")),
        Err(_) => Err(format!("the server took no frame for {timeout:?}")),
    }
}

/// One connection: resync, then events in order, until it fails or the hub stops.
async fn session(
    mut ws: Ws,
    journal: &Journal,
    events: &mut mpsc::Receiver<Arc<Event>>,
    config: &RelayConfig,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let (snapshot, mark) = journal.snapshot().await;
    tracing::info!(
        resources = snapshot.len(),
        up_to = mark,
        "relay connected; resyncing"
    );
    for event in &snapshot {
        send(&mut ws, event, config.write_timeout).await?;
    }
    let mut ping = tokio::time::interval(config.ping_interval);
    ping.tick().await;
    let mut last_pong = Instant::now();
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { return Ok(()) };
                if event.id > mark {
                    send(&mut ws, &event, config.write_timeout).await?;
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Pong(_))) => last_pong = Instant::now(),
                Some(Ok(Message::Close(frame))) => return Err(format!("closed by the server: {frame:?}")),
                Some(Ok(_)) => {} // pings are answered by the library; other frames are ignored
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("the server closed the connection".into()),
            },
            _ = ping.tick() => {
                if last_pong.elapsed() > config.ping_interval * 3 {
                    return Err("no pong from the server".into());
                }
                tokio::time::timeout(config.write_timeout, ws.send(Message::Ping(Vec::new().into())))
                    .await
                    .map_err(|_| "ping timed out".to_string())?
                    .map_err(|e| format!("ping: {e}"))?;
            }
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                return Ok(());
            }
        }
    }
}

/// Runs the relay until `shutdown`.
pub async fn run(
    config: RelayConfig,
    journal: Arc<Journal>,
    mut events: mpsc::Receiver<Arc<Event>>,
    shutdown: CancellationToken,
) {
    let (min, max) = (Duration::from_millis(250), Duration::from_secs(30));
    let mut delay = min;
    loop {
        let connected = tokio::select! {
            result = tokio::time::timeout(Duration::from_secs(15), connect(&config)) => {
                result.unwrap_or_else(|_| Err("connect timed out".into()))
            }
            _ = shutdown.cancelled() => return,
        };
        match connected {
            Ok(ws) => {
                delay = min;
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
                tracing::warn!(%reason, retry_in = ?delay, "relay cannot reach the ShapeBlock server")
            }
        }
        // Away from the server: what queues now is replaced by the resync on reconnect, so
        // keep the queue moving rather than stall the controllers.
        let wait = delay
            .mul_f64(rand::random::<f64>())
            .max(Duration::from_millis(50));
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
        delay = (delay * 2).min(max);
    }
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
