//! The tunnel's HTTP/2 settings, for both ends: the agent's server and the hub's client.
//!
//! hyper's client and server builders are different types with the same setters, so the
//! settings both ends share are written once, in the `shared_settings!` macro below, and each
//! builder adds only what belongs to its role.

use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::{
    H2_CONNECTION_WINDOW, H2_MAX_FRAME, H2_MAX_STREAMS, H2_STREAM_WINDOW, KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT,
};

/// Windows, frame size, send buffer and keep-alive: what must be equal on both ends.
macro_rules! shared_settings {
    ($builder:expr) => {
        $builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_frame_size(H2_MAX_FRAME)
            // A stream buffers at most what its peer's window would take anyway.
            .max_send_buf_size(H2_STREAM_WINDOW as usize)
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
    };
}

/// The agent's end: it serves the requests the hub opens, at most [`H2_MAX_STREAMS`] at once.
/// hyper's server pings whether or not a stream is open.
pub fn server() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    shared_settings!(builder).max_concurrent_streams(H2_MAX_STREAMS);
    builder
}

/// The hub's end. It assumes the agent's stream limit from the first request on (instead of
/// hyper's 100 until the agent's SETTINGS arrive), and pings while idle too, like the agent:
/// an idle tunnel is the common case, and a dead one must be noticed before a request needs it.
pub fn client() -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    shared_settings!(builder)
        .initial_max_send_streams(H2_MAX_STREAMS as usize)
        .keep_alive_while_idle(true);
    builder
}
