//! The tunnel's wire: HTTP/2 over a websocket byte stream, with the roles reversed (the agent
//! dials and is the HTTP/2 *server*; the hub is the HTTP/2 *client*).
//!
//! Nothing above this module knows the byte stream is a websocket: [`WsIo`] turns the
//! websocket's binary messages into `AsyncRead + AsyncWrite`, and HTTP/2 runs on that.
//!
//! It is also the one home of the network edge the agent, the hub and the relay share:
//! [`tls`] (rustls configurations), [`dial()`] (a websocket over TCP or TLS), [`http2`] (the
//! tunnel's HTTP/2 settings, for both ends), [`Backoff`] (reconnect delays) and [`close`]
//! (closing a tunnel from outside, with a reason the peer can act on).
//! [`crate::agent`], [`crate::hub`] and [`crate::relay`] build on it.
//!
//! # Sizing for thousands of tunnels
//!
//! A hub keeps one websocket and one HTTP/2 connection per cluster, so per-connection buffers
//! are multiplied by the fleet size, while a single cluster's traffic is modest (controller
//! watches and small writes, occasionally a large LIST):
//!
//! - websocket read buffer [`WS_READ_BUFFER`] 16 KiB instead of tungstenite's 128 KiB, and no
//!   write buffer of its own (HTTP/2 already batches frames and flushes): about 16 KiB per idle
//!   tunnel instead of about 256 KiB;
//! - one websocket message per write of at most [`WS_MAX_WRITE`] bytes, so a peer never has
//!   to hold a message larger than [`WS_MAX_MESSAGE`];
//! - HTTP/2 windows [`H2_STREAM_WINDOW`] (256 KiB per stream) and [`H2_CONNECTION_WINDOW`]
//!   (1 MiB per connection): the most unread data either side may have in flight. A slow
//!   watch consumer fills its own stream window and stops only its own stream; the connection
//!   window bounds the worst case per cluster at 1 MiB instead of hyper's default 5 MiB. A
//!   1 MiB window still moves about 80 Mbit/s at 100 ms round trip, far more than a control
//!   loop needs.
//!
//! Depends on: nothing of this crate.
//! Never uses: kube, k8s_openapi (the tunnel knows nothing of Kubernetes).

mod backoff;
pub mod close;
pub mod dial;
pub mod http2;
pub mod tls;
mod ws_io;

use std::time::Duration;

pub use backoff::Backoff;
pub use close::{CloseReason, CloseSignal, PeerClose};
pub use dial::{ClientWebSocket, DialError, DialOptions, dial};
pub use tls::{TlsError, Trust};
pub use ws_io::{ByteCounters, WsIo};

/// Path the agent dials on the hub.
pub const CONNECT_PATH: &str = "/agent/v1/connect";
/// Request header carrying the agent's version in the websocket handshake.
pub const AGENT_VERSION_HEADER: &str = "x-shapeblock-agent-version";
/// Path prefix the agent answers itself instead of forwarding to its apiserver. The
/// Kubernetes API has no such path, so it cannot shadow an API request.
pub const AGENT_LOCAL_PREFIX: &str = "/shapeblock-agent/v1/";
/// Agent-local endpoint the hub uses to measure the tunnel's round-trip time.
pub const AGENT_PING_PATH: &str = "/shapeblock-agent/v1/ping";
/// Header of a request the hub makes for a person (kubectl through the hub): the ShapeBlock
/// user id it acts for. The agent impersonates `shapeblock:user:<id>` for it, and nothing else.
pub const ACT_AS_USER_HEADER: &str = "x-shapeblock-act-as-user";
/// Header (one per team) of the Teams the person of [`ACT_AS_USER_HEADER`] belongs to; the agent
/// impersonates `shapeblock:team:<name>` for each.
pub const ACT_AS_TEAM_HEADER: &str = "x-shapeblock-act-as-team";
/// Whether `id` is a ShapeBlock user id: 1 to 128 letters, digits and `._@+-`, starting and
/// ending with a letter or digit (the Team CRD's rule for members), so the impersonated
/// `shapeblock:user:<id>` can never be a `system:` name or another prefix's.
pub fn valid_user_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    let edge = |b: &u8| b.is_ascii_alphanumeric();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(b))
}

/// Whether `name` is a Team name: a DNS label of at most 63 characters.
pub fn valid_team_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Prefix of every user the agent impersonates: `shapeblock:user:<ShapeBlock user id>`.
pub const IMPERSONATED_USER_PREFIX: &str = "shapeblock:user:";
/// Prefix of every group the agent impersonates: `shapeblock:team:<Team name>`.
pub const IMPERSONATED_GROUP_PREFIX: &str = "shapeblock:team:";

/// Websocket read buffer per tunnel.
pub const WS_READ_BUFFER: usize = 16 * 1024;
/// Largest websocket message either side writes.
pub const WS_MAX_WRITE: usize = 64 * 1024;
/// Largest websocket message either side accepts.
pub const WS_MAX_MESSAGE: usize = 1024 * 1024;
/// HTTP/2 initial window per stream.
pub const H2_STREAM_WINDOW: u32 = 256 * 1024;
/// HTTP/2 initial window per connection.
pub const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Largest HTTP/2 frame payload (the protocol's minimum maximum, which keeps buffers small).
pub const H2_MAX_FRAME: u32 = 16 * 1024;
/// Requests the hub may have open through one tunnel at once (the agent refuses more).
pub const H2_MAX_STREAMS: u32 = 256;
/// How often each side sends an HTTP/2 PING when it has not heard from the other.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a PING may go unanswered before the tunnel is declared dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The websocket settings both ends use.
pub fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(WS_MAX_MESSAGE * 2)
        .max_message_size(Some(WS_MAX_MESSAGE))
        .max_frame_size(Some(WS_MAX_MESSAGE))
}

/// The `101 Switching Protocols` answer to a websocket upgrade whose key gave `accept`.
pub fn switching_protocols(accept: &str) -> http::Response<axum::body::Body> {
    use http::{HeaderValue, StatusCode, header};
    let mut response = http::Response::new(axum::body::Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(value) = HeaderValue::from_str(accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    response
}
