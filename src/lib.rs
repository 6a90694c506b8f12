//! ShapeBlock hub: one process that reconciles every managed Kubernetes cluster remotely,
//! through a websocket tunnel that a small agent in each cluster opens outward.
//!
//! Layout (each module's own doc says what it may depend on):
//! - [`crd`]: the ShapeBlock custom resource types; the CRD YAML is generated from them.
//! - [`hub`]: the hub process: HTTP API and, later, the gateway, registry and cluster sessions.
//! - [`tunnel`]: the wire shared by hub and agent: HTTP/2 over a websocket byte stream.
//! - [`agent`]: the tunnel agent that runs in each managed cluster.
//! - [`secret`]: strings that never print (tokens).
//! - [`telemetry`]: logging set-up shared by both binaries.
//!
//! The binaries in `src/bin/` only parse arguments and call into these modules.

pub mod agent;
pub mod crd;
pub mod hub;
pub mod secret;
pub mod telemetry;
pub mod tunnel;
