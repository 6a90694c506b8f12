//! The hub process: the HTTP API the ShapeBlock server talks to.
//!
//! The hub starts with an embedded default configuration and no external services. Later
//! issues add the agent gateway, the cluster registry and per-cluster sessions here; this
//! module may depend on [`crate::crd`] but nothing depends on it.

mod api;

use std::net::SocketAddr;

use tokio::net::TcpListener;

pub use api::router;

/// Errors that stop the hub from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The listen address could not be bound (in use, or not permitted).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server stopped with an I/O error.
    #[error("HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Hub settings. Defaults give a working hub with no configuration at all.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

/// A bound, not yet serving, hub. Binding first lets callers (and tests) learn the actual
/// address when port 0 was asked for.
pub struct Hub {
    listener: TcpListener,
}

impl Hub {
    /// Binds the API listener.
    pub async fn bind(config: &HubConfig) -> Result<Self, HubError> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| HubError::Bind {
                addr: config.listen,
                source,
            })?;
        Ok(Self { listener })
    }

    /// The address the API is listening on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves the API until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), HubError> {
        tracing::info!(addr = ?self.listener.local_addr().ok(), "hub API listening");
        axum::serve(self.listener, router())
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(HubError::Serve)
    }
}
