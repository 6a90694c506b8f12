//! Closing a tunnel from outside the task that owns it, and telling the peer why.
//!
//! hyper runs a tunnel's HTTP/2 connection in a task of its own, and that task owns the byte
//! stream. Aborting the hub's handle to the connection leaves that task (and every stream on
//! it) running, so a revocation must reach the byte stream itself: [`CloseSignal::close`]
//! makes the [`super::WsIo`] carrying the tunnel send a websocket close frame with the reason
//! and then end, which ends the HTTP/2 connection, every stream on it, and the socket.
//!
//! The reason travels as a close code in the private range (4000–4999), so an agent can act
//! on it: a revoked token is not retried, a replaced agent backs off instead of fighting.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::Waker;

use futures_util::task::AtomicWaker;

/// Why one end closed a tunnel, as carried in the websocket close frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The cluster's token was rotated: this tunnel's token no longer authenticates.
    TokenRevoked,
    /// The cluster was deleted from the hub.
    ClusterDeleted,
    /// A newer tunnel with the same token took over (two agents share one token).
    Replaced,
    /// The hub is stopping; another hub process (or this one, restarted) will accept again.
    HubStopping,
    /// The hub stopped hearing from the agent (pings unanswered).
    Unhealthy,
}

impl CloseReason {
    const ALL: [CloseReason; 5] = [
        Self::TokenRevoked,
        Self::ClusterDeleted,
        Self::Replaced,
        Self::HubStopping,
        Self::Unhealthy,
    ];

    /// The websocket close code: private-use codes for ShapeBlock's own reasons, the
    /// standard ones (RFC 6455 §7.4.1) where they fit.
    pub fn code(self) -> u16 {
        match self {
            Self::TokenRevoked => 4001,
            Self::ClusterDeleted => 4003,
            Self::Replaced => 4009,
            Self::HubStopping => 1001,
            Self::Unhealthy => 1011,
        }
    }

    /// The reason a close code stands for, if it is one of ours.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The text sent with the code (a close frame's reason is at most 123 bytes).
    pub fn message(self) -> &'static str {
        match self {
            Self::TokenRevoked => "the cluster token was rotated; this token is revoked",
            Self::ClusterDeleted => "the cluster was deleted from the hub",
            Self::Replaced => "a newer tunnel with the same cluster token replaced this one",
            Self::HubStopping => "the hub is stopping",
            Self::Unhealthy => "the hub stopped hearing from this agent",
        }
    }
}

/// A close frame received from the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerClose {
    pub code: u16,
    pub message: String,
}

impl PeerClose {
    /// The reason, when the code is one of ours.
    pub fn reason(&self) -> Option<CloseReason> {
        CloseReason::from_code(self.code)
    }
}

/// Shared between a tunnel's byte stream and whoever may close it or wants to know why the
/// peer did. Costs one atomic load per read or write of the stream while nothing happens.
#[derive(Debug, Default)]
pub struct CloseSignal {
    /// The code of the requested [`CloseReason`], 0 while none.
    requested: AtomicU16,
    waker: AtomicWaker,
    received: Mutex<Option<PeerClose>>,
}

impl CloseSignal {
    /// Closes the tunnel for `reason`; the first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        let _ =
            self.requested
                .compare_exchange(0, reason.code(), Ordering::AcqRel, Ordering::Acquire);
        self.waker.wake();
    }

    /// The reason this end closed the tunnel for, once [`CloseSignal::close`] was called.
    pub fn requested(&self) -> Option<CloseReason> {
        CloseReason::from_code(self.requested.load(Ordering::Acquire))
    }

    /// The close frame the peer sent, if it sent one.
    pub fn received(&self) -> Option<PeerClose> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The reason requested so far, registering `waker` to be woken by a later request.
    pub(super) fn poll_requested(&self, waker: &Waker) -> Option<CloseReason> {
        self.waker.register(waker);
        self.requested()
    }

    pub(super) fn note_received(&self, close: PeerClose) {
        *self.received.lock().unwrap_or_else(|p| p.into_inner()) = Some(close);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_code_and_a_frame_sized_message() {
        for reason in CloseReason::ALL {
            assert_eq!(CloseReason::from_code(reason.code()), Some(reason));
            assert!(reason.message().len() <= 123, "{reason:?}");
        }
        assert_eq!(CloseReason::from_code(1000), None);
        assert_eq!(CloseReason::from_code(0), None);
    }

    #[test]
    fn the_first_reason_wins() {
        let signal = CloseSignal::default();
        assert_eq!(signal.requested(), None);
        signal.close(CloseReason::ClusterDeleted);
        signal.close(CloseReason::HubStopping);
        assert_eq!(signal.requested(), Some(CloseReason::ClusterDeleted));
    }
}
