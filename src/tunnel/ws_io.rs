//! A websocket as a byte stream.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::WS_MAX_WRITE;
use super::close::{CloseReason, CloseSignal, PeerClose};

/// Adapts a websocket to `AsyncRead + AsyncWrite`: each write becomes one binary message
/// (at most [`WS_MAX_WRITE`] bytes), and binary messages are read back as one contiguous
/// stream. Ping and pong frames are handled by tungstenite underneath; a close frame or a
/// closed connection reads as end of stream. Text messages are a protocol error.
///
/// With a [`CloseSignal`] ([`WsIo::with_close`]), a close requested from outside sends the
/// peer a close frame with the reason and ends the stream at once, whoever owns it; a close
/// frame from the peer is recorded there.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the last binary message.
    pending: Bytes,
    counters: Option<ByteCounters>,
    close: Option<Arc<CloseSignal>>,
    /// Whether the close frame for a requested close was handed to the websocket.
    close_sent: bool,
}

/// Where a [`WsIo`] counts the bytes of the stream it carries: binary message payloads, not
/// websocket framing or TLS. Counting is one atomic add per message, no allocation.
#[derive(Clone, Debug, Default)]
pub struct ByteCounters {
    pub sent: Counter,
    pub received: Counter,
}

impl<S> WsIo<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
            counters: None,
            close: None,
            close_sent: false,
        }
    }

    /// Ends the stream when `signal` is closed, and records the peer's close frame in it.
    pub fn with_close(mut self, signal: Arc<CloseSignal>) -> Self {
        self.close = Some(signal);
        self
    }

    /// Like [`WsIo::new`], counting every byte written and read into `counters`.
    pub fn counted(ws: WebSocketStream<S>, counters: ByteCounters) -> Self {
        Self {
            counters: Some(counters),
            ..Self::new(ws)
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo<S> {
    /// The reason a close was requested for, registering the task to hear of a later one.
    fn close_requested(&self, cx: &Context<'_>) -> Option<CloseReason> {
        self.close.as_ref()?.poll_requested(cx.waker())
    }

    /// Hands the peer one close frame carrying `reason`, if the websocket can take it now,
    /// and tries once to flush it. Never waits: a peer that stopped reading cannot hold a
    /// revoked tunnel open, it only misses the reason.
    fn send_close(&mut self, cx: &mut Context<'_>, reason: CloseReason) {
        if !self.close_sent {
            self.close_sent = true;
            if let Poll::Ready(Ok(())) = Pin::new(&mut self.ws).poll_ready(cx) {
                let frame = CloseFrame {
                    code: CloseCode::from(reason.code()),
                    reason: reason.message().into(),
                };
                let _ = Pin::new(&mut self.ws).start_send(Message::Close(Some(frame)));
            }
        }
        let _ = Pin::new(&mut self.ws).poll_flush(cx);
    }

    fn closed_error(reason: CloseReason) -> io::Error {
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!("tunnel closed: {}", reason.message()),
        )
    }
}

fn to_io(err: WsError) -> io::Error {
    match err {
        WsError::Io(err) => err,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
        }
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(reason) = this.close_requested(cx) {
            this.send_close(cx, reason);
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.pending.is_empty() {
                let n = buf.remaining().min(this.pending.len());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => {
                    if let Some(counters) = &this.counters {
                        counters.received.inc_by(data.len() as u64);
                    }
                    this.pending = data;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text message on the tunnel",
                    )));
                }
                Some(Ok(Message::Close(frame))) => {
                    if let (Some(signal), Some(frame)) = (&this.close, frame) {
                        signal.note_received(PeerClose {
                            code: frame.code.into(),
                            message: frame.reason.chars().take(123).collect(),
                        });
                    }
                    return Poll::Ready(Ok(()));
                }
                None => return Poll::Ready(Ok(())),
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(err)) => return Poll::Ready(Err(to_io(err))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(reason) = this.close_requested(cx) {
            this.send_close(cx, reason);
            return Poll::Ready(Err(Self::closed_error(reason)));
        }
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(to_io)?;
        let n = buf.len().min(WS_MAX_WRITE);
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(to_io)?;
        if let Some(counters) = &this.counters {
            counters.sent.inc_by(n as u64);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(reason) = this.close_requested(cx) {
            this.send_close(cx, reason);
            return Poll::Ready(Err(Self::closed_error(reason)));
        }
        Pin::new(&mut this.ws).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.get_mut().ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(err) => Poll::Ready(Err(to_io(err))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    #[tokio::test]
    async fn bytes_cross_in_order_and_large_writes_are_split() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let client =
            WebSocketStream::from_raw_socket(a, Role::Client, Some(super::super::ws_config()))
                .await;
        let server =
            WebSocketStream::from_raw_socket(b, Role::Server, Some(super::super::ws_config()))
                .await;
        let (mut client, mut server) = (WsIo::new(client), WsIo::new(server));
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        writer.await.unwrap();
        assert_eq!(received, payload, "bytes lost or reordered");
    }

    #[tokio::test]
    async fn counted_bytes_are_the_stream_bytes_each_way() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let config = Some(super::super::ws_config());
        let client = WebSocketStream::from_raw_socket(a, Role::Client, config).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, config).await;
        let (hub, agent) = (ByteCounters::default(), ByteCounters::default());
        let mut client = WsIo::counted(client, hub.clone());
        let mut server = WsIo::counted(server, agent.clone());
        client.write_all(&[7u8; 100_000]).await.unwrap();
        client.flush().await.unwrap();
        let mut buf = vec![0u8; 100_000];
        server.read_exact(&mut buf).await.unwrap();
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut [0u8; 4]).await.unwrap();
        assert_eq!((hub.sent.get(), hub.received.get()), (100_000, 4));
        assert_eq!((agent.sent.get(), agent.received.get()), (4, 100_000));
    }

    #[tokio::test]
    async fn a_close_from_outside_ends_the_stream_and_tells_the_peer_why() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let config = Some(super::super::ws_config());
        let hub = WebSocketStream::from_raw_socket(a, Role::Client, config).await;
        let agent = WebSocketStream::from_raw_socket(b, Role::Server, config).await;
        let hub_signal = Arc::new(CloseSignal::default());
        let agent_signal = Arc::new(CloseSignal::default());
        let mut hub = WsIo::new(hub).with_close(hub_signal.clone());
        let mut agent = WsIo::new(agent).with_close(agent_signal.clone());
        // The stream's owner is parked in a read, as an HTTP/2 connection always is.
        let reader = tokio::spawn(async move {
            let read = hub.read(&mut [0u8; 16]).await;
            (read, hub)
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        hub_signal.close(CloseReason::TokenRevoked);
        let (read, mut hub) = reader.await.unwrap();
        assert_eq!(read.unwrap(), 0, "the owner reads end of stream");
        assert!(
            hub.write(b"x").await.is_err(),
            "a closed stream takes no writes"
        );
        assert_eq!(agent.read(&mut [0u8; 16]).await.unwrap(), 0);
        let received = agent_signal
            .received()
            .expect("no close frame reached the peer");
        assert_eq!(received.reason(), Some(CloseReason::TokenRevoked));
        assert_eq!(received.message, CloseReason::TokenRevoked.message());
    }

    #[tokio::test]
    async fn text_messages_are_refused() {
        use futures_util::SinkExt;
        let (a, b) = tokio::io::duplex(4096);
        let mut client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        client.send(Message::text("hello")).await.unwrap();
        let mut server = WsIo::new(server);
        let err = server.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
