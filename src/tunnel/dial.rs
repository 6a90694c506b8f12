//! Dialling a websocket over TCP (`ws://`) or TLS (`wss://`): the agent's tunnel to the hub and
//! the hub's relay to the ShapeBlock server.

use std::io;
use std::time::Duration;

use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The byte stream under a dialled websocket: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A dialled websocket.
pub type ClientWebSocket = WebSocketStream<Box<dyn Io>>;

/// Why a websocket could not be dialled.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("invalid URL: {0}")]
    Url(#[source] WsError),
    #[error("the URL has no host")]
    NoHost,
    #[error("the URL must be wss:// or ws://")]
    Scheme,
    #[error("connect {host}:{port}: {source}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("server name {host}: {source}")]
    ServerName {
        host: String,
        #[source]
        source: rustls_pki_types::InvalidDnsNameError,
    },
    #[error("TLS with {host}: {source}")]
    Tls {
        host: String,
        #[source]
        source: io::Error,
    },
    /// The server answered the upgrade with an HTTP status instead of switching protocols.
    #[error("the server refused the websocket upgrade: HTTP {status}")]
    Refused { status: u16 },
    #[error("websocket handshake: {0}")]
    Handshake(#[source] WsError),
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
}

/// How to dial.
#[derive(Clone, Copy)]
pub struct DialOptions<'a> {
    /// Used for `wss://`.
    pub tls: &'a tokio_rustls::TlsConnector,
    /// tungstenite's defaults when `None`.
    pub websocket: Option<WebSocketConfig>,
    /// For TCP connect, TLS and the websocket handshake together.
    pub timeout: Duration,
}

/// Dials the websocket at `url` (`ws://` or `wss://`), sending `headers` with the upgrade.
pub async fn dial(
    url: &str,
    headers: HeaderMap,
    options: DialOptions<'_>,
) -> Result<ClientWebSocket, DialError> {
    tokio::time::timeout(options.timeout, dial_now(url, headers, options))
        .await
        .unwrap_or(Err(DialError::Timeout(options.timeout)))
}

async fn dial_now(
    url: &str,
    headers: HeaderMap,
    options: DialOptions<'_>,
) -> Result<ClientWebSocket, DialError> {
    let mut request = url.into_client_request().map_err(DialError::Url)?;
    request.headers_mut().extend(headers);
    let uri = request.uri();
    let secure = match uri.scheme_str() {
        Some("wss") => true,
        Some("ws") => false,
        _ => return Err(DialError::Scheme),
    };
    // An IPv6 literal is bracketed in a URL and bare in a socket address or server name.
    let host = uri
        .host()
        .ok_or(DialError::NoHost)?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|source| DialError::Connect {
            host: host.clone(),
            port,
            source,
        })?;
    // Tunnel and relay traffic is small frames that should leave at once.
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = if secure {
        let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|source| {
            DialError::ServerName {
                host: host.clone(),
                source,
            }
        })?;
        let tls = options
            .tls
            .connect(name, tcp)
            .await
            .map_err(|source| DialError::Tls { host, source })?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    match tokio_tungstenite::client_async_with_config(request, stream, options.websocket).await {
        Ok((ws, _response)) => Ok(ws),
        Err(WsError::Http(response)) => Err(DialError::Refused {
            status: response.status().as_u16(),
        }),
        Err(err) => Err(DialError::Handshake(err)),
    }
}
